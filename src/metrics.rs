//! Prometheus metrics: the families the builder's HTTP endpoint (`webapp`) serves on
//! `/metrics`, in the Prometheus text exposition format 0.0.4.
//!
//! Only this module knows the Prometheus names (as `stats` alone knows the statsd keys). All
//! names start with `nodepool_builder_` and carry their unit (`_seconds`, `_bytes`) and, for
//! counters, `_total`, as Prometheus' naming conventions ask. nodepool 11 has no Prometheus
//! metrics at all (its builder speaks statsd only), so nothing here is an upstream name.
//!
//! The values are updated at the same points where `stats` sends statsd (after a DIB run,
//! after an upload, after a janitor pass) and at a few more (ZooKeeper session changes, the
//! scheduler's loop turns). Whatever is cheap to read at scrape time (ZooKeeper connected,
//! component registered, ready) is read then, not kept.
//!
//! Hand-written instead of the `prometheus-client` crate: the builder needs counters, gauges
//! and histograms with string labels, and their text format is a page of code (checked by
//! `promtool check metrics` in tests/metrics.rs); the crate would add a derive macro, its
//! own lock crate and encoding machinery that the 8.5 MiB idle RSS budget pays for in code
//! pages. One process-wide instance ([`global`]), one mutex: every update is a few map
//! operations, far below the rate of builds and uploads.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// What kind of metric a family is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: its name, type, help text, label names and (histograms) buckets.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub labels: &'static [&'static str],
    pub buckets: &'static [f64],
}

/// Build and upload durations: a minute to several hours.
const LONG_BUCKETS: &[f64] = &[
    30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
];
/// Janitor passes: milliseconds to minutes.
const SHORT_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0];

pub const BUILDS: Family = Family {
    name: "nodepool_builder_builds_total",
    kind: Kind::Counter,
    help: "Build jobs ended, by image and result (ready, failed, skipped, no_space).",
    labels: &["image", "state"],
    buckets: &[],
};
pub const BUILD_DURATION: Family = Family {
    name: "nodepool_builder_build_duration_seconds",
    kind: Kind::Histogram,
    help: "How long diskimage-builder ran, by image.",
    labels: &["image"],
    buckets: LONG_BUCKETS,
};
pub const DIB_FAILURES: Family = Family {
    name: "nodepool_builder_dib_failures_total",
    kind: Kind::Counter,
    help: "Builds that failed, by image and cause (exit_code, timeout, no_space, missing_files, gate, session_lost).",
    labels: &["image", "cause"],
    buckets: &[],
};
pub const UPLOADS: Family = Family {
    name: "nodepool_builder_uploads_total",
    kind: Kind::Counter,
    help: "Upload jobs ended, by image, provider and result (ready, failed, skipped).",
    labels: &["image", "provider", "state"],
    buckets: &[],
};
pub const UPLOAD_DURATION: Family = Family {
    name: "nodepool_builder_upload_duration_seconds",
    kind: Kind::Histogram,
    help: "How long a successful upload took (post-upload hook included), by image and provider.",
    labels: &["image", "provider"],
    buckets: LONG_BUCKETS,
};
pub const UPLOADED_BYTES: Family = Family {
    name: "nodepool_builder_uploaded_bytes_total",
    kind: Kind::Counter,
    help: "Bytes of image files uploaded successfully, by provider.",
    labels: &["provider"],
    buckets: &[],
};
pub const UPLOAD_THROUGHPUT: Family = Family {
    name: "nodepool_builder_upload_throughput_bytes_per_second",
    kind: Kind::Gauge,
    help: "Throughput of the latest successful upload, by provider.",
    labels: &["provider"],
    buckets: &[],
};
pub const ZK_CONNECTED: Family = Family {
    name: "nodepool_builder_zookeeper_connected",
    kind: Kind::Gauge,
    help: "1 while the ZooKeeper session is connected, else 0.",
    labels: &[],
    buckets: &[],
};
pub const ZK_SESSION_LOSSES: Family = Family {
    name: "nodepool_builder_zookeeper_session_losses_total",
    kind: Kind::Counter,
    help: "ZooKeeper sessions lost (expired: every lock and ephemeral node gone).",
    labels: &[],
    buckets: &[],
};
pub const ZK_RECONNECTS: Family = Family {
    name: "nodepool_builder_zookeeper_reconnects_total",
    kind: Kind::Counter,
    help: "Connections to ZooKeeper after the first: resumed sessions and new sessions.",
    labels: &[],
    buckets: &[],
};
pub const COMPONENT_REGISTERED: Family = Family {
    name: "nodepool_builder_component_registered",
    kind: Kind::Gauge,
    help: "1 while the builder component is registered in the current ZooKeeper session.",
    labels: &[],
    buckets: &[],
};
pub const READY: Family = Family {
    name: "nodepool_builder_ready",
    kind: Kind::Gauge,
    help: "1 once start-up is done (component registered or given up waiting for, first image tree read).",
    labels: &[],
    buckets: &[],
};
pub const JANITOR_DURATION: Family = Family {
    name: "nodepool_builder_janitor_pass_duration_seconds",
    kind: Kind::Histogram,
    help: "How long a janitor (cleanup) pass took.",
    labels: &[],
    buckets: SHORT_BUCKETS,
};
pub const JANITOR_DELETIONS: Family = Family {
    name: "nodepool_builder_janitor_deletions_total",
    kind: Kind::Counter,
    help: "What janitor passes deleted, by kind (build, upload, local_file).",
    labels: &["kind"],
    buckets: &[],
};
pub const JANITOR_ERRORS: Family = Family {
    name: "nodepool_builder_janitor_errors_total",
    kind: Kind::Counter,
    help: "Errors met by janitor passes (retried on a later pass).",
    labels: &[],
    buckets: &[],
};
pub const LEAKED_IMAGES_DELETED: Family = Family {
    name: "nodepool_builder_leaked_images_deleted_total",
    kind: Kind::Counter,
    help: "Cloud images without a record (leaked) deleted, by provider.",
    labels: &["provider"],
    buckets: &[],
};
pub const WORKERS: Family = Family {
    name: "nodepool_builder_workers",
    kind: Kind::Gauge,
    help: "Workers of each pool (build, upload), by state (busy, idle).",
    labels: &["pool", "state"],
    buckets: &[],
};
pub const QUEUE_DEPTH: Family = Family {
    name: "nodepool_builder_queue_depth",
    kind: Kind::Gauge,
    help: "Work waiting for a worker: build_requests (builds requested or handed over, not yet running), uploads (uploads due or handed over while every upload worker is busy).",
    labels: &["queue"],
    buckets: &[],
};

/// Every family, in the order they are served.
pub const RUNNING_BUILD: Family = Family {
    name: "nodepool_builder_running_build_seconds",
    kind: Kind::Gauge,
    help: "Seconds each running build has been running (the progress table).",
    labels: &["image", "build_id"],
    buckets: &[],
};
pub const RUNNING_UPLOAD: Family = Family {
    name: "nodepool_builder_running_upload_seconds",
    kind: Kind::Gauge,
    help: "Seconds each running upload has been running (the progress table).",
    labels: &["image", "build_id", "provider"],
    buckets: &[],
};
pub const UPLOAD_SENT: Family = Family {
    name: "nodepool_builder_running_upload_sent_bytes",
    kind: Kind::Gauge,
    help: "Bytes a running upload has sent so far (streaming drivers only).",
    labels: &["image", "build_id", "provider"],
    buckets: &[],
};
pub const UPLOAD_SIZE: Family = Family {
    name: "nodepool_builder_running_upload_size_bytes",
    kind: Kind::Gauge,
    help: "Size of the file a running upload sends (streaming drivers only).",
    labels: &["image", "build_id", "provider"],
    buckets: &[],
};

pub const FAMILIES: &[&Family] = &[
    &BUILDS,
    &BUILD_DURATION,
    &DIB_FAILURES,
    &UPLOADS,
    &UPLOAD_DURATION,
    &UPLOADED_BYTES,
    &UPLOAD_THROUGHPUT,
    &ZK_CONNECTED,
    &ZK_SESSION_LOSSES,
    &ZK_RECONNECTS,
    &COMPONENT_REGISTERED,
    &READY,
    &JANITOR_DURATION,
    &JANITOR_DELETIONS,
    &JANITOR_ERRORS,
    &LEAKED_IMAGES_DELETED,
    &WORKERS,
    &QUEUE_DEPTH,
    &RUNNING_BUILD,
    &RUNNING_UPLOAD,
    &UPLOAD_SENT,
    &UPLOAD_SIZE,
];

/// Why a build failed, as the `cause` label of [`DIB_FAILURES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureCause {
    /// DIB exited non-zero, was killed by a signal, or could not be run.
    ExitCode,
    /// `build-timeout` passed.
    Timeout,
    /// Too little free space: before the build (`images-dir-required-free`) or DIB's own
    /// out-of-space failure found in its log.
    NoSpace,
    /// DIB exited 0 without writing every format.
    MissingFiles,
    /// The image gate refused the build.
    Gate,
    /// The ZooKeeper session was lost while DIB ran.
    SessionLost,
}

impl FailureCause {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCause::ExitCode => "exit_code",
            FailureCause::Timeout => "timeout",
            FailureCause::NoSpace => "no_space",
            FailureCause::MissingFiles => "missing_files",
            FailureCause::Gate => "gate",
            FailureCause::SessionLost => "session_lost",
        }
    }
}

#[derive(Clone, Debug)]
enum Value {
    Number(f64),
    Histogram {
        /// Per bucket (not cumulative); the last entry is `+Inf`.
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

/// The metric values of one process.
pub struct Metrics {
    values: Mutex<BTreeMap<&'static str, BTreeMap<Vec<String>, Value>>>,
    ready: AtomicBool,
    /// Whether values are kept at all: only when something can read them.
    recording: AtomicBool,
}

impl Default for Metrics {
    /// A recording registry (the process-wide one starts off: see [`global`]).
    fn default() -> Metrics {
        Metrics {
            values: Mutex::default(),
            ready: AtomicBool::new(false),
            recording: AtomicBool::new(true),
        }
    }
}

/// The process-wide metrics. They record nothing until [`Metrics::start_recording`] (the
/// `webapp` endpoint does, when it is configured): without a reader, keeping values would only
/// cost memory and touch code in every scheduler turn, which shows in idle RSS (most of it is
/// code pages).
pub fn global() -> &'static Metrics {
    static GLOBAL: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get_or_init(|| Metrics {
        recording: AtomicBool::new(false),
        ..Metrics::default()
    })
}

impl Metrics {
    /// From now on values are kept (once something will read them).
    pub fn start_recording(&self) {
        self.recording.store(true, Ordering::Relaxed);
    }

    fn with(&self, family: &'static Family, labels: &[&str], f: impl FnOnce(&mut Value)) {
        if !self.recording.load(Ordering::Relaxed) {
            return;
        }
        debug_assert_eq!(labels.len(), family.labels.len(), "{}", family.name);
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let samples = values.entry(family.name).or_default();
        let value = samples
            .entry(labels.iter().map(|l| l.to_string()).collect())
            .or_insert_with(|| match family.kind {
                Kind::Histogram => Value::Histogram {
                    counts: vec![0; family.buckets.len() + 1],
                    sum: 0.0,
                    count: 0,
                },
                Kind::Counter | Kind::Gauge => Value::Number(0.0),
            });
        f(value)
    }

    /// Adds `by` to a counter (or gauge).
    pub fn add(&self, family: &'static Family, labels: &[&str], by: f64) {
        self.with(family, labels, |v| {
            if let Value::Number(n) = v {
                *n += by;
            }
        });
    }

    /// Sets a gauge.
    pub fn set(&self, family: &'static Family, labels: &[&str], to: f64) {
        self.with(family, labels, |v| {
            if let Value::Number(n) = v {
                *n = to;
            }
        });
    }

    /// Replaces the samples of the running-job gauges with the progress table's rows, so a
    /// finished job's series ends with it.
    pub fn running(&self, jobs: &[crate::progress::Progress]) {
        use crate::progress::Progress;
        {
            let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
            for family in [&RUNNING_BUILD, &RUNNING_UPLOAD, &UPLOAD_SENT, &UPLOAD_SIZE] {
                values.remove(family.name);
            }
        }
        for job in jobs {
            let secs = job.elapsed().as_secs_f64();
            match job {
                Progress::Build {
                    image, build_id, ..
                } => self.set(&RUNNING_BUILD, &[image, build_id], secs),
                Progress::Upload {
                    image,
                    build_id,
                    provider,
                    transfer,
                    ..
                } => {
                    let labels = [image.as_str(), build_id, provider];
                    self.set(&RUNNING_UPLOAD, &labels, secs);
                    if let Some(t) = transfer {
                        self.set(&UPLOAD_SENT, &labels, t.sent as f64);
                        self.set(&UPLOAD_SIZE, &labels, t.total as f64);
                    }
                }
            }
        }
    }

    /// Counts one observation in a histogram.
    pub fn observe(&self, family: &'static Family, labels: &[&str], value: f64) {
        self.with(family, labels, |v| {
            if let Value::Histogram { counts, sum, count } = v {
                let i = family
                    .buckets
                    .iter()
                    .position(|b| value <= *b)
                    .unwrap_or(family.buckets.len());
                counts[i] += 1;
                *sum += value;
                *count += 1;
            }
        });
    }

    /// A DIB run ended after `took`.
    pub fn dib_ran(&self, image: &str, took: Duration) {
        self.observe(&BUILD_DURATION, &[image], took.as_secs_f64());
    }

    /// A build failed for `cause`.
    pub fn build_failed(&self, image: &str, cause: FailureCause) {
        self.add(&DIB_FAILURES, &[image, cause.as_str()], 1.0);
    }

    /// A build job ended with `state` (`ready`, `failed`, `skipped`, `no_space`).
    pub fn build_ended(&self, image: &str, state: &str) {
        self.add(&BUILDS, &[image, state], 1.0);
    }

    /// An upload job ended with `state` (`ready`, `failed`, `skipped`).
    pub fn upload_ended(&self, image: &str, provider: &str, state: &str) {
        self.add(&UPLOADS, &[image, provider, state], 1.0);
    }

    /// A successful upload of `bytes` that took `took`.
    pub fn uploaded(&self, image: &str, provider: &str, bytes: u64, took: Duration) {
        let secs = took.as_secs_f64();
        self.observe(&UPLOAD_DURATION, &[image, provider], secs);
        self.add(&UPLOADED_BYTES, &[provider], bytes as f64);
        if secs > 0.0 {
            self.set(&UPLOAD_THROUGHPUT, &[provider], bytes as f64 / secs);
        }
    }

    /// A janitor pass ended.
    pub fn janitor_pass(
        &self,
        took: Duration,
        builds: usize,
        uploads: usize,
        files: usize,
        errors: usize,
    ) {
        self.observe(&JANITOR_DURATION, &[], took.as_secs_f64());
        for (kind, n) in [
            ("build", builds),
            ("upload", uploads),
            ("local_file", files),
        ] {
            self.add(&JANITOR_DELETIONS, &[kind], n as f64);
        }
        self.add(&JANITOR_ERRORS, &[], errors as f64);
    }

    /// A leaked cloud image was deleted.
    pub fn leaked_image_deleted(&self, provider: &str) {
        self.add(&LEAKED_IMAGES_DELETED, &[provider], 1.0);
    }

    /// The ZooKeeper session was lost.
    pub fn zk_session_lost(&self) {
        self.add(&ZK_SESSION_LOSSES, &[], 1.0);
    }

    /// Connected again, after the first connection: a resumed or a new session.
    pub fn zk_reconnected(&self) {
        self.add(&ZK_RECONNECTS, &[], 1.0);
    }

    /// The scheduler's view of its workers and of the waiting build requests.
    pub fn workers(&self, pool: &str, busy: u64, total: u64, waiting: Option<u64>) {
        self.set(&WORKERS, &[pool, "busy"], busy as f64);
        self.set(&WORKERS, &[pool, "idle"], total.saturating_sub(busy) as f64);
        if let Some(w) = waiting {
            let queue = if pool == "build" {
                "build_requests"
            } else {
                "uploads"
            };
            self.set(&QUEUE_DEPTH, &[queue], w as f64);
        }
    }

    /// Start-up is done (or, with false, shutdown has begun).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The text exposition of every family, with the scrape-time gauges `connected` and
    /// `registered` (the caller reads them from the session).
    pub fn render(&self, connected: bool, registered: bool) -> String {
        self.set(&ZK_CONNECTED, &[], f64::from(u8::from(connected)));
        self.set(&COMPONENT_REGISTERED, &[], f64::from(u8::from(registered)));
        self.set(&READY, &[], f64::from(u8::from(self.is_ready())));
        self.running(&crate::progress::snapshot());
        for f in [&ZK_SESSION_LOSSES, &ZK_RECONNECTS, &JANITOR_ERRORS] {
            self.add(f, &[], 0.0);
        }
        self.render_values()
    }

    /// The text format of the values as they are, without refreshing the live gauges.
    fn render_values(&self) -> String {
        let values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::with_capacity(4096);
        for family in FAMILIES {
            let _ = writeln!(out, "# HELP {} {}", family.name, escape_help(family.help));
            let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind.as_str());
            let Some(samples) = values.get(family.name) else {
                continue;
            };
            for (labels, value) in samples {
                let pairs: Vec<(&str, &str)> = family
                    .labels
                    .iter()
                    .copied()
                    .zip(labels.iter().map(String::as_str))
                    .collect();
                match value {
                    Value::Number(n) => {
                        sample(&mut out, family.name, "", &pairs, None, *n);
                    }
                    Value::Histogram { counts, sum, count } => {
                        let base = family.name;
                        let mut cumulative = 0;
                        for (i, c) in counts.iter().enumerate() {
                            cumulative += c;
                            let le = family
                                .buckets
                                .get(i)
                                .map_or_else(|| "+Inf".to_string(), |b| format_number(*b));
                            sample(
                                &mut out,
                                base,
                                "_bucket",
                                &pairs,
                                Some(&le),
                                cumulative as f64,
                            );
                        }
                        sample(&mut out, base, "_sum", &pairs, None, *sum);
                        sample(&mut out, base, "_count", &pairs, None, *count as f64);
                    }
                }
            }
        }
        out
    }
}

fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    le: Option<&str>,
    value: f64,
) {
    out.push_str(name);
    out.push_str(suffix);
    let mut all: Vec<(&str, &str)> = labels.to_vec();
    if let Some(le) = le {
        all.push(("le", le));
    }
    if !all.is_empty() {
        out.push('{');
        for (i, (k, v)) in all.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_number(value));
}

fn format_number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if v.is_nan() {
        "NaN".to_string()
    } else {
        format!("{v}")
    }
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Help texts escape backslash and line feed.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_inf() {
        let m = Metrics::default();
        m.dib_ran("img", Duration::from_secs(45));
        m.dib_ran("img", Duration::from_secs(100_000));
        let text = m.render(true, true);
        assert!(text.contains(
            "nodepool_builder_build_duration_seconds_bucket{image=\"img\",le=\"30\"} 0\n"
        ));
        assert!(text.contains(
            "nodepool_builder_build_duration_seconds_bucket{image=\"img\",le=\"60\"} 1\n"
        ));
        assert!(text.contains(
            "nodepool_builder_build_duration_seconds_bucket{image=\"img\",le=\"+Inf\"} 2\n"
        ));
        assert!(text.contains("nodepool_builder_build_duration_seconds_count{image=\"img\"} 2\n"));
    }

    #[test]
    fn running_jobs_are_series_while_they_run_and_gone_after() {
        use crate::progress::{Progress, Transfer};
        let m = Metrics::default();
        let upload = Progress::Upload {
            image: "fedora".into(),
            build_id: "ab12".into(),
            provider: "p1".into(),
            elapsed: Duration::from_secs(90),
            transfer: Some(Transfer {
                sent: 1024,
                total: 4096,
                elapsed: Duration::from_secs(80),
            }),
        };
        let build = Progress::Build {
            image: "debian".into(),
            build_id: "cd34".into(),
            elapsed: Duration::from_secs(600),
            last_line: None,
        };
        m.running(&[upload, build]);
        let text = m.render_values();
        let labels = r#"{image="fedora",build_id="ab12",provider="p1"}"#;
        assert!(text.contains(&format!(
            "nodepool_builder_running_upload_seconds{labels} 90\n"
        )));
        assert!(text.contains(&format!(
            "nodepool_builder_running_upload_sent_bytes{labels} 1024\n"
        )));
        assert!(text.contains(&format!(
            "nodepool_builder_running_upload_size_bytes{labels} 4096\n"
        )));
        assert!(text.contains(
            "nodepool_builder_running_build_seconds{image=\"debian\",build_id=\"cd34\"} 600\n"
        ));
        m.running(&[]);
        let text = m.render_values();
        assert!(
            !text.contains("nodepool_builder_running_upload_seconds{"),
            "{text}"
        );
        assert!(
            !text.contains("nodepool_builder_running_build_seconds{"),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::default();
        m.build_ended("a\"b\\c\nd", "ready");
        let text = m.render(false, false);
        assert!(
            text.contains(r#"nodepool_builder_builds_total{image="a\"b\\c\nd",state="ready"} 1"#)
        );
        assert!(text.contains("nodepool_builder_zookeeper_connected 0\n"));
    }
}
