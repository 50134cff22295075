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
VENV="$REPO_ROOT/target/test-env/moto-venv"
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

# After pip: the server must start far enough to print its usage, with the version we pinned.
verify_install() {
    "$VENV/bin/moto_server" --help >/dev/null 2>&1 || die "moto_server does not run from $VENV/bin"
    local version
    version="$("$VENV/bin/python" -c 'import moto; print(moto.__version__)')"
    [ "$version" = "$MOTO_VERSION" ] || die "unexpected moto version: $version (wanted $MOTO_VERSION)"
    echo "moto $version, boto3 $("$VENV/bin/python" -c 'import boto3; print(boto3.__version__)')"
}

WHAT=moto
cached_venv_main "$@"
