#!/usr/bin/env bash
# Installs the real Python nodepool 11.0.0 CLI into a cached virtualenv, for the tests that
# compare our operator subcommands with upstream's (shared/docs/real-services.md §d).
#
# Usage: scripts/nodepool-env.sh [check]
#
#   (no argument)  install target/test-env/nodepool-venv if it is missing or broken
#   check          install nothing; exit 1 if the venv is missing or broken
#
# The venv holds nodepool==11.0.0 plus two packages it needs but does not declare:
# 'setuptools<81' (nodepool/version.py imports pkg_resources, gone from setuptools 81) and
# cachetools (imported by the state-machine driver). A venv counts as installed when a stamp
# file records this script's package list and `import nodepool.cmd.nodepoolcmd` works; then
# the script returns in well under a second. Concurrent runs serialise on a lock file.
# Everything it does is reported on stderr; stdout stays empty.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/target/test-env/nodepool-venv"
PYTHON="${PYTHON:-python3}"
PACKAGES=("nodepool==11.0.0" "setuptools<81" "cachetools")
STAMP="${PACKAGES[*]}"

ENV_NAME=nodepool-env
# shellcheck source=scripts/env-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/env-lib.sh"

venv_ok() {
    [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/nodepool" ] || return 1
    [ -f "$VENV/.nodepool-stamp" ] && [ "$(cat "$VENV/.nodepool-stamp")" = "$STAMP" ] || return 1
    PYTHONWARNINGS=ignore "$VENV/bin/python" -c 'import nodepool.cmd.nodepoolcmd' >/dev/null 2>&1
}

# pip builds a few sdists (PrettyTable 0.7.2 among them): it needs venv support and, for
# some wheels that may be missing on a platform, a compiler and the Python headers.
ensure_prereqs() {
    local missing=()
    command -v "$PYTHON" >/dev/null 2>&1 || missing+=(python3 python3-venv python3-dev)
    command -v gcc >/dev/null 2>&1 || missing+=(gcc)
    if command -v "$PYTHON" >/dev/null 2>&1; then
        "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
        local inc
        inc="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
        [ -f "$inc/Python.h" ] || missing+=(python3-dev)
    fi
    [ "${#missing[@]}" -eq 0 ] && return 0
    apt_install "${missing[@]}"
}

verify_install() {
    PYTHONWARNINGS=ignore "$VENV/bin/python" -c 'import nodepool.cmd.nodepoolcmd' >&2 ||
        die "nodepool still cannot be imported from $VENV/bin/python"
    local version
    version="$(PYTHONWARNINGS=ignore "$VENV/bin/nodepool" --version 2>&1)"
    case "$version" in
        *11.0.0*) echo "$version" ;;
        *) die "unexpected nodepool version: $version" ;;
    esac
}

WHAT=nodepool
INSTALL_NOTE="about 500 MB; several minutes"
cached_venv_main "$@"
