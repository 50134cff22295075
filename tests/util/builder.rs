//! The real `nodepool-builder` binary as a child process of a test.
//!
//! [`BuilderProcess::start`] runs `CARGO_BIN_EXE_nodepool-builder` with the given arguments,
//! its stderr (the log in `-f`/`-d` mode) going to a file in the test's directory. Waits are
//! for log lines; on failure the log tail is part of the panic message. Dropping the value
//! kills the process (SIGKILL) and reaps it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::{file_tail, poll_for};

/// Path of the binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nodepool-builder"))
}

/// How to start the binary, beyond its arguments and environment.
#[derive(Debug, Default)]
pub struct Launch<'a> {
    /// A program and its arguments that run the binary (appended with its arguments), e.g.
    /// `unshare --pid --fork`; it is expected to exec the binary or to take it down when it
    /// is killed itself.
    pub wrapper: &'a [&'a str],
    /// Variables removed from the inherited environment (the extra environment is applied
    /// after).
    pub unset: &'a [&'a str],
}

/// A running builder process.
pub struct BuilderProcess {
    child: Option<Child>,
    log: PathBuf,
    description: String,
}

impl BuilderProcess {
    /// Starts the binary with `args` and extra environment; stderr goes to `log`.
    pub fn start(args: &[&str], env: &[(&str, &str)], log: &Path) -> BuilderProcess {
        BuilderProcess::start_as(&Launch::default(), args, env, log)
    }

    /// Like [`BuilderProcess::start`], started the way `how` says.
    pub fn start_as(
        how: &Launch<'_>,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> BuilderProcess {
        let file =
            std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let mut cmd = match how.wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut cmd = Command::new(program);
                cmd.args(wrapper_args).arg(binary());
                cmd
            }
            None => Command::new(binary()),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file));
        for k in how.unset {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        BuilderProcess {
            child: Some(child),
            log: log.to_path_buf(),
            description: format!(
                "{} nodepool-builder {}",
                how.wrapper.join(" "),
                args.join(" ")
            )
            .trim_start()
            .to_owned(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics with the log tail otherwise.
    #[track_caller]
    pub fn wait_for_log(&mut self, timeout: Duration, needle: &str) {
        let found = poll_for(timeout, || {
            if self.log().contains(needle) {
                return Some(true);
            }
            match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(_))) => Some(false),
                _ => None,
            }
        });
        if found != Some(true) {
            let why = if found == Some(false) {
                "the process exited first"
            } else {
                "timed out"
            };
            panic!(
                "{why} after at most {timeout:?}: waiting for {needle:?} in the log of `{}`\n--- log tail ---\n{}",
                self.description,
                file_tail(&self.log, 60)
            );
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig)
            .expect("signal the builder");
    }

    /// Waits for the process to exit and returns its status; panics with the log tail if it
    /// does not exit in time.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        match poll_for(timeout, || child.try_wait().ok().flatten()) {
            Some(status) => {
                self.child = None;
                status
            }
            None => panic!(
                "timed out after {timeout:?}: waiting for `{}` to exit\n--- log tail ---\n{}",
                self.description,
                file_tail(&self.log, 60)
            ),
        }
    }
}

impl Drop for BuilderProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
