//! Control signals: SIGTERM, SIGINT and SIGHUP become messages on a channel.
//!
//! signal-hook's handlers only write to a self-pipe; the `signals` thread turns them into
//! [`ControlSignal`]s. No signal mask is changed, so children we spawn (DIB) inherit none.
//! A second SIGTERM/SIGINT exits at once, for an operator who does not want to wait.
//! SIGHUP also reopens the daemon log file (`logging::reopen`), here on this normal thread.

use crossbeam_channel::Sender;
use log::{info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::thread::{self, ThreadKind};

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
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
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
