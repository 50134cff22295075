#!/usr/bin/env bash
# Installs everything the integration tests need, and only what is missing.
#
# Usage: scripts/test-env.sh [PART...]
#
# Parts (default: all):
#   zookeeper  Debian's ZooKeeper 3.8 (the JVM and the jars the test fixture puts on its
#              classpath; see shared/docs/real-services.md §a.1)
#   netcat     netcat-openbsd (for people poking at servers by hand; tests talk TCP themselves)
#   openssl    the openssl command (test certificates)
#   prometheus Debian's Prometheus (`prometheus` server and `promtool`) for tests/metrics.rs
#   packages   zookeeper, netcat, openssl and prometheus
#   qemu       qemu-utils (qemu-img makes real test images)
#   kazoo      a Python virtualenv with kazoo 2.9.0 at target/test-env/kazoo-venv
#   nodepool   nodepool 11.0.0 (its CLI) in target/test-env/nodepool-venv (scripts/nodepool-env.sh)
#   glance     Glance 33 under uWSGI in target/test-env/glance-venv (scripts/glance-env.sh)
#   keystone   Keystone 30 in target/test-env/keystone-venv (scripts/glance-env.sh)
#   moto       moto's server (S3, EBS direct, EC2 images) in target/test-env/moto-venv
#              (scripts/moto-env.sh)
#   dib        diskimage-builder and its Debian packages (scripts/dib-env.sh)
#   all        everything above
#   check      install nothing; report what is missing and exit 1 if anything is
#
# Idempotent and quick when everything is present: apt-get runs (after one `apt-get update`)
# only when a package is missing, and the venv is rebuilt only when `import kazoo` fails in it.
# Concurrent runs (two test binaries at once) serialise on a lock file under target/test-env.
# Everything it does is reported on stderr; stdout stays empty.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="$REPO_ROOT/target/test-env"
VENV="$ENV_DIR/kazoo-venv"
KAZOO_VERSION="2.9.0"
PYTHON="${PYTHON:-python3}"

# Files the ZooKeeper fixture needs; each maps to the Debian package that ships it.
ZK_JARS=(
    /usr/share/java/zookeeper.jar
    /usr/share/java/netty-codec.jar
    /usr/share/java/netty-resolver.jar
    /usr/share/java/slf4j-simple.jar
)

ENV_NAME=test-env
# shellcheck source=scripts/env-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/env-lib.sh"

# Missing Debian packages are collected here and installed in one apt-get call.
MISSING_PKGS=()

want_pkg() {
    local pkg="$1"
    if pkg_installed "$pkg"; then
        log "ok: package $pkg is installed"
    else
        log "missing: package $pkg"
        MISSING_PKGS+=("$pkg")
    fi
}

install_missing_pkgs() {
    [ "${#MISSING_PKGS[@]}" -gt 0 ] || return 0
    if [ "$CHECK_ONLY" -eq 1 ]; then
        return 0
    fi
    apt_install "${MISSING_PKGS[@]}"
    MISSING_PKGS=()
}

check_zookeeper_files() {
    local f bad=0
    command -v java >/dev/null 2>&1 || { log "missing: java on PATH"; bad=1; }
    for f in "${ZK_JARS[@]}"; do
        [ -f "$f" ] || { log "missing: $f"; bad=1; }
    done
    return "$bad"
}

verify_zookeeper() {
    if check_zookeeper_files; then
        log "ok: java and the ZooKeeper jars are present"
        return 0
    fi
    if [ "$CHECK_ONLY" -eq 1 ]; then
        FAILED=1
        return 0
    fi
    # The jars come in through zookeeper's dependencies; ask for them by name in case
    # someone removed them, and for a JRE in case java went missing.
    MISSING_PKGS+=(libzookeeper-java libnetty-java libslf4j-java default-jre-headless)
    install_missing_pkgs
    check_zookeeper_files || die "ZooKeeper files still missing after installing packages"
    log "ok: java and the ZooKeeper jars are present"
}

verify_openssl() {
    command -v openssl >/dev/null 2>&1 && return 0
    log "missing: openssl on PATH"
    FAILED=1
}

kazoo_works() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import kazoo' >/dev/null 2>&1
}

do_kazoo() {
    if kazoo_works; then
        log "ok: kazoo venv at $VENV"
        return 0
    fi
    log "missing: kazoo venv at $VENV"
    if [ "$CHECK_ONLY" -eq 1 ]; then
        FAILED=1
        return 0
    fi
    mkdir -p "$ENV_DIR"
    # Another process (a second test binary) may be building the same venv: take a lock and
    # look again once we have it.
    exec 9>"$ENV_DIR/kazoo-venv.lock"
    log "waiting for the lock $ENV_DIR/kazoo-venv.lock"
    flock 9
    if kazoo_works; then
        log "ok: kazoo venv at $VENV (built by another process meanwhile)"
        exec 9>&-
        return 0
    fi
    # Debian's python3 needs python3-venv for `-m venv` (ensurepip lives there).
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        want_pkg python3
        want_pkg python3-venv
        install_missing_pkgs
    elif ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        want_pkg python3-venv
        install_missing_pkgs
    fi
    log "creating virtualenv $VENV with $("$PYTHON" --version 2>&1)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" >&2
    log "installing kazoo==$KAZOO_VERSION"
    "$VENV/bin/python" -m pip install --quiet "kazoo==$KAZOO_VERSION" >&2
    kazoo_works || die "kazoo still cannot be imported from $VENV/bin/python"
    log "ok: kazoo $("$VENV/bin/python" -c 'import kazoo.version; print(kazoo.version.__version__)') in $VENV"
    exec 9>&-
}

CHECK_ONLY=0
FAILED=0
parts=("$@")
[ "${#parts[@]}" -gt 0 ] || parts=(all)
expanded=()
for part in "${parts[@]}"; do
    case "$part" in
        all) expanded+=(zookeeper netcat openssl prometheus qemu kazoo nodepool glance keystone moto dib) ;;
        packages) expanded+=(zookeeper netcat openssl prometheus qemu) ;;
        zookeeper | netcat | openssl | prometheus | qemu | kazoo | nodepool | glance | keystone | moto | dib) expanded+=("$part") ;;
        check) CHECK_ONLY=1 ;;
        -h | --help | help) usage; exit 0 ;;
        *) usage; die "unknown part: $part" ;;
    esac
done
if [ "${#expanded[@]}" -eq 0 ]; then
    expanded=(zookeeper netcat openssl prometheus qemu kazoo nodepool glance keystone moto dib)
fi

has_part() {
    local p
    for p in "${expanded[@]}"; do
        [ "$p" = "$1" ] && return 0
    done
    return 1
}

# Debian packages first, all in one apt-get call (after at most one apt-get update).
has_part zookeeper && want_pkg zookeeper
has_part netcat && want_pkg netcat-openbsd
has_part openssl && want_pkg openssl
has_part prometheus && want_pkg prometheus
has_part qemu && ! command -v qemu-img >/dev/null 2>&1 && want_pkg qemu-utils
install_missing_pkgs
has_part zookeeper && verify_zookeeper
has_part openssl && verify_openssl
has_part kazoo && do_kazoo
# The other virtualenvs have their own idempotent installers.
if [ "$CHECK_ONLY" -eq 0 ]; then
    has_part nodepool && bash "$REPO_ROOT/scripts/nodepool-env.sh"
    has_part glance && bash "$REPO_ROOT/scripts/glance-env.sh" glance
    has_part keystone && bash "$REPO_ROOT/scripts/glance-env.sh" keystone
    has_part moto && bash "$REPO_ROOT/scripts/moto-env.sh"
    has_part dib && bash "$REPO_ROOT/scripts/dib-env.sh"
fi

if [ "$CHECK_ONLY" -eq 1 ] && { [ "${#MISSING_PKGS[@]}" -gt 0 ] || [ "$FAILED" -eq 1 ]; }; then
    log "something is missing (see above)"
    exit 1
fi
[ "$FAILED" -eq 0 ] || die "something is missing (see above)"
log "done: ${expanded[*]}"
