//! Build workers (`build-0`, `build-1`, ...): run diskimage-builder for one build job and
//! record the result in ZooKeeper, exactly as nodepool 11's BuildWorker does (wire spec §1.4).
//!
//! # One job
//!
//! 1. Free-space guard: below `images-dir-required-free` GiB, report `NoSpace` and touch
//!    nothing (no lock, no record, no log pruning), so a builder with space can take it.
//! 2. *check → non-blocking lock → re-check*: take the image build lock
//!    (`/nodepool/images/<image>/builds/lock`) without waiting; under it, re-check the pause
//!    flag, the request (manual builds) and the newest ready build (someone else may have just
//!    built it).
//! 3. Write the `building` record under a new uuid4 build id.
//! 4. Prune old build logs of this image (exact name match), then run DIB with upstream's
//!    command line and environment, its output appended to `<build-log-dir>/<image>-<id>.log`
//!    which ends with `Exit code: N`. DIB runs in its own process group; a timeout or shutdown
//!    stops the whole group. While DIB runs, the build is in the `progress` table (elapsed
//!    time, the build log's last line); a failed run's error line carries the log's last
//!    lines, so the cause is in the daemon log.
//! 5. The image gate (`gate`): every file DIB wrote is checked with `qemu-img` (and the
//!    diskimage's `validate-command`) before `ready` may be written; a refused build is
//!    `failed` like a DIB failure, and its local files are removed at once.
//! 6. Overwrite the record with `ready` (with formats) or `failed` (without); a manual
//!    build's `ready` and the deletion of the `request-build` it satisfied are one
//!    transaction (upstream deletes after the write, and a request made in between is
//!    merged into the old znode and lost with it). If the ZooKeeper session was lost while DIB ran,
//!    the result is `failed` ("ZooKeeper lost while building"). A session that was only
//!    suspended (a server restart, a network blip) and resumed is no loss: DIB keeps running
//!    while suspended, and a result that comes while still suspended waits for the session's
//!    fate. If the final write fails, the build's local files are deleted at once.
//!
//! Every file name (DIB's output, image files, the build log) comes from `local`.
//!
//! The lock is held for the whole DIB run. Every job reports exactly one [`BuildOutcome`],
//! even when the worker panics (the pool reports [`BuildResult::Failed`] then; see `pool`).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, error, info, warn};

use crate::command;
use crate::config::DiskImage;
use crate::gate::{self, GateFailure};
use crate::local;
use crate::metrics::FailureCause;
use crate::model::{self, BuildState};
use crate::pool::{Stop, Work, WorkerPool};
use crate::progress;
use crate::registry;
use crate::stats::Stats;
use crate::thread::ThreadKind;
use crate::zk::schema::ImageBuild;
use crate::zk::tree::{self, BuildInfo};
use crate::zk::{ConnState, Mode, ReadOp, ReadResult, Zk, fence, lock, paths};

/// Grace between SIGTERM and SIGKILL of a DIB process group.
pub const DIB_GRACE: Duration = Duration::from_secs(10);

/// Everything a worker needs to build one image; built by the scheduler.
#[derive(Debug, Clone)]
pub struct BuildJob {
    pub image: String,
    pub diskimage: DiskImage,
    /// The formats to build (sorted): the diskimage's own plus its providers'.
    pub formats: Vec<String>,
    /// Why the scheduler wants this build (logged when it starts).
    pub cause: String,
    /// A `request-build` znode asked for it.
    pub manual: bool,
    /// The newest ready build the scheduler saw; a different one under the lock means
    /// someone else just built the image.
    pub seen_newest_ready: Option<String>,
    pub env: BuildEnv,
}

/// Builder-wide settings for builds.
#[derive(Debug, Clone)]
pub struct BuildEnv {
    pub images_dir: PathBuf,
    pub build_log_dir: PathBuf,
    pub build_log_retention: i64,
    pub elements_dir: Option<PathBuf>,
    /// GiB; 0 turns the check off.
    pub required_free_gib: u64,
    /// The top-level `image-gate` (a diskimage's own overrides it).
    pub image_gate: bool,
    pub builder_id: String,
    pub fqdn: String,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum BuildResult {
    /// A `ready` build was recorded.
    Ready {
        build_id: String,
        record: ImageBuild,
    },
    /// A `failed` build was recorded (or nothing could be recorded).
    Failed {
        build_id: Option<String>,
        reason: String,
        /// The build's record could not be rewritten (ZooKeeper was gone for longer than the
        /// retries): it still says `building` although nobody builds it any more.
        unrecorded: bool,
    },
    /// Nothing was done, for a good reason (lock held, request gone, already built, paused).
    Skipped { reason: String },
    /// Not enough free space in images-dir; nothing was done.
    NoSpace { free_gib: f64, required_gib: u64 },
}

/// One job's report to the scheduler.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    pub image: String,
    pub manual: bool,
    pub result: BuildResult,
    /// The builds of the image as read under the lock (when they were read).
    pub builds: Option<Vec<BuildInfo>>,
}

/// How a DIB run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DibOutcome {
    /// DIB exited by itself with this code.
    Exited(i32),
    /// DIB was killed by this signal (not by us).
    Signalled(i32),
    /// `build-timeout` passed; its process group was stopped.
    TimedOut,
    /// The daemon is stopping; its process group was stopped.
    Cancelled,
    /// DIB could not be started (the command line, the log directory, the spawn).
    SpawnFailed(String),
    /// DIB was started but waiting for it failed.
    WaitFailed(String),
}

impl DibOutcome {
    /// The exit code as upstream sees it (128 + signal for a signal, 1 for a stopped run);
    /// `None` when DIB did not run to an end.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            DibOutcome::Exited(rc) => Some(*rc),
            DibOutcome::Signalled(sig) => Some(128 + sig),
            DibOutcome::TimedOut | DibOutcome::Cancelled => Some(1),
            DibOutcome::SpawnFailed(_) | DibOutcome::WaitFailed(_) => None,
        }
    }

    /// Only `Exited(0)` is a successful run.
    pub fn succeeded(&self) -> bool {
        *self == DibOutcome::Exited(0)
    }

    /// What the failure message adds after the exit code, if anything.
    fn detail(&self) -> Option<String> {
        match self {
            DibOutcome::Exited(_) | DibOutcome::TimedOut => None,
            DibOutcome::Signalled(sig) => Some(format!("killed by signal {sig}")),
            DibOutcome::Cancelled => Some("stopped by shutdown".into()),
            DibOutcome::SpawnFailed(d) | DibOutcome::WaitFailed(d) => Some(d.clone()),
        }
    }
}

/// What a finished DIB run comes to, before it is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every format was written: the build is `ready`.
    Built,
    /// The ZooKeeper session was lost while DIB ran (the lock is gone).
    SessionLost,
    /// DIB did not succeed; `hint` explains an exit without a detail of its own (the
    /// out-of-space check of the build log).
    DibFailed {
        dib: DibOutcome,
        hint: Option<String>,
    },
    /// DIB exited 0 without writing these files.
    FilesMissing(Vec<String>),
    /// Every file was written, but the image gate refused one (see `gate`).
    GateFailed(GateFailure),
}

impl Verdict {
    /// Decides, in this order: session lost, DIB failed, files missing, built. `hint` is
    /// asked only for a failed DIB run without a detail of its own.
    pub fn of(
        session_valid: bool,
        dib: &DibOutcome,
        missing: Vec<String>,
        hint: impl FnOnce() -> Option<String>,
    ) -> Verdict {
        if !session_valid {
            Verdict::SessionLost
        } else if !dib.succeeded() {
            let hint = if dib.detail().is_none() { hint() } else { None };
            Verdict::DibFailed {
                dib: dib.clone(),
                hint,
            }
        } else if !missing.is_empty() {
            Verdict::FilesMissing(missing)
        } else {
            Verdict::Built
        }
    }

    /// The failure reason as logged and reported; `None` for [`Verdict::Built`].
    pub fn reason(&self, image: &str) -> Option<String> {
        match self {
            Verdict::Built => None,
            Verdict::SessionLost => Some(format!("ZooKeeper lost while building {image}")),
            Verdict::DibFailed { dib, hint } => {
                let detail = dib.detail().or_else(|| hint.clone());
                Some(format!(
                    "DIB failed creating {image} ({}) (timeout={}){}",
                    dib.exit_code()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "none".into()),
                    if *dib == DibOutcome::TimedOut {
                        "True"
                    } else {
                        "False"
                    },
                    detail.map(|d| format!(": {d}")).unwrap_or_default()
                ))
            }
            Verdict::FilesMissing(files) => Some(format!(
                "DIB exited 0 but did not write {}",
                files.join(", ")
            )),
            Verdict::GateFailed(failure) => Some(format!("image gate failed: {failure}")),
        }
    }

    /// A build stopped by the daemon's own shutdown is no error of the build.
    pub fn stopped_by_shutdown(&self) -> bool {
        matches!(
            self,
            Verdict::DibFailed {
                dib: DibOutcome::Cancelled,
                ..
            } | Verdict::GateFailed(GateFailure::Cancelled)
        )
    }
}

/// The build worker pool (`build-0`, ...); it waits for running builds when it stops.
pub type BuildPool = WorkerPool<BuildJob, BuildOutcome>;

/// Starts `n` build workers; outcomes go to `outcomes`. Dropping (or disconnecting) `cancel`
/// stops running builds.
pub fn start_pool(
    n: usize,
    zk: &Zk,
    outcomes: Sender<BuildOutcome>,
    cancel: Receiver<()>,
    stats: Stats,
) -> BuildPool {
    let work = BuildWork {
        zk: zk.clone(),
        cancel,
        stats,
    };
    WorkerPool::start(ThreadKind::Build, "build", n, work, outcomes, Stop::Join)
}

/// What a build worker holds.
#[derive(Clone)]
struct BuildWork {
    zk: Zk,
    cancel: Receiver<()>,
    stats: Stats,
}

impl Work for BuildWork {
    type Job = BuildJob;
    type Outcome = BuildOutcome;

    fn run(&mut self, job: &BuildJob) -> BuildOutcome {
        run_job(&self.zk, job, &self.cancel, &self.stats)
    }

    fn panicked(&mut self, job: &BuildJob) -> BuildOutcome {
        outcome(
            job,
            BuildResult::Failed {
                build_id: None,
                reason: "build worker panicked".into(),
                unrecorded: false,
            },
            None,
        )
    }
}

fn outcome(job: &BuildJob, result: BuildResult, builds: Option<Vec<BuildInfo>>) -> BuildOutcome {
    BuildOutcome {
        image: job.image.clone(),
        manual: job.manual,
        result,
        builds,
    }
}

/// One step of a job: `Err` ends the job there (nothing more is done, and the image's
/// builds are not re-read).
type Step<T> = Result<T, EarlyEnd>;

/// How a job can end before its result is recorded: every [`BuildResult`] but `Ready`.
#[derive(Debug)]
enum EarlyEnd {
    Skipped(String),
    NoSpace {
        free_gib: f64,
        required_gib: u64,
    },
    Failed {
        build_id: Option<String>,
        reason: String,
        unrecorded: bool,
    },
}

impl From<EarlyEnd> for BuildResult {
    fn from(end: EarlyEnd) -> BuildResult {
        match end {
            EarlyEnd::Skipped(reason) => BuildResult::Skipped { reason },
            EarlyEnd::NoSpace {
                free_gib,
                required_gib,
            } => BuildResult::NoSpace {
                free_gib,
                required_gib,
            },
            EarlyEnd::Failed {
                build_id,
                reason,
                unrecorded,
            } => BuildResult::Failed {
                build_id,
                reason,
                unrecorded,
            },
        }
    }
}

/// Runs one job to completion (see the module docs): check space → lock → re-check →
/// record → run → gate → finalize, each a function below.
pub fn run_job(zk: &Zk, job: &BuildJob, cancel: &Receiver<()>, stats: &Stats) -> BuildOutcome {
    steps(zk, job, cancel, stats).unwrap_or_else(|end| outcome(job, end.into(), None))
}

fn steps(zk: &Zk, job: &BuildJob, cancel: &Receiver<()>, stats: &Stats) -> Step<BuildOutcome> {
    check_space(job)?;
    let guard = lock_image(zk, job)?;
    recheck_under_lock(zk, job)?;
    let build_id = record_building(zk, job)?;
    let (dib, dib_time) = run(job, &build_id, cancel);
    wait_for_session_fate(zk, job, &build_id);
    let verdict = gate(job, &build_id, &dib, guard.is_valid(), cancel);
    count_build(job, &dib, dib_time, &verdict, stats);
    if let Some(cause) = failure_cause(&verdict) {
        crate::metrics::global().build_failed(&job.image, cause);
    }
    let record = finalize(zk, job, &build_id, &verdict, &guard, cancel)?;
    let result = report(job, build_id, record, &verdict, stats);
    let builds = tree::read_image(zk, &job.image).ok();
    drop(guard);
    Ok(outcome(job, result, builds))
}

/// Below `images-dir-required-free` GiB nothing is touched, so a builder with space can
/// take the build. A failing check is logged and does not stop the build.
fn check_space(job: &BuildJob) -> Step<()> {
    let required = job
        .diskimage
        .images_dir_required_free
        .unwrap_or(job.env.required_free_gib);
    if required == 0 {
        return Ok(());
    }
    match local::free_gib(&job.env.images_dir) {
        Ok(free) if free < required as f64 => Err(EarlyEnd::NoSpace {
            free_gib: free,
            required_gib: required,
        }),
        Ok(_) => Ok(()),
        Err(e) => {
            warn!(
                "image={}: cannot check free space in {}: {e}",
                job.image,
                job.env.images_dir.display()
            );
            Ok(())
        }
    }
}

fn skipped(reason: impl Into<String>) -> EarlyEnd {
    EarlyEnd::Skipped(reason.into())
}

/// The image build lock, without waiting: a held lock means another builder builds it.
fn lock_image(zk: &Zk, job: &BuildJob) -> Step<lock::LockGuard> {
    registry::set_activity(format!("locking image build lock of {}", job.image));
    match lock::try_lock(zk, &paths::image_build_lock_path(&job.image)) {
        Ok(Some(g)) => Ok(g),
        Ok(None) => Err(skipped("the image build lock is held by another builder")),
        Err(e) => Err(skipped(format!("cannot take the image build lock: {e}"))),
    }
}

/// Re-check under the lock: the build records, the pause flag and the request, in one
/// multi-read after listing the builds (two round trips: this is on the latency path).
fn recheck_under_lock(zk: &Zk, job: &BuildJob) -> Step<()> {
    let recheck =
        recheck(zk, &job.image).map_err(|e| skipped(format!("cannot re-read the image: {e}")))?;
    if recheck.paused {
        return Err(skipped("image is paused"));
    }
    if job.manual {
        if !recheck.requested {
            return Err(skipped("the build request is gone"));
        }
    } else {
        let newest = recheck
            .builds
            .iter()
            .filter(|(_, b)| b.state == BuildState::Ready)
            .max_by(|a, b| a.1.state_time.total_cmp(&b.1.state_time))
            .map(|(id, _)| id.clone());
        if newest.is_some() && newest != job.seen_newest_ready {
            return Err(skipped("another builder just built it"));
        }
    }
    Ok(())
}

/// The `building` record under a new build id; returns the id.
fn record_building(zk: &Zk, job: &BuildJob) -> Step<String> {
    let image = job.image.as_str();
    let build_id = model::new_build_id();
    let building = ImageBuild::building(
        &job.env.fqdn,
        &job.env.builder_id,
        &job.formats,
        model::now_epoch(),
    );
    let build_path = paths::image_build_path(image, &build_id);
    if let Err(e) = zk.create_with_parents(&build_path, &building.to_json(), Mode::Persistent) {
        return Err(EarlyEnd::Failed {
            build_id: None,
            reason: format!("cannot write the building record: {e}"),
            unrecorded: false,
        });
    }
    if job.manual {
        info!("Manual build request for image {image}");
    }
    info!("Building image {image} (build {build_id}): {}", job.cause);
    Ok(build_id)
}

/// Runs DIB; returns how it ended and how long it ran.
fn run(job: &BuildJob, build_id: &str, cancel: &Receiver<()>) -> (DibOutcome, Duration) {
    let dib_started = Instant::now();
    let dib = run_dib(job, build_id, cancel);
    crate::metrics::global().dib_ran(&job.image, dib_started.elapsed());
    (dib, dib_started.elapsed())
}

/// Counts the run in statsd: DIB's exit code, or 1 when the image gate refused the build
/// (a gate failure is a failed build, like a DIB failure).
fn count_build(job: &BuildJob, dib: &DibOutcome, took: Duration, verdict: &Verdict, stats: &Stats) {
    let rc = match verdict {
        Verdict::GateFailed(_) => 1,
        _ => dib.exit_code().unwrap_or(1),
    };
    stats.build_done(&job.image, took, rc, model::now_epoch() as u64);
}

/// Upstream waits while suspended before writing the result; so do we, for as long as the
/// session may stay suspended: if it resumes, the build is still ours to record.
fn wait_for_session_fate(zk: &Zk, job: &BuildJob, build_id: &str) {
    if zk.state() == ConnState::Suspended {
        info!(
            "image={} build={build_id}: waiting for ZooKeeper to record the result",
            job.image
        );
        zk.wait_while_suspended(zk.suspension_limit() + zk.session_timeout());
    }
}

/// What the run comes to: the session, DIB's end, the files it should have written, and
/// then the image gate over those files (`gate`). A build the gate refuses loses its local
/// files at once (it is never uploaded); its reason and output go to the build log too.
fn gate(
    job: &BuildJob,
    build_id: &str,
    dib: &DibOutcome,
    session_valid: bool,
    cancel: &Receiver<()>,
) -> Verdict {
    let missing: Vec<String> = job
        .formats
        .iter()
        .map(|f| local::image_file_name(&job.image, build_id, f))
        .filter(|name| !job.env.images_dir.join(name).is_file())
        .collect();
    let verdict = Verdict::of(session_valid, dib, missing, || out_of_space(job, build_id));
    if verdict != Verdict::Built {
        return verdict;
    }
    let image = job.image.as_str();
    let spec = gate::GateSpec {
        image,
        build_id,
        files: gate::build_files(&job.env.images_dir, image, build_id, &job.formats),
        qemu_img: job.diskimage.image_gate.unwrap_or(job.env.image_gate),
        validate_command: job.diskimage.validate_command.as_deref(),
        validate_timeout: Duration::from_secs(job.diskimage.validate_timeout),
    };
    if !spec.qemu_img && spec.validate_command.is_none() {
        return Verdict::Built;
    }
    registry::set_activity(format!("checking the files of {image} {build_id}"));
    let started = Instant::now();
    match gate::check_build(&spec, cancel) {
        Ok(()) => {
            info!(
                "image={image} build={build_id}: image gate passed in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            Verdict::Built
        }
        Err(failure) => {
            let log_path = local::build_log(&job.env.build_log_dir, image, build_id);
            append_line(&log_path, &format!("Image gate failed: {failure}"));
            if failure != GateFailure::Cancelled {
                local::delete_build(&job.env.images_dir, image, build_id);
            }
            Verdict::GateFailed(failure)
        }
    }
}

/// The `cause` label a failed verdict is counted under; `None` for a build, or a run stopped
/// by shutdown (no failure of the build).
pub fn failure_cause(verdict: &Verdict) -> Option<FailureCause> {
    match verdict {
        Verdict::Built => None,
        v if v.stopped_by_shutdown() => None,
        Verdict::SessionLost => Some(FailureCause::SessionLost),
        Verdict::DibFailed {
            dib: DibOutcome::TimedOut,
            ..
        } => Some(FailureCause::Timeout),
        // The hint is only ever the out-of-space finding of the build log.
        Verdict::DibFailed { hint: Some(_), .. } => Some(FailureCause::NoSpace),
        Verdict::DibFailed { .. } => Some(FailureCause::ExitCode),
        Verdict::FilesMissing(_) => Some(FailureCause::MissingFiles),
        Verdict::GateFailed(_) => Some(FailureCause::Gate),
    }
}

/// Overwrites the record with `ready` or `failed`; `ready` only while the lock holds, a
/// failure also without it. A write whose reply was lost is settled (`zk::fence`), which
/// `cancel` (a stop) cuts short, deleting nothing; a result that cannot be recorded deletes
/// the build's local files. Returns the record written.
fn finalize(
    zk: &Zk,
    job: &BuildJob,
    build_id: &str,
    verdict: &Verdict,
    guard: &lock::LockGuard,
    cancel: &Receiver<()>,
) -> Step<ImageBuild> {
    let image = job.image.as_str();
    let build_path = paths::image_build_path(image, build_id);
    let mut record = ImageBuild {
        state: BuildState::Failed,
        state_time: model::now_epoch(),
        builder: Some(job.env.fqdn.clone()),
        builder_id: Some(job.env.builder_id.clone()),
        formats: Vec::new(),
        username: Some(job.diskimage.username.clone()),
        python_path: Some(job.diskimage.python_path.clone()),
        shell_type: job.diskimage.shell_type.clone(),
    };
    if *verdict == Verdict::Built {
        record.state = BuildState::Ready;
        record.formats = job.formats.clone();
    }
    let data = record.to_json();
    let lock_needed = (record.state == BuildState::Ready).then_some(guard);
    // Only a manual build satisfies the request (as upstream): a request made while a
    // scheduled build was finishing asks for another build. It goes with the ready record,
    // in one transaction, so a request made once the build shows `ready` is a new one.
    let request = paths::image_build_request_path(image);
    let consumes = (record.state == BuildState::Ready && job.manual).then_some(request.as_str());
    let timeout = zk.config().session_timeout;
    let mut write = fence::write_result(zk, &build_path, &data, lock_needed, consumes, timeout);
    if let Err(e) = &write
        && record.state == BuildState::Ready
    {
        let mut failed = record.clone();
        failed.state = BuildState::Failed;
        failed.formats.clear();
        let stopping = || {
            matches!(
                cancel.try_recv(),
                Err(crossbeam_channel::TryRecvError::Disconnected)
            )
        };
        match fence::settle(zk, &build_path, &data, &failed.to_json(), &stopping) {
            fence::Settled::Recorded => {
                info!(
                    "image={image} build={build_id}: the ready record was written although the reply was lost ({e})"
                );
                write = Ok(());
            }
            fence::Settled::Unknown => {
                // The janitor records it `failed` if it still says `building` (abandoned
                // builds), and the files go with the record; if `ready` landed, they stay.
                error!(
                    "image={image} build={build_id}: cannot learn whether the ready record was written ({e}); keeping its local files"
                );
                return Err(EarlyEnd::Failed {
                    build_id: Some(build_id.to_string()),
                    reason: format!("the build's record is unknown: {e}"),
                    unrecorded: true,
                });
            }
            fence::Settled::NotRecorded => {}
        }
    }
    if let Err(e) = write {
        error!(
            "image={image} build={build_id}: cannot record the build result ({e}); deleting its local files"
        );
        local::delete_build(&job.env.images_dir, image, build_id);
        return Err(EarlyEnd::Failed {
            build_id: Some(build_id.to_string()),
            reason: format!("cannot record the result: {e}"),
            unrecorded: true,
        });
    }
    Ok(record)
}

/// Logs the recorded result; a ready build counts its file sizes.
fn report(
    job: &BuildJob,
    build_id: String,
    record: ImageBuild,
    verdict: &Verdict,
    stats: &Stats,
) -> BuildResult {
    let image = job.image.as_str();
    let Some(reason) = verdict.reason(image) else {
        info!("DIB image {image} is built (build {build_id})");
        for f in &job.formats {
            let file = local::image_file(&job.env.images_dir, image, &build_id, f);
            if let Ok(meta) = std::fs::metadata(&file) {
                use std::os::unix::fs::MetadataExt;
                stats.build_size(image, f, meta.blocks() * 512);
            }
        }
        return BuildResult::Ready { build_id, record };
    };
    if verdict.stopped_by_shutdown() {
        warn!("image={image} build={build_id}: {reason}");
    } else if let Verdict::DibFailed { .. } = verdict {
        // The cause is usually in DIB's last words: bring them into the daemon log, after
        // the line upstream logs (which stays the first line).
        let log_path = job
            .env
            .build_log_dir
            .join(format!("{image}-{build_id}.log"));
        error!(
            "image={image} build={build_id}: {reason}{}",
            failure_tail(&log_path)
        );
    } else {
        error!("image={image} build={build_id}: {reason}");
    }
    // The scheduler repeats the reason when it schedules the retry: its first line is
    // enough there (a gate failure's tool output is in the line above and the build log).
    BuildResult::Failed {
        build_id: Some(build_id),
        reason: reason.lines().next().unwrap_or_default().to_string(),
        unrecorded: false,
    }
}

/// What the build worker re-reads under the image build lock.
struct Recheck {
    builds: Vec<(String, ImageBuild)>,
    paused: bool,
    requested: bool,
}

fn recheck(zk: &Zk, image: &str) -> crate::zk::Result<Recheck> {
    let ids = tree::build_ids(zk, image)?;
    let mut ops: Vec<ReadOp> = ids
        .iter()
        .map(|id| ReadOp::Data(paths::image_build_path(image, id)))
        .collect();
    ops.push(ReadOp::Data(paths::image_pause_path(image)));
    ops.push(ReadOp::Data(paths::image_build_request_path(image)));
    let results = zk.multi_read(&ops)?;
    let mut builds = Vec::new();
    for (id, res) in ids.iter().zip(results.iter()) {
        if let Some(ReadResult::Data(data, _)) = res
            && let Some(b) = tree::parse_build(image, id, data)
        {
            builds.push((id.clone(), b));
        }
    }
    let n = ids.len();
    Ok(Recheck {
        builds,
        paused: results[n].is_some(),
        requested: results[n + 1].is_some(),
    })
}

/// The DIB command line as upstream builds it (before shell-word splitting).
pub fn dib_command_line(job: &BuildJob, build_id: &str) -> String {
    let base = local::dib_base(&job.env.images_dir, &job.image, build_id);
    let formats = job.formats.join(",");
    let dib_cmd = job.diskimage.dib_cmd.replace("%p", &share_dir());
    let mut cmd = format!("{dib_cmd} -x -t {formats} --checksum --no-tmpfs");
    if formats.contains("qcow2") {
        cmd.push_str(" --qemu-img-options 'compat=0.10'");
    }
    cmd.push_str(&format!(
        " -o {} {}",
        base.display(),
        job.diskimage.elements.join(" ")
    ));
    cmd.trim_end().to_string()
}

/// What `%p` in `dib-cmd` stands for: upstream uses the nodepool package directory; we use
/// the directory holding this executable.
fn share_dir() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.display().to_string()))
        .unwrap_or_else(|| ".".into())
}

/// The environment DIB gets on top of ours, in order (later entries win).
pub fn dib_env(job: &BuildJob, build_id: &str) -> Vec<(String, String)> {
    let base = local::dib_base(&job.env.images_dir, &job.image, build_id);
    let mut env = vec![
        ("DIB_RELEASE".to_string(), job.diskimage.release.clone()),
        ("DIB_IMAGE_NAME".to_string(), job.image.clone()),
        ("DIB_IMAGE_FILENAME".to_string(), base.display().to_string()),
    ];
    if let Some(e) = &job.env.elements_dir {
        env.push(("ELEMENTS_PATH".into(), e.display().to_string()));
    }
    env.extend(
        job.diskimage
            .env_vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    env
}

/// Runs DIB (appending its `Exit code: N` line to the build log when it ended by itself).
fn run_dib(job: &BuildJob, build_id: &str, cancel: &Receiver<()>) -> DibOutcome {
    let image = job.image.as_str();
    let cmdline = dib_command_line(job, build_id);
    let log_path = local::build_log(&job.env.build_log_dir, image, build_id);
    let argv = match command::shell_split(&cmdline) {
        Ok(a) if !a.is_empty() => a,
        Ok(_) => return DibOutcome::SpawnFailed("empty dib-cmd".into()),
        Err(e) => {
            return DibOutcome::SpawnFailed(format!("cannot split the DIB command line: {e}"));
        }
    };
    if let Err(e) = std::fs::create_dir_all(&job.env.build_log_dir) {
        return DibOutcome::SpawnFailed(format!(
            "cannot create {}: {e}",
            job.env.build_log_dir.display()
        ));
    }
    local::prune_build_logs(&job.env.build_log_dir, image, job.env.build_log_retention);
    info!("Running {cmdline}");
    info!("Logging to {}", log_path.display());
    let spec = command::Spec {
        program: argv[0].clone(),
        args: argv[1..].to_vec(),
        env: dib_env(job, build_id),
        cwd: None,
        output: command::Output::Log(log_path.clone()),
        timeout: Some(Duration::from_secs(job.diskimage.build_timeout)),
        grace: DIB_GRACE,
        parent_death_signal: None,
    };
    let started = Instant::now();
    let running = match command::spawn(spec) {
        Ok(r) => r,
        Err(e) => {
            error!("image={image} build={build_id}: {e}");
            return DibOutcome::SpawnFailed(e.to_string());
        }
    };
    registry::set_activity(format!(
        "building {image} {build_id}, dib pid {}",
        running.pid()
    ));
    let tracked = progress::track(progress::Work::Build {
        image: image.to_string(),
        build_id: build_id.to_string(),
        log: log_path.clone(),
    });
    let result = running.wait(cancel);
    drop(tracked);
    debug!(
        "image={image} build={build_id}: DIB ran for {:.1}s",
        started.elapsed().as_secs_f64()
    );
    match result {
        Ok(command::Outcome::Exited(rc)) => {
            append_line(&log_path, &format!("Exit code: {rc}"));
            DibOutcome::Exited(rc)
        }
        Ok(command::Outcome::Signaled(sig)) => {
            append_line(&log_path, &format!("Exit code: {}", 128 + sig));
            DibOutcome::Signalled(sig)
        }
        Ok(command::Outcome::TimedOut) => {
            error!(
                "Build timeout for image {image}, build {build_id} (log: {})",
                log_path.display()
            );
            DibOutcome::TimedOut
        }
        Ok(command::Outcome::Cancelled) => DibOutcome::Cancelled,
        Err(e) => DibOutcome::WaitFailed(format!("waiting for DIB: {e}")),
    }
}

/// How much of the end of a failed build's log is searched for the out-of-space error.
const LOG_TAIL_SEARCHED: u64 = 64 * 1024;

/// When the end of the build log reports `ENOSPC` ("No space left on device"), says so with
/// the free space of images-dir now, so the daemon log tells the operator why DIB failed.
fn out_of_space(job: &BuildJob, build_id: &str) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let path = local::build_log(&job.env.build_log_dir, &job.image, build_id);
    let mut file = std::fs::File::open(&path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_SEARCHED)))
        .ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC).to_string();
    // The OS message carries " (os error 28)"; tools print only the text before it.
    let text = enospc.split(" (os error").next().unwrap_or(&enospc);
    if !String::from_utf8_lossy(&tail).contains(text) {
        return None;
    }
    let free = match local::free_gib(&job.env.images_dir) {
        Ok(gib) => format!("{:.1} MiB free now", gib * 1024.0),
        Err(e) => format!("free space unknown: {e}"),
    };
    Some(format!(
        "out of disk space: the build log says \"{text}\" (images-dir {}: {free})",
        job.env.images_dir.display()
    ))
}

/// How many of a failed build log's last lines the daemon's error line carries.
const FAILURE_TAIL_LINES: usize = 20;

/// The end of a failed build's log for the daemon's error line: a newline, a header naming
/// the log, and its last non-empty lines (at most 20 of at most 200 characters, indented);
/// empty when the log has none.
fn failure_tail(log_path: &Path) -> String {
    let lines = progress::log_tail(log_path, FAILURE_TAIL_LINES);
    if lines.is_empty() {
        return String::new();
    }
    let mut out = format!("\nLast {} lines of {}:", lines.len(), log_path.display());
    for line in lines {
        out.push_str("\n  ");
        out.push_str(&line);
    }
    out
}

fn append_line(path: &Path, line: &str) {
    let res = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = res {
        warn!("cannot append to {}: {e}", path.display());
    }
}

/// Formats a build lacks among `required`.
pub fn missing_formats(build: &ImageBuild, required: &BTreeSet<String>) -> Vec<String> {
    required
        .iter()
        .filter(|f| !build.formats.contains(f))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(formats: &[&str]) -> BuildJob {
        BuildJob {
            image: "ubuntu".into(),
            diskimage: DiskImage {
                name: "ubuntu".into(),
                dib_cmd: "disk-image-create".into(),
                elements: vec!["ubuntu-minimal".into(), "vm".into()],
                env_vars: [("DIB_RELEASE".to_string(), "override".to_string())]
                    .into_iter()
                    .collect(),
                formats: vec![],
                delete_after_upload: false,
                keep_formats: vec![],
                pause: false,
                rebuild_age: 86400,
                build_timeout: 28800,
                release: "jammy".into(),
                username: "zuul".into(),
                python_path: "auto".into(),
                shell_type: None,
                metadata: Default::default(),
                images_dir_required_free: None,
                image_gate: None,
                validate_command: None,
                validate_timeout: 600,
            },
            formats: formats.iter().map(|s| s.to_string()).collect(),
            cause: "test".into(),
            manual: false,
            seen_newest_ready: None,
            env: BuildEnv {
                images_dir: "/opt/images".into(),
                build_log_dir: "/var/log".into(),
                build_log_retention: 7,
                elements_dir: Some("/etc/elements".into()),
                required_free_gib: 0,
                image_gate: true,
                builder_id: "b".into(),
                fqdn: "h".into(),
            },
        }
    }

    #[test]
    fn dib_command_line_is_upstreams() {
        assert_eq!(
            dib_command_line(&job(&["qcow2", "vhd"]), "abc"),
            "disk-image-create -x -t qcow2,vhd --checksum --no-tmpfs --qemu-img-options 'compat=0.10' -o /opt/images/ubuntu-abc ubuntu-minimal vm"
        );
        assert_eq!(
            dib_command_line(&job(&["tar"]), "abc"),
            "disk-image-create -x -t tar --checksum --no-tmpfs -o /opt/images/ubuntu-abc ubuntu-minimal vm"
        );
    }

    #[test]
    fn env_vars_come_last_and_win() {
        let env = dib_env(&job(&["raw"]), "abc");
        let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "DIB_RELEASE",
                "DIB_IMAGE_NAME",
                "DIB_IMAGE_FILENAME",
                "ELEMENTS_PATH",
                "DIB_RELEASE"
            ]
        );
        assert_eq!(env[2].1, "/opt/images/ubuntu-abc");
        assert_eq!(env.last().unwrap().1, "override");
    }

    fn reason(dib: DibOutcome, hint: Option<&str>) -> String {
        Verdict::of(true, &dib, vec![], || hint.map(String::from))
            .reason("fedora")
            .expect("a failed run has a reason")
    }

    #[test]
    fn dib_failures_read_as_upstreams_messages() {
        assert_eq!(
            reason(DibOutcome::Exited(127), None),
            "DIB failed creating fedora (127) (timeout=False)"
        );
        assert_eq!(
            reason(DibOutcome::TimedOut, None),
            "DIB failed creating fedora (1) (timeout=True)"
        );
        assert_eq!(
            reason(DibOutcome::Signalled(9), None),
            "DIB failed creating fedora (137) (timeout=False): killed by signal 9"
        );
        assert_eq!(
            reason(DibOutcome::Cancelled, Some("unused")),
            "DIB failed creating fedora (1) (timeout=False): stopped by shutdown"
        );
        assert_eq!(
            reason(DibOutcome::SpawnFailed("empty dib-cmd".into()), None),
            "DIB failed creating fedora (none) (timeout=False): empty dib-cmd"
        );
        assert_eq!(
            reason(DibOutcome::Exited(1), Some("out of disk space")),
            "DIB failed creating fedora (1) (timeout=False): out of disk space"
        );
    }

    #[test]
    fn a_gate_failure_reads_as_the_gates_reason() {
        let v = Verdict::GateFailed(GateFailure::WrongFormat {
            file: "fedora-x.qcow2".into(),
            expected: "qcow2".into(),
            found: "raw".into(),
        });
        assert_eq!(
            v.reason("fedora").as_deref(),
            Some("image gate failed: fedora-x.qcow2 is raw, expected qcow2")
        );
        assert!(!v.stopped_by_shutdown());
    }

    #[test]
    fn the_verdict_puts_a_lost_session_first_and_missing_files_after_dib() {
        let missing = || vec!["fedora-x.qcow2".to_string()];
        let no_hint = || None;
        assert_eq!(
            Verdict::of(false, &DibOutcome::Exited(0), vec![], no_hint),
            Verdict::SessionLost
        );
        assert!(matches!(
            Verdict::of(true, &DibOutcome::Exited(2), missing(), no_hint),
            Verdict::DibFailed { .. }
        ));
        let v = Verdict::of(true, &DibOutcome::Exited(0), missing(), no_hint);
        assert_eq!(
            v.reason("fedora").as_deref(),
            Some("DIB exited 0 but did not write fedora-x.qcow2")
        );
        assert_eq!(
            Verdict::of(true, &DibOutcome::Exited(0), vec![], no_hint),
            Verdict::Built
        );
        assert!(Verdict::of(true, &DibOutcome::Cancelled, vec![], no_hint).stopped_by_shutdown());
        assert!(Verdict::GateFailed(GateFailure::Cancelled).stopped_by_shutdown());
        assert!(!Verdict::of(true, &DibOutcome::TimedOut, vec![], no_hint).stopped_by_shutdown());
    }

    #[test]
    fn failed_builds_are_counted_under_their_cause_and_a_shutdown_is_none() {
        let no_hint = || None;
        let cause = |dib: DibOutcome, missing: Vec<String>, hint: Option<String>| {
            failure_cause(&Verdict::of(true, &dib, missing, || hint))
        };
        assert_eq!(cause(DibOutcome::Exited(0), vec![], None), None);
        assert_eq!(
            cause(DibOutcome::Exited(1), vec![], None),
            Some(FailureCause::ExitCode)
        );
        assert_eq!(
            cause(DibOutcome::TimedOut, vec![], None),
            Some(FailureCause::Timeout)
        );
        assert_eq!(
            cause(DibOutcome::Exited(1), vec![], Some("no space left".into())),
            Some(FailureCause::NoSpace)
        );
        assert_eq!(
            cause(DibOutcome::Exited(0), vec!["img-1.qcow2".into()], None),
            Some(FailureCause::MissingFiles)
        );
        assert_eq!(cause(DibOutcome::Cancelled, vec![], None), None);
        assert_eq!(
            failure_cause(&Verdict::of(false, &DibOutcome::Exited(0), vec![], no_hint)),
            Some(FailureCause::SessionLost)
        );
    }
}
