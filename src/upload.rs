//! Upload workers (`upload-0`, ...): push one ready build to one provider and record the
//! upload in ZooKeeper, as nodepool 11's UploadWorker does (wire spec §1.5), without its
//! polling, its retry storms or its leaks.
//!
//! # One job
//!
//! 1. *check → non-blocking lock → re-check*: take the upload lock
//!    (`…/builds/<id>/providers/<p>/images/lock`) without waiting; under it, re-check that
//!    the build still exists and is `ready` and that no `ready` upload exists for it.
//! 2. Delete the `failed` records of earlier attempts for this (build, provider), so retries
//!    do not pile up records (upstream leaves one per attempt until cleanup).
//! 3. Create the `uploading` record (a ZooKeeper sequence id) BEFORE touching the cloud, so
//!    the launcher's leak cleanup and other builders can see the upload exists.
//! 4. Upload through the provider driver (name from `image-name-format`, checksums from the
//!    `.md5`/`.sha256` files, properties = diskimage `metadata` + provider `meta` + the
//!    `nodepool_*` tags), then run the `post-upload-hook` if any. Meanwhile the upload is
//!    in the `progress` table: bytes sent, rate and ETA from a streaming driver.
//! 5. Write `ready` (with `external_id`, `external_name`, `format`, `username`,
//!    `python_path`, `shell_type`) — or a bare `failed` record. An upload that ends while
//!    the ZooKeeper session is suspended waits for the session's fate first: if it resumes,
//!    the lock is still ours and the result is written as usual.
//!
//! Nothing leaks: when the hook fails, or the `ready` record cannot be written (session
//! lost), the cloud image is deleted before the job reports failure (upstream quirk Q2 leaked
//! it). The driver itself deletes any cloud image of a failed upload. And nothing dangles:
//! the `ready` write is conditional on the record's first version, so a write whose reply
//! was lost is settled (`zk::fence`) before the image is deleted.
//!
//! Shutdown does not wait for uploads beyond a grace period (uploads can take hours);
//! records of interrupted uploads stay `uploading` with a free lock and are removed by the
//! janitor of any builder, as upstream.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use log::{debug, error, info, warn};

use crate::command;
use crate::config::{DiskImage, Provider};
use crate::local::{self, Checksum};
use crate::model::{self, BuildState, UploadState};
use crate::pool::{Stop, Work, WorkerPool};
use crate::progress;
use crate::provider::{ProviderDriver, ProviderError, UploadRequest};
use crate::registry;
use crate::stats::Stats;
use crate::thread::ThreadKind;
use crate::zk::schema::{ImageBuild, ImageUpload};
use crate::zk::tree::{self, BuildInfo};
use crate::zk::{ConnState, Mode, Zk, ZkError, fence, lock, paths};

/// Everything a worker needs to upload one build to one provider; built by the scheduler.
#[derive(Clone)]
pub struct UploadJob {
    pub image: String,
    pub build_id: String,
    pub provider: Provider,
    pub diskimage: DiskImage,
    pub format: String,
    pub file: PathBuf,
    pub driver: Arc<dyn ProviderDriver>,
}

/// How an upload job ended.
#[derive(Debug, Clone)]
pub enum UploadResult {
    Ready {
        upload_id: String,
        external_id: String,
    },
    Failed {
        upload_id: Option<String>,
        reason: String,
    },
    Skipped {
        reason: String,
    },
}

/// One job's report to the scheduler.
#[derive(Debug, Clone)]
pub struct UploadOutcome {
    pub image: String,
    pub build_id: String,
    pub provider: String,
    pub result: UploadResult,
    /// The image's builds as read after the job (when they were read).
    pub builds: Option<Vec<BuildInfo>>,
}

/// How long shutdown waits for running uploads before leaving them to end with the process.
pub const UPLOAD_GRACE: Duration = Duration::from_secs(10);

/// The upload worker pool (`upload-0`, ...); when it stops it waits for running uploads
/// only for [`UPLOAD_GRACE`], then detaches them.
pub type UploadPool = WorkerPool<UploadJob, UploadOutcome>;

/// Starts `n` upload workers; outcomes go to `outcomes`.
pub fn start_pool(n: usize, zk: &Zk, outcomes: Sender<UploadOutcome>, stats: Stats) -> UploadPool {
    let work = UploadWork {
        zk: zk.clone(),
        stats,
    };
    WorkerPool::start(
        ThreadKind::Upload,
        "upload",
        n,
        work,
        outcomes,
        Stop::GraceThenDetach(UPLOAD_GRACE),
    )
}

/// What an upload worker holds.
#[derive(Clone)]
struct UploadWork {
    zk: Zk,
    stats: Stats,
}

impl UploadWork {
    /// The report of a job: its result and the image's builds as read now.
    fn outcome(&self, job: &UploadJob, result: UploadResult) -> UploadOutcome {
        registry::set_activity("idle");
        UploadOutcome {
            image: job.image.clone(),
            build_id: job.build_id.clone(),
            provider: job.provider.name.clone(),
            result,
            builds: tree::read_image(&self.zk, &job.image).ok(),
        }
    }
}

impl Work for UploadWork {
    type Job = UploadJob;
    type Outcome = UploadOutcome;

    fn run(&mut self, job: &UploadJob) -> UploadOutcome {
        let result = run_job(&self.zk, job, &self.stats);
        self.outcome(job, result)
    }

    fn panicked(&mut self, job: &UploadJob) -> UploadOutcome {
        let result = UploadResult::Failed {
            upload_id: None,
            reason: "upload worker panicked".into(),
        };
        self.outcome(job, result)
    }
}

/// One step of a job: `Err` ends the job with that result.
type Step<T> = Result<T, UploadResult>;

fn skipped(reason: impl Into<String>) -> UploadResult {
    UploadResult::Skipped {
        reason: reason.into(),
    }
}

/// Runs one job to completion (see the module docs): lock → re-check → clear failed
/// attempts → record → push → finalize, each a function below.
pub fn run_job(zk: &Zk, job: &UploadJob, stats: &Stats) -> UploadResult {
    steps(zk, job, stats).unwrap_or_else(|end| end)
}

fn steps(zk: &Zk, job: &UploadJob, stats: &Stats) -> Step<UploadResult> {
    let guard = lock_upload(zk, job)?;
    let (build, guard) = recheck_build(zk, job, guard)?;
    let failed_ids = earlier_attempts(zk, job)?;
    clear_failed_attempts(zk, job, failed_ids);
    let upload_path = record_uploading(zk, job, &build)?;
    let upload_id = upload_path
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let external_name = expand_name(
        &job.provider.image_name_format,
        &job.image,
        &upload_id,
        model::now_epoch() as u64,
    );
    let req = request(job, &upload_id, &external_name);
    registry::set_activity(format!(
        "uploading {}-{} to {} as upload {upload_id}",
        job.image, job.build_id, job.provider.name
    ));
    info!(
        "Uploading DIB image build {} from {} to {}",
        job.build_id,
        job.file.display(),
        job.provider.name
    );
    let upload_started = std::time::Instant::now();
    let tracked = progress::track(progress::Work::Upload {
        image: job.image.clone(),
        build_id: job.build_id.clone(),
        provider: job.provider.name.clone(),
        bytes: Arc::clone(&req.progress),
    });
    let pushed = push(job, &req);
    drop(tracked);
    let outcome = match pushed {
        Pushed::Image { external_id } => UploadResult::Ready {
            upload_id: upload_id.clone(),
            external_id,
        },
        pushed @ (Pushed::UploadFailed(_) | Pushed::HookFailed(_)) => {
            let reason = pushed.failure().unwrap_or_default();
            error!(
                "Failed to upload build {} of image {} to provider {}: {reason}",
                job.build_id, job.image, job.provider.name
            );
            UploadResult::Failed {
                upload_id: Some(upload_id.clone()),
                reason,
            }
        }
    };
    let record = match &outcome {
        UploadResult::Ready { external_id, .. } => ImageUpload {
            state: UploadState::Ready,
            state_time: model::now_epoch(),
            external_id: Some(external_id.clone()),
            external_name: Some(external_name),
            format: Some(job.format.clone()),
            username: build.username.clone(),
            python_path: build.python_path.clone(),
            shell_type: build.shell_type.clone(),
        },
        UploadResult::Failed { .. } | UploadResult::Skipped { .. } => {
            ImageUpload::bare_failed(model::now_epoch())
        }
    };
    let count_ready = || {
        let took = upload_started.elapsed();
        stats.upload_done(&job.image, &job.provider.name, took);
        let bytes = std::fs::metadata(&job.file).map_or(0, |m| m.len());
        crate::metrics::global().uploaded(&job.image, &job.provider.name, bytes, took);
    };
    Ok(finalize(
        zk,
        job,
        &upload_path,
        &record,
        outcome,
        &guard,
        count_ready,
    ))
}

/// The upload lock, without waiting: a held lock means someone uploads this build there.
fn lock_upload(zk: &Zk, job: &UploadJob) -> Step<lock::LockGuard> {
    let (image, build_id, provider) = (&job.image, &job.build_id, &job.provider.name);
    let lock_path = paths::image_upload_lock_path(image, build_id, provider);
    registry::set_activity(format!(
        "locking upload lock of {image}-{build_id} for {provider}"
    ));
    match lock::try_lock(zk, &lock_path) {
        Ok(Some(g)) => Ok(g),
        Ok(None) => Err(skipped(
            "the upload lock is held by another worker or builder",
        )),
        Err(e) => Err(skipped(format!("cannot take the upload lock: {e}"))),
    }
}

/// Re-check under the lock: the build still exists and is `ready`. Takes the guard because
/// a build that is gone may need it released first (see below).
fn recheck_build(
    zk: &Zk,
    job: &UploadJob,
    guard: lock::LockGuard,
) -> Step<(ImageBuild, lock::LockGuard)> {
    let (image, build_id) = (job.image.as_str(), job.build_id.as_str());
    match tree::read_build(zk, image, build_id) {
        Ok(Some(b)) if b.state == BuildState::Ready => Ok((b, guard)),
        Ok(Some(b)) => Err(skipped(format!("the build is {} now", b.state))),
        Ok(None) => {
            // Taking the lock re-created the parents of its directory: if the build was
            // deleted just before, that is an empty build znode; remove it (our lock, which
            // lives inside it, goes first).
            let build_path = paths::image_build_path(image, build_id);
            if let Ok(Some((data, _))) = zk.get_data(&build_path)
                && data.iter().all(u8::is_ascii_whitespace)
            {
                drop(guard);
                if let Err(e) = zk.delete_recursive(&build_path) {
                    warn!("{build_path}: cannot remove what our lock re-created: {e}");
                }
            }
            Err(skipped("the build is gone"))
        }
        Err(e) => Err(skipped(format!("cannot read the build: {e}"))),
    }
}

/// The ids of earlier `failed` attempts for this (build, provider); a `ready` upload ends
/// the job (nothing to do).
fn earlier_attempts(zk: &Zk, job: &UploadJob) -> Step<Vec<String>> {
    let (image, build_id, provider) = (&job.image, &job.build_id, &job.provider.name);
    let ids = tree::upload_ids(zk, image, build_id, provider)
        .map_err(|e| skipped(format!("cannot read uploads: {e}")))?;
    let mut failed_ids = Vec::new();
    for id in ids {
        match tree::read_upload(zk, image, build_id, provider, &id) {
            Ok(Some(u)) if u.state == UploadState::Ready => {
                return Err(skipped(format!("upload {id} is already ready")));
            }
            Ok(Some(u)) if u.state == UploadState::Failed => failed_ids.push(id),
            Ok(_) => {}
            Err(e) => return Err(skipped(format!("cannot read uploads: {e}"))),
        }
    }
    Ok(failed_ids)
}

/// Deletes the records of failed attempts, so retries do not pile up records.
fn clear_failed_attempts(zk: &Zk, job: &UploadJob, failed_ids: Vec<String>) {
    let (image, build_id, provider) = (&job.image, &job.build_id, &job.provider.name);
    for id in failed_ids {
        let path = paths::image_upload_path(image, build_id, provider, &id);
        match zk.delete_recursive(&path) {
            Ok(()) => debug!(
                "image={image} build={build_id} provider={provider} upload={id}: removed the record of a failed attempt"
            ),
            Err(e) => warn!(
                "image={image} build={build_id} provider={provider} upload={id}: cannot remove a failed record: {e}"
            ),
        }
    }
}

/// The `uploading` record, before the cloud is touched; returns its path.
fn record_uploading(zk: &Zk, job: &UploadJob, build: &ImageBuild) -> Step<String> {
    let uploading = ImageUpload::uploading(
        build.username.as_deref(),
        build.python_path.as_deref(),
        build.shell_type.as_deref(),
        model::now_epoch(),
    );
    // Not with parents: the lock made them, and if the janitor has deleted the build since,
    // re-creating them would put this upload under a build znode without data, where no
    // reader sees it (and its image would look leaked).
    let prefix = format!(
        "{}/",
        paths::image_uploads_path(&job.image, &job.build_id, &job.provider.name)
    );
    match zk.create(&prefix, &uploading.to_json(), Mode::PersistentSequential) {
        Ok(p) => Ok(p),
        Err(ZkError::NoNode) => Err(skipped("the build was deleted while we locked it")),
        Err(e) => Err(UploadResult::Failed {
            upload_id: None,
            reason: format!("cannot create the uploading record: {e}"),
        }),
    }
}

/// What the driver is asked to upload.
fn request(job: &UploadJob, upload_id: &str, external_name: &str) -> UploadRequest {
    UploadRequest {
        image_name: job.image.clone(),
        build_id: job.build_id.clone(),
        upload_id: upload_id.to_string(),
        external_name: external_name.to_string(),
        file: job.file.clone(),
        format: job.format.clone(),
        md5: local::read_checksum(&job.file, Checksum::Md5),
        sha256: local::read_checksum(&job.file, Checksum::Sha256),
        properties: properties(job, upload_id),
        timeout: Duration::from_secs(job.provider.image_upload_timeout),
        progress: Default::default(),
    }
}

/// Writes the result under the lock, after waiting for a suspended session's fate. A failure
/// is recorded as well as may be; a `ready` record whose write failed is settled, and a
/// cloud image without a record is deleted. `count_ready` counts a recorded `ready` upload
/// in statsd.
fn finalize(
    zk: &Zk,
    job: &UploadJob,
    upload_path: &str,
    record: &ImageUpload,
    outcome: UploadResult,
    guard: &lock::LockGuard,
    count_ready: impl Fn(),
) -> UploadResult {
    let (image, build_id, provider) = (&job.image, &job.build_id, &job.provider.name);
    let upload_id = upload_path.rsplit('/').next().unwrap_or_default();
    let data = record.to_json();
    // As for builds: a suspended session may resume with the upload lock still ours, so the
    // result waits for the session's fate instead of timing out into a fence.
    if zk.state() == ConnState::Suspended {
        info!(
            "image={image} build={build_id} provider={provider}: waiting for ZooKeeper to record the upload"
        );
        zk.wait_while_suspended(zk.suspension_limit() + zk.session_timeout());
    }
    let timeout = zk.config().session_timeout;
    let write = fence::write_result(zk, upload_path, &data, Some(guard), None, timeout);
    // A failure is recorded as well as may be; only a `ready` result has more to settle.
    let UploadResult::Ready { external_id, .. } = &outcome else {
        if let Err(e) = write {
            warn!(
                "image={image} build={build_id} provider={provider} upload={upload_id}: cannot record the failure: {e}"
            );
        }
        return outcome;
    };
    match write {
        Ok(()) => {
            count_ready();
            info!(
                "Image build {image}-{build_id} (external_id {external_id}) in {provider} is ready"
            );
            outcome
        }
        Err(e) => {
            let failed = ImageUpload::bare_failed(model::now_epoch()).to_json();
            // A stop does not wait for uploads (UPLOAD_GRACE); closing the session ends this.
            match fence::settle(zk, upload_path, &data, &failed, &|| false) {
                fence::Settled::Recorded => {
                    count_ready();
                    info!(
                        "Image build {image}-{build_id} (external_id {external_id}) in {provider} is ready (its record was written although the reply was lost: {e})"
                    );
                    return outcome;
                }
                fence::Settled::Unknown => {
                    error!(
                        "image={image} build={build_id} provider={provider} upload={upload_id}: cannot learn whether the ready upload was recorded ({e}); keeping cloud image {external_id} (leak detection deletes it if no record names it)"
                    );
                    return UploadResult::Failed {
                        upload_id: Some(upload_id.to_string()),
                        reason: format!("the upload's record is unknown: {e}"),
                    };
                }
                fence::Settled::NotRecorded => {}
            }
            error!(
                "image={image} build={build_id} provider={provider} upload={upload_id}: cannot record the ready upload ({e}); deleting cloud image {external_id}"
            );
            if let Err(e) = job.driver.delete(external_id) {
                error!(
                    "image={image} provider={provider}: cannot delete cloud image {external_id}: {e}"
                );
            }
            UploadResult::Failed {
                upload_id: Some(upload_id.to_string()),
                reason: format!("cannot record the upload: {e}"),
            }
        }
    }
}

/// What pushing the image to the cloud came to.
#[derive(Debug)]
enum Pushed {
    /// The image is in the cloud and the post-upload hook (if any) succeeded.
    Image { external_id: String },
    /// The driver's upload failed; the driver deletes any cloud image it made.
    UploadFailed(ProviderError),
    /// The post-upload hook failed; the cloud image was deleted (or its deletion failure
    /// logged), so nothing leaks (upstream quirk Q2).
    HookFailed(String),
}

impl Pushed {
    /// Why the push failed; `None` when it did not.
    fn failure(&self) -> Option<String> {
        match self {
            Pushed::Image { .. } => None,
            Pushed::UploadFailed(e) => Some(e.to_string()),
            Pushed::HookFailed(reason) => Some(reason.clone()),
        }
    }
}

/// Uploads through the driver, then runs the post-upload hook; a hook failure deletes the
/// image again.
fn push(job: &UploadJob, req: &UploadRequest) -> Pushed {
    let up = match job.driver.upload(req) {
        Ok(up) => up,
        Err(e) => return Pushed::UploadFailed(e),
    };
    match run_hook(job, &up.external_id) {
        Ok(()) => Pushed::Image {
            external_id: up.external_id,
        },
        Err(reason) => {
            if let Err(e) = job.driver.delete(&up.external_id) {
                error!(
                    "image={} build={} provider={}: cannot delete cloud image {} after the hook failed: {e}",
                    job.image, job.build_id, job.provider.name, up.external_id
                );
            }
            Pushed::HookFailed(reason)
        }
    }
}

/// Expands `image-name-format` like Python's `str.format` with `{image_name}`, `{upload_id}`
/// and `{timestamp}`; `{{` and `}}` are literal braces (the config loader rejects anything else).
pub fn expand_name(format: &str, image: &str, upload_id: &str, timestamp: u64) -> String {
    let mut out = String::new();
    let mut rest = format;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        match tail.find('}') {
            Some(end) if tail.starts_with('{') => {
                match &tail[1..end] {
                    "image_name" => out.push_str(image),
                    "upload_id" => out.push_str(upload_id),
                    "timestamp" => out.push_str(&timestamp.to_string()),
                    other => out.push_str(&format!("{{{other}}}")),
                }
                rest = &tail[end + 1..];
            }
            _ => {
                out.push_str(&tail[..1]);
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Image properties: diskimage `metadata`, provider `meta`, and nodepool's tags.
fn properties(job: &UploadJob, upload_id: &str) -> BTreeMap<String, String> {
    let mut p = job.diskimage.metadata.clone();
    if let Some(pd) = job.provider.diskimages.iter().find(|d| d.name == job.image) {
        p.extend(pd.meta.clone());
    }
    p.insert("nodepool_build_id".into(), job.build_id.clone());
    p.insert("nodepool_upload_id".into(), upload_id.to_string());
    p.insert("nodepool_provider_name".into(), job.provider.name.clone());
    p
}

/// Runs the provider's post-upload hook (`<hook> <provider> <external-id> <file>`), logging
/// its output; a non-zero exit is an error with that output.
fn run_hook(job: &UploadJob, external_id: &str) -> Result<(), String> {
    let Some(hook) = &job.provider.post_upload_hook else {
        return Ok(());
    };
    let log = std::env::temp_dir().join(format!(
        "nodepool-builder-hook-{}-{}.log",
        std::process::id(),
        model::new_build_id()
    ));
    let mut spec = command::Spec::new(
        hook.display().to_string(),
        vec![
            job.provider.name.clone(),
            external_id.to_string(),
            job.file.display().to_string(),
        ],
    );
    spec.output = command::Output::Log(log.clone());
    spec.timeout = Some(Duration::from_secs(job.provider.image_upload_timeout));
    spec.grace = Duration::from_secs(5);
    let outcome = command::spawn(spec)
        .map_err(|e| e.to_string())
        .and_then(|r| {
            r.wait(&crossbeam_channel::never())
                .map_err(|e| e.to_string())
        });
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    match outcome {
        Ok(command::Outcome::Exited(0)) => {
            info!(
                "Post-upload hook {} for {} in {}: {}",
                hook.display(),
                external_id,
                job.provider.name,
                output.trim()
            );
            Ok(())
        }
        Ok(other) => Err(format!(
            "post-upload hook {} failed ({other:?}): {}",
            hook.display(),
            output.trim()
        )),
        Err(e) => Err(format!(
            "post-upload hook {} could not run: {e}",
            hook.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::expand_name;

    #[test]
    fn image_names_expand_like_python_format() {
        assert_eq!(
            expand_name(
                "{image_name}-{timestamp}",
                "fedora",
                "0000000001",
                1795536820
            ),
            "fedora-1795536820"
        );
        assert_eq!(
            expand_name("np{upload_id}", "fedora", "0000000007", 1),
            "np0000000007"
        );
        assert_eq!(
            expand_name("{{literal}}-{image_name}", "x", "1", 1),
            "{literal}-x"
        );
    }
}
