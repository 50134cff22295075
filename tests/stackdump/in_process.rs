//! The SIGUSR2 stack capture, in-process: `thread::spawn` names and registers threads, and
//! `stackdump::capture` shows where each registered thread is blocked.
//!
//! The stack dump is installed once per test process. The test harness's own threads are not
//! registered, so they are never signalled; only the threads these tests start are. Sending
//! SIGUSR2 itself belongs in a spawned-process test of the daemon (house rule), because a
//! process-directed signal may interrupt any test thread.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::panic;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use nodepool_builder::registry;
use nodepool_builder::stackdump::{self, Config, ThreadStack};
use nodepool_builder::thread::{self, ThreadKind};

use crate::util::wait_until;

/// Installs the stack dump once for the whole test process; also keeps the panic-churn
/// threads' deliberate panics out of the test output.
fn installed() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some("panic-churn") {
                previous(info);
            }
        }));
        stackdump::install(Config::default()).expect("stackdump::install");
    });
}

/// Starts a registered thread that reports its tid and activity, then runs `body`.
fn start(
    name: &str,
    activity: &'static str,
    body: impl FnOnce() + Send + 'static,
) -> (thread::JoinHandle<()>, i32) {
    let (tid_tx, tid_rx) = crossbeam_channel::bounded(1);
    let handle = thread::spawn(ThreadKind::Other, name, move || {
        registry::set_activity(activity);
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        body();
    });
    let tid = tid_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("thread start");
    (handle, tid)
}

fn stack_of(stacks: &[ThreadStack], tid: i32) -> &ThreadStack {
    stacks
        .iter()
        .find(|stack| stack.tid == tid)
        .unwrap_or_else(|| panic!("tid {tid} missing from the capture: {stacks:#?}"))
}

#[track_caller]
fn assert_frames(stack: &ThreadStack, needles: &[&str], round: usize) {
    let text = stack.frames.join("\n");
    for needle in needles {
        assert!(
            text.contains(needle),
            "round {round}: {} ({}) has no frame containing {needle:?}; note {:?}; frames:\n{text}",
            stack.name,
            stack.tid,
            stack.note,
        );
    }
    for leaked in [
        "capture_handler",
        "record_stack",
        "trace_unsynchronized",
        "_Unwind_Backtrace",
    ] {
        assert!(
            !text.contains(leaked),
            "round {round}: handler frame {leaked:?} leaked:\n{text}"
        );
    }
}

/// Kills a child (the test's `sleep`) by pid; the waiting thread reaps it.
fn kill(pid: u32) {
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// A `sleep 30` that dies with the thread that started it (PR_SET_PDEATHSIG), so it never
/// outlives a crashed test and keeps its pipes open.
fn sleep_child() -> std::process::Child {
    let mut command = Command::new("sleep");
    command.arg("30").stdin(Stdio::null()).stdout(Stdio::null());
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().expect("spawn sleep 30")
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[test]
fn capture_shows_where_each_registered_thread_blocks() {
    installed();

    // Blocked in a crossbeam recv until the sender is dropped.
    let (work_tx, work_rx): (Sender<u64>, Receiver<u64>) = crossbeam_channel::bounded(1);
    let (recv_handle, recv_tid) = start("recv-idle", "waiting for work", move || {
        while work_rx.recv().is_ok() {}
    });

    // Sleeping for an hour; detached at the end (a sleep cannot be interrupted).
    let (sleeper_handle, sleeper_tid) = start("sleeper", "sleeping for an hour", || {
        std::thread::sleep(Duration::from_secs(3600));
    });

    // Waiting for a child process.
    let mut child = sleep_child();
    let child_pid = child.id();
    let (waiter_handle, waiter_tid) = start("child-wait", "waiting for sleep 30", move || {
        let _ = child.wait();
    });

    // Give the blocked threads a moment to reach their blocking calls.
    wait_until(Duration::from_secs(10), "the test threads to block", || {
        [recv_tid, sleeper_tid, waiter_tid].iter().all(|tid| {
            let stat =
                std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('S'))
        })
    });

    let check = |stacks: &[ThreadStack], round: usize| {
        let recv = stack_of(stacks, recv_tid);
        assert_frames(recv, &["crossbeam_channel", "recv"], round);
        assert_eq!(recv.activity.as_deref(), Some("waiting for work"));
        assert!(recv.activity_since.is_some());
        assert_eq!(recv.name, "recv-idle");
        assert_eq!(recv.kind, "other");

        let sleeper = stack_of(stacks, sleeper_tid);
        assert_frames(sleeper, &["sleep"], round);
        assert_eq!(sleeper.activity.as_deref(), Some("sleeping for an hour"));

        let waiter = stack_of(stacks, waiter_tid);
        assert_frames(waiter, &["wait"], round);
        assert_eq!(waiter.activity.as_deref(), Some("waiting for sleep 30"));

        for stack in [recv, sleeper, waiter] {
            assert_eq!(stack.note, None, "round {round}: {stack:#?}");
        }
    };

    // Phase 1: quiet threads only; this is the timing reported below.
    let phase1_threads = registry::snapshot().len();
    let mut times = Vec::new();
    for round in 0..100 {
        let started = Instant::now();
        let stacks = stackdump::capture();
        times.push(started.elapsed());
        check(&stacks, round);
    }

    // Phase 2: plus a thread that panics and catches in a loop, the regression test of
    // stackdump.md pitfall 2 (walking a stack in the middle of _Unwind_RaiseException crashed
    // the process). Between panics it spins about as long as a panic takes, so that a
    // capture signal lands inside an unwind often but the dumper's retries also succeed.
    let stop_churn = Arc::new(AtomicBool::new(false));
    let stop = Arc::clone(&stop_churn);
    let (churn_handle, churn_tid) = start("panic-churn", "panicking on purpose", move || {
        let started = Instant::now();
        for _ in 0..20 {
            let _ = panic::catch_unwind(|| panic!("deliberate"));
        }
        let one_panic = started.elapsed() / 20;
        while !stop.load(Ordering::Relaxed) {
            let _ = panic::catch_unwind(|| panic!("deliberate"));
            let spin = Instant::now();
            while spin.elapsed() < one_panic {
                std::hint::spin_loop();
            }
        }
    });
    let mut churn_times = Vec::new();
    let mut churn_stacks = 0;
    let mut churn_panicking = 0;
    for round in 0..100 {
        let started = Instant::now();
        let stacks = stackdump::capture();
        churn_times.push(started.elapsed());
        check(&stacks, round);
        let churn = stack_of(&stacks, churn_tid);
        match &churn.note {
            Some(note) if churn.frames.is_empty() => {
                assert!(
                    note.contains("thread is panicking"),
                    "round {round}: {churn:#?}"
                );
                churn_panicking += 1;
            }
            _ => {
                assert_frames(churn, &[], round);
                churn_stacks += 1;
            }
        }
    }

    // The same dump as SIGUSR2 would log it.
    let records = stackdump::render_dump();
    let text = records.join("\n");
    assert_eq!(
        records.first().map(String::as_str),
        Some("Beginning debug handler")
    );
    let end = records.last().unwrap();
    assert!(end.starts_with("End debug handler: "), "{end}");
    assert!(
        records
            .iter()
            .any(|record| record.starts_with("Unregistered threads (no stack): [")),
        "{text}"
    );
    let recv_record = records
        .iter()
        .find(|record| record.starts_with(&format!("Thread: {recv_tid} recv-idle")))
        .unwrap_or_else(|| panic!("no record for recv-idle:\n{text}"));
    let second_line = recv_record.lines().nth(1).unwrap();
    assert!(
        second_line.starts_with("    activity: waiting for work, since "),
        "{recv_record}"
    );
    assert!(recv_record.contains("crossbeam_channel"), "{recv_record}");

    times.sort();
    churn_times.sort();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    eprintln!(
        "stackdump capture() [{profile}], 100 rounds of {} registered threads: median {:.2?}, p90 {:.2?}, max {:.2?}",
        phase1_threads,
        percentile(&times, 50),
        percentile(&times, 90),
        times.last().unwrap(),
    );
    eprintln!(
        "stackdump capture() [{profile}] with panic-churn, 100 rounds: median {:.2?}, p90 {:.2?}, max {:.2?}; \
         panic-churn answered {churn_stacks} times with a stack, {churn_panicking} times as panicking",
        percentile(&churn_times, 50),
        percentile(&churn_times, 90),
        churn_times.last().unwrap(),
    );
    eprintln!("stackdump render_dump() [{profile}]: {end}");
    eprintln!("stackdump sample record [{profile}]:\n{recv_record}");
    // `STACKDUMP_SHOW=1 cargo test ... -- --nocapture` prints the whole dump for a look.
    if std::env::var_os("STACKDUMP_SHOW").is_some() {
        eprintln!("{text}");
    }

    stop_churn.store(true, Ordering::Relaxed);
    churn_handle.join().unwrap();
    drop(work_tx);
    recv_handle.join().unwrap();
    kill(child_pid);
    waiter_handle.join().unwrap();
    // The sleeper cannot be woken; let it sleep out the test process.
    sleeper_handle.detach();
}

/// Recurses `depth` times, then blocks; the addition after the call keeps it from becoming
/// a loop.
#[inline(never)]
fn recurse_then_block(depth: u32, release: &Receiver<()>) -> u32 {
    if depth == 0 {
        let _ = release.recv();
        return 0;
    }
    std::hint::black_box(recurse_then_block(depth - 1, release)) + 1
}

#[test]
fn capture_collapses_recursion_and_truncates_deep_stacks() {
    installed();
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
    let (handle, tid) = start("deep", "recursing", move || {
        recurse_then_block(300, &release_rx);
    });
    wait_until(Duration::from_secs(10), "the deep thread to block", || {
        let stacks = stackdump::capture();
        let deep = stack_of(&stacks, tid);
        deep.frames.iter().any(|frame| frame.contains("recv"))
    });
    let stacks = stackdump::capture();
    let deep = stack_of(&stacks, tid);
    let text = deep.frames.join("\n");
    assert_frames(deep, &["recurse_then_block", "recv"], 0);
    assert!(
        deep.frames
            .iter()
            .any(|frame| frame.starts_with("... previous frame repeated ")),
        "{text}"
    );
    assert_eq!(
        deep.frames.last().map(String::as_str),
        Some("... truncated at 128 frames"),
        "{text}"
    );
    assert!(
        deep.frames.len() < 40,
        "recursion was not collapsed:\n{text}"
    );
    drop(release_tx);
    handle.join().unwrap();
}

#[test]
fn capture_diagnoses_a_thread_that_blocks_the_capture_signal() {
    installed();
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
    let (handle, tid) = start("masked", "blocking SIGURG", move || {
        // Blocks the capture signal in this thread only; it starts no children.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGURG);
            assert_eq!(
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
                0
            );
        }
        let _ = release_rx.recv();
    });
    wait_until(
        Duration::from_secs(10),
        "the masked thread to block SIGURG",
        || {
            let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
                .unwrap_or_default();
            status
                .lines()
                .any(|line| line.starts_with("SigBlk:") && !line.ends_with("0000000000000000"))
        },
    );

    let started = Instant::now();
    let stacks = stackdump::capture();
    let elapsed = started.elapsed();
    let masked = stack_of(&stacks, tid);
    let note = masked.note.as_deref().unwrap_or_default();
    assert!(masked.frames.is_empty(), "{masked:#?}");
    assert!(note.starts_with("no answer within 500ms"), "{masked:#?}");
    assert!(
        note.contains("capture signal BLOCKED in this thread"),
        "{masked:#?}"
    );
    assert!(note.contains("state=S"), "{masked:#?}");
    assert!(note.contains("wchan="), "{masked:#?}");
    assert!(note.contains("syscall="), "{masked:#?}");
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );

    drop(release_tx);
    handle.join().unwrap();
}

#[test]
fn install_refuses_a_second_call_and_bad_signals() {
    installed();
    let error = stackdump::install(Config::default()).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists, "{error}");
    for signal in [
        0,
        libc::SIGUSR2,
        libc::SIGKILL,
        libc::SIGSEGV,
        libc::SIGRTMAX() + 1,
    ] {
        let config = Config {
            capture_signal: signal,
            ..Config::default()
        };
        let error = stackdump::install(config).unwrap_err();
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::InvalidInput,
            "signal {signal}: {error}"
        );
    }
}

#[test]
fn children_inherit_no_blocked_or_ignored_signals() {
    installed();
    let own_status = std::fs::read_to_string("/proc/self/status").unwrap();
    let mask = |status: &str, field: &str| {
        let line = status
            .lines()
            .find(|line| line.starts_with(field))
            .unwrap_or_else(|| panic!("no {field}"));
        u64::from_str_radix(line[field.len()..].trim(), 16).unwrap()
    };

    let output = Command::new("grep")
        .args(["SigBlk", "/proc/self/status"])
        .output()
        .expect("run grep");
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        text.trim(),
        "SigBlk:\t0000000000000000",
        "a blocked mask leaked into a child"
    );

    let mut child = Command::new("grep")
        .args(["-E", "^Sig(Ign|Blk)", "/proc/self/status"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run grep");
    let mut text = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    child.wait().unwrap();
    let child_ignored = mask(&text, "SigIgn:");
    let bit = |signal: i32| 1u64 << (signal - 1);
    // Our handlers must not show up as "ignored" in children, and a child may ignore only
    // what this process inherited as ignored (e.g. SIGINT from a background shell job).
    // glibc's posix_spawn sets its internal signals (32 and 33, below SIGRTMIN) to SIG_IGN in
    // the child before exec, so only the 31 standard signals are compared.
    let standard = (1u64 << 31) - 1;
    assert_eq!(
        child_ignored & (bit(libc::SIGUSR2) | bit(libc::SIGURG)),
        0,
        "{text}"
    );
    assert_eq!(
        child_ignored & !mask(&own_status, "SigIgn:") & standard,
        0,
        "{text}\nown:\n{own_status}"
    );
}

#[test]
fn thread_names_are_the_kernel_names() {
    installed();
    let names = ["t", "build-0", "upload-12", "fifteen-bytes-x"];
    let barrier = Arc::new(Barrier::new(names.len() + 1));
    let handles = names
        .iter()
        .map(|name| {
            let barrier = Arc::clone(&barrier);
            start(name, "naming", move || {
                barrier.wait();
            })
        })
        .collect::<Vec<_>>();
    let snapshot = registry::snapshot();
    for (name, (handle, tid)) in names.iter().zip(&handles) {
        assert!(name.len() <= thread::MAX_THREAD_NAME_LEN);
        assert_eq!(handle.thread_name(), *name);
        let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap();
        assert_eq!(comm.trim_end(), *name, "comm of {tid}");
        let info = snapshot
            .iter()
            .find(|info| info.tid == *tid)
            .expect("registered");
        assert_eq!(info.name, *name);
        assert_eq!(info.activity.as_deref(), Some("naming"));
    }
    barrier.wait();
    for (handle, _) in handles {
        handle.join().unwrap();
    }

    // A name longer than the kernel keeps is a bug: it panics in debug builds and is cut to
    // 15 bytes in release builds.
    let long = "sixteen-bytes-xx";
    let result = panic::catch_unwind(|| {
        thread::spawn(ThreadKind::Other, long, || {
            std::thread::current().name().map(str::to_owned)
        })
    });
    if cfg!(debug_assertions) {
        assert!(result.is_err(), "a 16-byte name must panic in debug builds");
    } else {
        let name = result.expect("release truncates").join().unwrap();
        assert_eq!(name.as_deref(), Some(&long[..15]));
    }
}

#[test]
fn join_handles_join_on_drop_and_threads_deregister_even_when_they_panic() {
    installed();
    let registered = |name: &str| registry::snapshot().iter().any(|info| info.name == name);

    // join returns the value; the thread is gone from the registry afterwards.
    let handle = thread::spawn(ThreadKind::Other, "join-value", || 42);
    assert_eq!(handle.thread_name(), "join-value");
    assert_eq!(handle.join().unwrap(), 42);
    assert!(!registered("join-value"));

    // A panicking thread deregisters while unwinding; join reports the panic.
    let handle = thread::spawn::<_, ()>(ThreadKind::Other, "join-panic", || panic!("on purpose"));
    let payload = handle.join().unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"on purpose"));
    assert!(!registered("join-panic"));

    // Dropping the handle waits for the thread.
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    drop(thread::spawn(ThreadKind::Other, "join-drop", move || {
        std::thread::sleep(Duration::from_millis(50));
        flag.store(true, Ordering::SeqCst);
    }));
    assert!(
        done.load(Ordering::SeqCst),
        "drop returned before the thread finished"
    );
    assert!(!registered("join-drop"));

    // A detached thread runs on, registered, after its handle is gone.
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
    thread::spawn(ThreadKind::Upload, "detached", move || {
        registry::set_activity("uploading");
        let _ = release_rx.recv();
    })
    .detach();
    wait_until(
        Duration::from_secs(10),
        "the detached thread to register",
        || {
            registry::snapshot().iter().any(|info| {
                info.name == "detached"
                    && info.kind == "upload"
                    && info.activity.as_deref() == Some("uploading")
            })
        },
    );
    drop(release_tx);
    wait_until(
        Duration::from_secs(10),
        "the detached thread to deregister",
        || !registered("detached"),
    );
}

#[test]
fn activity_breadcrumbs_and_main_style_registration() {
    installed();
    // The test harness thread is not registered: activity calls are no-ops there.
    assert!(!registry::is_current_thread_registered());
    registry::set_activity("ignored");

    let handle = thread::spawn(ThreadKind::Other, "breadcrumbs", || {
        let me = || {
            registry::snapshot()
                .into_iter()
                .find(|info| info.name == "breadcrumbs")
                .unwrap()
        };
        assert_eq!(me().activity, None);
        registry::set_activity("building ubuntu-jammy 3f2a, dib pid 4711");
        let info = me();
        assert_eq!(
            info.activity.as_deref(),
            Some("building ubuntu-jammy 3f2a, dib pid 4711")
        );
        assert!(info.activity_since.is_some());
        registry::clear_activity();
        assert_eq!(me().activity, None);
        assert_eq!(me().activity_since, None);
    });
    handle.join().unwrap();

    // register_current_thread is what main does. The harness thread is not registered, so
    // it can play main here; capturing then includes its own stack, taken through the same
    // handler by a self-directed signal.
    let registration = registry::register_current_thread("main-like");
    let me = unsafe { libc::gettid() };
    let info = registry::snapshot()
        .into_iter()
        .find(|info| info.tid == me)
        .expect("registered");
    assert_eq!(
        (info.name.as_str(), info.kind.as_str()),
        ("main-like", "main")
    );
    registry::set_activity("capturing myself");
    let stacks = stackdump::capture();
    let own = stack_of(&stacks, me);
    assert_eq!(own.activity.as_deref(), Some("capturing myself"));
    assert_eq!(own.note, None, "{own:#?}");
    assert_frames(own, &["pthread_kill", "stackdump::capture"], 0);
    drop(registration);
    assert!(!registry::snapshot().iter().any(|info| info.tid == me));
}
