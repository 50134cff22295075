# shellcheck shell=bash
# Shell helpers shared by the test-environment installers (test-env.sh, dib-env.sh,
# glance-env.sh, nodepool-env.sh, moto-env.sh). Source it after setting ENV_NAME (the log
# prefix).
# Everything is reported on stderr.

log() { printf '%s: %s\n' "${ENV_NAME:-env}" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The header comment of the script being run, as its usage text.
usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[-1]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
}

# Runs a command as root: directly when we are root, through non-interactive sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root to run: $* (not root and no sudo)"
    fi
}

pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

# Installs Debian packages, running `apt-get update` at most once per script run.
APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: $*"
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "running apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        APT_UPDATED=1
    fi
    log "installing: $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2
}

# The whole run of an installer of one cached virtualenv (moto-env.sh, nodepool-env.sh):
# `check` or nothing as arguments, the answer at once when the venv is fine, else under a
# lock file next to it: prerequisites, a fresh venv, pip, a check, the stamp.
# The caller sets VENV, PYTHON, PACKAGES (pip arguments), STAMP (what the stamp file must
# say), WHAT (its name in log lines) and optionally INSTALL_NOTE (said while installing),
# and defines:
#   venv_ok          whether the venv is installed, stamped and working (quick)
#   ensure_prereqs   installs the Debian packages pip needs for it
#   verify_install   after pip: dies unless it works; prints what was installed
cached_venv_main() {
    local check_only=0 arg
    for arg in "$@"; do
        case "$arg" in
            check) check_only=1 ;;
            -h | --help | help) usage; exit 0 ;;
            *) usage; die "unknown argument: $arg" ;;
        esac
    done
    if venv_ok; then
        log "ok: $WHAT venv at $VENV"
        exit 0
    fi
    log "missing or outdated: $WHAT venv at $VENV"
    [ "$check_only" -eq 0 ] || exit 1

    mkdir -p "$(dirname "$VENV")"
    exec 9>"$VENV.lock"
    log "waiting for the lock $VENV.lock"
    flock 9
    if venv_ok; then
        log "ok: $WHAT venv at $VENV (built by another process meanwhile)"
        exit 0
    fi
    ensure_prereqs
    local started=$SECONDS installed
    log "creating virtualenv $VENV with $("$PYTHON" --version 2>&1)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip wheel >&2
    log "installing ${PACKAGES[*]}${INSTALL_NOTE:+ ($INSTALL_NOTE)}"
    "$VENV/bin/python" -m pip install --quiet "${PACKAGES[@]}" >&2
    installed="$(verify_install)"
    printf '%s\n' "$STAMP" >"$VENV/.nodepool-stamp"
    log "ok: $installed in $VENV ($((SECONDS - started)) s)"
}
