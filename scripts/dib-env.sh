#!/usr/bin/env bash
# Installs diskimage-builder 3.43 and the Debian packages it needs for the real DIB build
# test (shared/docs/real-services.md §c.2).
#
# Usage: scripts/dib-env.sh [check]
#
#   (no argument)  install what is missing:
#                  * Debian packages: debootstrap, kpartx, squashfs-tools, qemu-utils,
#                    dosfstools, gdisk, parted, e2fsprogs, util-linux, sudo, procps, psmisc,
#                    debian-archive-keyring, xz-utils, zstd (one apt-get call, after one
#                    `apt-get update`, and only when one of them is missing)
#                  * target/test-env/dib-venv: a virtualenv with diskimage-builder, rebuilt
#                    only when `disk-image-create --help` does not work in it
#   check          install nothing; report what is missing and exit 1 if anything is
#
# Idempotent and quick (well under a second) when everything is present. Concurrent runs
# serialise on target/test-env/dib-venv.lock. Everything it does is reported on stderr;
# stdout stays empty.
#
# The mirrors DIB must use are not set here: the test reads them from the machine's apt
# sources at run time and passes them through the diskimage's env-vars.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="$REPO_ROOT/target/test-env"
VENV="$ENV_DIR/dib-venv"
DIB_VERSION="3.43.0"
PYTHON="${PYTHON:-python3}"

PACKAGES=(
    debootstrap kpartx squashfs-tools qemu-utils dosfstools gdisk parted e2fsprogs
    util-linux sudo procps psmisc debian-archive-keyring xz-utils zstd
)

ENV_NAME=dib-env
# shellcheck source=scripts/env-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/env-lib.sh"

do_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "ok: all ${#PACKAGES[@]} Debian packages are installed"
        return 0
    fi
    log "missing: packages ${missing[*]}"
    if [ "$CHECK_ONLY" -eq 1 ]; then
        FAILED=1
        return 0
    fi
    local started=$SECONDS
    apt_install "${missing[@]}"
    for p in "${missing[@]}"; do
        pkg_installed "$p" || die "package $p still not installed"
    done
    log "ok: packages installed in $((SECONDS - started)) s"
}

dib_works() {
    [ -x "$VENV/bin/disk-image-create" ] &&
        "$VENV/bin/disk-image-create" --help >/dev/null 2>&1
}

do_venv() {
    if dib_works; then
        log "ok: diskimage-builder venv at $VENV"
        return 0
    fi
    log "missing: diskimage-builder venv at $VENV"
    if [ "$CHECK_ONLY" -eq 1 ]; then
        FAILED=1
        return 0
    fi
    mkdir -p "$ENV_DIR"
    exec 9>"$ENV_DIR/dib-venv.lock"
    log "waiting for the lock $ENV_DIR/dib-venv.lock"
    flock 9
    if dib_works; then
        log "ok: diskimage-builder venv at $VENV (built by another process meanwhile)"
        exec 9>&-
        return 0
    fi
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        apt_install python3 python3-venv
    elif ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt_install python3-venv
    fi
    local started=$SECONDS
    log "creating virtualenv $VENV with $("$PYTHON" --version 2>&1)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" >&2
    log "installing diskimage-builder==$DIB_VERSION"
    "$VENV/bin/python" -m pip install --quiet "diskimage-builder==$DIB_VERSION" >&2
    dib_works || die "disk-image-create --help still fails in $VENV"
    log "ok: diskimage-builder $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("diskimage-builder"))') in $VENV ($((SECONDS - started)) s)"
    exec 9>&-
}

CHECK_ONLY=0
FAILED=0
case "${1:-}" in
    "") ;;
    check) CHECK_ONLY=1 ;;
    -h | --help | help) usage; exit 0 ;;
    *) usage; die "unknown argument: $1" ;;
esac

do_packages
do_venv

[ "$FAILED" -eq 0 ] || die "something is missing (see above)"
log "done"
