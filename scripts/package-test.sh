#!/usr/bin/env bash
# Builds the Debian package and tests it on this machine, for real.
#
# Usage: scripts/package-test.sh        (as root: it installs and purges the package)
#
#   1. tools: cargo-deb 3.8 (`cargo install`, kept in CARGO_HOME), lintian, dpkg-dev,
#      logrotate, ZooKeeper and openssl (scripts/test-env.sh); each only when missing;
#   2. `cargo deb --locked` (builds target/release once; later runs reuse it), then lintian,
#      whose whole output goes to the log; any E: or W: line fails the test;
#   3. dpkg -i: the user nodepool, its directories, the conffiles, the rc links, nothing
#      started;
#   4. a private TLS ZooKeeper started with the JVM command of tests/util/zk.rs, with fresh
#      certificates; then the files a nodepool 11 site already has, used unchanged: its
#      /etc/nodepool/nodepool.yaml (launcher keys and all; the package ships no config),
#      secure.conf (the TLS files, in /etc/nodepool/tls readable by nodepool) and a logging
#      dictConfig, passed as upstream's -s and -l in DAEMON_ARGS;
#   5. /etc/init.d/nodepool-builder called directly (invoke-rc.d is denied here): start,
#      start again, status, reload (the daemon logs it), SIGUSR2 (a symbolized stack dump
#      from the separate debug file), logrotate (the daemon reopens its log), an invalid
#      configuration (start, reload and restart refuse with 6 and leave the daemon alone),
#      restart, a reinstall under the running daemon, stop, stop again, status (3);
#   6. dpkg -r (the init script of a removed package does nothing), dpkg --purge (the user
#      and /var/lib/nodepool stay, the rest goes).
#
# The log is target/package-test/package-test.log; the .deb stays in target/package-test.
# A package installed by an earlier, interrupted run (marked in /var/tmp) is purged first;
# a nodepool-builder package installed by anything else makes the test refuse to run.
# At the end the machine is as before: package purged, ZooKeeper stopped, and the user
# nodepool and /var/lib/nodepool removed again if this run created them.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$REPO_ROOT/target/package-test"
LOG="$OUT/package-test.log"
WORK="$OUT/work"
PKG=nodepool-builder
INIT=/etc/init.d/$PKG
# The site's files (nodepool 11's names), not the package's.
CONF=/etc/nodepool/nodepool.yaml
SECURE=/etc/nodepool/secure.conf
LOGCONF=/etc/nodepool/builder-logging.yaml
DEFAULTS=/etc/default/$PKG
PIDFILE=/run/nodepool-builder/$PKG.pid
DAEMON_LOG=/var/log/nodepool/$PKG.log
MARKER=/var/tmp/$PKG-package-test.installed
CARGO_DEB_VERSION=3.8.0
# Jars on ZooKeeper's classpath, as in tests/util/zk.rs (real-services.md §a.1).
ZK_CLASSPATH=/usr/share/java/zookeeper.jar:/usr/share/java/netty-codec.jar:/usr/share/java/netty-resolver.jar:/usr/share/java/slf4j-simple.jar

log() { printf 'package-test: %s\n' "$*"; }
die() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || { echo "package-test: must run as root (it installs the package)" >&2; exit 1; }
mkdir -p "$OUT"
# One run at a time on a machine: the package, the user and /run/nodepool-builder are global.
exec 9>"$OUT/.lock"
flock -w 1800 9 || { echo "package-test: another run holds $OUT/.lock" >&2; exit 1; }
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

# ---------------------------------------------------------------------------------------
# Timing and checks.

TIMINGS=()
T0=$EPOCHREALTIME
STEP=""
STEP_T=$T0
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
step() {
    end_step
    STEP="$1"
    STEP_T=$EPOCHREALTIME
    printf '\n==== %s ====\n' "$STEP"
}
end_step() {
    if [ -n "$STEP" ]; then
        TIMINGS+=("$(printf '%6ss  %s' "$(elapsed "$STEP_T" "$EPOCHREALTIME")" "$STEP")")
    fi
    STEP=""
}

# expect_rc WANT COMMAND...: runs COMMAND (output shown), fails unless it exits WANT.
LAST_OUT=""
expect_rc() {
    local want=$1 rc=0
    shift
    printf '$ %s\n' "$*"
    LAST_OUT=$("$@" 2>&1) || rc=$?
    [ -z "$LAST_OUT" ] || printf '%s\n' "$LAST_OUT"
    printf '%s\n' "-> exit $rc"
    [ "$rc" -eq "$want" ] || die "\`$*\` exited $rc, expected $want"
}

# Microseconds since the epoch.
now_us() { echo "${EPOCHREALTIME/./}"; }

# wait_until SECONDS WHAT COMMAND...: polls COMMAND every 0.1 s.
wait_until() {
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$(($(now_us) + secs * 1000000))
    until "$@"; do
        if [ "$(now_us)" -ge "$deadline" ]; then
            die "timed out after ${secs}s: waiting for $what"
        fi
        sleep 0.1
    done
}

# A process that exists and is not a zombie.
alive() { [ -r "/proc/$1/stat" ] && ! awk '{ sub(/.*\) /, ""); exit ($1 != "Z") }' "/proc/$1/stat"; }
daemon_pid() { cat "$PIDFILE" 2>/dev/null || true; }
count_in_log() {
    local c
    c=$(grep -c -- "$1" "$DAEMON_LOG" 2>/dev/null) || true
    echo "${c:-0}"
}
log_has_more() { [ "$(count_in_log "$1")" -gt "$2" ]; }
stat_is() {
    local got
    got=$(stat -c '%U:%G %a' "$1")
    [ "$got" = "$2" ] || die "$1 is $got, expected $2"
    log "ok: $1 is $2"
}

# The daemon runs as nodepool, detached, from the installed binary.
check_daemon_process() {
    local pid=$1 uid gid
    alive "$pid" || die "no daemon process $pid"
    uid=$(id -u nodepool)
    gid=$(id -g nodepool)
    # No root needed: never uid 0 (real, effective, saved, fs) and no capabilities left.
    [ "$uid" -ne 0 ] || die "the user nodepool has uid 0"
    awk '/^Uid:/ { exit !($2 != 0 && $3 != 0 && $4 != 0 && $5 != 0) }' "/proc/$pid/status" \
        || die "pid $pid runs as root: $(grep '^Uid:' "/proc/$pid/status")"
    awk '/^Cap(Eff|Prm):/ { if ($2 !~ /^0+$/) bad = 1 } END { exit bad }' "/proc/$pid/status" \
        || die "pid $pid has capabilities: $(grep '^Cap' "/proc/$pid/status" | tr '\n' ' ')"
    awk -v u="$uid" '/^Uid:/ { exit !($2 == u && $3 == u && $4 == u && $5 == u) }' "/proc/$pid/status" \
        || die "pid $pid does not run as nodepool ($uid): $(grep '^Uid:' "/proc/$pid/status")"
    awk -v g="$gid" '/^Gid:/ { exit !($2 == g && $3 == g && $4 == g && $5 == g) }' "/proc/$pid/status" \
        || die "pid $pid does not run with group nodepool ($gid): $(grep '^Gid:' "/proc/$pid/status")"
    [ "$(readlink "/proc/$pid/exe")" = /usr/sbin/$PKG ] || die "pid $pid runs $(readlink "/proc/$pid/exe")"
    # Fields after the command name: state ppid pgrp session tty_nr.
    read -r _ ppid pgrp session tty _ < <(sed 's/.*) //' "/proc/$pid/stat")
    [ "$session" != "$pid" ] || die "pid $pid is a session leader"
    [ "$tty" = 0 ] || die "pid $pid has a controlling terminal ($tty)"
    grep -qx 'NODEPOOL_BUILDER_LOG=info,nodepool.stack_dump=debug' < <(tr '\0' '\n' <"/proc/$pid/environ") \
        || die "the daemon's environment lacks NODEPOOL_BUILDER_LOG from $DEFAULTS"
    log "ok: daemon pid $pid: uid/gid nodepool ($uid/$gid, not root, no capabilities), ppid $ppid, pgrp $pgrp, session $session, no tty, exe /usr/sbin/$PKG, HOME=$(tr '\0' '\n' <"/proc/$pid/environ" | sed -n 's/^HOME=//p')"
}

# ---------------------------------------------------------------------------------------
# Clean-up: always leave the machine as it was.

ZK_PID=""
USER_EXISTED=yes
VARLIB_EXISTED=yes
FAILED=1
cleanup() {
    local rc=$?
    end_step
    set +e
    if [ "$FAILED" = 1 ]; then
        printf '\n==== diagnostics ====\n'
        [ -r "$DAEMON_LOG" ] && { echo "--- tail of $DAEMON_LOG"; tail -n 60 "$DAEMON_LOG"; }
        [ -r "$WORK/zk/zk.log" ] && { echo "--- tail of ZooKeeper's log"; tail -n 30 "$WORK/zk/zk.log"; }
        [ -x "$INIT" ] && "$INIT" stop
    fi
    if [ -e "$MARKER" ]; then
        pkill_pidfile
        rm -rf /etc/nodepool/tls "$CONF" "$SECURE" "$LOGCONF"
        dpkg --purge "$PKG" >/dev/null 2>&1 && rm -f "$MARKER"
    fi
    if [ -n "$ZK_PID" ]; then
        kill -KILL "$ZK_PID" 2>/dev/null
        wait "$ZK_PID" 2>/dev/null
    fi
    if [ "$USER_EXISTED" = no ] && [ ! -e "$MARKER" ]; then
        userdel nodepool 2>/dev/null
        getent group nodepool >/dev/null && groupdel nodepool 2>/dev/null
    fi
    if [ "$VARLIB_EXISTED" = no ] && [ ! -e "$MARKER" ]; then
        rm -rf /var/lib/nodepool
    fi
    rm -rf "$WORK"
    if [ "${#TIMINGS[@]}" -gt 0 ]; then
        printf '\n==== timings ====\n'
        printf '%s\n' "${TIMINGS[@]}"
        printf '%6ss  total\n' "$(elapsed "$T0" "$EPOCHREALTIME")"
    fi
    if [ "$FAILED" = 1 ]; then
        printf '\npackage-test: FAILED (exit %s); log: %s\n' "$rc" "$LOG"
        exit 1
    fi
    printf '\npackage-test: PASSED; log: %s\n' "$LOG"
}
# Stops a daemon that the init script can no longer stop (package half-removed).
pkill_pidfile() {
    local pid
    pid=$(daemon_pid)
    if [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = /usr/sbin/$PKG ]; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
        alive "$pid" && kill -KILL "$pid" 2>/dev/null
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

cd "$REPO_ROOT"

# ---------------------------------------------------------------------------------------
step "tools"

if ! cargo deb --version >/dev/null 2>&1; then
    log "installing cargo-deb $CARGO_DEB_VERSION (about 2.5 min, once per CARGO_HOME)"
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi
cargo deb --version
missing=()
for p in lintian dpkg-dev logrotate; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
bash scripts/test-env.sh zookeeper openssl </dev/null
lintian --version

# ---------------------------------------------------------------------------------------
step "build the package (cargo deb)"

rm -f "$OUT"/*.deb
cargo deb --locked -o "$OUT/" </dev/null
DEB=$(ls "$OUT"/${PKG}_*.deb)
ls -l "$DEB"
dpkg-deb --info "$DEB"
contents=$(dpkg-deb --contents "$DEB")
printf '%s\n' "$contents"

for path in ./usr/sbin/$PKG ./etc/default/$PKG ./etc/init.d/$PKG \
    ./etc/logrotate.d/$PKG ./usr/lib/systemd/system/$PKG.service \
    ./usr/share/man/man8/$PKG.8.gz ./usr/share/doc/$PKG/copyright \
    ./usr/share/doc/$PKG/changelog.Debian.gz ./usr/share/doc/$PKG/README.Debian \
    ./usr/share/doc/$PKG/examples/$PKG.toml; do
    grep -q -- " $path\$" <<<"$contents" || die "$path is not in the package"
done
grep -q ' \./usr/lib/debug/\.build-id/.*\.debug$' <<<"$contents" || die "no separate debug file"
# /etc/nodepool is the site's (nodepool.yaml is shared with the launcher): nothing of ours.
grep -q ' \./etc/nodepool/' <<<"$contents" && die "the package ships files in /etc/nodepool"
conffiles=$(dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles | sort | tr '\n' ' ')
[ "$conffiles" = "/etc/default/$PKG /etc/init.d/$PKG /etc/logrotate.d/$PKG " ] \
    || die "unexpected conffiles: $conffiles"
log "ok: contents and conffiles"

# ---------------------------------------------------------------------------------------
step "lintian"

lintian_out=$(lintian -I --pedantic --show-overrides "$DEB" 2>&1) || true
printf '%s\n' "$lintian_out"
if printf '%s\n' "$lintian_out" | grep -E '^[EW]: '; then
    die "lintian reports the errors or warnings above"
fi
log "ok: no lintian error or warning"

# ---------------------------------------------------------------------------------------
step "install (dpkg -i)"

state=$(dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null || true)
if [ -n "$state" ] && [ "$state" != "unknown ok not-installed" ] && [ "$state" != "deinstall ok not-installed" ]; then
    [ -e "$MARKER" ] || die "$PKG is already installed ($state), not by this test: refusing to touch it"
    log "purging the package left by an interrupted run"
    pkill_pidfile
    rm -rf /etc/nodepool/tls "$CONF" "$SECURE" "$LOGCONF"
    dpkg --purge "$PKG"
fi
[ -e "$CONF" ] && die "$CONF exists: this test writes a site's files there, refusing to touch it"
getent passwd nodepool >/dev/null || USER_EXISTED=no
[ -e /var/lib/nodepool ] || VARLIB_EXISTED=no
: >"$MARKER"
expect_rc 0 dpkg -i "$DEB"
grep -qi 'warning' <<<"$LAST_OUT" && die "dpkg -i warned"

pw=$(getent passwd nodepool) || die "no user nodepool"
log "user: $pw"
IFS=: read -r _ _ uid _ _ home shell <<<"$pw"
[ "$uid" -lt 1000 ] || die "nodepool is not a system user (uid $uid)"
[ "$home" = /var/lib/nodepool ] || die "nodepool's home is $home"
case "$shell" in */nologin|*/false) ;; *) die "nodepool has the login shell $shell" ;; esac
group=$(id -gn nodepool)
stat_is /var/lib/nodepool "nodepool:$group 755"
stat_is /var/lib/nodepool/images "nodepool:$group 755"
stat_is /var/log/nodepool "nodepool:adm 750"
stat_is /var/log/nodepool/builds "nodepool:adm 750"
stat_is "$INIT" "root:root 755"
ls /etc/rc2.d/S*"$PKG" /etc/rc0.d/K*"$PKG" || die "update-rc.d did not make the rc links"
[ -z "$(daemon_pid)" ] || die "the daemon was started by the installation"
expect_rc 0 /usr/sbin/$PKG --version
# Stripped; the line tables are in the separate debug file.
sections=$(readelf -S --wide /usr/sbin/$PKG)
if grep -q '\.debug_line' <<<"$sections"; then die "/usr/sbin/$PKG is not stripped"; fi
grep -q '\.debug_line' <<<"$(readelf -S --wide /usr/lib/debug/.build-id/*/*.debug)" \
    || die "the separate debug file has no line tables"
expect_rc 3 "$INIT" status
expect_rc 3 "$INIT" bogus
if [ -d /run/systemd/system ]; then
    log "systemd is running: skipping systemd-analyze verify (it would touch the running manager)"
else
    # Also checks that Documentation=man:nodepool-builder(8) exists, where man is installed.
    expect_rc 0 systemd-analyze verify --man="$(command -v man >/dev/null && echo yes || echo no)" \
        /usr/lib/systemd/system/$PKG.service
fi

# ---------------------------------------------------------------------------------------
step "start a TLS ZooKeeper"

mkdir -p "$WORK/zk/data" "$WORK/certs"
(
    cd "$WORK/certs"
    echo "subjectAltName=DNS:localhost,IP:127.0.0.1" >san.ext
    openssl req -new -x509 -nodes -days 30 -newkey rsa:2048 -keyout ca.key -out ca.pem \
        -subj /CN=package-test-ca 2>/dev/null
    for name in server client; do
        openssl req -new -nodes -newkey rsa:2048 -keyout "$name.key" -out "$name.csr" \
            -subj "/CN=$name" 2>/dev/null
        openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
            -out "$name.pem" -days 30 -extfile san.ext 2>/dev/null
    done
    cat server.key server.pem >server-keystore.pem
)
# Two loopback ports nobody listens on.
port_free() { [ -z "$(ss -Htln "sport = :$1")" ]; }
pick_port() {
    local p
    while :; do
        p=$(shuf -i 20000-59999 -n 1)
        if port_free "$p" && [ "$p" != "${1:-}" ]; then echo "$p"; return; fi
    done
}
ZK_PORT=$(pick_port)
ZK_TLS_PORT=$(pick_port "$ZK_PORT")
cat >"$WORK/zk/zoo.cfg" <<EOF
# Written by scripts/package-test.sh, like tests/util/zk.rs does.
tickTime=500
dataDir=$WORK/zk/data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
4lw.commands.whitelist=*
admin.enableServer=false
forceSync=no
secureClientPort=$ZK_TLS_PORT
secureClientPortAddress=127.0.0.1
serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory
ssl.keyStore.location=$WORK/certs/server-keystore.pem
ssl.keyStore.type=PEM
ssl.trustStore.location=$WORK/certs/ca.pem
ssl.trustStore.type=PEM
ssl.clientAuth=need
authProvider.x509=org.apache.zookeeper.server.auth.X509AuthenticationProvider
EOF
(cd "$WORK/zk" && exec java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -cp "$ZK_CLASSPATH" org.apache.zookeeper.server.quorum.QuorumPeerMain "$WORK/zk/zoo.cfg" \
    </dev/null >"$WORK/zk/zk.log" 2>&1) &
ZK_PID=$!
zk_ready() {
    alive "$ZK_PID" || die "ZooKeeper exited during start-up"
    [ "$(timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$ZK_PORT; printf ruok >&3; cat <&3" 2>/dev/null)" = imok ] \
        && timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$ZK_TLS_PORT" 2>/dev/null
}
wait_until 30 "ZooKeeper to answer ruok and accept on its TLS port" zk_ready
log "ok: ZooKeeper pid $ZK_PID on 127.0.0.1:$ZK_PORT, TLS on 127.0.0.1:$ZK_TLS_PORT"

# ---------------------------------------------------------------------------------------
step "configure the installed package"

install -d -m 0750 -o root -g nodepool /etc/nodepool/tls
install -m 0644 "$WORK/certs/ca.pem" "$WORK/certs/client.pem" /etc/nodepool/tls/
install -m 0640 -o root -g nodepool "$WORK/certs/client.key" /etc/nodepool/tls/
# A nodepool 11 site's own files, as its launcher and Python builder read them: nothing in
# them is written for this builder, and none of them is edited below (but for the invalid
# configuration test, which puts the good copy back).
cat >"$CONF" <<EOF
# nodepool.yaml of a nodepool 11 site (shared by the launcher and the builder).
zookeeper-servers:
  - host: 127.0.0.1
    port: $ZK_TLS_PORT
zookeeper-timeout: 10.0
images-dir: /var/lib/nodepool/images
build-log-dir: /var/log/nodepool/builds
webapp:
  port: 8005
labels:
  - name: static-node
    min-ready: 0
providers:
  - name: static-rack
    driver: static
    pools:
      - name: main
        nodes:
          - name: node1.example.com
            labels: static-node
diskimages: []
EOF
cat >"$SECURE" <<EOF
zookeeper-tls:
  cert: /etc/nodepool/tls/client.pem
  key: /etc/nodepool/tls/client.key
  ca: /etc/nodepool/tls/ca.pem
EOF
chown root:nodepool "$SECURE"
chmod 0640 "$SECURE"
cat >"$LOGCONF" <<EOF
version: 1
formatters:
  simple:
    format: '%(asctime)s %(levelname)s %(name)s: %(message)s'
handlers:
  normal:
    class: logging.handlers.WatchedFileHandler
    formatter: simple
    level: DEBUG
    filename: $DAEMON_LOG
loggers:
  nodepool:
    handlers: [normal]
    level: INFO
    propagate: false
  nodepool.stack_dump:
    handlers: [normal]
    level: DEBUG
    propagate: false
root:
  handlers: [normal]
  level: WARNING
EOF
cp "$CONF" "$WORK/good.yaml"
cat "$CONF" "$SECURE" "$LOGCONF"
# The only file of ours the administrator edits: upstream's flags for the site's files.
echo "DAEMON_ARGS=\"-s $SECURE -l $LOGCONF\"" >>"$DEFAULTS"
echo 'NODEPOOL_BUILDER_LOG="info,nodepool.stack_dump=debug"' >>"$DEFAULTS"
expect_rc 0 runuser -u nodepool -- /usr/sbin/$PKG -s "$SECURE" check-config

# ---------------------------------------------------------------------------------------
step "init script: start, status, reload"

expect_rc 0 "$INIT" start
PID=$(daemon_pid)
[ -n "$PID" ] || die "no pidfile $PIDFILE after start"
stat_is "$PIDFILE" "nodepool:$group 644"
check_daemon_process "$PID"
grep -q "ready: builder_id=" "$DAEMON_LOG" || die "the daemon did not log that it is ready"
stat_is /var/lib/nodepool/images/builder_id.txt "nodepool:$group 644"
expect_rc 0 "$INIT" start
[ "$(daemon_pid)" = "$PID" ] || die "a second start replaced the daemon"
expect_rc 0 "$INIT" status
grep -q "$PKG is running" <<<"$LAST_OUT" || die "status does not say running"
expect_rc 0 /usr/sbin/$PKG image-status -s "$SECURE"

n=$(count_in_log "Configuration reloaded from")
expect_rc 0 "$INIT" reload
wait_until 10 "the daemon to log the reload" log_has_more "Configuration reloaded from" "$n"
grep "Configuration reloaded from" "$DAEMON_LOG" | tail -n 1
[ "$(daemon_pid)" = "$PID" ] || die "reload replaced the daemon"
expect_rc 0 "$INIT" force-reload

# ---------------------------------------------------------------------------------------
step "stack dump, log rotation, invalid configuration"

n=$(count_in_log "End debug handler")
kill -USR2 "$PID"
wait_until 20 "the stack dump to end" log_has_more "End debug handler" "$n"
grep -Eq 'nodepool_builder::.* src/[a-z_/]+\.rs:[0-9]+' "$DAEMON_LOG" \
    || die "the stack dump has no file:line of ours (is the debug file found?)"
grep -m 3 -E 'nodepool_builder::.* src/[a-z_/]+\.rs:[0-9]+' "$DAEMON_LOG"

expect_rc 0 logrotate -v -f -s "$WORK/logrotate.state" /etc/logrotate.d/$PKG
[ -s "$DAEMON_LOG.1" ] || die "logrotate did not rotate $DAEMON_LOG"
wait_until 10 "the daemon to reopen its log" log_has_more "Reopened log file" 0
stat_is "$DAEMON_LOG" "nodepool:adm 640"
cat "$DAEMON_LOG"

echo 'no-such-key: 1' >>"$CONF"
expect_rc 6 "$INIT" reload
expect_rc 6 "$INIT" restart
if [ "$(daemon_pid)" != "$PID" ] || ! alive "$PID"; then
    die "an invalid configuration disturbed the daemon"
fi
cp "$WORK/good.yaml" "$CONF"
expect_rc 0 "$INIT" restart
NEW=$(daemon_pid)
if [ -z "$NEW" ] || [ "$NEW" = "$PID" ]; then die "restart kept pid $PID"; fi
alive "$PID" && die "the old daemon $PID survived the restart"
check_daemon_process "$NEW"
PID=$NEW

# ---------------------------------------------------------------------------------------
step "reinstall under the running daemon"

expect_rc 0 dpkg -i "$DEB"
cmp "$CONF" "$WORK/good.yaml" || die "the reinstall touched $CONF"
if [ "$(daemon_pid)" = "$PID" ]; then
    # policy-rc.d denied the postinst's try-restart: the old binary runs on, deleted.
    readlink "/proc/$PID/exe"
    grep -q '(deleted)$' <<<"$(readlink "/proc/$PID/exe")" || die "the binary was not replaced"
    expect_rc 0 "$INIT" restart
    NEW=$(daemon_pid)
    [ "$NEW" != "$PID" ] || die "restart after the reinstall kept pid $PID"
    PID=$NEW
fi
check_daemon_process "$PID"

# ---------------------------------------------------------------------------------------
step "init script: stop"

expect_rc 0 "$INIT" stop
alive "$PID" && die "the daemon $PID survived stop"
[ ! -e "$PIDFILE" ] || die "$PIDFILE is left after stop"
grep -q "nodepool-builder exits" "$DAEMON_LOG" || die "the daemon did not log a clean exit"
expect_rc 0 "$INIT" stop
expect_rc 3 "$INIT" status
expect_rc 7 "$INIT" reload
expect_rc 0 "$INIT" try-restart
[ -z "$(daemon_pid)" ] || die "try-restart started a stopped daemon"
echo 'no-such-key: 1' >>"$CONF"
expect_rc 6 "$INIT" start
[ -z "$(daemon_pid)" ] || die "start with an invalid configuration left a pidfile"
cp "$WORK/good.yaml" "$CONF"

# ---------------------------------------------------------------------------------------
step "remove and purge"

expect_rc 0 dpkg -r "$PKG"
[ ! -e /usr/sbin/$PKG ] || die "dpkg -r left /usr/sbin/$PKG"
expect_rc 0 "$INIT" start
[ -z "$(daemon_pid)" ] || die "the init script of a removed package started something"
expect_rc 3 "$INIT" status
expect_rc 0 dpkg --purge "$PKG"
cmp "$CONF" "$WORK/good.yaml" || die "purge touched the site's $CONF"
# Files the administrator added are the administrator's to remove.
rm -rf /etc/nodepool/tls "$CONF" "$SECURE" "$LOGCONF"
rmdir /etc/nodepool
grep -qi 'warning' <<<"$LAST_OUT" && die "dpkg --purge warned"
rm -f "$MARKER"
for gone in /etc/nodepool /etc/default/$PKG "$INIT" /etc/logrotate.d/$PKG /var/log/nodepool /run/nodepool-builder; do
    [ ! -e "$gone" ] || die "$gone is left after purge"
done
ls /etc/rc*.d/*"$PKG" 2>/dev/null && die "rc links are left after purge"
[ ! -e /etc/systemd/system/multi-user.target.wants/$PKG.service ] || die "the unit is still enabled after purge"
getent passwd nodepool >/dev/null || die "purge deleted the user nodepool"
[ -s /var/lib/nodepool/images/builder_id.txt ] || die "purge deleted this builder's identity"
log "ok: purged; the user nodepool and /var/lib/nodepool are kept"

FAILED=0
