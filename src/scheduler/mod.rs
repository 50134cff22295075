//! The `scheduler` thread: the only owner of scheduling state, a closed event loop around
//! the pure decisions of [`core`].
//!
//! # The loop
//!
//! Each turn: `Sources::next_event` waits for one `Event` (a `select_biased!` over, in
//! priority order, control signals (stop, reload), build outcomes, upload outcomes, janitor
//! reports, ZooKeeper events from the `zk-watch` thread, and one timer for the nearest
//! deadline); `handle` applies it to the state; then the plans hand builds, uploads and a
//! janitor pass to idle workers; the turn is timed once ("overly long scheduler loop turn").
//! Under systemd each turn is stamped for the watchdog (which is fed only while the loop
//! turns; an idle loop turns on a local timer every quarter watchdog interval, without any
//! ZooKeeper traffic), and the `STATUS=` line is sent when it changed (`service`).
//! Nothing polls: a `request-build` znode appearing reaches the scheduler as a
//! [`ZkEvent::RequestBuild`] within milliseconds, and the job is handed to an idle build
//! worker at once.
//!
//! Every source is either live or `never()` (see [`Sources`]): with cleanup disabled there
//! is no janitor channel at all, and a source whose senders vanish becomes
//! `Event::SourceEnded` once and is replaced by `never()`, never spun on; what its end
//! means (stop, or go on without that work) is decided in one place, `handle`.
//!
//! The workers (build and upload pools, the janitor, the watcher) and the provider drivers
//! are created by `app` and handed in ([`Setup`]); the scheduler shuts them down in order.
//!
//! # Decisions
//!
//! Every decision is a pure function in [`core`] over the state and a [`core::Clock`] read
//! once per turn, unit-tested without servers: what to build and why (wire spec §3.1–§3.4:
//! not paused by config or by the ZooKeeper `pause` znode, a non-empty format set, and a
//! `request-build` znode, no ready build, an expired `rebuild-age` or a missing format),
//! which uploads to start (§3.6), when to wake, the back-off, and the janitor's retention
//! (§3.7, with nodepool 11's recency bridge). Each build carries its cause into the log
//! ("rebuild-age expired: newest ready build is 26h old"). The worker repeats the check
//! under the image build lock, as upstream does.
//!
//! # Back-off
//!
//! A failed build is retried after `retry-backoff-initial`, doubling up to
//! `retry-backoff-max`; a build skipped because another builder holds the lock waits for
//! that image's build records to change (or the initial back-off). Upstream retries failures
//! every 10 s with no back-off.
//!
//! # Shutdown
//!
//! On stop: no new jobs; the cancel channel is dropped, which stops running DIB process
//! groups (SIGTERM, then SIGKILL after the grace period); the outcomes of running jobs are
//! awaited (so their records say `failed` and their locks are released), then the pool joins.
//! Never `?` out of the loop: per-image problems are logged and the loop goes on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, after, never, select_biased};
use log::{debug, error, info, warn};

use crate::build::{self, BuildEnv, BuildJob, BuildOutcome, BuildPool, BuildResult};
use crate::cleanup::{CleanupReport, CleanupRequest, ImageSnapshot, Janitor};
use crate::config::{self, Config};
use crate::metrics::{self, FailureCause};
use crate::model;
use crate::provider::ProviderDriver;
use crate::service::{self, Service};
use crate::signals::ControlSignal;
use crate::stats::{self, Stats};
use crate::upload::{UploadJob, UploadOutcome, UploadPool, UploadResult};
use crate::zk::tree;
use crate::zk::watcher::{WatchCmd, Watcher, ZkEvent};
use crate::zk::{ConnState, Zk};

pub mod core;

use self::core::{
    Backoff, BuildFollowUp, Clock, ImageState, Timers, UploadFollowUp, UploadSlot,
    apply_build_result, apply_upload_result, next_wake, plan_builds, required_formats,
    upload_candidates,
};

/// How long a stop waits for running builds to report after cancelling them.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// Events are coalesced for this long before a janitor pass runs.
const CLEANUP_DEBOUNCE: Duration = Duration::from_millis(500);

/// Everything the scheduler is started with; `app` creates the workers and the drivers.
pub struct Setup {
    pub zk: Zk,
    pub cfg: Arc<Config>,
    pub config_path: PathBuf,
    pub secure_path: Option<PathBuf>,
    pub load_options: config::LoadOptions,
    pub build_workers: usize,
    pub upload_workers: usize,
    pub builder_id: String,
    pub fqdn: String,
    pub stats: Stats,
    /// The provider drivers of `cfg`.
    pub drivers: Drivers,
    /// Sets the drivers up again for a reloaded config.
    pub make_drivers: fn(&Config) -> Drivers,
    pub workers: Workers,
    pub sources: Sources,
    /// systemd: the loop's liveness for the watchdog, `STATUS=`, `STOPPING=1`.
    pub service: Service,
}

/// The provider drivers of one config.
pub struct Drivers {
    /// One driver per configured provider that could be set up.
    pub drivers: BTreeMap<String, Arc<dyn ProviderDriver>>,
    /// The image format of every configured provider.
    pub formats: BTreeMap<String, String>,
}

/// The threads the scheduler hands work to; it shuts them down in order when it stops.
pub struct Workers {
    pub builds: BuildPool,
    /// Dropping it stops running builds (their DIB process groups).
    pub cancel_builds: Sender<()>,
    pub uploads: UploadPool,
    /// `None` when `cleanup-interval` is 0 (cleanup disabled, as upstream).
    pub janitor: Option<Janitor>,
    pub watcher: Watcher,
}

/// Runs the scheduler loop until a stop signal; returns after ordered shutdown of the
/// workers.
pub fn run(setup: Setup) {
    let Setup {
        workers,
        mut sources,
        drivers,
        ..
    } = setup;
    let cancel_builds = workers.cancel_builds;
    // The loop replaces an ended source by `never()`; the shutdown still wants to see the
    // end of the build outcomes at once.
    let build_outcomes = sources.builds.clone();
    let mut s = Scheduler {
        zk: setup.zk,
        formats: required_formats(&setup.cfg, &drivers.formats),
        cfg: setup.cfg,
        config_path: setup.config_path,
        secure_path: setup.secure_path,
        load_options: setup.load_options,
        builder_id: setup.builder_id,
        fqdn: setup.fqdn,
        images: BTreeMap::new(),
        stats: setup.stats,
        build_workers: setup.build_workers,
        upload_workers: setup.upload_workers,
        drivers: drivers.drivers,
        provider_formats: drivers.formats,
        make_drivers: setup.make_drivers,
        slots: BTreeMap::new(),
        pool: workers.builds,
        uploads: workers.uploads,
        janitor: workers.janitor,
        cleanup_due: Some(Instant::now()),
        cleanup_running: false,
        cleanup_full: true,
        watcher: workers.watcher,
        next_verify: Instant::now(),
        stopping: false,
        uploads_waiting: 0,
        service: setup.service,
    };
    s.next_verify = Instant::now() + s.verify_interval();
    s.run_loop(&mut sources);
    // As before the loop was a turn-by-turn affair: the sources go with it (the watcher and
    // the workers see their result channels closed from here on).
    drop(sources);

    // Ordered shutdown: cancel running builds, collect their outcomes, join the workers.
    drop(cancel_builds);
    let deadline = Instant::now() + STOP_WAIT + build::DIB_GRACE;
    while s.images.values().any(|i| i.in_flight) {
        match build_outcomes.recv_deadline(deadline) {
            Ok(outcome) => s.on_build(outcome),
            Err(_) => {
                warn!(
                    "builds still running after the stop grace period; leaving them to the next start"
                );
                break;
            }
        }
    }
    let Scheduler {
        pool,
        uploads,
        watcher,
        janitor,
        ..
    } = s;
    drop(janitor);
    drop(watcher);
    // Builds are waited for; uploads for `upload::UPLOAD_GRACE` at most (`pool` docs).
    pool.shutdown();
    uploads.shutdown();
}

struct Scheduler {
    zk: Zk,
    cfg: Arc<Config>,
    config_path: PathBuf,
    secure_path: Option<PathBuf>,
    load_options: config::LoadOptions,
    builder_id: String,
    fqdn: String,
    /// Required formats per configured image.
    formats: BTreeMap<String, BTreeSet<String>>,
    images: BTreeMap<String, ImageState>,
    stats: Stats,
    build_workers: usize,
    upload_workers: usize,
    /// One driver per configured provider that could be set up.
    drivers: BTreeMap<String, Arc<dyn ProviderDriver>>,
    /// The image format of every configured provider.
    provider_formats: BTreeMap<String, String>,
    make_drivers: fn(&Config) -> Drivers,
    slots: BTreeMap<(String, String), UploadSlot>,
    pool: BuildPool,
    uploads: UploadPool,
    /// `None` when `cleanup-interval` is 0 (cleanup disabled, as upstream).
    janitor: Option<Janitor>,
    /// When the next janitor pass should start.
    cleanup_due: Option<Instant>,
    cleanup_running: bool,
    /// The next pass reads the whole tree instead of using the watched snapshot.
    cleanup_full: bool,
    watcher: Watcher,
    next_verify: Instant,
    stopping: bool,
    /// Uploads due that found every upload worker busy at the last planning (a gauge).
    uploads_waiting: u64,
    service: Service,
}

/// Every source the scheduler loop selects on, in priority order.
///
/// A source whose senders are all gone is replaced by `never()` the moment its end is seen:
/// a disconnected receiver is always ready, and would starve every source after it (with
/// cleanup disabled, a dropped janitor channel once kept the loop spinning one core and
/// `request-build` znodes unserved). Each end is a decision, logged once (see
/// `Scheduler::handle`): the signal handler or the ZooKeeper watcher gone stops the daemon;
/// a worker pool or the janitor gone is an error the daemon survives without that work.
pub struct Sources {
    pub signals: Receiver<ControlSignal>,
    pub zk: Receiver<ZkEvent>,
    pub builds: Receiver<BuildOutcome>,
    pub uploads: Receiver<UploadOutcome>,
    /// `never()` when cleanup is disabled.
    pub cleanup: Receiver<CleanupReport>,
}

/// Which source ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Signals,
    Builds,
    Uploads,
    Cleanup,
    Zk,
}

/// One thing the loop reacts to.
enum Event {
    Signal(ControlSignal),
    BuildDone(BuildOutcome),
    UploadDone(UploadOutcome),
    CleanupDone(CleanupReport),
    Zk(ZkEvent),
    /// The nearest deadline passed.
    Timer,
    /// Every sender of this source is gone; it is `never()` from now on.
    SourceEnded(Source),
}

/// Whether the loop goes on after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

impl Sources {
    /// Waits for the next event, sources in priority order, the timer last; `wake` is the
    /// nearest deadline. A source's end becomes [`Event::SourceEnded`], once: the source is
    /// `never()` afterwards.
    fn next_event(&mut self, wake: Instant) -> Event {
        let timer = after(wake.saturating_duration_since(Instant::now()));
        let ended = select_biased! {
            recv(self.signals) -> m => match m {
                Ok(sig) => return Event::Signal(sig),
                Err(_) => Source::Signals,
            },
            recv(self.builds) -> m => match m {
                Ok(outcome) => return Event::BuildDone(outcome),
                Err(_) => Source::Builds,
            },
            recv(self.uploads) -> m => match m {
                Ok(outcome) => return Event::UploadDone(outcome),
                Err(_) => Source::Uploads,
            },
            recv(self.cleanup) -> m => match m {
                Ok(report) => return Event::CleanupDone(report),
                Err(_) => Source::Cleanup,
            },
            recv(self.zk) -> m => match m {
                Ok(ev) => return Event::Zk(ev),
                Err(_) => Source::Zk,
            },
            recv(timer) -> _ => return Event::Timer,
        };
        match ended {
            Source::Signals => self.signals = never(),
            Source::Builds => self.builds = never(),
            Source::Uploads => self.uploads = never(),
            Source::Cleanup => self.cleanup = never(),
            Source::Zk => self.zk = never(),
        }
        Event::SourceEnded(ended)
    }
}

impl Scheduler {
    /// The loop: wait for one event, handle it, plan, time the turn.
    fn run_loop(&mut self, src: &mut Sources) {
        crate::registry::set_activity("scheduling");
        loop {
            // Under systemd's watchdog an idle loop turns too, on a local timer.
            let wake = match self.service.heartbeat() {
                Some(beat) => self.next_wake().min(Instant::now() + beat),
                None => self.next_wake(),
            };
            let event = src.next_event(wake);
            self.service.turned();
            let started = Instant::now();
            if self.handle(event) == Flow::Stop {
                metrics::global().set_ready(false);
                self.stopping = true;
                self.service.stopping();
                return;
            }
            self.plan();
            self.plan_uploads();
            self.maybe_start_cleanup();
            self.service.status(&self.status_line());
            self.publish_metrics();
            let took = started.elapsed();
            if took > Duration::from_millis(200) {
                warn!("overly long scheduler loop turn: {took:?}");
            }
        }
    }

    /// Applies one event to the state.
    fn handle(&mut self, event: Event) -> Flow {
        match event {
            Event::Signal(ControlSignal::Shutdown) => {
                info!("Stopping: no new builds; cancelling running builds");
                return Flow::Stop;
            }
            Event::Signal(ControlSignal::Reload) => self.reload(),
            Event::BuildDone(outcome) => {
                self.on_build(outcome);
                self.cleanup_soon();
            }
            Event::UploadDone(outcome) => {
                self.on_upload(outcome);
                self.cleanup_soon();
            }
            Event::CleanupDone(report) => self.on_cleanup(report),
            Event::Zk(ev) => self.on_zk(ev),
            Event::Timer => {
                if Instant::now() >= self.next_verify {
                    self.next_verify = Instant::now() + self.verify_interval();
                    debug!("safety rescan");
                    self.watcher.send(WatchCmd::Verify);
                }
            }
            Event::SourceEnded(Source::Signals) => {
                error!("the signal handler is gone; stopping");
                return Flow::Stop;
            }
            Event::SourceEnded(Source::Builds) => {
                error!("every build worker is gone; no more builds until a restart");
            }
            Event::SourceEnded(Source::Uploads) => {
                error!("every upload worker is gone; no more uploads until a restart");
            }
            Event::SourceEnded(Source::Cleanup) => {
                error!("the cleanup thread is gone; no more cleanup until a restart");
                self.janitor = None;
            }
            Event::SourceEnded(Source::Zk) => {
                error!("the ZooKeeper watcher stopped; stopping");
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    fn verify_interval(&self) -> Duration {
        Duration::from_secs_f64(self.cfg.resync_interval.max(0.1))
    }

    fn state(&mut self, image: &str) -> &mut ImageState {
        self.images.entry(image.to_string()).or_default()
    }

    fn on_zk(&mut self, ev: ZkEvent) {
        match ev {
            ZkEvent::Images(names) => {
                for name in names {
                    self.state(&name);
                }
            }
            ZkEvent::Pause { image, paused } => {
                let st = self.state(&image);
                if st.paused_zk != paused {
                    info!(
                        "image={image}: builds {} by the pause znode",
                        if paused { "paused" } else { "unpaused" }
                    );
                }
                st.paused_zk = paused;
            }
            ZkEvent::RequestBuild { image, requested } => {
                // A fresh request is worth an immediate try, unless a failure back-off runs.
                if self.state(&image).set_requested(requested) {
                    debug!("image={image}: request-build znode appeared");
                }
            }
            ZkEvent::Builds {
                image,
                builds,
                unreadable,
            } => {
                self.cleanup_soon();
                // A skip waits for the other builder's records to change: they just did.
                self.state(&image).set_builds(builds, unreadable);
            }
            ZkEvent::Resynced => {
                debug!("watches re-armed; state re-read");
                // The first one ends start-up: the image tree has been read.
                metrics::global().set_ready(true);
                // After a gap, the janitor's next pass reads ZooKeeper itself.
                self.cleanup_full = true;
                self.cleanup_soon();
            }
            ZkEvent::Session(ev) => debug!(
                "zookeeper session {:?} (generation {})",
                ev.state, ev.generation
            ),
        }
    }

    fn on_build(&mut self, outcome: BuildOutcome) {
        let b = Backoff::of(&self.cfg);
        let image = outcome.image.clone();
        let st = self.state(&image);
        if let Some(builds) = outcome.builds {
            st.builds = builds;
        }
        let follow = apply_build_result(st, &outcome.result, outcome.manual, b, Instant::now());
        let m = metrics::global();
        m.build_ended(&image, build_state_label(&outcome.result));
        if matches!(outcome.result, BuildResult::NoSpace { .. }) {
            m.build_failed(&image, FailureCause::NoSpace);
        }
        match (&outcome.result, follow) {
            (BuildResult::Ready { build_id, .. }, _) => {
                debug!("image={image} build={build_id}: ready");
            }
            (
                BuildResult::Failed {
                    build_id, reason, ..
                },
                BuildFollowUp::Retry { delay, failures },
            ) => warn!(
                "image={image} build={}: build failed ({reason}); retrying in {:.0}s (failure {failures})",
                build_id.as_deref().unwrap_or("-"),
                delay.as_secs_f64(),
            ),
            (BuildResult::Skipped { reason }, _) => {
                debug!("image={image}: build skipped: {reason}");
            }
            (
                BuildResult::NoSpace {
                    free_gib,
                    required_gib,
                },
                BuildFollowUp::NoSpace { first: true },
            ) => warn!(
                "image={image}: not building: images-dir has {free_gib:.1} GiB free, {required_gib} GiB required; will start when space returns"
            ),
            _ => {}
        }
    }

    fn reload(&mut self) {
        match config::load_with(
            &self.config_path,
            self.secure_path.as_deref(),
            &self.load_options,
        ) {
            Ok(cfg) => {
                info!("Configuration reloaded from {}", self.config_path.display());
                if cfg.zookeeper_servers != self.cfg.zookeeper_servers
                    || cfg.zookeeper_tls != self.cfg.zookeeper_tls
                    || cfg.zookeeper_auth != self.cfg.zookeeper_auth
                    || cfg.zookeeper_timeout != self.cfg.zookeeper_timeout
                {
                    // Upstream's reload breaks here (quirk Q3); we keep the session and say so.
                    warn!("zookeeper-* settings changed: they take effect at the next restart");
                }
                crate::progress::set_interval(cfg.progress_interval);
                if cfg.builder_webapp != self.cfg.builder_webapp {
                    warn!("builder-webapp changed: it takes effect at the next restart");
                }
                self.cfg = Arc::new(cfg);
                self.make_drivers();
                self.watcher.send(WatchCmd::Images(image_names(&self.cfg)));
                self.cleanup_soon();
            }
            Err(errors) => error!(
                "Configuration {} is invalid; keeping the running configuration:\n{errors}",
                self.config_path.display()
            ),
        }
    }

    /// Hands every needed build to an idle worker.
    fn plan(&mut self) {
        if self.stopping || self.zk.state() != ConnState::Connected {
            return;
        }
        for d in &self.cfg.diskimages {
            self.images.entry(d.name.clone()).or_default();
        }
        let plan = plan_builds(&self.cfg, &self.formats, &self.images, self.clock());
        for (image, cause) in plan {
            let d = self
                .cfg
                .diskimage(&image)
                .expect("planned from the config")
                .clone();
            let st = &self.images[&image];
            let job = BuildJob {
                image: image.clone(),
                formats: self.formats[&image].iter().cloned().collect(),
                diskimage: d,
                cause: cause.to_string(),
                manual: cause.manual(),
                seen_newest_ready: tree::newest_ready(&st.builds).map(|b| b.id.clone()),
                env: BuildEnv {
                    images_dir: self.cfg.images_dir.clone(),
                    build_log_dir: self.cfg.build_log_dir.clone(),
                    build_log_retention: self.cfg.build_log_retention,
                    elements_dir: self.cfg.elements_dir.clone(),
                    required_free_gib: self.cfg.images_dir_required_free,
                    image_gate: self.cfg.image_gate,
                    builder_id: self.builder_id.clone(),
                    fqdn: self.fqdn.clone(),
                },
            };
            debug!("image={image}: handing a build to a worker: {}", job.cause);
            if !self.pool.try_submit(job) {
                debug!("every build worker is busy; image={image} waits");
                return;
            }
            self.state(&image).in_flight = true;
        }
    }

    /// This turn's time, for the pure decisions.
    fn clock(&self) -> Clock {
        Clock {
            now: Instant::now(),
            epoch: model::now_epoch(),
        }
    }

    /// Asks for a janitor pass shortly (events coalesce).
    fn cleanup_soon(&mut self) {
        let t = Instant::now() + CLEANUP_DEBOUNCE;
        self.cleanup_due = Some(self.cleanup_due.map_or(t, |d| d.min(t)));
    }

    fn maybe_start_cleanup(&mut self) {
        let Some(janitor) = &self.janitor else { return };
        if self.stopping
            || self.cleanup_running
            || self.cleanup_due.is_none_or(|d| d > Instant::now())
        {
            return;
        }
        if self.zk.state() != ConnState::Connected {
            return;
        }
        let snapshot = (!self.cleanup_full).then(|| {
            self.images
                .iter()
                .map(|(name, st)| {
                    (
                        name.clone(),
                        ImageSnapshot {
                            builds: st.builds.clone(),
                            unreadable: st.unreadable.clone(),
                        },
                    )
                })
                .collect()
        });
        let abandoned = self
            .images
            .iter()
            .flat_map(|(name, st)| st.abandoned.iter().map(|id| (name.clone(), id.clone())))
            .collect();
        let req = CleanupRequest {
            cfg: self.cfg.clone(),
            drivers: self.drivers.clone(),
            provider_formats: self.provider_formats.clone(),
            snapshot,
            abandoned,
        };
        if janitor.request(req) {
            self.cleanup_running = true;
            self.cleanup_due = None;
            self.cleanup_full = false;
        }
    }

    fn on_cleanup(&mut self, report: CleanupReport) {
        self.cleanup_running = false;
        metrics::global().janitor_pass(
            report.took,
            report.deleted_builds,
            report.deleted_uploads,
            report.deleted_files,
            report.errors,
        );
        for (image, id) in &report.abandoned_resolved {
            if let Some(st) = self.images.get_mut(image) {
                st.abandoned.remove(id);
            }
        }
        self.emit_gauges();
        let periodic = Instant::now() + Duration::from_secs_f64(self.cfg.cleanup_interval.max(0.1));
        let mut due = self.cleanup_due.map_or(periodic, |d| d.min(periodic));
        if let Some(r) = report.retry_at {
            due = due.min(r);
        }
        self.cleanup_due = Some(due);
        if report.deleted_builds + report.deleted_uploads + report.deleted_files > 0
            || report.errors > 0
        {
            info!(
                "cleanup: deleted {} builds, {} uploads, {} local files; {} errors ({:?})",
                report.deleted_builds,
                report.deleted_uploads,
                report.deleted_files,
                report.errors,
                report.took
            );
        }
    }

    /// The workers' and the waiting requests' gauges, after every loop turn.
    fn publish_metrics(&self) {
        let m = metrics::global();
        let builds = self.images.values().filter(|s| s.in_flight).count() as u64;
        let waiting = self
            .images
            .values()
            .filter(|s| s.requested && !s.in_flight)
            .count() as u64;
        let running = builds.min(self.build_workers as u64);
        m.workers(
            "build",
            running,
            self.build_workers as u64,
            Some(builds - running + waiting),
        );
        // Handed to the pool is not yet running: a job may sit in the pool's hand-over slot
        // while every worker is busy, and counts as waiting, like the uploads it refused.
        let uploads = self.slots.values().filter(|s| s.in_flight).count() as u64;
        let running = uploads.min(self.upload_workers as u64);
        m.workers(
            "upload",
            running,
            self.upload_workers as u64,
            Some(uploads - running + self.uploads_waiting),
        );
    }

    /// The per-image state gauges, after every janitor pass, as upstream.
    fn emit_gauges(&self) {
        if !self.stats.enabled() {
            return;
        }
        let mut requests = 0;
        for (image, st) in &self.images {
            let config_paused = self.cfg.diskimage(image).is_some_and(|d| d.pause);
            let build_state = if st.in_flight {
                stats::STATE_BUILDING
            } else if config_paused || st.paused_zk {
                stats::STATE_PAUSED
            } else {
                stats::STATE_IDLE
            };
            let uploads: Vec<(String, u64)> = self
                .cfg
                .providers
                .iter()
                .filter_map(|p| {
                    let pd = p.diskimages.iter().find(|pd| pd.name == *image)?;
                    let busy = self
                        .slots
                        .get(&(image.clone(), p.name.clone()))
                        .is_some_and(|s| s.in_flight);
                    let state = if busy {
                        stats::STATE_UPLOADING
                    } else if pd.pause {
                        stats::STATE_PAUSED
                    } else {
                        stats::STATE_IDLE
                    };
                    Some((p.name.clone(), state))
                })
                .collect();
            requests += u64::from(st.requested);
            self.stats
                .image_states(image, build_state, &uploads, st.requested);
        }
        let builds = self.images.values().filter(|s| s.in_flight).count() as u64;
        let uploads = self.slots.values().filter(|s| s.in_flight).count() as u64;
        self.stats.builder_totals(
            requests,
            builds,
            uploads,
            self.build_workers as u64,
            self.upload_workers as u64,
        );
    }

    /// Sets the provider drivers up for the current config, and the formats they need.
    fn make_drivers(&mut self) {
        let d = (self.make_drivers)(&self.cfg);
        self.drivers = d.drivers;
        self.provider_formats = d.formats;
        self.formats = required_formats(&self.cfg, &self.provider_formats);
    }

    fn on_upload(&mut self, outcome: UploadOutcome) {
        let b = Backoff::of(&self.cfg);
        if let Some(builds) = outcome.builds {
            self.state(&outcome.image).builds = builds;
        }
        let slot = self
            .slots
            .entry((outcome.image.clone(), outcome.provider.clone()))
            .or_default();
        let follow = apply_upload_result(slot, &outcome.result, b, Instant::now());
        metrics::global().upload_ended(
            &outcome.image,
            &outcome.provider,
            match outcome.result {
                UploadResult::Ready { .. } => "ready",
                UploadResult::Failed { .. } => "failed",
                UploadResult::Skipped { .. } => "skipped",
            },
        );
        let (image, build, provider) = (&outcome.image, &outcome.build_id, &outcome.provider);
        match (&outcome.result, follow) {
            (UploadResult::Ready { upload_id, .. }, _) => {
                debug!("image={image} build={build} provider={provider} upload={upload_id}: ready");
            }
            (
                UploadResult::Failed { upload_id, reason },
                UploadFollowUp::Retry { delay, failures },
            ) => warn!(
                "image={image} build={build} provider={provider} upload={}: upload failed ({reason}); retrying in {:.0}s (failure {failures})",
                upload_id.as_deref().unwrap_or("-"),
                delay.as_secs_f64(),
            ),
            (UploadResult::Skipped { reason }, _) => {
                debug!("image={image} build={build} provider={provider}: upload skipped: {reason}");
            }
            _ => {}
        }
    }

    /// Hands every needed upload to an idle worker (see [`core::upload_candidates`]: the
    /// newest ready build of each image, wire spec §1.5, §3.6).
    fn plan_uploads(&mut self) {
        if self.stopping || self.zk.state() != ConnState::Connected {
            return;
        }
        let now = Instant::now();
        let candidates = upload_candidates(
            &self.cfg,
            &self.provider_formats,
            |p| self.drivers.contains_key(p),
            &self.images,
            Path::is_file,
        );
        self.uploads_waiting = 0;
        let mut all_busy = false;
        for c in candidates {
            let slot = self
                .slots
                .entry((c.image.clone(), c.provider.clone()))
                .or_default();
            if !slot.free_for(&c.build_id, now) {
                continue;
            }
            if all_busy {
                self.uploads_waiting += 1;
                continue;
            }
            let (Some(provider), Some(diskimage), Some(driver)) = (
                self.cfg.provider(&c.provider),
                self.cfg.diskimage(&c.image),
                self.drivers.get(&c.provider),
            ) else {
                continue;
            };
            let job = UploadJob {
                image: c.image,
                build_id: c.build_id,
                provider: provider.clone(),
                diskimage: diskimage.clone(),
                format: c.format,
                file: c.file,
                driver: driver.clone(),
            };
            if !self.uploads.try_submit(job) {
                // Every upload worker is busy: this one and the rest due wait (a gauge).
                all_busy = true;
                self.uploads_waiting += 1;
                continue;
            }
            slot.in_flight = true;
        }
    }

    /// The one-line summary for systemd's `STATUS=`.
    fn status_line(&self) -> String {
        let ready = self
            .images
            .values()
            .filter(|st| {
                st.builds
                    .iter()
                    .any(|b| b.build.state == model::BuildState::Ready)
            })
            .count();
        let building = self.images.values().filter(|st| st.in_flight).count();
        let uploading = self.slots.values().filter(|s| s.in_flight).count();
        service::status_line(ready, building, uploading)
    }

    /// The nearest instant something must be re-decided without an event.
    fn next_wake(&self) -> Instant {
        let timers = Timers {
            next_verify: self.next_verify,
            // A pass can start only with a janitor and none running.
            cleanup_due: self
                .cleanup_due
                .filter(|_| self.janitor.is_some() && !self.cleanup_running),
        };
        next_wake(&self.cfg, &self.images, &self.slots, timers, self.clock())
    }
}

/// The configured diskimage names (what the watcher watches).
pub fn image_names(cfg: &Config) -> BTreeSet<String> {
    cfg.diskimages.iter().map(|d| d.name.clone()).collect()
}

/// The `state` label a build job's end is counted under.
fn build_state_label(result: &BuildResult) -> &'static str {
    match result {
        BuildResult::Ready { .. } => "ready",
        BuildResult::Failed { .. } => "failed",
        BuildResult::Skipped { .. } => "skipped",
        BuildResult::NoSpace { .. } => "no_space",
    }
}
