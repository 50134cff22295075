//! The reference daemon: nodepool-builder 11.0.0 (Python, from the nodepool virtualenv that
//! `scripts/test-env.sh nodepool` makes under `target/test-env/`), run on a test's ZooKeeper
//! and Glance beside (or instead of) this builder. Used by the benchmark (`benches/`, one
//! builder at a time, equivalent configs) and by the mixed-fleet tests (`tests/mixed_fleet.rs`,
//! both builders at once on one `nodepool.yaml`).
//!
//! * [`NodepoolYaml`] writes the `nodepool.yaml` it reads: TLS ZooKeeper with the test
//!   certificates and the site's chroot, diskimages built by the test image builder script
//!   (`dib-cmd`, as upstream's own tests use `fake-image-create`), and OpenStack providers
//!   (`driver: openstack`, openstacksdk) on clouds of a clouds.yaml that the daemon finds
//!   through `OS_CLIENT_CONFIG_FILE`. Launcher-only keys (`labels`, `pools`) are present
//!   because a real site's file has them.
//! * [`UpstreamBuilder`] runs the daemon in the foreground (`-d`, DEBUG log into a file) and
//!   waits for "Starting listener for build jobs". It is stopped with SIGINT (its graceful
//!   path: build workers and the janitor are joined, upload threads die with the process,
//!   the ZooKeeper session is closed), then SIGKILL if it is still there after 20 s.
//!
//! * [`AwsYamlProvider`] adds a `driver: aws` provider ([`NodepoolYaml::render_with_aws`]),
//!   for running nodepool 11's builder against moto (`tests/aws_tooling.rs`).
//!
//! nodepool 11 replaces `%(NODEPOOL_*)` in its config from the environment before parsing
//! (as this builder does), which is how two builders on one host read one file yet keep
//! their own images directories.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::site::{TestSite, fake_dib};
use super::{file_tail, poll_for, repo_root};

/// How long the Python daemon may take to start (imports, ZooKeeper, workers).
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The nodepool virtualenv, installed on first use.
pub fn venv() -> PathBuf {
    super::ensure_test_env(&["nodepool"]);
    repo_root().join("target/test-env/nodepool-venv")
}

/// One OpenStack provider of a [`NodepoolYaml`].
#[derive(Debug, Clone)]
pub struct YamlProvider {
    pub name: String,
    /// The clouds.yaml entry.
    pub cloud: String,
    /// The diskimages it uploads.
    pub images: Vec<String>,
    /// `image-name-format`, when not the default (`{image_name}-{timestamp}`). Providers on
    /// one Glance project need different ones: openstacksdk's `create_image` returns an
    /// existing image of the same name and checksum instead of uploading, so two providers
    /// uploading one build in the same second would share one cloud image.
    pub image_name_format: Option<String>,
}

/// The inputs of one `nodepool.yaml`; [`NodepoolYaml::render`] makes the text.
#[derive(Debug, Clone)]
pub struct NodepoolYaml {
    /// `images-dir` as written (may be a `%(NODEPOOL_*)` reference).
    pub images_dir: String,
    /// `build-log-dir` as written (may be a `%(NODEPOOL_*)` reference).
    pub build_log_dir: String,
    /// More top-level `key: value` lines (e.g. `build-log-retention: 100`).
    pub top: Vec<(String, String)>,
    /// Diskimages, each built by the test image builder script.
    pub images: Vec<String>,
    /// `env-vars` of every diskimage.
    pub env_vars: Vec<(String, String)>,
    pub providers: Vec<YamlProvider>,
}

impl NodepoolYaml {
    /// `images` diskimages `img00..`, each on `providers` providers `p0..` of the cloud
    /// `bench`, with the images and log directories of builder 0 of `site` (the benchmark's
    /// shape).
    pub fn bench(site: &TestSite, images: usize, providers: usize) -> NodepoolYaml {
        let names: Vec<String> = (0..images).map(|i| format!("img{i:02}")).collect();
        NodepoolYaml {
            images_dir: site.images_dir(0).display().to_string(),
            build_log_dir: site.log_dir(0).display().to_string(),
            top: Vec::new(),
            images: names.clone(),
            env_vars: Vec::new(),
            providers: (0..providers)
                .map(|p| YamlProvider {
                    name: format!("p{p}"),
                    cloud: "bench".into(),
                    images: names.clone(),
                    image_name_format: None,
                })
                .collect(),
        }
    }

    /// The file's text for `site`'s ZooKeeper (TLS port, chroot, test certificates).
    pub fn render(&self, site: &TestSite) -> String {
        let certs = site.server.certs();
        let mut y = format!(
            "images-dir: '{images_dir}'\n\
             build-log-dir: '{logs}'\n\
             zookeeper-servers:\n\
             \x20 - host: localhost\n\
             \x20   port: {port}\n\
             \x20   chroot: {chroot}\n\
             zookeeper-tls:\n\
             \x20 ca: {ca}\n\
             \x20 cert: {cert}\n\
             \x20 key: {key}\n\
             zookeeper-timeout: 10.0\n",
            images_dir = self.images_dir,
            logs = self.build_log_dir,
            port = site.server.tls_port().expect("a TLS port"),
            chroot = site.chroot,
            ca = certs.ca.display(),
            cert = certs.cert.display(),
            key = certs.key.display(),
        );
        for (k, v) in &self.top {
            y.push_str(&format!("{k}: {v}\n"));
        }
        y.push_str("labels: []\nproviders:\n");
        for p in &self.providers {
            y.push_str(&format!(
                "  - name: {}\n    driver: openstack\n    cloud: {}\n    rate: 0.001\n",
                p.name, p.cloud
            ));
            if let Some(f) = &p.image_name_format {
                y.push_str(&format!("    image-name-format: '{f}'\n"));
            }
            y.push_str("    diskimages:\n");
            for n in &p.images {
                y.push_str(&format!("      - name: {n}\n"));
            }
            y.push_str("    pools: []\n");
        }
        y.push_str("diskimages:\n");
        for n in &self.images {
            y.push_str(&format!(
                "  - name: {n}\n    dib-cmd: {dib}\n",
                dib = fake_dib().display()
            ));
            if !self.env_vars.is_empty() {
                y.push_str("    env-vars:\n");
                for (k, v) in &self.env_vars {
                    y.push_str(&format!("      {k}: '{v}'\n"));
                }
            }
        }
        y
    }

    /// Writes [`NodepoolYaml::render`] to `path`.
    pub fn write(&self, site: &TestSite, path: &Path) {
        std::fs::write(path, self.render(site))
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// One AWS provider (`driver: aws`) of a `nodepool.yaml`, for running nodepool 11's builder
/// against moto ([`super::moto::MotoServer`]): boto3 in the nodepool venv (botocore 1.44)
/// honours `AWS_ENDPOINT_URL`, so the endpoint comes from the environment
/// ([`super::moto::MotoServer::env`]), not from the file (nodepool 11 has no endpoint key).
#[derive(Debug, Clone)]
pub struct AwsYamlProvider {
    pub name: String,
    /// `region-name`.
    pub region: String,
    /// `object-storage: bucket-name:` (needed by the `snapshot` and `image` import methods).
    pub bucket: Option<String>,
    /// `image-format` (nodepool 11's default is `raw`).
    pub image_format: Option<String>,
    /// The diskimages it uploads, each with its provider-level keys (`import-method`,
    /// `volume-type`, `imds-support`, …) as `key: value` lines.
    pub images: Vec<(String, Vec<(String, String)>)>,
    /// `tags` of every diskimage entry.
    pub tags: Vec<(String, String)>,
}

impl AwsYamlProvider {
    /// The provider's entry in `providers:` (indented as a list item).
    pub fn render(&self) -> String {
        let mut y = format!(
            "  - name: {}\n    driver: aws\n    region-name: {}\n    rate: 100\n",
            self.name, self.region
        );
        if let Some(bucket) = &self.bucket {
            y.push_str(&format!(
                "    object-storage:\n      bucket-name: {bucket}\n"
            ));
        }
        if let Some(format) = &self.image_format {
            y.push_str(&format!("    image-format: {format}\n"));
        }
        y.push_str("    diskimages:\n");
        for (name, keys) in &self.images {
            y.push_str(&format!("      - name: {name}\n"));
            for (k, v) in keys {
                y.push_str(&format!("        {k}: {v}\n"));
            }
            if !self.tags.is_empty() {
                y.push_str("        tags:\n");
                for (k, v) in &self.tags {
                    y.push_str(&format!("          {k}: '{v}'\n"));
                }
            }
        }
        y.push_str("    pools: []\n");
        y
    }
}

impl NodepoolYaml {
    /// [`NodepoolYaml::render`] with `aws` providers after the OpenStack ones.
    pub fn render_with_aws(&self, site: &TestSite, aws: &[AwsYamlProvider]) -> String {
        let text = self.render(site);
        let at = text
            .find("\ndiskimages:\n")
            .expect("a rendered nodepool.yaml has a diskimages section")
            + 1;
        let providers: String = aws.iter().map(AwsYamlProvider::render).collect();
        format!("{}{providers}{}", &text[..at], &text[at..])
    }
}

/// How long [`aws_launch`] may take.
pub const AWS_LAUNCH_TIMEOUT: Duration = Duration::from_secs(120);

/// Boots one node from `ami` with nodepool 11's own AWS driver and deletes it again
/// (`tests/fixtures/python/nodepool11-aws-launch.py`: the launcher's create and delete state
/// machines, not the launcher daemon), with `env` pointing it at the endpoint (e.g.
/// [`super::moto::MotoServer::env`]); `dir` gets its `nodepool.yaml` and output. Returns the
/// script's JSON (`created`: the instance as nodepool saw it; `deleted`: whether it ended
/// `terminated`). Panics with the script's output when it fails.
pub fn aws_launch(env: &[(String, String)], dir: &Path, ami: &str) -> serde_json::Value {
    let venv = venv();
    let script = repo_root().join("tests/fixtures/python/nodepool11-aws-launch.py");
    let (out, err) = (dir.join("aws-launch.out"), dir.join("aws-launch.err"));
    let file = |p: &Path| {
        std::fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()))
    };
    let mut child = Command::new(venv.join("bin/python"))
        .arg(&script)
        .args(["--ami", ami, "--dir"])
        .arg(dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir)
        .env("PYTHONWARNINGS", "ignore")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(file(&out))
        .stderr(file(&err))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let status = poll_for(AWS_LAUNCH_TIMEOUT, || child.try_wait().ok().flatten());
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    match status {
        Some(st) if st.success() => serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{} printed no JSON ({e}): {stdout}", script.display())),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} failed ({other:?}):\n{stdout}\n{}",
                script.display(),
                file_tail(&err, 40)
            )
        }
    }
}

/// Writes `<site>/nodepool.yaml` for the benchmark's Python builder: `images` diskimages
/// `img00..`, each on `providers` OpenStack providers `p0..` of the cloud `bench` (the same
/// clouds.yaml this builder reads through `OS_CLIENT_CONFIG_FILE`).
pub fn write_config(site: &TestSite, images: usize, providers: usize) {
    NodepoolYaml::bench(site, images, providers).write(site, &site.path("nodepool.yaml"));
}

/// How to start one Python builder.
pub struct UpstreamOptions {
    /// Its `nodepool.yaml`.
    pub config: PathBuf,
    /// The clouds.yaml (`OS_CLIENT_CONFIG_FILE`).
    pub clouds: PathBuf,
    /// Its log (stdout and stderr), created afresh.
    pub log: PathBuf,
    /// Working directory (scratch).
    pub cwd: PathBuf,
    /// `--build-workers`, `--upload-workers`.
    pub workers: (usize, usize),
    /// More environment, e.g. the `NODEPOOL_*` variables its config refers to.
    pub env: Vec<(String, String)>,
}

/// A running Python nodepool-builder.
pub struct UpstreamBuilder {
    child: Option<Child>,
    log: PathBuf,
}

impl UpstreamBuilder {
    /// Starts the benchmark's builder: `<site>/nodepool.yaml` of [`write_config`] and
    /// `<site>/clouds.yaml`, builder 0's directories.
    pub fn start(site: &TestSite, build_workers: usize, upload_workers: usize) -> UpstreamBuilder {
        std::fs::create_dir_all(site.images_dir(0)).unwrap();
        std::fs::create_dir_all(site.log_dir(0)).unwrap();
        UpstreamBuilder::start_with(UpstreamOptions {
            config: site.path("nodepool.yaml"),
            clouds: site.path("clouds.yaml"),
            log: site.path("upstream.log"),
            cwd: site.path("upstream-cwd"),
            workers: (build_workers, upload_workers),
            env: Vec::new(),
        })
    }

    /// Starts it with `opts` and waits until it listens for builds; panics with its log
    /// tail if it exits first or takes longer than [`START_TIMEOUT`].
    pub fn start_with(opts: UpstreamOptions) -> UpstreamBuilder {
        let venv = venv();
        let file = std::fs::File::create(&opts.log)
            .unwrap_or_else(|e| panic!("create {}: {e}", opts.log.display()));
        std::fs::create_dir_all(&opts.cwd).unwrap();
        let child = Command::new(venv.join("bin/nodepool-builder"))
            .args(["-c", opts.config.to_str().unwrap(), "-d"])
            .args(["--build-workers", &opts.workers.0.to_string()])
            .args(["--upload-workers", &opts.workers.1.to_string()])
            .current_dir(&opts.cwd)
            .env("OS_CLIENT_CONFIG_FILE", &opts.clouds)
            .env("PYTHONWARNINGS", "ignore::UserWarning:nodepool.version")
            .env(
                "PATH",
                format!("{}/bin:/usr/sbin:/usr/bin:/sbin:/bin", venv.display()),
            )
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start the Python nodepool-builder");
        let mut b = UpstreamBuilder {
            child: Some(child),
            log: opts.log,
        };
        let up = poll_for(START_TIMEOUT, || {
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
                "the Python nodepool-builder did not start within {START_TIMEOUT:?}:\n{}",
                file_tail(&b.log, 40)
            );
        }
        b
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The log's last lines, for panic messages.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log, 40)
    }

    /// Stops it the graceful way (SIGINT; SIGKILL after 20 s) and returns how it ended.
    pub fn stop(mut self) -> Option<ExitStatus> {
        self.halt()
    }

    fn halt(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        match poll_for(Duration::from_secs(20), || child.try_wait().ok().flatten()) {
            Some(st) => Some(st),
            None => {
                let _ = child.kill();
                child.wait().ok()
            }
        }
    }
}

impl Drop for UpstreamBuilder {
    fn drop(&mut self) {
        self.halt();
    }
}
