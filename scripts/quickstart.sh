#!/usr/bin/env bash
# The quickstart: see nodepool-builder build and upload an image within a minute.
#
# Installs what is missing (ZooKeeper, openssl, qemu-utils), makes test certificates, starts
# a private TLS-only ZooKeeper on a free loopback port, builds the binary, and runs the
# daemon in the foreground with etc/quickstart.toml: a demo diskimage built by
# etc/quickstart/demo-dib (a real qcow2 made with qemu-img) and a `command` provider that
# uploads into a local directory. Once the first upload is ready it prints the records with
# `dib-image-list` and `image-list`. Ctrl-C stops the daemon and the ZooKeeper it started.
#
# Everything lives in target/quickstart (QS_DIR overrides), recreated at every run.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QS_DIR="${QS_DIR:-$REPO/target/quickstart}"
say() { printf '\033[1mquickstart:\033[0m %s\n' "$*" >&2; }

# The toolchain first: everything else is worth installing only if the binary can be built.
# The minimum Rust is Cargo.toml's rust-version (what the code and the locked crates need).
need_rust=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$REPO/Cargo.toml")
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }
say "checking prerequisites: Rust >= $need_rust, a C compiler, root or sudo"
missing=""
if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
    missing="$missing\n  - cargo and rustc $need_rust or newer: none found. Install rustup (see rustup's own\n    installation instructions), then: rustup toolchain install stable"
else
    have_rust=$(rustc --version | awk '{print $2}')
    if ! version_ge "$have_rust" "$need_rust"; then
        missing="$missing\n  - rustc $need_rust or newer: found $have_rust ($(command -v rustc)). Debian 12's own\n    rustc is 1.63, too old; with rustup: rustup toolchain install stable && rustup default stable"
    fi
fi
if ! command -v cc >/dev/null 2>&1; then
    missing="$missing\n  - a C compiler (some crates build C code): apt-get install gcc"
fi
if [ "$(id -u)" -ne 0 ] && ! sudo -n true 2>/dev/null; then
    missing="$missing\n  - root, or sudo without a password: the script installs Debian packages with apt-get"
fi
if [ -n "$missing" ]; then
    printf 'quickstart: cannot start; missing:%b\n' "$missing" >&2
    exit 1
fi
bash "$REPO/scripts/test-env.sh" packages
if ! command -v qemu-img >/dev/null 2>&1; then
    say "installing qemu-utils"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
fi

rm -rf "$QS_DIR"
mkdir -p "$QS_DIR"/{certs,images,logs,cloud,zk/data}

say "making TLS certificates"
(
    cd "$QS_DIR/certs"
    openssl req -new -x509 -nodes -days 30 -newkey rsa:2048 -keyout ca.key -out ca.pem -subj "/CN=quickstart-ca" 2>/dev/null
    for who in server client; do
        openssl req -new -nodes -newkey rsa:2048 -keyout $who.key -out $who.csr -subj "/CN=$who" 2>/dev/null
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >$who.ext
        openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $who.pem -days 30 -extfile $who.ext 2>/dev/null
    done
    cat server.key server.pem >server-keystore.pem
)

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$QS_DIR/zk/zoo.cfg" <<EOF
tickTime=2000
dataDir=$QS_DIR/zk/data
secureClientPort=$PORT
secureClientPortAddress=127.0.0.1
serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory
ssl.keyStore.location=$QS_DIR/certs/server-keystore.pem
ssl.keyStore.type=PEM
ssl.trustStore.location=$QS_DIR/certs/ca.pem
ssl.trustStore.type=PEM
ssl.clientAuth=need
authProvider.x509=org.apache.zookeeper.server.auth.X509AuthenticationProvider
admin.enableServer=false
EOF

ZK_CP=/usr/share/java/zookeeper.jar:/usr/share/java/netty-codec.jar:/usr/share/java/netty-resolver.jar:/usr/share/java/slf4j-simple.jar
say "starting a private TLS-only ZooKeeper on 127.0.0.1:$PORT"
java -Xmx256m -XX:+UseSerialGC -cp "$ZK_CP" org.apache.zookeeper.server.quorum.QuorumPeerMain "$QS_DIR/zk/zoo.cfg" \
    >"$QS_DIR/zk/zk.log" 2>&1 </dev/null &
ZK_PID=$!
DAEMON_PID=""
WATCH_PID=""
cleanup() {
    [ -n "$WATCH_PID" ] && kill "$WATCH_PID" 2>/dev/null || true
    [ -n "$DAEMON_PID" ] && kill -INT "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null || true
    kill "$ZK_PID" 2>/dev/null && wait "$ZK_PID" 2>/dev/null || true
    say "stopped (files are in $QS_DIR)"
}
trap cleanup EXIT
trap 'exit 0' INT TERM
for _ in $(seq 60); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    kill -0 "$ZK_PID" 2>/dev/null || { cat "$QS_DIR/zk/zk.log" >&2; exit 1; }
    sleep 0.5
done

say "building nodepool-builder"
(cd "$REPO" && cargo build --quiet)
BIN="$REPO/target/debug/nodepool-builder"

export NODEPOOL_QS_DIR="$QS_DIR" NODEPOOL_QS_ZK_PORT="$PORT" NODEPOOL_QS_ETC="$REPO/etc"
cat >"$QS_DIR/env" <<EOF
export NODEPOOL_QS_DIR="$QS_DIR" NODEPOOL_QS_ZK_PORT="$PORT" NODEPOOL_QS_ETC="$REPO/etc"
EOF
"$BIN" check-config -c "$REPO/etc/quickstart.toml" >/dev/null

say "running the daemon in the foreground; in another terminal try:"
say "  . $QS_DIR/env && $BIN -c $REPO/etc/quickstart.toml dib-image-list"
say "  . $QS_DIR/env && $BIN -c $REPO/etc/quickstart.toml image-list"
say "  . $QS_DIR/env && $BIN -c $REPO/etc/quickstart.toml image-build demo"
say "Ctrl-C stops everything."

LOG="$QS_DIR/nodepool-builder.log"
"$BIN" -f -c "$REPO/etc/quickstart.toml" -p "$QS_DIR/nodepool-builder.pid" 2> >(tee "$LOG" >&2) &
DAEMON_PID=$!
(
    for _ in $(seq 240); do
        if grep -q "in local-dir is ready" "$LOG" 2>/dev/null; then
            say "the first upload is ready; the records:"
            "$BIN" -c "$REPO/etc/quickstart.toml" dib-image-list || true
            "$BIN" -c "$REPO/etc/quickstart.toml" image-list || true
            say "the uploaded image: $(ls -d "$QS_DIR"/cloud/*/ 2>/dev/null | head -1)"
            exit 0
        fi
        sleep 0.5
    done
) &
WATCH_PID=$!
wait "$DAEMON_PID"
