//! The janitor (`cleanup` thread): keeps ZooKeeper, the local images-dir and every cloud
//! exactly as tidy as the config says (wire spec §3.7–§3.10), whatever fails.
//!
//! # One pass
//!
//! A. The upload recency table: per (image, provider) the two newest `ready` uploads across
//!    the image's `ready` builds are protected.
//! B. Per image under `/nodepool/images` (one bad image never stops the others):
//!    * keep the two newest `ready` builds (none if the diskimage left the config);
//!
//!    What A and B keep is decided by the pure `scheduler::core::retention` (unit-tested
//!    there, recency bridge included); this module does the deleting.
//!    * uploads to a provider that no longer lists the image are deleted; on kept builds,
//!      orphaned `uploading` records (free upload lock) are removed and `failed`/`deleting`
//!      uploads are deleted;
//!    * builds to delete: `deleting`, `failed`, `ready` beyond the newest two, and orphaned
//!      `building` records (free image build lock). Their unprotected uploads are deleted;
//!      once every remaining upload is `deleting`, the build is marked `deleting` (so its
//!      local files go early, while slow cloud deletes go on), and once none remain its znode
//!      is deleted.
//!    * Deleting an upload: set it `deleting` (under its upload-number lock, keeping
//!      `external_id`), delete the cloud image by id, then delete the record. A failed cloud
//!      delete is retried with back-off, per image id.
//!
//! Leaked cloud images (our addition for every driver that can list its images): an image
//! tagged with our provider name whose upload has no znode, seen in two consecutive passes,
//! is deleted. Existence decides, never parsing: an upload znode, or a build znode whose
//! data we cannot read, keeps every cloud image it may point at (warned about once).
//!
//! C. Local files: each builder deletes only its own files, for builds whose record is
//!    `deleting` or gone (also after being offline), and prunes uploaded formats of `ready`
//!    builds with `delete-after-upload`, never touching builds in progress. Which builds and
//!    formats go is decided here; `local` finds and deletes their files.
//!
//! Each pass ends with one DEBUG line, `cleanup pass: … deleted; took N ms (whole tree read
//! from ZooKeeper)` or `(from the watched snapshot)`; the benchmark's scale scenario reads
//! the time of the full pass that follows a new session from it.
//!
//! # Deliberate differences from nodepool 11 (quirks of wire spec §3.11)
//!
//! * Q2 (hook failure leaks the cloud image): fixed in the upload worker.
//! * Q5 (log pruning by prefix): fixed in the build worker.
//! * Q6 (empty build znodes break cleanup): empty build and upload znodes — left behind when
//!   a lock acquisition races a delete — are skipped by readers and removed here.
//! * Q7 (a lone `.d` directory is never removed): removed with its build.
//! * Taking a record's lock on a record another builder just deleted would re-create it as
//!   an empty znode (kazoo creates lock parents); after taking such a lock we re-check the
//!   record and delete what our lock created.
//! * Failed cloud deletes back off (upstream retries every pass).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, error, info, warn};

use crate::config::Config;
use crate::local;
use crate::model::{self, BuildState, UploadState, backoff};
use crate::provider::ProviderDriver;
use crate::registry;
use crate::scheduler::core::{Keep, retention};
use crate::thread::{self, JoinHandle, ThreadKind};
use crate::zk::lock::{self, LockGuard};
use crate::zk::schema::{ImageBuild, ImageUpload};
use crate::zk::tree::{self, BuildInfo, UploadInfo};
use crate::zk::{Zk, ZkError, paths};

/// What a pass needs; the scheduler sends a fresh one per pass (config reloads included).
#[derive(Clone)]
pub struct CleanupRequest {
    pub cfg: Arc<Config>,
    pub drivers: BTreeMap<String, Arc<dyn ProviderDriver>>,
    /// Image format of every configured provider.
    pub provider_formats: BTreeMap<String, String>,
    /// The image tree as the `zk-watch` thread keeps it current; `None` makes the pass read
    /// the whole tree itself (at start-up and after a reconnect). With a snapshot, an idle
    /// pass costs no ZooKeeper request at all: only what it decides to change is re-read.
    pub snapshot: Option<BTreeMap<String, ImageSnapshot>>,
    /// (image, build id) of builds this process gave up on without recording a result (its
    /// session was gone for longer than the retries): still `building` in ZooKeeper, built by
    /// nobody. The pass records them `failed` (what the build would have written), without
    /// waiting for the image build lock, so they are deleted like any failed build.
    pub abandoned: BTreeSet<(String, String)>,
}

/// One image as watched: readable builds (with uploads) and unreadable build znode ids.
#[derive(Debug, Clone, Default)]
pub struct ImageSnapshot {
    pub builds: Vec<BuildInfo>,
    pub unreadable: Vec<String>,
}

/// What a pass did.
#[derive(Debug, Clone, Default)]
pub struct CleanupReport {
    pub deleted_builds: usize,
    pub deleted_uploads: usize,
    pub deleted_files: usize,
    pub errors: usize,
    /// Something failed and should be retried at this instant (cloud delete back-off).
    pub retry_at: Option<Instant>,
    pub took: Duration,
    /// Entries of [`CleanupRequest::abandoned`] dealt with (recorded `failed`, or no longer
    /// `building`, or gone).
    pub abandoned_resolved: Vec<(String, String)>,
}

/// Handle of the `cleanup` thread.
pub struct Janitor {
    // CAUTION: declared first so the thread sees the channel close before the join.
    tx: Option<Sender<CleanupRequest>>,
    handle: Option<JoinHandle<()>>,
}

impl Janitor {
    /// Starts the thread; reports go to `reports`.
    pub fn start(zk: &Zk, reports: Sender<CleanupReport>) -> Janitor {
        let (tx, rx) = crossbeam_channel::bounded::<CleanupRequest>(1);
        let zk = zk.clone();
        let handle = thread::spawn(ThreadKind::Cleanup, "cleanup", move || run(zk, rx, reports));
        Janitor {
            tx: Some(tx),
            handle: Some(handle),
        }
    }

    /// Asks for a pass; false when one is already queued (passes coalesce).
    pub fn request(&self, req: CleanupRequest) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.try_send(req).is_ok())
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(zk: Zk, rx: Receiver<CleanupRequest>, reports: Sender<CleanupReport>) {
    registry::set_activity("idle");
    let mut state = JanitorState::default();
    for req in rx.iter() {
        registry::set_activity("cleanup pass");
        let report =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pass(&zk, &req, &mut state)))
                .unwrap_or_else(|_| {
                    error!("the cleanup pass panicked");
                    CleanupReport {
                        errors: 1,
                        ..Default::default()
                    }
                });
        registry::set_activity("idle");
        // A pass allocates and frees a copy of the tree: give the memory back to the kernel.
        // SAFETY: malloc_trim only walks glibc's own heap under its own locks.
        unsafe {
            libc::malloc_trim(0);
        }
        if reports.send(report).is_err() {
            break;
        }
    }
}

/// Memory across passes: back-off of failing cloud deletes.
#[derive(Default)]
pub struct JanitorState {
    delete_failures: HashMap<(String, String), (u32, Instant)>,
    /// Cloud images tagged by us but unknown to ZooKeeper in the last pass, per provider.
    leak_candidates: BTreeSet<(String, String)>,
    /// Cloud images kept only because a record we cannot read may point at them (warned
    /// about once, when they first are).
    kept_for_unreadable: BTreeSet<(String, String)>,
}

/// A record's lock, held, and the record as read under it.
struct Locked {
    _guard: LockGuard,
    data: Vec<u8>,
    /// The version read, for a write only over exactly that record.
    version: i32,
}

/// Why ZooKeeper may still point at a cloud image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pointer {
    /// Its upload record exists and reads fine.
    Record,
    /// Its upload znode exists, but its data is no upload record we can read.
    UnreadableUpload,
    /// Its build znode exists, but its data is no build record we can read (an unknown
    /// state, a wrong type, nothing at all): whatever uploads that build has are kept.
    UnreadableBuild,
}

impl std::fmt::Display for Pointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pointer::Record => "its upload record exists",
            Pointer::UnreadableUpload => {
                "its upload record exists but cannot be read; it is kept until the record is fixed or removed"
            }
            Pointer::UnreadableBuild => {
                "its build record exists but cannot be read; it is kept until the record is fixed or removed"
            }
        })
    }
}

/// The records that may point at cloud images, keyed on which znodes exist: every upload
/// znode whatever its data, and every build znode whose data we cannot read. Leak detection
/// asks it before calling a cloud image leaked, so a record written by a newer nodepool, or
/// damaged by hand, never gets its cloud image deleted (it costs what one full tree read
/// costs, and is read only when the cloud shows images the watched tree does not know).
struct RecordIndex {
    /// (provider, build id, upload id) of every upload znode, and whether its data reads.
    uploads: BTreeMap<(String, String, String), bool>,
    /// Build ids whose znode exists with data that is no build record we can read.
    unreadable_builds: BTreeSet<String>,
}

impl RecordIndex {
    fn read(zk: &Zk) -> Result<RecordIndex, ZkError> {
        let mut index = RecordIndex {
            uploads: BTreeMap::new(),
            unreadable_builds: BTreeSet::new(),
        };
        for image in tree::image_names(zk)? {
            for build in tree::build_ids(zk, &image)? {
                let Some((data, _)) = zk.get_data(&paths::image_build_path(&image, &build))? else {
                    continue; // Deleted since it was listed: points at nothing any more.
                };
                if tree::parse_build(&image, &build, &data).is_none() {
                    index.unreadable_builds.insert(build.clone());
                }
                for provider in tree::build_providers(zk, &image, &build)? {
                    for upload in tree::upload_ids(zk, &image, &build, &provider)? {
                        let path = paths::image_upload_path(&image, &build, &provider, &upload);
                        let Some((data, _)) = zk.get_data(&path)? else {
                            continue;
                        };
                        let readable =
                            tree::parse_upload(&image, &build, &provider, &upload, &data).is_some();
                        index
                            .uploads
                            .insert((provider.clone(), build.clone(), upload), readable);
                    }
                }
            }
        }
        Ok(index)
    }

    /// What may point at the cloud image of (provider, build, upload); `None`: nothing.
    fn points_at(&self, provider: &str, build: &str, upload: &str) -> Option<Pointer> {
        let key = (provider.to_string(), build.to_string(), upload.to_string());
        match self.uploads.get(&key) {
            Some(true) => Some(Pointer::Record),
            Some(false) => Some(Pointer::UnreadableUpload),
            None if self.unreadable_builds.contains(build) => Some(Pointer::UnreadableBuild),
            None => None,
        }
    }
}

struct Pass<'a> {
    zk: &'a Zk,
    req: &'a CleanupRequest,
    state: &'a mut JanitorState,
    report: CleanupReport,
}

/// One full janitor pass (see the module docs).
pub fn pass(zk: &Zk, req: &CleanupRequest, state: &mut JanitorState) -> CleanupReport {
    let started = Instant::now();
    let mut p = Pass {
        zk,
        req,
        state,
        report: CleanupReport::default(),
    };
    p.fail_abandoned_builds();
    let tree = match &req.snapshot {
        Some(snapshot) => Some(snapshot.clone()),
        None => read_tree(zk, &mut p),
    };
    if let Some(tree) = &tree {
        let all: BTreeMap<String, Vec<BuildInfo>> = tree
            .iter()
            .map(|(k, v)| (k.clone(), v.builds.clone()))
            .collect();
        for (image, snap) in tree {
            if let Err(e) = p.cleanup_image(image, &snap.builds) {
                p.error(&format!("Exception cleaning up image {image}: {e}"));
            }
            if let Err(e) = p.remove_empty_build_znodes(image, &snap.unreadable) {
                p.error(&format!("Exception cleaning up image {image}: {e}"));
            }
        }
        p.cleanup_leaked_cloud_images(&all);
    }
    p.cleanup_local_files(tree.as_ref());
    p.report.took = started.elapsed();
    debug!(
        "cleanup pass: {} builds, {} uploads, {} files deleted, {} errors; took {} ms ({})",
        p.report.deleted_builds,
        p.report.deleted_uploads,
        p.report.deleted_files,
        p.report.errors,
        p.report.took.as_millis(),
        match &req.snapshot {
            Some(_) => "from the watched snapshot",
            None => "whole tree read from ZooKeeper",
        }
    );
    p.report
}

/// (provider, build id, upload id) of every upload record in `builds`.
fn known_uploads<'b>(
    builds: impl Iterator<Item = &'b Vec<BuildInfo>>,
) -> BTreeSet<(String, String, String)> {
    let mut known = BTreeSet::new();
    for b in builds.flatten() {
        for u in &b.uploads {
            known.insert((u.provider.clone(), b.id.clone(), u.id.clone()));
        }
    }
    known
}

/// Reads the whole image tree; `None` (with the error counted) unless every image was read,
/// because a missing image would look deleted (its local files) or leaked (its cloud images).
fn read_tree(zk: &Zk, p: &mut Pass<'_>) -> Option<BTreeMap<String, ImageSnapshot>> {
    let images = match tree::image_names(zk) {
        Ok(i) => i,
        Err(e) => {
            p.error(&format!("cannot list images: {e}"));
            return None;
        }
    };
    let mut out = BTreeMap::new();
    for image in images {
        let ids = match tree::build_ids(zk, &image) {
            Ok(ids) => ids,
            Err(e) => {
                p.error(&format!("Exception cleaning up image {image}: {e}"));
                return None;
            }
        };
        match tree::read_image(zk, &image) {
            Ok(builds) => {
                let unreadable = ids
                    .into_iter()
                    .filter(|id| !builds.iter().any(|b| b.id == *id))
                    .collect();
                out.insert(image, ImageSnapshot { builds, unreadable });
            }
            Err(e) => {
                p.error(&format!("Exception cleaning up image {image}: {e}"));
                return None;
            }
        }
    }
    Some(out)
}

impl Pass<'_> {
    fn error(&mut self, msg: &str) {
        self.report.errors += 1;
        error!("{msg}");
    }

    fn retry_at(&mut self, t: Instant) {
        self.report.retry_at = Some(self.report.retry_at.map_or(t, |r| r.min(t)));
    }

    /// Records every still-`building` build of [`CleanupRequest::abandoned`] as `failed`
    /// (only if unchanged since read), whoever holds the image build lock now: only this
    /// process could have been building it. Failures are retried on the next pass.
    fn fail_abandoned_builds(&mut self) {
        for (image, id) in &self.req.abandoned {
            let path = paths::image_build_path(image, id);
            let done = match self.zk.get_data(&path) {
                Ok(None) => true,
                Ok(Some((data, stat))) => match tree::parse_build(image, id, &data) {
                    Some(mut b) if b.state == BuildState::Building => {
                        b.state = BuildState::Failed;
                        b.state_time = crate::model::now_epoch();
                        match self.zk.set_data(&path, &b.to_json(), Some(stat.version)) {
                            Ok(_) => {
                                info!(
                                    "image={image} build={id}: recorded the build abandoned while ZooKeeper was gone as failed"
                                );
                                true
                            }
                            Err(ZkError::NoNode) => true,
                            Err(e) => {
                                self.error(&format!(
                                    "image={image} build={id}: cannot record the abandoned build as failed: {e}"
                                ));
                                false
                            }
                        }
                    }
                    _ => true,
                },
                Err(e) => {
                    self.error(&format!("image={image} build={id}: {e}"));
                    false
                }
            };
            if done {
                self.report
                    .abandoned_resolved
                    .push((image.clone(), id.clone()));
            }
        }
    }

    fn cleanup_image(&mut self, image: &str, builds: &[BuildInfo]) -> Result<(), ZkError> {
        let cfg = self.req.cfg.clone();
        let Keep {
            builds: keep,
            protected_uploads: recent,
        } = retention(cfg.diskimage(image).is_some(), builds);
        for b in builds {
            for p in &cfg.providers {
                let lists = p.diskimages.iter().any(|d| d.name == image);
                let res = if !lists {
                    // Obsolete uploads: the provider no longer lists the image.
                    self.delete_uploads(image, b, &p.name, |_| true)
                } else if keep.contains(&b.id) {
                    self.cleanup_kept_uploads(image, b, &p.name)
                } else {
                    Ok(())
                };
                if let Err(e) = res {
                    self.error(&format!(
                        "image={image} build={} provider={}: {e}",
                        b.id, p.name
                    ));
                }
            }
            if !self.build_is_obsolete(image, b, &keep)? {
                continue;
            }
            for p in &cfg.providers {
                let res = self.delete_uploads(image, b, &p.name, |u| {
                    !recent.contains(&(b.id.clone(), p.name.clone(), u.to_string()))
                });
                if let Err(e) = res {
                    self.error(&format!(
                        "image={image} build={} provider={}: {e}",
                        b.id, p.name
                    ));
                }
            }
            self.finish_build(image, b)?;
        }
        Ok(())
    }

    /// Whether a build is to be deleted (step B.4).
    fn build_is_obsolete(
        &mut self,
        image: &str,
        b: &BuildInfo,
        keep: &BTreeSet<String>,
    ) -> Result<bool, ZkError> {
        match b.build.state {
            BuildState::Deleting => Ok(true),
            _ if keep.contains(&b.id) => Ok(false),
            BuildState::Building => {
                // In progress if anyone holds the image build lock; otherwise an orphan of a
                // crashed builder (its lock vanished with its session).
                if lock::is_locked(self.zk, &paths::image_build_lock_path(image))? {
                    return Ok(false);
                }
                match tree::read_build(self.zk, image, &b.id)? {
                    Some(now) if now.state == BuildState::Building => {
                        info!(
                            "image={image} build={}: removing orphaned building record",
                            b.id
                        );
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }
            BuildState::Failed | BuildState::Ready => Ok(true),
        }
    }

    /// On kept builds: orphaned `uploading` records go directly; `failed` and `deleting`
    /// uploads are deleted (step B.3).
    fn cleanup_kept_uploads(
        &mut self,
        image: &str,
        b: &BuildInfo,
        provider: &str,
    ) -> Result<(), ZkError> {
        for u in b.uploads_to(provider) {
            match u.upload.state {
                UploadState::Uploading => {
                    if lock::is_locked(
                        self.zk,
                        &paths::image_upload_lock_path(image, &b.id, provider),
                    )? {
                        continue;
                    }
                    let path = paths::image_upload_path(image, &b.id, provider, &u.id);
                    // Re-read: if unchanged, nobody is working on it.
                    if tree::read_upload(self.zk, image, &b.id, provider, &u.id)?.as_ref()
                        == Some(&u.upload)
                    {
                        info!(
                            "Removing failed upload record: image={image} build={} provider={provider} upload={}",
                            b.id, u.id
                        );
                        self.zk.delete_recursive(&path)?;
                        self.report.deleted_uploads += 1;
                    }
                }
                UploadState::Failed | UploadState::Deleting => {
                    self.delete_upload(image, &b.id, provider, &u.id, &u.upload)?
                }
                UploadState::Ready => {}
            }
        }
        Ok(())
    }

    fn delete_uploads(
        &mut self,
        image: &str,
        b: &BuildInfo,
        provider: &str,
        pick: impl Fn(&str) -> bool,
    ) -> Result<(), ZkError> {
        for u in b.uploads_to(provider) {
            if pick(&u.id) {
                self.delete_upload(image, &b.id, provider, &u.id, &u.upload)?;
            }
        }
        Ok(())
    }

    /// The upload-delete procedure: mark `deleting` (keeping `external_id`), delete the cloud
    /// image, delete the record.
    fn delete_upload(
        &mut self,
        image: &str,
        build: &str,
        provider: &str,
        id: &str,
        upload: &ImageUpload,
    ) -> Result<(), ZkError> {
        let path = paths::image_upload_path(image, build, provider, id);
        let lock_path = paths::image_upload_number_lock_path(image, build, provider, id);
        let mut upload = upload.clone();
        if upload.state != UploadState::Deleting {
            if upload.state == UploadState::Uploading
                && lock::is_locked(
                    self.zk,
                    &paths::image_upload_lock_path(image, build, provider),
                )?
            {
                return Ok(()); // In progress.
            }
            let Some(locked) = self.lock_record(&path, &lock_path)? else {
                return Ok(());
            };
            // The decision was made from the pass's snapshot; write only over the record it
            // saw. One that changed since (an upload that finished: `ready` with its
            // `external_id`) is decided again by the next pass, from what it says then.
            match ImageUpload::from_json(&locked.data) {
                Ok(now) if now == upload => {}
                Ok(now) => {
                    debug!(
                        "image={image} build={build} provider={provider} upload={id}: {} since this pass read it ({}); deciding again next pass",
                        now.state, upload.state
                    );
                    self.cleanup_soon();
                    return Ok(());
                }
                Err(e) => {
                    debug!(
                        "image={image} build={build} provider={provider} upload={id}: not deleting an unreadable record: {e}"
                    );
                    return Ok(());
                }
            }
            upload.state = UploadState::Deleting;
            upload.state_time = model::now_epoch();
            match self
                .zk
                .set_data(&path, &upload.to_json(), Some(locked.version))
            {
                Ok(_) => {}
                Err(ZkError::BadVersion | ZkError::NoNode) => {
                    self.cleanup_soon();
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(external_id) = upload.external_id.clone() {
            let key = (provider.to_string(), external_id.clone());
            if let Some((_, next)) = self.state.delete_failures.get(&key)
                && *next > Instant::now()
            {
                let next = *next;
                self.retry_at(next);
                return Ok(());
            }
            let Some(driver) = self.req.drivers.get(provider).cloned() else {
                warn!(
                    "image={image} build={build} provider={provider} upload={id}: no driver to delete cloud image {external_id}"
                );
                return Ok(());
            };
            info!(
                "Deleting image build {image}-{build} from {provider} (external_id {external_id})"
            );
            if let Err(e) = driver.delete(&external_id) {
                let entry = self
                    .state
                    .delete_failures
                    .entry(key)
                    .or_insert((0, Instant::now()));
                entry.0 += 1;
                let delay = backoff(
                    self.req.cfg.retry_backoff_initial,
                    self.req.cfg.retry_backoff_max,
                    entry.0,
                );
                entry.1 = Instant::now() + delay;
                let (n, next) = *entry;
                self.retry_at(next);
                self.error(&format!(
                    "Unable to delete image {external_id} of {image}-{build} from {provider}: {e}; retrying in {:.0}s (failure {n})",
                    delay.as_secs_f64()
                ));
                return Ok(());
            }
            self.state.delete_failures.remove(&key);
        }
        let Some(_guard) = self.lock_record(&path, &lock_path)? else {
            return Ok(());
        };
        self.zk.delete_recursive(&path)?;
        self.report.deleted_uploads += 1;
        Ok(())
    }

    /// Asks for another pass soon: something changed under this one.
    fn cleanup_soon(&mut self) {
        self.retry_at(Instant::now() + Duration::from_millis(500));
    }

    /// Takes a record's lock without waiting. Taking a lock creates its parents, so if the
    /// record vanished meanwhile (another builder deleted it), our lock re-created it as an
    /// empty znode: delete that and report `None`.
    fn lock_record(&mut self, record: &str, lock_path: &str) -> Result<Option<Locked>, ZkError> {
        if self.zk.exists(record)?.is_none() {
            return Ok(None);
        }
        let guard = match lock::try_lock(self.zk, lock_path) {
            Ok(Some(g)) => g,
            Ok(None) => return Ok(None),
            Err(lock::LockError::Zk(e)) => return Err(e),
            Err(e) => return Err(ZkError::Other(e.to_string())),
        };
        match self.zk.get_data(record)? {
            Some((data, stat)) if !data.iter().all(u8::is_ascii_whitespace) => Ok(Some(Locked {
                _guard: guard,
                data,
                version: stat.version,
            })),
            _ => {
                debug!("{record} vanished while we locked it; removing what the lock re-created");
                self.zk.delete_recursive(record)?;
                Ok(None)
            }
        }
    }

    /// Steps B.6 and B.7: mark the build `deleting` once all its uploads are `deleting`;
    /// delete its znode once none remain.
    fn finish_build(&mut self, image: &str, b: &BuildInfo) -> Result<(), ZkError> {
        let uploads = tree::read_uploads(self.zk, image, &b.id)?;
        let path = paths::image_build_path(image, &b.id);
        if uploads
            .iter()
            .all(|u| u.upload.state == UploadState::Deleting)
        {
            let current = tree::read_build(self.zk, image, &b.id)?;
            if current.is_some_and(|c| c.state != BuildState::Deleting) {
                let lock_path = paths::image_build_number_lock_path(image, &b.id);
                let Some(locked) = self.lock_record(&path, &lock_path)? else {
                    return Ok(()); // Someone else works on it; next pass.
                };
                // Written over exactly what was read under the lock.
                let Some(mut current) = tree::parse_build(image, &b.id, &locked.data) else {
                    return Ok(());
                };
                if current.state != BuildState::Deleting {
                    current.state = BuildState::Deleting;
                    current.state_time = model::now_epoch();
                    match self
                        .zk
                        .set_data(&path, &current.to_json(), Some(locked.version))
                    {
                        Ok(_) => {}
                        Err(ZkError::BadVersion | ZkError::NoNode) => return Ok(()),
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        // Any upload znode left (even an unreadable one) keeps the build znode.
        let mut remaining = 0;
        for provider in tree::build_providers(self.zk, image, &b.id)? {
            remaining += tree::upload_ids(self.zk, image, &b.id, &provider)?.len();
        }
        if remaining > 0 {
            debug!(
                "Unable to delete build {image}-{} because uploads still remain",
                b.id
            );
            return Ok(());
        }
        info!("Deleting build {image}-{}", b.id);
        self.zk.delete_recursive(&path)?;
        self.report.deleted_builds += 1;
        Ok(())
    }

    /// Q6 fix: build znodes without data (and without uploads) are lock-race leftovers.
    fn remove_empty_build_znodes(
        &mut self,
        image: &str,
        candidates: &[String],
    ) -> Result<(), ZkError> {
        for id in candidates {
            let path = paths::image_build_path(image, id);
            let Some((data, _)) = self.zk.get_data(&path)? else {
                continue;
            };
            if !data.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let children = self.zk.get_children(&path)?.unwrap_or_default();
            if children.iter().all(|c| c == "lock")
                && !lock::is_locked(self.zk, &format!("{path}/lock"))?
            {
                warn!("image={image}: removing empty build znode {id} (left by a lock race)");
                self.zk.delete_recursive(&path)?;
            }
        }
        Ok(())
    }

    /// Cloud images tagged `nodepool_provider_name=<provider>` whose build and upload ids have
    /// no record in ZooKeeper (any state) — left by a builder killed mid-upload — are deleted
    /// when seen in two consecutive passes. The tree this pass started from may predate an
    /// upload that began since, so an image it does not know is checked against the records
    /// read again after the listing: the `uploading` record is written before the cloud is
    /// touched, so an upload in progress is never mistaken for a leak. That second look goes
    /// by which znodes exist, not by what we can parse ([`RecordIndex`]): a record we cannot
    /// read is never a reason to delete what it may point at. A command provider without a
    /// `list-command` reports none; a listing that fails deletes nothing.
    fn cleanup_leaked_cloud_images(&mut self, all: &BTreeMap<String, Vec<BuildInfo>>) {
        let mut unknown = Vec::new();
        let known = known_uploads(all.values());
        for (provider, driver) in self.req.drivers.clone() {
            let images = match driver.list_images() {
                Ok(i) => i,
                Err(e) => {
                    warn!("provider={provider}: cannot list cloud images for leak detection: {e}");
                    continue;
                }
            };
            for img in images {
                let (Some(build), Some(upload)) = (
                    img.properties.get("nodepool_build_id").cloned(),
                    img.properties.get("nodepool_upload_id").cloned(),
                ) else {
                    continue;
                };
                if img.properties.get("nodepool_provider_name") != Some(&provider)
                    || known.contains(&(provider.clone(), build.clone(), upload.clone()))
                {
                    continue;
                }
                unknown.push((provider.clone(), driver.clone(), img, build, upload));
            }
        }
        if unknown.is_empty() {
            self.state.leak_candidates.clear();
            self.state.kept_for_unreadable.clear();
            return;
        }
        let index = match RecordIndex::read(self.zk) {
            Ok(index) => index,
            Err(e) => {
                // Keep the candidates; decide when ZooKeeper can be read.
                return self.error(&format!(
                    "cannot read the records for leak detection: {e}; deleting nothing"
                ));
            }
        };
        let mut candidates = BTreeSet::new();
        let mut kept_for_unreadable = BTreeSet::new();
        for (provider, driver, img, build, upload) in unknown {
            let key = (provider.clone(), img.id.clone());
            match index.points_at(&provider, &build, &upload) {
                Some(Pointer::Record) => continue,
                Some(why) => {
                    if !self.state.kept_for_unreadable.contains(&key) {
                        warn!(
                            "provider={provider}: keeping cloud image {} ({}) of build {build} upload {upload}: {why}",
                            img.id, img.name
                        );
                    }
                    kept_for_unreadable.insert(key);
                    continue;
                }
                None => {}
            }
            if !self.state.leak_candidates.contains(&key) {
                debug!(
                    "provider={provider}: cloud image {} ({}) has no record; deleting it if still so next pass",
                    img.id, img.name
                );
                candidates.insert(key);
                continue;
            }
            warn!(
                "Deleting leaked image {} ({}) in {provider}: build {build} upload {upload} has no record",
                img.id, img.name
            );
            match driver.delete(&img.id) {
                Ok(()) => {
                    self.report.deleted_uploads += 1;
                    crate::metrics::global().leaked_image_deleted(&provider);
                }
                Err(e) => {
                    candidates.insert(key);
                    self.error(&format!(
                        "cannot delete leaked image {} in {provider}: {e}",
                        img.id
                    ));
                }
            }
        }
        self.state.leak_candidates = candidates;
        self.state.kept_for_unreadable = kept_for_unreadable;
    }

    /// Part C: local files of our own builds. The snapshot answers for builds it knows;
    /// ZooKeeper is asked only about the others (before their files are deleted).
    fn cleanup_local_files(&mut self, tree: Option<&BTreeMap<String, ImageSnapshot>>) {
        let dir = self.req.cfg.images_dir.clone();
        let builds = match local::builds_present(&dir) {
            Ok(b) => b,
            Err(e) => return self.error(&format!("cannot list {}: {e}", dir.display())),
        };
        for (image, id) in builds {
            if let Some(known) = tree
                .and_then(|t| t.get(&image))
                .and_then(|s| s.builds.iter().find(|b| b.id == id))
            {
                match known.build.state {
                    BuildState::Ready => {
                        self.prune_formats(&dir, &image, &id, Some(&known.uploads));
                        continue;
                    }
                    BuildState::Building | BuildState::Failed => continue,
                    BuildState::Deleting => {} // Confirmed below.
                }
            }
            let record = match self.zk.get_data(&paths::image_build_path(&image, &id)) {
                Ok(r) => r,
                Err(e) => {
                    debug!(
                        "image={image} build={id}: not touching local files, zookeeper said {e}"
                    );
                    continue;
                }
            };
            let build = match &record {
                None => None,
                Some((data, _)) if data.iter().all(u8::is_ascii_whitespace) => None,
                Some((data, _)) => match ImageBuild::from_json(data) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        warn!(
                            "image={image} build={id}: unreadable record ({e}); keeping local files"
                        );
                        continue;
                    }
                },
            };
            match build {
                None => {
                    info!("Doing cleanup for {image}:{id} (no build record)");
                    self.report.deleted_files += local::delete_build(&dir, &image, &id);
                }
                Some(b) if b.state == BuildState::Deleting => {
                    info!("Doing cleanup for {image}:{id} (build deleting)");
                    self.report.deleted_files += local::delete_build(&dir, &image, &id);
                }
                Some(b) if b.state == BuildState::Ready => {
                    self.prune_formats(&dir, &image, &id, None)
                }
                Some(_) => {}
            }
        }
    }

    /// `delete-after-upload`: remove formats no provider still needs and `keep-formats` does
    /// not keep (manifest directory kept).
    fn prune_formats(&mut self, dir: &Path, image: &str, id: &str, known: Option<&[UploadInfo]>) {
        let cfg = self.req.cfg.clone();
        let Some(d) = cfg.diskimage(image) else {
            return;
        };
        if !d.delete_after_upload {
            return;
        }
        let uploads = match known {
            Some(u) => u.to_vec(),
            None => match tree::read_uploads(self.zk, image, id) {
                Ok(u) => u,
                Err(e) => {
                    return debug!("image={image} build={id}: not pruning, zookeeper said {e}");
                }
            },
        };
        let mut keep: BTreeSet<String> = d.keep_formats.iter().cloned().collect();
        for p in cfg
            .providers
            .iter()
            .filter(|p| p.diskimages.iter().any(|pd| pd.name == image))
        {
            let uploaded = uploads
                .iter()
                .any(|u| u.provider == p.name && u.upload.state == UploadState::Ready);
            if !uploaded && let Some(f) = self.req.provider_formats.get(&p.name) {
                keep.insert(f.clone());
            }
        }
        self.report.deleted_files += local::prune_formats(dir, image, id, &keep);
    }
}
