//! The process-wide registry of our own threads.
//!
//! Every thread that `thread::spawn` starts, and the main thread through
//! [`register_current_thread`], is entered here for as long as it runs. An entry records
//! the thread's name (the same string as its OS name in `/proc/self/task/<tid>/comm`), its
//! kind, its kernel thread id, its `pthread_t`, when it registered, and an *activity
//! breadcrumb*: a short sentence the thread keeps up to date with [`set_activity`] ("building
//! ubuntu-jammy 3f2a…, dib pid 4711") together with the moment it was set. The SIGUSR2 stack
//! dump (`stackdump.rs`) prints the breadcrumb next to each thread's stack, so a dump stays
//! useful even when a stack cannot be walked, and [`snapshot`] offers the same data to
//! anything else that wants to show what the daemon is doing. An [`ActivityHandle`] lets
//! another thread set a thread's breadcrumb (the `progress` thread shows a job's progress).
//!
//! # The capture slot
//!
//! Each registered thread also owns a [`Slot`]: about 1 KiB of atomics, allocated once at
//! registration, into which the thread's own signal handler writes the raw instruction
//! pointers of its stack when the stack dumper asks for them. The handler finds its slot
//! through a `const`-initialized thread-local pointer that has no destructor, so reading it
//! from a signal handler is a plain thread-pointer-relative load: no lazy initialization,
//! no allocation, no lock. The slot's state machine (`IDLE → REQUESTED → WRITING → DONE →
//! IDLE`) is documented on [`Slot`] and driven by `stackdump.rs`; this module only owns the
//! memory and its lifetime.
//!
//! # Lifetime and hazards
//!
//! * A [`Registration`] deregisters on drop, which also happens while the thread unwinds
//!   from a panic. It is not `Send`: it must be dropped on the thread it describes, because
//!   dropping it clears that thread's thread-local pointer.
//! * CAUTION: the thread-local pointer is cleared *before* the entry leaves the registry and
//!   before the last reference to the slot can go away. A capture signal that arrives at any
//!   point of deregistration therefore finds either a live slot or a null pointer, never a
//!   dangling one.
//! * CAUTION: the stack dumper sends its capture signal with `pthread_kill` while it holds
//!   the registry lock, and deregistration needs that same lock. A thread therefore cannot
//!   finish exiting while it is being signalled, so the `pthread_t` the dumper uses is never
//!   stale (signalling an exited thread's `pthread_t` is undefined behaviour).
//! * The registry lock is held only for short, non-blocking work. Nothing that can wait on
//!   another thread may run under it.
//! * This module is a leaf: it uses `std`, `log` and `libc` (for `gettid` and
//!   `pthread_self`, which `std` does not expose).

use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

/// How many instruction pointers a capture slot can hold; deeper stacks are truncated.
pub const MAX_FRAMES: usize = 128;

/// The slot is free: no capture is wanted.
pub(crate) const IDLE: u8 = 0;
/// The dumper has asked for a capture and sent (or is about to send) the capture signal.
pub(crate) const REQUESTED: u8 = 1;
/// The thread's signal handler has claimed the slot and is walking its stack.
pub(crate) const WRITING: u8 = 2;
/// The handler has finished; `len`, `truncated`, `panicking` and `pc` are valid.
pub(crate) const DONE: u8 = 3;

/// What a thread's capture handler fills in when asked for its stack.
///
/// Only two parties touch a slot. The dumper moves it `IDLE → REQUESTED` (and back, when the
/// thread does not answer in time) and `DONE → IDLE` after copying the frames out. The
/// thread's own signal handler moves it `REQUESTED → WRITING → DONE`. The handler ignores a
/// slot in any other state, so a late or spurious signal is harmless.
pub(crate) struct Slot {
    /// One of [`IDLE`], [`REQUESTED`], [`WRITING`], [`DONE`].
    pub(crate) state: AtomicU8,
    /// How many entries of `frames` the handler wrote.
    pub(crate) len: AtomicUsize,
    /// The walk had more than [`MAX_FRAMES`] frames.
    pub(crate) truncated: AtomicBool,
    /// The thread was unwinding a panic, so the handler declined to walk its stack.
    pub(crate) panicking: AtomicBool,
    /// The interrupted program counter, read from the signal's `ucontext`, or 0 if unknown.
    pub(crate) pc: AtomicUsize,
    /// Raw instruction pointers, innermost first, starting inside the handler itself.
    pub(crate) frames: [AtomicUsize; MAX_FRAMES],
}

impl Slot {
    fn new() -> Slot {
        Slot {
            state: AtomicU8::new(IDLE),
            len: AtomicUsize::new(0),
            truncated: AtomicBool::new(false),
            panicking: AtomicBool::new(false),
            pc: AtomicUsize::new(0),
            frames: [const { AtomicUsize::new(0) }; MAX_FRAMES],
        }
    }
}

/// The per-thread state shared between the thread, the registry and the stack dumper.
pub(crate) struct ThreadState {
    /// Where the thread's capture handler writes its stack.
    pub(crate) slot: Slot,
    /// Set when the thread starts deregistering; the dumper stops waiting for it then.
    pub(crate) exited: AtomicBool,
    /// The breadcrumb and when it was set; `None` means idle.
    activity: Mutex<Option<(String, SystemTime)>>,
}

impl ThreadState {
    /// The current breadcrumb and when it was set, or `None` when the thread is idle.
    pub(crate) fn activity(&self) -> Option<(String, SystemTime)> {
        lock_ignoring_poison(&self.activity).clone()
    }
}

/// One registered thread, as the stack dumper sees it while holding the registry lock.
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) kind: String,
    pub(crate) tid: i32,
    pub(crate) pthread: libc::pthread_t,
    pub(crate) registered_at: Instant,
    pub(crate) state: Arc<ThreadState>,
}

/// A copy of one registry entry, as returned by [`snapshot`].
#[derive(Clone, Debug)]
pub struct ThreadInfo {
    /// The registered name, equal to the OS thread name (at most 15 bytes).
    pub name: String,
    /// The kernel thread id (what `gettid` returns and `/proc/self/task/` lists).
    pub tid: i32,
    /// What the thread is for, e.g. `build` or `zk-events`; `main` for the main thread.
    pub kind: String,
    /// The activity breadcrumb, or `None` when the thread is idle.
    pub activity: Option<String>,
    /// When the breadcrumb was set.
    pub activity_since: Option<SystemTime>,
    /// When the thread registered.
    pub registered_at: Instant,
}

/// Keeps the current thread registered; deregisters it when dropped.
///
/// Dropping it must happen on the registered thread itself, which is why it is not `Send`.
#[must_use = "the thread is deregistered as soon as the Registration is dropped"]
pub struct Registration {
    /// `None` for an inert registration (the thread was already registered).
    state: Option<Arc<ThreadState>>,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("active", &self.state.is_some())
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else {
            return;
        };
        // CAUTION: clear the thread-local pointer first, so that a capture handler running
        // on this thread from now on sees "unregistered" instead of a slot that is about to
        // be freed. The compiler fence keeps the compiler from moving the store past the
        // code below; a signal handler on the same thread needs nothing stronger.
        let _ = CURRENT.try_with(|current| current.store(ptr::null_mut(), Ordering::SeqCst));
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        state.exited.store(true, Ordering::Release);
        let mut registry = lock_ignoring_poison(&REGISTRY);
        registry.retain(|entry| !Arc::ptr_eq(&entry.state, &state));
    }
}

/// Registers the calling thread under `name` (kind `main`); deregisters when the result drops.
///
/// Meant for the main thread, early in `main`; threads started by `thread::spawn` are
/// registered automatically. Registering a thread twice is a bug: it panics in debug builds
/// and returns an inert registration (with a warning) otherwise.
pub fn register_current_thread(name: &str) -> Registration {
    register_current_thread_as(name, "main")
}

/// Registers the calling thread under `name` with the given kind. `thread::spawn` uses this.
pub fn register_current_thread_as(name: &str, kind: &str) -> Registration {
    if !current_state_ptr().is_null() {
        debug_assert!(false, "thread {name:?} is already registered");
        log::warn!("thread {name:?} is already registered; ignoring the second registration");
        return Registration {
            state: None,
            _not_send: PhantomData,
        };
    }
    let state = Arc::new(ThreadState {
        slot: Slot::new(),
        exited: AtomicBool::new(false),
        activity: Mutex::new(None),
    });
    let entry = Entry {
        name: name.to_owned(),
        kind: kind.to_owned(),
        // SAFETY: gettid and pthread_self have no preconditions.
        tid: unsafe { libc::gettid() },
        pthread: unsafe { libc::pthread_self() },
        registered_at: Instant::now(),
        state: Arc::clone(&state),
    };
    lock_ignoring_poison(&REGISTRY).push(entry);
    // The pointer stays valid while the Registration holds its Arc; Drop clears it first.
    let raw = Arc::as_ptr(&state).cast_mut();
    let _ = CURRENT.try_with(|current| current.store(raw, Ordering::SeqCst));
    Registration {
        state: Some(state),
        _not_send: PhantomData,
    }
}

/// Sets the calling thread's activity breadcrumb, stamped with the current time.
///
/// Keep it short and specific: what, which image or build, which child pid. Does nothing on
/// an unregistered thread.
pub fn set_activity(text: impl Into<String>) {
    if let Some(state) = current_state() {
        *lock_ignoring_poison(&state.activity) = Some((text.into(), SystemTime::now()));
    }
}

/// A registered thread's breadcrumb, to be set from another thread: the `progress` thread
/// writes a running job's progress into its worker's breadcrumb.
#[derive(Clone)]
pub struct ActivityHandle(Arc<ThreadState>);

impl std::fmt::Debug for ActivityHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ActivityHandle")
    }
}

impl ActivityHandle {
    /// The calling thread's breadcrumb; `None` on an unregistered thread.
    pub fn current() -> Option<ActivityHandle> {
        current_state().map(ActivityHandle)
    }

    /// The breadcrumb's text now; `None` when idle.
    pub fn get(&self) -> Option<String> {
        self.0.activity().map(|(text, _)| text)
    }

    /// Sets the breadcrumb (stamped now), or resets it to idle with `None`. Harmless once
    /// the thread has exited: nobody shows its entry any more.
    pub fn set(&self, text: Option<String>) {
        *lock_ignoring_poison(&self.0.activity) = text.map(|t| (t, SystemTime::now()));
    }
}

/// Resets the calling thread's activity breadcrumb to idle.
pub fn clear_activity() {
    if let Some(state) = current_state() {
        *lock_ignoring_poison(&state.activity) = None;
    }
}

/// Returns a copy of every registry entry, in registration order.
pub fn snapshot() -> Vec<ThreadInfo> {
    lock_registry()
        .iter()
        .map(|entry| {
            let activity = entry.state.activity();
            ThreadInfo {
                name: entry.name.clone(),
                tid: entry.tid,
                kind: entry.kind.clone(),
                activity_since: activity.as_ref().map(|(_, since)| *since),
                activity: activity.map(|(text, _)| text),
                registered_at: entry.registered_at,
            }
        })
        .collect()
}

/// Returns whether the calling thread is registered.
pub fn is_current_thread_registered() -> bool {
    !current_state_ptr().is_null()
}

/// Locks the registry for the stack dumper.
///
/// CAUTION: hold the guard only for non-blocking work (copying entries, `pthread_kill`).
pub(crate) fn lock_registry() -> MutexGuard<'static, Vec<Entry>> {
    lock_ignoring_poison(&REGISTRY)
}

/// The calling thread's shared state, if it is registered.
pub(crate) fn current_state() -> Option<Arc<ThreadState>> {
    let raw = current_state_ptr();
    if raw.is_null() {
        return None;
    }
    // SAFETY: a non-null pointer was stored by this thread's live Registration, which holds
    // an Arc to it and clears the pointer before releasing that Arc. Incrementing the count
    // gives us our own reference.
    unsafe {
        Arc::increment_strong_count(raw);
        Some(Arc::from_raw(raw))
    }
}

/// The calling thread's state pointer, or null when it is unregistered.
///
/// Async-signal-safe: a relaxed load from a `const`-initialized thread-local without a
/// destructor. The pointee stays valid for as long as the pointer is non-null.
#[inline]
pub(crate) fn current_state_ptr() -> *const ThreadState {
    CURRENT
        .try_with(|current| current.load(Ordering::Relaxed))
        .unwrap_or(ptr::null_mut())
}

static REGISTRY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

thread_local! {
    /// The calling thread's registration. `const` and without a destructor on purpose: the
    /// capture signal handler reads it (see the module documentation).
    static CURRENT: AtomicPtr<ThreadState> = const { AtomicPtr::new(ptr::null_mut()) };
}

/// A panic elsewhere must not disable the registry, so poisoning is ignored: every critical
/// section here leaves the data consistent.
fn lock_ignoring_poison<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
