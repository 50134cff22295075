//! The scheduler's decisions as pure functions: a state snapshot and a clock in, typed
//! decisions out. No ZooKeeper, no threads, no files, no `Instant::now()`: the loop in
//! `scheduler` reads the clock once per turn and hands it in ([`Clock`]), so every rule
//! below is unit-tested in milliseconds with made-up times.
//!
//! * **What to build and why** ([`decide_build`], [`plan_builds`]): wire spec §3.1–§3.4. A
//!   configured image with a non-empty format set, paused neither by config nor by the
//!   ZooKeeper `pause` znode, with no build of ours in flight and no back-off running, is
//!   built when a `request-build` znode exists, when it has no `ready` build, when its newest
//!   `ready` build is at least `rebuild-age` old (from that build's `state_time`), or when that
//!   build lacks a required format. A manual request on a paused image waits (§3.2: "ZK-paused
//!   images keep the request pending until unpaused"). A `building` record of someone else
//!   holds scheduled builds back: its change wakes us. The cause's text is what the log says.
//! * **Which uploads to start** ([`upload_candidates`], [`UploadSlot::free_for`]): §3.6.
//!   Only the newest `ready` build, only to providers of this config that list the image
//!   unpaused and have a driver, only when this builder has the file, and only when no
//!   `ready` or `uploading` upload of that build to that provider exists. A provider newly
//!   listing an image gets the newest build; an older build is never uploaded.
//! * **When to wake** ([`next_wake`]): the nearest of the safety rescan, a back-off's end, a
//!   rebuild-age expiry and a due janitor pass; only future instants (a past one would spin).
//! * **Back-off** ([`Retry`]): a failure waits `retry-backoff-initial`, doubling up to
//!   `retry-backoff-max`; success resets it; a skip (lock held elsewhere, no space) waits the
//!   initial delay without counting a failure; a fresh request or changed build records cut a
//!   skip's wait short but never a failure back-off. Upstream retries every 10 s without
//!   back-off (§1.3); this is a deliberate difference.
//! * **Retention** ([`retention`]): §3.7 steps A and B.2. The two newest `ready` builds of a
//!   configured image are kept (none of an image gone from the config), and per provider the
//!   two newest `ready` uploads of `ready` builds are protected even when their build goes:
//!   nodepool 11's recency bridge, which keeps an image bootable until newer builds are
//!   uploaded. The janitor (`cleanup`) does the deleting.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::build::{self, BuildResult};
use crate::config::{Config, DiskImage};
use crate::local;
use crate::model::{self, BuildState, UploadState};
use crate::provider;
use crate::upload::UploadResult;
use crate::zk::tree::{self, BuildInfo};

/// The time of one scheduler turn, read once by the loop: `now` for deadlines, `epoch` (Unix
/// seconds) for the ages of records, whose `state_time` is wall-clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now: Instant,
    pub epoch: f64,
}

/// `retry-backoff-initial` and `retry-backoff-max`, seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: f64,
    pub max: f64,
}

impl Backoff {
    pub fn of(cfg: &Config) -> Backoff {
        Backoff {
            initial: cfg.retry_backoff_initial,
            max: cfg.retry_backoff_max,
        }
    }

    /// The wait after `failures` consecutive failures.
    pub fn delay(self, failures: u32) -> Duration {
        model::backoff(self.initial, self.max, failures)
    }

    /// The wait after a skip.
    pub fn skip_delay(self) -> Duration {
        Duration::from_secs_f64(self.initial)
    }
}

/// Back-off state of one image's builds or one (image, provider)'s uploads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retry {
    /// Consecutive failures.
    pub failures: u32,
    /// No attempt before this instant.
    pub retry_at: Option<Instant>,
}

impl Retry {
    /// Whether a back-off (or a skip's wait) still runs at `now`.
    pub fn waiting(&self, now: Instant) -> bool {
        self.retry_at.is_some_and(|t| t > now)
    }

    /// One more failure: the wait grows (to the cap). Returns the wait.
    pub fn failed(&mut self, b: Backoff, now: Instant) -> Duration {
        self.failures += 1;
        let delay = b.delay(self.failures);
        self.retry_at = Some(now + delay);
        delay
    }

    /// A success: the back-off starts afresh.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }

    /// Nothing was done, for a good reason: wait the initial delay, count no failure.
    pub fn skipped(&mut self, b: Backoff, now: Instant) {
        self.retry_at = Some(now + b.skip_delay());
    }

    /// Something worth an immediate try happened (a request appeared, the records changed):
    /// a skip's wait ends, a failure back-off goes on.
    pub fn poke(&mut self) {
        if self.failures == 0 {
            self.retry_at = None;
        }
    }
}

/// Per-image scheduling state.
#[derive(Debug, Default, Clone)]
pub struct ImageState {
    pub paused_zk: bool,
    pub requested: bool,
    pub builds: Vec<BuildInfo>,
    /// Build znodes with empty or unreadable data (the janitor removes lock-race leftovers).
    pub unreadable: Vec<String>,
    pub in_flight: bool,
    pub retry: Retry,
    /// The last "not enough free space" was logged (log once until space returns).
    pub no_space_logged: bool,
    /// Builds of this process whose result could not be recorded: their records still say
    /// `building`. The janitor records them `failed` without waiting for the image build
    /// lock to be free (a rebuild may hold it for a long time meanwhile).
    pub abandoned: BTreeSet<String>,
}

impl ImageState {
    /// The `request-build` znode is there or not; true when it just appeared.
    pub fn set_requested(&mut self, requested: bool) -> bool {
        let appeared = requested && !self.requested;
        if appeared {
            self.retry.poke();
        }
        self.requested = requested;
        appeared
    }

    /// The image's build records as just read (a skip waiting for them to change ends).
    pub fn set_builds(&mut self, builds: Vec<BuildInfo>, unreadable: Vec<String>) {
        self.builds = builds;
        self.unreadable = unreadable;
        self.retry.poke();
    }
}

/// Per (image, provider) upload state.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct UploadSlot {
    pub in_flight: bool,
    /// The build the failures below were counted for; a newer build starts afresh.
    pub for_build: Option<String>,
    pub retry: Retry,
}

impl UploadSlot {
    /// Whether an upload of `build` may start now. A slot counting failures of another build
    /// starts afresh for this one (an upload in flight stays in flight).
    pub fn free_for(&mut self, build: &str, now: Instant) -> bool {
        if self.for_build.as_deref() != Some(build) {
            *self = UploadSlot {
                in_flight: self.in_flight,
                for_build: Some(build.to_string()),
                ..Default::default()
            };
        }
        !self.in_flight && !self.retry.waiting(now)
    }
}

/// Why an image is built now; `Display` is the text the logs carry.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildCause {
    /// A `request-build` znode exists (`nodepool image-build`).
    Requested,
    NoReadyBuild,
    /// The newest ready build is `age` seconds old, at least `rebuild-age`.
    RebuildAgeExpired {
        age: f64,
    },
    /// The newest ready build lacks these required formats (a provider was added).
    FormatsMissing(Vec<String>),
}

impl BuildCause {
    /// Whether a `request-build` znode asked for it (its worker deletes it after `ready`).
    pub fn manual(&self) -> bool {
        matches!(self, BuildCause::Requested)
    }
}

impl fmt::Display for BuildCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildCause::Requested => f.write_str("request-build znode present"),
            BuildCause::NoReadyBuild => f.write_str("no ready build"),
            BuildCause::RebuildAgeExpired { age } => write!(
                f,
                "rebuild-age expired: newest ready build is {} old",
                human_age(*age)
            ),
            BuildCause::FormatsMissing(missing) => {
                write!(f, "formats changed: {} missing", missing.join(","))
            }
        }
    }
}

/// Why an image is not built now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Not (or no longer) in this builder's config.
    NotConfigured,
    /// No state known yet (the watcher has not reported the image).
    Unknown,
    PausedByConfig,
    /// `nodepool image-pause`.
    PausedByZk,
    /// A build of ours runs.
    InFlight,
    /// A failure back-off or a skip's wait runs.
    BackingOff,
    /// Neither its own `formats` nor a provider's format: never built (§3.4).
    NoFormats,
    /// Someone's record says `building`; its change wakes us.
    SomeoneBuilding,
    /// The newest ready build is young enough and has every format.
    UpToDate,
}

/// What [`decide_build`] says about one image.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildDecision {
    Build(BuildCause),
    Hold(Hold),
}

/// Whether `image` needs a build now, and why (the rules of the module docs).
pub fn decide_build(
    d: Option<&DiskImage>,
    formats: Option<&BTreeSet<String>>,
    st: Option<&ImageState>,
    clock: Clock,
) -> BuildDecision {
    use BuildDecision::{Build, Hold as H};
    let Some(d) = d else {
        return H(Hold::NotConfigured);
    };
    let Some(st) = st else {
        return H(Hold::Unknown);
    };
    if d.pause {
        return H(Hold::PausedByConfig);
    }
    if st.paused_zk {
        return H(Hold::PausedByZk);
    }
    if st.in_flight {
        return H(Hold::InFlight);
    }
    if st.retry.waiting(clock.now) {
        return H(Hold::BackingOff);
    }
    let Some(formats) = formats.filter(|f| !f.is_empty()) else {
        return H(Hold::NoFormats);
    };
    if st.requested {
        return Build(BuildCause::Requested);
    }
    if st
        .builds
        .iter()
        .any(|b| b.build.state == BuildState::Building)
    {
        return H(Hold::SomeoneBuilding);
    }
    let Some(newest) = tree::newest_ready(&st.builds).map(|b| &b.build) else {
        return Build(BuildCause::NoReadyBuild);
    };
    let age = clock.epoch - newest.state_time;
    if age >= d.rebuild_age as f64 {
        return Build(BuildCause::RebuildAgeExpired { age });
    }
    let missing = build::missing_formats(newest, formats);
    if !missing.is_empty() {
        return Build(BuildCause::FormatsMissing(missing));
    }
    H(Hold::UpToDate)
}

/// Every configured image that needs a build now, in config order, with its cause.
pub fn plan_builds(
    cfg: &Config,
    formats: &BTreeMap<String, BTreeSet<String>>,
    images: &BTreeMap<String, ImageState>,
    clock: Clock,
) -> Vec<(String, BuildCause)> {
    cfg.diskimages
        .iter()
        .filter_map(|d| {
            match decide_build(Some(d), formats.get(&d.name), images.get(&d.name), clock) {
                BuildDecision::Build(cause) => Some((d.name.clone(), cause)),
                BuildDecision::Hold(_) => None,
            }
        })
        .collect()
}

/// What a build's outcome means for the image, for the log.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildFollowUp {
    Ready,
    /// Failed: the next try waits `delay` (after `failures` failures in a row).
    Retry {
        delay: Duration,
        failures: u32,
    },
    Skipped,
    /// Not enough space; `first` until space returns (log once).
    NoSpace {
        first: bool,
    },
}

/// Applies a build worker's result to the image's state (the records it read are applied by
/// the caller).
pub fn apply_build_result(
    st: &mut ImageState,
    result: &BuildResult,
    manual: bool,
    b: Backoff,
    now: Instant,
) -> BuildFollowUp {
    st.in_flight = false;
    match result {
        BuildResult::Ready { .. } => {
            st.retry.succeeded();
            st.no_space_logged = false;
            if manual {
                st.requested = false;
            }
            BuildFollowUp::Ready
        }
        BuildResult::Failed {
            build_id,
            unrecorded,
            ..
        } => {
            if *unrecorded && let Some(id) = build_id {
                st.abandoned.insert(id.clone());
            }
            let delay = st.retry.failed(b, now);
            BuildFollowUp::Retry {
                delay,
                failures: st.retry.failures,
            }
        }
        BuildResult::Skipped { .. } => {
            st.retry.skipped(b, now);
            BuildFollowUp::Skipped
        }
        BuildResult::NoSpace { .. } => {
            let first = !st.no_space_logged;
            st.no_space_logged = true;
            st.retry.skipped(b, now);
            BuildFollowUp::NoSpace { first }
        }
    }
}

/// What an upload's outcome means for its slot, for the log.
#[derive(Debug, Clone, PartialEq)]
pub enum UploadFollowUp {
    Ready,
    Retry { delay: Duration, failures: u32 },
    Skipped,
}

/// Applies an upload worker's result to its (image, provider) slot.
pub fn apply_upload_result(
    slot: &mut UploadSlot,
    result: &UploadResult,
    b: Backoff,
    now: Instant,
) -> UploadFollowUp {
    slot.in_flight = false;
    match result {
        UploadResult::Ready { .. } => {
            slot.retry.succeeded();
            UploadFollowUp::Ready
        }
        UploadResult::Failed { .. } => {
            let delay = slot.retry.failed(b, now);
            UploadFollowUp::Retry {
                delay,
                failures: slot.retry.failures,
            }
        }
        UploadResult::Skipped { .. } => {
            slot.retry.skipped(b, now);
            UploadFollowUp::Skipped
        }
    }
}

/// An upload this builder should make, if its slot is free (see [`UploadSlot::free_for`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UploadCandidate {
    pub image: String,
    pub provider: String,
    pub build_id: String,
    pub format: String,
    /// The image file in images-dir.
    pub file: PathBuf,
}

/// Every upload needed now, in config order (providers, then their diskimages): the rules of
/// the module docs. `has_driver` says whether a provider's driver could be set up,
/// `file_exists` whether this builder holds an image file.
pub fn upload_candidates(
    cfg: &Config,
    provider_formats: &BTreeMap<String, String>,
    has_driver: impl Fn(&str) -> bool,
    images: &BTreeMap<String, ImageState>,
    file_exists: impl Fn(&Path) -> bool,
) -> Vec<UploadCandidate> {
    let mut out = Vec::new();
    for p in &cfg.providers {
        if !has_driver(&p.name) {
            continue;
        }
        let Some(format) = provider_formats.get(&p.name) else {
            continue;
        };
        for pd in p.diskimages.iter().filter(|pd| !pd.pause) {
            if cfg.diskimage(&pd.name).is_none() {
                continue;
            }
            let Some(st) = images.get(&pd.name) else {
                continue;
            };
            let Some(newest) = tree::newest_ready(&st.builds) else {
                continue;
            };
            if newest.has_ready_upload(&p.name) || !newest.build.formats.contains(format) {
                continue;
            }
            if newest
                .uploads_to(&p.name)
                .any(|u| u.upload.state == UploadState::Uploading)
            {
                // Someone uploads it now (or crashed doing so: the janitor clears that).
                continue;
            }
            let file = local::image_file(&cfg.images_dir, &pd.name, &newest.id, format);
            if !file_exists(&file) {
                continue; // Only the builder holding the files uploads.
            }
            out.push(UploadCandidate {
                image: pd.name.clone(),
                provider: p.name.clone(),
                build_id: newest.id.clone(),
                format: format.clone(),
                file,
            });
        }
    }
    out
}

/// The loop's own timers.
#[derive(Debug, Clone, Copy)]
pub struct Timers {
    /// The next slow safety rescan.
    pub next_verify: Instant,
    /// When a janitor pass is due, if one can start (a janitor exists, none runs).
    pub cleanup_due: Option<Instant>,
}

/// The nearest instant something must be re-decided without an event.
pub fn next_wake(
    cfg: &Config,
    images: &BTreeMap<String, ImageState>,
    slots: &BTreeMap<(String, String), UploadSlot>,
    timers: Timers,
    clock: Clock,
) -> Instant {
    let now = clock.now;
    let mut next = timers.next_verify;
    // Only future instants: something already due was decided in this turn's plan, and a
    // past instant would spin the loop.
    let mut consider = |t: Instant| {
        if t > now {
            next = next.min(t);
        }
    };
    for (image, st) in images {
        if let Some(t) = st.retry.retry_at {
            consider(t);
        }
        if let (Some(d), Some(newest)) = (cfg.diskimage(image), tree::newest_ready(&st.builds)) {
            let due = newest.build.state_time + d.rebuild_age as f64 - clock.epoch;
            if due > 0.0 {
                consider(now + Duration::from_secs_f64(due.min(86400.0 * 365.0)));
            }
        }
    }
    for slot in slots.values() {
        if let Some(t) = slot.retry.retry_at {
            consider(t);
        }
    }
    if let Some(t) = timers.cleanup_due {
        // A due pass that could not start (not connected) waits for the next event.
        consider(t);
    }
    next
}

/// What a janitor pass keeps of one image (wire spec §3.7 A and B.2).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Keep {
    /// Build ids not to delete: the two newest `ready` builds, none if the image left the
    /// config.
    pub builds: BTreeSet<String>,
    /// (build id, provider, upload id) of uploads not to delete with their build: per
    /// provider the two newest `ready` uploads of `ready` builds (the recency bridge).
    pub protected_uploads: BTreeSet<(String, String, String)>,
}

/// The retention rule for one image's builds; `configured` says whether this builder's
/// config still has the diskimage.
pub fn retention(configured: bool, builds: &[BuildInfo]) -> Keep {
    let mut ready: Vec<&BuildInfo> = builds
        .iter()
        .filter(|b| b.build.state == BuildState::Ready)
        .collect();
    ready.sort_by(|a, b| b.build.state_time.total_cmp(&a.build.state_time));
    let kept = if configured {
        ready.iter().take(2).map(|b| b.id.clone()).collect()
    } else {
        BTreeSet::new()
    };
    // provider -> (state_time, build id, upload id) of its ready uploads.
    let mut per: BTreeMap<&str, Vec<(f64, &str, &str)>> = BTreeMap::new();
    for b in &ready {
        for u in b
            .uploads
            .iter()
            .filter(|u| u.upload.state == UploadState::Ready)
        {
            per.entry(&u.provider)
                .or_default()
                .push((u.upload.state_time, &b.id, &u.id));
        }
    }
    let mut protected = BTreeSet::new();
    for (provider, mut v) in per {
        v.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (_, build, upload) in v.into_iter().take(2) {
            protected.insert((build.to_string(), provider.to_string(), upload.to_string()));
        }
    }
    Keep {
        builds: kept,
        protected_uploads: protected,
    }
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
                            .unwrap_or_else(|| provider::configured_format(p).format().into()),
                    );
                }
            }
            (d.name.clone(), f)
        })
        .collect()
}

/// An age the way an operator says it: "26h", "2m", "5s".
pub fn human_age(secs: f64) -> String {
    let secs = secs.max(0.0) as u64;
    if secs >= 3600 {
        format!("{}h", secs / 3600)
    } else if secs >= 60 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config;
    use crate::zk::schema::{ImageBuild, ImageUpload};
    use crate::zk::tree::UploadInfo;

    const HOUR: f64 = 3600.0;
    /// A wall-clock "now" for record ages.
    const EPOCH: f64 = 1_800_000_000.0;

    /// Image `ubuntu` (rebuild-age 1 day) on command providers `p1` (qcow2) and `p2` (raw),
    /// `extra` appended to the file.
    fn cfg(extra: &str) -> Config {
        let text = format!(
            r#"
images-dir = "/images"
retry-backoff-initial = 5.0
retry-backoff-max = 40.0

[[zookeeper-servers]]
host = "zk"

[[diskimages]]
name = "ubuntu"
elements = ["vm"]
rebuild-age = 86400
{extra}
"#
        );
        config::load_str(Path::new("test.toml"), &text, None)
            .unwrap_or_else(|e| panic!("test config: {e}"))
    }

    fn provider(name: &str, format: &str, pause: bool) -> String {
        format!(
            r#"
[[providers]]
name = "{name}"
driver = "command"
image-format = "{format}"
upload-command = ["up", "{{file}}"]
delete-command = ["del", "{{external_id}}"]

[[providers.diskimages]]
name = "ubuntu"
pause = {pause}
"#
        )
    }

    fn clock() -> Clock {
        Clock {
            now: Instant::now(),
            epoch: EPOCH,
        }
    }

    fn build(id: &str, state: BuildState, hours_ago: f64, formats: &[&str]) -> BuildInfo {
        BuildInfo {
            id: id.into(),
            build: ImageBuild {
                state,
                state_time: EPOCH - hours_ago * HOUR,
                builder: Some("host".into()),
                builder_id: Some("b".into()),
                formats: formats.iter().map(|f| f.to_string()).collect(),
                username: None,
                python_path: None,
                shell_type: None,
            },
            uploads: vec![],
        }
    }

    fn with_upload(
        mut b: BuildInfo,
        provider: &str,
        id: &str,
        state: UploadState,
        hours_ago: f64,
    ) -> BuildInfo {
        b.uploads.push(UploadInfo {
            provider: provider.into(),
            id: id.into(),
            upload: ImageUpload {
                state,
                state_time: EPOCH - hours_ago * HOUR,
                external_id: Some(format!("ext-{id}")),
                external_name: None,
                format: None,
                username: None,
                python_path: None,
                shell_type: None,
            },
        });
        b
    }

    fn image(builds: Vec<BuildInfo>) -> ImageState {
        ImageState {
            builds,
            ..Default::default()
        }
    }

    /// The decision for `ubuntu` under `cfg`, with the formats the config requires.
    fn decide(cfg: &Config, st: &ImageState, clock: Clock) -> BuildDecision {
        let formats = required_formats(cfg, &BTreeMap::new());
        decide_build(
            cfg.diskimage("ubuntu"),
            formats.get("ubuntu"),
            Some(st),
            clock,
        )
    }

    fn failed() -> BuildResult {
        BuildResult::Failed {
            build_id: Some("b1".into()),
            reason: "dib exited 1".into(),
            unrecorded: false,
        }
    }

    #[test]
    fn a_build_older_than_rebuild_age_is_rebuilt_and_the_log_says_how_old() {
        let cfg = cfg(&provider("p1", "qcow2", false));
        let old = image(vec![build("a", BuildState::Ready, 26.0, &["qcow2"])]);
        let decision = decide(&cfg, &old, clock());
        let BuildDecision::Build(cause) = decision else {
            panic!("expected a build, got {decision:?}");
        };
        assert!(!cause.manual());
        assert_eq!(
            cause.to_string(),
            "rebuild-age expired: newest ready build is 26h old"
        );
        let young = image(vec![build("a", BuildState::Ready, 23.0, &["qcow2"])]);
        assert_eq!(
            decide(&cfg, &young, clock()),
            BuildDecision::Hold(Hold::UpToDate)
        );
    }

    #[test]
    fn an_image_without_a_ready_build_is_built() {
        let cfg = cfg(&provider("p1", "qcow2", false));
        let st = image(vec![build("a", BuildState::Failed, 1.0, &["qcow2"])]);
        let decision = decide(&cfg, &st, clock());
        assert_eq!(decision, BuildDecision::Build(BuildCause::NoReadyBuild));
        assert_eq!(
            BuildCause::NoReadyBuild.to_string(),
            "no ready build",
            "tests and operators grep this text"
        );
    }

    #[test]
    fn a_new_provider_format_rebuilds_a_young_image() {
        let cfg = cfg(&format!(
            "{}{}",
            provider("p1", "qcow2", false),
            provider("p2", "raw", false)
        ));
        let st = image(vec![build("a", BuildState::Ready, 1.0, &["qcow2"])]);
        let decision = decide(&cfg, &st, clock());
        assert_eq!(
            decision,
            BuildDecision::Build(BuildCause::FormatsMissing(vec!["raw".into()]))
        );
        let BuildDecision::Build(cause) = decision else {
            unreachable!()
        };
        assert_eq!(cause.to_string(), "formats changed: raw missing");
    }

    #[test]
    fn an_image_with_no_format_is_never_built() {
        let cfg = cfg("");
        assert_eq!(
            decide(&cfg, &image(vec![]), clock()),
            BuildDecision::Hold(Hold::NoFormats)
        );
    }

    #[test]
    fn config_pause_holds_scheduled_and_manual_builds() {
        let cfg = cfg(&format!("pause = true\n{}", provider("p1", "qcow2", false)));
        let mut st = image(vec![]);
        assert_eq!(
            decide(&cfg, &st, clock()),
            BuildDecision::Hold(Hold::PausedByConfig)
        );
        st.set_requested(true);
        assert_eq!(
            decide(&cfg, &st, clock()),
            BuildDecision::Hold(Hold::PausedByConfig)
        );
    }

    #[test]
    fn zookeeper_pause_keeps_a_manual_request_pending_until_unpaused() {
        let cfg = cfg(&provider("p1", "qcow2", false));
        let mut st = image(vec![build("a", BuildState::Ready, 1.0, &["qcow2"])]);
        st.paused_zk = true;
        assert!(st.set_requested(true), "the request is news");
        assert_eq!(
            decide(&cfg, &st, clock()),
            BuildDecision::Hold(Hold::PausedByZk)
        );
        assert!(st.requested, "the request stays pending");
        st.paused_zk = false;
        let decision = decide(&cfg, &st, clock());
        assert_eq!(decision, BuildDecision::Build(BuildCause::Requested));
        let BuildDecision::Build(cause) = decision else {
            unreachable!()
        };
        assert!(cause.manual());
        assert_eq!(cause.to_string(), "request-build znode present");
    }

    #[test]
    fn a_manual_request_builds_despite_a_young_build_and_someone_building() {
        let cfg = cfg(&provider("p1", "qcow2", false));
        let mut st = image(vec![
            build("a", BuildState::Ready, 1.0, &["qcow2"]),
            build("b", BuildState::Building, 0.1, &[]),
        ]);
        assert_eq!(
            decide(&cfg, &st, clock()),
            BuildDecision::Hold(Hold::SomeoneBuilding)
        );
        st.set_requested(true);
        assert_eq!(
            decide(&cfg, &st, clock()),
            BuildDecision::Build(BuildCause::Requested)
        );
    }

    #[test]
    fn a_ready_manual_build_clears_the_request_and_a_build_in_flight_holds() {
        let cfg = cfg(&provider("p1", "qcow2", false));
        let mut st = image(vec![]);
        st.set_requested(true);
        st.in_flight = true;
        assert_eq!(
            decide(&cfg, &st, clock()),
            BuildDecision::Hold(Hold::InFlight)
        );
        let b = Backoff::of(&cfg);
        let ready = BuildResult::Ready {
            build_id: "b1".into(),
            record: build("b1", BuildState::Ready, 0.0, &["qcow2"]).build,
        };
        let follow = apply_build_result(&mut st, &ready, true, b, clock().now);
        assert_eq!(follow, BuildFollowUp::Ready);
        assert!(!st.in_flight && !st.requested);
    }

    #[test]
    fn build_backoff_doubles_to_the_cap_and_a_success_resets_it() {
        let cfg = cfg(&provider("p1", "qcow2", false));
        let b = Backoff::of(&cfg);
        let c = clock();
        let mut st = image(vec![]);
        let mut delays = Vec::new();
        for _ in 0..5 {
            st.in_flight = true;
            match apply_build_result(&mut st, &failed(), false, b, c.now) {
                BuildFollowUp::Retry { delay, .. } => delays.push(delay.as_secs()),
                other => panic!("expected a retry, got {other:?}"),
            }
        }
        assert_eq!(delays, [5, 10, 20, 40, 40]);
        assert_eq!(st.retry.failures, 5);
        assert_eq!(decide(&cfg, &st, c), BuildDecision::Hold(Hold::BackingOff));
        let later = Clock {
            now: c.now + Duration::from_secs(40),
            ..c
        };
        assert_eq!(
            decide(&cfg, &st, later),
            BuildDecision::Build(BuildCause::NoReadyBuild),
            "the back-off ends on time"
        );
        let ready = BuildResult::Ready {
            build_id: "b1".into(),
            record: build("b1", BuildState::Ready, 0.0, &["qcow2"]).build,
        };
        apply_build_result(&mut st, &ready, false, b, later.now);
        assert_eq!(st.retry, Retry::default());
        assert_eq!(
            apply_build_result(&mut st, &failed(), false, b, later.now),
            BuildFollowUp::Retry {
                delay: Duration::from_secs(5),
                failures: 1
            },
            "after a success the back-off starts from the initial delay"
        );
    }

    #[test]
    fn a_request_cuts_a_skip_short_but_not_a_failure_backoff() {
        let cfg = cfg(&provider("p1", "qcow2", false));
        let b = Backoff::of(&cfg);
        let c = clock();
        let mut st = image(vec![]);
        let skipped = BuildResult::Skipped {
            reason: "lock held".into(),
        };
        assert_eq!(
            apply_build_result(&mut st, &skipped, false, b, c.now),
            BuildFollowUp::Skipped
        );
        assert_eq!(st.retry.failures, 0, "a skip is no failure");
        assert_eq!(decide(&cfg, &st, c), BuildDecision::Hold(Hold::BackingOff));
        st.set_requested(true);
        assert_eq!(
            decide(&cfg, &st, c),
            BuildDecision::Build(BuildCause::Requested)
        );

        let mut st = image(vec![]);
        apply_build_result(&mut st, &failed(), false, b, c.now);
        st.set_requested(true);
        st.set_builds(vec![], vec![]);
        assert_eq!(decide(&cfg, &st, c), BuildDecision::Hold(Hold::BackingOff));
    }

    #[test]
    fn no_space_is_logged_once_until_a_build_succeeds_and_unrecorded_failures_are_remembered() {
        let cfg = cfg(&provider("p1", "qcow2", false));
        let b = Backoff::of(&cfg);
        let now = clock().now;
        let mut st = image(vec![]);
        let no_space = BuildResult::NoSpace {
            free_gib: 1.0,
            required_gib: 10,
        };
        assert_eq!(
            apply_build_result(&mut st, &no_space, false, b, now),
            BuildFollowUp::NoSpace { first: true }
        );
        assert_eq!(
            apply_build_result(&mut st, &no_space, false, b, now),
            BuildFollowUp::NoSpace { first: false }
        );
        let ready = BuildResult::Ready {
            build_id: "b1".into(),
            record: build("b1", BuildState::Ready, 0.0, &["qcow2"]).build,
        };
        apply_build_result(&mut st, &ready, false, b, now);
        assert_eq!(
            apply_build_result(&mut st, &no_space, false, b, now),
            BuildFollowUp::NoSpace { first: true },
            "space ran out again after a build: news again"
        );
        let unrecorded = BuildResult::Failed {
            build_id: Some("b9".into()),
            reason: "zookeeper gone".into(),
            unrecorded: true,
        };
        apply_build_result(&mut st, &unrecorded, false, b, now);
        assert!(st.abandoned.contains("b9"));
    }

    #[test]
    fn upload_backoff_grows_and_a_newer_build_starts_afresh() {
        let cfg = cfg(&provider("p1", "qcow2", false));
        let b = Backoff::of(&cfg);
        let now = clock().now;
        let mut slot = UploadSlot::default();
        assert!(slot.free_for("a", now));
        slot.in_flight = true;
        let fail = UploadResult::Failed {
            upload_id: None,
            reason: "cloud said no".into(),
        };
        assert_eq!(
            apply_upload_result(&mut slot, &fail, b, now),
            UploadFollowUp::Retry {
                delay: Duration::from_secs(5),
                failures: 1
            }
        );
        assert_eq!(
            apply_upload_result(&mut slot, &fail, b, now),
            UploadFollowUp::Retry {
                delay: Duration::from_secs(10),
                failures: 2
            }
        );
        assert!(!slot.free_for("a", now), "build a backs off");
        assert!(slot.free_for("b", now), "a newer build starts afresh");
        assert_eq!(slot.retry, Retry::default());
        slot.in_flight = true;
        assert!(
            !slot.free_for("c", now),
            "an upload in flight stays in flight"
        );
    }

    fn candidates(cfg: &Config, st: ImageState, has_file: bool) -> Vec<(String, String)> {
        let provider_formats = cfg
            .providers
            .iter()
            .map(|p| {
                let format = provider::configured_format(p);
                assert!(matches!(format, provider::ConfiguredFormat::Named(_)));
                (p.name.clone(), format.format().to_string())
            })
            .collect();
        let images = BTreeMap::from([("ubuntu".to_string(), st)]);
        upload_candidates(cfg, &provider_formats, |_| true, &images, |_| has_file)
            .into_iter()
            .map(|c| (c.provider, c.build_id))
            .collect()
    }

    #[test]
    fn a_new_provider_gets_the_newest_ready_build_only() {
        let cfg = cfg(&format!(
            "{}{}",
            provider("p1", "qcow2", false),
            provider("p2", "qcow2", false)
        ));
        let st = image(vec![
            with_upload(
                build("old", BuildState::Ready, 30.0, &["qcow2"]),
                "p1",
                "0000000001",
                UploadState::Ready,
                29.0,
            ),
            with_upload(
                build("new", BuildState::Ready, 2.0, &["qcow2"]),
                "p1",
                "0000000001",
                UploadState::Ready,
                1.0,
            ),
        ]);
        assert_eq!(
            candidates(&cfg, st.clone(), true),
            [("p2".to_string(), "new".to_string())]
        );
        assert!(
            candidates(&cfg, st, false).is_empty(),
            "only the builder holding the file uploads"
        );
    }

    #[test]
    fn paused_or_removed_providers_and_uploads_in_progress_get_no_upload() {
        let st = image(vec![build("new", BuildState::Ready, 2.0, &["qcow2"])]);
        let paused = cfg(&provider("p1", "qcow2", true));
        assert!(candidates(&paused, st.clone(), true).is_empty());
        let removed = cfg("");
        assert!(candidates(&removed, st.clone(), true).is_empty());
        let wrong_format = cfg(&provider("p1", "raw", false));
        assert!(candidates(&wrong_format, st.clone(), true).is_empty());
        let live = cfg(&provider("p1", "qcow2", false));
        let formats = BTreeMap::from([("p1".to_string(), "qcow2".to_string())]);
        let images = BTreeMap::from([("ubuntu".to_string(), st.clone())]);
        assert!(
            upload_candidates(&live, &formats, |_| false, &images, |_| true).is_empty(),
            "a provider without a driver gets nothing"
        );
        let uploading = image(vec![with_upload(
            build("new", BuildState::Ready, 2.0, &["qcow2"]),
            "p1",
            "0000000001",
            UploadState::Uploading,
            1.0,
        )]);
        assert!(candidates(&live, uploading, true).is_empty());
        let c = upload_candidates(&live, &formats, |_| true, &images, |_| true);
        assert_eq!(c[0].file, Path::new("/images/ubuntu-new.qcow2"));
    }

    #[test]
    fn the_loop_wakes_for_the_nearest_future_deadline() {
        let cfg = cfg(&provider("p1", "qcow2", false));
        let c = clock();
        let timers = Timers {
            next_verify: c.now + Duration::from_secs(3600),
            cleanup_due: None,
        };
        let mut images = BTreeMap::from([(
            "ubuntu".to_string(),
            image(vec![build("a", BuildState::Ready, 23.5, &["qcow2"])]),
        )]);
        let mut slots = BTreeMap::new();
        let wake = next_wake(&cfg, &images, &slots, timers, c);
        assert_eq!(
            (wake - c.now).as_secs(),
            1800,
            "the rebuild-age expiry in half an hour"
        );
        let mut slot = UploadSlot::default();
        slot.retry.retry_at = Some(c.now + Duration::from_secs(60));
        slots.insert(("ubuntu".to_string(), "p1".to_string()), slot);
        assert_eq!(
            next_wake(&cfg, &images, &slots, timers, c) - c.now,
            Duration::from_secs(60)
        );
        let past = Timers {
            cleanup_due: Some(c.now - Duration::from_secs(1)),
            ..timers
        };
        images.get_mut("ubuntu").unwrap().retry.retry_at = Some(c.now);
        assert_eq!(
            next_wake(&cfg, &images, &slots, past, c) - c.now,
            Duration::from_secs(60),
            "instants already due are not waited for"
        );
    }

    #[test]
    fn two_newest_ready_builds_are_kept_and_recent_uploads_bridge_to_newer_builds() {
        // c and d are the newest ready builds; d is not uploaded yet, so b's and a's uploads
        // to p1 are the two newest and survive their builds' deletion.
        let builds = vec![
            with_upload(
                build("a", BuildState::Ready, 40.0, &["qcow2"]),
                "p1",
                "0000000001",
                UploadState::Ready,
                39.0,
            ),
            with_upload(
                build("b", BuildState::Ready, 30.0, &["qcow2"]),
                "p1",
                "0000000001",
                UploadState::Ready,
                29.0,
            ),
            build("c", BuildState::Ready, 20.0, &["qcow2"]),
            build("d", BuildState::Ready, 1.0, &["qcow2"]),
            build("e", BuildState::Failed, 0.5, &[]),
            with_upload(
                build("old", BuildState::Ready, 50.0, &["qcow2"]),
                "p1",
                "0000000001",
                UploadState::Ready,
                49.0,
            ),
        ];
        let keep = retention(true, &builds);
        assert_eq!(keep.builds, BTreeSet::from(["c".into(), "d".into()]));
        let upload = |b: &str| (b.to_string(), "p1".to_string(), "0000000001".to_string());
        assert_eq!(
            keep.protected_uploads,
            BTreeSet::from([upload("a"), upload("b")])
        );
        assert!(
            retention(false, &builds).builds.is_empty(),
            "an image gone from the config keeps no build"
        );
    }

    #[test]
    fn ages_read_like_an_operator_says_them() {
        assert_eq!(human_age(26.0 * 3600.0 + 5.0), "26h");
        assert_eq!(human_age(125.0), "2m");
        assert_eq!(human_age(5.0), "5s");
    }
}
