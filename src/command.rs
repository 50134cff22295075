//! The subprocess runner: starts diskimage-builder (or any other long-running command) in
//! its own process group, copies its output into a log file, and waits for it with a
//! timeout and a cancel channel.
//!
//! # Lifecycle
//!
//! [`spawn`] opens the log (creating its directory), makes one pipe for the merged stdout and
//! stderr, and starts the program with stdin from `/dev/null` in a new process group whose
//! id is the child's pid. It then opens a pidfd for the child and starts one reader thread,
//! `dib-out-N`, which polls three descriptors at once: the pipe, the pidfd and a stop
//! eventfd. The reader appends every chunk of output to the log as raw bytes, and when the
//! pidfd turns readable (the child has exited) it sends one message on the exit channel.
//!
//! [`Running::wait`] is a `select!` over that exit channel, the caller's cancel channel and a
//! timer for the whole run. Nothing polls in the normal case: the reader sleeps in `poll(2)`
//! and the caller sleeps in the `select!`.
//!
//! * The child exited: any processes left in its group are killed with SIGKILL (a build that
//!   is over must not leave processes holding loop devices or mounts), the child is reaped,
//!   and the result is [`Outcome::Exited`] or [`Outcome::Signaled`].
//! * The timeout passed or the caller cancelled: SIGTERM (and SIGCONT, so that a stopped
//!   process sees it) goes to the whole group; after `grace` the group gets SIGKILL; the
//!   child is reaped; the result is [`Outcome::TimedOut`] or [`Outcome::Cancelled`].
//!   Upstream kills only the DIB process and never reaps it; this runner kills the group.
//!
//! In every case `wait` returns only when no live process is left in the group and the
//! output has been drained into the log. Dropping a [`Running`] without waiting kills the
//! group with SIGKILL and reaps the child, so a panic or an early return never leaves a
//! zombie or an orphaned group behind.
//!
//! # Why a pidfd, and why the reader thread watches it
//!
//! The exit of the child has to be seen at the same time as the cancel channel and the
//! timer, which are crossbeam channels, not descriptors. Something has to turn the exit into
//! a channel message. A second thread blocked in `waitpid` would do it, but it would reap
//! the child: from then on the pid, and with it the process group id, could be reused by an
//! unrelated process, and a later `killpg` could hit a stranger. A pidfd says "exited"
//! without reaping. The zombie keeps the pid and the group id reserved until this module
//! calls `waitpid`, which it does only after the last signal to the group has been sent.
//! Since the reader thread must sleep in `poll(2)` on the pipe anyway, it watches the pidfd
//! in the same call, and one thread per child is enough. The caller's own waits after the
//! first event (the grace period, the reap after SIGKILL) poll the pidfd directly with a
//! deadline, without going through the reader.
//!
//! # Signals in the child
//!
//! CAUTION: `std::process::Command` does not reset the signal mask of the child, and signal
//! dispositions set to "ignore" survive `exec`. A daemon that blocked a signal in the
//! spawning thread, or ignored one process-wide, would hand that state to diskimage-builder
//! and everything it runs (see stackdump.md, pitfall 1). The `pre_exec` hook therefore sets
//! every catchable signal, real-time ones included, to its default action and then empties
//! the mask. It runs between `fork` and `exec`, where only async-signal-safe calls are
//! allowed: it calls `sigaction` and `sigprocmask` and allocates nothing. There is
//! deliberately no `PR_SET_PDEATHSIG`: a build must not die because the thread that started
//! it exited; the [`Running`] guard is what cleans up.
//!
//! # Waits and deadlines
//!
//! * The reader's `poll(2)` has no timeout of its own. Its deadline is enforced by its owner,
//!   which writes to the stop eventfd when it stops waiting for the output (for example
//!   because a grandchild that left the process group still holds the pipe open). The
//!   owner then notes in the log that it stopped reading.
//! * After SIGKILL, the child gets [`KILL_DEADLINE`] to exit. A process stuck in an
//!   uninterruptible sleep may outlast it; `wait` then returns an error and the child is
//!   left unreaped, which is logged.
//! * After the child is reaped, the remaining members of the group get [`GROUP_DEADLINE`]
//!   to die. This is the one place that polls, with a short back-off, because the kernel
//!   offers no notification for "this process group is empty".
//!
//! # Notes in the log
//!
//! Besides the child's own output, the log receives one line per unusual event, each
//! starting with `nodepool-builder: `: the timeout or cancellation, the escalation to
//! SIGKILL, processes killed after the command exited, survivors, and a pipe still held
//! open. The normal path writes nothing, so the log of a successful run is exactly the
//! command's output. The caller writes upstream's `Exit code: <rc>` line itself.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::thread::{self, JoinHandle, ThreadKind};

/// The grace period [`Spec::new`] uses between SIGTERM and SIGKILL. diskimage-builder
/// unmounts its chroot and detaches loop devices in its exit traps, which can take a while.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// How long the child may take to exit after SIGKILL before `wait` gives up on it.
pub const KILL_DEADLINE: Duration = Duration::from_secs(30);

/// How long the other members of the process group may take to die after the child has
/// been reaped and the group has been sent SIGKILL.
pub const GROUP_DEADLINE: Duration = Duration::from_secs(5);

/// The least time given to the reader to drain the pipe once every writer is gone, even
/// with a grace period of zero.
const MIN_DRAIN: Duration = Duration::from_secs(1);

/// The size of one read from the pipe.
const CHUNK: usize = 64 * 1024;

/// The prefix of the lines this module writes into the log itself.
const NOTE_PREFIX: &str = "nodepool-builder: ";

/// What to run and how.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The program, looked up in `PATH` if it contains no slash.
    pub program: String,
    /// The arguments, without the program name.
    pub args: Vec<String>,
    /// Variables added to the inherited environment, in order; a later entry overrides an
    /// earlier one with the same name, and both override the inherited value.
    pub env: Vec<(String, String)>,
    /// The working directory of the child; `None` keeps the daemon's.
    pub cwd: Option<PathBuf>,
    /// The file that receives stdout and stderr, appended to (created with its parent
    /// directories); `None` discards the output.
    pub log: Option<PathBuf>,
    /// The limit for the whole run, counted from the spawn; `None` is no limit.
    pub timeout: Option<Duration>,
    /// How long the process group has between SIGTERM and SIGKILL.
    pub grace: Duration,
}

impl Spec {
    /// A spec with no extra environment, the daemon's working directory, no log, no
    /// timeout and [`DEFAULT_GRACE`].
    pub fn new(program: impl Into<String>, args: Vec<String>) -> Spec {
        Spec {
            program: program.into(),
            args,
            env: Vec::new(),
            cwd: None,
            log: None,
            timeout: None,
            grace: DEFAULT_GRACE,
        }
    }

    /// The program and its arguments joined with spaces, the way upstream shows a command
    /// ("Running <cmd>").
    pub fn command_line(&self) -> String {
        let mut line = self.program.clone();
        for arg in &self.args {
            line.push(' ');
            line.push_str(arg);
        }
        line
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The program exited with this status.
    Exited(i32),
    /// The program was killed by this signal, sent by someone other than this runner.
    Signaled(i32),
    /// The timeout passed; the process group was terminated.
    TimedOut,
    /// The caller cancelled; the process group was terminated.
    Cancelled,
}

impl Outcome {
    /// Whether the program exited with status 0.
    pub fn success(self) -> bool {
        self == Outcome::Exited(0)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Outcome::Exited(code) => write!(f, "exit code {code}"),
            Outcome::Signaled(signal) => match Signal::try_from(signal) {
                Ok(name) => write!(f, "killed by signal {signal} ({name})"),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
            Outcome::TimedOut => f.write_str("timed out"),
            Outcome::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// Why [`spawn`] could not start a command. Nothing is left running when it fails.
#[derive(Debug)]
pub enum SpawnError {
    /// The program could not be executed: not found, not executable, a bad working
    /// directory, or the signal reset before `exec` failed.
    Exec { command: String, source: io::Error },
    /// The log file or its directory could not be created.
    Log {
        command: String,
        path: PathBuf,
        source: io::Error,
    },
    /// Something the runner needs besides the program (a pipe, a pidfd, an eventfd, the
    /// reader thread) could not be had.
    Setup {
        command: String,
        what: &'static str,
        source: io::Error,
    },
}

impl SpawnError {
    /// The command line that was being started.
    pub fn command(&self) -> &str {
        match self {
            SpawnError::Exec { command, .. }
            | SpawnError::Log { command, .. }
            | SpawnError::Setup { command, .. } => command,
        }
    }
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpawnError::Exec { command, source } => {
                write!(f, "failed to exec '{command}': {}", strerror(source))
            }
            SpawnError::Log {
                command,
                path,
                source,
            } => write!(
                f,
                "cannot open log {} for '{command}': {}",
                path.display(),
                strerror(source)
            ),
            SpawnError::Setup {
                command,
                what,
                source,
            } => write!(f, "cannot {what} for '{command}': {}", strerror(source)),
        }
    }
}

impl std::error::Error for SpawnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SpawnError::Exec { source, .. }
            | SpawnError::Log { source, .. }
            | SpawnError::Setup { source, .. } => Some(source),
        }
    }
}

/// A started command. Wait for it with [`Running::wait`]; dropping it kills its process
/// group and reaps it.
pub struct Running {
    pid: Pid,
    command: String,
    started: Instant,
    timeout: Option<Duration>,
    grace: Duration,
    /// Readable once the child has exited; the child is not reaped by it.
    pidfd: OwnedFd,
    /// Written to tell the reader to stop reading.
    stop: OwnedFd,
    /// One message from the reader when the pidfd turns readable.
    exited_rx: Receiver<()>,
    /// Disconnected when the reader thread has finished.
    done_rx: Receiver<()>,
    /// `None` once the reader has been joined.
    reader: Option<JoinHandle<PumpReport>>,
    /// Where this module writes its own notes; `None` without a log.
    notes: Option<Notes>,
    /// Set once the child has been reaped, or given up on; `Drop` then has nothing to kill.
    finished: bool,
}

/// Starts `spec` and returns the guard that waits for it.
///
/// Fails without leaving anything running; if the program cannot be executed and the log
/// did not exist before, the (empty) log file is removed again, so that a failed exec
/// leaves no log, as upstream.
pub fn spawn(spec: Spec) -> Result<Running, SpawnError> {
    let command = spec.command_line();
    let setup = |what: &'static str| {
        let command = command.clone();
        move |source: io::Error| SpawnError::Setup {
            command,
            what,
            source,
        }
    };

    let (log, created_log) = match &spec.log {
        Some(path) => {
            let (file, created) = open_log(path).map_err(|source| SpawnError::Log {
                command: command.clone(),
                path: path.clone(),
                source,
            })?;
            (Some((path.clone(), file)), created)
        }
        None => (None, false),
    };
    let notes = match &log {
        Some((path, file)) => Some(Notes {
            path: path.clone(),
            file: file
                .try_clone()
                .map_err(setup("duplicate the log descriptor"))?,
        }),
        None => None,
    };

    // Both ends are close-on-exec, so children started by other threads meanwhile do not
    // inherit them; std dups the write end onto the child's stdout and stderr.
    let (pipe_read, pipe_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| setup("create the output pipe")(e.into()))?;
    let pipe_write_err = pipe_write
        .try_clone()
        .map_err(setup("duplicate the output pipe"))?;
    let stop = eventfd().map_err(setup("create the stop eventfd"))?;

    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(pipe_write))
        .stderr(Stdio::from(pipe_write_err))
        .process_group(0);
    for (key, value) in &spec.env {
        cmd.env(key, value);
    }
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    // Read before the fork: `SIGRTMAX()` asks glibc, which is not something to do in the
    // child. Signals are numbered from 1, so the kernel's set has SIGRTMAX bits, rounded up
    // to whole bytes.
    let max_signal = libc::SIGRTMAX();
    let sigset_size = (max_signal as usize).div_ceil(8);
    // SAFETY: the hook only calls async-signal-safe functions and does not allocate; see
    // `reset_signal_state`.
    unsafe {
        cmd.pre_exec(move || reset_signal_state(max_signal, sigset_size));
    }

    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(source) => {
            if created_log {
                if let Some((path, _)) = &log {
                    let _ = fs::remove_file(path);
                }
            }
            return Err(SpawnError::Exec { command, source });
        }
    };
    // CAUTION: the Command owns the parent's copies of the pipe's write end. They must be
    // closed now, or the reader would never see end-of-file.
    drop(cmd);
    let pid = Pid::from_raw(child.id() as i32);
    // A std Child does nothing when dropped; this module reaps the pid itself.
    drop(child);

    // From here on a failure must not leave the child behind.
    let abort = |error: SpawnError| {
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
        error
    };

    let pidfd = pidfd_open(pid).map_err(|e| abort(setup("open a pidfd")(e)))?;
    let reader_pidfd = pidfd
        .try_clone()
        .map_err(|e| abort(setup("duplicate the pidfd")(e)))?;
    let reader_stop = stop
        .try_clone()
        .map_err(|e| abort(setup("duplicate the stop eventfd")(e)))?;
    let (exited_tx, exited_rx) = crossbeam_channel::bounded(1);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
    let log_file = log.map(|(_, file)| file);
    let name = format!(
        "dib-out-{}",
        READER_COUNTER.fetch_add(1, Ordering::Relaxed) % 10_000_000
    );
    let reader = thread::try_spawn(ThreadKind::PipeReader, name, move || {
        // Dropping the sender when the pump returns (or unwinds) tells the owner it is done.
        let _done = done_tx;
        pump(pipe_read, reader_pidfd, reader_stop, log_file, exited_tx)
    })
    .map_err(|e| abort(setup("start the output reader thread")(e)))?;

    log::debug!("started process group {pid} ({command})");
    Ok(Running {
        pid,
        command,
        started: Instant::now(),
        timeout: spec.timeout,
        grace: spec.grace,
        pidfd,
        stop,
        exited_rx,
        done_rx,
        reader: Some(reader),
        notes,
        finished: false,
    })
}

impl Running {
    /// The child's pid, which is also its process group id.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// The command line, as in [`Spec::command_line`].
    pub fn command_line(&self) -> &str {
        &self.command
    }

    /// The log file, if there is one.
    pub fn log_path(&self) -> Option<&Path> {
        self.notes.as_ref().map(|notes| notes.path.as_path())
    }

    /// Waits until the child exits, the timeout passes, or `cancel` receives a message or
    /// is disconnected (pass `crossbeam_channel::never()` for no cancellation).
    ///
    /// On a timeout or cancellation the whole process group gets SIGTERM, then SIGKILL
    /// after the grace period. When this returns, the child has been reaped, no live
    /// process is left in its group (or the log says which survived), and the output has
    /// been drained into the log.
    ///
    /// Errors: the child did not exit within [`KILL_DEADLINE`] of SIGKILL, or it was reaped
    /// by someone else, so its status is unknown.
    pub fn wait(mut self, cancel: &Receiver<()>) -> io::Result<Outcome> {
        let timer = match self.timeout {
            Some(timeout) => crossbeam_channel::at(self.started + timeout),
            None => crossbeam_channel::never(),
        };
        let event = crossbeam_channel::select_biased! {
            recv(self.exited_rx) -> message => match message {
                Ok(()) => Event::Exited,
                // The reader ended without reporting the exit, which only a bug can cause.
                Err(_) => self.wait_without_reader(cancel, &timer),
            },
            recv(cancel) -> _ => Event::Cancelled,
            recv(timer) -> _ => Event::TimedOut,
        };

        let outcome = match event {
            Event::Exited => {
                self.kill_leftovers();
                let status = self.reap(Instant::now() + KILL_DEADLINE)?;
                status_outcome(status)
            }
            Event::TimedOut | Event::Cancelled => {
                let (outcome, why) = if event == Event::TimedOut {
                    let timeout = self.timeout.unwrap_or_default();
                    (Outcome::TimedOut, format!("timed out after {timeout:?}"))
                } else {
                    (Outcome::Cancelled, "cancelled".to_string())
                };
                self.terminate(&why);
                let status = self.reap(Instant::now() + KILL_DEADLINE)?;
                log::debug!(
                    "process group {} ({}) ended after being {why}: {}",
                    self.pid,
                    self.command,
                    status_outcome(status)
                );
                outcome
            }
        };
        self.wait_group_gone();
        self.finish_reader();
        Ok(outcome)
    }

    /// The fallback for a reader that ended early: the pidfd is polled in short slices,
    /// checking the cancel channel and the timer in between.
    fn wait_without_reader(&self, cancel: &Receiver<()>, timer: &Receiver<Instant>) -> Event {
        log::error!(
            "output reader of process group {} ({}) ended before the process did; polling",
            self.pid,
            self.command
        );
        loop {
            if wait_readable(&self.pidfd, Instant::now() + Duration::from_millis(100)) {
                return Event::Exited;
            }
            match cancel.try_recv() {
                Ok(()) | Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    return Event::Cancelled;
                }
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            if timer.try_recv().is_ok() {
                return Event::TimedOut;
            }
        }
    }

    /// SIGTERM to the group, up to `grace` for it to end, then SIGKILL to the group.
    fn terminate(&self, why: &str) {
        self.note(&format!(
            "{why}; sending SIGTERM to process group {}",
            self.pid
        ));
        let _ = killpg(self.pid, Signal::SIGTERM);
        // A stopped process would not act on SIGTERM until continued.
        let _ = killpg(self.pid, Signal::SIGCONT);
        let deadline = Instant::now() + self.grace;
        let ended = wait_readable(&self.pidfd, deadline)
            && wait_for(deadline, || live_group_members(self.pid).is_empty());
        if !ended {
            self.note(&format!(
                "process group {} still running {:?} after SIGTERM; sending SIGKILL",
                self.pid, self.grace
            ));
        }
        // CAUTION: sent while the child is not yet reaped, so the group id is still ours.
        let _ = killpg(self.pid, Signal::SIGKILL);
    }

    /// After a normal exit: SIGKILL to whatever is left in the group.
    fn kill_leftovers(&self) {
        let leftovers = live_group_members(self.pid);
        if !leftovers.is_empty() {
            self.note(&format!(
                "killing processes left in process group {} after it exited: {leftovers:?}",
                self.pid
            ));
        }
        // CAUTION: sent while the child is not yet reaped, so the group id is still ours.
        let _ = killpg(self.pid, Signal::SIGKILL);
    }

    /// Reaps the child once it has exited, waiting for that until `deadline`.
    fn reap(&mut self, deadline: Instant) -> io::Result<WaitStatus> {
        if !wait_readable(&self.pidfd, deadline) {
            self.finished = true;
            let message = format!(
                "process {} ({}) did not exit within {KILL_DEADLINE:?} of SIGKILL; left unreaped",
                self.pid, self.command
            );
            self.note(&message);
            log::error!("{message}");
            self.stop_reader();
            return Err(io::Error::new(io::ErrorKind::TimedOut, message));
        }
        loop {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {
                    // The pidfd said exited; waitpid may lag by a moment. Wait for real.
                    if Instant::now() >= deadline {
                        self.finished = true;
                        self.stop_reader();
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "process {} ({}) could not be reaped",
                                self.pid, self.command
                            ),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    self.finished = true;
                    return Ok(status);
                }
                // Stops and continues are not requested, but are not the end either.
                Ok(_) => {}
                Err(Errno::EINTR) => {}
                Err(errno) => {
                    self.finished = true;
                    self.stop_reader();
                    return Err(io::Error::new(
                        io::Error::from(errno).kind(),
                        format!(
                            "cannot reap process {} ({}): {}",
                            self.pid,
                            self.command,
                            errno.desc()
                        ),
                    ));
                }
            }
        }
    }

    /// Waits up to [`GROUP_DEADLINE`] for the group's other members to die, and says so in
    /// the log when some survive.
    fn wait_group_gone(&self) {
        let deadline = Instant::now() + GROUP_DEADLINE;
        if !wait_for(deadline, || live_group_members(self.pid).is_empty()) {
            let survivors = live_group_members(self.pid);
            let message = format!(
                "processes of group {} still alive {GROUP_DEADLINE:?} after SIGKILL: {survivors:?}",
                self.pid
            );
            self.note(&message);
            log::warn!("{message} ({})", self.command);
        }
    }

    /// Gives the reader the grace period to drain the pipe, then stops it and joins it.
    fn finish_reader(&mut self) {
        let deadline = Instant::now() + self.grace.max(MIN_DRAIN);
        let drained = matches!(
            self.done_rx.recv_deadline(deadline),
            Err(RecvTimeoutError::Disconnected) | Ok(())
        );
        let report = self.stop_reader();
        if !drained {
            self.note(&format!(
                "output pipe still open {:?} after process group {} ended \
                 (a process outside the group holds it); stopped reading",
                self.grace.max(MIN_DRAIN),
                self.pid
            ));
        }
        if let Some(PumpReport {
            write_error: Some(error),
            ..
        }) = report
        {
            let path = self.log_path().map(|p| p.display().to_string());
            log::warn!(
                "cannot write the output of {} to {}: {error}; the rest was discarded",
                self.command,
                path.unwrap_or_default()
            );
        }
    }

    /// Tells the reader to stop and joins it. Returns its report, if it did not panic.
    fn stop_reader(&mut self) -> Option<PumpReport> {
        let reader = self.reader.take()?;
        let one: u64 = 1;
        // SAFETY: writing eight bytes from a valid u64 to an eventfd we own.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        reader.join().ok()
    }

    /// Appends one of this module's own lines to the log, and logs it.
    fn note(&self, text: &str) {
        log::info!("{text} ({})", self.command);
        if let Some(notes) = &self.notes {
            notes.write(text);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.finished {
            self.note(&format!(
                "process group {} abandoned; sending SIGKILL",
                self.pid
            ));
            // CAUTION: sent before the reap, while the group id is still ours.
            let _ = killpg(self.pid, Signal::SIGKILL);
            if let Err(error) = self.reap(Instant::now() + KILL_DEADLINE) {
                log::error!("{error}");
            } else {
                self.wait_group_gone();
            }
        }
        if self.reader.is_some() {
            self.finish_reader();
        }
    }
}

/// Splits a command line into words with POSIX shell rules, like Python's `shlex.split`:
/// whitespace separates words; single quotes keep everything literally; inside double
/// quotes a backslash escapes only `"` and `\`; outside quotes a backslash escapes any
/// character. Nothing is expanded (`%p`, `$HOME` and `*` stay as they are) and `#` starts
/// no comment. `''` is an empty word.
pub fn shell_split(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = s.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            ' ' | '\t' | '\n' | '\r' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some((_, '\'')) => break,
                        Some((_, c)) => word.push(c),
                        None => return Err(format!("no closing quotation for the ' at byte {at}")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, c @ ('"' | '\\'))) => word.push(c),
                            Some((_, c)) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => {
                                return Err(format!(
                                    "no closing quotation for the \" at byte {at}"
                                ));
                            }
                        },
                        Some((_, c)) => word.push(c),
                        None => {
                            return Err(format!("no closing quotation for the \" at byte {at}"));
                        }
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some((_, c)) => word.push(c),
                    None => return Err(format!("no escaped character after the \\ at byte {at}")),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Numbers the reader threads: `dib-out-0`, `dib-out-1`, ...
static READER_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// What `wait` saw first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Exited,
    TimedOut,
    Cancelled,
}

/// What the reader thread did.
#[derive(Debug)]
struct PumpReport {
    /// The first error writing to the log; later output was read and discarded.
    write_error: Option<io::Error>,
}

/// The log file as this module's own notes see it.
struct Notes {
    path: PathBuf,
    file: File,
}

impl Notes {
    fn write(&self, text: &str) {
        let line = format!("{NOTE_PREFIX}{text}\n");
        if let Err(error) = (&self.file).write_all(line.as_bytes()) {
            log::warn!("cannot write to {}: {error}", self.path.display());
        }
    }
}

/// The reader thread: copies the pipe into the log until end-of-file, reports the child's
/// exit once, and returns early when the stop eventfd is written.
fn pump(
    pipe: OwnedFd,
    pidfd: OwnedFd,
    stop: OwnedFd,
    mut log: Option<File>,
    exited_tx: Sender<()>,
) -> PumpReport {
    let mut report = PumpReport { write_error: None };
    let mut buffer = vec![0u8; CHUNK];
    let mut fds = [
        pollfd(pipe.as_raw_fd()),
        pollfd(pidfd.as_raw_fd()),
        pollfd(stop.as_raw_fd()),
    ];
    // A negative descriptor is ignored by poll(2); that is how a finished source is dropped.
    while fds[0].fd >= 0 || fds[1].fd >= 0 {
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("poll on the output pipe failed: {error}");
            break;
        }
        if fds[2].revents != 0 {
            break;
        }
        if fds[0].revents != 0 {
            match read_retrying(pipe.as_raw_fd(), &mut buffer) {
                Ok(0) => fds[0].fd = -1,
                Ok(n) => {
                    if let Some(file) = &mut log {
                        if let Err(error) = file.write_all(&buffer[..n]).and_then(|()| file.flush())
                        {
                            report.write_error = Some(error);
                            log = None;
                        }
                    }
                }
                Err(error) => {
                    log::error!("cannot read the output pipe: {error}");
                    fds[0].fd = -1;
                }
            }
        }
        if fds[1].revents != 0 {
            // The channel has room for this one message; the owner may have stopped
            // listening, which is fine.
            let _ = exited_tx.try_send(());
            fds[1].fd = -1;
        }
    }
    report
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// `read(2)`, retried on EINTR.
fn read_retrying(fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the buffer is valid for writes of its length.
        let n = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Whether `fd` becomes readable before `deadline`; EINTR is retried with the time left.
fn wait_readable(fd: &OwnedFd, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Round up, so that a wait never ends a little before its deadline.
        let millis = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
        let mut fds = [pollfd(fd.as_raw_fd())];
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, millis) };
        if ready > 0 {
            return true;
        }
        if ready == 0 {
            return false;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Polls `done` with a back-off from 1 ms to 50 ms until it is true or `deadline` passes;
/// true if it became true. Used only where the kernel has no notification to offer.
fn wait_for(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    let mut pause = Duration::from_millis(1);
    loop {
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The pids of processes in group `pgid` that are alive (not zombies).
///
/// `kill(-pgid, 0)` answers "no such group" cheaply in the common case; zombies count as
/// members for it, so when it finds some, `/proc` tells who is really alive.
fn live_group_members(pgid: Pid) -> Vec<i32> {
    if killpg(pgid, None) == Err(Errno::ESRCH) {
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut members = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name in parentheses (which may contain anything): state, ppid,
        // pgrp.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
        if pgrp == Some(pgid.as_raw()) && state != "Z" && state != "X" {
            members.push(pid);
        }
    }
    members.sort_unstable();
    members
}

fn status_outcome(status: WaitStatus) -> Outcome {
    match status {
        WaitStatus::Exited(_, code) => Outcome::Exited(code),
        WaitStatus::Signaled(_, signal, _) => Outcome::Signaled(signal as i32),
        // `reap` returns only the two above.
        other => unreachable!("unexpected wait status {other:?}"),
    }
}

/// Opens `path` for appending, creating it and its parent directories; also says whether
/// the file was created by this call.
fn open_log(path: &Path) -> io::Result<(File, bool)> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    let existed = path.exists();
    let file = OpenOptions::new().append(true).create(true).open(path)?;
    Ok((file, !existed))
}

/// `pidfd_open(2)` (Linux 5.3), which libc and nix do not wrap.
fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns; pidfds are
    // close-on-exec.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A close-on-exec, non-blocking eventfd.
fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: a plain system call with integer arguments.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Resets every catchable signal to its default action, then empties the signal mask.
///
/// CAUTION: runs in the forked child before `exec`. Only async-signal-safe calls, no
/// allocation, no locks. Dispositions are reset before the mask is opened, so that a signal
/// arriving in between cannot run one of the daemon's handlers in the child.
///
/// The dispositions are set with the raw `rt_sigaction` system call, because glibc's
/// `sigaction` refuses to touch its two internal signals (32 and 33), and those can arrive
/// ignored: glibc's `posix_spawn` sets them to "ignore" in the processes it starts, which
/// includes a daemon started by a supervisor that uses it. An "ignore" survives `exec`, so it
/// would be passed on to diskimage-builder. Setting `SIG_DFL` needs an all-zero kernel
/// `struct sigaction` whatever its layout on the architecture, so a zeroed buffer larger
/// than every layout is passed. `sigset_size` is the kernel's signal set size in bytes.
fn reset_signal_state(max_signal: libc::c_int, sigset_size: usize) -> io::Result<()> {
    let default_action = [0u64; 8];
    for signal in 1..=max_signal {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction with a valid, all-zero action (SIG_DFL, no flags, empty
        // mask) and no old action. Failures are ignored: there is nothing better to do.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                default_action.as_ptr(),
                std::ptr::null_mut::<libc::c_void>(),
                sigset_size,
            );
        }
    }
    // SAFETY: sigprocmask with a valid, emptied set.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The C library's text for an OS error ("No such file or directory"), without Rust's
/// " (os error 2)" suffix; other errors as they display.
fn strerror(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(code) => Errno::from_raw(code).desc().to_string(),
        None => error.to_string(),
    }
}
