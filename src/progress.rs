//! Progress of long work: what every running build and upload has done so far, readable
//! from one place.
//!
//! A DIB run takes tens of minutes and an upload of a multi-GiB image as long; nodepool 11
//! logs one line when each starts and one when it ends, so between the two an operator
//! cannot tell a slow upload from a wedged one. Here a build or upload worker enters its job
//! with [`track`] for as long as it runs (the returned [`Tracked`] removes it on drop), and
//! [`snapshot`] returns every entry as a typed [`Progress`]: the `progress` thread (started
//! by `app` with [`Ticker::start`]) logs each entry every `progress-interval` seconds and
//! writes the same line into the worker's activity breadcrumb (shown by the SIGUSR2 dump);
//! anything else that wants the figures (a metrics endpoint) calls [`snapshot`].
//!
//! * An upload counts the bytes a streaming driver has read from the image file
//!   ([`ByteCount`], atomics the driver updates and the ticker reads). Only a driver that
//!   streams the file knows them (OpenStack's Glance PUT); the command driver's command reads
//!   the file itself, so its line says how long it has been running instead.
//! * A build shows its elapsed time and the last line of its build log (read from the
//!   file's end, bounded), the same log DIB writes to.
//!
//! The lines are our addition; they use no ZooKeeper and no network at all. Sizes are in
//! binary units (GiB, as `images-dir-required-free`), rates in decimal MB/s (as `curl` and
//! Glance clients print them).

use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, bounded};
use log::info;

use crate::registry::ActivityHandle;
use crate::thread::{self, JoinHandle, ThreadKind};

/// How much of a build log's end is read for its last line(s).
const LOG_TAIL_BYTES: u64 = 8 * 1024;
/// The longest last line of a build log shown in a progress line, in characters.
const MAX_LINE_CHARS: usize = 200;

/// Bytes of one upload's image file a streaming driver has read so far.
///
/// The upload worker makes one per upload and hands it to the driver in the request; a
/// driver that streams the file calls [`ByteCount::start`] when a transfer (re)starts and
/// [`ByteCount::add`] for every chunk. A driver that never calls `start` leaves the upload
/// "running" without byte figures.
#[derive(Debug, Default)]
pub struct ByteCount {
    started: AtomicBool,
    total: AtomicU64,
    sent: AtomicU64,
    since: Mutex<Option<Instant>>,
}

impl ByteCount {
    /// A transfer of `total` bytes starts (again, after a retry: the count restarts at 0).
    pub fn start(&self, total: u64) {
        *lock(&self.since) = Some(Instant::now());
        self.sent.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.started.store(true, Ordering::Release);
    }

    /// `n` more bytes were read.
    pub fn add(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// The figures so far; `None` until a transfer started.
    pub fn transfer(&self) -> Option<Transfer> {
        if !self.started.load(Ordering::Acquire) {
            return None;
        }
        let elapsed = lock(&self.since).map(|s| s.elapsed()).unwrap_or_default();
        Some(Transfer {
            sent: self.sent.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            elapsed,
        })
    }
}

/// One upload's transfer so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transfer {
    pub sent: u64,
    pub total: u64,
    /// Since the transfer started.
    pub elapsed: Duration,
}

impl Transfer {
    /// Average bytes per second since the start; `None` before anything was measured.
    pub fn rate(&self) -> Option<f64> {
        let secs = self.elapsed.as_secs_f64();
        (secs > 0.0 && self.sent > 0).then(|| self.sent as f64 / secs)
    }

    /// The time left at the average rate so far; `None` without a rate.
    pub fn eta(&self) -> Option<Duration> {
        let left = self.total.saturating_sub(self.sent) as f64;
        self.rate()
            .and_then(|r| Duration::try_from_secs_f64(left / r).ok())
    }
}

/// What a running job is, as entered with [`track`].
#[derive(Debug, Clone)]
pub enum Work {
    Upload {
        image: String,
        build_id: String,
        provider: String,
        bytes: Arc<ByteCount>,
    },
    Build {
        image: String,
        build_id: String,
        /// The build log DIB writes to.
        log: PathBuf,
    },
}

/// One running job's progress, as [`snapshot`] returns it. Its `Display` is the log line.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    Upload {
        image: String,
        build_id: String,
        provider: String,
        elapsed: Duration,
        /// `None` for a driver that does not stream the file (or before it started).
        transfer: Option<Transfer>,
    },
    Build {
        image: String,
        build_id: String,
        elapsed: Duration,
        /// The build log's last non-empty line, bounded; `None` when there is none yet.
        last_line: Option<String>,
    },
}

impl Progress {
    /// How long the job has been running.
    pub fn elapsed(&self) -> Duration {
        match self {
            Progress::Upload { elapsed, .. } | Progress::Build { elapsed, .. } => *elapsed,
        }
    }
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Progress::Upload {
                image,
                build_id,
                provider,
                elapsed,
                transfer,
            } => {
                write!(f, "Upload of {image}-{build_id} to {provider}: ")?;
                let Some(t) = transfer else {
                    return write!(f, "running for {}", duration(*elapsed));
                };
                let percent = if t.total == 0 {
                    100
                } else {
                    (t.sent.min(t.total) as u128 * 100 / t.total as u128) as u64
                };
                write!(f, "{} of {} ({percent}%), ", bytes(t.sent), bytes(t.total))?;
                match (t.rate(), t.eta()) {
                    (Some(rate), Some(eta)) => {
                        write!(f, "{:.1} MB/s, ETA {}", rate / 1e6, duration(eta))
                    }
                    _ => write!(f, "no data sent yet, running for {}", duration(*elapsed)),
                }
            }
            Progress::Build {
                image,
                build_id,
                elapsed,
                last_line,
            } => {
                write!(
                    f,
                    "Build {image}-{build_id} running for {}",
                    duration(*elapsed)
                )?;
                match last_line {
                    Some(line) => write!(f, ": {line}"),
                    None => f.write_str(" (its build log is empty so far)"),
                }
            }
        }
    }
}

/// A byte count in binary units with one decimal: `812 B`, `3.4 MiB`, `1.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration as `45s`, `1m08s` or `2h03m09s` (whole seconds, rounded down).
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// The last `max_lines` non-empty lines of the file at `path` (at most its last 8 KiB read),
/// each cut to 200 characters, control characters replaced; empty when it cannot be read.
pub fn log_tail(path: &Path, max_lines: usize) -> Vec<String> {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let from = len.saturating_sub(LOG_TAIL_BYTES);
        file.seek(SeekFrom::Start(from))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        // A cut first line is only a fragment: drop it unless it is all there is.
        if from > 0
            && let Some(nl) = tail.iter().position(|b| *b == b'\n')
        {
            tail.drain(..=nl);
        }
        Ok(tail)
    };
    let Ok(tail) = read() else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&tail);
    let mut lines: Vec<String> = text
        .lines()
        .rev()
        .map(clean_line)
        .filter(|l| !l.is_empty())
        .take(max_lines)
        .collect();
    lines.reverse();
    lines
}

/// One log line made safe and short for a daemon log line: a progress bar's `\r` keeps
/// only its last state, other control characters become spaces, at most 200 characters.
fn clean_line(line: &str) -> String {
    let line = line
        .rsplit('\r')
        .find(|s| !s.trim().is_empty())
        .unwrap_or("");
    let mut out: String = line
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string();
    if out.chars().count() > MAX_LINE_CHARS {
        out = out.chars().take(MAX_LINE_CHARS).collect::<String>() + "…";
    }
    out
}

struct Running {
    id: u64,
    work: Work,
    started: Instant,
    /// The worker thread's breadcrumb, and what it said when the job was entered.
    thread: Option<(ActivityHandle, Option<String>)>,
}

impl Running {
    fn progress(&self) -> Progress {
        let elapsed = self.started.elapsed();
        match &self.work {
            Work::Upload {
                image,
                build_id,
                provider,
                bytes,
            } => Progress::Upload {
                image: image.clone(),
                build_id: build_id.clone(),
                provider: provider.clone(),
                elapsed,
                transfer: bytes.transfer(),
            },
            Work::Build {
                image,
                build_id,
                log,
            } => Progress::Build {
                image: image.clone(),
                build_id: build_id.clone(),
                elapsed,
                last_line: log_tail(log, 1).pop(),
            },
        }
    }
}

static RUNNING: Mutex<Vec<Running>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Keeps a job in the progress table; removes it (and puts the worker's breadcrumb back as
/// it was when the job was entered) when dropped.
#[must_use = "the job leaves the progress table as soon as this is dropped"]
#[derive(Debug)]
pub struct Tracked(u64);

impl Drop for Tracked {
    fn drop(&mut self) {
        // Under the table's lock, so a tick cannot write a line into the breadcrumb after.
        let mut running = lock(&RUNNING);
        if let Some(pos) = running.iter().position(|r| r.id == self.0) {
            let gone = running.remove(pos);
            if let Some((handle, base)) = gone.thread {
                handle.set(base);
            }
        }
    }
}

/// Enters a job that the calling (worker) thread runs from now on.
pub fn track(work: Work) -> Tracked {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let thread = ActivityHandle::current().map(|h| {
        let base = h.get();
        (h, base)
    });
    lock(&RUNNING).push(Running {
        id,
        work,
        started: Instant::now(),
        thread,
    });
    Tracked(id)
}

/// The progress of every running job, in the order they started.
pub fn snapshot() -> Vec<Progress> {
    let running = lock(&RUNNING);
    running.iter().map(Running::progress).collect()
}

/// Logs a line for every job that has run at least half an interval, and puts it in the
/// job's worker breadcrumb after what the worker said it was doing.
fn tick(interval: Duration) {
    let running = lock(&RUNNING);
    for r in running.iter() {
        let p = r.progress();
        if p.elapsed() < interval / 2 {
            continue;
        }
        info!("{p}");
        if let Some((handle, base)) = &r.thread {
            handle.set(Some(match base {
                Some(base) => format!("{base}; {p}"),
                None => p.to_string(),
            }));
        }
    }
}

/// `progress-interval` in milliseconds; 0 turns the lines off.
static INTERVAL_MS: AtomicU64 = AtomicU64::new(0);

/// Sets `progress-interval` (at start and after a reload); the `progress` thread uses it
/// from its next wait on.
pub fn set_interval(interval_secs: f64) {
    INTERVAL_MS.store(millis(interval_secs), Ordering::Relaxed);
}

/// The `progress` thread; dropping the ticker stops and joins it.
pub struct Ticker {
    stop: Option<Sender<()>>,
    _thread: JoinHandle<()>,
}

impl Ticker {
    /// Starts the thread with `progress-interval` seconds (0: no lines until a reload sets
    /// another interval).
    pub fn start(interval_secs: f64) -> std::io::Result<Ticker> {
        set_interval(interval_secs);
        let (stop, stopped) = bounded::<()>(0);
        let thread = thread::try_spawn(ThreadKind::Progress, "progress", move || {
            // While off, look again now and then for a reload that turned the lines on.
            const OFF_RECHECK: Duration = Duration::from_secs(5);
            let mut last = Instant::now();
            loop {
                let interval = Duration::from_millis(INTERVAL_MS.load(Ordering::Relaxed));
                let wait = if interval.is_zero() {
                    OFF_RECHECK
                } else {
                    (last + interval).saturating_duration_since(Instant::now())
                };
                match stopped.recv_timeout(wait) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                if !interval.is_zero() && last.elapsed() >= interval {
                    last = Instant::now();
                    tick(interval);
                }
            }
        })?;
        Ok(Ticker {
            stop: Some(stop),
            _thread: thread,
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        // The thread sees the channel disconnect; the handle joins it after this.
        self.stop.take();
    }
}

fn millis(secs: f64) -> u64 {
    (secs.max(0.0) * 1000.0) as u64
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_lines_show_bytes_percent_rate_and_eta() {
        let p = Progress::Upload {
            image: "fedora".into(),
            build_id: "0000000001".into(),
            provider: "p1".into(),
            elapsed: Duration::from_secs(40),
            transfer: Some(Transfer {
                sent: 1_288_490_189,
                total: 4 * 1024 * 1024 * 1024,
                elapsed: Duration::from_secs(31),
            }),
        };
        assert_eq!(
            p.to_string(),
            "Upload of fedora-0000000001 to p1: 1.2 GiB of 4.0 GiB (30%), 41.6 MB/s, ETA 1m12s"
        );
    }

    #[test]
    fn an_upload_without_byte_figures_says_how_long_it_runs() {
        let p = Progress::Upload {
            image: "fedora".into(),
            build_id: "01".into(),
            provider: "cmd".into(),
            elapsed: Duration::from_secs(754),
            transfer: None,
        };
        assert_eq!(
            p.to_string(),
            "Upload of fedora-01 to cmd: running for 12m34s"
        );
    }

    #[test]
    fn build_lines_show_elapsed_time_and_the_last_log_line() {
        let p = Progress::Build {
            image: "fedora".into(),
            build_id: "01".into(),
            elapsed: Duration::from_secs(7384),
            last_line: Some("Installing packages".into()),
        };
        assert_eq!(
            p.to_string(),
            "Build fedora-01 running for 2h03m04s: Installing packages"
        );
    }

    #[test]
    fn log_tails_skip_blank_lines_keep_progress_bars_last_state_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("b.log");
        let long = "x".repeat(500);
        std::fs::write(&log, format!("one\ntwo\n\n10%\r50%\r100%\n{long}\n\n")).unwrap();
        let tail = log_tail(&log, 3);
        assert_eq!(tail.len(), 3);
        assert_eq!(tail[0], "two");
        assert_eq!(tail[1], "100%");
        assert_eq!(tail[2].chars().count(), MAX_LINE_CHARS + 1);
        assert!(log_tail(&dir.path().join("missing.log"), 3).is_empty());
    }

    #[test]
    fn sizes_and_durations_read_naturally() {
        assert_eq!(bytes(812), "812 B");
        assert_eq!(bytes(3 * 1024 * 1024 + 400 * 1024), "3.4 MiB");
        assert_eq!(duration(Duration::from_secs(45)), "45s");
        assert_eq!(duration(Duration::from_secs(68)), "1m08s");
    }
}
