# shellcheck shell=bash
# Shell helpers shared by the test-environment installers (test-env.sh, dib-env.sh,
# glance-env.sh, nodepool-env.sh). Source it after setting ENV_NAME (the log prefix).
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
