//! A mixed fleet: nodepool-builder 11.0.0 (Python, PyPI) and this builder on one ZooKeeper
//! and one real Glance, reading one `nodepool.yaml` — the migration an operator makes (issue
//! 15, item 4): ours joins the Python builder, both serve side by side, the Python one is
//! retired mid-upload and ours takes over its records; then the Python one comes back (the
//! way back must be safe too).
//!
//! # Set-up
//!
//! One `nodepool.yaml` ([`fleet_yaml`]): three diskimages built by the test image builder
//! script, two OpenStack providers on two clouds.yaml entries that reach the same Glance, one
//! directly and one through the fault proxy (so an upload can be held mid-way). The two
//! builders stand for two hosts with the same file: `images-dir` and `build-log-dir` are
//! `%(NODEPOOL_MIG_*)` references that both nodepool 11 and this builder replace from their
//! environment, so each builder has its own directories (upstream's "disjoint builders", wire
//! spec §3.9: only the builder holding a build's files uploads it, §3.6). Our extra key
//! `cleanup-interval` is in the file too; nodepool 11's loader ignores keys it does not know.
//! The two providers have their own `image-name-format`: openstacksdk's `create_image`
//! returns an existing image of the same name and checksum instead of uploading, so two
//! providers on one Glance project uploading a build in the same second would otherwise
//! share one cloud image (and deleting one upload would delete the other's image).
//! Both builders run from that very file (`-c nodepool.yaml`), labels, pools and all.
//!
//! # Sequence
//!
//! 1. The Python builder alone builds and uploads everything (the site before migrating).
//! 2. Ours joins and, over several janitor passes, rebuilds, re-uploads and deletes nothing.
//! 3. Bursts of manual requests (the `request-build` znode, as `nodepool image-build`
//!    makes it); in the last one ours is kept busy (its image builder paused on one image,
//!    one build worker) so the Python builder serves the others and uploads them itself.
//! 4. `nodepool dib-image-delete` (the Python CLI, on the same nodepool.yaml) of the newest
//!    build of one image, a build of the Python builder: the janitors delete its uploads and
//!    Glance images (ours is faster), and the Python janitor its files. Both janitors then
//!    run on: at least three passes of the Python one (it runs at start and every 60 s and
//!    logs nothing per pass, so [`JanitorCanary`] counts them), a hundred of ours.
//! 5. Takeover: the Python builder builds an image whose upload to the proxied cloud is held
//!    (Glance never answers the image data), and is stopped mid-upload (SIGINT, its graceful
//!    stop: upload threads die with the process). Ours removes the orphaned `uploading`
//!    record and the half-created Glance image (leak detection); until a new build exists
//!    the proxied provider keeps the previous build's upload (the recent-upload bridge, §3.7
//!    A). A final burst has ours build and upload every image again.
//! 6. The way back: the Python builder starts again on the tree ours has managed; its janitor
//!    removes the files of builds deleted while it was away, it rebuilds and re-uploads
//!    nothing, and the Python CLI lists everything.
//!
//! # Invariants
//!
//! Sampled during the run and checked at the end through `util::invariants` (one `building`
//! record per image, one `ready` upload per provider for the newest ready build, no Glance
//! image without a record and no `ready` upload without its image, no local file without a
//! record, no empty znode, no lock left, one registration per running builder, every request
//! served), plus, here:
//!
//! * every request served once: every build leaves its log (`build-log-retention` is high),
//!   and per image there are exactly as many as the initial build plus the requests;
//! * retention exactly as nodepool 11 (§3.7): [`nodepool11_retention`] computes, from every
//!   record the run has seen, which builds and uploads the janitors must keep (the two newest
//!   ready builds per image, the two newest ready uploads per image and provider — the
//!   bridge — and nothing the operator deleted), and the final tree must be exactly that;
//! * every `ready` upload's Glance image is `active`;
//! * no traceback in the Python builder's logs, except upstream quirk Q6 (§3.11), counted:
//!   when both janitors delete the same upload, the Python janitor's kazoo lock re-creates
//!   the deleted upload znode empty (`Lock` creates its path with parents), and reading it
//!   logs "Error loading json data from image upload …" with a `JSONDecodeError` at char 0
//!   ([`classify_traceback`]). Every other traceback fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodepool_builder::model::{BuildState, UploadState};
use nodepool_builder::zk::tree::{self, BuildInfo};
use nodepool_builder::zk::{Zk, ZkConfig, paths};

use crate::util::builder::BuilderProcess;
use crate::util::faultproxy::{Fault, FaultProxy, Rule};
use crate::util::glance::GlanceServer;
use crate::util::invariants::{Checker, Cloud, CloudSpec, Sampler};
use crate::util::nodepool::{NodepoolCli, describe};
use crate::util::site::{TestSite, WAIT};
use crate::util::upstream::{NodepoolYaml, UpstreamBuilder, UpstreamOptions, YamlProvider};
use crate::util::{file_tail, poll_for};

/// The diskimages.
const IMAGES: [&str; 3] = ["mig0", "mig1", "mig2"];
/// The provider on the cloud that reaches Glance directly.
const DIRECT: &str = "mig-direct";
/// The provider on the cloud that reaches Glance through the fault proxy.
const PROXIED: &str = "mig-proxied";
/// Builder slots of the site: directories `images0`/`logs0` for the Python builder,
/// `images1`/`logs1` for ours.
const PYTHON: usize = 0;
const OURS: usize = 1;
/// How long the Python builder may take for one round of work: its build and upload workers
/// poll every 10 s, and an upload worker ends its pass after one upload.
const PYTHON_ROUND: Duration = Duration::from_secs(90);

/// The inputs of the fleet's one `nodepool.yaml`.
fn fleet_yaml() -> NodepoolYaml {
    let images: Vec<String> = IMAGES.iter().map(|s| s.to_string()).collect();
    NodepoolYaml {
        images_dir: "%(NODEPOOL_MIG_IMAGES_DIR)".into(),
        build_log_dir: "%(NODEPOOL_MIG_BUILD_LOG_DIR)".into(),
        top: vec![
            // Every build's log stays: the count of logs is the count of builds.
            ("build-log-retention".into(), "100".into()),
            // Ours only (nodepool 11 ignores it): a janitor pass every second.
            ("cleanup-interval".into(), "1.0".into()),
        ],
        images: images.clone(),
        env_vars: Vec::new(),
        providers: vec![
            YamlProvider {
                name: DIRECT.into(),
                cloud: "glance-direct".into(),
                images: images.clone(),
                image_name_format: Some("{image_name}-direct-{timestamp}".into()),
            },
            YamlProvider {
                name: PROXIED.into(),
                cloud: "glance-proxied".into(),
                images,
                image_name_format: Some("{image_name}-proxied-{timestamp}".into()),
            },
        ],
    }
}

/// The site, its Glance (shared) and fault proxy, the one `nodepool.yaml` and clouds.yaml.
struct Fleet {
    site: TestSite,
    glance: &'static GlanceServer,
    proxy: FaultProxy,
    yaml: PathBuf,
    clouds: PathBuf,
}

impl Fleet {
    fn new(name: &str) -> Fleet {
        let site = TestSite::new(name);
        let glance = GlanceServer::shared();
        let proxy = FaultProxy::start(format!("127.0.0.1:{}", glance.port()).parse().unwrap());
        let clouds = site.path("clouds.yaml");
        std::fs::write(
            &clouds,
            format!(
                "clouds:\n  glance-direct:\n    auth_type: none\n    image_endpoint_override: {}\n  \
                 glance-proxied:\n    auth_type: none\n    image_endpoint_override: {}\n",
                glance.url(),
                proxy.url()
            ),
        )
        .unwrap();
        let yaml = site.path("nodepool.yaml");
        fleet_yaml().write(&site, &yaml);
        for n in [PYTHON, OURS] {
            std::fs::create_dir_all(site.log_dir(n)).unwrap();
        }
        Fleet {
            site,
            glance,
            proxy,
            yaml,
            clouds,
        }
    }

    /// The environment of builder slot `n`: its directories and the clouds.
    fn env(&self, n: usize) -> Vec<(String, String)> {
        vec![
            (
                "NODEPOOL_MIG_IMAGES_DIR".into(),
                self.site.images_dir(n).display().to_string(),
            ),
            (
                "NODEPOOL_MIG_BUILD_LOG_DIR".into(),
                self.site.log_dir(n).display().to_string(),
            ),
            (
                "OS_CLIENT_CONFIG_FILE".into(),
                self.clouds.display().to_string(),
            ),
        ]
    }

    fn start_python(&self, log: &str) -> UpstreamBuilder {
        UpstreamBuilder::start_with(UpstreamOptions {
            config: self.yaml.clone(),
            clouds: self.clouds.clone(),
            log: self.site.path(log),
            cwd: self.site.path("python-cwd"),
            workers: (1, 4),
            env: self.env(PYTHON),
        })
    }

    /// Ours, with its default workers (1 build, 4 upload), DEBUG log.
    fn start_ours(&self) -> BuilderProcess {
        let mut env = self.env(OURS);
        env.push((
            "NODEPOOL_BUILDER_LOG".into(),
            "debug,zookeeper_client=info,rustls=info,ureq=info".into(),
        ));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut b = BuilderProcess::start(
            &["-d", "-c", self.yaml.to_str().unwrap()],
            &env,
            &self.site.path(&format!("builder{OURS}.log")),
        );
        b.wait_for_log(WAIT, "ready: builder_id=");
        b
    }

    /// The Python CLI on the fleet's nodepool.yaml.
    fn cli(&self) -> NodepoolCli {
        NodepoolCli::with_config(&self.yaml, self.site.dir.path(), self.env(PYTHON))
    }

    fn builder_id(&self, n: usize) -> String {
        std::fs::read_to_string(self.site.images_dir(n).join("builder_id.txt"))
            .expect("builder_id.txt")
            .trim()
            .to_string()
    }

    /// The builders' logs (tails) and the tree, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["python-1.log", "python-2.log", "builder1.log"] {
            let p = self.site.path(name);
            if p.exists() {
                out.push_str(&format!("--- {name} (tail) ---\n{}\n", file_tail(&p, 60)));
            }
        }
        out
    }

    /// Waits for `f`; on time-out panics with the tree and the logs.
    #[track_caller]
    fn wait<T>(&self, timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
        match poll_for(timeout, f) {
            Some(v) => v,
            None => panic!(
                "timed out after {timeout:?}: waiting for {what}\n--- tree ---\n{}\n{}",
                self.site.server.tree(&self.site.chroot),
                self.logs()
            ),
        }
    }

    /// Every build of every image (ZooKeeper errors count as "nothing yet").
    fn tree(&self) -> BTreeMap<String, Vec<BuildInfo>> {
        IMAGES
            .iter()
            .map(|i| (i.to_string(), self.site.builds(i)))
            .collect()
    }

    /// Waits until every image's newest ready build has a ready upload to both providers
    /// and the janitors have nothing left to remove (only ready records remain), and returns
    /// the newest ready build per image.
    #[track_caller]
    fn wait_settled(&self, timeout: Duration, what: &str) -> BTreeMap<String, BuildInfo> {
        self.wait(timeout, what, || {
            let mut newest = BTreeMap::new();
            for (image, builds) in self.tree() {
                let n = tree::newest_ready(&builds)?;
                if ![DIRECT, PROXIED].iter().all(|p| n.has_ready_upload(p)) {
                    return None;
                }
                let all_ready = builds.iter().all(|b| {
                    b.build.state == BuildState::Ready
                        && b.uploads
                            .iter()
                            .all(|u| u.upload.state == UploadState::Ready)
                });
                if !all_ready {
                    return None;
                }
                newest.insert(image, n.clone());
            }
            Some(newest)
        })
    }
}

/// Every record seen during the run, from a session of its own polled every 100 ms.
#[derive(Default, Debug)]
struct Seen {
    /// (image, build) → the time the build became ready (its `state_time`), once seen ready.
    ready_builds: BTreeMap<(String, String), f64>,
    /// (image, build, provider, upload) → `state_time` of the ready record.
    ready_uploads: BTreeMap<(String, String, String, String), f64>,
}

impl Seen {
    fn observe(&mut self, image: &str, builds: &[BuildInfo]) {
        for b in builds {
            if b.build.state == BuildState::Ready {
                self.ready_builds
                    .insert((image.to_string(), b.id.clone()), b.build.state_time);
            }
            for u in &b.uploads {
                if u.upload.state == UploadState::Ready {
                    self.ready_uploads.insert(
                        (
                            image.to_string(),
                            b.id.clone(),
                            u.provider.clone(),
                            u.id.clone(),
                        ),
                        u.upload.state_time,
                    );
                }
            }
        }
    }
}

/// A thread recording [`Seen`] until dropped.
struct Recorder {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    fn start(site: &TestSite) -> Recorder {
        let zk = Zk::connect(ZkConfig {
            hosts: vec![("127.0.0.1".into(), site.server.plain_port())],
            chroot: Some(site.chroot.clone()),
            session_timeout: Duration::from_secs(10),
            tls: None,
            auth: None,
        });
        assert!(
            zk.wait_connected(Duration::from_secs(30)),
            "recorder session"
        );
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        #[allow(clippy::disallowed_methods)]
        let thread = std::thread::Builder::new()
            .name("record-seen".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    for image in IMAGES {
                        if let Ok(builds) = tree::read_image(&zk, image) {
                            s.lock().unwrap().observe(image, &builds);
                        }
                    }
                    // Load shape, not synchronisation: how often the tree is read.
                    std::thread::sleep(Duration::from_millis(100));
                }
                zk.close();
            })
            .expect("start the recorder");
        Recorder {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Takes one more look with `zk` and returns everything seen.
    fn snapshot(&self, zk: &Zk) -> Seen {
        let mut s = self.seen.lock().unwrap();
        for image in IMAGES {
            if let Ok(builds) = tree::read_image(zk, image) {
                s.observe(image, &builds);
            }
        }
        Seen {
            ready_builds: s.ready_builds.clone(),
            ready_uploads: s.ready_uploads.clone(),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What nodepool 11's janitor keeps of one image, once it has nothing left to do.
#[derive(Debug, PartialEq, Eq, Default)]
struct Retained {
    /// Build ids, all `ready`.
    builds: BTreeSet<String>,
    /// (build, provider, upload), all `ready`.
    uploads: BTreeSet<(String, String, String)>,
}

/// Wire spec §3.7 applied to everything `seen` of `image` with no build in flight: the two
/// newest ready builds are kept with all their ready uploads; per provider the two newest
/// ready uploads are kept too (the recent-upload bridge), and with them their builds; builds
/// the operator deleted (`nodepool dib-image-delete`) and their uploads go. Nothing else
/// remains.
fn nodepool11_retention(
    seen: &Seen,
    image: &str,
    providers: &[&str],
    operator_deleted: &BTreeSet<String>,
) -> Retained {
    let mut ready: Vec<(f64, &String)> = seen
        .ready_builds
        .iter()
        .filter(|((i, b), _)| i == image && !operator_deleted.contains(b))
        .map(|((_, b), t)| (*t, b))
        .collect();
    ready.sort_by(|a, b| b.0.total_cmp(&a.0));
    let kept: BTreeSet<String> = ready.iter().take(2).map(|(_, b)| (*b).clone()).collect();
    let mut out = Retained::default();
    for (i, b, p, u) in seen.ready_uploads.keys() {
        if i == image && kept.contains(b) {
            out.uploads.insert((b.clone(), p.clone(), u.clone()));
        }
    }
    for provider in providers {
        let mut ups: Vec<(f64, &String, &String)> = seen
            .ready_uploads
            .iter()
            .filter(|((i, b, p, _), _)| {
                i == image && p == provider && !operator_deleted.contains(b)
            })
            .map(|((_, b, _, u), t)| (*t, b, u))
            .collect();
        ups.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (_, b, u) in ups.into_iter().take(2) {
            out.uploads
                .insert((b.clone(), provider.to_string(), u.clone()));
        }
    }
    out.builds = kept;
    out.builds
        .extend(out.uploads.iter().map(|(b, _, _)| b.clone()));
    out
}

/// The records of one image as they are, in the shape of [`Retained`] (records not `ready`
/// are reported separately).
fn actual_retention(builds: &[BuildInfo]) -> (Retained, Vec<String>) {
    let mut out = Retained::default();
    let mut not_ready = Vec::new();
    for b in builds {
        out.builds.insert(b.id.clone());
        if b.build.state != BuildState::Ready {
            not_ready.push(format!("build {} is {}", b.id, b.build.state));
        }
        for u in &b.uploads {
            out.uploads
                .insert((b.id.clone(), u.provider.clone(), u.id.clone()));
            if u.upload.state != UploadState::Ready {
                not_ready.push(format!(
                    "upload {}/{}/{} is {}",
                    b.id, u.provider, u.id, u.upload.state
                ));
            }
        }
    }
    (out, not_ready)
}

/// One traceback of a Python log: the log record that carried it and its last line (the
/// exception).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Traceback {
    record: String,
    exception: String,
}

/// What caused a traceback of the Python builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TracebackCause {
    /// Upstream quirk Q6: an empty record znode — re-created empty by the Python janitor's
    /// own kazoo lock on a record that was just deleted — read as JSON.
    Q6EmptyRecord,
    /// Anything else: a failure.
    Other,
}

/// Whether a traceback is quirk Q6: logged as "Error loading json data from image upload
/// <path>" (or "… image build <path>") by nodepool's record readers, with the JSON error of
/// empty data ("Expecting value: line 1 column 1 (char 0)").
fn classify_traceback(tb: &Traceback) -> TracebackCause {
    let empty_record = tb
        .record
        .contains("Error loading json data from image upload")
        || tb
            .record
            .contains("Error loading json data from image build");
    let empty_json =
        tb.exception == "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)";
    if empty_record && empty_json {
        TracebackCause::Q6EmptyRecord
    } else {
        TracebackCause::Other
    }
}

/// Whether a line starts a log record (`2026-12-07 18:22:01,123 DEBUG …`).
fn is_log_record(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 11
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b' '
}

/// Every traceback in a Python log.
fn tracebacks(log: &str) -> Vec<Traceback> {
    let mut out = Vec::new();
    let mut record = String::new();
    let mut current: Option<Traceback> = None;
    for line in log.lines() {
        if is_log_record(line) {
            out.extend(current.take());
            record = line.to_string();
        } else if line.starts_with("Traceback (most recent call last):") {
            if current.is_none() {
                current = Some(Traceback {
                    record: record.clone(),
                    exception: String::new(),
                });
            }
        } else if let Some(tb) = current.as_mut()
            && !line.starts_with(' ')
            && !line.trim().is_empty()
        {
            // The last unindented line is the exception (chained ones come before it).
            tb.exception = line.to_string();
        }
    }
    out.extend(current);
    out
}

/// Build logs per image in a log directory.
fn build_logs(dir: &Path) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".log")
            && let Some((image, _)) = stem.rsplit_once('-')
        {
            *out.entry(image.to_string()).or_default() += 1;
        }
    }
    out
}

/// How many passes of the first Python builder's janitor (at start, then every 60 s) the
/// run waits for before the takeover.
const PYTHON_JANITOR_PASSES: usize = 3;

/// Counts passes of the Python janitor, which logs nothing per pass: a canary, the image file
/// of a build that has no record (`mig0-<id>.qcow2`) in its images directory, is removed by
/// every pass (wire spec §3.7 C); [`JanitorCanary::poll`] plants a new one when the last is
/// gone. Passes between two polls count once, so the count is a lower bound.
struct JanitorCanary {
    dir: PathBuf,
    current: PathBuf,
    removed: usize,
}

impl JanitorCanary {
    fn plant(dir: PathBuf) -> JanitorCanary {
        let current = JanitorCanary::new_file(&dir);
        JanitorCanary {
            dir,
            current,
            removed: 0,
        }
    }

    fn new_file(dir: &Path) -> PathBuf {
        let path = dir.join(format!("mig0-{}.qcow2", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, b"canary").unwrap();
        path
    }

    /// Passes seen so far.
    fn poll(&mut self) -> usize {
        if !self.current.exists() {
            self.removed += 1;
            self.current = JanitorCanary::new_file(&self.dir);
        }
        self.removed
    }
}

/// A control file of the test image builder in ours' images directory: while it exists,
/// ours' builds of `image` wait before writing anything (holding ours' one build worker).
struct HoldOurs(PathBuf);

impl HoldOurs {
    fn new(fleet: &Fleet, image: &str) -> HoldOurs {
        HoldOurs(
            fleet
                .site
                .control(OURS, &format!("fake-dib.{image}.pause"), ""),
        )
    }
}

impl Drop for HoldOurs {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn python_and_ours_share_a_site_and_ours_takes_over_mid_upload() {
    let started = Instant::now();
    let fleet = Fleet::new("mixed_fleet");
    let site = &fleet.site;
    let checker = Checker::new(
        vec![("127.0.0.1".into(), site.server.plain_port())],
        &site.chroot,
        [DIRECT, PROXIED]
            .iter()
            .map(|p| CloudSpec {
                name: p.to_string(),
                cloud: Cloud::Glance(fleet.glance),
                images: IMAGES.iter().map(|s| s.to_string()).collect(),
            })
            .collect(),
        vec![site.images_dir(PYTHON), site.images_dir(OURS)],
    );
    let recorder = Recorder::start(site);
    let mut requests: BTreeMap<&str, usize> = IMAGES.iter().map(|i| (*i, 0)).collect();
    let mut request = |image: &'static str| {
        checker.request_build(image);
        *requests.get_mut(image).unwrap() += 1;
    };
    let served = |images: &[&str]| {
        let what = format!("the requests of {images:?} to be served");
        fleet.wait(PYTHON_ROUND, &what, || {
            images
                .iter()
                .all(|i| !site.request_pending(i))
                .then_some(())
        });
    };

    // 1. The Python builder alone: the site before the migration.
    let mut canary = JanitorCanary::plant(site.images_dir(PYTHON));
    let python = fleet.start_python("python-1.log");
    let python_id = fleet.builder_id(PYTHON);
    let before = fleet.wait_settled(
        2 * PYTHON_ROUND,
        "the Python builder's first builds and uploads",
    );
    for b in before.values() {
        assert_eq!(b.build.builder_id.as_deref(), Some(python_id.as_str()));
    }
    let sampler = Sampler::start(&checker);

    // 2. Ours joins: over several janitor passes it rebuilds, re-uploads, deletes nothing.
    let ours = fleet.start_ours();
    let ours_id = fleet.builder_id(OURS);
    let snapshot = fleet.tree();
    fleet.wait(WAIT, "three janitor passes of ours", || {
        (ours.log().matches("cleanup pass:").count() >= 3).then_some(())
    });
    assert_eq!(
        fleet.tree(),
        snapshot,
        "ours changed the Python builder's records\n{}",
        fleet.logs()
    );

    // 3. Bursts of manual requests: two that ours serves, then one where ours is busy with
    // mig0 (one build worker) and the Python builder serves the others.
    for burst in ["first", "second"] {
        for image in IMAGES {
            request(image);
        }
        served(&IMAGES);
        fleet.wait_settled(WAIT, &format!("the {burst} burst built and uploaded"));
        canary.poll();
    }
    {
        let _hold = HoldOurs::new(&fleet, "mig0");
        request("mig0");
        fleet.wait(WAIT, "ours building mig0", || {
            site.builds_in("mig0", BuildState::Building)
                .iter()
                .any(|b| b.build.builder_id.as_deref() == Some(ours_id.as_str()))
                .then_some(())
        });
        request("mig1");
        request("mig2");
        served(&["mig1", "mig2"]);
        for image in ["mig1", "mig2"] {
            let newest = tree::newest_ready(&site.builds(image)).unwrap().clone();
            assert_eq!(
                newest.build.builder_id.as_deref(),
                Some(python_id.as_str()),
                "the Python builder served {image}'s request while ours was busy\n{}",
                fleet.logs()
            );
        }
    }
    served(&["mig0"]);
    let newest = fleet.wait_settled(
        PYTHON_ROUND,
        "the third burst built and uploaded by both builders",
    );
    canary.poll();

    // 4. The operator deletes the newest build of mig1 with the Python CLI.
    let victim = newest["mig1"].clone();
    let victim_images: Vec<String> = victim
        .uploads
        .iter()
        .filter_map(|u| u.upload.external_id.clone())
        .collect();
    let out = fleet
        .cli()
        .run(&["dib-image-delete", &format!("mig1-{}", victim.id)]);
    assert!(
        out.status.success(),
        "dib-image-delete:\n{}",
        describe(&out)
    );
    let mut operator_deleted = BTreeSet::new();
    operator_deleted.insert(victim.id.clone());
    fleet.wait(
        WAIT,
        "the deleted build, its Glance images and files to go",
        || {
            (site
                .zk
                .exists(&paths::image_build_path("mig1", &victim.id))
                .unwrap()
                .is_none()
                && victim_images
                    .iter()
                    .all(|id| fleet.glance.get_image(id).is_none())
                && site.local_files(OURS, "mig1", &victim.id).is_empty())
            .then_some(())
        },
    );
    // The build was the Python builder's: its janitor removes the files, within a pass.
    fleet.wait(
        PYTHON_ROUND,
        "the Python janitor to remove the deleted build's files",
        || {
            canary.poll();
            site.local_files(PYTHON, "mig1", &victim.id)
                .is_empty()
                .then_some(())
        },
    );
    // Both janitors run on for several passes.
    fleet.wait(
        3 * PYTHON_ROUND,
        "three passes of the Python janitor",
        || (canary.poll() >= PYTHON_JANITOR_PASSES).then_some(()),
    );
    let python_passes = canary.poll();

    // 5. The Python builder is stopped mid-upload; ours takes over its records.
    fleet.proxy.set(vec![Rule::data(Fault::Stall)]);
    let (python_build, held_upload) = {
        let _hold = HoldOurs::new(&fleet, "mig0");
        request("mig0");
        fleet.wait(WAIT, "ours building mig0 again", || {
            site.builds_in("mig0", BuildState::Building)
                .iter()
                .any(|b| b.build.builder_id.as_deref() == Some(ours_id.as_str()))
                .then_some(())
        });
        request("mig2");
        let held = fleet.wait(
            PYTHON_ROUND,
            "the Python builder's upload of mig2 held mid-way",
            || {
                if fleet.proxy.count("/file -> stalled") == 0 {
                    return None;
                }
                site.builds("mig2").into_iter().find_map(|b| {
                    let u = b
                        .uploads_to(PROXIED)
                        .find(|u| u.upload.state == UploadState::Uploading)?;
                    (b.build.builder_id.as_deref() == Some(python_id.as_str()))
                        .then(|| (b.id.clone(), u.id.clone()))
                })
            },
        );
        let stopped = python.stop();
        assert!(stopped.is_some(), "the Python builder stopped");
        held
    };
    let stalled_image = fleet
        .proxy
        .requests()
        .iter()
        .find(|r| r.ends_with("/file -> stalled"))
        .and_then(|r| r.split('/').nth(3).map(str::to_string))
        .expect("the held upload's Glance image id");
    fleet.wait(
        WAIT,
        "ours to remove the orphaned upload record and its half-made Glance image",
        || {
            let gone = site
                .zk
                .exists(&paths::image_upload_path(
                    "mig2",
                    &python_build,
                    PROXIED,
                    &held_upload,
                ))
                .unwrap()
                .is_none();
            (gone && fleet.glance.get_image(&stalled_image).is_none()).then_some(())
        },
    );
    fleet.proxy.clear();
    served(&["mig0"]);
    // Until a new build exists, the proxied provider keeps mig2's previous upload (the
    // bridge), although its build is no longer among the two newest.
    let bridged = fleet.wait(
        WAIT,
        "ours' janitor at rest with mig2's newest build un-uploaded",
        || {
            let builds = site.builds("mig2");
            let newest = tree::newest_ready(&builds)?;
            (newest.id == python_build
                && builds.iter().all(|b| {
                    b.uploads
                        .iter()
                        .all(|u| u.upload.state == UploadState::Ready)
                })
                && ours.log().matches("cleanup pass:").count() > 0)
                .then(|| {
                    builds
                        .iter()
                        .filter(|b| b.has_ready_upload(PROXIED))
                        .count()
                })
        },
    );
    assert!(
        bridged >= 1,
        "the proxied provider lost every upload of mig2\n{}",
        fleet.logs()
    );
    // Ours redoes what the Python builder left: a new build of every image, uploaded.
    for image in IMAGES {
        request(image);
    }
    served(&IMAGES);
    let last = fleet.wait_settled(WAIT, "ours' builds of the final burst uploaded");
    for b in last.values() {
        assert_eq!(b.build.builder_id.as_deref(), Some(ours_id.as_str()));
    }

    // 6. The way back: the Python builder on the tree ours has managed.
    let python2 = fleet.start_python("python-2.log");
    checker.wait_final(WAIT, 2, &|| fleet.logs());
    sampler.stop();
    let cli = fleet.cli();
    for cmd in ["dib-image-list", "image-list"] {
        let out = cli.run(&[cmd]);
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("Traceback"),
            "nodepool {cmd} on ours' records:\n{}",
            describe(&out)
        );
    }
    // It rebuilt and re-uploaded nothing.
    assert_eq!(
        fleet.wait_settled(WAIT, "the tree at rest"),
        last,
        "the Python builder changed ours' records\n{}",
        fleet.logs()
    );

    // Every request served once: one build (and log) for the first build and each request.
    let mut logs = build_logs(&site.log_dir(PYTHON));
    for (image, n) in build_logs(&site.log_dir(OURS)) {
        *logs.entry(image).or_default() += n;
    }
    for (image, n) in &requests {
        assert_eq!(
            logs.get(*image).copied().unwrap_or(0),
            1 + n,
            "builds of {image}: the first one and one per request ({n})\n{}",
            fleet.logs()
        );
    }
    // Retention exactly as nodepool 11.
    let seen = recorder.snapshot(&site.zk);
    for image in IMAGES {
        let want = nodepool11_retention(&seen, image, &[DIRECT, PROXIED], &operator_deleted);
        let (have, not_ready) = actual_retention(&site.builds(image));
        assert!(not_ready.is_empty(), "{image}: {not_ready:?}");
        assert_eq!(have, want, "{image}: retention differs from nodepool 11's");
    }
    // Every ready upload's image is active in Glance, and its own.
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for (image, builds) in fleet.tree() {
        for b in builds {
            for u in &b.uploads {
                let id = u
                    .upload
                    .external_id
                    .clone()
                    .expect("a ready upload's image id");
                let status = fleet.glance.get_image(&id).map(|i| i["status"].clone());
                assert_eq!(
                    status,
                    Some(serde_json::json!("active")),
                    "{image} build {} upload {}/{}: Glance image {id}",
                    b.id,
                    u.provider,
                    u.id
                );
                let owner = format!("{image} {} {}/{}", b.id, u.provider, u.id);
                if let Some(other) = owners.insert(id.clone(), owner.clone()) {
                    panic!("Glance image {id} is the upload of both {other} and {owner}");
                }
            }
        }
    }
    // Tracebacks of the Python builder: quirk Q6 counted, anything else fails.
    let ours_passes = ours.log().matches("cleanup pass:").count();
    drop(python2);
    let mut q6 = 0;
    let mut other = Vec::new();
    for log in ["python-1.log", "python-2.log"] {
        let text = String::from_utf8_lossy(&std::fs::read(site.path(log)).unwrap()).into_owned();
        for tb in tracebacks(&text) {
            match classify_traceback(&tb) {
                TracebackCause::Q6EmptyRecord => q6 += 1,
                TracebackCause::Other => other.push(format!("{log}: {tb:?}")),
            }
        }
    }
    assert!(
        other.is_empty(),
        "tracebacks in the Python builder's log other than quirk Q6:\n{}",
        other.join("\n")
    );
    drop(ours);
    println!(
        "mixed_fleet: wall_time={:.0}s requests={} python_builds={} ours_builds={} ours_janitor_passes={ours_passes} python_janitor_passes_before_takeover>={python_passes} q6_tracebacks={q6} invariant_checks_passed={}",
        started.elapsed().as_secs_f64(),
        requests.values().sum::<usize>(),
        build_logs(&site.log_dir(PYTHON)).values().sum::<usize>(),
        build_logs(&site.log_dir(OURS)).values().sum::<usize>(),
        checker.checks_passed(),
    );
}

#[test]
fn tracebacks_are_found_and_only_empty_record_reads_are_quirk_q6() {
    let log = "\
2026-12-07 10:00:00,001 DEBUG nodepool.builder.CleanupWorker.0: Running
2026-12-07 10:00:00,002 ERROR nodepool.zk.ZooKeeper: Error loading json data from image upload /nodepool/images/a/builds/b/providers/p/images/0000000001
Traceback (most recent call last):
  File \"x.py\", line 1, in get
    d = json.loads(data)
json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)
2026-12-07 10:00:01,000 ERROR nodepool.builder.CleanupWorker.0: Exception cleaning up image a:
Traceback (most recent call last):
  File \"x.py\", line 2, in clean
kazoo.exceptions.NoNodeError
2026-12-07 10:00:02,000 ERROR nodepool.zk.ZooKeeper: Error loading json data from image build /nodepool/images/a/builds/c
Traceback (most recent call last):
  File \"x.py\", line 1, in get
json.decoder.JSONDecodeError: Expecting ',' delimiter: line 1 column 9 (char 8)
";
    let tbs = tracebacks(log);
    assert_eq!(tbs.len(), 3, "{tbs:?}");
    let causes: Vec<TracebackCause> = tbs.iter().map(classify_traceback).collect();
    assert_eq!(
        causes,
        [
            TracebackCause::Q6EmptyRecord,
            TracebackCause::Other,
            // Bad JSON that is not empty is a record someone wrote: not Q6.
            TracebackCause::Other,
        ]
    );
    assert_eq!(tbs[1].exception, "kazoo.exceptions.NoNodeError");
}

#[test]
fn nodepool11_retention_keeps_the_two_newest_builds_and_bridges_uploads() {
    let mut seen = Seen::default();
    let key = |b: &str| ("img".to_string(), b.to_string());
    for (b, t) in [("b1", 1.0), ("b2", 2.0), ("b3", 3.0), ("b4", 4.0)] {
        seen.ready_builds.insert(key(b), t);
    }
    let up = |b: &str, p: &str, u: &str| {
        (
            "img".to_string(),
            b.to_string(),
            p.to_string(),
            u.to_string(),
        )
    };
    // b1..b3 uploaded to both providers; b4 (newest) only to p0.
    for (b, t) in [("b1", 1.5), ("b2", 2.5), ("b3", 3.5)] {
        seen.ready_uploads.insert(up(b, "p0", "1"), t);
        seen.ready_uploads.insert(up(b, "p1", "1"), t);
    }
    seen.ready_uploads.insert(up("b4", "p0", "1"), 4.5);
    let r = nodepool11_retention(&seen, "img", &["p0", "p1"], &BTreeSet::new());
    // Kept: b4, b3; p1's two newest uploads are b3's and b2's, so b2 stays for it.
    assert_eq!(
        r.builds,
        ["b2", "b3", "b4"].iter().map(|s| s.to_string()).collect()
    );
    let ups: BTreeSet<(String, String, String)> =
        [("b2", "p1"), ("b3", "p0"), ("b3", "p1"), ("b4", "p0")]
            .iter()
            .map(|(b, p)| (b.to_string(), p.to_string(), "1".to_string()))
            .collect();
    assert_eq!(r.uploads, ups);
    // The operator deletes b4: b3 and b2 are the two newest, bridged uploads are theirs.
    let r = nodepool11_retention(&seen, "img", &["p0", "p1"], &["b4".to_string()].into());
    assert_eq!(
        r.builds,
        ["b2", "b3"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(r.uploads.len(), 4);
}
