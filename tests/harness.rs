//! Tests of the test tooling itself, against the real things: the shared TLS ZooKeeper
//! answers, kazoo connects to it with the client certificate and is refused with another
//! CA's, fault injection (freeze, kill, restart) does what it says, servers outlive the
//! test thread that started them but not the test process, and waits fail with a useful
//! message.

use std::time::Duration;

use crate::util::python::{
    KazooChild, describe_output, kz_args, kz_plain_args, kz_tls_args, run_kazoo, run_kazoo_ok,
};
use crate::util::zk::{ZkOptions, ZkServer};
use crate::util::{process_alive, test_dir, wait_for, wait_until};

#[test]
fn shared_server_answers_ruok_and_mntr() {
    let zk = ZkServer::shared();
    assert_eq!(zk.four_letter("ruok"), "imok");
    let mntr = zk.mntr();
    assert_eq!(
        mntr.get("zk_server_state").map(String::as_str),
        Some("standalone"),
        "mntr: {mntr:?}"
    );
    assert!(mntr.contains_key("zk_znode_count"), "mntr: {mntr:?}");
    assert!(zk.tls_port().is_some());
}

#[test]
fn chroot_is_created_and_unique() {
    let zk = ZkServer::shared();
    let a = zk.chroot("chroot_is_created_and_unique");
    let b = zk.chroot("chroot_is_created_and_unique");
    assert_ne!(a, b);
    assert!(a.starts_with("/t-chroot_is_created_and_unique-"), "{a}");
    zk.ensure_path(&format!("{a}/x/y"));
    let tree = zk.tree(&a);
    assert_eq!(tree, format!("{a} = \n{a}/x = \n{a}/x/y = \n"));
}

#[test]
fn kazoo_over_tls_creates_and_reads_in_a_chroot() {
    let zk = ZkServer::shared();
    let chroot = zk.chroot("kazoo_over_tls");
    let conn = kz_tls_args(zk, &chroot);
    let created = run_kazoo_ok(
        "kz.py",
        &kz_args(&conn, &["create", "/a/b", "hello world", "--makepath"]),
    );
    assert_eq!(created.trim(), "/a/b");
    assert_eq!(
        run_kazoo_ok("kz.py", &kz_args(&conn, &["get", "/a/b"])),
        "hello world"
    );
    assert_eq!(run_kazoo_ok("kz.py", &kz_args(&conn, &["ls", "/a"])), "b\n");
    // The node really is under the chroot, as seen through the plaintext port.
    assert!(
        zk.tree(&chroot)
            .contains(&format!("{chroot}/a/b = hello world")),
        "{}",
        zk.tree(&chroot)
    );
}

#[test]
fn kazoo_over_tls_with_a_wrong_ca_certificate_is_refused() {
    let zk = ZkServer::shared();
    let chroot = zk.chroot("kazoo_wrong_ca");
    let certs = zk.certs();
    let mut args: Vec<String> = ["--hosts", &zk.tls_hosts(), "--chroot", &chroot, "--tls"]
        .map(String::from)
        .into();
    args.extend(
        [&certs.ca, &certs.wrong_ca_cert, &certs.wrong_ca_key].map(|p| p.display().to_string()),
    );
    args.extend(["--timeout", "2", "ls", "/"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_kazoo("kz.py", &args);
    assert_eq!(
        out.status.code(),
        Some(3),
        "expected 'cannot connect' (exit 3):\n{}",
        describe_output(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kz.py: cannot connect"),
        "{}",
        describe_output(&out)
    );
}

#[test]
fn kazoo_lock_helpers_agree_with_each_other() {
    let zk = ZkServer::shared();
    let chroot = zk.chroot("kazoo_lock_helpers");
    let conn = kz_tls_args(zk, &chroot);
    let lock = "/images/demo/builds/lock";

    let mut holder = KazooChild::spawn("kz.py", &kz_args(&conn, &["lock-hold", lock]));
    holder.expect_line(Duration::from_secs(30), "held");

    assert_eq!(
        run_kazoo_ok("kz.py", &kz_args(&conn, &["lock-try", lock])),
        "not-acquired\n"
    );
    assert_eq!(
        run_kazoo_ok("kz.py", &kz_args(&conn, &["lock-timeout", lock, "0.5"])),
        "timeout\n"
    );
    // kazoo's contenders() gives identifiers; the holder passed none.
    assert_eq!(
        run_kazoo_ok("kz.py", &kz_args(&conn, &["contenders", lock])),
        "\n"
    );
    // The failed attempts left no contender node behind.
    let children = run_kazoo_ok("kz.py", &kz_args(&conn, &["ls", lock]));
    assert_eq!(
        children.lines().count(),
        1,
        "children of {lock}: {children:?}"
    );
    assert!(children.contains("__lock__"), "{children:?}");

    holder.close_stdin();
    holder.expect_line(Duration::from_secs(10), "released");
    let out = holder.finish(Duration::from_secs(10));
    assert!(out.status.success(), "{}", describe_output(&out));

    assert_eq!(
        run_kazoo_ok("kz.py", &kz_args(&conn, &["lock-try", lock])),
        "acquired\n"
    );
    assert_eq!(run_kazoo_ok("kz.py", &kz_args(&conn, &["ls", lock])), "");
}

#[test]
fn freeze_silences_the_server_and_thaw_brings_it_back() {
    let mut zk = ZkServer::start(ZkOptions::default());
    assert!(zk.is_ok(Duration::from_secs(5)));
    zk.freeze();
    // A frozen JVM still has its listening socket: the connection is accepted by the kernel,
    // but no answer ever comes.
    let frozen = zk.try_four_letter("ruok", Duration::from_millis(700));
    assert!(frozen.is_err(), "a frozen server answered ruok: {frozen:?}");
    zk.thaw();
    wait_until(Duration::from_secs(10), "ruok after thaw", || {
        zk.is_ok(Duration::from_secs(1))
    });
}

#[test]
fn restart_keeps_data_and_ports_and_servers_outlive_their_starting_thread() {
    // Start the server from a thread that then ends: PR_SET_PDEATHSIG must not be tied to it.
    #[allow(clippy::disallowed_methods)] // the point is a plain, short-lived thread
    let starter = std::thread::spawn(|| ZkServer::start(ZkOptions::default()));
    let mut zk = starter.join().expect("starter thread");
    assert!(
        zk.is_ok(Duration::from_secs(5)),
        "the server died with the thread that started it"
    );

    let chroot = zk.chroot("restart_keeps_data");
    let conn = kz_plain_args(&zk, &chroot);
    run_kazoo_ok(
        "kz.py",
        &kz_args(&conn, &["create", "/kept", "across restarts"]),
    );
    let (port, old_pid) = (zk.plain_port(), zk.pid());

    zk.restart();
    assert_ne!(zk.pid(), old_pid);
    assert_eq!(zk.plain_port(), port);
    assert!(
        !process_alive(old_pid as i32),
        "the old JVM {old_pid} still runs"
    );
    assert_eq!(
        run_kazoo_ok("kz.py", &kz_args(&conn, &["get", "/kept"])),
        "across restarts"
    );

    zk.kill();
    assert!(
        !zk.is_ok(Duration::from_millis(500)),
        "a killed server answers ruok"
    );
    zk.restart();
    assert_eq!(
        run_kazoo_ok("kz.py", &kz_args(&conn, &["get", "/kept"])),
        "across restarts"
    );
}

/// Environment variable that turns [`jvm_dies_with_the_test_process`] into its child half.
const CHILD_ENV: &str = "NODEPOOL_BUILDER_HARNESS_DYING_CHILD";

#[test]
fn jvm_dies_with_the_test_process() {
    if std::env::var_os(CHILD_ENV).is_some() {
        // Child half: start a server, report its pid, and die at once without any cleanup
        // (SIGKILL: no unwinding, no destructors, no core file).
        let zk = ZkServer::start(ZkOptions::default());
        println!("ZK-PID {}", zk.pid());
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        unreachable!("SIGKILL did not end the process");
    }
    // Parent half: run this same test in a new test process, which kills itself.
    let scratch = test_dir("jvm_dies_with_the_test_process");
    let out = std::process::Command::new(std::env::current_exe().expect("current_exe"))
        .args([
            "--exact",
            "harness::jvm_dies_with_the_test_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .current_dir(&scratch)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("cannot run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pid: i32 = stdout
        .lines()
        .find_map(|l| l.split_once("ZK-PID ").map(|(_, rest)| rest))
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "the child test process printed no ZK-PID ({}):\n{}",
                out.status,
                describe_output(&out)
            )
        });
    assert!(
        !out.status.success(),
        "the child test process was meant to die by SIGKILL"
    );
    wait_until(
        Duration::from_secs(10),
        &format!("ZooKeeper JVM {pid} to die with its test process"),
        || !process_alive(pid),
    );
}

#[test]
fn waits_fail_with_what_they_waited_for() {
    let err = std::panic::catch_unwind(|| {
        wait_until(Duration::from_millis(30), "the impossible", || false);
    })
    .expect_err("wait_until must panic on timeout");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.starts_with("timed out after 30ms: waiting for the impossible"),
        "{msg:?}"
    );

    let mut n = 0;
    let got = wait_for(Duration::from_secs(5), "the third poll", || {
        n += 1;
        (n == 3).then_some(n * 10)
    });
    assert_eq!(got, 30);
}

#[test]
fn a_server_that_cannot_start_fails_with_its_log() {
    // tickTime=0 is a configuration error: the JVM starts, complains and exits.
    let err = std::panic::catch_unwind(|| {
        ZkServer::start(ZkOptions {
            tls: false,
            tick_time_ms: 0,
        })
    })
    .expect_err("a server with tickTime=0 must not start");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("ZooKeeper exited during start-up"), "{msg}");
    assert!(
        msg.contains("tickTime=0"),
        "the failure should show the config:\n{msg}"
    );
    assert!(msg.contains("log tail"), "{msg}");
}
