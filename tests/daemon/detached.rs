//! Daemon mode (detached, the default without `-f`) of the real binary, as an init script runs it: the starting command exits only
//! once the daemon is ready (or failed), the pidfile lock, a detached process with no
//! terminal, SIGHUP (reload and log reopen), SIGTERM, `NOTIFY_SOCKET`, and clean signal state
//! in the daemon's children.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use nodepool_builder::model::BuildState;
use nodepool_builder::zk::paths;

use crate::util::builder::{BuilderProcess, binary};
use crate::util::site::ONE_IMAGE;
use crate::util::site::{TestSite, WAIT};
use crate::util::{file_tail, process_alive, wait_for, wait_until};

/// A daemon started by a test; it is not our child, so it is killed by pid when dropped.
struct Daemon {
    pid: i32,
    pidfile: PathBuf,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if process_alive(self.pid) {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid), sig).expect("signal the daemon");
    }

    /// Waits until the log contains `needle`, and the daemon is still alive.
    #[track_caller]
    fn wait_for_log(&self, needle: &str) {
        wait_until(
            WAIT,
            &format!("{needle:?} in the daemon log {}", self.log.display()),
            || {
                assert!(
                    process_alive(self.pid),
                    "the daemon died; log:\n{}",
                    file_tail(&self.log, 60)
                );
                self.log().contains(needle)
            },
        );
    }

    /// SIGTERM, then the process, the pidfile and the component node must go.
    fn stop(self, site: &TestSite) {
        self.signal(Signal::SIGTERM);
        wait_until(
            Duration::from_secs(20),
            "the daemon to exit after SIGTERM",
            || !process_alive(self.pid),
        );
        assert!(!self.pidfile.exists(), "pidfile removed on a clean exit");
        assert!(
            components(site).is_empty(),
            "component node deleted (session closed)"
        );
        let log = self.log();
        assert!(log.contains("nodepool-builder exits"), "{log}");
    }
}

/// The builder component nodes in the site's ZooKeeper.
fn components(site: &TestSite) -> Vec<String> {
    site.zk
        .get_children(&paths::component_kind_path("builder"))
        .unwrap()
        .unwrap_or_default()
}

/// Runs the binary in daemon mode (no -d/-f) and waits for the starting command to exit.
fn start(
    site: &TestSite,
    cfg: &Path,
    pidfile: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> (Output, Duration) {
    let mut cmd = Command::new(binary());
    cmd.args([
        "-c",
        cfg.to_str().unwrap(),
        "-p",
        pidfile.to_str().unwrap(),
        "--log-file",
        log.to_str().unwrap(),
    ]);
    cmd.env("NODEPOOL_BUILDER_LOG", "info").stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // A relative working directory: the daemon must not depend on it.
    cmd.current_dir(site.dir.path());
    let started = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (out, started.elapsed())
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Starts a daemon that must come up; returns it once the starting command has exited 0.
#[track_caller]
fn start_ok(site: &TestSite, cfg: &Path, env: &[(&str, &str)]) -> Daemon {
    let pidfile = site.path("run/nodepool-builder.pid");
    let log = site.path("log/nodepool-builder.log");
    let (out, took) = start(site, cfg, &pidfile, &log, env);
    let pid = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    if let Some(pid) = pid {
        // Cleans up when an assertion below fails.
        let daemon = Daemon {
            pid,
            pidfile: pidfile.clone(),
            log: log.clone(),
        };
        assert!(
            out.status.success(),
            "daemon start failed after {took:?}: {}\n--- log ---\n{}",
            describe(&out),
            daemon.log()
        );
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "a successful start prints nothing: {}",
            describe(&out)
        );
        eprintln!("daemon start took {took:?}");
        return daemon;
    }
    panic!(
        "no pid in {} after start: {}\n--- log ---\n{}",
        pidfile.display(),
        describe(&out),
        file_tail(&log, 60)
    );
}

/// `/proc/<pid>/stat` fields after the command name: (state, ppid, pgrp, session, tty_nr).
fn stat(pid: i32) -> (char, i32, i32, i32, i32) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = text.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    (
        f[0].chars().next().unwrap(),
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
        f[3].parse().unwrap(),
        f[4].parse().unwrap(),
    )
}

fn status_field(pid: i32, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .to_owned()
}

#[test]
fn start_returns_after_readiness_refuses_a_second_instance_and_stops_on_sigterm() {
    let site = TestSite::new("dm_start");
    let cfg = site.config(0, "", "");
    let daemon = start_ok(&site, &cfg, &[]);

    // The starting command exited 0: the daemon was registered by then.
    let nodes = components(&site);
    assert_eq!(
        nodes.len(),
        1,
        "component registered before the start command returned: {nodes:?}"
    );
    assert!(
        daemon.log().contains("ready: builder_id="),
        "{}",
        daemon.log()
    );

    let (state, ppid, pgrp, session, tty) = stat(daemon.pid);
    assert_ne!(state, 'Z');
    assert_ne!(ppid, std::process::id() as i32, "detached: not our child");
    assert_ne!(pgrp, daemon.pid, "not a process group leader");
    assert_ne!(
        session, daemon.pid,
        "not a session leader, so it can never get a terminal"
    );
    assert_eq!(tty, 0, "no controlling terminal");
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/cwd", daemon.pid)).unwrap(),
        Path::new("/")
    );
    assert_eq!(status_field(daemon.pid, "Umask"), "0022");
    for fd in 0..=1 {
        assert_eq!(
            std::fs::read_link(format!("/proc/{}/fd/{fd}", daemon.pid)).unwrap(),
            Path::new("/dev/null"),
            "fd {fd}"
        );
    }
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/fd/2", daemon.pid)).unwrap(),
        daemon.log,
        "stderr is the log file"
    );
    let mode = std::fs::metadata(&daemon.pidfile).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o644
    );
    assert_eq!(
        std::fs::read_to_string(&daemon.pidfile).unwrap(),
        format!("{}\n", daemon.pid)
    );

    // A second start with the same pidfile refuses before doing anything.
    let cfg2 = site.path("second.toml");
    std::fs::copy(&cfg, &cfg2).unwrap();
    let (out, _) = start(&site, &cfg2, &daemon.pidfile, &site.path("second.log"), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("already running (pid {})", daemon.pid)),
        "{stderr}"
    );
    assert!(
        !site.path("second.log").exists(),
        "refused before opening its log"
    );
    assert!(process_alive(daemon.pid), "the first daemon keeps running");
    assert_eq!(
        std::fs::read_to_string(&daemon.pidfile).unwrap(),
        format!("{}\n", daemon.pid),
        "pidfile untouched"
    );
    assert_eq!(components(&site).len(), 1);

    daemon.stop(&site);
}

#[test]
fn a_stale_pidfile_is_taken_over_and_systemd_is_notified_on_an_abstract_socket() {
    let site = TestSite::new("dm_stale");
    let cfg = site.config(0, "", "");
    // A pid that surely is dead: a child we reaped.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id() as i32;
    child.wait().unwrap();
    std::fs::create_dir_all(site.path("run")).unwrap();
    std::fs::write(site.path("run/nodepool-builder.pid"), format!("{dead}\n")).unwrap();

    let name = format!("nodepool-builder-test-{}", uuid::Uuid::new_v4().simple());
    let sock =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    sock.set_nonblocking(true).unwrap();
    let daemon = start_ok(&site, &cfg, &[("NOTIFY_SOCKET", &format!("@{name}"))]);
    assert_ne!(daemon.pid, dead);
    let mut buf = [0u8; 256];
    let n = sock
        .recv(&mut buf)
        .expect("READY=1 was sent before the start command returned");
    assert_eq!(
        std::str::from_utf8(&buf[..n]).unwrap(),
        format!("READY=1\nMAINPID={}", daemon.pid)
    );
    daemon.stop(&site);
}

#[test]
fn a_bad_config_is_refused_with_every_error_before_forking() {
    let site = TestSite::new("dm_badcfg");
    let cfg = site.config(0, "bogus-key = 1", "[[diskimages]]\nname = 5\n");
    let pidfile = site.path("run/nodepool-builder.pid");
    let log = site.path("log/nodepool-builder.log");
    let (out, took) = start(&site, &cfg, &pidfile, &log, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("{}:", cfg.display());
    let located: Vec<&str> = stderr.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert!(located.len() >= 2, "every error as file:line:col: {stderr}");
    for line in located {
        let mut parts = line[prefix.len()..].splitn(3, ':');
        assert!(
            parts.next().unwrap().parse::<u32>().is_ok()
                && parts.next().unwrap().parse::<u32>().is_ok(),
            "{line}"
        );
    }
    assert!(
        !pidfile.exists() && !log.exists(),
        "nothing was started: no pidfile, no log"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn an_unusable_pidfile_directory_is_an_error() {
    let site = TestSite::new("dm_piddir");
    let cfg = site.config(0, "", "");
    let file = site.path("a-file");
    std::fs::write(&file, "").unwrap();
    for pidfile in [
        file.join("nodepool-builder.pid"),
        file.join("sub/nodepool-builder.pid"),
    ] {
        let log = site.path("log/nodepool-builder.log");
        let (out, _) = start(&site, &cfg, &pidfile, &log, &[]);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with("nodepool-builder: error: cannot "),
            "{stderr}"
        );
        assert!(
            stderr.contains("Not a directory") && stderr.contains(file.to_str().unwrap()),
            "{stderr}"
        );
        assert!(!log.exists(), "refused before opening the log");
    }
    assert!(components(&site).is_empty());
}

#[test]
fn an_unusable_images_dir_fails_the_start_through_the_pipe_and_the_log() {
    let site = TestSite::new("dm_imgdir");
    let cfg = site.config(0, "", "");
    let images = site.images_dir(0);
    std::fs::remove_dir_all(&images).unwrap();
    std::fs::write(&images, "not a directory").unwrap();
    let pidfile = site.path("run/nodepool-builder.pid");
    let log = site.path("log/nodepool-builder.log");
    let (out, took) = start(&site, &cfg, &pidfile, &log, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("images-dir") && stderr.contains("is not usable"),
        "the daemon's own error: {stderr}"
    );
    assert!(
        stderr.contains("nodepool-builder -d"),
        "with the hint: {stderr}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("ERROR") && logged.contains("is not usable"),
        "also in the log: {logged}"
    );
    assert!(!pidfile.exists(), "the failed daemon removed its pidfile");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn sighup_reopens_the_moved_log_and_keeps_the_old_config_when_the_new_one_is_broken() {
    let site = TestSite::new("dm_sighup");
    let cfg = site.config(0, "", "");
    let daemon = start_ok(&site, &cfg, &[]);

    // logrotate without copytruncate: rename, then SIGHUP.
    let rotated = site.path("log/nodepool-builder.log.1");
    std::fs::rename(&daemon.log, &rotated).unwrap();
    std::fs::write(&cfg, "images-dir = [\nthis is not toml\n").unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_log("keeping the running configuration");
    let log = daemon.log();
    assert!(log.contains("Reopened log file"), "{log}");
    assert!(
        log.contains(&format!("{}:", cfg.display())),
        "the errors are located: {log}"
    );
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("ready: builder_id="), "{old}");
    assert!(
        !old.contains("Reopened log file") && !old.contains("SIGHUP received"),
        "nothing new in the moved file: {old}"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/fd/2", daemon.pid)).unwrap(),
        daemon.log,
        "stderr follows the log"
    );

    // A valid change is picked up by the next SIGHUP: the new image gets built.
    site.config(0, "", ONE_IMAGE);
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_log("Configuration reloaded");
    let ready = site.wait_builds("fedora", BuildState::Ready, 1);
    assert!(
        site.build_log(0, "fedora", &ready[0].id)
            .trim_end()
            .ends_with("Exit code: 0")
    );
    daemon.wait_for_log("DIB image fedora is built");
    daemon.stop(&site);
}

#[test]
fn notify_socket_gets_ready_only_once_connected_in_foreground_mode() {
    let site = TestSite::new("dm_notify");
    let cfg = site.config(0, "", "");
    let path = site.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let pidfile = site.path("fg.pid");
    let mut b = BuilderProcess::start(
        &[
            "-f",
            "-c",
            cfg.to_str().unwrap(),
            "-p",
            pidfile.to_str().unwrap(),
        ],
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
        &site.path("builder.log"),
    );
    let mut buf = [0u8; 256];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification: {e}\n{}", b.log()));
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(components(&site).len(), 1, "registered before READY=1");
    assert!(b.log().contains("ready: builder_id="), "{}", b.log());
    // -f with an explicit -p takes the pidfile too.
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        format!("{}\n", b.pid())
    );
    let out = Command::new(binary())
        .args([
            "-f",
            "-c",
            cfg.to_str().unwrap(),
            "-p",
            pidfile.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("already running (pid {})", b.pid())),
        "{}",
        describe(&out)
    );
    b.signal(Signal::SIGTERM);
    assert!(
        b.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        b.log()
    );
    assert!(!pidfile.exists(), "removed on a clean exit");
}

/// Bit of signal `n` (1-based) in a `/proc/*/status` mask.
fn bit(n: i32) -> u64 {
    1 << (n - 1)
}

#[test]
fn children_of_the_daemon_start_with_an_empty_mask_and_default_dispositions() {
    let site = TestSite::new("dm_sigstate");
    let out = site.path("probe.out");
    let script = site.path("probe-dib");
    std::fs::write(&script, format!("#!/bin/sh\ngrep -E 'SigBlk|SigIgn' /proc/self/status > {}.tmp\nmv {0}.tmp {0}\nexit 1\n", out.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = site.config(
        0,
        "",
        &format!(
            "[[diskimages]]\nname = \"probe\"\ndib-cmd = \"{}\"\nformats = [\"raw\"]\n",
            script.display()
        ),
    );
    let daemon = start_ok(&site, &cfg, &[]);
    let text = wait_for(WAIT, "the probe's output", || {
        std::fs::read_to_string(&out).ok()
    });
    let mask = |field: &str| {
        let line = text
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("{field} in {text}"));
        u64::from_str_radix(line[field.len() + 1..].trim(), 16).unwrap()
    };
    eprintln!("signal state of the daemon's DIB child:\n{text}");
    let (blocked, ignored) = (mask("SigBlk"), mask("SigIgn"));
    let standard = (1u64 << 31) - 1; // signals 1..=31
    for sig in [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGUSR2,
        libc::SIGURG,
        libc::SIGPIPE,
    ] {
        assert_eq!(
            blocked & bit(sig),
            0,
            "signal {sig} blocked in the child:\n{text}"
        );
        assert_eq!(
            ignored & bit(sig),
            0,
            "signal {sig} ignored in the child:\n{text}"
        );
    }
    assert_eq!(blocked & standard, 0, "{text}");
    assert_eq!(ignored & standard, 0, "{text}");
    // Observed: real-time signals are clean too (the runner resets every signal).
    assert_eq!((blocked, ignored), (0, 0), "{text}");
    daemon.stop(&site);
}

#[test]
fn a_logging_config_gives_the_daemon_its_log_files_and_sighup_reopens_them() {
    let site = TestSite::new("dm_logconfig");
    let cfg = site.config(0, "", ONE_IMAGE);
    let pidfile = site.path("run/nodepool-builder.pid");
    // Relative file names: relative to the directory the daemon was started in.
    std::fs::write(
        site.path("logging.yaml"),
        r#"version: 1
handlers:
  console:
    class: logging.StreamHandler
  normal:
    class: logging.handlers.WatchedFileHandler
    filename: log/builder.log
    level: INFO
  builds:
    class: logging.FileHandler
    filename: log/build-debug.log
loggers:
  nodepool.builder.BuildWorker:
    level: DEBUG
    handlers: [builds]
    propagate: false
root:
  level: INFO
  handlers: [console, normal]
"#,
    )
    .unwrap();
    let unused = site.path("log/nodepool-builder.log");
    let out = Command::new(binary())
        .args(["-c", cfg.to_str().unwrap(), "-p", pidfile.to_str().unwrap()])
        .args(["--log-file", unused.to_str().unwrap(), "-l", "logging.yaml"])
        // Empty means unset: the config's levels decide.
        .env("NODEPOOL_BUILDER_LOG", "")
        .current_dir(site.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid: {}", describe(&out)));
    let daemon = Daemon {
        pid,
        pidfile,
        log: site.path("log/builder.log"),
    };
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        describe(&out)
    );
    daemon.wait_for_log("ready: builder_id=");
    site.wait_builds("fedora", BuildState::Ready, 1);
    let build_log = site.path("log/build-debug.log");
    let read_build_log = || std::fs::read_to_string(&build_log).unwrap_or_default();
    wait_until(WAIT, "the built image in the build workers' file", || {
        read_build_log().contains("DIB image fedora is built")
    });
    let text = read_build_log();
    assert!(
        text.lines()
            .all(|l| l.contains(" nodepool.builder.BuildWorker.0: ")),
        "only the build worker in its file:\n{text}"
    );
    assert!(
        text.contains(" DEBUG nodepool.builder.BuildWorker.0: "),
        "{text}"
    );
    let log = daemon.log();
    assert!(
        !log.contains(" DEBUG ") && !log.contains(" nodepool.builder.BuildWorker."),
        "no DEBUG line and no build worker line (not propagated) in the INFO file:\n{log}"
    );
    assert!(
        log.contains(" INFO nodepool.builder.NodePoolBuilder: "),
        "{log}"
    );
    assert!(!unused.exists(), "--log-file is not used with -l");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/2")).unwrap(),
        daemon.log,
        "stderr is the root logger's file"
    );

    // logrotate renames both files; SIGHUP reopens both.
    std::fs::rename(&daemon.log, site.path("log/builder.log.1")).unwrap();
    std::fs::rename(&build_log, site.path("log/build-debug.log.1")).unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_log("Configuration reloaded");
    assert!(
        daemon
            .log()
            .contains(&format!("Reopened log file {}", build_log.display())),
        "{}",
        daemon.log()
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/2")).unwrap(),
        daemon.log,
        "stderr follows the reopened file"
    );
    site.request_build("fedora");
    site.wait_builds("fedora", BuildState::Ready, 2);
    wait_until(WAIT, "the second build in the reopened file", || {
        read_build_log().contains("DIB image fedora is built")
    });
    daemon.stop(&site);
}
