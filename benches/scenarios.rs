//! Measured scenarios of this builder, against real ZooKeeper servers started by the test
//! tooling, with the test image builder and a directory "cloud". Shared by the bench binary
//! (`cargo bench --bench builder`, full sizes) and by a smoke test in the test suite (one
//! small iteration each, so the harness cannot rot).
//!
//! Each scenario returns figures; nothing here asserts a target — the README compares.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nodepool_builder::config;
use nodepool_builder::model::{BuildState, UploadState};
use nodepool_builder::zk::schema::{ImageBuild, ImageUpload};
use nodepool_builder::zk::{Mode, Zk, ZkConfig, paths};

use crate::util::np::Site;
use crate::util::poll_for;
use crate::util::zk::{ZkOptions, ZkServer};

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// MiB of the image uploaded to Glance by both this builder and openstacksdk.
    pub upload_mib: u64,
    /// Manual requests timed for the latency scenario.
    pub requests: usize,
    /// Seconds each idle window lasts.
    pub idle_secs: u64,
    /// Builds in the large cleanup tree (uploads = 10 × builds).
    pub cleanup_builds: usize,
}

impl Sizes {
    #[allow(dead_code)] // Used by the bench binary, not by the smoke test.
    pub const FULL: Sizes = Sizes {
        upload_mib: 1024,
        requests: 20,
        idle_secs: 60,
        cleanup_builds: 1000,
    };
    pub const QUICK: Sizes = Sizes {
        upload_mib: 16,
        requests: 2,
        idle_secs: 5,
        cleanup_builds: 40,
    };
}

/// One named figure.
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
}

fn fig(name: impl Into<String>, value: f64, unit: &'static str) -> Figure {
    Figure {
        name: name.into(),
        value,
        unit,
    }
}

/// A site on its own server, so `mntr` counts only this builder's traffic.
fn dedicated_site(name: &str) -> Site {
    let server: &'static ZkServer = Box::leak(Box::new(ZkServer::start(ZkOptions {
        tls: true,
        tick_time_ms: 2000,
    })));
    Site::on(name, server)
}

/// `images` diskimages, each uploaded to `providers` OpenStack providers on the shared real
/// Glance (through a clouds.yaml the builder finds via `OS_CLIENT_CONFIG_FILE`).
fn images_and_providers(site: &Site, images: usize, providers: usize) -> String {
    let glance = crate::util::glance::GlanceServer::shared();
    let clouds = format!(
        "clouds:\n  bench:\n    auth_type: none\n    image_endpoint_override: {}\n",
        glance.url()
    );
    std::fs::write(site.path("clouds.yaml"), clouds).unwrap();
    let names: Vec<String> = (0..images).map(|i| format!("img{i:02}")).collect();
    let mut body: String = names
        .iter()
        .map(|n| format!("\n[[diskimages]]\nname = \"{n}\"\ndib-cmd = \"{{fake_dib}}\"\n"))
        .collect();
    for p in 0..providers {
        body.push_str(&format!(
            "\n[[providers]]\nname = \"p{p}\"\ncloud = \"bench\"\nrate = 0.0\n"
        ));
        for n in &names {
            body.push_str(&format!("[[providers.diskimages]]\nname = \"{n}\"\n"));
        }
    }
    body
}

/// Starts builder 0 of a site made by [`images_and_providers`].
fn start_builder(site: &Site, args: &[&str]) -> crate::util::builder::BuilderProcess {
    let clouds = site.path("clouds.yaml");
    site.start_with_env(
        0,
        args,
        &[("OS_CLIENT_CONFIG_FILE", clouds.to_str().unwrap())],
    )
}

fn ready_uploads(site: &Site, images: usize) -> usize {
    (0..images)
        .map(|i| {
            site.uploads(&format!("img{i:02}"))
                .iter()
                .filter(|(_, u)| u.upload.state == UploadState::Ready)
                .count()
        })
        .sum()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

/// Packets ZooKeeper received over `secs` seconds, minus our own `mntr` probes, per minute.
fn idle_rate(server: &ZkServer, secs: u64) -> f64 {
    let count = |m: &BTreeMap<String, String>| {
        m.get("zk_packets_received")
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let before = count(&server.mntr());
    let start = Instant::now();
    let _ = poll_for(Duration::from_secs(secs), || None::<()>);
    let after = count(&server.mntr());
    let elapsed = start.elapsed().as_secs_f64();
    // The second probe is counted by `after`; the first is part of the window, so subtract 1.
    (after - before - 1.0).max(0.0) * 60.0 / elapsed
}

/// Empty ZooKeeper → `images` × `providers` built and uploaded to Glance (wall time), then
/// idle traffic.
pub fn burst_and_idle(images: usize, providers: usize, sizes: Sizes) -> Vec<Figure> {
    let site = dedicated_site(&format!("bench_{images}x{providers}"));
    let server = site.server;
    site.config(
        0,
        "cleanup-interval = 60.0\nresync-interval = 300.0\nzookeeper-timeout = 10.0",
        &images_and_providers(&site, images, providers),
    );
    let start = Instant::now();
    let b = start_builder(&site, &["--upload-workers", "8", "--build-workers", "2"]);
    let want = images * providers;
    poll_for(Duration::from_secs(300), || {
        (ready_uploads(&site, images) >= want).then_some(())
    })
    .unwrap_or_else(|| panic!("{want} uploads never became ready\n{}", site.dump()));
    let burst = start.elapsed().as_secs_f64();
    // Let the janitor's first passes settle before measuring idle traffic, and close the
    // harness's own session: only the builder talks to this server while we count.
    let _ = poll_for(Duration::from_secs(3), || None::<()>);
    site.zk.close();
    let idle = idle_rate(server, sizes.idle_secs);
    let rss = rss_kib(b.pid());
    let cpu = cpu_secs(b.pid());
    let _ = poll_for(Duration::from_secs(sizes.idle_secs.min(10)), || None::<()>);
    let cpu_idle = (cpu_secs(b.pid()) - cpu) * 60.0 / sizes.idle_secs.min(10) as f64;
    vec![
        fig(
            format!("empty → {images}×{providers} built and uploaded"),
            burst,
            "s",
        ),
        fig(
            format!("idle ZooKeeper requests, {images}×{providers}"),
            idle,
            "req/min",
        ),
        fig(
            format!("RSS after the burst, {images}×{providers}"),
            rss / 1024.0,
            "MiB",
        ),
        fig(
            format!("CPU per idle minute, {images}×{providers}"),
            cpu_idle,
            "s/min",
        ),
    ]
}

/// `request-build` created → `building` record created, by the znodes' server-side ctimes.
pub fn request_latency(sizes: Sizes) -> Vec<Figure> {
    let site = dedicated_site("bench_latency");
    site.config(
        0,
        "zookeeper-timeout = 10.0",
        &images_and_providers(&site, 3, 2),
    );
    let _b = start_builder(&site, &[]);
    poll_for(Duration::from_secs(120), || {
        (ready_uploads(&site, 3) >= 6).then_some(())
    })
    .expect("initial builds and uploads");
    let mut lat = Vec::new();
    let mut all_up = Vec::new();
    for i in 0..sizes.requests {
        let image = format!("img{:02}", i % 3);
        let known: Vec<String> = site.builds(&image).into_iter().map(|b| b.id).collect();
        let req = paths::image_build_request_path(&image);
        site.zk.ensure_path(&req).unwrap();
        let req_ctime = site.zk.exists(&req).unwrap().map(|s| s.ctime).unwrap_or(0);
        let new = poll_for(Duration::from_secs(60), || {
            site.builds(&image)
                .into_iter()
                .find(|b| !known.contains(&b.id))
        })
        .expect("a new build");
        let (_, stat) = site
            .zk
            .get_data(&paths::image_build_path(&image, &new.id))
            .unwrap()
            .expect("build znode");
        lat.push((stat.ctime - req_ctime) as f64);
        let t0 = Instant::now();
        poll_for(Duration::from_secs(60), || {
            let b = site.builds(&image).into_iter().find(|b| b.id == new.id)?;
            (b.build.state == BuildState::Ready
                && b.uploads
                    .iter()
                    .filter(|u| u.upload.state == UploadState::Ready)
                    .count()
                    >= 2)
                .then_some(())
        })
        .expect("uploads of the new build");
        // ctime resolution is 1 ms; the upload time is measured from the request by the wall clock.
        all_up.push(t0.elapsed().as_secs_f64() * 1000.0 + (stat.ctime - req_ctime) as f64);
    }
    lat.sort_by(f64::total_cmp);
    all_up.sort_by(f64::total_cmp);
    vec![
        fig("request → building, p50", percentile(&lat, 0.5), "ms"),
        fig("request → building, p95", percentile(&lat, 0.95), "ms"),
        fig(
            "request → all uploads ready, p50",
            percentile(&all_up, 0.5),
            "ms",
        ),
        fig(
            "request → all uploads ready, p95",
            percentile(&all_up, 0.95),
            "ms",
        ),
    ]
}

/// One janitor pass over a steady-state tree of `builds` builds and 10 × `builds` uploads
/// (nothing to delete), and over a tree ten times smaller: ZooKeeper requests and wall time.
pub fn cleanup_cost(sizes: Sizes) -> Vec<Figure> {
    let server: &'static ZkServer = Box::leak(Box::new(ZkServer::start(ZkOptions {
        tls: false,
        tick_time_ms: 2000,
    })));
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
        out.push(fig(
            format!(
                "cleanup pass, {builds} builds / {} uploads: ZooKeeper requests",
                builds * providers
            ),
            after - before - 1.0,
            "req",
        ));
        out.push(fig(
            format!(
                "cleanup pass, {builds} builds / {} uploads: wall time",
                builds * providers
            ),
            report.took.as_secs_f64() * 1000.0,
            "ms",
        ));
        zk.close();
    }
    out
}

/// A qcow2 of `mib` MiB of random data to Glance: this builder (the daemon, OpenStack driver,
/// from the `uploading` record's creation to the `ready` record) next to openstacksdk's
/// `create_image` of the same file to the same Glance; MB/s and peak RSS of each.
pub fn upload_throughput(sizes: Sizes) -> Vec<Figure> {
    let glance = crate::util::glance::GlanceServer::shared();
    let site = Site::new("bench_upload");
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
        fig(
            format!("upload {:.0} MB qcow2 to Glance: this builder", mb),
            mb / ours_secs,
            "MB/s",
        ),
        fig(
            format!("upload {:.0} MB qcow2 to Glance: openstacksdk", mb),
            mb / sdk_secs,
            "MB/s",
        ),
        fig("upload: this builder's peak RSS", ours_peak, "MiB"),
        fig("upload: openstacksdk's peak RSS", sdk_peak, "MiB"),
    ]
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

/// User + system CPU seconds of a process.
pub fn cpu_secs(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let utime: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    let stime: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    (utime + stime) / ticks
}

/// Runs every scenario; returns all figures.
pub fn run_all(sizes: Sizes) -> Vec<Figure> {
    let mut all = Vec::new();
    all.extend(request_latency(sizes));
    all.extend(burst_and_idle(3, 2, sizes));
    all.extend(burst_and_idle(20, 3, sizes));
    all.extend(cleanup_cost(sizes));
    all.extend(upload_throughput(sizes));
    all
}

/// The figures as a table and as JSON.
pub fn render(figures: &[Figure]) -> (String, String) {
    let width = figures
        .iter()
        .map(|f| f.name.chars().count())
        .max()
        .unwrap_or(10);
    let mut table = String::new();
    for f in figures {
        table.push_str(&format!(
            "{:<width$}  {:>12.1} {}\n",
            f.name, f.value, f.unit
        ));
    }
    let json = serde_json::to_string_pretty(
        &figures
            .iter()
            .map(|f| serde_json::json!({"name": f.name, "value": f.value, "unit": f.unit}))
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default();
    (table, json)
}
