//! The invariants every fault-injection scenario must keep, checked through a ZooKeeper
//! session of the checker's own (plaintext, so it works on single servers and ensembles
//! alike) plus the clouds (`dir-cloud` directories or a real Glance) and the builders'
//! images directories.
//!
//! Two kinds of checks:
//!
//! * **Continuous** ([`Checker::sample`], run every ~100 ms by a [`Sampler`] thread while the
//!   scenario injects faults): at most one `building` record per image, and every lock
//!   contender znode is ephemeral. A second `building` record counts only when a second read
//!   finds both records unchanged (same `mzxid`), so a build finishing while its successor
//!   starts between two reads is not mistaken for two at once. Records left by a builder
//!   process the scenario killed ([`Checker::builder_killed`]: same `builder_id`, written
//!   before the kill) are not counted: nobody believes in them any more, and upstream's
//!   cleanup removes such an orphan only once the image build lock is free, so a successor
//!   may legitimately be building beside it (the final check still wants it gone). Samples that hit a ZooKeeper
//!   error (a member just died) are skipped, not counted.
//! * **Final** ([`Checker::wait_final`], once the scenario has stopped injecting): the
//!   continuous ones plus exactly one `ready` upload per (newest ready build, provider);
//!   no cloud image without an upload record carrying its id, and no `ready` upload whose
//!   image is not in its cloud; no local image file without a
//!   build record; no empty znode at build or upload depth; no lock contender at all (the
//!   builders are idle by then, so any contender is one left behind) and exactly as many
//!   builder registrations as running builders; every manual
//!   request served (its `request-build` znode gone and a `ready` build newer than the
//!   request). The system is given time to converge; on time-out every violation is
//!   reported with the ZooKeeper tree, the clouds and the images directories.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nodepool_builder::model::{BuildState, UploadState};
use nodepool_builder::zk::tree::{self, BuildInfo};
use nodepool_builder::zk::{Zk, ZkConfig, ZkError, paths};

use super::glance::GlanceServer;
use super::poll_for;

/// A provider the invariants know about: its cloud and the images it lists.
#[derive(Clone)]
pub struct CloudSpec {
    pub name: String,
    pub cloud: Cloud,
    pub images: Vec<String>,
}

/// Where a provider's images live.
#[derive(Clone)]
pub enum Cloud {
    /// A `dir-cloud` directory.
    Dir(PathBuf),
    /// A real Glance; the provider's images are those tagged with its name.
    Glance(&'static GlanceServer),
}

impl CloudSpec {
    /// The ids of the provider's cloud images, or why they cannot be listed.
    pub fn image_ids(&self) -> std::result::Result<Vec<String>, String> {
        match &self.cloud {
            Cloud::Dir(dir) => Ok(cloud_images(dir)),
            Cloud::Glance(glance) => {
                let listed = std::panic::catch_unwind(|| glance.images_of(&self.name));
                let images =
                    listed.map_err(|_| format!("Glance at {} did not answer", glance.url()))?;
                let mut ids: Vec<String> = images
                    .iter()
                    .filter_map(|i| i["id"].as_str().map(str::to_string))
                    .collect();
                ids.sort();
                Ok(ids)
            }
        }
    }
}

/// Checks the invariants of one site.
pub struct Checker {
    zk: Zk,
    clouds: Vec<CloudSpec>,
    images_dirs: Vec<PathBuf>,
    /// Manual requests made through [`Checker::request_build`]: (image, wall time).
    requests: Mutex<Vec<(String, f64)>>,
    checks: AtomicU64,
    violations: Mutex<Vec<String>>,
    /// Builder ids of killed builder processes with the time of their latest kill.
    killed: Mutex<BTreeMap<String, f64>>,
    /// Every build a sample has seen, with the last state seen: (image, id) → state.
    seen: Mutex<BTreeMap<(String, String), BuildState>>,
}

type Result<T> = std::result::Result<T, ZkError>;

/// Seconds since the epoch, like the records' `state_time`.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

impl Checker {
    /// A checker with its own session to `hosts` (plaintext ports) under `chroot`.
    pub fn new(
        hosts: Vec<(String, u16)>,
        chroot: &str,
        clouds: Vec<CloudSpec>,
        images_dirs: Vec<PathBuf>,
    ) -> Arc<Checker> {
        let zk = Zk::connect(ZkConfig {
            hosts,
            chroot: Some(chroot.to_string()),
            session_timeout: Duration::from_secs(10),
            tls: None,
            auth: None,
        });
        assert!(
            zk.wait_connected(Duration::from_secs(30)),
            "the invariant checker's session to ZooKeeper"
        );
        Arc::new(Checker {
            zk,
            clouds,
            images_dirs,
            requests: Mutex::new(Vec::new()),
            checks: AtomicU64::new(0),
            violations: Mutex::new(Vec::new()),
            seen: Mutex::new(BTreeMap::new()),
            killed: Mutex::new(BTreeMap::new()),
        })
    }

    /// Requests a build of `image` the way `nodepool image-build` does, remembering when, so
    /// the final check can tell whether it was served. A request made while an earlier one
    /// is still pending is the same znode: it is served with the earlier one (upstream's
    /// semantics; a build already running when it arrives may serve it), so only requests
    /// that find no pending one are remembered.
    pub fn request_build(&self, image: &str) {
        let path = paths::image_build_request_path(image);
        let at = now();
        let pending = self
            .zk
            .retry(Duration::from_secs(30), |zk| zk.exists(&path))
            .unwrap_or_else(|e| panic!("cannot look at {path}: {e}"))
            .is_some();
        if !pending {
            self.requests.lock().unwrap().push((image.to_string(), at));
        }
        self.zk
            .retry(Duration::from_secs(30), |zk| zk.ensure_path(&path))
            .unwrap_or_else(|e| panic!("cannot request a build of {image}: {e}"));
    }

    /// Notes that the builder process with `builder_id` (its images dir's `builder_id.txt`)
    /// was just killed: its `building` records from before now are orphans.
    pub fn builder_killed(&self, builder_id: &str) {
        let at = now();
        self.killed
            .lock()
            .unwrap()
            .insert(builder_id.to_string(), at);
    }

    /// How many manual requests found no pending request of their image (the rest joined
    /// one).
    pub fn requests_made(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// How many continuous samples completed (each one a full check of the tree).
    pub fn checks_passed(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// One continuous sample; violations are recorded (with the tree) for
    /// [`Checker::assert_no_violations`]. ZooKeeper errors skip the sample.
    pub fn sample(&self) {
        match self.continuous() {
            Ok(v) if v.is_empty() => {
                self.checks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(v) => {
                let dump = self.dump();
                let mut all = self.violations.lock().unwrap();
                for line in v {
                    all.push(format!("{line}\n(tree at that moment:)\n{dump}"));
                }
            }
            Err(_) => {}
        }
    }

    /// Every violation samples have recorded so far (each with the tree at that moment).
    pub fn recorded_violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    /// Panics with every violation a sample has recorded so far.
    #[track_caller]
    pub fn assert_no_violations(&self, context: &str) {
        let all = self.violations.lock().unwrap();
        if !all.is_empty() {
            panic!(
                "{} invariant violation(s) during the run ({context}):\n{}",
                all.len(),
                all.join("\n----\n")
            );
        }
    }

    /// Waits up to `timeout` for every final invariant to hold with `running_builders`
    /// builders running; panics listing every violation, the tree and `context` (e.g. the
    /// builder logs) otherwise. Also fails on violations recorded by samples. Returns the
    /// number of final checks made.
    #[track_caller]
    pub fn wait_final(
        &self,
        timeout: Duration,
        running_builders: usize,
        context: &dyn Fn() -> String,
    ) {
        let mut last: Vec<String> = Vec::new();
        let ok = poll_for(timeout, || match self.final_violations(running_builders) {
            Ok(v) if v.is_empty() => Some(()),
            Ok(v) => {
                last = v;
                None
            }
            Err(e) => {
                last = vec![format!("ZooKeeper error while checking: {e}")];
                None
            }
        });
        if ok.is_none() {
            panic!(
                "timed out after {timeout:?}: waiting for the final invariants; {} violation(s):\n  {}\n{}\n{}",
                last.len(),
                last.join("\n  "),
                self.dump(),
                context()
            );
        }
        self.checks.fetch_add(1, Ordering::Relaxed);
        drop(last);
        self.assert_no_violations(&context());
    }

    /// The continuous invariants, now.
    pub fn continuous(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let first = self.building_records()?;
        if first.values().any(|v| v.len() > 1) {
            // Confirm with a second read: records unchanged between the two reads were
            // building together for the whole time between them.
            let second = self.building_records()?;
            for (image, builds) in &first {
                let confirmed: Vec<&String> = builds
                    .iter()
                    .filter(|b| second.get(image).is_some_and(|s| s.contains(b)))
                    .map(|(id, _)| id)
                    .collect();
                if confirmed.len() > 1 {
                    out.push(format!(
                        "image {image} has {} building records at once: {confirmed:?}",
                        confirmed.len()
                    ));
                }
            }
        }
        for (lock, owner) in self.lock_contenders()? {
            if owner == 0 {
                out.push(format!("lock contender {lock} is not ephemeral"));
            }
        }
        Ok(out)
    }

    /// The final invariants, now; see the module documentation.
    pub fn final_violations(&self, running_builders: usize) -> Result<Vec<String>> {
        let mut out = self.continuous()?;
        let images = tree::image_names(&self.zk)?;
        let mut all: BTreeMap<String, Vec<BuildInfo>> = BTreeMap::new();
        for image in &images {
            all.insert(image.clone(), tree::read_image(&self.zk, image)?);
        }
        // Building at the end means the scenario did not settle; say so.
        for (image, builds) in &all {
            for b in builds
                .iter()
                .filter(|b| b.build.state == BuildState::Building)
            {
                out.push(format!("image {image}: build {} is still building", b.id));
            }
        }
        // Exactly one ready upload per provider for the newest ready build.
        for cloud in &self.clouds {
            for image in &cloud.images {
                let builds = all.get(image).map(Vec::as_slice).unwrap_or(&[]);
                let Some(newest) = tree::newest_ready(builds) else {
                    out.push(format!("image {image}: no ready build"));
                    continue;
                };
                let ready = newest
                    .uploads_to(&cloud.name)
                    .filter(|u| u.upload.state == UploadState::Ready)
                    .count();
                if ready != 1 {
                    out.push(format!(
                        "image {image}: newest ready build {} has {ready} ready uploads to {} (want 1)",
                        newest.id, cloud.name
                    ));
                }
            }
        }
        // Cloud images without a record.
        let mut external: BTreeSet<(String, String)> = BTreeSet::new();
        for builds in all.values() {
            for b in builds {
                for u in &b.uploads {
                    if let Some(x) = &u.upload.external_id {
                        external.insert((u.provider.clone(), x.clone()));
                    }
                }
            }
        }
        for cloud in &self.clouds {
            let ids = match cloud.image_ids() {
                Ok(ids) => ids,
                Err(e) => {
                    out.push(format!("cloud {}: {e}", cloud.name));
                    continue;
                }
            };
            for id in &ids {
                if !external.contains(&(cloud.name.clone(), id.clone())) {
                    out.push(format!(
                        "cloud {}: image {id} has no upload record",
                        cloud.name
                    ));
                }
            }
            // And the other way round: a launcher booting from a `ready` upload must find
            // its image.
            for (image, builds) in &all {
                for b in builds {
                    for u in b.uploads_to(&cloud.name) {
                        let Some(x) = &u.upload.external_id else {
                            continue;
                        };
                        if u.upload.state == UploadState::Ready && !ids.contains(x) {
                            out.push(format!(
                                "image {image}: ready upload {}-{}/{} names cloud image {x}, which {} does not have",
                                b.id, cloud.name, u.id, cloud.name
                            ));
                        }
                    }
                }
            }
        }
        // Local files without a build record.
        for dir in &self.images_dirs {
            let local = nodepool_builder::local::builds_present(dir).unwrap_or_default();
            for (image, id) in local {
                if self
                    .zk
                    .exists(&paths::image_build_path(&image, &id))?
                    .is_none()
                {
                    out.push(format!(
                        "{}: local files of {image}-{id} have no build record",
                        dir.display()
                    ));
                }
            }
        }
        // Empty znodes at build and upload depth.
        for image in &images {
            for id in tree::build_ids(&self.zk, image)? {
                let bp = paths::image_build_path(image, &id);
                if let Some((data, _)) = self.zk.get_data(&bp)?
                    && data.is_empty()
                {
                    out.push(format!("empty build znode {bp}"));
                }
                for p in tree::build_providers(&self.zk, image, &id)? {
                    for u in tree::upload_ids(&self.zk, image, &id, &p)? {
                        let up = paths::image_upload_path(image, &id, &p, &u);
                        if let Some((data, _)) = self.zk.get_data(&up)?
                            && data.is_empty()
                        {
                            out.push(format!("empty upload znode {up}"));
                        }
                    }
                }
            }
        }
        // Registrations of running builders only, and no lock left.
        let sessions = self.builder_sessions()?;
        if sessions.len() != running_builders {
            out.push(format!(
                "{} builder registrations for {running_builders} running builders (a dead session's registration lingers)",
                sessions.len()
            ));
        }
        // With every request served the builders are idle and hold no lock: a contender
        // left now, even by a running builder, would block its image or upload for as long
        // as that builder's session lives.
        for (lock, owner) in self.lock_contenders()? {
            let whose = if sessions.contains(&owner) {
                "a running builder's session, which is idle"
            } else {
                "no running builder's session"
            };
            out.push(format!(
                "lock contender {lock} is left behind (owner {owner:#x}: {whose})"
            ));
        }
        // Manual requests served.
        for (image, at) in self.requests.lock().unwrap().iter() {
            if self
                .zk
                .exists(&paths::image_build_request_path(image))?
                .is_some()
            {
                out.push(format!("image {image}: request-build still pending"));
                continue;
            }
            let builds = all.get(image).map(Vec::as_slice).unwrap_or(&[]);
            match tree::newest_ready(builds) {
                Some(b) if b.build.state_time >= *at => {}
                Some(b) => out.push(format!(
                    "image {image}: requested at {at:.3}, newest ready build {} is from {:.3}",
                    b.id, b.build.state_time
                )),
                None => out.push(format!(
                    "image {image}: requested at {at:.3}, no ready build"
                )),
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Every `building` record per image as (build id, mzxid).
    fn building_records(&self) -> Result<BTreeMap<String, Vec<(String, i64)>>> {
        let mut out: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
        for image in tree::image_names(&self.zk)? {
            for id in tree::build_ids(&self.zk, &image)? {
                let Some((data, stat)) = self.zk.get_data(&paths::image_build_path(&image, &id))?
                else {
                    continue;
                };
                let Some(build) = tree::parse_build(&image, &id, &data) else {
                    continue;
                };
                self.seen
                    .lock()
                    .unwrap()
                    .insert((image.clone(), id.clone()), build.state);
                let orphan = build.builder_id.as_ref().is_some_and(|b| {
                    self.killed
                        .lock()
                        .unwrap()
                        .get(b)
                        .is_some_and(|killed| build.state_time < *killed)
                });
                if build.state == BuildState::Building && !orphan {
                    out.entry(image.clone()).or_default().push((id, stat.mzxid));
                }
            }
        }
        Ok(out)
    }

    /// Every lock contender znode of the image tree with its ephemeral owner (0: persistent).
    fn lock_contenders(&self) -> Result<Vec<(String, i64)>> {
        let mut locks = Vec::new();
        for image in tree::image_names(&self.zk)? {
            locks.push(paths::image_build_lock_path(&image));
            for id in tree::build_ids(&self.zk, &image)? {
                locks.push(paths::image_build_number_lock_path(&image, &id));
                for p in tree::build_providers(&self.zk, &image, &id)? {
                    locks.push(paths::image_upload_lock_path(&image, &id, &p));
                    for u in tree::upload_ids(&self.zk, &image, &id, &p)? {
                        locks.push(paths::image_upload_number_lock_path(&image, &id, &p, &u));
                    }
                }
            }
        }
        let mut out = Vec::new();
        for lock in locks {
            for child in self.zk.get_children(&lock)?.unwrap_or_default() {
                let path = format!("{lock}/{child}");
                if let Some(stat) = self.zk.exists(&path)? {
                    out.push((path, stat.ephemeral_owner));
                }
            }
        }
        Ok(out)
    }

    /// The sessions of the registered builders (ephemeral owners of their registrations).
    fn builder_sessions(&self) -> Result<BTreeSet<i64>> {
        let root = paths::component_kind_path("builder");
        let mut out = BTreeSet::new();
        for child in self.zk.get_children(&root)?.unwrap_or_default() {
            if let Some(stat) = self.zk.exists(&format!("{root}/{child}"))? {
                out.insert(stat.ephemeral_owner);
            }
        }
        Ok(out)
    }

    /// The tree (data cut at 160 bytes, ephemeral owners shown), the clouds and the images
    /// directories, for failure messages. Never panics.
    pub fn dump(&self) -> String {
        let mut out = String::from("--- ZooKeeper tree (checker's chroot) ---\n");
        let mut stack = vec!["/".to_string()];
        while let Some(path) = stack.pop() {
            match self.zk.get_data(&path) {
                Ok(Some((data, stat))) => {
                    let shown = String::from_utf8_lossy(&data[..data.len().min(160)]).into_owned();
                    let owner = if stat.ephemeral_owner != 0 {
                        format!(" [ephemeral {:#x}]", stat.ephemeral_owner)
                    } else {
                        String::new()
                    };
                    out.push_str(&format!("{path}{owner} = {shown}\n"));
                }
                Ok(None) => continue,
                Err(e) => {
                    out.push_str(&format!("{path}: <{e}>\n"));
                    continue;
                }
            }
            if let Ok(Some(mut children)) = self.zk.get_children(&path) {
                children.sort();
                let base = if path == "/" { "" } else { path.as_str() };
                stack.extend(children.iter().rev().map(|c| format!("{base}/{c}")));
            }
        }
        for cloud in &self.clouds {
            out.push_str(&format!(
                "--- cloud {}: {:?}\n",
                cloud.name,
                cloud.image_ids()
            ));
        }
        for dir in &self.images_dirs {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .map(|it| {
                    it.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            out.push_str(&format!("--- {}: {names:?}\n", dir.display()));
        }
        out
    }

    /// The number of distinct `ready` builds (across all images) now.
    pub fn ready_builds(&self) -> usize {
        self.zk
            .retry(Duration::from_secs(30), |zk| {
                let mut n = 0;
                for image in tree::image_names(zk)? {
                    n += tree::read_image(zk, &image)?
                        .iter()
                        .filter(|b| b.build.state == BuildState::Ready)
                        .count();
                }
                Ok(n)
            })
            .expect("count ready builds")
    }

    /// How many distinct builds the samples have seen, and how many of them were last seen
    /// `failed` (work that had to be redone).
    pub fn builds_seen(&self) -> (usize, usize) {
        let seen = self.seen.lock().unwrap();
        let failed = seen.values().filter(|s| **s == BuildState::Failed).count();
        (seen.len(), failed)
    }

    /// The checker's own session (for reads the scenario needs).
    pub fn zk(&self) -> &Zk {
        &self.zk
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.zk.close();
    }
}

/// Image ids in a directory cloud (hidden entries are uploads in progress).
pub fn cloud_images(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A thread calling [`Checker::sample`] every ~100 ms until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(checker: &Arc<Checker>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (checker.clone(), stop.clone());
        // Test code may spawn threads directly (only src/ goes through src/thread.rs).
        #[allow(clippy::disallowed_methods)]
        let thread = std::thread::Builder::new()
            .name("invariant-sampler".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    c.sample();
                    // Load shape, not synchronisation: how often the tree is sampled.
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .expect("start the sampler thread");
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling and waits for the thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.halt();
    }
}
