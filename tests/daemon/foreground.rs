//! The real binary as an operator runs it: foreground mode against a TLS-only ZooKeeper,
//! component registration (a refused one does not stop the start), clean stop on
//! SIGINT/SIGTERM, `check-config` (every error located, no secret echoed), and a start by a
//! careless parent (SIGCHLD ignored, SIGTERM blocked). Daemon mode is in [`super::detached`].

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util::builder::{BuilderProcess, binary};
use crate::util::python::{kz_args, kz_tls_args, run_kazoo_ok};
use crate::util::test_dir;
use crate::util::zk::ZkServer;

/// A minimal daemon config talking TLS to the shared server under `chroot`.
pub fn tls_config(dir: &Path, server: &ZkServer, chroot: &str) -> std::path::PathBuf {
    let certs = server.certs();
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let cfg = format!(
        r#"images-dir = "{images}"
build-log-dir = "{logs}"
zookeeper-timeout = 6.0

[[zookeeper-servers]]
host = "localhost"
port = {port}
chroot = "{chroot}"

[zookeeper-tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
"#,
        images = images.display(),
        logs = dir.join("logs").display(),
        port = server.tls_port().unwrap(),
        ca = certs.ca.display(),
        cert = certs.cert.display(),
        key = certs.key.display(),
    );
    let path = dir.join("nodepool-builder.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn hostname() -> String {
    nix::unistd::gethostname().unwrap().into_string().unwrap()
}

fn stops_cleanly_on(sig: Signal, name: &str) {
    let server = ZkServer::shared();
    let chroot = server.chroot(name);
    let dir = test_dir(name);
    let cfg = tls_config(dir.path(), server, &chroot);
    let mut builder = BuilderProcess::start(
        &["-d", "-c", cfg.to_str().unwrap()],
        &[],
        &dir.path().join("builder.log"),
    );
    builder.wait_for_log(Duration::from_secs(60), "ready: builder_id=");
    let log = builder.log();
    assert!(log.contains("Registered builder component"), "{log}");
    assert!(log.contains("DEBUG"), "-d logs at DEBUG");
    assert!(
        log.contains("Starting listener for build jobs"),
        "upstream's marker line: {log}"
    );

    let conn = kz_tls_args(server, &chroot);
    let nodes = run_kazoo_ok(
        "kz.py",
        &kz_args(&conn, &["ls", "/nodepool/components/builder"]),
    );
    let nodes: Vec<&str> = nodes.lines().collect();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let host = hostname();
    assert_eq!(nodes[0], format!("{host}0000000000"));
    let data = run_kazoo_ok(
        "kz.py",
        &kz_args(
            &conn,
            &["get", &format!("/nodepool/components/builder/{}", nodes[0])],
        ),
    );
    assert_eq!(
        data,
        format!(
            r#"{{"hostname": "{host}", "kind": "builder", "model_api": 0, "state": "stopped", "version": "{}"}}"#,
            env!("CARGO_PKG_VERSION")
        )
    );
    // builder_id.txt: a canonical uuid4 string without a newline.
    let id = std::fs::read_to_string(dir.path().join("images/builder_id.txt")).unwrap();
    assert_eq!(id.len(), 36, "{id:?}");
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);

    builder.signal(sig);
    let status = builder.wait_exit(Duration::from_secs(20));
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        builder.log()
    );
    let gone = run_kazoo_ok(
        "kz.py",
        &kz_args(
            &conn,
            &[
                "exists",
                &format!("/nodepool/components/builder/{}", nodes[0]),
            ],
        ),
    );
    assert_eq!(
        gone.trim(),
        "no",
        "the session is closed, not left to expire"
    );
}

#[test]
fn foreground_daemon_registers_over_tls_and_stops_on_sigint() {
    stops_cleanly_on(Signal::SIGINT, "daemon_sigint");
}

#[test]
fn foreground_daemon_stops_on_sigterm() {
    stops_cleanly_on(Signal::SIGTERM, "daemon_sigterm");
}

/// Regression (issue 14, item 8): the daemon waited for its component registration for ever
/// (never ready, no work done) when ZooKeeper refused it. It now starts once the session
/// timeout has passed, saying why it is not registered, and registers as soon as ZooKeeper
/// allows it.
#[test]
fn a_refused_registration_does_not_keep_the_daemon_from_starting() {
    let server = ZkServer::shared();
    let chroot = server.chroot("daemon_refused_registration");
    // A read-only builder root (an operator's ACL mistake): ZooKeeper refuses the create.
    let root = format!("{chroot}/nodepool/components/builder");
    server.ensure_path(&root);
    server.refuse_creates_under(&root);
    let dir = test_dir("daemon_refused_registration");
    let cfg = tls_config(dir.path(), server, &chroot);
    let mut builder = BuilderProcess::start(
        &["-d", "-c", cfg.to_str().unwrap()],
        &[],
        &dir.path().join("builder.log"),
    );
    builder.wait_for_log(Duration::from_secs(60), "ready: builder_id=");
    let log = builder.log();
    assert!(
        log.contains("not registered yet") && log.contains("not authorized"),
        "the log says why the builder is not registered:\n{log}"
    );
    assert!(!log.contains("Registered builder component"), "{log}");
    server.allow_creates_under(&root);
    builder.wait_for_log(Duration::from_secs(60), "Registered builder component");
    let conn = kz_tls_args(server, &chroot);
    let nodes = run_kazoo_ok(
        "kz.py",
        &kz_args(&conn, &["ls", "/nodepool/components/builder"]),
    );
    assert_eq!(nodes.lines().count(), 1, "registered once: {nodes:?}");
}

#[test]
fn check_config_exits_2_with_every_error_located() {
    let bad = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/bad");
    let mut checked = 0;
    for entry in std::fs::read_dir(&bad).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let Some((stem, extension)) = name.rsplit_once('.') else {
            continue;
        };
        if !matches!(extension, "toml" | "yaml") || stem.ends_with(".secure") {
            continue;
        }
        let secure = bad.join(format!("{stem}.secure.{extension}"));
        let mut cmd = std::process::Command::new(binary());
        cmd.args(["check-config", "-c", path.to_str().unwrap()]);
        if secure.exists() {
            cmd.args(["-s", secure.to_str().unwrap()]);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let expected = std::fs::read_to_string(bad.join(format!("{stem}.expected"))).unwrap();
        let expected: Vec<&str> = expected
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .collect();
        assert_eq!(
            stderr.lines().count(),
            expected.len(),
            "{name}: one line per error:\n{stderr}"
        );
        for exp in expected {
            let (file, rest) = match exp.strip_prefix("secure:") {
                Some(rest) => (secure.clone(), rest.trim()),
                None => (path.clone(), exp),
            };
            let loc = rest.split(": ").next().unwrap();
            let prefix = format!("{}:{loc}: ", file.display());
            assert!(
                stderr.lines().any(|l| l.starts_with(&prefix)),
                "{name}: no line starting {prefix:?} in\n{stderr}"
            );
        }
        // The daemon itself refuses the same config before doing anything.
        let mut cmd = std::process::Command::new(binary());
        cmd.args(["-f", "-c", path.to_str().unwrap()]);
        if secure.exists() {
            cmd.args(["-s", secure.to_str().unwrap()]);
        }
        let out = cmd.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}: the daemon must refuse a bad config: {out:?}"
        );
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} broken configs");

    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/nodepool-builder.toml");
    let out = std::process::Command::new(binary())
        .args(["check-config", "-c", example.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn secure_file_errors_never_echo_secrets_through_the_binary() {
    let dir = test_dir("secure_echo");
    let main = dir.path().join("main.toml");
    std::fs::write(
        &main,
        "images-dir = \"/tmp\"\n[[zookeeper-servers]]\nhost = \"localhost\"\n",
    )
    .unwrap();
    let secure = dir.path().join("secure.toml");
    std::fs::write(
        &secure,
        "[zookeeper-auth]\ncredentialz = \"user:hunter2-secret\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .args([
            "check-config",
            "-c",
            main.to_str().unwrap(),
            "-s",
            secure.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains(&format!("{}:2:1", secure.display())), "{all}");
    assert!(!all.contains("hunter2"), "the secret leaked: {all}");
}

/// Execs the program in `sys.argv[1:]` with SIGCHLD ignored and SIGTERM, SIGHUP and SIGUSR2
/// blocked, as a careless parent (a shell script, a supervisor) may hand them on.
const CARELESS_PARENT: &str = "import os, signal, sys
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2})
os.execv(sys.argv[1], sys.argv[1:])";

#[test]
fn started_with_sigchld_ignored_and_sigterm_blocked_it_still_builds_uploads_and_stops() {
    use nodepool_builder::model::{BuildState, UploadState};
    let site = crate::util::site::TestSite::new("careless_parent");
    site.fedora_on_cloud(0, "");
    let mut b = site.start_wrapped(0, &["python3", "-c", CARELESS_PARENT], &[], &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", b.pid())).unwrap();
    assert!(
        status.contains("nodepool-build"),
        "the wrapper exec'd the builder:\n{status}"
    );
    site.wait_builds("fedora", BuildState::Ready, 1);
    site.wait_uploads("fedora", "cloud", UploadState::Ready, 1);
    b.signal(Signal::SIGTERM);
    let status = b.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", b.log());
}
