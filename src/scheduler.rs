//! The `scheduler` thread: the only owner of scheduling state.
//!
//! # Overview
//!
//! One `select_biased!` loop over, in priority order: control signals (stop, reload),
//! worker outcomes, ZooKeeper events from the `zk-watch` thread, and one timer for the
//! nearest deadline (a rebuild-age expiry, a retry after back-off, or the slow safety
//! rescan). Nothing polls: a `request-build` znode appearing reaches the scheduler as a
//! [`ZkEvent::RequestBuild`] within milliseconds, and the job is handed to an idle build
//! worker at once.
//!
//! Every source is either live or `never()` (see [`Sources`]): with cleanup disabled there
//! is no janitor channel at all, and a source whose senders vanish is replaced the moment
//! its end is seen, never spun on.
//!
//! # Decisions
//!
//! A configured diskimage needs a build when it is not paused (by config or by the ZooKeeper
//! `pause` znode), has a non-empty format set, has no build of ours in flight, is not waiting
//! out a back-off, and: a `request-build` znode exists, or there is no ready build, or the
//! newest ready build is older than `rebuild-age`, or it lacks a required format. Each
//! decision carries its cause into the log ("rebuild-age expired: newest ready build is 26h
//! old"). The worker repeats the check under the image build lock, as upstream does.
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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, after, never, select_biased};
use log::{debug, error, info, warn};

use crate::build::{self, BuildEnv, BuildJob, BuildOutcome, BuildPool, BuildResult};
use crate::cleanup::{CleanupReport, CleanupRequest, ImageSnapshot, Janitor};
use crate::config::{self, Config};
use crate::model::{self, backoff};
use crate::provider::{self, ProviderDriver};
use crate::signals::ControlSignal;
use crate::stats::{self, Stats};
use crate::upload::{UploadJob, UploadOutcome, UploadPool, UploadResult};
use crate::zk::tree::{self, BuildInfo};
use crate::zk::watcher::{WatchCmd, Watcher, ZkEvent};
use crate::zk::{ConnState, Zk};

/// How long a stop waits for running builds to report after cancelling them.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// Events are coalesced for this long before a janitor pass runs.
const CLEANUP_DEBOUNCE: Duration = Duration::from_millis(500);
/// How long a stop waits for running uploads before leaving them to the next start.
pub const UPLOAD_GRACE: Duration = Duration::from_secs(10);

/// Everything the scheduler is started with.
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
    pub signals: Receiver<ControlSignal>,
}

/// Per-image scheduling state.
#[derive(Debug, Default)]
struct ImageState {
    paused_zk: bool,
    requested: bool,
    builds: Vec<BuildInfo>,
    /// Build znodes with empty or unreadable data (the janitor removes lock-race leftovers).
    unreadable: Vec<String>,
    in_flight: bool,
    /// No attempt before this instant (failure back-off or a skip).
    retry_at: Option<Instant>,
    /// Consecutive failures, for the back-off.
    failures: u32,
    /// The last "not enough free space" was logged (log once until space returns).
    no_space_logged: bool,
    /// Builds of this process whose result could not be recorded: their records still say
    /// `building`. The janitor records them `failed` without waiting for the image build
    /// lock to be free (a rebuild may hold it for a long time meanwhile).
    abandoned: BTreeSet<String>,
}

/// Per (image, provider) upload state.
#[derive(Debug, Default)]
struct UploadSlot {
    in_flight: bool,
    /// The build the failures below were counted for; a newer build starts afresh.
    for_build: Option<String>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// Runs the scheduler loop until a stop signal; returns after ordered shutdown of the pool.
pub fn run(setup: Setup) {
    let (zk_tx, zk_rx) = crossbeam_channel::unbounded();
    let (out_tx, out_rx) = crossbeam_channel::unbounded();
    let (cancel_tx, cancel_rx) = crossbeam_channel::bounded::<()>(0);
    let stats = Stats::from_env(&setup.fqdn);
    let pool = BuildPool::start(
        setup.build_workers,
        &setup.zk,
        out_tx,
        cancel_rx,
        stats.clone(),
    );
    let (up_tx, up_rx) = crossbeam_channel::unbounded();
    let uploads = UploadPool::start(setup.upload_workers, &setup.zk, up_tx, stats.clone());
    // Cleanup disabled (`cleanup-interval = 0`): no janitor, and a source that never fires in
    // its place. A receiver whose senders are gone is always ready, so selecting on it would
    // spin the loop ahead of every other source.
    let (janitor, cl_rx) = if setup.cfg.cleanup_interval > 0.0 {
        let (cl_tx, cl_rx) = crossbeam_channel::unbounded();
        (Some(Janitor::start(&setup.zk, cl_tx)), cl_rx)
    } else {
        (None, never())
    };
    let watcher = Watcher::start(&setup.zk, image_names(&setup.cfg), zk_tx);
    let mut s = Scheduler {
        zk: setup.zk.clone(),
        formats: BTreeMap::new(),
        cfg: setup.cfg,
        config_path: setup.config_path,
        secure_path: setup.secure_path,
        load_options: setup.load_options,
        builder_id: setup.builder_id,
        fqdn: setup.fqdn,
        images: BTreeMap::new(),
        stats,
        build_workers: setup.build_workers,
        upload_workers: setup.upload_workers,
        drivers: BTreeMap::new(),
        provider_formats: BTreeMap::new(),
        slots: BTreeMap::new(),
        pool,
        uploads,
        janitor,
        cleanup_due: Some(Instant::now()),
        cleanup_running: false,
        cleanup_full: true,
        watcher,
        next_verify: Instant::now(),
        stopping: false,
    };
    s.next_verify = Instant::now() + s.verify_interval();
    s.make_drivers();
    s.run_loop(Sources {
        signals: setup.signals,
        zk: zk_rx,
        builds: out_rx.clone(),
        uploads: up_rx,
        cleanup: cl_rx,
    });

    // Ordered shutdown: cancel running builds, collect their outcomes, join the workers.
    drop(cancel_tx);
    let deadline = Instant::now() + STOP_WAIT + build::DIB_GRACE;
    while s.images.values().any(|i| i.in_flight) {
        match out_rx.recv_deadline(deadline) {
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
    pool.shutdown();
    uploads.shutdown(UPLOAD_GRACE);
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
}

/// Every source the scheduler loop selects on, in priority order.
///
/// A source whose senders are all gone is replaced by `never()` the moment its end is seen:
/// a disconnected receiver is always ready, and would starve every source after it (with
/// cleanup disabled, a dropped janitor channel once kept the loop spinning one core and
/// `request-build` znodes unserved). Each end is a decision, logged once: the signal
/// handler or the ZooKeeper watcher gone stops the daemon; a worker pool or the janitor gone
/// is an error the daemon survives without that work.
struct Sources {
    signals: Receiver<ControlSignal>,
    zk: Receiver<ZkEvent>,
    builds: Receiver<BuildOutcome>,
    uploads: Receiver<UploadOutcome>,
    cleanup: Receiver<CleanupReport>,
}

impl Scheduler {
    fn run_loop(&mut self, mut src: Sources) {
        crate::registry::set_activity("scheduling");
        loop {
            let deadline = self.next_deadline();
            let timer = match deadline {
                Some(d) => after(d.saturating_duration_since(Instant::now())),
                None => never(),
            };
            let started;
            select_biased! {
                recv(src.signals) -> sig => {
                    started = Instant::now();
                    match sig {
                        Ok(ControlSignal::Shutdown) => {
                            info!("Stopping: no new builds; cancelling running builds");
                            self.stopping = true;
                            return;
                        }
                        Err(_) => {
                            error!("the signal handler is gone; stopping");
                            self.stopping = true;
                            return;
                        }
                        Ok(ControlSignal::Reload) => self.reload(),
                    }
                }
                recv(src.builds) -> outcome => {
                    started = Instant::now();
                    match outcome {
                        Ok(outcome) => {
                            self.on_build(outcome);
                            self.cleanup_soon();
                        }
                        Err(_) => {
                            error!("every build worker is gone; no more builds until a restart");
                            src.builds = never();
                        }
                    }
                }
                recv(src.uploads) -> outcome => {
                    started = Instant::now();
                    match outcome {
                        Ok(outcome) => {
                            self.on_upload(outcome);
                            self.cleanup_soon();
                        }
                        Err(_) => {
                            error!("every upload worker is gone; no more uploads until a restart");
                            src.uploads = never();
                        }
                    }
                }
                recv(src.cleanup) -> report => {
                    started = Instant::now();
                    match report {
                        Ok(report) => self.on_cleanup(report),
                        Err(_) => {
                            error!("the cleanup thread is gone; no more cleanup until a restart");
                            src.cleanup = never();
                            self.janitor = None;
                        }
                    }
                }
                recv(src.zk) -> ev => {
                    started = Instant::now();
                    match ev {
                        Ok(ev) => self.on_zk(ev),
                        Err(_) => {
                            error!("the ZooKeeper watcher stopped; stopping");
                            self.stopping = true;
                            return;
                        }
                    }
                }
                recv(timer) -> _ => {
                    started = Instant::now();
                    if Instant::now() >= self.next_verify {
                        self.next_verify = Instant::now() + self.verify_interval();
                        debug!("safety rescan");
                        self.watcher.send(WatchCmd::Verify);
                    }
                }
            }
            self.plan();
            self.plan_uploads();
            self.maybe_start_cleanup();
            let took = started.elapsed();
            if took > Duration::from_millis(200) {
                warn!("overly long scheduler loop turn: {took:?}");
            }
        }
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
                let st = self.state(&image);
                if requested && !st.requested {
                    debug!("image={image}: request-build znode appeared");
                    // A fresh request is worth an immediate try, unless a failure back-off runs.
                    if st.failures == 0 {
                        st.retry_at = None;
                    }
                }
                st.requested = requested;
            }
            ZkEvent::Builds {
                image,
                builds,
                unreadable,
            } => {
                self.cleanup_soon();
                let st = self.state(&image);
                st.builds = builds;
                st.unreadable = unreadable;
                // A skip waits for the other builder's records to change: they just did.
                if st.failures == 0 {
                    st.retry_at = None;
                }
            }
            ZkEvent::Resynced => {
                debug!("watches re-armed; state re-read");
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
        let backoff_initial = self.cfg.retry_backoff_initial;
        let backoff_max = self.cfg.retry_backoff_max;
        let image = outcome.image.clone();
        let st = self.state(&image);
        st.in_flight = false;
        if let Some(builds) = outcome.builds {
            st.builds = builds;
        }
        let now = Instant::now();
        match outcome.result {
            BuildResult::Ready { build_id, .. } => {
                debug!("image={image} build={build_id}: ready");
                st.failures = 0;
                st.retry_at = None;
                st.no_space_logged = false;
                if outcome.manual {
                    st.requested = false;
                }
            }
            BuildResult::Failed {
                build_id,
                reason,
                unrecorded,
            } => {
                if unrecorded && let Some(id) = &build_id {
                    st.abandoned.insert(id.clone());
                }
                st.failures += 1;
                let delay = backoff(backoff_initial, backoff_max, st.failures);
                st.retry_at = Some(now + delay);
                warn!(
                    "image={image} build={}: build failed ({reason}); retrying in {:.0}s (failure {})",
                    build_id.as_deref().unwrap_or("-"),
                    delay.as_secs_f64(),
                    st.failures
                );
            }
            BuildResult::Skipped { reason } => {
                debug!("image={image}: build skipped: {reason}");
                st.retry_at = Some(now + Duration::from_secs_f64(backoff_initial));
            }
            BuildResult::NoSpace {
                free_gib,
                required_gib,
            } => {
                if !st.no_space_logged {
                    warn!(
                        "image={image}: not building: images-dir has {free_gib:.1} GiB free, {required_gib} GiB required; will start when space returns"
                    );
                    st.no_space_logged = true;
                }
                st.retry_at = Some(now + Duration::from_secs_f64(backoff_initial));
            }
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

    /// Why `image` needs a build now, if it does (the decision of the module docs).
    fn decide(&self, image: &str, now: Instant) -> Option<(String, bool)> {
        let d = self.cfg.diskimage(image)?;
        let st = self.images.get(image)?;
        if d.pause || st.paused_zk || st.in_flight || st.retry_at.is_some_and(|t| t > now) {
            return None;
        }
        let formats = self.formats.get(image).filter(|f| !f.is_empty())?;
        if st
            .builds
            .iter()
            .any(|b| b.build.state == model::BuildState::Building)
            && !st.requested
        {
            // Someone is building it; its record changing wakes us up.
            return None;
        }
        if st.requested {
            return Some(("request-build znode present".into(), true));
        }
        let Some(newest) = tree::newest_ready(&st.builds).map(|b| &b.build) else {
            return Some(("no ready build".into(), false));
        };
        let age = model::now_epoch() - newest.state_time;
        if age >= d.rebuild_age as f64 {
            return Some((
                format!(
                    "rebuild-age expired: newest ready build is {} old",
                    human_age(age)
                ),
                false,
            ));
        }
        let missing = build::missing_formats(newest, formats);
        if !missing.is_empty() {
            return Some((
                format!("formats changed: {} missing", missing.join(",")),
                false,
            ));
        }
        None
    }

    /// Hands every needed build to an idle worker.
    fn plan(&mut self) {
        if self.stopping || self.zk.state() != ConnState::Connected {
            return;
        }
        let now = Instant::now();
        let names: Vec<String> = self.cfg.diskimages.iter().map(|d| d.name.clone()).collect();
        for image in names {
            self.state(&image);
            let Some((cause, manual)) = self.decide(&image, now) else {
                continue;
            };
            let d = self
                .cfg
                .diskimage(&image)
                .expect("decide checked it")
                .clone();
            let st = &self.images[&image];
            let job = BuildJob {
                image: image.clone(),
                formats: self.formats[&image].iter().cloned().collect(),
                diskimage: d,
                cause,
                manual,
                seen_newest_ready: tree::newest_ready(&st.builds).map(|b| b.id.clone()),
                env: BuildEnv {
                    images_dir: self.cfg.images_dir.clone(),
                    build_log_dir: self.cfg.build_log_dir.clone(),
                    build_log_retention: self.cfg.build_log_retention,
                    elements_dir: self.cfg.elements_dir.clone(),
                    required_free_gib: self.cfg.images_dir_required_free,
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

    /// (Re)creates the provider drivers; a provider whose driver cannot be set up is logged
    /// and left out, as upstream does.
    fn make_drivers(&mut self) {
        self.drivers.clear();
        self.provider_formats.clear();
        // One set-up: the OpenStack providers share the CA stores it reads.
        let setup = provider::DriverSetup::new(None);
        for p in &self.cfg.providers {
            let format = match setup.driver(p) {
                Ok(d) => {
                    let format = d.image_format().to_string();
                    self.drivers.insert(p.name.clone(), Arc::from(d));
                    format
                }
                Err(e) => {
                    error!(
                        "provider={}: cannot set up its driver, no uploads to it: {e}",
                        p.name
                    );
                    configured_format(p)
                }
            };
            self.provider_formats.insert(p.name.clone(), format);
        }
        self.formats = required_formats(&self.cfg, &self.provider_formats);
    }

    fn on_upload(&mut self, outcome: UploadOutcome) {
        let (initial, max) = (self.cfg.retry_backoff_initial, self.cfg.retry_backoff_max);
        if let Some(builds) = outcome.builds {
            self.state(&outcome.image).builds = builds;
        }
        let slot = self
            .slots
            .entry((outcome.image.clone(), outcome.provider.clone()))
            .or_default();
        slot.in_flight = false;
        let now = Instant::now();
        let (image, build, provider) = (&outcome.image, &outcome.build_id, &outcome.provider);
        match outcome.result {
            UploadResult::Ready { upload_id, .. } => {
                debug!("image={image} build={build} provider={provider} upload={upload_id}: ready");
                slot.failures = 0;
                slot.retry_at = None;
            }
            UploadResult::Failed { upload_id, reason } => {
                slot.failures += 1;
                let delay = backoff(initial, max, slot.failures);
                slot.retry_at = Some(now + delay);
                warn!(
                    "image={image} build={build} provider={provider} upload={}: upload failed ({reason}); retrying in {:.0}s (failure {})",
                    upload_id.as_deref().unwrap_or("-"),
                    delay.as_secs_f64(),
                    slot.failures
                );
            }
            UploadResult::Skipped { reason } => {
                debug!("image={image} build={build} provider={provider}: upload skipped: {reason}");
                slot.retry_at = Some(now + Duration::from_secs_f64(initial));
            }
        }
    }

    /// Hands every needed upload to an idle worker: the newest ready build of each image, to
    /// each provider listing it (unpaused), when this builder has its file and no `ready`
    /// upload exists (wire spec §1.5, §3.6).
    fn plan_uploads(&mut self) {
        if self.stopping || self.zk.state() != ConnState::Connected {
            return;
        }
        let now = Instant::now();
        let cfg = self.cfg.clone();
        for p in &cfg.providers {
            let Some(driver) = self.drivers.get(&p.name).cloned() else {
                continue;
            };
            let Some(format) = self.provider_formats.get(&p.name).cloned() else {
                continue;
            };
            for pd in p.diskimages.iter().filter(|pd| !pd.pause) {
                let Some(d) = cfg.diskimage(&pd.name) else {
                    continue;
                };
                let Some(st) = self.images.get(&pd.name) else {
                    continue;
                };
                let Some(newest) = tree::newest_ready(&st.builds) else {
                    continue;
                };
                if newest.has_ready_upload(&p.name) || !newest.build.formats.contains(&format) {
                    continue;
                }
                if newest
                    .uploads_to(&p.name)
                    .any(|u| u.upload.state == crate::model::UploadState::Uploading)
                {
                    // Someone uploads it now (or crashed doing so: the janitor clears that).
                    continue;
                }
                let file = cfg
                    .images_dir
                    .join(format!("{}-{}.{format}", pd.name, newest.id));
                if !file.is_file() {
                    continue; // Only the builder holding the files uploads.
                }
                let build_id = newest.id.clone();
                let slot = self
                    .slots
                    .entry((pd.name.clone(), p.name.clone()))
                    .or_default();
                if slot.for_build.as_deref() != Some(build_id.as_str()) {
                    *slot = UploadSlot {
                        in_flight: slot.in_flight,
                        for_build: Some(build_id.clone()),
                        ..Default::default()
                    };
                }
                if slot.in_flight || slot.retry_at.is_some_and(|t| t > now) {
                    continue;
                }
                let job = UploadJob {
                    image: pd.name.clone(),
                    build_id,
                    provider: p.clone(),
                    diskimage: d.clone(),
                    format: format.clone(),
                    file,
                    driver: driver.clone(),
                };
                if !self.uploads.try_submit(job) {
                    return; // Every upload worker is busy.
                }
                slot.in_flight = true;
            }
        }
    }

    /// The nearest instant something must be re-decided without an event.
    fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        let now_epoch = model::now_epoch();
        let mut next = Some(self.next_verify);
        // Only future instants: something already due was decided in this turn's plan, and a
        // past instant would spin the loop.
        let mut consider = |t: Instant| {
            if t > now {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        for (image, st) in &self.images {
            if let Some(t) = st.retry_at {
                consider(t);
            }
            if let (Some(d), Some(newest)) =
                (self.cfg.diskimage(image), tree::newest_ready(&st.builds))
            {
                let due = newest.build.state_time + d.rebuild_age as f64 - now_epoch;
                if due > 0.0 {
                    consider(now + Duration::from_secs_f64(due.min(86400.0 * 365.0)));
                }
            }
        }
        for slot in self.slots.values() {
            if let Some(t) = slot.retry_at {
                consider(t);
            }
        }
        if self.janitor.is_some()
            && !self.cleanup_running
            && let Some(t) = self.cleanup_due
        {
            // A due pass that could not start (not connected) waits for the next event.
            consider(t);
        }
        next
    }
}

fn human_age(secs: f64) -> String {
    let secs = secs.max(0.0) as u64;
    if secs >= 3600 {
        format!("{}h", secs / 3600)
    } else if secs >= 60 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

fn image_names(cfg: &Config) -> BTreeSet<String> {
    cfg.diskimages.iter().map(|d| d.name.clone()).collect()
}

/// The formats each diskimage needs: its own `formats` plus the image format of every
/// provider listing it (wire spec §3.4). No default format: an image with neither is never
/// built.
pub fn required_formats(
    cfg: &Config,
    provider_formats: &BTreeMap<String, String>,
) -> BTreeMap<String, BTreeSet<String>> {
    cfg.diskimages
        .iter()
        .map(|d| {
            let mut f: BTreeSet<String> = d.formats.iter().cloned().collect();
            for p in &cfg.providers {
                if p.diskimages.iter().any(|pd| pd.name == d.name) {
                    f.insert(
                        provider_formats
                            .get(&p.name)
                            .cloned()
                            .unwrap_or_else(|| configured_format(p)),
                    );
                }
            }
            (d.name.clone(), f)
        })
        .collect()
}

/// A provider's image format from the config alone, for a provider whose driver could not be
/// set up (its clouds.yaml entry is unreadable): the configured `image-format`, else qcow2.
fn configured_format(p: &config::Provider) -> String {
    match &p.driver {
        config::Driver::Command { image_format, .. } => image_format.clone(),
        config::Driver::OpenStack {
            image_format: Some(f),
            ..
        } => f.clone(),
        config::Driver::OpenStack { .. } => {
            warn!(
                "provider={}: cannot read its cloud's image format; assuming qcow2",
                p.name
            );
            "qcow2".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_an_operator_says_them() {
        assert_eq!(human_age(26.0 * 3600.0 + 5.0), "26h");
        assert_eq!(human_age(125.0), "2m");
        assert_eq!(human_age(5.0), "5s");
    }
}
