//! Control signals: SIGTERM, SIGINT and SIGHUP become messages on a channel; SIGUSR1
//! reopens the log files.
//!
//! signal-hook's handlers only write to a self-pipe; the `signals` thread turns them into
//! [`ControlSignal`]s. No signal is blocked, so children we spawn (DIB) inherit no blocked
//! signal (the runner empties their mask anyway).
//! A second SIGTERM/SIGINT exits at once, for an operator who does not want to wait.
//! SIGHUP also reopens the daemon log file (`logging::reopen`), here on this normal thread.
//! SIGUSR1 only reopens it, without reloading the configuration: log rotation (the
//! package's logrotate file) must not reload a configuration an operator is half-way
//! through editing. nodepool 11 handles no SIGUSR1 (its default action would end the
//! process); its logs are usually rotated with `copytruncate` or watched file handlers.
//!
//! # Inherited signal state
//!
//! Dispositions set to "ignore" and the signal mask survive `exec`, so the daemon starts with
//! whatever its parent had: a shell script with `trap '' CHLD`, a supervisor that blocks
//! SIGTERM in the thread that forks, a Python wrapper. Two of these break it silently:
//!
//! * SIGCHLD ignored: the kernel reaps every child at once, `waitpid` fails with ECHILD, and
//!   every DIB run and upload command ends as "cannot reap".
//! * SIGTERM, SIGINT or SIGHUP blocked: the handlers below never run (every thread inherits
//!   the mask), so the daemon neither stops nor reloads; a blocked SIGUSR2 or capture signal
//!   disables the stack dump.
//!
//! [`reset_inherited`] therefore runs first thing in `main`, while the process has one
//! thread: SIGCHLD, SIGTERM, SIGINT, SIGHUP and SIGUSR2 go back to their default action (the
//! handlers installed later replace them), SIGPIPE is ignored, and the mask is emptied.
//! SIGPIPE stays ignored on purpose (the Rust runtime ignores it before `main` as well): a
//! write to a closed pipe or socket must fail with EPIPE, which the code handles, rather
//! than kill the daemon. Children do not inherit that: the runner (`command.rs`) resets every
//! disposition and the mask before `exec`.

use crossbeam_channel::Sender;
use log::{info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use crate::thread::{self, ThreadKind};

/// The signals whose inherited disposition [`reset_inherited`] sets back to the default.
const DEFAULT_ACTION: [libc::c_int; 5] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR2,
];

/// Undoes the signal state a parent may have handed on (see the module documentation):
/// default action for SIGCHLD, SIGTERM, SIGINT, SIGHUP and SIGUSR2, SIGPIPE ignored, and an
/// empty signal mask.
///
/// CAUTION: call it first in `main`, before any thread exists: dispositions are
/// process-wide, but the mask is per thread, and only threads started afterwards inherit
/// the emptied one.
pub fn reset_inherited() -> std::io::Result<()> {
    let set = |signal: libc::c_int, handler: libc::sighandler_t| {
        // SAFETY: an all-zero sigaction is a valid "no flags, empty mask" action.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = handler;
        // SAFETY: installing SIG_DFL or SIG_IGN, which run no code of ours.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    for signal in DEFAULT_ACTION {
        set(signal, libc::SIG_DFL)?;
    }
    set(libc::SIGPIPE, libc::SIG_IGN)?;
    // SAFETY: sigprocmask with a valid, emptied set.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What the daemon is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlSignal {
    /// SIGTERM or SIGINT: stop gracefully.
    Shutdown,
    /// SIGHUP: reload the configuration and reopen the log file.
    Reload,
}

/// Installs the handlers and starts the `signals` thread.
///
/// CAUTION: call before spawning worker threads, so no thread ever runs with the default
/// (terminating) disposition of these signals.
pub fn install(tx: Sender<ControlSignal>) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])?;
    // Detached: it lives as long as the process and blocks in the signal iterator.
    thread::spawn(ThreadKind::Signals, "signals", move || {
        let mut stopping = false;
        for sig in signals.forever() {
            match sig {
                SIGHUP => {
                    // First, so this line and everything after it land in the new file.
                    crate::logging::reopen();
                    info!("SIGHUP received: reloading configuration");
                    let _ = tx.send(ControlSignal::Reload);
                }
                SIGUSR1 => {
                    crate::logging::reopen();
                    info!(
                        "SIGUSR1 received: log files reopened (the configuration is not reloaded)"
                    );
                }
                _ if stopping => {
                    warn!("second stop signal received: exiting at once");
                    // SAFETY: _exit is async-signal-safe and we are on a normal thread anyway.
                    unsafe { libc::_exit(1) };
                }
                _ => {
                    stopping = true;
                    info!("stop signal {sig} received: shutting down");
                    if tx.send(ControlSignal::Shutdown).is_err() {
                        break;
                    }
                }
            }
        }
    })
    .detach();
    Ok(())
}
