//! The one place that starts threads.
//!
//! Every thread of the daemon is started by [`spawn`], which:
//!
//! * makes the call site say what the thread is for ([`ThreadKind`] has no default);
//! * sets the OS thread name, so `top -H`, `/proc/<pid>/task/*/comm`, gdb, the log format
//!   and the SIGUSR2 stack dump all show the same name;
//! * registers the thread in `registry` before the closure runs and deregisters it in a
//!   drop guard afterwards, also when the closure panics;
//! * returns a [`JoinHandle`] that joins when dropped, so a thread cannot be forgotten by
//!   accident. A thread that really must outlive its handle (an upload, which shutdown does
//!   not wait for, as upstream) says so at the call site with [`JoinHandle::detach`].
//!
//! `clippy.toml` forbids `std::thread::spawn` and `std::thread::Builder::spawn` everywhere,
//! and `tests/tidy.rs` checks the same by a text scan; only this file is allowed to use them.
//!
//! # Names
//!
//! Linux keeps at most 15 bytes of a thread name. Names are therefore short and conventional. The
//! daemon's threads: `main`, `signals`, `stackdump`, `zk-session` (the session supervisor),
//! `zk-hooks` (new-session hooks), `zk-events` (watch forwarding), `zk-watch` (the image tree
//! watcher), `scheduler`, `build-0`…, `upload-0`…, `cleanup`, `progress`, `watchdog` (under
//! systemd's watchdog), `webapp` (the HTTP endpoint, when configured), `ebs-put-0`… (block writers
//! of an aws upload while it runs), and per running child process `dib-out-0`… (its log) or
//! `cmd-out-0`… (captured output). A longer name is a bug: it panics in debug builds and is cut at
//! a character boundary in release builds, so that the registered name always equals the kernel's.
//!
//! # Hazards
//!
//! * CAUTION: dropping a [`JoinHandle`] blocks until the thread ends. Drop handles in the
//!   order of the shutdown protocol (stop the thread's input first, for example by dropping
//!   the sender of its job channel, then its handle), or the drop waits forever.
//! * A handle dropped on its own thread (it was moved into the thread's closure) cannot join
//!   itself; it detaches instead of deadlocking.
//! * A panic in a thread is logged by the hook of [`install_panic_hook`] when it happens. A
//!   handle dropped without `join` only logs that the thread had panicked; it does not
//!   re-raise the panic, because a panic inside `Drop` during unwinding would abort.
//! * The panic hook logs through the `log` facade. A panic inside the logger itself would
//!   re-enter it; the hook is kept to one record so that the re-entry stays shallow.

use std::fmt;
use std::io;
use std::panic;
use std::sync::Once;

use crate::registry;

/// The longest thread name Linux keeps, in bytes.
pub const MAX_THREAD_NAME_LEN: usize = 15;

/// What a thread is for. There is deliberately no `Default`: every spawn names its purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// Forwards process signals (TERM, INT, HUP) to the scheduler.
    Signals,
    /// Runs SIGUSR2 stack dumps.
    StackDump,
    /// Supervises the ZooKeeper session.
    ZkSession,
    /// Turns ZooKeeper watch events into messages for the scheduler.
    ZkEvents,
    /// Owns the scheduling state and runs the one event loop.
    Scheduler,
    /// Runs diskimage-builder for one build at a time.
    Build,
    /// Uploads one image to one provider at a time.
    Upload,
    /// The janitor: deletes old builds and uploads.
    Cleanup,
    /// Logs the progress of running builds and uploads (`progress`).
    Progress,
    /// Feeds systemd's watchdog while the scheduler loop turns (`watchdog`).
    Watchdog,
    /// Drains a child process's stdout and stderr into a log or into memory.
    PipeReader,
    /// Serves the HTTP endpoint (`/metrics`, `/healthz`, ...).
    Webapp,
    /// Writes snapshot blocks during one aws `ebs-direct` upload (`ebs-put-N`).
    BlockWriter,
    /// Anything else, including tests.
    Other,
}

impl ThreadKind {
    /// The kind as it appears in the registry and in stack dumps, e.g. `zk-events`.
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Signals => "signals",
            ThreadKind::StackDump => "stackdump",
            ThreadKind::ZkSession => "zk-session",
            ThreadKind::ZkEvents => "zk-events",
            ThreadKind::Scheduler => "scheduler",
            ThreadKind::Build => "build",
            ThreadKind::Upload => "upload",
            ThreadKind::Cleanup => "cleanup",
            ThreadKind::Progress => "progress",
            ThreadKind::Watchdog => "watchdog",
            ThreadKind::PipeReader => "pipe-reader",
            ThreadKind::Webapp => "webapp",
            ThreadKind::BlockWriter => "ebs-put",
            ThreadKind::Other => "other",
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Starts a named, registered thread running `f`.
///
/// Panics if the operating system refuses to create the thread, like `std::thread::spawn`;
/// use [`try_spawn`] where that must be handled. See the module documentation for names.
pub fn spawn<F, T>(kind: ThreadKind, name: impl Into<String>, f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.into();
    match try_spawn(kind, name.clone(), f) {
        Ok(handle) => handle,
        Err(error) => panic!("failed to spawn thread {name:?}: {error}"),
    }
}

/// Like [`spawn`], but returns the operating system's error instead of panicking.
pub fn try_spawn<F, T>(kind: ThreadKind, name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = os_thread_name(name.into());
    let registered_name = name.clone();
    let builder = std::thread::Builder::new().name(name.clone());
    #[allow(clippy::disallowed_methods)] // This is the one sanctioned spawn.
    let inner = builder.spawn(move || {
        // The guard deregisters when `f` returns and while it unwinds from a panic.
        let _registration = registry::register_current_thread_as(&registered_name, kind.as_str());
        f()
    })?;
    Ok(JoinHandle {
        inner: Some(inner),
        name,
    })
}

/// A handle to a thread started by [`spawn`]; joins the thread when dropped.
#[must_use = "dropping a JoinHandle joins the thread at once; call detach() to let it run"]
pub struct JoinHandle<T> {
    /// `None` once joined or detached.
    inner: Option<std::thread::JoinHandle<T>>,
    name: String,
}

impl<T> JoinHandle<T> {
    /// Waits for the thread and returns its result, or the panic payload if it panicked.
    ///
    /// Joining the calling thread itself would deadlock; that returns an error instead.
    pub fn join(mut self) -> std::thread::Result<T> {
        let inner = self
            .inner
            .take()
            .expect("a JoinHandle is joined at most once");
        if inner.thread().id() == std::thread::current().id() {
            let message = format!("thread {:?} cannot join itself", self.name);
            return Err(Box::new(message));
        }
        inner.join()
    }

    /// Lets the thread run on without anyone joining it.
    ///
    /// Use it only for threads that must outlive their owner, and say why at the call site.
    pub fn detach(mut self) {
        // Dropping a std handle detaches the thread.
        drop(self.inner.take());
    }

    /// The thread's name, as registered and as the OS shows it.
    pub fn thread_name(&self) -> &str {
        &self.name
    }

    /// Returns whether the thread has finished running its closure.
    pub fn is_finished(&self) -> bool {
        self.inner.as_ref().is_none_or(|inner| inner.is_finished())
    }
}

impl<T> fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        if inner.thread().id() == std::thread::current().id() {
            log::debug!("thread {:?} dropped its own handle; detaching", self.name);
            return;
        }
        if inner.join().is_err() {
            log::error!(
                "thread {:?} had panicked (found when its handle was dropped)",
                self.name
            );
        }
    }
}

/// Installs a panic hook that logs every panic, with the thread's name, through `log::error!`
/// and then runs the previously installed hook (which prints to stderr).
///
/// Call it once, right after the logger is initialized; later calls do nothing.
pub fn install_panic_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let current = std::thread::current();
            let name = current.name().unwrap_or("<unnamed>");
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("<non-string panic payload>");
            match info.location() {
                Some(location) => log::error!("thread {name:?} panicked at {location}: {message}"),
                None => log::error!("thread {name:?} panicked: {message}"),
            }
            previous(info);
        }));
    });
}

/// Checks a thread name against the kernel's limit; see the module documentation.
fn os_thread_name(mut name: String) -> String {
    if name.len() > MAX_THREAD_NAME_LEN {
        if cfg!(debug_assertions) {
            panic!(
                "thread name {name:?} is {} bytes; Linux keeps at most {MAX_THREAD_NAME_LEN}",
                name.len()
            );
        }
        let mut end = MAX_THREAD_NAME_LEN;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}
