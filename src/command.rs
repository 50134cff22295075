//! The subprocess runner, the one owner of the daemon's child processes: diskimage-builder, the
//! image gate's `qemu-img` and `validate-command`, the post-upload hook, and the command driver's
//! upload, delete and list commands all run through it. It starts a command in its own process
//! group, sends its output to a log file or captures it, and waits for it with a timeout and a
//! cancel channel.
//!
//! One runner means one policy for every child: process group, clean signal state, SIGTERM
//! then SIGKILL with bounded waits, leftovers of the group killed after the exit, no zombie.
//! (The command driver once had its own spawner that sent SIGKILL straight away, left the
//! group's other processes running after a normal exit, and refused to start anything when
//! the daemon was PID 1 of a container.)
//!
//! # Lifecycle
//!
//! [`spawn`] sets up the output ([`Output`]): for a log it opens the file (creating its
//! directory) and makes one pipe for the merged stdout and stderr; to capture, one pipe
//! each; to discard, one pipe whose bytes are dropped. It starts the program with stdin
//! from `/dev/null` in a new process group whose id is the child's pid. It then opens a
//! pidfd for the child and starts one reader thread, `dib-out-N` (or `cmd-out-N` when
//! capturing), which polls the pipes, the pidfd and a stop eventfd at once. The reader
//! appends every chunk of output to the log as raw bytes (or to the in-memory tail of its
//! stream, trimmed to the requested size), and when the pidfd turns readable (the child has
//! exited) it sends one message on the exit channel.
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
//! output has been drained into the log ([`Running::wait_captured`] also returns the
//! captured tails). Dropping a [`Running`] without waiting kills the
//! group with SIGKILL and reaps the child, so a panic or an early return never leaves a
//! zombie or an orphaned group behind.
//!
//! The runner keeps the group id of every command whose leader it has not reaped yet. At
//! exit the daemon calls [`stop_all`], which gives the groups still running (uploads that
//! outlived the shutdown grace) SIGTERM, a bounded wait, then SIGKILL, and refuses to start
//! anything after that. An entry leaves the registry under its lock just before the reap,
//! so `stop_all` never signals a group id that could have been reused.
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
//! allowed: it calls `sigaction` and `sigprocmask` and allocates nothing.
//!
//! By default there is no `PR_SET_PDEATHSIG`: a build must not die because the thread that
//! started it exited; the [`Running`] guard is what cleans up. A spec may ask for one
//! ([`Spec::parent_death_signal`]; the command driver does, so that an upload does not run
//! on after its builder died). The hook then checks that the parent has not died before
//! the `prctl`, by comparing the parent pid with the one the daemon had before the fork,
//! never with 1: a daemon that is PID 1 of a container has children whose parent pid is 1
//! all along.
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

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
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
    /// Where stdout and stderr go.
    pub output: Output,
    /// The limit for the whole run, counted from the spawn; `None` is no limit.
    pub timeout: Option<Duration>,
    /// How long the process group has between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// A signal the kernel sends the command (not its group) when the thread that started
    /// it ends, which happens only when the daemon itself ends: the thread waits for the
    /// command. `None` lets the command outlive a builder that died (see the module docs).
    pub parent_death_signal: Option<Signal>,
}

/// Where a command's stdout and stderr go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Read and thrown away.
    Discard,
    /// Merged into one stream (in the order written) and appended to this file, created
    /// with its parent directories.
    Log(PathBuf),
    /// Kept apart in memory: the last `stdout` bytes of stdout and the last `stderr` bytes
    /// of stderr, returned by [`Running::wait_captured`].
    Capture { stdout: usize, stderr: usize },
}

/// The end of one captured stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tail {
    /// The last bytes written, at most the limit given in [`Output::Capture`].
    pub bytes: Vec<u8>,
    /// Whether earlier bytes were dropped to stay within the limit.
    pub truncated: bool,
}

/// How a run ended, with what it printed when the output was captured (both tails empty
/// otherwise).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    pub outcome: Outcome,
    pub stdout: Tail,
    pub stderr: Tail,
}

impl Spec {
    /// A spec with no extra environment, the daemon's working directory, the output
    /// discarded, no timeout, [`DEFAULT_GRACE`] and no parent-death signal.
    pub fn new(program: impl Into<String>, args: Vec<String>) -> Spec {
        Spec {
            program: program.into(),
            args,
            env: Vec::new(),
            cwd: None,
            output: Output::Discard,
            timeout: None,
            grace: DEFAULT_GRACE,
            parent_death_signal: None,
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
    /// [`stop_all`] has begun: the daemon is exiting and starts nothing more.
    Stopping { command: String },
}

impl SpawnError {
    /// The command line that was being started.
    pub fn command(&self) -> &str {
        match self {
            SpawnError::Exec { command, .. }
            | SpawnError::Log { command, .. }
            | SpawnError::Setup { command, .. }
            | SpawnError::Stopping { command } => command,
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
            SpawnError::Stopping { command } => {
                write!(f, "not starting '{command}': the builder is stopping")
            }
        }
    }
}

impl std::error::Error for SpawnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SpawnError::Exec { source, .. }
            | SpawnError::Log { source, .. }
            | SpawnError::Setup { source, .. } => Some(source),
            SpawnError::Stopping { .. } => None,
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

    let (log, created_log) = match &spec.output {
        Output::Log(path) => {
            let (file, created) = open_log(path).map_err(|source| SpawnError::Log {
                command: command.clone(),
                path: path.clone(),
                source,
            })?;
            (Some((path.clone(), file)), created)
        }
        Output::Discard | Output::Capture { .. } => (None, false),
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

    // All ends are close-on-exec, so children started by other threads meanwhile do not
    // inherit them; std dups the write ends onto the child's stdout and stderr. One pipe for
    // both, so that a log has them in the order written, unless they are captured apart.
    let pipe = || {
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| setup("create an output pipe")(e.into()))
    };
    let (stdout_read, stdout_write) = pipe()?;
    let (streams, stderr_write) = match (&spec.output, log) {
        (Output::Capture { stdout, stderr }, _) => {
            let (stderr_read, stderr_write) = pipe()?;
            let streams = vec![
                Stream::new(stdout_read, Sink::tail(*stdout)),
                Stream::new(stderr_read, Sink::tail(*stderr)),
            ];
            (streams, stderr_write)
        }
        (_, log_file) => {
            let sink = match log_file {
                Some((_, file)) => Sink::Log(file),
                None => Sink::Discard,
            };
            let stderr_write = stdout_write
                .try_clone()
                .map_err(setup("duplicate the output pipe"))?;
            (vec![Stream::new(stdout_read, sink)], stderr_write)
        }
    };
    let stop = eventfd().map_err(setup("create the stop eventfd"))?;

    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout_write))
        .stderr(Stdio::from(stderr_write))
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
    let parent_death = spec
        .parent_death_signal
        .map(|signal| (signal as libc::c_int, nix::unistd::getpid().as_raw()));
    // SAFETY: the hook only calls async-signal-safe functions and does not allocate; see
    // `reset_signal_state` and `die_with_parent`.
    unsafe {
        cmd.pre_exec(move || {
            reset_signal_state(max_signal, sigset_size)?;
            match parent_death {
                Some((signal, parent)) => die_with_parent(signal, parent),
                None => Ok(()),
            }
        });
    }

    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(source) => {
            if created_log && let Some(notes) = &notes {
                let _ = fs::remove_file(&notes.path);
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
    // Named after what it drains: a DIB log, or the output of a command driver's command.
    let prefix = match spec.output {
        Output::Capture { .. } => "cmd-out",
        Output::Discard | Output::Log(_) => "dib-out",
    };
    let name = format!(
        "{prefix}-{}",
        READER_COUNTER.fetch_add(1, Ordering::Relaxed) % 10_000_000
    );
    let reader = thread::try_spawn(ThreadKind::PipeReader, name, move || {
        // Dropping the sender when the pump returns (or unwinds) tells the owner it is done.
        let _done = done_tx;
        pump(streams, reader_pidfd, reader_stop, exited_tx)
    })
    .map_err(|e| abort(setup("start the output reader thread")(e)))?;

    {
        let mut live = live_groups();
        if live.stopping {
            drop(live);
            let error = abort(SpawnError::Stopping {
                command: command.clone(),
            });
            return Err(error);
        }
        live.groups.insert(pid.as_raw(), command.clone());
    }
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
    pub fn wait(self, cancel: &Receiver<()>) -> io::Result<Outcome> {
        self.wait_captured(cancel)
            .map(|completed| completed.outcome)
    }

    /// Like [`Running::wait`], and also returns the tails of stdout and stderr when the
    /// spec asked for [`Output::Capture`] (empty otherwise). A tail holds what the command
    /// wrote until its group was gone, or until the reader gave up on a pipe held open
    /// outside the group.
    pub fn wait_captured(mut self, cancel: &Receiver<()>) -> io::Result<Completed> {
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
        let (stdout, stderr) = match self.finish_reader() {
            Some(PumpReport { tails, .. }) => {
                let mut tails = tails.into_iter();
                (
                    tails.next().unwrap_or_default(),
                    tails.next().unwrap_or_default(),
                )
            }
            None => Default::default(),
        };
        Ok(Completed {
            outcome,
            stdout,
            stderr,
        })
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
        // CAUTION: out of the registry before the reap, under its lock, so that `stop_all`
        // never signals a group id that may already belong to someone else.
        live_groups().groups.remove(&self.pid.as_raw());
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

    /// Gives the reader the grace period to drain the pipe, then stops it and joins it;
    /// returns its report, if it did not panic.
    fn finish_reader(&mut self) -> Option<PumpReport> {
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
        }) = &report
        {
            let path = self.log_path().map(|p| p.display().to_string());
            log::warn!(
                "cannot write the output of {} to {}: {error}; the rest was discarded",
                self.command,
                path.unwrap_or_default()
            );
        }
        report
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

/// Stops every command still running at exit, and everything new: SIGTERM (and SIGCONT) to
/// each process group started by [`spawn`] whose leader has not been reaped, up to `grace`
/// for their owners to see them end, then SIGKILL to the groups left. From the first call
/// on, [`spawn`] refuses to start anything ([`SpawnError::Stopping`]). Returns how many
/// groups were running.
///
/// For the daemon's last moments: uploads that outlive the shutdown grace are left to their
/// threads, but their commands, and whatever those started in their groups, must not run
/// on and create a cloud image nobody records.
pub fn stop_all(grace: Duration) -> usize {
    let running = {
        let mut live = live_groups();
        live.stopping = true;
        for (&pgid, command) in &live.groups {
            log::info!("stopping process group {pgid} ({command}): sending SIGTERM");
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGCONT);
        }
        live.groups.len()
    };
    if running > 0 && !wait_for(Instant::now() + grace, || live_groups().groups.is_empty()) {
        let live = live_groups();
        for (&pgid, command) in &live.groups {
            log::warn!(
                "process group {pgid} ({command}) still running {grace:?} after SIGTERM; \
                 sending SIGKILL"
            );
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
    running
}

/// The process groups of [`Running`] commands, and whether [`stop_all`] has begun.
struct LiveGroups {
    /// Group id (the leader's pid) to command line, from the spawn until just before the
    /// leader is reaped.
    groups: BTreeMap<i32, String>,
    stopping: bool,
}

static LIVE_GROUPS: Mutex<LiveGroups> = Mutex::new(LiveGroups {
    groups: BTreeMap::new(),
    stopping: false,
});

fn live_groups() -> MutexGuard<'static, LiveGroups> {
    // Nothing panics while holding it; a poisoned lock still has consistent data.
    LIVE_GROUPS.lock().unwrap_or_else(|e| e.into_inner())
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
    /// The captured tails, one per stream in the order given (empty without capture).
    tails: Vec<Tail>,
}

/// Where the reader puts what it reads from one pipe.
enum Sink {
    Discard,
    /// Appended to the log; replaced by `Discard` after the first write error.
    Log(File),
    /// The last `keep` bytes are kept.
    Tail {
        tail: Tail,
        keep: usize,
    },
}

impl Sink {
    fn tail(keep: usize) -> Sink {
        Sink::Tail {
            tail: Tail::default(),
            keep,
        }
    }

    /// Takes one chunk; returns the error of a failed log write.
    fn take(&mut self, chunk: &[u8]) -> Option<io::Error> {
        match self {
            Sink::Discard => None,
            Sink::Log(file) => {
                let error = file.write_all(chunk).and_then(|()| file.flush()).err();
                if error.is_some() {
                    *self = Sink::Discard;
                }
                error
            }
            Sink::Tail { tail, keep } => {
                tail.bytes.extend_from_slice(chunk);
                // Trimmed once it holds twice the limit, so that the copy is amortised.
                if tail.bytes.len() > 2 * *keep {
                    tail.trim(*keep);
                }
                None
            }
        }
    }

    /// The tail, trimmed to its limit, if this sink keeps one.
    fn into_tail(self) -> Option<Tail> {
        match self {
            Sink::Tail { mut tail, keep } => {
                tail.trim(keep);
                Some(tail)
            }
            Sink::Discard | Sink::Log(_) => None,
        }
    }
}

impl Tail {
    fn trim(&mut self, keep: usize) {
        if self.bytes.len() > keep {
            self.bytes.drain(..self.bytes.len() - keep);
            self.truncated = true;
        }
    }
}

/// One output pipe of the child and where its bytes go.
struct Stream {
    pipe: OwnedFd,
    sink: Sink,
}

impl Stream {
    fn new(pipe: OwnedFd, sink: Sink) -> Stream {
        Stream { pipe, sink }
    }
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

/// The reader thread: copies every pipe into its sink until end-of-file, reports the
/// child's exit once, and returns early when the stop eventfd is written.
fn pump(
    mut streams: Vec<Stream>,
    pidfd: OwnedFd,
    stop: OwnedFd,
    exited_tx: Sender<()>,
) -> PumpReport {
    let mut write_error = None;
    let mut buffer = vec![0u8; CHUNK];
    // The pipes first, then the pidfd and the stop eventfd.
    let pipes = streams.len();
    let mut fds: Vec<libc::pollfd> = streams
        .iter()
        .map(|stream| pollfd(stream.pipe.as_raw_fd()))
        .chain([pollfd(pidfd.as_raw_fd()), pollfd(stop.as_raw_fd())])
        .collect();
    let (pidfd_at, stop_at) = (pipes, pipes + 1);
    // A negative descriptor is ignored by poll(2); that is how a finished source is dropped.
    while fds[..=pidfd_at].iter().any(|fd| fd.fd >= 0) {
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
        if fds[stop_at].revents != 0 {
            break;
        }
        for (fd, stream) in fds.iter_mut().zip(streams.iter_mut()) {
            if fd.fd < 0 || fd.revents == 0 {
                continue;
            }
            match read_retrying(stream.pipe.as_raw_fd(), &mut buffer) {
                Ok(0) => fd.fd = -1,
                Ok(n) => {
                    if let Some(error) = stream.sink.take(&buffer[..n]) {
                        write_error.get_or_insert(error);
                    }
                }
                Err(error) => {
                    log::error!("cannot read the output pipe: {error}");
                    fd.fd = -1;
                }
            }
        }
        if fds[pidfd_at].fd >= 0 && fds[pidfd_at].revents != 0 {
            // The channel has room for this one message; the owner may have stopped
            // listening, which is fine.
            let _ = exited_tx.try_send(());
            fds[pidfd_at].fd = -1;
        }
    }
    let tails = streams
        .into_iter()
        .filter_map(|stream| stream.sink.into_tail())
        .collect();
    PumpReport { write_error, tails }
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

/// Asks the kernel to send `signal` to this (forked) process when the thread that forked it
/// ends, and fails if the parent process `parent` is already gone.
///
/// CAUTION: runs in the forked child before `exec`; async-signal-safe calls only. The
/// check closes the race of a parent that died between `fork` and `prctl`: the child has
/// then been re-parented, so its parent pid is no longer `parent`. It compares with the pid
/// the parent had before the fork, not with 1: a daemon running as PID 1 of a container
/// has children whose parent pid is 1 all along, and an orphan may be re-parented to a
/// subreaper rather than to PID 1.
fn die_with_parent(signal: libc::c_int, parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: prctl and getppid are async-signal-safe system calls.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            // std passes only an errno to the parent, so this is the message it gets.
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
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
