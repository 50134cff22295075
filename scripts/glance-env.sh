#!/usr/bin/env bash
# Installs Glance 33 and Keystone 30 (each with uWSGI) into cached virtualenvs for the
# OpenStack driver's integration tests (shared/docs/real-services.md §b).
#
# Usage: scripts/glance-env.sh [PART...]
#
# Parts (default: all):
#   glance     target/test-env/glance-venv: glance==33.0.0 + uwsgi, and qemu-img (test images)
#   keystone   target/test-env/keystone-venv: keystone==30.0.0 + uwsgi
#   all        both
#   check      install nothing; report what is missing and exit 1 if anything is
#   freeze     rewrite tests/fixtures/glance/*-constraints.txt from the installed venvs
#
# Each venv is installed with `-c tests/fixtures/glance/<part>-constraints.txt` so every
# machine gets the same package set. A venv counts as installed when a stamp file records
# the constraints file's hash and the venv reports the right version; then the script
# returns in well under a second. Concurrent runs serialise on a lock file per venv.
# Everything it does is reported on stderr; stdout stays empty.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="$REPO_ROOT/target/test-env"
FIXTURES="$REPO_ROOT/tests/fixtures/glance"
PYTHON="${PYTHON:-python3}"
GLANCE_VERSION="33.0.0"
KEYSTONE_VERSION="30.0.0"

ENV_NAME=glance-env
# shellcheck source=scripts/env-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/env-lib.sh"

# What pip needs to build uWSGI: a C compiler, the Python and OpenSSL headers, venv support.
ensure_build_prereqs() {
    local missing=()
    command -v "$PYTHON" >/dev/null 2>&1 || missing+=(python3 python3-venv python3-dev)
    command -v gcc >/dev/null 2>&1 || missing+=(gcc)
    # uWSGI builds its https socket (used by the TLS tests) only when OpenSSL's headers exist.
    if command -v dpkg-query >/dev/null 2>&1 && ! pkg_installed libssl-dev; then
        missing+=(libssl-dev)
    fi
    if command -v "$PYTHON" >/dev/null 2>&1; then
        "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
        local inc
        inc="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
        [ -f "$inc/Python.h" ] || missing+=(python3-dev)
    fi
    [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
        die "$("$PYTHON" --version 2>&1) is too old: Glance 33 needs Python 3.11 or newer (set PYTHON=...)"
}

# The tests make their images with qemu-img.
ensure_qemu_img() {
    if command -v qemu-img >/dev/null 2>&1; then
        log "ok: qemu-img is installed"
        return 0
    fi
    [ "$CHECK_ONLY" -eq 0 ] || { log "missing: qemu-img"; FAILED=1; return 0; }
    apt_install qemu-utils
    command -v qemu-img >/dev/null 2>&1 || die "qemu-img still missing after installing qemu-utils"
}

# $1 = part (glance|keystone). Prints the import check the venv must pass.
import_check() {
    case "$1" in
        # Not glance.wsgi.api or keystone.wsgi.api: importing those loads the configuration.
        glance) echo 'import glance.common.wsgi_app, glance.cmd.manage, keystonemiddleware.auth_token' ;;
        keystone) echo 'import keystone.server.flask, keystone.cmd.manage' ;;
    esac
}

stamp_value() {
    local part="$1" constraints="$FIXTURES/$1-constraints.txt"
    if [ -f "$constraints" ]; then
        printf '%s %s\n' "$part" "$(sha256sum "$constraints" | cut -d' ' -f1)"
    else
        printf '%s unconstrained\n' "$part"
    fi
}

venv_ok() {
    local part="$1" venv="$ENV_DIR/$1-venv"
    [ -x "$venv/bin/python" ] && [ -x "$venv/bin/uwsgi" ] || return 1
    [ -f "$venv/.nodepool-stamp" ] && [ "$(cat "$venv/.nodepool-stamp")" = "$(stamp_value "$part")" ] || return 1
    # Cheap: the full import check ran when the stamp was written.
    "$venv/bin/python" -c "import importlib.metadata as m; assert m.version('$part') == '$(version_of "$part")'" \
        >/dev/null 2>&1
}

version_of() {
    case "$1" in
        glance) echo "$GLANCE_VERSION" ;;
        keystone) echo "$KEYSTONE_VERSION" ;;
    esac
}

install_venv() {
    local part="$1" version="$2"
    local venv="$ENV_DIR/$part-venv" constraints="$FIXTURES/$part-constraints.txt"
    if venv_ok "$part"; then
        log "ok: $part venv at $venv"
        return 0
    fi
    log "missing or outdated: $part venv at $venv"
    if [ "$CHECK_ONLY" -eq 1 ]; then
        FAILED=1
        return 0
    fi
    mkdir -p "$ENV_DIR"
    exec 9>"$ENV_DIR/$part-venv.lock"
    log "waiting for the lock $ENV_DIR/$part-venv.lock"
    flock 9
    if venv_ok "$part"; then
        log "ok: $part venv at $venv (built by another process meanwhile)"
        exec 9>&-
        return 0
    fi
    ensure_build_prereqs
    local started=$SECONDS
    log "creating virtualenv $venv with $("$PYTHON" --version 2>&1)"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv" >&2
    local args=(--quiet "$part==$version" uwsgi)
    if [ -f "$constraints" ]; then
        args+=(-c "$constraints")
        log "installing $part==$version + uwsgi with constraints $constraints"
    else
        log "installing $part==$version + uwsgi (unconstrained; run '$0 freeze' afterwards)"
    fi
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    "$venv/bin/python" -m pip install "${args[@]}" >&2
    PYTHONWARNINGS=ignore "$venv/bin/python" -c "$(import_check "$part")" >&2 ||
        die "$part still cannot be imported from $venv/bin/python"
    stamp_value "$part" >"$venv/.nodepool-stamp"
    log "ok: $part $version in $venv ($((SECONDS - started)) s)"
    exec 9>&-
}

freeze() {
    local part venv
    for part in glance keystone; do
        venv="$ENV_DIR/$part-venv"
        [ -x "$venv/bin/python" ] || die "no $part venv to freeze at $venv"
        {
            echo "# pip freeze of a working $part venv (scripts/glance-env.sh freeze); used with -c."
            "$venv/bin/python" -m pip freeze --all | grep -v -E '^(pip|setuptools|wheel)=='
        } >"$FIXTURES/$part-constraints.txt"
        stamp_value "$part" >"$venv/.nodepool-stamp"
        log "wrote $FIXTURES/$part-constraints.txt"
    done
}

CHECK_ONLY=0
FAILED=0
parts=()
for arg in "$@"; do
    case "$arg" in
        all) parts+=(glance keystone) ;;
        glance | keystone) parts+=("$arg") ;;
        check) CHECK_ONLY=1 ;;
        freeze) freeze; exit 0 ;;
        -h | --help | help) usage; exit 0 ;;
        *) usage; die "unknown part: $arg" ;;
    esac
done
[ "${#parts[@]}" -gt 0 ] || parts=(glance keystone)

for part in "${parts[@]}"; do
    case "$part" in
        glance)
            ensure_qemu_img
            install_venv glance "$GLANCE_VERSION"
            ;;
        keystone) install_venv keystone "$KEYSTONE_VERSION" ;;
    esac
done

[ "$FAILED" -eq 0 ] || die "something is missing (see above)"
log "done: ${parts[*]}"
