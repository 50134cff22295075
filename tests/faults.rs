//! Fault injection against the real binary and real ZooKeeper servers, with the invariants of
//! `util::invariants` sampled during every scenario and checked in full at its end:
//!
//! 1. a three-member TLS ensemble loses its leader, then a follower, during builds and
//!    uploads (and gets them back), then its quorum for longer than the session timeout;
//! 2. the server is frozen beyond the session timeout during a build and during an upload;
//! 3. a builder is killed (with its children, as a service manager would) mid-build and
//!    mid-upload, and is restarted or replaced by a second builder;
//! 4. three builders share one ZooKeeper and one Glance, with 20 images, 100 manual requests
//!    in bursts, random pauses and the odd builder crash;
//!
//! and, aimed at one instant no scenario hits reliably, the reply to a `ready` write is lost
//! and the session with it although the write landed.
//!
//! Scale and randomness come from the environment: `NPB_FAULTS_SEED` (default
//! [`DEFAULT_SEED`]; `random` picks one) and `NPB_FAULTS_SCALE` (default 1: multiplies the
//! requests of scenario 4 and the fault rounds of scenario 1). Every scenario prints its seed
//! and one summary line. The long manual run is in README.md, "Reliability".

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use nodepool_builder::model::{BuildState, UploadState};
use nodepool_builder::zk::tree::{self, BuildInfo};
use nodepool_builder::zk::{Zk, paths};

use crate::util::builder::BuilderProcess;
use crate::util::ensemble::Ensemble;
use crate::util::glance::GlanceServer;
use crate::util::invariants::{Checker, Cloud, CloudSpec, Sampler};
use crate::util::site::{TestSite, WAIT};
use crate::util::zk::{ZkOptions, ZkServer};
use crate::util::zkproxy::{self, ZkProxy};
use crate::util::{file_tail, poll_for, wait_until};

/// The seed when `NPB_FAULTS_SEED` is unset.
const DEFAULT_SEED: u64 = 0x6e70_625f_6661_756c;

/// How long a scenario's final invariants may take to settle.
const SETTLE: Duration = Duration::from_secs(120);

/// The seed of this run: `NPB_FAULTS_SEED` (a number, or `random`), else [`DEFAULT_SEED`].
/// Printed at once, so a failing run's output says how to repeat it.
fn seed() -> u64 {
    let seed = seed_from_env();
    println!("faults: seed={seed} (repeat with NPB_FAULTS_SEED={seed})");
    seed
}

fn seed_from_env() -> u64 {
    match std::env::var("NPB_FAULTS_SEED").ok().as_deref() {
        None | Some("") => DEFAULT_SEED,
        Some("random") => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            t.as_nanos() as u64 ^ u64::from(std::process::id())
        }
        Some(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("NPB_FAULTS_SEED={s:?} is neither a number nor `random`")),
    }
}

/// `NPB_FAULTS_SCALE`, default 1.
fn scale() -> usize {
    std::env::var("NPB_FAULTS_SCALE")
        .ok()
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("NPB_FAULTS_SCALE={s:?} is not a number"))
        })
        .unwrap_or(1)
}

/// xorshift64*: small, seeded, reproducible; good enough to shape load.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn image(name: &str) -> String {
    format!("\n[[diskimages]]\nname = \"{name}\"\ndib-cmd = \"{{fake_dib}}\"\n")
}

fn summary(scenario: &str, seed: u64, faults: usize, checker: &Checker, extra: &str) {
    let (builds, failed) = checker.builds_seen();
    println!(
        "faults: scenario={scenario} seed={seed} faults_injected={faults} invariant_checks_passed={} builds_seen={builds} failed_builds_seen={failed} {extra}",
        checker.checks_passed()
    );
}

/// Every builder log's tail, for failure messages.
fn logs(site: &TestSite) -> String {
    (0..4)
        .map(|n| site.path(&format!("builder{n}.log")))
        .filter(|p| p.exists())
        .map(|p| format!("--- {} (tail) ---\n{}\n", p.display(), file_tail(&p, 60)))
        .collect()
}

/// Waits for `f` (which should treat ZooKeeper errors as "not yet"); on time-out panics with
/// the checker's dump and the builder logs.
#[track_caller]
fn wait_cond<T>(
    site: &TestSite,
    checker: &Checker,
    timeout: Duration,
    what: &str,
    f: impl FnMut() -> Option<T>,
) -> T {
    match poll_for(timeout, f) {
        Some(v) => v,
        None => panic!(
            "timed out after {timeout:?}: waiting for {what}\n{}\n{}",
            checker.dump(),
            logs(site)
        ),
    }
}

/// Every build of `image`, empty on a ZooKeeper error (a member may be down).
fn builds(zk: &Zk, image: &str) -> Vec<BuildInfo> {
    tree::read_image(zk, image).unwrap_or_default()
}

/// Kills builder `n` of `site` like [`kill_tree`] and tells the checker its builder id.
fn crash(site: &TestSite, checker: &Checker, n: usize, b: &mut BuilderProcess) -> usize {
    let killed = kill_tree(b);
    let id = std::fs::read_to_string(site.images_dir(n).join("builder_id.txt"))
        .expect("the builder's builder_id.txt");
    checker.builder_killed(id.trim());
    killed
}

/// Kills a builder the way a service manager stopping its control group does: the daemon
/// is stopped first (so it starts nothing new), then it and every descendant (DIB, upload
/// commands) get SIGKILL. Returns how many processes were killed.
fn kill_tree(b: &mut BuilderProcess) -> usize {
    let root = b.pid();
    let _ = kill(Pid::from_raw(root), Signal::SIGSTOP);
    let mut all = vec![root];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(children_of(parent));
        i += 1;
    }
    for pid in &all {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    b.wait_exit(WAIT);
    all.len()
}

/// Pids whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string))
                })
                .and_then(|ppid| ppid.parse::<i32>().ok())
                == Some(pid)
        })
        .collect()
}

/// A checker for a site on a single server.
fn checker_for(site: &TestSite, clouds: &[(&str, &[&str])], builders: &[usize]) -> Arc<Checker> {
    Checker::new(
        vec![("127.0.0.1".into(), site.server.plain_port())],
        &site.chroot,
        cloud_specs(site, clouds),
        builders.iter().map(|n| site.images_dir(*n)).collect(),
    )
}

/// Configs for `builders` of `site` with one image `fedora` on the directory cloud `cloud`
/// (`top` added to the top level), and their checker.
fn fedora_on_cloud(site: &TestSite, builders: &[usize], top: &str) -> Arc<Checker> {
    for n in builders {
        site.fedora_on_cloud(*n, &format!("cleanup-interval = 1.0\n{top}"));
    }
    checker_for(site, &[("cloud", &["fedora"])], builders)
}

fn cloud_specs(site: &TestSite, clouds: &[(&str, &[&str])]) -> Vec<CloudSpec> {
    clouds
        .iter()
        .map(|(name, images)| CloudSpec {
            name: name.to_string(),
            cloud: Cloud::Dir(site.cloud_dir(name)),
            images: images.iter().map(|s| s.to_string()).collect(),
        })
        .collect()
}

/// A site on an ensemble: the test's session and the builders' configs point at every
/// member; `builders` configs with `images` on one directory cloud, `top` added to each.
fn ensemble_site(
    ens: &Ensemble,
    name: &str,
    images: &[&str],
    builders: usize,
    top: &str,
) -> (TestSite, Arc<Checker>) {
    let chroot = ens.chroot(name);
    // The shared server only lends its certificates: the configs are pointed at the
    // ensemble below.
    let site = TestSite::with_session(name, ZkServer::shared(), chroot.clone(), ens.plain_hosts());
    let body = format!(
        "{}{}",
        images.iter().map(|n| image(n)).collect::<String>(),
        site.provider("cloud", "raw", images, "")
    );
    for n in 0..builders {
        let cfg = site.config(n, &format!("cleanup-interval = 1.0\n{top}"), &body);
        let text = std::fs::read_to_string(&cfg).unwrap();
        let start = text.find("[[zookeeper-servers]]").unwrap();
        let end = text.find("[zookeeper-tls]").unwrap();
        let text = format!(
            "{}{}{}",
            &text[..start],
            ens.servers_toml(&chroot),
            &text[end..]
        );
        std::fs::write(&cfg, text).unwrap();
    }
    let checker = Checker::new(
        ens.plain_hosts(),
        &chroot,
        cloud_specs(&site, &[("cloud", images)]),
        (0..builders).map(|n| site.images_dir(n)).collect(),
    );
    (site, checker)
}

// ---------------------------------------------------------------------------------------
// Scenario 3: builder crashes.

#[test]
fn builder_killed_mid_build_is_taken_over_by_a_second_builder() {
    let seed = seed();
    let site = TestSite::new("faults_crash_build");
    let checker = fedora_on_cloud(&site, &[0, 1], "");
    let sampler = Sampler::start(&checker);
    // The DIB writes its files, then sleeps: the files exist, the record says building.
    let slow = site.control(0, "fake-dib.slow", "60");
    let mut b0 = site.start(0, &[]);
    let doomed = site
        .wait_builds("fedora", BuildState::Building, 1)
        .remove(0)
        .id;
    let images0 = site.images_dir(0);
    site.wait("the slow DIB to write its files", || {
        images0
            .join(format!("fedora-{doomed}.raw"))
            .exists()
            .then_some(())
    });
    let killed = crash(&site, &checker, 0, &mut b0);
    assert!(
        killed >= 2,
        "the builder and its DIB were killed ({killed})"
    );
    // Another builder, with its own images dir, takes over once the dead session expires.
    let b1 = site.start(1, &[]);
    let (done, _) = site
        .wait_uploads("fedora", "cloud", UploadState::Ready, 1)
        .remove(0);
    assert_ne!(done, doomed, "the work was redone under a new build id");
    assert!(
        !site.local_files(1, "fedora", &done).is_empty(),
        "builder 1 built it"
    );
    site.wait("the orphaned building record to go", || {
        site.builds("fedora")
            .iter()
            .all(|b| b.id != doomed)
            .then_some(())
    });
    // Builder 0 comes back and removes the files of the build it never finished.
    std::fs::remove_file(slow).unwrap();
    let b0 = site.start(0, &[]);
    site.wait_gone(&images0.join(format!("fedora-{doomed}.raw")));
    checker.wait_final(SETTLE, 2, &|| logs(&site));
    sampler.stop();
    let all = site.builds("fedora");
    assert_eq!(
        all.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
        vec![done.as_str()],
        "the work was done once more, not twice"
    );
    assert_eq!(site.cloud_images("cloud").len(), 1);
    summary("crash-mid-build", seed, 1, &checker, "");
    drop((b0, b1));
}

#[test]
fn builder_killed_mid_upload_is_restarted_and_uploads_once() {
    let seed = seed();
    let site = TestSite::new("faults_crash_upload");
    let checker = fedora_on_cloud(&site, &[0], "");
    let sampler = Sampler::start(&checker);
    std::fs::create_dir_all(site.cloud_dir("cloud")).unwrap();
    let slow = site.cloud_dir("cloud").join("slow-upload");
    std::fs::write(&slow, "60").unwrap();
    let mut b0 = site.start(0, &[]);
    let (build, orphan) = site
        .wait_uploads("fedora", "cloud", UploadState::Uploading, 1)
        .remove(0);
    site.wait("the upload command to run", || {
        let mut all = vec![b0.pid()];
        let mut i = 0;
        while i < all.len() {
            let p = all[i];
            all.extend(children_of(p));
            i += 1;
        }
        all.iter()
            .any(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .unwrap_or_default()
                    .contains("dir-cloud")
            })
            .then_some(())
    });
    let killed = crash(&site, &checker, 0, &mut b0);
    assert!(
        killed >= 2,
        "the builder and its upload were killed ({killed})"
    );
    std::fs::remove_file(&slow).unwrap();
    let _b0 = site.start(0, &[]);
    let (again, up) = site
        .wait_uploads("fedora", "cloud", UploadState::Ready, 1)
        .remove(0);
    assert_eq!(
        again, build,
        "the build was kept; only the upload was redone"
    );
    assert_ne!(up.id, orphan.id, "under a new upload record");
    checker.wait_final(SETTLE, 1, &|| logs(&site));
    sampler.stop();
    assert_eq!(site.builds("fedora").len(), 1, "one build");
    assert_eq!(site.uploads("fedora").len(), 1, "one upload record");
    assert_eq!(site.cloud_images("cloud").len(), 1, "one cloud image");
    summary("crash-mid-upload", seed, 1, &checker, "");
}

// ---------------------------------------------------------------------------------------
// Scenario 2: session expiry.

#[test]
fn session_expiry_during_a_build_and_an_upload_redoes_the_work_once() {
    let seed = seed();
    // A dedicated server: this test freezes it. Leaked on purpose: it dies with the process.
    let server: &'static ZkServer = Box::leak(Box::new(ZkServer::start(ZkOptions::tls())));
    let site = TestSite::on("faults_session", server);
    let checker = fedora_on_cloud(&site, &[0], "zookeeper-timeout = 4.0");
    let sampler = Sampler::start(&checker);
    let zk_pid = Pid::from_raw(server.pid() as i32);
    let lost = |b: &BuilderProcess| b.log().matches("ZooKeeper session lost").count();
    let mut faults = 0;

    // During a build.
    let pause = site.control(0, "fake-dib.pause", "");
    let mut b = site.start(0, &[]);
    let first = site
        .wait_builds("fedora", BuildState::Building, 1)
        .remove(0)
        .id;
    kill(zk_pid, Signal::SIGSTOP).unwrap();
    faults += 1;
    wait_cond(
        &site,
        &checker,
        WAIT,
        "the builder to notice its session is lost",
        || (lost(&b) >= 1).then_some(()),
    );
    kill(zk_pid, Signal::SIGCONT).unwrap();
    std::fs::remove_file(&pause).unwrap();
    let (built, _) = wait_cond(
        &site,
        &checker,
        WAIT,
        "a ready upload after the build-time expiry",
        || {
            site.uploads_in("fedora", "cloud", UploadState::Ready)
                .into_iter()
                .next()
        },
    );
    assert_ne!(built, first, "the build was redone under a new id");

    // During an upload (of a manually requested build).
    let slow = site.cloud_dir("cloud").join("slow-upload");
    std::fs::write(&slow, "3").unwrap();
    checker.request_build("fedora");
    let (second, interrupted) = wait_cond(
        &site,
        &checker,
        WAIT,
        "the new build's upload to start",
        || {
            site.uploads_in("fedora", "cloud", UploadState::Uploading)
                .into_iter()
                .find(|(bid, _)| *bid != built)
        },
    );
    let before = lost(&b);
    kill(zk_pid, Signal::SIGSTOP).unwrap();
    faults += 1;
    wait_cond(
        &site,
        &checker,
        WAIT,
        "the builder to notice its session is lost again",
        || (lost(&b) > before).then_some(()),
    );
    kill(zk_pid, Signal::SIGCONT).unwrap();
    std::fs::remove_file(&slow).unwrap();
    b.wait_for_log(WAIT, "generation 3)");
    checker.wait_final(SETTLE, 1, &|| logs(&site));
    sampler.stop();
    let ready = site.builds_in("fedora", BuildState::Ready);
    assert!(
        ready.iter().any(|r| r.id == second),
        "the build whose upload was interrupted stays ready: {ready:?}"
    );
    for r in &ready {
        assert_eq!(
            r.uploads_to("cloud")
                .filter(|u| u.upload.state == UploadState::Ready)
                .count(),
            1,
            "one ready upload per build: {r:?}"
        );
    }
    // Either the builder could not record the upload and removed the image from the cloud
    // and uploaded again under a new record, or its write, queued before the freeze, reached
    // the thawed server before the old session (and the upload lock) expired. Both end with
    // the one ready upload checked above and no leak.
    let recorded_late = site
        .uploads_in("fedora", "cloud", UploadState::Ready)
        .iter()
        .any(|(bid, u)| *bid == second && u.id == interrupted.id);
    assert!(
        recorded_late || b.log().contains("cannot record the ready upload"),
        "the interrupted upload was neither recorded nor redone:\n{}",
        b.log()
    );
    let how = if recorded_late {
        "recorded_late"
    } else {
        "redone"
    };
    summary(
        "session-expiry",
        seed,
        faults,
        &checker,
        &format!("interrupted_upload={how}"),
    );
}

/// A site whose builder 0 (image `fedora` on the directory cloud `cloud`, `top` added to its
/// config) and whose test session talk to the dedicated `server`, which the test may kill and
/// restart (the site borrows only the shared server's certificates), and its checker.
fn site_on_dedicated(server: &ZkServer, name: &str, top: &str) -> (TestSite, Arc<Checker>) {
    let chroot = server.chroot(name);
    let hosts = vec![("127.0.0.1".to_string(), server.plain_port())];
    let site = TestSite::with_session(name, ZkServer::shared(), chroot.clone(), hosts.clone());
    let cfg = site.fedora_on_cloud(0, &format!("cleanup-interval = 1.0\n{top}"));
    let shared_port = format!("port = {}\n", ZkServer::shared().tls_port().unwrap());
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains(&shared_port), "{text}");
    let text = text.replace(
        &shared_port,
        &format!("port = {}\n", server.tls_port().unwrap()),
    );
    std::fs::write(&cfg, text).unwrap();
    let checker = Checker::new(
        hosts,
        &chroot,
        cloud_specs(&site, &[("cloud", &["fedora"])]),
        vec![site.images_dir(0)],
    );
    (site, checker)
}

/// The id of the first ZooKeeper session in a builder's log (`Connected to zookeeper … (session
/// 0x…, …`).
fn first_session_id(b: &BuilderProcess) -> String {
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains("Connected to zookeeper"))
        .unwrap_or_else(|| panic!("no session in the log:\n{log}"));
    let start = line.find("(session ").expect("session id in the line") + "(session ".len();
    line[start..].split(',').next().unwrap().to_string()
}

/// Regression (issue 14, item 4): the builder gave its session up 7/10 of the session timeout
/// after the connection dropped, although a standalone server restarted from its data
/// directory restores its sessions: the running build was then abandoned and done again.
/// Now the session is kept until the server says it expired (or twice the negotiated timeout
/// has passed without reaching it): the same session resumes, the build that ran through the
/// restart is recorded `ready` once, and no second build starts.
#[test]
fn a_server_restart_within_the_session_timeout_resumes_the_session_and_its_build() {
    let seed = seed();
    // tickTime 500 ms: the server grants sessions of up to 10 s.
    let mut server = ZkServer::start(ZkOptions::tls());
    let timeout = Duration::from_secs(10);
    let (site, checker) =
        site_on_dedicated(&server, "faults_restart_short", "zookeeper-timeout = 10.0");
    let sampler = Sampler::start(&checker);
    let pause = site.control(0, "fake-dib.pause", "");
    let mut b = site.start(0, &[]);
    let building = site
        .wait_builds("fedora", BuildState::Building, 1)
        .remove(0)
        .id;
    let session = first_session_id(&b);

    server.kill();
    let killed = Instant::now();
    b.wait_for_log(WAIT, "ZooKeeper connection suspended");
    // The server stays away for 3/4 of the session timeout, plus its JVM's start-up.
    wait_until(
        timeout,
        "three quarters of the session timeout without a server",
        || killed.elapsed() >= timeout.mul_f64(0.75),
    );
    server.restart();
    let outage = killed.elapsed();
    b.wait_for_log(WAIT, &format!("ZooKeeper session {session} resumed"));
    std::fs::remove_file(&pause).unwrap();
    let (built, _) = wait_cond(
        &site,
        &checker,
        WAIT,
        "a ready upload after the restart",
        || {
            site.uploads_in("fedora", "cloud", UploadState::Ready)
                .into_iter()
                .next()
        },
    );
    checker.wait_final(SETTLE, 1, &|| logs(&site));
    sampler.stop();
    let log = b.log();
    assert!(
        !log.contains("ZooKeeper session lost"),
        "the session was given up although the server kept it (outage {outage:?}):\n{log}"
    );
    assert_eq!(
        log.matches("Connected to zookeeper").count(),
        1,
        "one ZooKeeper session for the whole test:\n{log}"
    );
    assert_eq!(built, building, "the build that ran through the restart");
    let builds = site.builds("fedora");
    assert_eq!(builds.len(), 1, "recorded once: {builds:?}");
    assert_eq!(builds[0].build.state, BuildState::Ready, "{builds:?}");
    assert_eq!(
        log.matches("Building image fedora").count(),
        1,
        "no second build:\n{log}"
    );
    summary(
        "restart-within-timeout",
        seed,
        1,
        &checker,
        &format!("outage_ms={}", outage.as_millis()),
    );
}

/// An upload that ends while the server is down waits for the session's fate: the server
/// comes back (after zookeeper-client's own expiry, so through the facade's re-attach) with
/// the session and its upload lock, and the upload is recorded `ready` under its own record,
/// not fenced off, deleted from the cloud and done again.
#[test]
fn an_upload_ending_during_a_server_restart_is_recorded_once_the_session_resumes() {
    let seed = seed();
    let mut server = ZkServer::start(ZkOptions::tls());
    let (site, checker) =
        site_on_dedicated(&server, "faults_restart_upload", "zookeeper-timeout = 10.0");
    let sampler = Sampler::start(&checker);
    std::fs::create_dir_all(site.cloud_dir("cloud")).unwrap();
    std::fs::write(site.cloud_dir("cloud").join("slow-upload"), "3").unwrap();
    let mut b = site.start(0, &[]);
    let (build, uploading) = site
        .wait_uploads("fedora", "cloud", UploadState::Uploading, 1)
        .remove(0);
    let session = first_session_id(&b);
    server.kill();
    // Re-attach attempts are logged (at DEBUG) once the client has expired the session on its
    // own, 14 s after its last receive; the upload has ended by then.
    b.wait_for_log(WAIT, "re-attaching to session");
    server.restart();
    b.wait_for_log(WAIT, &format!("ZooKeeper session {session} resumed"));
    let (ready_build, ready) = wait_cond(&site, &checker, WAIT, "the ready upload", || {
        site.uploads_in("fedora", "cloud", UploadState::Ready)
            .into_iter()
            .next()
    });
    checker.wait_final(SETTLE, 1, &|| logs(&site));
    sampler.stop();
    let log = b.log();
    assert!(
        log.contains("waiting for ZooKeeper to record the upload"),
        "the upload ended while suspended:\n{log}"
    );
    assert_eq!(
        (ready_build.as_str(), ready.id.as_str()),
        (build.as_str(), uploading.id.as_str()),
        "the upload was recorded under its own record"
    );
    assert!(!log.contains("cannot record the ready upload"), "{log}");
    assert_eq!(site.uploads("fedora").len(), 1, "one upload record");
    assert_eq!(site.cloud_images("cloud").len(), 1, "one cloud image");
    summary("restart-during-upload", seed, 1, &checker, "");
}

/// A restart that takes longer than the session may wait (twice the negotiated timeout):
/// the session is given up, the build is abandoned (recorded `failed` once it ends) and done
/// once more, after the old session the restarted server restored has expired with its lock.
#[test]
fn a_server_restart_beyond_the_session_timeout_redoes_the_build_once() {
    let seed = seed();
    let mut server = ZkServer::start(ZkOptions::tls());
    let (site, checker) =
        site_on_dedicated(&server, "faults_restart_long", "zookeeper-timeout = 4.0");
    let sampler = Sampler::start(&checker);
    let pause = site.control(0, "fake-dib.pause", "");
    let mut b = site.start(0, &[]);
    let abandoned = site
        .wait_builds("fedora", BuildState::Building, 1)
        .remove(0)
        .id;
    server.kill();
    b.wait_for_log(WAIT, "ZooKeeper session lost");
    server.restart();
    b.wait_for_log(WAIT, "generation 2)");
    std::fs::remove_file(&pause).unwrap();
    let (built, _) = wait_cond(
        &site,
        &checker,
        WAIT,
        "a ready upload of the redone build",
        || {
            site.uploads_in("fedora", "cloud", UploadState::Ready)
                .into_iter()
                .next()
        },
    );
    assert_ne!(built, abandoned, "the build was redone under a new id");
    checker.wait_final(SETTLE, 1, &|| logs(&site));
    sampler.stop();
    let log = b.log();
    assert!(
        log.contains("ZooKeeper lost while building fedora"),
        "the abandoned build was recorded failed:\n{log}"
    );
    assert_eq!(
        log.matches("Building image fedora").count(),
        2,
        "built twice, not more:\n{log}"
    );
    let builds = site.builds("fedora");
    assert_eq!(
        builds.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
        vec![built.as_str()],
        "only the redone build is left"
    );
    summary("restart-beyond-timeout", seed, 1, &checker, "");
}

/// A site whose builder 0 (one image on the directory cloud) talks plaintext to ZooKeeper
/// through a proxy that can lose chosen replies.
fn fedora_behind_a_proxy(name: &str) -> (TestSite, ZkProxy, Arc<Checker>) {
    let site = TestSite::new(name);
    let proxy = ZkProxy::start(site.server.plain_port());
    let checker = fedora_on_cloud(&site, &[0], "");
    site.zookeeper_through(0, proxy.port());
    (site, proxy, checker)
}

/// A builder on `site` (one image on the directory cloud) that talks plaintext to ZooKeeper
/// through a proxy; the proxy loses the reply to the first `ready` write under `path_part`
/// and stays down until the builder has given its session up, and at least `down_for` after
/// the cut. The write landed, the builder cannot know; deleting the files or the image now
/// would leave a `ready` record naming something gone, however long ZooKeeper stays away.
/// The builder must log `settled` when it finds its write landed; then the final
/// invariants must hold with the one build (its files kept) and its one upload.
fn lose_the_reply_to_a_ready_write(name: &str, path_part: &str, settled: &str, down_for: Duration) {
    let (site, proxy, checker) = fedora_behind_a_proxy(name);
    let sampler = Sampler::start(&checker);
    proxy.cut_reply_then_go_down(zkproxy::SET_DATA, path_part);
    let mut b = site.start(0, &[]);
    wait_until(WAIT, "the reply to the ready write to be lost", || {
        proxy.cuts() == 1
    });
    let cut = std::time::Instant::now();
    b.wait_for_log(WAIT, "ZooKeeper session lost");
    // The fault's duration, not a synchronisation: ZooKeeper stays away this long.
    std::thread::sleep(down_for.saturating_sub(cut.elapsed()));
    // The cut write is the upload's (its image is in the cloud) or the build's (no upload yet).
    let cut_an_upload = path_part.contains("/providers/");
    assert_eq!(
        site.cloud_images("cloud").len(),
        usize::from(cut_an_upload),
        "the cloud image is kept while ZooKeeper is away"
    );
    assert!(
        !nodepool_builder::local::builds_present(&site.images_dir(0))
            .unwrap()
            .is_empty(),
        "the local files are kept while ZooKeeper is away"
    );
    assert_eq!(proxy.cuts(), 1, "the ready write's reply was lost");
    proxy.set_down(false);
    b.wait_for_log(WAIT, settled);
    checker.wait_final(SETTLE, 1, &|| logs(&site));
    sampler.stop();
    let builds = site.builds("fedora");
    assert_eq!(builds.len(), 1, "one build: {builds:?}");
    assert!(
        !site.local_files(0, "fedora", &builds[0].id).is_empty(),
        "the ready build keeps its files"
    );
    let uploads = site.uploads("fedora");
    assert_eq!(uploads.len(), 1, "one upload, nothing redone: {uploads:?}");
    assert_eq!(site.cloud_images("cloud").len(), 1, "one image");
    let log = b.log();
    for wrong in [
        "cannot record the ready upload",
        "cannot record the build result",
    ] {
        assert!(!log.contains(wrong), "{log}");
    }
    summary(name, seed(), 1, &checker, "");
}

#[test]
fn a_ready_upload_write_that_landed_although_the_session_was_lost_keeps_its_image() {
    lose_the_reply_to_a_ready_write(
        "lost-upload-reply",
        "/providers/cloud/images/0",
        "its record was written although the reply was lost",
        Duration::ZERO,
    );
}

#[test]
fn a_ready_build_write_that_landed_although_the_session_was_lost_keeps_its_files() {
    lose_the_reply_to_a_ready_write(
        "lost-build-reply",
        "/nodepool/images/fedora/builds/",
        "the ready record was written although the reply was lost",
        Duration::ZERO,
    );
}

/// ZooKeeper away for 22 s after the reply to the `ready` upload write was lost: longer than
/// the write's retries (one session timeout, 6 s in the test configs) and twice the timeout
/// after them, which is when a settle used to give up and delete. The cloud image stays until
/// ZooKeeper can say whether the write landed (it did).
#[test]
fn a_ready_upload_write_unanswered_for_longer_than_twice_the_timeout_deletes_nothing() {
    lose_the_reply_to_a_ready_write(
        "long-lost-upload-reply",
        "/providers/cloud/images/0",
        "its record was written although the reply was lost",
        Duration::from_secs(22),
    );
}

/// The same for the `ready` build write: the local files stay.
#[test]
fn a_ready_build_write_unanswered_for_longer_than_twice_the_timeout_deletes_nothing() {
    lose_the_reply_to_a_ready_write(
        "long-lost-build-reply",
        "/nodepool/images/fedora/builds/",
        "the ready record was written although the reply was lost",
        Duration::from_secs(22),
    );
}

/// A stop while the builder waits to learn whether its `ready` build write landed (the reply
/// lost, ZooKeeper away): it must not wait for ZooKeeper, and it deletes nothing.
#[test]
fn a_stop_while_a_lost_ready_write_is_unsettled_exits_and_keeps_the_files() {
    let (site, proxy, _checker) = fedora_behind_a_proxy("stop-while-settling");
    proxy.cut_reply_then_go_down(zkproxy::SET_DATA, "/nodepool/images/fedora/builds/");
    let mut b = site.start(0, &[]);
    b.wait_for_log(WAIT, "waiting to learn whether the result write landed");
    b.signal(Signal::SIGTERM);
    let status = b.wait_exit(Duration::from_secs(25));
    assert!(status.success(), "{status:?}\n{}", b.log());
    assert!(
        !nodepool_builder::local::builds_present(&site.images_dir(0))
            .unwrap()
            .is_empty(),
        "the build's files are kept: its ready record may have landed"
    );
    assert!(
        b.log()
            .contains("stopping before ZooKeeper could say whether the result write landed"),
        "{}",
        b.log()
    );
    proxy.set_down(false);
}

/// Regression: a build whose result could not be recorded (no quorum for longer than the
/// write retries) left its record `building`, and the janitor removed such an orphan only
/// once the image build lock was free. After a quorum loss the old session (and its lock)
/// outlives the builder's interest in it by a session timeout, and a rebuild taking the lock
/// right when it expired ran beside the stale `building` record until it finished (seen by
/// the ensemble scenario). The builder now records a build it abandoned as `failed` at once,
/// whoever holds the lock, and the janitor deletes it like any failed build.
#[test]
fn a_build_abandoned_without_quorum_is_removed_while_the_old_lock_lingers() {
    let seed = seed();
    let mut ens = Ensemble::start("faults_abandoned", 500);
    let (site, checker) = ensemble_site(
        &ens,
        "faults_abandoned",
        &["fedora"],
        1,
        "zookeeper-timeout = 10.0",
    );
    let sampler = Sampler::start(&checker);
    let pause = site.control(0, "fake-dib.pause", "");
    let mut b = site.start(0, &[]);
    let zk = checker.zk();
    let abandoned = wait_cond(&site, &checker, WAIT, "the first build", || {
        builds(zk, "fedora")
            .into_iter()
            .find(|x| x.build.state == BuildState::Building)
    })
    .id;
    let leader = ens.leader();
    let follower = *ens.running().iter().find(|&&m| m != leader).unwrap();
    ens.kill(leader);
    ens.kill(follower);
    b.wait_for_log(WAIT, "ZooKeeper session lost");
    // The DIB finishes while there is no quorum: the result cannot be recorded.
    std::fs::remove_file(&pause).unwrap();
    b.wait_for_log(WAIT, "cannot record the build result");
    ens.restart(leader);
    ens.restart(follower);
    // The old session is alive again for up to a session timeout, holding the image build
    // lock; the builder has a new one. The abandoned record must go meanwhile.
    let lock = paths::image_build_lock_path("fedora");
    wait_cond(
        &site,
        &checker,
        WAIT,
        "the abandoned building record to go",
        || {
            zk.exists(&paths::image_build_path("fedora", &abandoned))
                .ok()?
                .is_none()
                .then_some(())
        },
    );
    let held = nodepool_builder::zk::lock::is_locked(zk, &lock).unwrap();
    let rebuilt = builds(zk, "fedora").iter().any(|x| x.id != abandoned);
    assert!(
        held && !rebuilt,
        "the abandoned record went only after the old session's lock (held={held}, rebuilt={rebuilt})\n{}",
        logs(&site)
    );
    checker.wait_final(SETTLE, 1, &|| {
        format!("{}{}", logs(&site), ens.log_tails(20))
    });
    sampler.stop();
    summary("abandoned-build", seed, 2, &checker, "");
}

// ---------------------------------------------------------------------------------------
// Scenario 4: several builders, many images, bursts of requests, random pauses.

#[test]
fn three_builders_serve_bursts_of_requests_with_random_pauses() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let requests = 100 * scale();
    let site = TestSite::new("faults_many");
    let names: Vec<String> = (0..20).map(|i| format!("img{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    // One real Glance through the OpenStack driver. It is shared by this process's tests,
    // so the provider has a name of its own (its images are those tagged with it).
    let glance = GlanceServer::shared();
    let provider = "faults-many";
    let clouds = site.glance_clouds(glance, &[("glance", Some("raw"))]);
    let env = [("OS_CLIENT_CONFIG_FILE", clouds.as_str())];
    let body = format!(
        "{}{}",
        names.iter().map(|n| image(n)).collect::<String>(),
        TestSite::openstack_provider(provider, "glance", &refs, "")
    );
    for n in 0..3 {
        site.config(n, "cleanup-interval = 2.0", &body);
        // Builds take a moment, so requests and pauses land while others build.
        site.control(n, "fake-dib.slow", "0.5");
    }
    let checker = Checker::new(
        vec![("127.0.0.1".into(), site.server.plain_port())],
        &site.chroot,
        vec![CloudSpec {
            name: provider.to_string(),
            cloud: Cloud::Glance(glance),
            images: names.clone(),
        }],
        (0..3).map(|n| site.images_dir(n)).collect(),
    );
    let sampler = Sampler::start(&checker);
    let mut builders: Vec<BuilderProcess> =
        (0..3).map(|n| site.start_with_env(n, &[], &env)).collect();
    let mut paused = std::collections::BTreeSet::new();
    let (mut sent, mut pauses, mut bursts, mut crashes) = (0, 0, 0, 0);
    // Cloud images without a record the janitors found and deleted (a builder's log starts
    // afresh when it is restarted, so its count is taken before each kill).
    let leaks_deleted_by = |b: &BuilderProcess| b.log().matches("Deleting leaked image").count();
    let mut leaks_deleted = 0;
    while sent < requests {
        let burst = (5 + rng.below(11)).min(requests - sent);
        bursts += 1;
        for _ in 0..burst {
            checker.request_build(&names[rng.below(names.len())]);
        }
        sent += burst;
        if rng.below(2) == 0 {
            let victim = &names[rng.below(names.len())];
            if paused.remove(victim) {
                site.unpause(victim);
            } else {
                site.pause(victim);
                paused.insert(victim.clone());
            }
            pauses += 1;
        }
        if rng.below(6) == 0 {
            // A builder crashes (with whatever DIB or upload it runs) and is restarted.
            let n = rng.below(builders.len());
            leaks_deleted += leaks_deleted_by(&builders[n]);
            crash(&site, &checker, n, &mut builders[n]);
            builders[n] = site.start_with_env(n, &[], &env);
            crashes += 1;
        }
        // Load shape: space the bursts out.
        std::thread::sleep(Duration::from_millis(rng.below(1500) as u64));
    }
    for victim in std::mem::take(&mut paused) {
        site.unpause(&victim);
    }
    checker.wait_final(SETTLE * scale() as u32, 3, &|| logs(&site));
    sampler.stop();
    summary(
        "three-builders",
        seed,
        pauses + crashes,
        &checker,
        &format!(
            "requests={sent} (distinct {}) bursts={bursts} pause_toggles={pauses} builder_crashes={crashes} leaked_cloud_images_deleted={}",
            checker.requests_made(),
            leaks_deleted + builders.iter().map(leaks_deleted_by).sum::<usize>()
        ),
    );
    drop(builders);
}

// ---------------------------------------------------------------------------------------
// Scenario 1: a ZooKeeper ensemble loses members.

#[test]
fn ensemble_loses_its_leader_then_a_follower_during_builds_and_uploads() {
    let seed = seed();
    let mut ens = Ensemble::start("faults_ensemble", 500);
    let names = ["e1", "e2", "e3"];
    let (site, checker) = ensemble_site(&ens, "faults_ensemble", &names, 2, "");
    for n in 0..2 {
        // Builds and uploads last long enough to lose a member in the middle of them.
        site.control(n, "fake-dib.slow", "2");
    }
    std::fs::create_dir_all(site.cloud_dir("cloud")).unwrap();
    std::fs::write(site.cloud_dir("cloud").join("slow-upload"), "2").unwrap();
    let sampler = Sampler::start(&checker);
    let builders: Vec<BuilderProcess> = (0..2).map(|n| site.start(n, &[])).collect();
    let zk = checker.zk();
    let ready_everywhere = || {
        names.iter().all(|n| {
            let b = builds(zk, n);
            tree::newest_ready(&b).is_some_and(|r| r.has_ready_upload("cloud"))
                && b.iter().all(|x| x.build.state != BuildState::Building)
        })
    };
    wait_cond(
        &site,
        &checker,
        SETTLE,
        "the first builds and uploads",
        || ready_everywhere().then_some(()),
    );
    let mut faults = 0;
    for round in 0..(2 * scale()) {
        for (phase, victim_is_leader) in [
            ("building", true),
            ("uploading", true),
            ("building", false),
            ("uploading", false),
        ] {
            for n in names {
                checker.request_build(n);
            }
            wait_cond(
                &site,
                &checker,
                WAIT,
                &format!("some image {phase}"),
                || {
                    names
                        .iter()
                        .any(|n| {
                            let b = builds(zk, n);
                            if phase == "building" {
                                b.iter().any(|x| x.build.state == BuildState::Building)
                            } else {
                                b.iter().any(|x| {
                                    x.uploads
                                        .iter()
                                        .any(|u| u.upload.state == UploadState::Uploading)
                                })
                            }
                        })
                        .then_some(())
                },
            );
            let leader = ens.leader();
            let victim = if victim_is_leader {
                leader
            } else {
                *ens.running().iter().find(|&&m| m != leader).unwrap()
            };
            ens.kill(victim);
            faults += 1;
            eprintln!(
                "faults: round {round}: killed {} {victim} while {phase}",
                if victim_is_leader {
                    "leader"
                } else {
                    "follower"
                }
            );
            // The majority carries on: every request is served while the member is down.
            wait_cond(
                &site,
                &checker,
                SETTLE,
                "the requests to be served by the majority",
                || {
                    names
                        .iter()
                        .all(|n| {
                            zk.exists(&paths::image_build_request_path(n))
                                .is_ok_and(|s| s.is_none())
                        })
                        .then_some(())
                },
            );
            ens.restart(victim);
        }
    }
    // Quorum lost (two of three down) for longer than the session timeout in mid-build:
    // the builders' sessions are gone; once the quorum is back the work is redone once.
    for n in names {
        checker.request_build(n);
    }
    wait_cond(&site, &checker, WAIT, "some image building", || {
        names
            .iter()
            .any(|n| {
                builds(zk, n)
                    .iter()
                    .any(|x| x.build.state == BuildState::Building)
            })
            .then_some(())
    });
    let leader = ens.leader();
    let follower = *ens.running().iter().find(|&&m| m != leader).unwrap();
    ens.kill(leader);
    ens.kill(follower);
    faults += 1;
    eprintln!("faults: killed leader {leader} and follower {follower}: no quorum");
    // Load shape: stay without quorum beyond the builders' 6 s session timeout.
    std::thread::sleep(Duration::from_secs(9));
    ens.restart(leader);
    ens.restart(follower);
    wait_cond(
        &site,
        &checker,
        SETTLE,
        "every image ready and uploaded",
        || ready_everywhere().then_some(()),
    );
    checker.wait_final(SETTLE, 2, &|| {
        format!("{}{}", logs(&site), ens.log_tails(20))
    });
    sampler.stop();
    summary("ensemble", seed, faults, &checker, "");
    drop(builders);
}

// ---------------------------------------------------------------------------------------
// The checker itself: it must see what it is meant to catch.

#[test]
fn the_invariant_checker_reports_every_planted_violation() {
    use nodepool_builder::zk::Mode;
    use nodepool_builder::zk::schema::ImageBuild;
    let site = TestSite::new("faults_checker");
    let checker = checker_for(&site, &[("cloud", &["x"])], &[0]);
    let building = ImageBuild {
        state: BuildState::Building,
        state_time: 1.0,
        builder: Some("elsewhere".into()),
        builder_id: Some("b".into()),
        formats: vec!["raw".into()],
        username: None,
        python_path: None,
        shell_type: None,
    }
    .to_json();
    let (a, b) = ("a".repeat(32), "b".repeat(32));
    for id in [&a, &b] {
        site.zk
            .create_with_parents(
                &paths::image_build_path("x", id),
                &building,
                Mode::Persistent,
            )
            .unwrap();
    }
    site.zk
        .create_with_parents(
            &format!(
                "{}/0000__lock__0000000001",
                paths::image_build_lock_path("x")
            ),
            b"",
            Mode::Persistent,
        )
        .unwrap();
    site.zk
        .create_with_parents(
            &paths::image_upload_path("x", &a, "cloud", "0000000001"),
            b"",
            Mode::Persistent,
        )
        .unwrap();
    let ready_upload = nodepool_builder::zk::schema::ImageUpload {
        state: UploadState::Ready,
        state_time: 1.0,
        external_id: Some("gone-image".into()),
        external_name: Some("x-1".into()),
        format: Some("raw".into()),
        username: None,
        python_path: None,
        shell_type: None,
    };
    site.zk
        .create_with_parents(
            &paths::image_upload_path("x", &b, "cloud", "0000000001"),
            &ready_upload.to_json(),
            Mode::Persistent,
        )
        .unwrap();
    std::fs::create_dir_all(site.cloud_dir("cloud").join("stray")).unwrap();
    let stray = format!("x-{}.raw", "c".repeat(32));
    std::fs::write(site.images_dir(0).join(&stray), "").unwrap();
    checker.request_build("x");

    let continuous = checker.continuous().unwrap();
    let found = checker.final_violations(0).unwrap();
    let text = found.join("\n");
    for want in [
        "image x has 2 building records at once",
        "lock contender /nodepool/images/x/builds/lock/0000__lock__0000000001 is not ephemeral",
        "is left behind (owner 0x0: no running builder's session)",
        &format!(
            "image x: ready upload {b}-cloud/0000000001 names cloud image gone-image, which cloud does not have"
        ),
        &format!(
            "empty upload znode {}",
            paths::image_upload_path("x", &a, "cloud", "0000000001")
        ),
        "cloud cloud: image stray has no upload record",
        &format!("local files of x-{} have no build record", "c".repeat(32)),
        "image x: no ready build",
        "image x: request-build still pending",
        &format!("image x: build {a} is still building"),
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert_eq!(continuous.len(), 2, "{continuous:?}");
    checker.sample();
    let recorded = checker.recorded_violations();
    assert_eq!(recorded.len(), 2, "a sample records both: {recorded:?}");
    assert!(
        recorded
            .iter()
            .all(|v| v.contains("/nodepool/images/x/builds/")),
        "each with the tree: {recorded:?}"
    );
}
