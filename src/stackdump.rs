//! SIGUSR2 stack dump of every registered thread.
//!
//! `kill -USR2 <pid>` makes nodepool log the stack of every thread, to find deadlocks and
//! slow threads. We do the same with real, symbolized native stacks. The mechanism follows
//! `shared/docs/stackdump.md` §3, which also records why the alternatives were rejected and
//! which pitfalls were hit; read it before changing anything here.
//!
//! # Overview
//!
//! 1. The SIGUSR2 handler writes one byte to a non-blocking self-pipe and returns. It saves
//!    and restores `errno` and does nothing else.
//! 2. The `stackdump` thread (started by [`install`]) waits for that pipe to turn readable
//!    and then drains it completely before dumping: every signal that arrived since the last
//!    dump, one or a thousand, gives one dump, as nodepool ignores SIGUSR2 while it dumps. A
//!    storm of signals therefore costs one dump per dump duration, not one per signal (an
//!    earlier version read 64 bytes per wake-up: 1,000 signals 100 µs apart gave 17 dumps,
//!    seconds of stack walking). Each wake-up runs [`log_dump`] inside `catch_unwind`, so a
//!    bug in the formatting path cannot silently end the feature.
//! 3. The dump arms the capture slot of every registered thread (see `registry.rs`) and sends
//!    it the *capture signal* (SIGURG by default) with `pthread_kill`.
//! 4. On each target, the capture handler walks its own stack with
//!    `backtrace::trace_unsynchronized` and stores raw instruction pointers into its slot.
//! 5. The dumper waits for the answers (with a deadline), trims the handler's own frames,
//!    symbolizes with `backtrace::resolve` and logs one record per thread on the target
//!    `nodepool.stack_dump`, followed by the threads we know only from `/proc/self/task`
//!    (for example the ZooKeeper client's executor threads).
//!
//! [`capture`] runs steps 3 to 5 without logging, for tests and other in-process callers.
//!
//! # Log level
//!
//! nodepool logs the dump at DEBUG, so with its default INFO logging a SIGUSR2 shows nothing.
//! An operator who sends SIGUSR2 wants the dump, so here the level is chosen per dump by
//! [`dump_level`]: the configured level (DEBUG) when the filter enables it for
//! [`LOG_TARGET`], otherwise INFO under the same target. Only a filter that switches the
//! target off below INFO (`nodepool.stack_dump=off` or `warn`) gets no dump, and one warning
//! naming the variable that turns it on (`NODEPOOL_BUILDER_LOG`).
//!
//! # Hazards
//!
//! * CAUTION: the capture handler runs in async-signal context on an arbitrary instruction
//!   of the target thread, possibly inside malloc or while holding any lock. It may only
//!   read a `const` thread-local, use atomics, call `std::thread::panicking()` and walk the
//!   stack with `_Unwind_Backtrace` (through `trace_unsynchronized`, which takes no lock and
//!   allocates nothing). No logging, formatting, allocation or locks. Its closure must not
//!   panic either: a panic there aborts the process.
//! * CAUTION: the handler declines while its thread is panicking. libgcc's unwinder faults
//!   when a signal lands in `uw_install_context_1`, in the middle of `_Unwind_RaiseException`
//!   (stackdump.md, pitfall 2). The dumper re-asks such a thread every 5 ms until the
//!   deadline and then reports "thread is panicking".
//! * The handler relies on `_Unwind_Find_FDE` taking the lock-free `_dl_find_object` path
//!   (glibc 2.35 or newer, libgcc 12 or newer). On older systems it falls back to
//!   `dl_iterate_phdr` and can deadlock against a thread inside `dlopen`. The `backtrace`
//!   crate is pinned with `=` in `Cargo.toml`: re-read its `src/backtrace/libunwind.rs` when
//!   upgrading it.
//! * No signal mask is changed anywhere. `std::process::Command` does not reset the signal
//!   mask of children, so a blocked SIGUSR2 would leak into diskimage-builder and every other
//!   child (stackdump.md, pitfall 1). A thread that blocks the capture signal on its own is
//!   reported as not answering, with its `/proc` state, wchan and syscall.
//! * The capture signal interrupts blocking system calls. `SA_RESTART` restarts most of
//!   them, but `poll` and reads on sockets with a timeout return `EINTR` once per dump, so
//!   every raw read or poll loop of a registered thread must retry on
//!   `ErrorKind::Interrupted`.
//! * CAUTION: `pthread_kill` is called while the registry lock is held, so the target cannot
//!   finish deregistering and its `pthread_t` cannot go stale (see `registry.rs`).
//! * The dumper never calls `dladdr` (it takes the loader lock and could hang behind a thread
//!   wedged in `dlopen`); addresses without a symbol are described from `/proc/self/maps`.
//!   backtrace-rs scans the loaded libraries with `dl_iterate_phdr` on its first `resolve`,
//!   so the `stackdump` thread does one `resolve` at start-up to keep that out of dumps.
//! * CAUTION: install order matters, see [`install`]. A SIGUSR2 that arrives before
//!   `install` kills the process (the default action), as in nodepool before its handler is
//!   set: call `install` first thing in `main`, after the logger.
//! * One dump runs at a time (`DUMP_LOCK`); concurrent callers of [`capture`] queue.

use std::ffi::c_void;
use std::fmt::Write as _;
use std::io;
use std::panic;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::registry::{self, DONE, IDLE, MAX_FRAMES, REQUESTED, Slot, ThreadState, WRITING};
use crate::thread::{self, ThreadKind};

/// The log target of every dump record, as in nodepool.
pub const LOG_TARGET: &str = "nodepool.stack_dump";

/// Settings of [`install`].
#[derive(Clone, Debug)]
pub struct Config {
    /// The signal sent to each thread to make it record its stack. SIGURG by default: its
    /// default action is to ignore, debuggers pass it silently, and libc does not use it.
    /// `libc::SIGRTMIN() + n` works too (compute real-time numbers at run time); SIGUSR1 would
    /// too, but the daemon uses it to reopen its log files (`signals`).
    pub capture_signal: i32,
    /// How long a dump waits for all threads to answer.
    pub timeout: Duration,
    /// The level of the dump records; DEBUG as in nodepool.
    pub level: log::Level,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            capture_signal: libc::SIGURG,
            timeout: Duration::from_millis(500),
            level: log::Level::Debug,
        }
    }
}

/// The stack of one registered thread, symbolized.
#[derive(Clone, Debug)]
pub struct ThreadStack {
    /// The kernel thread id.
    pub tid: i32,
    /// The registered (and OS) thread name.
    pub name: String,
    /// The registered kind, e.g. `build`.
    pub kind: String,
    /// The activity breadcrumb at capture time, `None` when idle.
    pub activity: Option<String>,
    /// When the breadcrumb was set.
    pub activity_since: Option<SystemTime>,
    /// When the thread registered.
    pub registered_at: Instant,
    /// One line per frame, innermost first, inlined frames included: the address (or
    /// `(inlined)`), the function and, where debug info has it, `file:line`. Marker lines
    /// start with `...` (repeated frames, truncation).
    pub frames: Vec<String>,
    /// Why there is no stack (or only part of one), e.g. "no answer within 500ms (...)" or
    /// "thread is panicking (...)".
    pub note: Option<String>,
}

/// Installs the SIGUSR2 stack dump: capture handler, self-test, pipe, `stackdump` thread and
/// finally the SIGUSR2 handler.
///
/// Call it once, early in `main`, right after the logger, before other threads exist. It
/// fails if it was already called, if the capture signal is unusable (SIGUSR2 itself, a
/// fault signal, out of range), if the capture signal is blocked in the calling thread, or
/// if a stack cannot be walked from a signal handler on this platform.
///
/// CAUTION: the order is deliberate. The capture handler and its self-test come first, so
/// that a platform where unwinding from a handler fails is refused before anything depends
/// on it; the self-test also runs libgcc's one-time initialization outside of any real dump.
/// The SIGUSR2 handler comes last, so that the pipe has a reader before its first byte.
pub fn install(cfg: Config) -> io::Result<()> {
    let signal = cfg.capture_signal;
    check_capture_signal(signal)?;
    let _serialized = lock_ignoring_poison(&INSTALL_LOCK);
    if INSTALLED.get().is_some() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the stack dump is already installed",
        ));
    }

    // 1. The capture handler.
    let previous = set_handler(signal, capture_handler as *const () as usize, true)?;
    if previous.sa_sigaction != libc::SIG_DFL && previous.sa_sigaction != libc::SIG_IGN {
        log::warn!("stack dump: replacing an existing handler of capture signal {signal}");
    }

    // 2. Self-test and warm-up, synchronously on this thread.
    if let Err(error) = self_test(signal) {
        // SAFETY: restoring the disposition sigaction gave us.
        unsafe { libc::sigaction(signal, &previous, std::ptr::null_mut()) };
        return Err(error);
    }

    // 3. The self-pipe, non-blocking at both ends: the handler must never block, and the
    //    reader drains it until it would block (it sleeps in poll, not in read).
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let [read_fd, write_fd] = fds;

    let _ = INSTALLED.set(Installed {
        capture_signal: signal,
        timeout: cfg.timeout,
        level: cfg.level,
    });

    // 4. The `stackdump` thread. It runs until the process exits, so it is detached.
    let handle = thread::try_spawn(ThreadKind::StackDump, "stackdump", move || {
        dumper_main(read_fd)
    })?;
    handle.detach();

    // 5. SIGUSR2 last: from now on a SIGUSR2 wakes the reader instead of killing us.
    PIPE_WRITE_FD.store(write_fd, Ordering::SeqCst);
    set_handler(libc::SIGUSR2, usr2_handler as *const () as usize, false)?;
    log::debug!("stack dump installed: SIGUSR2 logs every thread's stack on {LOG_TARGET}");
    Ok(())
}

/// Captures the stack of every registered thread now, symbolized; logs nothing.
///
/// The calling thread may be registered or not. If [`install`] has not run, every thread is
/// returned without frames and with a note saying so.
pub fn capture() -> Vec<ThreadStack> {
    capture_timed().stacks
}

/// At which level a requested dump is logged (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpLevel {
    /// The configured level is enabled for [`LOG_TARGET`].
    Configured(log::Level),
    /// The configured level is not, but INFO is: the dump is logged at INFO.
    Fallback(log::Level),
    /// Not even INFO is enabled for [`LOG_TARGET`]: no dump, one warning.
    Off,
}

/// Chooses the level of a dump: `configured` if `enabled` says so, else INFO if `configured`
/// is more verbose than INFO and INFO is enabled, else [`DumpLevel::Off`].
pub fn dump_level(configured: log::Level, enabled: impl Fn(log::Level) -> bool) -> DumpLevel {
    if enabled(configured) {
        DumpLevel::Configured(configured)
    } else if configured > log::Level::Info && enabled(log::Level::Info) {
        DumpLevel::Fallback(log::Level::Info)
    } else {
        DumpLevel::Off
    }
}

/// Runs one dump and logs it on [`LOG_TARGET`]; this is what SIGUSR2 triggers.
///
/// The level comes from [`dump_level`]. If the target is switched off, logs one warning
/// instead (an operator who sends SIGUSR2 and sees nothing should learn why).
pub fn log_dump() {
    let Some(installed) = INSTALLED.get() else {
        log::warn!("stack dump requested, but stackdump::install() has not been called");
        return;
    };
    let configured = installed.level;
    let level = match dump_level(
        configured,
        |level| log::log_enabled!(target: LOG_TARGET, level),
    ) {
        DumpLevel::Configured(level) | DumpLevel::Fallback(level) => level,
        DumpLevel::Off => {
            log::warn!(
                "stack dump requested, but log target {LOG_TARGET} is switched off; \
                 enable it, e.g. {}=info,{LOG_TARGET}={} or the logger's level in the -l \
                 logging config",
                crate::logging::LOG_ENV,
                configured.as_str().to_ascii_lowercase()
            );
            DUMPS.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let dump = capture_timed();
    let log_started = Instant::now();
    log::log!(target: LOG_TARGET, level, "Beginning debug handler");
    for stack in &dump.stacks {
        log::log!(target: LOG_TARGET, level, "{}", format_thread(stack));
    }
    log::log!(target: LOG_TARGET, level, "{}", format_unregistered(&dump.unregistered));
    let log_time = log_started.elapsed();
    log::log!(target: LOG_TARGET, level, "{}", format_end(&dump, Some(log_time)));
    // Give back the parsed debug info (see dumper_main); the next dump parses it again.
    release_symbols();
    DUMPS.fetch_add(1, Ordering::Relaxed);
}

/// Captures and formats a dump exactly as [`log_dump`] would log it, one string per log
/// record, without logging (the end line reports the log time as `-`).
pub fn render_dump() -> Vec<String> {
    let dump = capture_timed();
    let mut records = Vec::with_capacity(dump.stacks.len() + 3);
    records.push("Beginning debug handler".to_owned());
    records.extend(dump.stacks.iter().map(format_thread));
    records.push(format_unregistered(&dump.unregistered));
    records.push(format_end(&dump, None));
    records
}

/// How many SIGUSR2 dumps (or refusals because the log target is off) have completed.
pub fn dumps_completed() -> u64 {
    DUMPS.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------
// Process-wide state.

struct Installed {
    capture_signal: i32,
    timeout: Duration,
    level: log::Level,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();
static INSTALL_LOCK: Mutex<()> = Mutex::new(());
/// One dump at a time; slots are armed only while this is held.
static DUMP_LOCK: Mutex<()> = Mutex::new(());
/// The self-pipe's write end for the SIGUSR2 handler; -1 until installed.
static PIPE_WRITE_FD: AtomicI32 = AtomicI32::new(-1);
static DUMPS: AtomicU64 = AtomicU64::new(0);

/// Deadline before which a thread that answered "panicking" is asked again.
const PANIC_RETRY_INTERVAL: Duration = Duration::from_millis(5);
/// No new retry is started with less than this left before the deadline.
const PANIC_RETRY_MARGIN: Duration = Duration::from_millis(25);
/// How long a handler that has started writing gets to finish after the deadline.
const WRITING_GRACE: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------
// Signal handlers. CAUTION: async-signal context; see the module documentation.

/// The SIGUSR2 handler: one byte into the self-pipe.
extern "C" fn usr2_handler(_signal: libc::c_int) {
    // SAFETY: __errno_location and write are async-signal-safe; errno is restored so the
    // interrupted code does not see our write's result.
    unsafe {
        let errno = *libc::__errno_location();
        let fd = PIPE_WRITE_FD.load(Ordering::Relaxed);
        if fd >= 0 {
            // A full pipe (EAGAIN) means a dump is already pending; that is fine.
            libc::write(fd, b"!".as_ptr().cast(), 1);
        }
        *libc::__errno_location() = errno;
    }
}

/// The capture handler: records the interrupted thread's raw stack into its slot.
extern "C" fn capture_handler(
    _signal: libc::c_int,
    _info: *mut libc::siginfo_t,
    context: *mut c_void,
) {
    // SAFETY: see the function body; everything here is async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let state = registry::current_state_ptr();
        if !state.is_null() {
            record_stack(&(*state).slot, context);
        }
        *libc::__errno_location() = errno;
    }
}

/// The body of the capture handler, for a registered thread.
///
/// # Safety
///
/// Must run in the capture handler, on the thread that owns `slot`; `context` is the
/// handler's `ucontext_t` argument.
unsafe fn record_stack(slot: &Slot, context: *mut c_void) {
    // Only a requested capture is served; a late or spurious signal finds another state.
    if slot
        .state
        .compare_exchange(REQUESTED, WRITING, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    if std::thread::panicking() {
        // Walking now could fault inside libgcc (pitfall 2); the dumper asks again later.
        slot.panicking.store(true, Ordering::Relaxed);
        slot.len.store(0, Ordering::Relaxed);
        slot.truncated.store(false, Ordering::Relaxed);
        slot.pc.store(0, Ordering::Relaxed);
        slot.state.store(DONE, Ordering::Release);
        return;
    }
    slot.panicking.store(false, Ordering::Relaxed);
    // SAFETY: context comes from the kernel's signal frame.
    slot.pc
        .store(unsafe { interrupted_pc(context) }, Ordering::Relaxed);
    let mut len = 0;
    let mut truncated = false;
    // SAFETY: the closure allocates nothing, takes no lock and cannot panic.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            let ip = frame.ip() as usize;
            if ip == 0 {
                return false; // The outermost frame; later arithmetic must not see it.
            }
            match slot.frames.get(len) {
                Some(cell) => {
                    cell.store(ip, Ordering::Relaxed);
                    len += 1;
                    true
                }
                None => {
                    truncated = true;
                    false
                }
            }
        });
    }
    slot.len.store(len, Ordering::Relaxed);
    slot.truncated.store(truncated, Ordering::Relaxed);
    slot.state.store(DONE, Ordering::Release);
}

/// The program counter at which the signal interrupted the thread, or 0 if unknown.
///
/// # Safety
///
/// `context` must be null or the `ucontext_t` passed to an `SA_SIGINFO` handler.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
unsafe fn interrupted_pc(context: *mut c_void) -> usize {
    if context.is_null() {
        return 0;
    }
    // SAFETY: the caller passes the kernel's ucontext_t.
    unsafe {
        (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RIP as usize] as usize
    }
}

/// The program counter at which the signal interrupted the thread, or 0 if unknown.
///
/// # Safety
///
/// `context` must be null or the `ucontext_t` passed to an `SA_SIGINFO` handler.
#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
unsafe fn interrupted_pc(context: *mut c_void) -> usize {
    if context.is_null() {
        return 0;
    }
    // SAFETY: the caller passes the kernel's ucontext_t.
    unsafe { (*context.cast::<libc::ucontext_t>()).uc_mcontext.pc as usize }
}

/// Without a known program counter, the handler's frames are not trimmed.
///
/// # Safety
///
/// Always safe; `unsafe` only to match the other targets.
#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
unsafe fn interrupted_pc(_context: *mut c_void) -> usize {
    0
}

// ---------------------------------------------------------------------------------------
// Installation helpers.

fn check_capture_signal(signal: i32) -> io::Result<()> {
    let forbidden = [
        (libc::SIGUSR2, "it is the dump trigger"),
        (libc::SIGKILL, "it cannot be caught"),
        (libc::SIGSTOP, "it cannot be caught"),
        (libc::SIGSEGV, "it reports faults"),
        (libc::SIGBUS, "it reports faults"),
        (libc::SIGILL, "it reports faults"),
        (libc::SIGFPE, "it reports faults"),
        (libc::SIGTRAP, "debuggers use it"),
        (libc::SIGCHLD, "it reports child processes"),
    ];
    if signal < 1 || signal > libc::SIGRTMAX() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("capture signal {signal} is not a valid signal number"),
        ));
    }
    if let Some((_, why)) = forbidden.iter().find(|(s, _)| *s == signal) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("signal {signal} cannot be the capture signal: {why}"),
        ));
    }
    Ok(())
}

/// Installs `handler` for `signal` with an empty mask and `SA_RESTART` (plus `SA_SIGINFO`
/// when `siginfo`); returns the previous disposition.
///
/// `libc::sigaction` rather than nix, so that real-time signal numbers work too.
fn set_handler(signal: i32, handler: usize, siginfo: bool) -> io::Result<libc::sigaction> {
    // SAFETY: an all-zero sigaction is valid; every field we rely on is set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler;
    action.sa_flags = libc::SA_RESTART | if siginfo { libc::SA_SIGINFO } else { 0 };
    // SAFETY: plain calls on local structs.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, &mut previous) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(previous)
}

/// Captures the calling thread's stack through the handler, which must work for `install`.
fn self_test(signal: i32) -> io::Result<()> {
    // The calling thread needs a slot; borrow its registration or make a short one.
    let (state, _temporary) = match registry::current_state() {
        Some(state) => (state, None),
        None => {
            let registration = registry::register_current_thread_as("stackdump-test", "other");
            let state = registry::current_state().expect("registered just now");
            (state, Some(registration))
        }
    };
    let raw = match capture_self(&state, signal) {
        Ok(raw) => raw,
        Err(why) => {
            return Err(io::Error::other(format!(
                "stack dump self-test failed: {why}"
            )));
        }
    };
    if raw.ips.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "stack dump self-test failed: walking the stack from a signal handler found no frames",
        ));
    }
    if raw.pc != 0 && !raw.ips.contains(&raw.pc) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "stack dump self-test failed: the unwinder did not get past the signal frame",
        ));
    }
    Ok(())
}

/// Drops the symbolizer's parsed objects (the list of loaded libraries stays) and returns the
/// freed memory to the kernel.
fn release_symbols() {
    backtrace::clear_symbol_cache();
    // SAFETY: malloc_trim only walks glibc's own heap under its own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the `stackdump` thread found in the self-pipe on one wake-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    /// This many SIGUSR2 arrived since the last wake-up (at least one); all were consumed.
    Requested(usize),
    /// The write end is closed: nothing more can arrive.
    Closed,
}

/// Sleeps until the self-pipe (non-blocking read end) is readable, then reads everything in
/// it, so that all the signals that arrived meanwhile make one dump.
fn wait_and_drain(read_fd: i32) -> io::Result<Wake> {
    let mut buffer = [0u8; 256];
    loop {
        let mut pollfd = libc::pollfd {
            fd: read_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pollfd, 1, -1) } < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        let mut requested = 0;
        loop {
            // SAFETY: reading into a local buffer from our own descriptor.
            let n = unsafe { libc::read(read_fd, buffer.as_mut_ptr().cast(), buffer.len()) };
            if n > 0 {
                requested += n as usize;
                continue;
            }
            if n == 0 {
                return Ok(match requested {
                    0 => Wake::Closed,
                    _ => Wake::Requested(requested),
                });
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => break,
                _ => return Err(error),
            }
        }
        // Drained; nothing at all was a spurious wake-up, which waits again.
        if requested > 0 {
            return Ok(Wake::Requested(requested));
        }
    }
}

/// The `stackdump` thread: one dump per wake-up, however many signals it drained.
fn dumper_main(read_fd: i32) {
    // No symbolizer warm-up: the first resolve lists the loaded objects (dl_iterate_phdr,
    // under the loader lock) and parses debug info, which costs tens of MiB of peak RSS
    // (more with libc's debug package installed). A daemon that keeps a few MiB resident
    // pays that at its first dump instead, and gives the memory back after every dump.
    loop {
        match wait_and_drain(read_fd) {
            Ok(Wake::Requested(signals)) => {
                if signals > 1 {
                    log::debug!("{signals} SIGUSR2 since the last dump: one dump for them all");
                }
            }
            // The write end is never closed; nothing more can arrive.
            Ok(Wake::Closed) => return,
            Err(error) => {
                log::error!("stack dump disabled: reading the SIGUSR2 pipe failed: {error}");
                return;
            }
        }
        if let Err(payload) = panic::catch_unwind(log_dump) {
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("<non-string panic payload>");
            log::error!("stack dump failed (the next SIGUSR2 tries again): {message}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Capturing.

/// A stack as the handler recorded it.
struct RawStack {
    pc: usize,
    ips: Vec<usize>,
    truncated: bool,
}

/// What a dump found, before formatting.
struct Dump {
    stacks: Vec<ThreadStack>,
    unregistered: Vec<(i32, String)>,
    capture_time: Duration,
    symbolize_time: Duration,
}

/// One registered thread during a capture.
struct Target {
    tid: i32,
    name: String,
    kind: String,
    registered_at: Instant,
    activity: Option<(String, SystemTime)>,
    state: Arc<ThreadState>,
    pthread: libc::pthread_t,
    /// The stack or the reason there is none, once known.
    outcome: Option<Result<RawStack, String>>,
    /// The thread answered "panicking" at least once.
    saw_panicking: bool,
    /// When to ask a panicking thread again.
    retry_at: Option<Instant>,
}

fn capture_timed() -> Dump {
    let _one_at_a_time = lock_ignoring_poison(&DUMP_LOCK);
    let started = Instant::now();
    let mut targets = arm_and_signal();
    let capture_time = started.elapsed();

    let symbolize_started = Instant::now();
    let mut maps = None;
    let stacks = targets
        .iter_mut()
        .map(|target| {
            let (frames, note) = match target.outcome.take() {
                Some(Ok(raw)) => symbolize(&raw, &mut maps),
                Some(Err(note)) => (Vec::new(), Some(note)),
                None => (Vec::new(), Some("no outcome (internal error)".to_owned())),
            };
            ThreadStack {
                tid: target.tid,
                name: target.name.clone(),
                kind: target.kind.clone(),
                activity_since: target.activity.as_ref().map(|(_, since)| *since),
                activity: target.activity.take().map(|(text, _)| text),
                registered_at: target.registered_at,
                frames,
                note,
            }
        })
        .collect::<Vec<_>>();
    let symbolize_time = symbolize_started.elapsed();

    let registered = stacks.iter().map(|stack| stack.tid).collect::<Vec<_>>();
    let unregistered = unregistered_threads(&registered);
    Dump {
        stacks,
        unregistered,
        capture_time,
        symbolize_time,
    }
}

/// Asks every registered thread for its stack and waits for the answers or the deadline.
fn arm_and_signal() -> Vec<Target> {
    let Some(installed) = INSTALLED.get() else {
        return registry::lock_registry()
            .iter()
            .map(|entry| {
                let mut target = target_of(entry);
                target.outcome = Some(Err("stackdump::install() has not been called".to_owned()));
                target
            })
            .collect();
    };
    let signal = installed.capture_signal;
    // SAFETY: gettid has no preconditions.
    let my_tid = unsafe { libc::gettid() };
    let started = Instant::now();
    let deadline = started + installed.timeout;

    let mut targets = Vec::new();
    let mut own = None;
    {
        // CAUTION: pthread_kill only while the registry lock is held (module documentation).
        let registry = registry::lock_registry();
        for entry in registry.iter() {
            let mut target = target_of(entry);
            if entry.tid == my_tid {
                own = Some(targets.len());
            } else if let Err(why) = arm(&entry.state.slot, entry.pthread, signal) {
                target.outcome = Some(Err(why));
            }
            targets.push(target);
        }
    }

    // Our own stack, through the same handler: a self-directed signal is delivered before
    // pthread_kill returns.
    if let Some(index) = own {
        let target = &mut targets[index];
        target.outcome = Some(capture_self(&target.state, signal).map_err(|why| why.to_owned()));
    }

    // Poll with a backoff from 20 µs to 2 ms until everyone answered or the deadline.
    let mut backoff = Duration::from_micros(20);
    loop {
        let now = Instant::now();
        let mut waiting = false;
        for target in targets.iter_mut().filter(|target| target.outcome.is_none()) {
            if let Some(retry_at) = target.retry_at {
                if now >= retry_at {
                    target.retry_at = None;
                    if let Err(why) = rearm(target, signal) {
                        target.outcome = Some(Err(why));
                        continue;
                    }
                }
                waiting = true;
                continue;
            }
            let slot = &target.state.slot;
            match slot.state.load(Ordering::Acquire) {
                DONE => match take(slot) {
                    Some(raw) => target.outcome = Some(Ok(raw)),
                    None => {
                        target.saw_panicking = true;
                        if deadline.saturating_duration_since(now) >= PANIC_RETRY_MARGIN {
                            target.retry_at = Some(now + PANIC_RETRY_INTERVAL);
                            waiting = true;
                        } else {
                            target.outcome = Some(Err(panicking_note(target.tid, signal)));
                        }
                    }
                },
                _ if target.state.exited.load(Ordering::Acquire) => {
                    let _ = slot.state.compare_exchange(
                        REQUESTED,
                        IDLE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    target.outcome = Some(Err("thread exited during the capture".to_owned()));
                }
                _ => waiting = true,
            }
        }
        if !waiting || now >= deadline {
            break;
        }
        std::thread::sleep(backoff.min(deadline.saturating_duration_since(now)));
        backoff = (backoff * 2).min(Duration::from_millis(2));
    }

    // Whoever has not answered by now gets a diagnosis instead of a stack.
    let timeout = installed.timeout;
    for target in targets.iter_mut().filter(|target| target.outcome.is_none()) {
        target.outcome = Some(settle_late(target, timeout, signal));
    }
    targets
}

fn target_of(entry: &registry::Entry) -> Target {
    Target {
        tid: entry.tid,
        name: entry.name.clone(),
        kind: entry.kind.clone(),
        registered_at: entry.registered_at,
        activity: entry.state.activity(),
        state: Arc::clone(&entry.state),
        pthread: entry.pthread,
        outcome: None,
        saw_panicking: false,
        retry_at: None,
    }
}

/// Arms a slot and sends the capture signal. The registry lock must be held.
fn arm(slot: &Slot, pthread: libc::pthread_t, signal: i32) -> Result<(), String> {
    // A slot left DONE by a handler that finished after an earlier deadline holds stale
    // frames; reclaim it.
    let _ = slot
        .state
        .compare_exchange(DONE, IDLE, Ordering::AcqRel, Ordering::Acquire);
    match slot
        .state
        .compare_exchange(IDLE, REQUESTED, Ordering::AcqRel, Ordering::Acquire)
    {
        // REQUESTED left behind by a dump that panicked: just signal again.
        Ok(_) | Err(REQUESTED) => {}
        Err(_) => {
            return Err("busy: an earlier stack walk of this thread never finished".to_owned());
        }
    }
    // SAFETY: the thread is registered and cannot deregister while we hold the registry
    // lock, so its pthread_t is valid.
    let rc = unsafe { libc::pthread_kill(pthread, signal) };
    if rc != 0 {
        let _ = slot
            .state
            .compare_exchange(REQUESTED, IDLE, Ordering::AcqRel, Ordering::Acquire);
        return Err(format!(
            "pthread_kill failed: {}",
            io::Error::from_raw_os_error(rc)
        ));
    }
    Ok(())
}

/// Asks a thread that answered "panicking" again, if it is still registered.
fn rearm(target: &Target, signal: i32) -> Result<(), String> {
    let registry = registry::lock_registry();
    if !registry
        .iter()
        .any(|entry| Arc::ptr_eq(&entry.state, &target.state))
    {
        return Err("thread exited during the capture".to_owned());
    }
    arm(&target.state.slot, target.pthread, signal)
}

/// Captures the calling thread's own stack through its capture handler.
fn capture_self(state: &ThreadState, signal: i32) -> Result<RawStack, &'static str> {
    let slot = &state.slot;
    let _ = slot
        .state
        .compare_exchange(DONE, IDLE, Ordering::AcqRel, Ordering::Acquire);
    if slot
        .state
        .compare_exchange(IDLE, REQUESTED, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Err("busy: an earlier stack walk of this thread never finished");
    }
    // SAFETY: signalling ourselves.
    let rc = unsafe { libc::pthread_kill(libc::pthread_self(), signal) };
    if rc == 0 && slot.state.load(Ordering::Acquire) == DONE {
        return take(slot).ok_or("thread is panicking (unwind in progress), stack not walked");
    }
    let _ = slot
        .state
        .compare_exchange(REQUESTED, IDLE, Ordering::AcqRel, Ordering::Acquire);
    if rc != 0 {
        Err("pthread_kill failed on the dumping thread itself")
    } else {
        Err("the capture signal is blocked in the dumping thread")
    }
}

/// Copies a DONE slot out and frees it; `None` if the thread answered "panicking".
fn take(slot: &Slot) -> Option<RawStack> {
    let raw = if slot.panicking.load(Ordering::Relaxed) {
        None
    } else {
        let len = slot.len.load(Ordering::Relaxed).min(MAX_FRAMES);
        Some(RawStack {
            pc: slot.pc.load(Ordering::Relaxed),
            ips: slot.frames[..len]
                .iter()
                .map(|ip| ip.load(Ordering::Relaxed))
                .collect(),
            truncated: slot.truncated.load(Ordering::Relaxed),
        })
    };
    slot.state.store(IDLE, Ordering::Release);
    raw
}

/// The outcome for a thread that did not answer before the deadline.
fn settle_late(target: &Target, timeout: Duration, signal: i32) -> Result<RawStack, String> {
    let slot = &target.state.slot;
    if target.retry_at.is_some() {
        return Err(panicking_note(target.tid, signal));
    }
    // Withdraw the request; a handler that runs later will find IDLE and do nothing.
    if slot
        .state
        .compare_exchange(REQUESTED, IDLE, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        if target.saw_panicking {
            return Err(panicking_note(target.tid, signal));
        }
        return Err(format!(
            "no answer within {timeout:?} ({})",
            proc_diagnosis(target.tid, signal)
        ));
    }
    // The handler is running (WRITING) or has just finished (DONE): give it a short grace.
    let grace_deadline = Instant::now() + WRITING_GRACE;
    while slot.state.load(Ordering::Acquire) == WRITING && Instant::now() < grace_deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    if slot.state.load(Ordering::Acquire) == DONE {
        return take(slot).ok_or_else(|| panicking_note(target.tid, signal));
    }
    // Leave the slot WRITING; the next dump reports it as busy instead of reusing it.
    Err(format!(
        "stack walk started but did not finish within {:?} ({})",
        timeout + WRITING_GRACE,
        proc_diagnosis(target.tid, signal)
    ))
}

fn panicking_note(tid: i32, signal: i32) -> String {
    format!(
        "thread is panicking (unwind in progress), stack not walked; {}",
        proc_diagnosis(tid, signal)
    )
}

/// What `/proc` says about a thread: state, whether it blocks the capture signal, wchan and
/// the current system call.
fn proc_diagnosis(tid: i32, signal: i32) -> String {
    let dir = format!("/proc/self/task/{tid}");
    let status = std::fs::read_to_string(format!("{dir}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_owned())
    };
    let mut text = format!(
        "state={}",
        field("State:").unwrap_or_else(|| "?".to_owned())
    );
    let blocked = field("SigBlk:").and_then(|mask| u64::from_str_radix(&mask, 16).ok());
    if (1..=64).contains(&signal) && blocked.is_some_and(|mask| mask & (1u64 << (signal - 1)) != 0)
    {
        text.push_str(", capture signal BLOCKED in this thread");
    }
    let wchan = std::fs::read_to_string(format!("{dir}/wchan")).unwrap_or_default();
    let wchan = wchan.trim();
    let _ = write!(
        text,
        ", wchan={}",
        if wchan.is_empty() { "?" } else { wchan }
    );
    let syscall = std::fs::read_to_string(format!("{dir}/syscall")).unwrap_or_default();
    let syscall = syscall
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let _ = write!(
        text,
        ", syscall={}",
        if syscall.is_empty() { "?" } else { &syscall }
    );
    text
}

/// Threads of this process that are not registered, as `(tid, comm)`, sorted by tid.
fn unregistered_threads(registered: &[i32]) -> Vec<(i32, String)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut threads = tasks
        .filter_map(|task| task.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|tid| !registered.contains(tid))
        .map(|tid| {
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                .map(|comm| comm.trim_end().to_owned())
                .unwrap_or_else(|_| "?".to_owned());
            (tid, comm)
        })
        .collect::<Vec<_>>();
    threads.sort();
    threads
}

// ---------------------------------------------------------------------------------------
// Symbolizing.

/// Turns a raw stack into frame lines, plus a note when the walk was incomplete.
fn symbolize(raw: &RawStack, maps: &mut Option<Vec<MapRange>>) -> (Vec<String>, Option<String>) {
    let mut note = None;
    // Drop the handler's own frames: everything before the interrupted PC.
    let (ips, exact_first): (&[usize], bool) = if raw.pc == 0 {
        (&raw.ips, false)
    } else if let Some(start) = raw.ips.iter().position(|&ip| ip == raw.pc) {
        (&raw.ips[start..], true)
    } else {
        note = Some(
            "the stack walk stopped at the signal frame; only the interrupted PC is known"
                .to_owned(),
        );
        (std::slice::from_ref(&raw.pc), true)
    };

    // Collapse direct recursion: runs of the same return address.
    let mut groups: Vec<(usize, usize)> = Vec::new();
    for &ip in ips {
        match groups.last_mut() {
            Some((last, count)) if *last == ip => *count += 1,
            _ => groups.push((ip, 1)),
        }
    }

    let mut frames = Vec::new();
    let mut cut = false;
    'groups: for (index, &(ip, count)) in groups.iter().enumerate() {
        // resolve() looks up ip - 1 (a return address points after its call). The
        // interrupted frame's PC is exact, so it is looked up as pc + 1.
        let lookup = if index == 0 && exact_first {
            ip.saturating_add(1)
        } else {
            ip
        };
        let symbols = resolve(lookup);
        if symbols.is_empty() {
            frames.push(format!("{ip:#018x} {}", describe_unknown(ip, maps)));
        }
        for (position, (name, location)) in symbols.iter().enumerate() {
            let address = if position == 0 {
                format!("{ip:#018x}")
            } else {
                format!("{:18}", "(inlined)")
            };
            let name = name.clone().unwrap_or_else(|| describe_unknown(ip, maps));
            let line = match location {
                Some(location) => format!("{address} {name} at {location}"),
                None => format!("{address} {name}"),
            };
            frames.push(line);
            // Like RUST_BACKTRACE=1: nothing below the thread's entry point is interesting.
            if name.contains("__rust_begin_short_backtrace") {
                cut = true;
                break 'groups;
            }
        }
        if count > 1 {
            frames.push(format!(
                "... previous frame repeated {} more times",
                count - 1
            ));
        }
    }
    if raw.truncated && !cut {
        frames.push(format!("... truncated at {MAX_FRAMES} frames"));
    }
    (frames, note)
}

/// The symbols at an address, innermost inlined frame first, as `(name, file:line)`.
fn resolve(address: usize) -> Vec<(Option<String>, Option<String>)> {
    let mut symbols = Vec::new();
    backtrace::resolve(address as *mut c_void, |symbol| {
        let name = symbol.name().map(|name| format!("{name:#}"));
        let location = symbol.filename().map(|file| match symbol.lineno() {
            Some(line) => format!("{}:{line}", short_path(file)),
            None => short_path(file),
        });
        symbols.push((name, location));
    });
    symbols
}

/// Shortens the paths debug info records: the toolchain's `/rustc/<hash>/`, the cargo
/// registry's `…/registry/src/<index>/` and this crate's directory are dropped.
fn short_path(path: &Path) -> String {
    let text = path.to_string_lossy();
    if let Some((_hash, rest)) = text
        .strip_prefix("/rustc/")
        .and_then(|rest| rest.split_once('/'))
    {
        return rest.to_owned();
    }
    if let Some(index) = text.find("/registry/src/") {
        let rest = &text[index + "/registry/src/".len()..];
        if let Some((_index_dir, rest)) = rest.split_once('/') {
            return rest.to_owned();
        }
    }
    if let Some(rest) = text.strip_prefix(concat!(env!("CARGO_MANIFEST_DIR"), "/")) {
        return rest.to_owned();
    }
    text.into_owned()
}

/// One mapping of `/proc/self/maps` with a file behind it.
struct MapRange {
    start: usize,
    end: usize,
    offset: usize,
    path: String,
}

/// `<unknown> in /path/lib.so+0xoffset` for an address without a symbol. Uses
/// `/proc/self/maps`, read at most once per dump, rather than `dladdr` (loader lock).
fn describe_unknown(ip: usize, maps: &mut Option<Vec<MapRange>>) -> String {
    let maps = maps.get_or_insert_with(read_maps);
    match maps
        .iter()
        .find(|range| range.start <= ip && ip < range.end)
    {
        Some(range) => format!(
            "<unknown> in {}+{:#x}",
            range.path,
            ip - range.start + range.offset
        ),
        None => "<unknown>".to_owned(),
    }
}

fn read_maps() -> Vec<MapRange> {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let _permissions = fields.next()?;
            let offset = fields.next()?;
            let _device = fields.next()?;
            let _inode = fields.next()?;
            let path = fields.collect::<Vec<_>>().join(" ");
            if path.is_empty() {
                return None;
            }
            Some(MapRange {
                start: usize::from_str_radix(start, 16).ok()?,
                end: usize::from_str_radix(end, 16).ok()?,
                offset: usize::from_str_radix(offset, 16).ok()?,
                path,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Formatting.

fn format_thread(stack: &ThreadStack) -> String {
    let mut record = format!(
        "Thread: {} {} ({}, registered {:.1?} ago)\n",
        stack.tid,
        stack.name,
        stack.kind,
        stack.registered_at.elapsed()
    );
    match (&stack.activity, stack.activity_since) {
        (Some(activity), Some(since)) => {
            let age = SystemTime::now().duration_since(since).unwrap_or_default();
            let _ = write!(
                record,
                "    activity: {activity}, since {} ({:.1?} ago)",
                local_hms(since),
                age
            );
        }
        (Some(activity), None) => {
            let _ = write!(record, "    activity: {activity}");
        }
        (None, _) => record.push_str("    activity: idle"),
    }
    let mut index = 0;
    for frame in &stack.frames {
        if frame.starts_with("...") {
            let _ = write!(record, "\n       {frame}");
        } else {
            let _ = write!(record, "\n{index:>5}: {frame}");
            index += 1;
        }
    }
    if let Some(note) = &stack.note {
        let verb = if stack.frames.is_empty() {
            "no stack"
        } else {
            "incomplete stack"
        };
        let _ = write!(record, "\n    <{verb}: {note}>");
    }
    record
}

fn format_unregistered(threads: &[(i32, String)]) -> String {
    let list = threads
        .iter()
        .map(|(tid, comm)| format!("({tid}, {comm:?})"))
        .collect::<Vec<_>>();
    format!("Unregistered threads (no stack): [{}]", list.join(", "))
}

fn format_end(dump: &Dump, log_time: Option<Duration>) -> String {
    let without_stack = dump
        .stacks
        .iter()
        .filter(|stack| stack.frames.is_empty())
        .count();
    let log_time = log_time.map_or_else(|| "-".to_owned(), |time| format!("{time:.1?}"));
    format!(
        "End debug handler: {} threads, {without_stack} without stack; capture {:.1?}, symbolize {:.1?}, log {log_time}",
        dump.stacks.len(),
        dump.capture_time,
        dump.symbolize_time,
    )
}

/// `HH:MM:SS` in local time.
fn local_hms(time: SystemTime) -> String {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs()) as libc::time_t;
    // SAFETY: localtime_r writes only into the struct we pass.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&seconds, &mut tm) }.is_null() {
        return format!("{seconds}s after the epoch");
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

fn lock_ignoring_poison<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::{DumpLevel, dump_level};
    use log::Level;

    #[test]
    fn a_dump_falls_back_to_info_and_is_off_only_below_it() {
        let up_to = |max: Option<Level>| move |level: Level| max.is_some_and(|max| level <= max);
        assert_eq!(
            dump_level(Level::Debug, up_to(Some(Level::Trace))),
            DumpLevel::Configured(Level::Debug)
        );
        assert_eq!(
            dump_level(Level::Debug, up_to(Some(Level::Info))),
            DumpLevel::Fallback(Level::Info)
        );
        assert_eq!(
            dump_level(Level::Debug, up_to(Some(Level::Warn))),
            DumpLevel::Off
        );
        assert_eq!(dump_level(Level::Debug, up_to(None)), DumpLevel::Off);
        assert_eq!(
            dump_level(Level::Info, up_to(Some(Level::Info))),
            DumpLevel::Configured(Level::Info)
        );
        assert_eq!(
            dump_level(Level::Warn, up_to(Some(Level::Error))),
            DumpLevel::Off
        );
    }
}
