//! The subprocess runner (`nodepool_builder::command`) with real processes: output into the
//! log or captured, exit codes and signals, spawn failures, timeouts and cancellation that kill the whole
//! process group, SIGKILL after the grace period, the drop guard, the signal state children
//! start with, and `shell_split`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded, never};
use nodepool_builder::command::{self, Outcome, Output, SpawnError, Spec, shell_split};
use nodepool_builder::thread::{self, ThreadKind};

use crate::util::{process_alive, test_dir, wait_until};

/// A spec running `script` with `bash -c`; `args` become `$1`, `$2`, ...
fn bash(script: &str, args: &[&str]) -> Spec {
    let mut all = vec!["-c".to_string(), script.to_string(), "bash".to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    Spec::new("bash", all)
}

/// Runs `spec` to the end without cancellation.
fn run(spec: Spec) -> Outcome {
    let what = spec.command_line();
    command::spawn(spec)
        .unwrap_or_else(|e| panic!("{e}"))
        .wait(&never())
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(
        &std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())),
    )
    .into_owned()
}

/// Whether the kernel has forgotten `pid` entirely: not alive and not a zombie either.
fn reaped(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Every process (zombies included) whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if rest.split_whitespace().nth(2) == Some(&pgid.to_string()) {
            members.push(pid);
        }
    }
    members
}

/// Waits for `path` to hold a pid (written by a script) and returns it.
fn read_pid(path: &Path) -> i32 {
    let mut pid = 0;
    wait_until(
        Duration::from_secs(10),
        "the script to write its pid file",
        || match std::fs::read_to_string(path) {
            Ok(text) if text.ends_with('\n') => {
                pid = text.trim().parse().unwrap();
                true
            }
            _ => false,
        },
    );
    pid
}

/// Asserts that the leader is reaped, the grandchild is dead, and no zombie of the group is
/// left behind (the grandchild's zombie belongs to init, which may take a moment).
fn assert_group_gone(leader: i32, grandchild: i32) {
    assert!(reaped(leader), "the child {leader} was not reaped");
    assert!(
        !process_alive(grandchild),
        "the grandchild {grandchild} is still alive"
    );
    wait_until(
        Duration::from_secs(10),
        "the grandchild's zombie to be reaped",
        || reaped(grandchild),
    );
    wait_until(
        Duration::from_secs(10),
        "the process group to be empty",
        || group_members(leader).is_empty(),
    );
}

/// Starts a grandchild `sleep` that writes its pid to `$1`, then waits for it.
const GRANDCHILD_SCRIPT: &str = r#"sleep 3600 & echo $! > "$1.tmp"; mv "$1.tmp" "$1"; wait"#;

#[test]
fn stdout_and_stderr_are_appended_to_the_log() {
    let dir = test_dir("command-log");
    let log = dir.path().join("a/b/c.log");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    std::fs::write(&log, "earlier content\n").unwrap();
    let mut spec = bash(
        r#"echo to-stdout; echo to-stderr >&2; printf 'raw\x00\xff\n'; echo last"#,
        &[],
    );
    spec.output = Output::Log(log.clone());
    assert_eq!(run(spec), Outcome::Exited(0));
    let bytes = std::fs::read(&log).unwrap();
    assert!(
        bytes.starts_with(b"earlier content\n"),
        "the log was not appended to"
    );
    assert!(
        bytes.windows(6).any(|w| w == b"raw\x00\xff\n"),
        "raw bytes must be copied unchanged"
    );
    let text = String::from_utf8_lossy(&bytes);
    for line in ["to-stdout", "to-stderr", "last"] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
    }
    assert!(
        !text.contains("nodepool-builder:"),
        "a normal run adds no notes:\n{text}"
    );

    // The log's directories are created.
    let fresh = dir.path().join("new/dir/x.log");
    let mut spec = bash("echo hello", &[]);
    spec.output = Output::Log(fresh.clone());
    assert_eq!(run(spec), Outcome::Exited(0));
    assert_eq!(read(&fresh), "hello\n");

    // Without a log the output is discarded.
    assert_eq!(run(bash("echo discarded; exit 4", &[])), Outcome::Exited(4));
}

#[test]
fn a_large_output_is_fully_drained_before_wait_returns() {
    let dir = test_dir("command-large");
    let log = dir.path().join("big.log");
    // Far more than a pipe holds, ending right at exit.
    let mut spec = bash(
        "head -c 5000000 /dev/zero | tr '\\0' x; echo; echo end",
        &[],
    );
    spec.output = Output::Log(log.clone());
    assert_eq!(run(spec), Outcome::Exited(0));
    let text = read(&log);
    assert_eq!(text.len(), 5_000_000 + 1 + 4);
    assert!(text.ends_with("\nend\n"));
}

#[test]
fn captured_stdout_and_stderr_are_kept_apart_as_tails() {
    let mut spec = bash(
        "echo out-1; echo err-1 >&2; head -c 100000 /dev/zero | tr '\\0' x; echo; \
         echo out-end; echo err-end >&2; exit 3",
        &[],
    );
    spec.output = Output::Capture {
        stdout: 1000,
        stderr: 1000,
    };
    let completed = command::spawn(spec)
        .unwrap()
        .wait_captured(&never())
        .unwrap();
    assert_eq!(completed.outcome, Outcome::Exited(3));
    let stdout = String::from_utf8(completed.stdout.bytes).unwrap();
    assert_eq!(stdout.len(), 1000, "the last 1000 bytes");
    assert!(stdout.ends_with("xxx\nout-end\n"), "{stdout:?}");
    assert!(completed.stdout.truncated);
    assert_eq!(completed.stderr.bytes, b"err-1\nerr-end\n");
    assert!(!completed.stderr.truncated);
}

#[test]
fn a_parent_death_signal_does_not_stop_commands_of_a_live_daemon() {
    // The race check compares the parent pid with the daemon's, whatever its value (a
    // daemon that is PID 1 of a container is tested in uploads::command_driver).
    let mut spec = bash("echo started", &[]);
    spec.parent_death_signal = Some(nix::sys::signal::Signal::SIGKILL);
    spec.output = Output::Capture {
        stdout: 100,
        stderr: 100,
    };
    let completed = command::spawn(spec)
        .unwrap()
        .wait_captured(&never())
        .unwrap();
    assert_eq!(completed.outcome, Outcome::Exited(0));
    assert_eq!(completed.stdout.bytes, b"started\n");
}

#[test]
fn exit_codes_and_signals_map_to_outcomes() {
    assert_eq!(run(bash("exit 0", &[])), Outcome::Exited(0));
    assert_eq!(run(bash("exit 3", &[])), Outcome::Exited(3));
    assert_eq!(run(bash("exit 127", &[])), Outcome::Exited(127));
    assert_eq!(run(bash("kill -KILL $$", &[])), Outcome::Signaled(9));
    assert_eq!(run(bash("kill -TERM $$", &[])), Outcome::Signaled(15));
    assert_eq!(run(bash("kill -SEGV $$", &[])), Outcome::Signaled(11));

    assert!(Outcome::Exited(0).success());
    assert!(!Outcome::Exited(1).success());
    assert!(!Outcome::TimedOut.success());
    assert_eq!(Outcome::Exited(3).to_string(), "exit code 3");
    assert_eq!(
        Outcome::Signaled(9).to_string(),
        "killed by signal 9 (SIGKILL)"
    );
    assert_eq!(Outcome::TimedOut.to_string(), "timed out");
    assert_eq!(Outcome::Cancelled.to_string(), "cancelled");
}

#[test]
fn a_missing_program_is_a_spawn_error_naming_it() {
    let dir = test_dir("command-missing");
    let log = dir.path().join("logs/never.log");
    let mut spec = Spec::new(
        "/nonexistent/disk-image-create",
        vec!["-x".into(), "-t".into(), "qcow2".into()],
    );
    spec.output = Output::Log(log.clone());
    let error = match command::spawn(spec) {
        Ok(_) => panic!("spawning a missing program succeeded"),
        Err(error) => error,
    };
    assert!(matches!(error, SpawnError::Exec { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        "failed to exec '/nonexistent/disk-image-create -x -t qcow2': No such file or directory"
    );
    assert_eq!(
        error.command(),
        "/nonexistent/disk-image-create -x -t qcow2"
    );
    assert!(
        std::error::Error::source(&error).is_some(),
        "the OS error is kept"
    );
    assert!(
        !log.exists(),
        "a failed exec leaves no log file, as upstream"
    );

    // A program found in PATH that is not executable, and a missing working directory.
    let not_executable = dir.path().join("not-executable");
    std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    let error = command::spawn(Spec::new(not_executable.to_str().unwrap(), vec![]))
        .err()
        .expect("a non-executable file cannot be run");
    assert!(
        error.to_string().ends_with("': Permission denied"),
        "{error}"
    );
    let mut spec = Spec::new("true", vec![]);
    spec.cwd = Some(dir.path().join("no-such-dir"));
    let error = command::spawn(spec)
        .err()
        .expect("a missing cwd fails the spawn");
    assert!(
        error.to_string().starts_with("failed to exec 'true'"),
        "{error}"
    );

    // A log that cannot be created names its path and starts nothing.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let mut spec = Spec::new("true", vec![]);
    spec.output = Output::Log(blocker.join("x.log"));
    let error = command::spawn(spec)
        .err()
        .expect("the log cannot be created");
    assert!(matches!(error, SpawnError::Log { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&blocker.display().to_string()),
        "{error}"
    );
}

#[test]
fn a_timeout_kills_the_whole_group() {
    let dir = test_dir("command-timeout");
    let pid_file = dir.path().join("grandchild.pid");
    let log = dir.path().join("build.log");
    let mut spec = bash(GRANDCHILD_SCRIPT, &[pid_file.to_str().unwrap()]);
    spec.timeout = Some(Duration::from_millis(1500));
    spec.grace = Duration::from_secs(5);
    spec.output = Output::Log(log.clone());
    let started = Instant::now();
    let running = command::spawn(spec).unwrap();
    let leader = running.pid();
    let grandchild = read_pid(&pid_file);
    assert!(process_alive(grandchild));
    // The short-lived `mv` may still be in the group for a moment.
    wait_until(
        Duration::from_secs(5),
        "bash and sleep alone in the group",
        || group_members(leader).len() == 2,
    );

    assert_eq!(running.wait(&never()).unwrap(), Outcome::TimedOut);
    let elapsed = started.elapsed();
    // bash and sleep die of SIGTERM at once, long before the grace period ends.
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    assert_group_gone(leader, grandchild);
    let text = read(&log);
    assert!(
        text.contains(&format!(
            "nodepool-builder: timed out after 1.5s; sending SIGTERM to process group {leader}"
        )),
        "{text}"
    );
    assert!(
        !text.contains("SIGKILL"),
        "no escalation was needed:\n{text}"
    );
}

#[test]
fn cancel_kills_the_whole_group_within_the_grace() {
    let dir = test_dir("command-cancel");
    let pid_file = dir.path().join("grandchild.pid");
    let log = dir.path().join("build.log");
    let mut spec = bash(GRANDCHILD_SCRIPT, &[pid_file.to_str().unwrap()]);
    spec.grace = Duration::from_secs(5);
    spec.output = Output::Log(log.clone());
    let running = command::spawn(spec).unwrap();
    let leader = running.pid();

    let (cancel_tx, cancel_rx) = bounded(1);
    let waiter = thread::spawn(ThreadKind::Other, "cancel-waiter", move || {
        running.wait(&cancel_rx)
    });
    let grandchild = read_pid(&pid_file);
    // The command keeps running until cancelled.
    std::thread::sleep(Duration::from_millis(200));
    assert!(process_alive(leader) && process_alive(grandchild));
    let cancelled_at = Instant::now();
    cancel_tx.send(()).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), Outcome::Cancelled);
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(5),
        "{:?}",
        cancelled_at.elapsed()
    );
    assert_group_gone(leader, grandchild);
    assert!(
        read(&log).contains(&format!(
            "nodepool-builder: cancelled; sending SIGTERM to process group {leader}"
        )),
        "{}",
        read(&log)
    );

    // A disconnected cancel channel cancels too.
    let pid_file = dir.path().join("grandchild-2.pid");
    let running = command::spawn(bash(GRANDCHILD_SCRIPT, &[pid_file.to_str().unwrap()])).unwrap();
    let leader = running.pid();
    let grandchild = read_pid(&pid_file);
    let (cancel_tx, cancel_rx): (_, Receiver<()>) = bounded(1);
    drop(cancel_tx);
    assert_eq!(running.wait(&cancel_rx).unwrap(), Outcome::Cancelled);
    assert_group_gone(leader, grandchild);
}

#[test]
fn a_group_ignoring_sigterm_is_killed_after_the_grace() {
    let dir = test_dir("command-ignore-term");
    let pid_file = dir.path().join("grandchild.pid");
    let log = dir.path().join("build.log");
    // The ignored disposition is inherited by the grandchild too.
    let mut spec = bash(
        &format!("trap '' TERM; {GRANDCHILD_SCRIPT}"),
        &[pid_file.to_str().unwrap()],
    );
    let grace = Duration::from_millis(800);
    spec.grace = grace;
    spec.output = Output::Log(log.clone());
    let running = command::spawn(spec).unwrap();
    let leader = running.pid();
    let grandchild = read_pid(&pid_file);
    let (cancel_tx, cancel_rx) = bounded(1);
    cancel_tx.send(()).unwrap();
    let cancelled_at = Instant::now();
    assert_eq!(running.wait(&cancel_rx).unwrap(), Outcome::Cancelled);
    let elapsed = cancelled_at.elapsed();
    assert!(
        elapsed >= grace && elapsed < grace + Duration::from_secs(3),
        "{elapsed:?}"
    );
    assert_group_gone(leader, grandchild);
    let text = read(&log);
    assert!(
        text.contains(&format!(
            "nodepool-builder: process group {leader} still running 800ms after SIGTERM; sending SIGKILL"
        )),
        "{text}"
    );
}

#[test]
fn processes_left_in_the_group_after_exit_are_killed() {
    let dir = test_dir("command-leftovers");
    let pid_file = dir.path().join("grandchild.pid");
    let log = dir.path().join("build.log");
    let mut spec = bash(
        r#"sleep 3600 & echo $! > "$1.tmp"; mv "$1.tmp" "$1"; exit 0"#,
        &[pid_file.to_str().unwrap()],
    );
    spec.output = Output::Log(log.clone());
    let running = command::spawn(spec).unwrap();
    let leader = running.pid();
    assert_eq!(running.wait(&never()).unwrap(), Outcome::Exited(0));
    let grandchild = read_pid(&pid_file);
    assert_group_gone(leader, grandchild);
    assert!(
        read(&log).contains(&format!(
            "nodepool-builder: killing processes left in process group {leader} after it exited: [{grandchild}]"
        )),
        "{}",
        read(&log)
    );
}

#[test]
fn a_pipe_held_open_outside_the_group_stops_the_reader_after_the_grace() {
    let dir = test_dir("command-escaped");
    let pid_file = dir.path().join("escaped.pid");
    let log = dir.path().join("build.log");
    // setsid moves the sleep into its own session and group; it keeps the pipe open.
    let mut spec = bash(
        r#"setsid bash -c 'echo $$ > "$1.tmp"; mv "$1.tmp" "$1"; exec sleep 3600' _ "$1" &
           while [ ! -e "$1" ]; do sleep 0.01; done; echo bye"#,
        &[pid_file.to_str().unwrap()],
    );
    spec.grace = Duration::from_secs(1);
    spec.output = Output::Log(log.clone());
    let started = Instant::now();
    let outcome = run(spec);
    let escaped = read_pid(&pid_file);
    // Not ours to kill, but the test cleans up after itself.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(escaped),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert_eq!(outcome, Outcome::Exited(0));
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    let text = read(&log);
    assert!(text.starts_with("bye\n"), "{text}");
    assert!(
        text.contains("nodepool-builder: output pipe still open 1s after process group"),
        "{text}"
    );
}

#[test]
fn dropping_a_running_command_kills_and_reaps_it() {
    let dir = test_dir("command-drop");
    let pid_file = dir.path().join("grandchild.pid");
    let log = dir.path().join("build.log");
    let mut spec = bash(GRANDCHILD_SCRIPT, &[pid_file.to_str().unwrap()]);
    spec.output = Output::Log(log.clone());
    let running = command::spawn(spec).unwrap();
    let leader = running.pid();
    assert_eq!(running.log_path(), Some(log.as_path()));
    assert!(running.command_line().starts_with("bash -c sleep 3600 &"));
    let grandchild = read_pid(&pid_file);

    // The reader thread is named and visible while the command runs.
    let names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|comm| comm.trim().to_string())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("dib-out-")),
        "no dib-out-N thread among {names:?}"
    );

    drop(running);
    assert_group_gone(leader, grandchild);
    assert!(
        read(&log).contains(&format!(
            "nodepool-builder: process group {leader} abandoned; sending SIGKILL"
        )),
        "{}",
        read(&log)
    );
}

#[test]
fn later_environment_entries_override_earlier_and_inherited_ones() {
    let dir = test_dir("command-env");
    let log = dir.path().join("env.log");
    let mut spec = bash(
        r#"echo "FOO=$FOO BAR=$BAR HOME=$HOME"; test -n "$PATH" && echo path-inherited; pwd"#,
        &[],
    );
    spec.env = vec![
        ("FOO".into(), "first".into()),
        ("BAR".into(), "bar".into()),
        ("FOO".into(), "second".into()),
        ("HOME".into(), "/nonexistent-home".into()),
    ];
    spec.cwd = Some(dir.path().to_path_buf());
    spec.output = Output::Log(log.clone());
    assert_eq!(run(spec), Outcome::Exited(0));
    let canonical = std::fs::canonicalize(dir.path()).unwrap();
    assert_eq!(
        read(&log),
        format!(
            "FOO=second BAR=bar HOME=/nonexistent-home\npath-inherited\n{}\n",
            canonical.display()
        )
    );
}

#[test]
fn shell_split_follows_posix_shell_words() {
    let split = |s: &str| shell_split(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
    assert_eq!(split(""), Vec::<String>::new());
    assert_eq!(split("   \t\n "), Vec::<String>::new());
    assert_eq!(
        split("disk-image-create -x  -t qcow2,vhd --checksum"),
        ["disk-image-create", "-x", "-t", "qcow2,vhd", "--checksum"]
    );
    // `%p` and other shell syntax are left alone: nothing is expanded.
    assert_eq!(
        split("%p/tests/fake-image-create $HOME * ~ a#b #c"),
        ["%p/tests/fake-image-create", "$HOME", "*", "~", "a#b", "#c"]
    );
    assert_eq!(
        split("--qemu-img-options 'compat=0.10' -o /x"),
        ["--qemu-img-options", "compat=0.10", "-o", "/x"]
    );
    assert_eq!(split(r#"'a b' "c d" e\ f"#), ["a b", "c d", "e f"]);
    assert_eq!(split(r#"a'b'"c"d"#), ["abcd"]);
    assert_eq!(split(r#"'' "" x"#), ["", "", "x"]);
    // Inside single quotes a backslash is literal.
    assert_eq!(split(r#"'a\b' 'it\'"#), [r"a\b", r"it\"]);
    // Inside double quotes a backslash escapes only `"` and `\`.
    assert_eq!(
        split(r#""a\"b" "c\\d" "e\$f" "g\n""#),
        [r#"a"b"#, r"c\d", r"e\$f", r"g\n"]
    );
    // Outside quotes it escapes anything.
    assert_eq!(split(r#"a\"b \' \\ \$x"#), [r#"a"b"#, "'", r"\", "$x"]);
    assert_eq!(split("sudo\tdib\n-x"), ["sudo", "dib", "-x"]);
    assert_eq!(split("ünï \"cödé\""), ["ünï", "cödé"]);

    for bad in ["'open", "\"open", "a 'b\"", r#""a\"#, "a\\"] {
        let error = shell_split(bad).expect_err(bad);
        assert!(
            error.starts_with("no closing quotation") || error.starts_with("no escaped character"),
            "{bad:?}: {error}"
        );
    }
    assert_eq!(
        shell_split("x 'open").unwrap_err(),
        "no closing quotation for the ' at byte 2"
    );
    assert_eq!(
        shell_split("x\\").unwrap_err(),
        "no escaped character after the \\ at byte 1"
    );
}

/// The environment variable that turns [`signal_state_probe`] on; it holds the log path.
const PROBE_LOG: &str = "NODEPOOL_TEST_SIGNAL_PROBE_LOG";

/// Runs [`signal_state_probe`] in a fresh test process, because it changes process-wide
/// signal dispositions, which would disturb the other tests of this binary (house rule:
/// signal tests use a spawned process).
#[test]
fn children_start_with_an_empty_mask_and_default_dispositions() {
    let dir = test_dir("command-signals");
    let log = dir.path().join("probe.log");
    // /proc/self/exe, not current_exe(): a cargo run elsewhere may replace the test binary
    // on disk while this one runs, and only the former still names this binary then.
    let output = Command::new("/proc/self/exe")
        .args([
            "--exact",
            "command::signal_state_probe",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE_LOG, &log)
        .output()
        .unwrap_or_else(|e| panic!("cannot run this test binary again: {e}"));
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the probe failed:\n{report}");
    assert!(
        report.contains("signal probe: done"),
        "the probe did not run:\n{report}"
    );
    let text = read(&log);
    let mut seen = 0;
    for line in text.lines() {
        let (field, value) = line.split_once(':').unwrap();
        if !["SigBlk", "SigIgn", "SigCgt"].contains(&field) {
            continue;
        }
        assert_eq!(
            value.trim(),
            "0000000000000000",
            "{field} in the child:\n{text}"
        );
        seen += 1;
    }
    assert_eq!(seen, 3, "{text}");
}

extern "C" fn ignore_signal(_signal: libc::c_int) {}

/// The signal mask of this thread and the dispositions of this process, as hex masks.
fn own_signal_state() -> (u64, u64, u64) {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let mask = |field: &str| {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        u64::from_str_radix(line[field.len()..].trim(), 16).unwrap()
    };
    (mask("SigBlk:"), mask("SigIgn:"), mask("SigCgt:"))
}

/// Only does something when started by
/// [`children_start_with_an_empty_mask_and_default_dispositions`]: installs handlers, ignores
/// signals and blocks others in this thread, then runs `grep` through the runner, which
/// must start it with a clean slate.
#[test]
fn signal_state_probe() {
    let Some(log) = std::env::var_os(PROBE_LOG).map(PathBuf::from) else {
        return;
    };
    let bit = |signal: libc::c_int| 1u64 << (signal - 1);
    // SAFETY: installing a handler that does nothing, ignoring two signals and blocking two
    // in this thread; this process exists only for this test.
    unsafe {
        for signal in [libc::SIGHUP, libc::SIGUSR2] {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_signal as *const () as usize;
            assert_eq!(libc::sigaction(signal, &action, std::ptr::null_mut()), 0);
        }
        libc::signal(libc::SIGWINCH, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        let mut blocked: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut blocked);
        libc::sigaddset(&mut blocked, libc::SIGUSR1);
        libc::sigaddset(&mut blocked, libc::SIGTERM);
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, std::ptr::null_mut()),
            0
        );
    }
    let (blocked, ignored, caught) = own_signal_state();
    assert_eq!(
        blocked & (bit(libc::SIGUSR1) | bit(libc::SIGTERM)),
        bit(libc::SIGUSR1) | bit(libc::SIGTERM)
    );
    assert_eq!(
        ignored & (bit(libc::SIGWINCH) | bit(libc::SIGINT)),
        bit(libc::SIGWINCH) | bit(libc::SIGINT)
    );
    assert_eq!(
        caught & (bit(libc::SIGHUP) | bit(libc::SIGUSR2)),
        bit(libc::SIGHUP) | bit(libc::SIGUSR2)
    );

    // The control: a plain std Command hands at least the ignored signals to the child,
    // so the check below is not vacuous.
    let control = Command::new("grep")
        .args(["-E", "^SigIgn", "/proc/self/status"])
        .output()
        .unwrap();
    let control = String::from_utf8_lossy(&control.stdout);
    let control_ignored =
        u64::from_str_radix(control.trim().trim_start_matches("SigIgn:").trim(), 16).unwrap();
    assert_ne!(
        control_ignored & bit(libc::SIGWINCH),
        0,
        "control: {control}"
    );

    // cat, not grep: GNU grep catches SIGSEGV itself (stack overflow detection).
    let mut spec = Spec::new("cat", vec!["/proc/self/status".into()]);
    spec.output = Output::Log(log.clone());
    assert_eq!(run(spec), Outcome::Exited(0));

    // SAFETY: restoring the mask and dispositions changed above.
    unsafe {
        let mut blocked: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut blocked);
        libc::sigaddset(&mut blocked, libc::SIGUSR1);
        libc::sigaddset(&mut blocked, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &blocked, std::ptr::null_mut());
        for signal in [libc::SIGHUP, libc::SIGUSR2, libc::SIGWINCH, libc::SIGINT] {
            libc::signal(signal, libc::SIG_DFL);
        }
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "signal probe: done").unwrap();
}
