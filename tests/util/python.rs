//! Python helpers run in the kazoo virtualenv (`target/test-env/kazoo-venv`, made by
//! `scripts/test-env.sh kazoo`).
//!
//! The scripts live in `tests/fixtures/python/`; `kz.py` is the general kazoo client
//! (znodes and the lock recipe, see its `--help`). Two ways to run one:
//!
//! * [`run_kazoo`]: run to completion (stdin is `/dev/null`) and return its output.
//! * [`KazooChild::spawn`]: keep it running, wait for the lines it prints, close its stdin
//!   to let it finish (how `kz.py lock-hold` is told to release), then collect its output.
//!
//! Both kill the script if it outlives its deadline and panic with what it printed.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::zk::ZkServer;
use super::{ensure_test_env, poll_for, repo_root};

/// How long [`run_kazoo`] lets a script run.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The kazoo virtualenv's python. Runs `scripts/test-env.sh kazoo` once (per process) if
/// kazoo cannot be imported with it; panics if it still cannot.
pub fn kazoo_python() -> PathBuf {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = PYTHON.get_or_init(|| {
        let python = repo_root().join("target/test-env/kazoo-venv/bin/python");
        if !imports_kazoo(&python) {
            std::panic::catch_unwind(|| ensure_test_env(&["kazoo"])).map_err(|_| {
                "scripts/test-env.sh kazoo failed (its output is in the panic above)".to_string()
            })?;
            if !imports_kazoo(&python) {
                return Err(format!(
                    "{} still cannot import kazoo after scripts/test-env.sh kazoo",
                    python.display()
                ));
            }
        }
        Ok(python)
    });
    match result {
        Ok(python) => python.clone(),
        Err(e) => panic!("no kazoo virtualenv: {e}"),
    }
}

/// The command that runs `tests/fixtures/python/<script>` with the kazoo python (unbuffered,
/// no bytecode files in the source tree). Add arguments and stdio as needed.
pub fn kazoo_command(script: &str) -> Command {
    let mut cmd = Command::new(kazoo_python());
    cmd.arg(fixture_path(script))
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(repo_root());
    cmd
}

/// Runs `tests/fixtures/python/<script> ARGS…` to completion (at most [`RUN_TIMEOUT`]) with
/// stdin from `/dev/null`, and returns its exit status and output. Panics with the output if
/// it cannot be started or does not finish in time; a non-zero exit is for the caller to
/// judge.
pub fn run_kazoo(script: &str, args: &[&str]) -> Output {
    let mut child = KazooChild::spawn(script, args);
    child.close_stdin();
    child.finish(RUN_TIMEOUT)
}

/// Like [`run_kazoo`], but panics (with everything the script printed) unless it exits 0;
/// returns its stdout as a string.
#[track_caller]
pub fn run_kazoo_ok(script: &str, args: &[&str]) -> String {
    let out = run_kazoo(script, args);
    if !out.status.success() {
        panic!(
            "{script} {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            describe_output(&out)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kz.py` connection arguments for `server`'s TLS port with the valid client certificate,
/// under `chroot`.
pub fn kz_tls_args(server: &ZkServer, chroot: &str) -> Vec<String> {
    let certs = server.certs();
    let mut args = vec![
        "--hosts".to_string(),
        server.tls_hosts(),
        "--chroot".into(),
        chroot.into(),
        "--tls".into(),
    ];
    args.extend([&certs.ca, &certs.cert, &certs.key].map(|p| p.display().to_string()));
    args
}

/// `kz.py` connection arguments for `server`'s plaintext port, under `chroot`.
pub fn kz_plain_args(server: &ZkServer, chroot: &str) -> Vec<String> {
    vec![
        "--hosts".into(),
        server.plain_hosts(),
        "--chroot".into(),
        chroot.into(),
    ]
}

/// Joins connection arguments and a sub-command into one argument list for [`run_kazoo`].
pub fn kz_args<'a>(conn: &'a [String], rest: &[&'a str]) -> Vec<&'a str> {
    conn.iter()
        .map(String::as_str)
        .chain(rest.iter().copied())
        .collect()
}

/// stdout and stderr of a finished script, labelled, for failure messages.
pub fn describe_output(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A running Python helper with piped stdin, stdout and stderr. Killed when dropped.
pub struct KazooChild {
    description: String,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Lines of stdout (with their newline), sent by a reader thread.
    lines: Receiver<Vec<u8>>,
    /// Everything received from `lines` so far.
    stdout: Vec<u8>,
    /// Lines not yet consumed by [`KazooChild::expect_line`].
    unread: std::collections::VecDeque<String>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl KazooChild {
    /// Starts `tests/fixtures/python/<script> ARGS…`. Panics if it cannot be started.
    pub fn spawn(script: &str, args: &[&str]) -> KazooChild {
        let mut cmd = kazoo_command(script);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let description = format!("{} {}", script, args.join(" "));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        // Pipe readers of a test helper; they end when the script closes its output.
        #[allow(clippy::disallowed_methods)]
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        #[allow(clippy::disallowed_methods)]
        let stderr = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf);
            buf
        });
        KazooChild {
            description,
            stdin: child.stdin.take(),
            child,
            lines,
            stdout: Vec::new(),
            unread: Default::default(),
            stderr: Some(stderr),
        }
    }

    /// The script's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the script prints the line `expected` (without its newline), skipping
    /// other lines. Panics with everything it printed if that does not happen within
    /// `timeout` or the script ends first.
    #[track_caller]
    pub fn expect_line(&mut self, timeout: Duration, expected: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(line) = self.unread.pop_front() {
                if line == expected {
                    return;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.take_line(line),
                Err(RecvTimeoutError::Timeout) => self.fail(&format!(
                    "timed out after {timeout:?}: waiting for the line {expected:?}"
                )),
                Err(RecvTimeoutError::Disconnected) => self.fail(&format!(
                    "the script closed its stdout before printing {expected:?}"
                )),
            }
        }
    }

    /// Closes the script's stdin (`kz.py lock-hold` releases its lock on that).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits (at most `timeout`) for the script to exit and returns its status and complete
    /// output. Kills it and panics with its output if it is still running then.
    #[track_caller]
    pub fn finish(mut self, timeout: Duration) -> Output {
        let status = poll_for(timeout, || self.child.try_wait().ok().flatten());
        let Some(status) = status else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let out = self.collect(None);
            panic!(
                "timed out after {timeout:?}: waiting for `{}` to exit\n{}",
                self.description,
                describe_output(&out)
            );
        };
        self.collect(Some(status))
    }

    /// Kills the script at once (SIGKILL, like a crashed process: its ZooKeeper session and
    /// ephemeral nodes stay until the session times out) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn take_line(&mut self, line: Vec<u8>) {
        self.stdout.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line);
        self.unread
            .push_back(text.trim_end_matches(['\n', '\r']).to_string());
    }

    /// Drains stdout and stderr (the process has exited or been killed).
    fn collect(&mut self, status: Option<ExitStatus>) -> Output {
        while let Ok(line) = self.lines.recv() {
            self.take_line(line);
        }
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let status = status.unwrap_or_else(|| self.child.wait().expect("wait for a killed script"));
        Output {
            status,
            stdout: self.stdout.clone(),
            stderr,
        }
    }

    #[track_caller]
    fn fail(&mut self, what: &str) -> ! {
        self.kill();
        let out = self.collect(None);
        panic!(
            "{what}\nscript: {}\nexit: {}\n{}",
            self.description,
            out.status,
            describe_output(&out)
        );
    }
}

impl Drop for KazooChild {
    fn drop(&mut self) {
        self.kill();
    }
}

fn fixture_path(script: &str) -> PathBuf {
    let path = repo_root().join("tests/fixtures/python").join(script);
    assert!(path.is_file(), "no such Python fixture: {}", path.display());
    path
}

fn imports_kazoo(python: &std::path::Path) -> bool {
    python.is_file()
        && Command::new(python)
            .args(["-c", "import kazoo"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}
