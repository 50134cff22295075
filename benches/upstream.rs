//! The reference: nodepool-builder 11.0.0 (Python, from the nodepool virtualenv that
//! `scripts/test-env.sh nodepool` makes under `target/test-env/`), run on the same ZooKeeper
//! and Glance as this builder, with an equivalent `nodepool.yaml`: the same diskimages built by
//! the same test image builder script, the same providers reaching the same Glance through the
//! same clouds.yaml (`driver: openstack`, openstacksdk).
//!
//! The Python daemon runs in the foreground (`-d`); it is stopped with SIGINT (its graceful
//! path, which closes the ZooKeeper session), then SIGKILL if it is still there after 20 s.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::np::{Site, fake_dib};
use crate::util::{file_tail, poll_for, repo_root};

/// The nodepool virtualenv, installed on first use.
fn venv() -> PathBuf {
    crate::util::ensure_test_env(&["nodepool"]);
    repo_root().join("target/test-env/nodepool-venv")
}

/// Writes `nodepool.yaml` for the Python builder of `site`: `images` diskimages `img00..`,
/// each on `providers` OpenStack providers `p0..` of the cloud `bench` in `clouds` (the same
/// file this builder reads through `OS_CLIENT_CONFIG_FILE`).
pub fn write_config(site: &Site, images: usize, providers: usize, env_vars: &[(&str, &str)]) {
    let certs = site.server.certs();
    let names: Vec<String> = (0..images).map(|i| format!("img{i:02}")).collect();
    let mut y = format!(
        "images-dir: {images_dir}\n\
         build-log-dir: {logs}\n\
         zookeeper-servers:\n\
         \x20 - host: localhost\n\
         \x20   port: {port}\n\
         \x20   chroot: {chroot}\n\
         zookeeper-tls:\n\
         \x20 ca: {ca}\n\
         \x20 cert: {cert}\n\
         \x20 key: {key}\n\
         zookeeper-timeout: 10.0\n\
         labels: []\n\
         providers:\n",
        images_dir = site.images_dir(0).display(),
        logs = site.log_dir(0).display(),
        port = site.server.tls_port().expect("a TLS port"),
        chroot = site.chroot,
        ca = certs.ca.display(),
        cert = certs.cert.display(),
        key = certs.key.display(),
    );
    for p in 0..providers {
        y.push_str(&format!(
            "  - name: p{p}\n    driver: openstack\n    cloud: bench\n    rate: 0.001\n    diskimages:\n"
        ));
        for n in &names {
            y.push_str(&format!("      - name: {n}\n"));
        }
        y.push_str("    pools: []\n");
    }
    y.push_str("diskimages:\n");
    for n in &names {
        y.push_str(&format!(
            "  - name: {n}\n    dib-cmd: {dib}\n",
            dib = fake_dib().display()
        ));
        if !env_vars.is_empty() {
            y.push_str("    env-vars:\n");
            for (k, v) in env_vars {
                y.push_str(&format!("      {k}: '{v}'\n"));
            }
        }
    }
    std::fs::write(site.path("nodepool.yaml"), y).unwrap();
}

/// A running Python nodepool-builder.
pub struct UpstreamBuilder {
    child: Option<Child>,
    log: PathBuf,
}

impl UpstreamBuilder {
    /// Starts it with the config of [`write_config`] and waits until it listens for builds.
    pub fn start(site: &Site, build_workers: usize, upload_workers: usize) -> UpstreamBuilder {
        let venv = venv();
        let log = site.path("upstream.log");
        let file = std::fs::File::create(&log).unwrap();
        let scratch = site.path("upstream-cwd");
        std::fs::create_dir_all(&scratch).unwrap();
        std::fs::create_dir_all(site.images_dir(0)).unwrap();
        std::fs::create_dir_all(site.log_dir(0)).unwrap();
        let clouds = site.path("clouds.yaml");
        let child = Command::new(venv.join("bin/nodepool-builder"))
            .args(["-c", site.path("nodepool.yaml").to_str().unwrap(), "-d"])
            .args(["--build-workers", &build_workers.to_string()])
            .args(["--upload-workers", &upload_workers.to_string()])
            .current_dir(&scratch)
            .env("OS_CLIENT_CONFIG_FILE", &clouds)
            .env("PYTHONWARNINGS", "ignore::UserWarning:nodepool.version")
            .env(
                "PATH",
                format!("{}/bin:/usr/sbin:/usr/bin:/sbin:/bin", venv.display()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start the Python nodepool-builder");
        let mut b = UpstreamBuilder {
            child: Some(child),
            log,
        };
        let up = poll_for(Duration::from_secs(120), || {
            if let Some(st) = b.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the Python nodepool-builder exited ({st}) before it was up:\n{}",
                    file_tail(&b.log, 40)
                );
            }
            std::fs::read_to_string(&b.log)
                .ok()
                .filter(|l| l.contains("Starting listener for build jobs"))
                .map(|_| ())
        });
        if up.is_none() {
            panic!(
                "the Python nodepool-builder did not start within 120 s:\n{}",
                file_tail(&b.log, 40)
            );
        }
        b
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// The log's last lines, for panic messages.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log, 40)
    }
}

impl Drop for UpstreamBuilder {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let exited = poll_for(Duration::from_secs(20), || child.try_wait().ok().flatten());
        if exited.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
