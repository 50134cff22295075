//! Service manager integration beyond `READY=1`: the systemd watchdog driven by the
//! scheduler loop's liveness, a one-line `STATUS=`, and `STOPPING=1`.
//!
//! nodepool 11 runs as a plain process (`Type=simple` at best); systemd cannot tell a wedged
//! builder from a busy one. Here, when systemd gives us a notification socket:
//!
//! * **Watchdog.** With `WatchdogSec=` systemd sets `WATCHDOG_USEC` (and `WATCHDOG_PID`,
//!   `daemon::take_watchdog`). The scheduler stamps [`Service::turned`] at every turn of its
//!   loop and, so that an idle loop turns too, wakes at least every quarter of the interval
//!   ([`Service::heartbeat`]): a local timer, no ZooKeeper traffic. The `watchdog` thread
//!   sends `WATCHDOG=1` every half interval, but only while the last turn is less than half
//!   an interval old ([`ping`]); a scheduler stuck in one turn (a deadlock, a call that
//!   never returns) makes it fall silent, and systemd restarts the service after
//!   `WatchdogSec` (with `Restart=on-failure`). The silence is logged once, with the age of
//!   the last turn.
//! * **Status.** [`Service::status`] sends `STATUS=<line>` when the line changed (not every
//!   turn); the scheduler's line is [`status_line`], e.g. `3 images ready, 1 building, 2
//!   uploading`, which `systemctl status` shows.
//! * **Stopping.** [`Service::stopping`] sends `STOPPING=1` once, when the shutdown starts.
//!
//! Without a socket every call is a no-op. Notification failures are logged once at debug
//! level: a socket that went away must not fill the log.

use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, bounded};
use log::{debug, info, warn};

use crate::daemon;
use crate::thread::{self, JoinHandle, ThreadKind};

/// The service manager connection; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Service {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    socket: OsString,
    watchdog: Option<Duration>,
    base: Instant,
    /// Milliseconds after `base` of the scheduler's last turn.
    turned_ms: AtomicU64,
    status: Mutex<String>,
    stopping: AtomicBool,
    send_failed: AtomicBool,
}

impl Service {
    /// A connection to `socket` (`NOTIFY_SOCKET`), with the watchdog interval if systemd
    /// asked for one; `None` makes every call a no-op.
    pub fn new(socket: Option<OsString>, watchdog: Option<Duration>) -> Service {
        Service {
            inner: socket.map(|socket| {
                Arc::new(Inner {
                    socket,
                    watchdog: watchdog.filter(|w| !w.is_zero()),
                    base: Instant::now(),
                    turned_ms: AtomicU64::new(0),
                    status: Mutex::new(String::new()),
                    stopping: AtomicBool::new(false),
                    send_failed: AtomicBool::new(false),
                })
            }),
        }
    }

    /// The longest the scheduler may wait between two turns: a quarter of the watchdog
    /// interval; `None` without a watchdog.
    pub fn heartbeat(&self) -> Option<Duration> {
        self.inner.as_ref()?.watchdog.map(|w| w / 4)
    }

    /// The scheduler loop turned (called once per turn).
    pub fn turned(&self) {
        if let Some(inner) = &self.inner {
            let ms = inner.base.elapsed().as_millis() as u64;
            inner.turned_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// How long ago the scheduler last turned.
    fn since_turn(inner: &Inner) -> Duration {
        let turned = Duration::from_millis(inner.turned_ms.load(Ordering::Relaxed));
        inner.base.elapsed().saturating_sub(turned)
    }

    /// Sends `STATUS=<line>` if it differs from the last one sent.
    pub fn status(&self, line: &str) {
        let Some(inner) = &self.inner else {
            return;
        };
        {
            let mut last = inner.status.lock().unwrap_or_else(|e| e.into_inner());
            if *last == line {
                return;
            }
            *last = line.to_string();
        }
        self.send(&format!("STATUS={line}"));
    }

    /// Sends `STOPPING=1` (once) with a status saying why.
    pub fn stopping(&self) {
        if let Some(inner) = &self.inner
            && !inner.stopping.swap(true, Ordering::Relaxed)
        {
            self.send("STOPPING=1\nSTATUS=Stopping");
        }
    }

    fn send(&self, state: &str) {
        let Some(inner) = &self.inner else {
            return;
        };
        if let Err(e) = daemon::notify(&inner.socket, state)
            && !inner.send_failed.swap(true, Ordering::Relaxed)
        {
            debug!(
                "cannot notify the service manager at {}: {e}",
                inner.socket.to_string_lossy()
            );
        }
    }

    /// Starts the `watchdog` thread when systemd asked for a watchdog; dropping the result
    /// stops and joins it.
    pub fn start_watchdog(&self) -> Option<Watchdog> {
        let inner = Arc::clone(self.inner.as_ref()?);
        let interval = inner.watchdog?;
        // The first pings go out while the scheduler starts.
        self.turned();
        let service = self.clone();
        let (stop, stopped) = bounded::<()>(0);
        let spawned = thread::try_spawn(ThreadKind::Watchdog, "watchdog", move || {
            let mut withheld = false;
            loop {
                match ping(Service::since_turn(&inner), interval) {
                    Ping::Send => {
                        if withheld {
                            info!("The scheduler loop turns again: sending WATCHDOG=1 again");
                            withheld = false;
                        }
                        service.send("WATCHDOG=1");
                    }
                    Ping::Withhold { since_turn } if !withheld => {
                        warn!(
                            "The scheduler loop has not turned for {:.1}s: withholding WATCHDOG=1 \
                             (systemd restarts the service {}s after the last one)",
                            since_turn.as_secs_f64(),
                            interval.as_secs_f64()
                        );
                        withheld = true;
                    }
                    Ping::Withhold { .. } => {}
                }
                match stopped.recv_timeout(interval / 2) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
        });
        match spawned {
            Ok(thread) => Some(Watchdog {
                stop: Some(stop),
                _thread: thread,
            }),
            Err(e) => {
                warn!("cannot start the watchdog thread; systemd's watchdog will fire: {e}");
                None
            }
        }
    }
}

/// What the watchdog thread does at one of its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ping {
    Send,
    /// The scheduler has not turned for `since_turn`.
    Withhold {
        since_turn: Duration,
    },
}

/// `WATCHDOG=1` only while the scheduler's last turn is less than half the watchdog
/// interval old (it turns at least every quarter interval when healthy).
pub fn ping(since_turn: Duration, interval: Duration) -> Ping {
    if since_turn < interval / 2 {
        Ping::Send
    } else {
        Ping::Withhold { since_turn }
    }
}

/// The `STATUS=` line: how many images have a ready build, how many build, how many
/// uploads run.
pub fn status_line(ready: usize, building: usize, uploading: usize) -> String {
    let images = if ready == 1 { "image" } else { "images" };
    format!("{ready} {images} ready, {building} building, {uploading} uploading")
}

/// The `watchdog` thread; dropping it stops and joins the thread.
pub struct Watchdog {
    stop: Option<Sender<()>>,
    _thread: JoinHandle<()>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_fed_only_while_the_scheduler_turned_within_half_the_interval() {
        let w = Duration::from_secs(60);
        assert_eq!(ping(Duration::from_secs(15), w), Ping::Send);
        assert_eq!(ping(Duration::from_millis(29_999), w), Ping::Send);
        assert_eq!(
            ping(Duration::from_secs(30), w),
            Ping::Withhold {
                since_turn: Duration::from_secs(30)
            }
        );
    }

    #[test]
    fn the_status_line_counts_ready_images_builds_and_uploads() {
        assert_eq!(
            status_line(3, 1, 2),
            "3 images ready, 1 building, 2 uploading"
        );
        assert_eq!(
            status_line(1, 0, 0),
            "1 image ready, 0 building, 0 uploading"
        );
    }

    #[test]
    fn without_a_socket_everything_is_a_no_op() {
        let s = Service::new(None, Some(Duration::from_secs(4)));
        assert_eq!(s.heartbeat(), None);
        assert!(s.start_watchdog().is_none());
        s.status("x");
        s.stopping();
    }
}
