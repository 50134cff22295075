//! Service integration (issue 17, item 5) with the real daemon and a real unix datagram socket
//! as systemd's `NOTIFY_SOCKET`: `WATCHDOG=1` at half the `WATCHDOG_USEC` interval while the
//! scheduler loop turns, and none while the scheduler thread is stopped for real (ptrace
//! stops that one thread; every other thread, the watchdog's included, runs on); `STATUS=`
//! lines that follow a build; `STOPPING=1` on SIGTERM; SIGUSR1 reopening the log without
//! reloading the configuration; and the unit file as `systemd-analyze verify` reads it.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nodepool_builder::model::BuildState;

use crate::util::builder::{BuilderProcess, binary};
use crate::util::site::{TestSite, WAIT};
use crate::util::{repo_root, wait_for, wait_until};

const FEDORA_RAW: &str =
    "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{fake_dib}\"\nformats = [\"raw\"]\n";

/// The socket the builder notifies; `recv` gives one message or `None` at the timeout.
struct Notify {
    sock: UnixDatagram,
}

impl Notify {
    fn bind(path: &Path) -> Notify {
        Notify {
            sock: UnixDatagram::bind(path).unwrap(),
        }
    }

    fn recv(&self, timeout: Duration) -> Option<String> {
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 512];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    /// Waits for a message `want` accepts; every message seen goes into `seen`.
    fn wait(&self, what: &str, seen: &mut Vec<String>, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(m) => {
                    seen.push(m.clone());
                    if want(&m) {
                        return m;
                    }
                }
                None => panic!("timed out after {WAIT:?}: waiting for {what}; got {seen:#?}"),
            }
        }
    }

    /// Reads what is queued now.
    fn drain(&self) {
        while self.recv(Duration::from_millis(1)).is_some() {}
    }
}

/// Starts `nodepool-builder -f` with `NOTIFY_SOCKET` and `env`.
fn start(site: &TestSite, cfg: &Path, socket: &Path, env: &[(&str, &str)]) -> BuilderProcess {
    let mut all = vec![
        ("NOTIFY_SOCKET", socket.to_str().unwrap()),
        (
            "NODEPOOL_BUILDER_LOG",
            "debug,zookeeper_client=info,rustls=info",
        ),
    ];
    all.extend_from_slice(env);
    BuilderProcess::start(
        &["-f", "-c", cfg.to_str().unwrap()],
        &all,
        &site.path("builder.log"),
    )
}

/// The kernel thread id of the daemon's thread named `name`.
fn thread_id(pid: i32, name: &str) -> i32 {
    wait_for(WAIT, &format!("thread {name} of {pid}"), || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| {
                std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
            .and_then(|e| e.file_name().to_str()?.parse().ok())
    })
}

/// Stops one thread of another process (and only that thread) until dropped: ptrace
/// `SEIZE` + `INTERRUPT`, then `DETACH`, which lets it run on.
struct StoppedThread(i32);

impl StoppedThread {
    fn stop(tid: i32) -> StoppedThread {
        // SAFETY: ptrace and waitpid on a thread id with plain integer arguments.
        unsafe {
            assert_eq!(
                libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0),
                0,
                "PTRACE_SEIZE {tid}: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(
                libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0),
                0,
                "PTRACE_INTERRUPT {tid}: {}",
                std::io::Error::last_os_error()
            );
            let mut status = 0;
            assert_eq!(
                libc::waitpid(tid, &mut status, libc::__WALL),
                tid,
                "wait for thread {tid} to stop: {}",
                std::io::Error::last_os_error()
            );
        }
        StoppedThread(tid)
    }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        // SAFETY: detaching the thread this value stopped.
        unsafe {
            libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0);
        }
    }
}

#[test]
fn the_watchdog_is_fed_while_the_scheduler_turns_and_starves_while_it_is_stopped() {
    let site = TestSite::new("systemd_watchdog");
    let cfg = site.config(0, "", "");
    let path = site.path("notify.sock");
    let notify = Notify::bind(&path);
    // 3 s: WATCHDOG=1 every 1.5 s, the scheduler turning at least every 0.75 s.
    let mut b = start(&site, &cfg, &path, &[("WATCHDOG_USEC", "3000000")]);
    let mut seen = Vec::new();
    let first = notify.wait("READY=1", &mut seen, |m| m == "READY=1");
    assert_eq!(seen, [first], "READY=1 comes first");
    let mut pings = Vec::new();
    while pings.len() < 4 {
        notify.wait("WATCHDOG=1", &mut seen, |m| m == "WATCHDOG=1");
        pings.push(Instant::now());
    }
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter()
            .all(|g| *g > Duration::from_millis(750) && *g < Duration::from_millis(2900)),
        "WATCHDOG=1 about every 1.5 s, always within the 3 s interval: {gaps:?}"
    );
    assert!(
        seen.iter()
            .any(|m| m.starts_with("STATUS=0 images ready, 0 building, 0 uploading")),
        "{seen:#?}"
    );

    // A wedged scheduler: its thread stopped for real, everything else running.
    let scheduler = thread_id(b.pid(), "scheduler");
    let stopped = StoppedThread::stop(scheduler);
    b.wait_for_log(WAIT, "The scheduler loop has not turned for ");
    notify.drain();
    // Silence for longer than the whole interval: systemd would kill the service now.
    let silence = Instant::now() + Duration::from_millis(3500);
    while let Some(m) = notify.recv(silence.saturating_duration_since(Instant::now())) {
        assert_ne!(m, "WATCHDOG=1", "a ping while the scheduler is stopped");
    }
    drop(stopped);
    b.wait_for_log(WAIT, "The scheduler loop turns again");
    notify.wait(
        "WATCHDOG=1 after the scheduler runs again",
        &mut seen,
        |m| m == "WATCHDOG=1",
    );
    b.signal(Signal::SIGTERM);
    notify.wait("STOPPING=1", &mut seen, |m| m.starts_with("STOPPING=1"));
    assert!(b.wait_exit(WAIT).success());
}

#[test]
fn status_follows_a_build_and_sigterm_sends_stopping() {
    let site = TestSite::new("systemd_status");
    let cfg = site.config(0, "", FEDORA_RAW);
    let pause = site.control(0, "fake-dib.pause", "");
    let path = site.path("notify.sock");
    let notify = Notify::bind(&path);
    let mut b = start(&site, &cfg, &path, &[]);
    let mut seen = Vec::new();
    notify.wait("READY=1", &mut seen, |m| m == "READY=1");
    notify.wait("a build in the status", &mut seen, |m| {
        m == "STATUS=0 images ready, 1 building, 0 uploading"
    });
    site.wait_builds("fedora", BuildState::Building, 1);
    std::fs::remove_file(&pause).unwrap();
    notify.wait("the ready image in the status", &mut seen, |m| {
        m == "STATUS=1 image ready, 0 building, 0 uploading"
    });
    assert!(
        !seen.iter().any(|m| m.contains("WATCHDOG")),
        "no watchdog without WATCHDOG_USEC: {seen:#?}"
    );
    let statuses = seen.iter().filter(|m| m.starts_with("STATUS=")).count();
    assert!(
        statuses <= 4,
        "STATUS= only when the line changes, not every turn: {seen:#?}"
    );
    b.signal(Signal::SIGTERM);
    notify.wait("STOPPING=1", &mut seen, |m| m.starts_with("STOPPING=1\n"));
    assert!(b.wait_exit(WAIT).success());
}

#[test]
fn sigusr1_reopens_the_moved_log_without_reloading_the_configuration() {
    let site = TestSite::new("systemd_usr1");
    let cfg = site.config(0, "", "");
    let pidfile = site.path("run/nodepool-builder.pid");
    let log = site.path("log/nodepool-builder.log");
    let out = Command::new(binary())
        .args(["-c", cfg.to_str().unwrap(), "-p", pidfile.to_str().unwrap()])
        .args(["--log-file", log.to_str().unwrap()])
        .env("NODEPOOL_BUILDER_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let daemon = nix::unistd::Pid::from_raw(pid);
    // logrotate without copytruncate renames, then signals; meanwhile the config is broken.
    let rotated = site.path("log/nodepool-builder.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    std::fs::write(&cfg, "images-dir = [\nthis is not toml\n").unwrap();
    nix::sys::signal::kill(daemon, Signal::SIGUSR1).unwrap();
    wait_until(WAIT, "the reopened log", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("SIGUSR1 received"))
    });
    let new = std::fs::read_to_string(&log).unwrap();
    assert!(new.contains("Reopened log file"), "{new}");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(!old.contains("SIGUSR1"), "{old}");
    // SIGHUP now would log the broken config; SIGUSR1 did not read it. A stop signal is
    // handled after SIGUSR1 (one signals thread), so the log is complete once it stopped.
    nix::sys::signal::kill(daemon, Signal::SIGTERM).unwrap();
    wait_until(WAIT, "the daemon to stop", || !pidfile.exists());
    let new = std::fs::read_to_string(&log).unwrap();
    assert!(new.contains("nodepool-builder stopped"), "{new}");
    assert!(
        !new.contains("Configuration") && !new.contains("is invalid"),
        "SIGUSR1 reloads nothing: {new}"
    );
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let dir = crate::util::test_dir("systemd_unit");
    let unit = dir.path().join("nodepool-builder.service");
    std::fs::copy(
        repo_root().join("etc/packaging/nodepool-builder.service"),
        &unit,
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (package systemd) is installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{stderr}",
        out.status
    );
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=60",
        "RestartPreventExitStatus=2",
        "RuntimeDirectory=nodepool-builder",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in the unit");
    }
    let reload = text.lines().find(|l| l.starts_with("ExecReload=")).unwrap();
    assert!(
        reload.contains(" check-config ") && reload.contains("&& exec /bin/kill -HUP $MAINPID"),
        "reload validates first: {reload}"
    );
    assert!(
        !text.contains("/run/nodepool/"),
        "the launcher's /run/nodepool is not ours"
    );
}
