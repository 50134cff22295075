#!/usr/bin/env bash
# Installs moto's server (PyPI `moto[server]`, an exact 5.x version) into a cached virtualenv
# for the AWS driver's integration tests: S3, EBS direct and EC2 images on loopback, reached
# through AWS_ENDPOINT_URL (tests/util/moto.rs).
#
# Usage: scripts/moto-env.sh [check]
#
#   (no argument)  install target/test-env/moto-venv if it is missing or outdated
#   check          install nothing; exit 1 if the venv is missing or outdated
#
# A venv counts as installed when a stamp file records this script's package list, the venv
# reports the pinned moto version and its `moto_server` script exists; then the script
# returns in well under a second. boto3 comes in with moto and is what the tests use to
# look at what a builder registered. Concurrent runs serialise on a lock file.
# Everything it does is reported on stderr; stdout stays empty.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="$REPO_ROOT/target/test-env"
VENV="$ENV_DIR/moto-venv"
PYTHON="${PYTHON:-python3}"
MOTO_VERSION="5.2.5"
PACKAGES=("moto[server]==$MOTO_VERSION")
STAMP="${PACKAGES[*]}"

ENV_NAME=moto-env
# shellcheck source=scripts/env-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/env-lib.sh"

venv_ok() {
    [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/moto_server" ] || return 1
    [ -f "$VENV/.nodepool-stamp" ] && [ "$(cat "$VENV/.nodepool-stamp")" = "$STAMP" ] || return 1
    "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('moto') == '$MOTO_VERSION'" \
        >/dev/null 2>&1 || return 1
    # The entry point itself: a venv moved or copied elsewhere keeps a dead shebang.
    "$VENV/bin/moto_server" --help >/dev/null 2>&1
}

ensure_prereqs() {
    local missing=()
    command -v "$PYTHON" >/dev/null 2>&1 || missing+=(python3 python3-venv)
    if command -v "$PYTHON" >/dev/null 2>&1; then
        "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
    fi
    [ "${#missing[@]}" -eq 0 ] && return 0
    apt_install "${missing[@]}"
}

CHECK_ONLY=0
for arg in "$@"; do
    case "$arg" in
        check) CHECK_ONLY=1 ;;
        -h | --help | help) usage; exit 0 ;;
        *) usage; die "unknown argument: $arg" ;;
    esac
done

if venv_ok; then
    log "ok: moto venv at $VENV"
    exit 0
fi
log "missing or outdated: moto venv at $VENV"
[ "$CHECK_ONLY" -eq 0 ] || exit 1

mkdir -p "$ENV_DIR"
exec 9>"$ENV_DIR/moto-venv.lock"
log "waiting for the lock $ENV_DIR/moto-venv.lock"
flock 9
if venv_ok; then
    log "ok: moto venv at $VENV (built by another process meanwhile)"
    exit 0
fi
ensure_prereqs
started=$SECONDS
log "creating virtualenv $VENV with $("$PYTHON" --version 2>&1)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV" >&2
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
log "installing ${PACKAGES[*]}"
"$VENV/bin/python" -m pip install --quiet "${PACKAGES[@]}" >&2
# The server must start far enough to print its usage, with the version we pinned.
"$VENV/bin/moto_server" --help >/dev/null 2>&1 || die "moto_server does not run from $VENV/bin"
version="$("$VENV/bin/python" -c 'import moto; print(moto.__version__)')"
[ "$version" = "$MOTO_VERSION" ] || die "unexpected moto version: $version (wanted $MOTO_VERSION)"
printf '%s\n' "$STAMP" >"$VENV/.nodepool-stamp"
log "ok: moto $version, boto3 $("$VENV/bin/python" -c 'import boto3; print(boto3.__version__)') in $VENV ($((SECONDS - started)) s)"
