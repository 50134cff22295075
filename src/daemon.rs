//! Daemon mode: pidfile lock, double fork with a readiness pipe, and `sd_notify`.
//!
//! Without `-d`/`-f`, `nodepool-builder` detaches itself, as nodepool's does, but unlike
//! nodepool the command that starts it tells the truth: it exits 0 only once the daemon is
//! connected to ZooKeeper and every thread is up, and otherwise prints the daemon's error and
//! exits 1. `/etc/init.d/nodepool-builder start` (start-stop-daemon without `--background`)
//! relies on that. The order in `main` (real-services.md §e.4):
//!
//! 1. make every path absolute (the daemon runs in `/`; a relative `-c` would break reload);
//! 2. [`close_inherited_fds`] (above 2), before anything of ours is opened;
//! 3. load and validate the configuration (exit 2 with every error, nothing forked);
//! 4. [`Pidfile::acquire`]: `flock(LOCK_EX|LOCK_NB)`; a locked pidfile means "already running
//!    (pid N)" and exit 1; an unlocked one is stale, whatever pid it holds, and is taken over;
//! 5. open the log file (an unusable path is an error before forking);
//! 6. [`daemonize`]: pipe, fork; the parent reaps the middle process and waits on the pipe;
//!    the child calls `setsid` and forks again; the middle process `_exit`s; the grandchild
//!    sets umask 022, changes to `/`, points fds 0–2 at `/dev/null` and carries on in `main`
//!    with a [`ReadyPipe`];
//! 7. the grandchild writes its pid into the pidfile, sets up logging (fd 2 becomes the log
//!    file), starts its threads, and reports [`ReadyPipe::ready`] from `app::run`'s `ready`
//!    callback, or [`ReadyPipe::fail`] with the start-up error.
//!
//! The lock is taken before the fork and inherited: a `flock` belongs to the open file
//! description, which the grandchild shares, so it stays held when the parent and the middle
//! process exit, and is released by the kernel when the daemon dies, however it dies. No
//! stale-pidfile logic is needed. The pidfile is removed on a clean exit.
//!
//! # Hazards
//!
//! * CAUTION: [`daemonize`] must run before any thread exists: only the forking thread
//!   survives a fork, and locks held by others stay locked forever in the child. Logging,
//!   the stack dump and the signal handlers are therefore set up in the grandchild.
//!   `daemonize` checks `/proc/self/task` and refuses to fork a multi-threaded process.
//! * The middle process leaves with `_exit`, so it runs no destructors or exit handlers that
//!   belong to the parent's state.
//! * The readiness pipe and the pidfile descriptor are close-on-exec, so diskimage-builder and
//!   other children never hold them (a child holding the pipe would keep the parent waiting).
//! * The grandchild's fds 0–2 are redirected right after the fork, long before the parent
//!   exits: whoever ran `nodepool-builder` with pipes on its stdout/stderr (`$(...)`, a test's
//!   `output()`) sees EOF when the parent exits, not when the daemon does.

use std::cell::RefCell;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the starting command waits for the daemon to become ready. The daemon itself
/// keeps trying to reach ZooKeeper after that (as upstream's does), but a boot sequence
/// must not hang on an unreachable ZooKeeper.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment variable systemd's `Type=notify` sets.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

// ---------------------------------------------------------------------------------------
// Pidfile.

/// The locked pidfile; the lock lives as long as the process holds the descriptor (also in
/// forked children, which share it).
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    file: File,
}

/// Why the pidfile could not be taken.
#[derive(Debug)]
pub enum PidfileError {
    /// Another live process holds the lock.
    AlreadyRunning { path: PathBuf, pid: Option<i32> },
    /// A system call failed; `action` says what was being done, e.g. "lock the pidfile".
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for PidfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PidfileError::AlreadyRunning {
                path,
                pid: Some(pid),
            } => write!(
                f,
                "nodepool-builder is already running (pid {pid}): pidfile {} is locked",
                path.display()
            ),
            PidfileError::AlreadyRunning { path, pid: None } => write!(
                f,
                "nodepool-builder is already running (pid unknown): pidfile {} is locked",
                path.display()
            ),
            PidfileError::Io {
                action,
                path,
                source,
            } => write!(f, "cannot {action} {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for PidfileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PidfileError::AlreadyRunning { .. } => None,
            PidfileError::Io { source, .. } => Some(source),
        }
    }
}

impl Pidfile {
    /// Opens (creating it, and a missing directory with mode 0755) and locks the pidfile
    /// without blocking. Its content is left alone until [`Pidfile::write_pid`].
    pub fn acquire(path: &Path) -> Result<Pidfile, PidfileError> {
        let io_error = |action, path: &Path| {
            let path = path.to_owned();
            move |source| PidfileError::Io {
                action,
                path,
                source,
            }
        };
        if let Some(dir) = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(io_error("create the pidfile directory", dir))?;
        }
        // A daemon that is exiting unlinks the file while it still holds the lock; whoever
        // opened the old file before that holds a lock on a file nobody else can see. Check
        // that the locked file is still the one at `path`, and start over if not.
        for _ in 0..10 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                // The pid of a running daemon must survive a refused second start.
                .truncate(false)
                .mode(0o644)
                .open(path)
                .map_err(io_error("open the pidfile", path))?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let source = io::Error::last_os_error();
                if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(PidfileError::AlreadyRunning {
                        path: path.to_owned(),
                        pid: read_pid(&file),
                    });
                }
                return Err(PidfileError::Io {
                    action: "lock the pidfile",
                    path: path.to_owned(),
                    source,
                });
            }
            if same_file(&file, path) {
                return Ok(Pidfile {
                    path: path.to_owned(),
                    file,
                });
            }
        }
        Err(PidfileError::Io {
            action: "lock the pidfile",
            path: path.to_owned(),
            source: io::Error::other("it was replaced every time it was locked"),
        })
    }

    /// Replaces the content with `pid` and a newline.
    pub fn write_pid(&self, pid: u32) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.write_all_at(format!("{pid}\n").as_bytes(), 0)
    }

    /// The pid the file holds now, if it parses.
    pub fn pid(&self) -> Option<i32> {
        read_pid(&self.file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the file (if it is still ours) and releases the lock.
    pub fn remove(self) -> io::Result<()> {
        if same_file(&self.file, &self.path) {
            std::fs::remove_file(&self.path)?;
        }
        Ok(())
    }
}

fn read_pid(file: &File) -> Option<i32> {
    let mut buf = [0u8; 32];
    let n = file.read_at(&mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
}

/// Whether `path` names the same inode as the open `file`.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------
// Descriptors.

/// Closes every descriptor above 2 inherited from whoever started us. Call it first thing in
/// daemon mode, before anything is opened.
pub fn close_inherited_fds() {
    // SAFETY: closing descriptors nothing in this process uses yet (see above).
    if unsafe { libc::close_range(3, libc::c_uint::MAX, 0) } == 0 {
        return;
    }
    // Kernels before 5.9: close what /proc lists. Collect first; the directory has its own fd.
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: as above; the directory's own descriptor is already closed (EBADF).
        unsafe { libc::close(fd) };
    }
}

// ---------------------------------------------------------------------------------------
// Fork and readiness.

/// Which side of [`daemonize`] we are on.
#[derive(Debug)]
pub enum Role {
    /// The command that was run: the daemon's start-up ended this way; exit accordingly.
    Parent(StartOutcome),
    /// The daemon (the grandchild): report readiness or failure through the pipe.
    Daemon(ReadyPipe),
}

/// What the starting command learned from the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// Connected to ZooKeeper and every thread is up.
    Ready,
    /// The daemon failed to start and said why.
    Failed(String),
    /// The daemon went away without saying anything (killed, or a crash).
    Vanished,
    /// Not ready within [`START_TIMEOUT`]; it is still trying.
    NotReadyYet { pid: Option<i32> },
}

/// The daemon's end of the readiness pipe. One message is ever written: ready or the error.
#[derive(Debug)]
pub struct ReadyPipe {
    pipe: RefCell<Option<File>>,
}

impl ReadyPipe {
    /// Tells the waiting command that the daemon is ready, and closes the pipe.
    pub fn ready(&self) {
        self.send(b"ready\n");
    }

    /// Tells the waiting command why start-up failed, and closes the pipe. Does nothing if
    /// readiness was already reported.
    pub fn fail(&self, message: &str) {
        self.send(format!("error\n{message}").as_bytes());
    }

    fn send(&self, message: &[u8]) {
        if let Some(mut pipe) = self.pipe.borrow_mut().take() {
            // The command may be gone (killed by its terminal); the daemon does not care.
            let _ = pipe.write_all(message);
        }
    }
}

/// Detaches the process: see the module documentation. In the parent, returns how the
/// daemon's start-up went (waiting at most `timeout`); in the grandchild, returns its end of
/// the readiness pipe. The middle process never returns.
///
/// Fails (in the parent, before forking) if the process has more than one thread or a pipe
/// or the first fork cannot be made. Failures after the fork are reported through the pipe.
pub fn daemonize(pidfile: &Pidfile, timeout: Duration) -> io::Result<Role> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!(
            "refusing to fork: the process already has {threads} threads"
        )));
    }
    let (read_end, write_end) = pipe()?;
    // SAFETY: the process has one thread (checked above), so the child is a full copy.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(read_end);
            Ok(Role::Daemon(become_daemon(write_end)))
        }
        middle => {
            drop(write_end);
            Ok(Role::Parent(wait_for_daemon(
                read_end, middle, pidfile, timeout,
            )))
        }
    }
}

/// In the first child: new session, second fork, and the grandchild's set-up. Only the
/// grandchild returns.
fn become_daemon(write_end: File) -> ReadyPipe {
    let pipe = ReadyPipe {
        pipe: RefCell::new(Some(write_end)),
    };
    // SAFETY: plain system calls in a single-threaded process.
    unsafe {
        if libc::setsid() < 0 {
            die(&pipe, "setsid");
        }
        match libc::fork() {
            -1 => die(&pipe, "fork"),
            0 => {}
            _ => libc::_exit(0),
        }
        // The grandchild: not a session leader, so it can never acquire a terminal.
        libc::umask(0o022);
        if libc::chdir(c"/".as_ptr()) != 0 {
            die(&pipe, "chdir /");
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null < 0 {
            die(&pipe, "open /dev/null");
        }
        for fd in 0..=2 {
            if libc::dup2(null, fd) < 0 {
                die(&pipe, "redirect stdio to /dev/null");
            }
        }
        if null > 2 {
            libc::close(null);
        }
    }
    pipe
}

/// Reports the last OS error of `what` through the pipe and leaves the forked process.
fn die(pipe: &ReadyPipe, what: &str) -> ! {
    pipe.fail(&format!(
        "cannot daemonize: {what}: {}",
        io::Error::last_os_error()
    ));
    // SAFETY: leaving a forked copy without running the parent's destructors.
    unsafe { libc::_exit(1) }
}

/// In the parent: reaps the middle process and waits for the daemon's message.
fn wait_for_daemon(
    mut read_end: File,
    middle: libc::pid_t,
    pidfile: &Pidfile,
    timeout: Duration,
) -> StartOutcome {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(middle, &mut status, 0) };
        if r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    let mut message = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return StartOutcome::NotReadyYet { pid: pidfile.pid() };
        }
        let mut pfd = libc::pollfd {
            fd: read_end.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        if r == 0 {
            continue;
        }
        match read_end.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => message.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&message);
    if text.starts_with("ready\n") {
        StartOutcome::Ready
    } else if let Some(error) = text.strip_prefix("error\n") {
        StartOutcome::Failed(error.trim_end().to_owned())
    } else {
        StartOutcome::Vanished
    }
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

// ---------------------------------------------------------------------------------------
// systemd notification.

/// Reads and unsets `NOTIFY_SOCKET`, so that children (diskimage-builder) do not see it.
///
/// CAUTION: call it first thing in `main`, while the process has one thread: changing the
/// environment races with other threads reading it.
pub fn take_notify_socket() -> Option<OsString> {
    let socket = std::env::var_os(NOTIFY_SOCKET_ENV).filter(|s| !s.is_empty())?;
    // SAFETY: single-threaded at this point (see above).
    unsafe { std::env::remove_var(NOTIFY_SOCKET_ENV) };
    Some(socket)
}

/// Reads and unsets `WATCHDOG_USEC` and `WATCHDOG_PID`: the watchdog interval systemd
/// asked for, if any and if meant for this process (`WATCHDOG_PID` unset or our pid).
///
/// CAUTION: like [`take_notify_socket`], call it while the process has one thread.
pub fn take_watchdog() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    // SAFETY: single-threaded at this point (see above).
    unsafe {
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
    }
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec))
}

/// Sends `state` (e.g. `READY=1`) to systemd's notification socket: a path, or an abstract
/// socket name when it starts with `@`.
pub fn notify(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(Path::new(socket))?,
    };
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}
