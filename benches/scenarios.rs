//! Measured scenarios, each run for this builder and then for nodepool-builder 11.0.0 (Python,
//! [`crate::util::upstream`]) on the same real ZooKeeper (one TLS server for the whole run, one chroot
//! per builder and scenario, one builder alive at a time) and the same real Glance, with the
//! same test image builder script and equivalent configs. Shared by the bench binary
//! (`cargo bench --bench builder`, full sizes) and by a smoke test in the test suite (one
//! small iteration each, so the harness cannot rot). The janitor and scale scenarios measure
//! this builder only.
//!
//! Each scenario returns figures; nothing here asserts a target — the README compares. The
//! scale scenario freezes the benchmark's server (SIGSTOP) to end the builder's session, so
//! nothing else may use that server while it runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nodepool_builder::config;
use nodepool_builder::model::{BuildState, UploadState};
use nodepool_builder::zk::schema::{ImageBuild, ImageUpload};
use nodepool_builder::zk::{Mode, Zk, ZkConfig, paths};

use crate::util::site::TestSite;
use crate::util::zk::{ZkOptions, ZkServer};
use crate::util::{cpu_secs, poll_for};

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// MiB of the image uploaded to Glance by both this builder and openstacksdk.
    pub upload_mib: u64,
    /// Manual requests timed for the latency scenario (per builder).
    pub requests: usize,
    /// Seconds each idle window lasts.
    pub idle_secs: u64,
    /// Builds in the large cleanup tree (uploads = 10 × builds).
    pub cleanup_builds: usize,
    /// Diskimages × providers of the large steady state.
    pub big: (usize, usize),
    /// Diskimages × command-driver directory-cloud providers of the scale scenario.
    pub scale: (usize, usize),
}

impl Sizes {
    #[allow(dead_code)] // Used by the bench binary, not by the smoke test.
    pub const FULL: Sizes = Sizes {
        upload_mib: 1024,
        requests: 10,
        idle_secs: 60,
        cleanup_builds: 1000,
        big: (20, 3),
        scale: (30, 15),
    };
    pub const QUICK: Sizes = Sizes {
        upload_mib: 16,
        requests: 2,
        idle_secs: 5,
        cleanup_builds: 40,
        big: (4, 2),
        scale: (4, 3),
    };
}

/// Which builder a figure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// This builder (the Rust binary under test).
    Ours,
    /// nodepool-builder 11.0.0 from PyPI.
    Upstream,
}

impl Subject {
    pub const BOTH: [Subject; 2] = [Subject::Ours, Subject::Upstream];

    fn tag(self) -> &'static str {
        match self {
            Subject::Ours => "ours",
            Subject::Upstream => "nodepool11",
        }
    }
}

/// Which way is better for a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
}

/// One measured row: this builder's figure and, where there is one, the reference's
/// (nodepool-builder 11, or openstacksdk for the upload rows).
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub unit: &'static str,
    pub better: Better,
    pub ours: f64,
    pub reference: Option<f64>,
}

impl Figure {
    /// How many times better this builder is (reference / ours for lower-is-better figures,
    /// ours / reference otherwise); `None` without a reference.
    pub fn ratio(&self) -> Option<f64> {
        let r = self.reference?;
        Some(match self.better {
            Better::Lower => r / self.ours,
            Better::Higher => self.ours / r,
        })
    }
}

/// Figures of one scenario, keyed by name, filled in per subject.
#[derive(Default)]
struct Pairs {
    rows: Vec<Figure>,
}

impl Pairs {
    fn put(
        &mut self,
        subject: Subject,
        name: &str,
        value: f64,
        unit: &'static str,
        better: Better,
    ) {
        let row = match self.rows.iter_mut().position(|f| f.name == name) {
            Some(i) => &mut self.rows[i],
            None => {
                self.rows.push(Figure {
                    name: name.to_string(),
                    unit,
                    better,
                    ours: f64::NAN,
                    reference: None,
                });
                self.rows.last_mut().unwrap()
            }
        };
        match subject {
            Subject::Ours => row.ours = value,
            Subject::Upstream => row.reference = Some(value),
        }
    }
}

/// The one TLS ZooKeeper server of a benchmark run (not the test suite's shared server, so
/// `mntr` counts only the builder being measured). Every scenario runs on it, one builder at a
/// time, each in its own chroot.
fn bench_server() -> &'static ZkServer {
    static SERVER: std::sync::OnceLock<ZkServer> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| {
        ZkServer::start(ZkOptions {
            tls: true,
            tick_time_ms: 2000,
        })
    })
}

/// Writes the clouds.yaml both builders read (through `OS_CLIENT_CONFIG_FILE`): one cloud,
/// `bench`, that is the shared real Glance without Keystone.
fn write_clouds(site: &TestSite) -> PathBuf {
    let glance = crate::util::glance::GlanceServer::shared();
    let path = site.path("clouds.yaml");
    let clouds = format!(
        "clouds:\n  bench:\n    auth_type: none\n    image_endpoint_override: {}\n",
        glance.url()
    );
    std::fs::write(&path, clouds).unwrap();
    path
}

/// `images` diskimages `img00..`, each uploaded to `providers` OpenStack providers `p0..` of
/// the `bench` cloud, as this builder's TOML.
fn images_and_providers(images: usize, providers: usize) -> String {
    let names: Vec<String> = (0..images).map(|i| format!("img{i:02}")).collect();
    let mut body: String = names
        .iter()
        .map(|n| format!("\n[[diskimages]]\nname = \"{n}\"\ndib-cmd = \"{{fake_dib}}\"\n"))
        .collect();
    for p in 0..providers {
        body.push_str(&format!(
            "\n[[providers]]\nname = \"p{p}\"\ncloud = \"bench\"\nrate = 0.001\n"
        ));
        for n in &names {
            body.push_str(&format!("[[providers.diskimages]]\nname = \"{n}\"\n"));
        }
    }
    body
}

/// Build and upload workers of both builders: the defaults of both (`--build-workers 1`,
/// `--upload-workers 4`), i.e. what an operator runs.
const DEFAULT_WORKERS: (usize, usize) = (1, 4);

/// A running builder of either kind.
enum Daemon {
    Ours(crate::util::builder::BuilderProcess),
    Upstream(crate::util::upstream::UpstreamBuilder),
}

impl Daemon {
    fn pid(&self) -> i32 {
        match self {
            Daemon::Ours(b) => b.pid(),
            Daemon::Upstream(b) => b.pid(),
        }
    }

    fn log_tail(&self) -> String {
        match self {
            Daemon::Ours(b) => b.log(),
            Daemon::Upstream(b) => b.log_tail(),
        }
    }
}

/// A new site (chroot and directories) on the benchmark server with `images` × `providers`
/// configured for `subject`, and that builder started with the same worker counts for both.
fn start_subject(
    subject: Subject,
    scenario: &str,
    images: usize,
    providers: usize,
    workers: (usize, usize),
) -> (TestSite, Daemon) {
    let site = TestSite::on(&format!("{scenario}_{}", subject.tag()), bench_server());
    let clouds = write_clouds(&site);
    let (builds, uploads) = (workers.0.to_string(), workers.1.to_string());
    let daemon = match subject {
        Subject::Ours => {
            site.config(
                0,
                "cleanup-interval = 60.0\nresync-interval = 300.0\nzookeeper-timeout = 10.0",
                &images_and_providers(images, providers),
            );
            Daemon::Ours(site.start_with_env(
                0,
                &["--build-workers", &builds, "--upload-workers", &uploads],
                &[("OS_CLIENT_CONFIG_FILE", clouds.to_str().unwrap())],
            ))
        }
        Subject::Upstream => {
            crate::util::upstream::write_config(&site, images, providers);
            Daemon::Upstream(crate::util::upstream::UpstreamBuilder::start(
                &site, workers.0, workers.1,
            ))
        }
    };
    (site, daemon)
}

fn ready_uploads(site: &TestSite, images: usize) -> usize {
    (0..images)
        .map(|i| {
            site.uploads(&format!("img{i:02}"))
                .iter()
                .filter(|(_, u)| u.upload.state == UploadState::Ready)
                .count()
        })
        .sum()
}

fn wait_all_uploaded(
    site: &TestSite,
    d: &Daemon,
    images: usize,
    providers: usize,
    limit: Duration,
) {
    let want = images * providers;
    poll_for(limit, || {
        (ready_uploads(site, images) >= want).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{want} uploads never became ready within {limit:?}\n{}\nbuilder log:\n{}",
            site.dump(),
            d.log_tail()
        )
    });
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

fn packets(server: &ZkServer) -> f64 {
    server
        .mntr()
        .get("zk_packets_received")
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

/// Packets ZooKeeper received over `secs` seconds, minus our own `mntr` probes, per minute.
fn idle_rate(server: &ZkServer, secs: u64) -> f64 {
    let before = packets(server);
    let start = Instant::now();
    let _ = poll_for(Duration::from_secs(secs), || None::<()>);
    let after = packets(server);
    let elapsed = start.elapsed().as_secs_f64();
    // The second probe is counted by `after`; the first is part of the window, so subtract 1.
    (after - before - 1.0).max(0.0) * 60.0 / elapsed
}

/// One image built and uploaded by this builder, unmeasured: the first uploads to a freshly
/// started Glance (and the first image builds) are seconds slower, and whoever ran first would
/// pay for it.
fn warm_up() {
    let (site, d) = start_subject(Subject::Ours, "warm_up", 1, 1, DEFAULT_WORKERS);
    wait_all_uploaded(&site, &d, 1, 1, Duration::from_secs(300));
}

/// Empty ZooKeeper → `images` × `providers` built and uploaded to Glance (wall time from the
/// builder's start), then one idle window: ZooKeeper requests per minute and CPU seconds per
/// minute over it, and the resident set at its end.
fn steady_state(subject: Subject, images: usize, providers: usize, sizes: Sizes, out: &mut Pairs) {
    let start = Instant::now();
    let (site, d) = start_subject(
        subject,
        &format!("steady_{images}x{providers}"),
        images,
        providers,
        DEFAULT_WORKERS,
    );
    wait_all_uploaded(&site, &d, images, providers, Duration::from_secs(900));
    let burst = start.elapsed().as_secs_f64();
    // Let the last records settle and close the harness's own session: only the builder talks
    // to the server while we count.
    let _ = poll_for(Duration::from_secs(3), || None::<()>);
    site.zk.close();
    let cpu0 = cpu_secs(d.pid());
    let t0 = Instant::now();
    let idle = idle_rate(bench_server(), sizes.idle_secs);
    let cpu_idle = (cpu_secs(d.pid()) - cpu0) * 60.0 / t0.elapsed().as_secs_f64();
    let rss = rss_kib(d.pid()) / 1024.0;
    let private = smaps_rollup_kib(d.pid(), "Anonymous:") / 1024.0;
    let shape = format!("{images}×{providers}");
    // Where the resident set is (anonymous vs file-backed, per mapping), for the record.
    let dir = crate::util::repo_root().join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(smaps) = std::fs::read_to_string(format!("/proc/{}/smaps", d.pid())) {
        let _ = std::fs::write(
            dir.join(format!("smaps-{images}x{providers}-{}.txt", subject.tag())),
            smaps,
        );
    }
    out.put(
        subject,
        &format!("empty → {shape} built and uploaded"),
        burst,
        "s",
        Better::Lower,
    );
    out.put(
        subject,
        &format!("idle ZooKeeper requests, {shape}"),
        idle,
        "req/min",
        Better::Lower,
    );
    out.put(
        subject,
        &format!("CPU per idle minute, {shape}"),
        cpu_idle,
        "s/min",
        Better::Lower,
    );
    out.put(
        subject,
        &format!("RSS after {} s idle, {shape}", sizes.idle_secs),
        rss,
        "MiB",
        Better::Lower,
    );
    out.put(
        subject,
        &format!("  of which private (anonymous), {shape}"),
        private,
        "MiB",
        Better::Lower,
    );
    drop(d);
}

/// `request-build` created (as `nodepool image-build` does: an empty znode) → `building`
/// record created, by the znodes' server-side ctimes; and → every upload of that build `ready`.
fn request_latency(subject: Subject, sizes: Sizes, out: &mut Pairs) {
    let (site, d) = start_subject(subject, "latency", 3, 2, DEFAULT_WORKERS);
    wait_all_uploaded(&site, &d, 3, 2, Duration::from_secs(300));
    let mut lat = Vec::new();
    let mut all_up = Vec::new();
    for i in 0..sizes.requests {
        let image = format!("img{:02}", i % 3);
        let known: Vec<String> = site.builds(&image).into_iter().map(|b| b.id).collect();
        let req = paths::image_build_request_path(&image);
        site.zk.ensure_path(&req).unwrap();
        let req_ctime = site.zk.exists(&req).unwrap().map(|s| s.ctime).unwrap_or(0);
        let t_req = Instant::now();
        let new = poll_for(Duration::from_secs(120), || {
            site.builds(&image)
                .into_iter()
                .find(|b| !known.contains(&b.id))
        })
        .unwrap_or_else(|| panic!("no build for the request\n{}", d.log_tail()));
        let (_, stat) = site
            .zk
            .get_data(&paths::image_build_path(&image, &new.id))
            .unwrap()
            .expect("build znode");
        lat.push((stat.ctime - req_ctime) as f64);
        poll_for(Duration::from_secs(300), || {
            let b = site.builds(&image).into_iter().find(|b| b.id == new.id)?;
            (b.build.state == BuildState::Ready
                && b.uploads
                    .iter()
                    .filter(|u| u.upload.state == UploadState::Ready)
                    .count()
                    >= 2)
                .then_some(())
        })
        .unwrap_or_else(|| panic!("no uploads of the requested build\n{}", d.log_tail()));
        all_up.push(t_req.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    all_up.sort_by(f64::total_cmp);
    let n = sizes.requests;
    out.put(
        subject,
        &format!("request → building, p50 ({n} requests)"),
        percentile(&lat, 0.5),
        "ms",
        Better::Lower,
    );
    out.put(
        subject,
        &format!("request → building, p95 ({n} requests)"),
        percentile(&lat, 0.95),
        "ms",
        Better::Lower,
    );
    out.put(
        subject,
        "request → all uploads ready, p50",
        percentile(&all_up, 0.5),
        "ms",
        Better::Lower,
    );
    out.put(
        subject,
        "request → all uploads ready, p95",
        percentile(&all_up, 0.95),
        "ms",
        Better::Lower,
    );
    drop(d);
}

/// One janitor pass over a steady-state tree of `builds` builds and 10 × `builds` uploads
/// (nothing to delete), and over a tree ten times smaller: ZooKeeper requests and wall time.
pub fn cleanup_cost(sizes: Sizes) -> Vec<Figure> {
    let server = bench_server();
    let mut out = Vec::new();
    for builds in [sizes.cleanup_builds / 10, sizes.cleanup_builds] {
        let chroot = server.chroot(&format!("cleanup_{builds}"));
        let zk = Zk::connect(ZkConfig {
            hosts: vec![("127.0.0.1".into(), server.plain_port())],
            chroot: Some(chroot),
            session_timeout: Duration::from_secs(10),
            tls: None,
            auth: None,
        });
        assert!(zk.wait_connected(Duration::from_secs(30)));
        let images = builds / 2;
        let providers = 10;
        let dir = crate::util::test_dir("cleanup_cost");
        let mut body = String::new();
        for i in 0..images {
            body.push_str(&format!(
                "[[diskimages]]\nname = \"img{i:04}\"\nformats = [\"raw\"]\n"
            ));
        }
        for p in 0..providers {
            body.push_str(&format!(
                "[[providers]]\nname = \"p{p}\"\ndriver = \"command\"\nupload-command = [\"true\"]\ndelete-command = [\"true\"]\n"
            ));
            for i in 0..images {
                body.push_str(&format!("[[providers.diskimages]]\nname = \"img{i:04}\"\n"));
            }
        }
        let text = format!(
            "images-dir = \"{}\"\n[[zookeeper-servers]]\nhost = \"127.0.0.1\"\n{body}",
            dir.path().display()
        );
        let cfg = config::load_str(std::path::Path::new("bench.toml"), &text, None)
            .expect("bench config");
        // Seed: every image has two ready builds, each with one ready upload per provider.
        for i in 0..images {
            let image = format!("img{i:04}");
            for b in 0..2 {
                let id = format!("{:032x}", i * 2 + b);
                let mut rec =
                    ImageBuild::building("bench", "bench", &["raw".into()], 1.0e9 + b as f64);
                rec.state = BuildState::Ready;
                zk.create_with_parents(
                    &paths::image_build_path(&image, &id),
                    &rec.to_json(),
                    Mode::Persistent,
                )
                .unwrap();
                for p in 0..providers {
                    let mut up =
                        ImageUpload::uploading(Some("zuul"), Some("auto"), None, 1.0e9 + b as f64);
                    up.state = UploadState::Ready;
                    up.external_id = Some(format!("ext-{i}-{b}-{p}"));
                    zk.create_with_parents(
                        &paths::image_upload_path(&image, &id, &format!("p{p}"), "0000000001"),
                        &up.to_json(),
                        Mode::Persistent,
                    )
                    .unwrap();
                }
            }
        }
        let req = nodepool_builder::cleanup::CleanupRequest {
            cfg: std::sync::Arc::new(cfg),
            drivers: BTreeMap::new(),
            provider_formats: (0..providers)
                .map(|p| (format!("p{p}"), "raw".to_string()))
                .collect(),
            snapshot: None,
            abandoned: Default::default(),
        };
        let count = || {
            server
                .mntr()
                .get("zk_packets_received")
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let before = count();
        let mut state = nodepool_builder::cleanup::JanitorState::default();
        let report = nodepool_builder::cleanup::pass(&zk, &req, &mut state);
        let after = count();
        assert_eq!(
            report.deleted_builds + report.deleted_uploads,
            0,
            "a steady-state tree has nothing to delete"
        );
        out.push(Figure {
            name: format!(
                "janitor full pass, {builds} builds / {} uploads: ZooKeeper requests",
                builds * providers
            ),
            unit: "req",
            better: Better::Lower,
            ours: after - before - 1.0,
            reference: None,
        });
        out.push(Figure {
            name: format!(
                "janitor full pass, {builds} builds / {} uploads: wall time",
                builds * providers
            ),
            unit: "ms",
            better: Better::Lower,
            ours: report.took.as_secs_f64() * 1000.0,
            reference: None,
        });
        zk.close();
    }
    out
}

/// The milliseconds since midnight of a builder log line (`2026-12-07 18:00:00,123 INFO …`).
fn log_ms(line: &str) -> Option<i64> {
    let time = line.get(11..23)?;
    let (hms, ms) = time.split_once(',')?;
    let mut parts = hms.split(':').map(|v| v.parse::<i64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    Some(((h * 60 + m) * 60 + s) * 1000 + ms.parse::<i64>().ok()?)
}

/// Milliseconds from one log line to a later one (across midnight too).
fn log_gap_ms(from: &str, to: &str) -> f64 {
    match (log_ms(from), log_ms(to)) {
        (Some(a), Some(b)) => ((b - a).rem_euclid(86_400_000)) as f64,
        _ => f64::NAN,
    }
}

/// Resumes a frozen ZooKeeper server when dropped, so a failing scenario never leaves the
/// benchmark's server stopped.
struct Frozen(i32);

impl Frozen {
    /// Stops the server's JVM with SIGSTOP: its connections stay open and silent.
    fn server(server: &ZkServer) -> Frozen {
        let pid = server.pid() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .expect("freeze ZooKeeper");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

/// GET `path` from the builder's HTTP endpoint (one request per connection, as the endpoint
/// serves them): the body's length and how long the answer took.
fn http_get(addr: std::net::SocketAddr, path: &str) -> (usize, Duration) {
    use std::io::{Read, Write};
    let t = Instant::now();
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to builder-webapp");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer)
        .expect("read the endpoint's answer");
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
    let body = text.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
    (body, took)
}

/// This builder alone, 3 × 2 on Glance as in the steady state but with the `builder-webapp`
/// endpoint on and scraped the way a Prometheus and a health check would (`/metrics` and
/// `/healthz` every second) through the whole idle window: resident memory after it, idle
/// ZooKeeper requests (scrapes must cost none), and what a scrape takes.
pub fn endpoint(sizes: Sizes) -> Vec<Figure> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let site = TestSite::on("endpoint_3x2_ours", bench_server());
    let clouds = write_clouds(&site);
    site.config(
        0,
        &format!(
            "cleanup-interval = 60.0\nresync-interval = 300.0\nzookeeper-timeout = 10.0\n\n\
             [builder-webapp]\nlisten-address = \"127.0.0.1\"\nport = {port}\n"
        ),
        &images_and_providers(3, 2),
    );
    let (builds, uploads) = (DEFAULT_WORKERS.0.to_string(), DEFAULT_WORKERS.1.to_string());
    let d = Daemon::Ours(site.start_with_env(
        0,
        &["--build-workers", &builds, "--upload-workers", &uploads],
        &[("OS_CLIENT_CONFIG_FILE", clouds.to_str().unwrap())],
    ));
    wait_all_uploaded(&site, &d, 3, 2, Duration::from_secs(900));
    let _ = poll_for(Duration::from_secs(3), || None::<()>);
    site.zk.close();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let stop = stop.clone();
        // The bench's own scraper, not a daemon thread: nothing to register.
        #[allow(clippy::disallowed_methods)]
        std::thread::Builder::new()
            .name("scraper".into())
            .spawn(move || {
                let mut times = Vec::new();
                let mut size = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (bytes, took) = http_get(addr, "/metrics");
                    http_get(addr, "/healthz");
                    size = bytes;
                    times.push(took.as_secs_f64() * 1000.0);
                    let _ = poll_for(Duration::from_secs(1), || {
                        stop.load(std::sync::atomic::Ordering::Relaxed)
                            .then_some(())
                    });
                }
                (times, size)
            })
            .expect("start the scraper thread")
    };
    let idle = idle_rate(bench_server(), sizes.idle_secs);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut times, size) = scraper.join().expect("the scraper thread");
    times.sort_by(|a, b| a.total_cmp(b));
    let rss = rss_kib(d.pid()) / 1024.0;
    let figure = |name: String, ours: f64, unit: &'static str| Figure {
        name,
        unit,
        better: Better::Lower,
        ours,
        reference: None,
    };
    vec![
        figure(
            format!(
                "endpoint on, 3×2: RSS after {} s idle, scraped every second (ours only)",
                sizes.idle_secs
            ),
            rss,
            "MiB",
        ),
        figure(
            "endpoint on, 3×2: idle ZooKeeper requests while scraped".into(),
            idle,
            "req/min",
        ),
        figure(
            format!("endpoint on: /metrics scrape p50 ({} bytes)", size),
            percentile(&times, 0.5),
            "ms",
        ),
    ]
}

/// This builder only (nodepool 11 at this size would take most of an hour): `images`
/// diskimages × `providers` command-driver directory clouds (`etc/quickstart/dir-cloud`, with
/// its `list-command`, so the janitor looks for leaked images too), raw images from the test
/// image builder script. Empty ZooKeeper → every upload `ready` (wall time from the
/// builder's start); one idle window (ZooKeeper requests and CPU per minute, then the
/// resident set); then a new ZooKeeper session — the server is frozen until the builder gives
/// the old session up, then thawed — and, from the builder's log, the time from the new
/// session to the scheduler having the whole tree re-read, and the janitor's full pass that
/// follows (it reads the whole tree itself after a gap).
pub fn scale(sizes: Sizes) -> Vec<Figure> {
    let (images, providers) = sizes.scale;
    let want = images * providers;
    let shape = format!("{images}×{providers}");
    let start = Instant::now();
    let site = TestSite::on(&format!("scale_{images}x{providers}"), bench_server());
    let names: Vec<String> = (0..images).map(|i| format!("img{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut body: String = names
        .iter()
        .map(|n| format!("\n[[diskimages]]\nname = \"{n}\"\ndib-cmd = \"{{fake_dib}}\"\n"))
        .collect();
    for p in 0..providers {
        let name = format!("p{p:02}");
        body.push_str(&site.provider(&name, "raw", &refs, &site.list_command(&name)));
    }
    site.config(
        0,
        "cleanup-interval = 60.0\nresync-interval = 300.0\nzookeeper-timeout = 10.0",
        &body,
    );
    let (builds, uploads) = (DEFAULT_WORKERS.0.to_string(), DEFAULT_WORKERS.1.to_string());
    let b = site.start(
        0,
        &["--build-workers", &builds, "--upload-workers", &uploads],
    );

    // Count `ready` uploads in the log, not in ZooKeeper: reading 450 records every few
    // milliseconds would slow down the builder being measured. Four reads a second at most.
    let ready_lines = |log: &str| {
        log.lines()
            .filter(|l| l.contains("Image build ") && l.ends_with(" is ready"))
            .count()
    };
    let mut last_read: Option<Instant> = None;
    poll_for(Duration::from_secs(900), || {
        if last_read.is_some_and(|t| t.elapsed() < Duration::from_millis(250)) {
            return None;
        }
        last_read = Some(Instant::now());
        (ready_lines(&b.log()) >= want).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{want} uploads never became ready within 900 s\nbuilder log:\n{}",
            crate::util::file_tail(&site.path("builder0.log"), 80)
        )
    });
    let burst = start.elapsed().as_secs_f64();
    assert_eq!(
        ready_uploads(&site, images),
        want,
        "every upload is recorded ready in ZooKeeper\n{}",
        crate::util::file_tail(&site.path("builder0.log"), 80)
    );

    // Idle: only the builder talks to the server while we count.
    let _ = poll_for(Duration::from_secs(3), || None::<()>);
    site.zk.close();
    let cpu0 = cpu_secs(b.pid());
    let t0 = Instant::now();
    let idle = idle_rate(bench_server(), sizes.idle_secs);
    let cpu_idle = (cpu_secs(b.pid()) - cpu0) * 60.0 / t0.elapsed().as_secs_f64();
    let rss = rss_kib(b.pid()) / 1024.0;
    let private = smaps_rollup_kib(b.pid(), "Anonymous:") / 1024.0;
    let dir = crate::util::repo_root().join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(smaps) = std::fs::read_to_string(format!("/proc/{}/smaps", b.pid())) {
        let _ = std::fs::write(
            dir.join(format!("smaps-scale-{images}x{providers}-ours.txt")),
            smaps,
        );
    }

    // A new session: silence until the builder gives the old one up (twice its timeout after
    // noticing), then the server back, which has expired the old one meanwhile.
    let lost_before = b.log().matches("ZooKeeper session lost").count();
    let frozen = Frozen::server(bench_server());
    poll_for(Duration::from_secs(90), || {
        (b.log().matches("ZooKeeper session lost").count() > lost_before).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the builder never gave its session up\n{}",
            crate::util::file_tail(&site.path("builder0.log"), 80)
        )
    });
    drop(frozen);
    // From the new session's "Connected" line: the watcher's re-read ("resync of …"), the
    // scheduler's "state re-read" once every event of it is applied, the janitor's full pass.
    let lines_after_new_session = |log: &str| -> Option<([String; 4], Vec<String>)> {
        let lines: Vec<&str> = log.lines().collect();
        let lost = lines
            .iter()
            .rposition(|l| l.contains("ZooKeeper session lost"))?;
        let connected = lost
            + lines[lost..]
                .iter()
                .position(|l| l.contains("Connected to zookeeper"))?;
        let after = &lines[connected..];
        let resync = after.iter().find(|l| l.contains("resync of "))?;
        let reread = after
            .iter()
            .find(|l| l.contains("watches re-armed; state re-read"))?;
        let pass = after.iter().position(|l| {
            l.contains("cleanup pass:") && l.contains("(whole tree read from ZooKeeper)")
        })?;
        // Nothing is uploaded or deleted meanwhile: every command that ended before the pass
        // did is a `list-command` of its leak scan.
        let commands: Vec<String> = after[..pass]
            .iter()
            .filter(|l| l.contains("dir-cloud` ended ("))
            .map(|l| l.to_string())
            .collect();
        Some((
            [lines[connected], resync, reread, after[pass]].map(str::to_string),
            commands,
        ))
    };
    let mut last_read: Option<Instant> = None;
    let found = poll_for(Duration::from_secs(120), || {
        if last_read.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
            return None;
        }
        last_read = Some(Instant::now());
        lines_after_new_session(&b.log())
    })
    .unwrap_or_else(|| {
        panic!(
            "no new session, resync and full janitor pass in the log\n{}",
            crate::util::file_tail(&site.path("builder0.log"), 80)
        )
    });
    let ([connected, resync, reread, pass], commands) = found;
    assert_eq!(
        commands.len(),
        providers,
        "one list-command per provider in the janitor's full pass: {commands:#?}"
    );
    let lists_ms: f64 = commands
        .iter()
        .map(|l| {
            l.rsplit(" after ")
                .next()
                .and_then(debug_duration_ms)
                .unwrap_or_else(|| panic!("no duration in {l}"))
        })
        .sum();
    let counted = format!("resync of {images} images, {images} builds, {want} uploads took ");
    assert!(
        resync.contains(&counted),
        "the resync read the whole tree (`{counted}…`): {resync}"
    );
    let pass_ms: f64 = pass
        .split("; took ")
        .nth(1)
        .and_then(|r| r.split(" ms").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no time in the janitor's line: {pass}"));
    drop(b);

    let figure = |name: String, unit: &'static str, ours: f64| Figure {
        name: format!("scale {shape}, ours only: {name}"),
        unit,
        better: Better::Lower,
        ours,
        reference: None,
    };
    vec![
        figure("empty → all built and uploaded".into(), "s", burst),
        figure("idle ZooKeeper requests".into(), "req/min", idle),
        figure("CPU per idle minute".into(), "s/min", cpu_idle),
        figure(format!("RSS after {} s idle", sizes.idle_secs), "MiB", rss),
        figure("  of which private (anonymous)".into(), "MiB", private),
        figure(
            format!("new session → whole tree re-read ({want} uploads)"),
            "ms",
            log_gap_ms(&connected, &reread),
        ),
        figure(
            "janitor full pass after it (whole tree read)".into(),
            "ms",
            pass_ms,
        ),
        figure(
            format!("  of which {providers} dir-cloud list-commands (leak scan)"),
            "ms",
            lists_ms,
        ),
    ]
}

/// Milliseconds of a `Duration` as `{:.1?}` prints it (`380.2ms`, `1.5s`, `950.0µs`).
fn debug_duration_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().ok()?;
    let scale = match unit {
        "s" => 1000.0,
        "ms" => 1.0,
        "µs" => 1e-3,
        "ns" => 1e-6,
        _ => return None,
    };
    Some(value * scale)
}

/// A qcow2 of `mib` MiB of random data to Glance: this builder (the daemon, OpenStack driver,
/// from the `uploading` record's creation to the `ready` record) next to openstacksdk's
/// `create_image` of the same file to the same Glance; MB/s and peak RSS of each.
pub fn upload_throughput(sizes: Sizes) -> Vec<Figure> {
    let glance = crate::util::glance::GlanceServer::shared();
    let site = TestSite::on("bench_upload", bench_server());
    let clouds = site.path("clouds.yaml");
    std::fs::write(
        &clouds,
        format!(
            "clouds:\n  bench:\n    auth_type: none\n    image_endpoint_override: {}\n",
            glance.url()
        ),
    )
    .unwrap();
    let body = format!(
        "\n[[diskimages]]\nname = \"big\"\ndib-cmd = \"{{fake_dib}}\"\n[diskimages.env-vars]\nFAKE_DIB_SIZE_MB = \"{}\"\n\n[[providers]]\nname = \"bench-glance\"\ncloud = \"bench\"\nrate = 0.0\n[[providers.diskimages]]\nname = \"big\"\n",
        sizes.upload_mib
    );
    site.config(0, "", &body);
    let b = site.start_with_env(
        0,
        &[],
        &[("OS_CLIENT_CONFIG_FILE", clouds.to_str().unwrap())],
    );
    let (build, up) = poll_for(Duration::from_secs(600), || {
        site.uploads_in("big", "bench-glance", UploadState::Ready)
            .into_iter()
            .next()
    })
    .unwrap_or_else(|| panic!("the upload never became ready\n{}", site.dump()));
    let path = paths::image_upload_path("big", &build, "bench-glance", &up.id);
    let (_, stat) = site.zk.get_data(&path).unwrap().expect("upload record");
    let ours_secs = (stat.mtime - stat.ctime) as f64 / 1000.0;
    let ours_peak = peak_rss_kib(b.pid()) / 1024.0;
    let file = site.images_dir(0).join(format!("big-{build}.qcow2"));
    let bytes = std::fs::metadata(&file).unwrap().len() as f64;
    drop(b);

    // openstacksdk, from the nodepool 11 virtualenv, on the same file and Glance.
    crate::util::ensure_test_env(&["nodepool"]);
    let python = crate::util::repo_root().join("target/test-env/nodepool-venv/bin/python");
    let script = format!(
        "import resource, time, openstack\n\
         c = openstack.connect(auth_type='none', image_endpoint_override='{url}', load_yaml_config=False, load_envvars=False)\n\
         t = time.monotonic()\n\
         img = c.create_image('sdk-bench', filename='{file}', disk_format='qcow2', container_format='bare', wait=True)\n\
         print(time.monotonic() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n\
         c.delete_image(img.id)\n",
        url = glance.url(),
        file = file.display()
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &script])
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .expect("run openstacksdk");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let sdk_secs: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        panic!(
            "openstacksdk failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let sdk_peak: f64 = it
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
        / 1024.0;
    let mb = bytes / 1e6;
    vec![
        Figure {
            name: format!("upload {mb:.0} MB qcow2 to Glance (ref: openstacksdk create_image)"),
            unit: "MB/s",
            better: Better::Higher,
            ours: mb / ours_secs,
            reference: Some(mb / sdk_secs),
        },
        Figure {
            name: "upload: peak RSS (ref: openstacksdk create_image)".into(),
            unit: "MiB",
            better: Better::Lower,
            ours: ours_peak,
            reference: Some(sdk_peak),
        },
    ]
}

/// A raw image of `upload_mib` MiB of random data to EC2 through `ebs-direct` (StartSnapshot,
/// PutSnapshotBlock, CompleteSnapshot, RegisterImage): this builder's aws driver next to
/// nodepool 11's builder (boto3) with the same provider, each against a fresh moto server
/// (moto keeps the blocks in memory, so neither pays for the other's). Each figure is the
/// daemon's: the `uploading` record's creation to the `ready` record, and the peak RSS of the
/// whole run (the image builder script is a child process, not counted). Both get the same
/// rate limit (100 calls per second; block writes are not paced by either).
pub fn aws_upload(sizes: Sizes) -> Vec<Figure> {
    use crate::util::moto::{MotoServer, REGION};
    use crate::util::upstream::{AwsYamlProvider, NodepoolYaml, UpstreamBuilder, UpstreamOptions};

    // The image builder script writes exactly this many MiB of random data (no all-zero
    // block for either builder to skip).
    let mb = sizes.upload_mib as f64 * 1.048576;
    let time = format!("{mb:.0} MB raw to EC2, ebs-direct on moto: upload record created → ready");
    let peak_rss = "ebs-direct upload: builder peak RSS";
    let mut pairs = Pairs::default();
    for subject in Subject::BOTH {
        let name = format!("bench_aws_{}", subject.tag());
        let moto = MotoServer::start(&name);
        let site = TestSite::on(&name, bench_server());
        let env = moto.env();
        let size = sizes.upload_mib.to_string();
        let daemon = match subject {
            Subject::Ours => {
                site.config(
                    0,
                    "",
                    &format!(
                        "\n[[diskimages]]\nname = \"big\"\ndib-cmd = \"{{fake_dib}}\"\n\
                         [diskimages.env-vars]\nFAKE_DIB_SIZE_MB = \"{size}\"\n\
                         \n[[providers]]\nname = \"ec2\"\ndriver = \"aws\"\n\
                         region-name = \"{REGION}\"\nrate = 100\n\
                         [[providers.diskimages]]\nname = \"big\"\nimport-method = \"ebs-direct\"\n"
                    ),
                );
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                Daemon::Ours(site.start_with_env(0, &[], &env))
            }
            Subject::Upstream => {
                let yaml = NodepoolYaml {
                    images_dir: site.images_dir(0).display().to_string(),
                    build_log_dir: site.log_dir(0).display().to_string(),
                    top: Vec::new(),
                    images: vec!["big".into()],
                    env_vars: vec![("FAKE_DIB_SIZE_MB".into(), size.clone())],
                    providers: Vec::new(),
                };
                let provider = AwsYamlProvider {
                    name: "ec2".into(),
                    region: REGION.into(),
                    bucket: None,
                    image_format: None,
                    images: vec![(
                        "big".into(),
                        vec![("import-method".into(), "ebs-direct".into())],
                    )],
                    tags: Vec::new(),
                };
                let config = site.path("nodepool.yaml");
                std::fs::write(&config, yaml.render_with_aws(&site, &[provider])).unwrap();
                std::fs::create_dir_all(site.images_dir(0)).unwrap();
                std::fs::create_dir_all(site.log_dir(0)).unwrap();
                Daemon::Upstream(UpstreamBuilder::start_with(UpstreamOptions {
                    config,
                    clouds: site.path("clouds.yaml"),
                    log: site.path("upstream.log"),
                    cwd: site.path("upstream-cwd"),
                    workers: DEFAULT_WORKERS,
                    env,
                }))
            }
        };
        let (build, up) = poll_for(Duration::from_secs(900), || {
            if let Some(failed) = site.uploads_in("big", "ec2", UploadState::Failed).first() {
                panic!(
                    "{}: the aws upload failed: {failed:?}\n{}\n{}",
                    subject.tag(),
                    daemon.log_tail(),
                    moto.log_tail(30)
                );
            }
            site.uploads_in("big", "ec2", UploadState::Ready)
                .into_iter()
                .next()
        })
        .unwrap_or_else(|| {
            panic!(
                "{}: the aws upload never became ready\n{}\n{}",
                subject.tag(),
                site.dump(),
                daemon.log_tail()
            )
        });
        let path = paths::image_upload_path("big", &build, "ec2", &up.id);
        let (_, stat) = site.zk.get_data(&path).unwrap().expect("upload record");
        let secs = (stat.mtime - stat.ctime) as f64 / 1000.0;
        let peak = peak_rss_kib(daemon.pid()) / 1024.0;
        let file = site.images_dir(0).join(format!("big-{build}.raw"));
        let bytes = std::fs::metadata(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .len();
        assert_eq!(
            bytes,
            sizes.upload_mib << 20,
            "{}: the raw image's size",
            file.display()
        );
        drop(daemon);
        pairs.put(subject, &time, secs, "s", Better::Lower);
        pairs.put(subject, peak_rss, peak, "MiB", Better::Lower);
    }
    pairs.rows
}

/// Peak resident set size of a process, KiB.
pub fn peak_rss_kib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

/// One field of `/proc/<pid>/smaps_rollup`, KiB (the rest of the resident set is file-backed:
/// the program's code and its shared libraries, clean pages shared with the page cache).
pub fn smaps_rollup_kib(pid: i32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

/// Resident set size of a process, KiB.
pub fn rss_kib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

/// Runs every scenario, each for this builder and then for nodepool-builder 11 (where there
/// is an equivalent), on the same ZooKeeper and Glance; returns all figures.
///
/// `only`, when given, names the scenarios to run: `steady`, `latency`, `upload`, `janitor`,
/// `scale`, `endpoint`, `aws`.
pub fn run_all(sizes: Sizes, only: &[String]) -> Vec<Figure> {
    let run = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let mut all = Vec::new();
    let mut pairs = Pairs::default();
    if run("steady") {
        warm_up();
        for subject in Subject::BOTH {
            steady_state(subject, 3, 2, sizes, &mut pairs);
        }
        for subject in Subject::BOTH {
            steady_state(subject, sizes.big.0, sizes.big.1, sizes, &mut pairs);
        }
    }
    if run("latency") {
        for subject in Subject::BOTH {
            request_latency(subject, sizes, &mut pairs);
        }
    }
    all.extend(pairs.rows);
    if run("upload") {
        all.extend(upload_throughput(sizes));
    }
    if run("janitor") {
        all.extend(cleanup_cost(sizes));
    }
    if run("scale") {
        all.extend(scale(sizes));
    }
    if run("endpoint") {
        all.extend(endpoint(sizes));
    }
    if run("aws") {
        all.extend(aws_upload(sizes));
    }
    all
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "—".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The figures as a table (this builder, the reference, the ratio: how many times better this
/// builder is) and as JSON.
pub fn render(figures: &[Figure]) -> (String, String) {
    let width = figures
        .iter()
        .map(|f| f.name.chars().count())
        .max()
        .unwrap_or(10);
    let mut table = format!(
        "{:<width$}  {:>10}  {:>10}  {:>8}  unit\n",
        "figure", "ours", "reference", "ratio"
    );
    for f in figures {
        table.push_str(&format!(
            "{:<width$}  {:>10}  {:>10}  {:>8}  {}\n",
            f.name,
            num(f.ours),
            f.reference.map(num).unwrap_or_else(|| "—".into()),
            match f.ratio() {
                Some(r) if r.is_finite() => format!("{}×", num(r)),
                // This builder measured 0 (below the counter's resolution), the reference not.
                Some(r) if r.is_infinite() => "∞".into(),
                _ => "—".into(),
            },
            f.unit
        ));
    }
    let json = serde_json::to_string_pretty(
        &figures
            .iter()
            .map(|f| {
                serde_json::json!({
                    "name": f.name,
                    "unit": f.unit,
                    "better": match f.better { Better::Lower => "lower", Better::Higher => "higher" },
                    "ours": f.ours,
                    "reference": f.reference,
                    "ratio": f.ratio(),
                })
            })
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default();
    (table, json)
}
