//! [`TestSite`]: one nodepool site for a test, the way an operator's site is one ZooKeeper
//! tree, its builders and their clouds: a ZooKeeper chroot on the shared (or a dedicated)
//! server, a directory with images, logs, configs and directory "clouds", the builder
//! processes started from those configs, and a ZooKeeper session of the test's own to look at
//! (and poke) the tree. Most integration tests start with `let site = TestSite::new(..)`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodepool_builder::model::{BuildState, UploadState};
use nodepool_builder::zk::tree::{self, BuildInfo, UploadInfo};
use nodepool_builder::zk::{Mode, Zk, ZkConfig, ZkError, paths};

use super::builder::{BuilderProcess, Launch};
use super::glance::GlanceServer;
use super::zk::ZkServer;
use super::{file_tail, poll_for, test_dir, wait_until};

/// The environment variables that decide which CAs the OpenStack driver trusts when
/// clouds.yaml names none: openstacksdk's and requests' own, and the system store's overrides.
pub const TRUST_ENV_VARS: [&str; 5] = [
    "OS_CACERT",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// One diskimage, `fedora`, built as a qcow2 by the test image builder (the body for
/// [`TestSite::config`]).
pub const ONE_IMAGE: &str = r#"
[[diskimages]]
name = "fedora"
dib-cmd = "{fake_dib}"
elements = ["fedora", "vm"]
release = 21
formats = ["qcow2"]
"#;

/// Default wait for something the builder does.
pub const WAIT: Duration = Duration::from_secs(60);

/// The test image builder script.
pub fn fake_dib() -> PathBuf {
    super::repo_root().join("tests/fixtures/fake-dib")
}

/// A running test site: ZooKeeper chroot + test directory + configs + the builders started
/// from them (see the module doc). Dropping it closes the test's session and removes the
/// directory, unless the test failed.
pub struct TestSite {
    pub dir: tempfile::TempDir,
    pub server: &'static ZkServer,
    pub chroot: String,
    pub zk: Zk,
}

impl Drop for TestSite {
    fn drop(&mut self) {
        self.zk.close();
        super::keep_after_failure(&mut self.dir);
    }
}

impl TestSite {
    /// A new site on the shared TLS server.
    pub fn new(name: &str) -> TestSite {
        TestSite::on(name, ZkServer::shared())
    }

    /// A new site on a given (TLS) server, e.g. a dedicated one a test freezes.
    pub fn on(name: &str, server: &'static ZkServer) -> TestSite {
        let hosts = vec![("127.0.0.1".into(), server.plain_port())];
        TestSite::with_session(name, server, server.chroot(name), hosts)
    }

    /// A site whose test session talks to `hosts` (plaintext ports) under `chroot`;
    /// `server` still gives the configs their certificates and TLS port (a test on an
    /// ensemble rewrites the server list of its configs).
    pub fn with_session(
        name: &str,
        server: &'static ZkServer,
        chroot: String,
        hosts: Vec<(String, u16)>,
    ) -> TestSite {
        let dir = test_dir(name);
        let zk = Zk::connect(ZkConfig {
            hosts,
            chroot: Some(chroot.clone()),
            session_timeout: Duration::from_secs(10),
            tls: None,
            auth: None,
        });
        assert!(
            zk.wait_connected(Duration::from_secs(30)),
            "test session to zookeeper"
        );
        TestSite {
            dir,
            server,
            chroot,
            zk,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Images directory of builder `n` (each builder has its own).
    pub fn images_dir(&self, n: usize) -> PathBuf {
        let p = self.path(&format!("images{n}"));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn log_dir(&self, n: usize) -> PathBuf {
        self.path(&format!("logs{n}"))
    }

    /// Writes the config of builder `n`: TLS ZooKeeper, short intervals, plus `body` (TOML with
    /// `[[diskimages]]` and `[[providers]]`). `{fake_dib}` in `body` is replaced by the script.
    pub fn config(&self, n: usize, top: &str, body: &str) -> PathBuf {
        let certs = self.server.certs();
        // Test defaults, unless `top` sets the key itself.
        let defaults: String = [
            "zookeeper-timeout = 6.0",
            "retry-backoff-initial = 1.0",
            "retry-backoff-max = 4.0",
            "resync-interval = 30.0",
        ]
        .iter()
        .filter(|l| !top.contains(l.split(" =").next().unwrap()))
        .map(|l| format!("{l}\n"))
        .collect();
        let cfg = format!(
            r#"images-dir = "{images}"
build-log-dir = "{logs}"
{defaults}{top}

[[zookeeper-servers]]
host = "localhost"
port = {port}
chroot = "{chroot}"

[zookeeper-tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"

{body}
"#,
            images = self.images_dir(n).display(),
            logs = self.log_dir(n).display(),
            port = self.server.tls_port().unwrap(),
            chroot = self.chroot,
            ca = certs.ca.display(),
            cert = certs.cert.display(),
            key = certs.key.display(),
            body = body.replace("{fake_dib}", &fake_dib().display().to_string()),
        );
        let path = self.config_path(n);
        std::fs::write(&path, cfg).unwrap();
        path
    }

    /// Rewrites builder `n`'s config (written by [`TestSite::config`]) to reach ZooKeeper in
    /// plaintext on loopback `port`, e.g. a [`super::zkproxy::ZkProxy`] in front of the
    /// site's server.
    pub fn zookeeper_through(&self, n: usize, port: u16) {
        let cfg = self.config_path(n);
        let text = std::fs::read_to_string(&cfg).unwrap();
        let start = text.find("[[zookeeper-servers]]").unwrap();
        let tls = text.find("[zookeeper-tls]").unwrap();
        let end = tls + text[tls..].find("\n\n").unwrap();
        let servers = format!(
            "[[zookeeper-servers]]\nhost = \"127.0.0.1\"\nport = {port}\nchroot = \"{}\"\n",
            self.chroot
        );
        std::fs::write(&cfg, format!("{}{servers}{}", &text[..start], &text[end..])).unwrap();
    }

    /// Starts builder `n` in the foreground (`-d`) with its config and waits until it is ready.
    pub fn start(&self, n: usize, extra_args: &[&str]) -> BuilderProcess {
        self.start_with_env(n, extra_args, &[])
    }

    /// Like [`TestSite::start`], with extra environment (e.g. `OS_CLIENT_CONFIG_FILE`).
    pub fn start_with_env(
        &self,
        n: usize,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> BuilderProcess {
        self.start_config(n, &self.config_path(n), extra_args, env)
    }

    /// Like [`TestSite::start_with_env`], with the config file `cfg` (e.g. a nodepool.yaml).
    pub fn start_config(
        &self,
        n: usize,
        cfg: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> BuilderProcess {
        self.start_as(n, cfg, &Launch::default(), extra_args, env)
    }

    /// The config file [`TestSite::config`] writes for builder `n`.
    fn config_path(&self, n: usize) -> PathBuf {
        self.path(&format!("builder{n}.toml"))
    }

    /// Like [`TestSite::start_with_env`], with the variables that choose which CAs the OpenStack
    /// driver trusts ([`TRUST_ENV_VARS`]) removed from what the builder inherits, so only
    /// `env` decides (a test run's own `REQUESTS_CA_BUNDLE` must not change the outcome).
    pub fn start_with_trust_env(&self, n: usize, env: &[(&str, &str)]) -> BuilderProcess {
        let how = Launch {
            unset: &TRUST_ENV_VARS,
            ..Launch::default()
        };
        self.start_as(n, &self.config_path(n), &how, &[], env)
    }

    /// Like [`TestSite::start_with_env`], with the binary started through `wrapper` (see
    /// [`Launch::wrapper`]).
    pub fn start_wrapped(
        &self,
        n: usize,
        wrapper: &[&str],
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> BuilderProcess {
        let how = Launch {
            wrapper,
            ..Launch::default()
        };
        self.start_as(n, &self.config_path(n), &how, extra_args, env)
    }

    /// Starts builder `n` the way `how` says, and waits until it is ready.
    fn start_as(
        &self,
        n: usize,
        cfg: &Path,
        how: &Launch<'_>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> BuilderProcess {
        let mut args = vec!["-d", "-c", cfg.to_str().unwrap()];
        args.extend_from_slice(extra_args);
        let mut all_env = vec![(
            "NODEPOOL_BUILDER_LOG",
            "debug,zookeeper_client=info,rustls=info,ureq=info",
        )];
        all_env.extend_from_slice(env);
        let log = self.path(&format!("builder{n}.log"));
        let mut b = BuilderProcess::start_as(how, &args, &all_env, &log);
        b.wait_for_log(WAIT, "ready: builder_id=");
        b
    }

    /// Every readable build of `image` with its uploads. The test's own session may be lost
    /// while a test freezes or restarts the server for longer than its timeout: then the tree
    /// is read in the next session.
    pub fn builds(&self, image: &str) -> Vec<BuildInfo> {
        let mut last = None;
        let read = poll_for(Duration::from_secs(30), || {
            match self
                .zk
                .retry(Duration::from_secs(10), |zk| tree::read_image(zk, image))
            {
                Ok(builds) => Some(builds),
                Err(e) if e.is_connection_loss() || e == ZkError::SessionLost => {
                    self.zk.wait_connected(Duration::from_secs(10));
                    last = Some(e);
                    None
                }
                Err(e) => panic!("read the image tree: {e}"),
            }
        });
        read.unwrap_or_else(|| panic!("read the image tree: {last:?}"))
    }

    pub fn builds_in(&self, image: &str, state: BuildState) -> Vec<BuildInfo> {
        self.builds(image)
            .into_iter()
            .filter(|b| b.build.state == state)
            .collect()
    }

    /// Waits until `image` has at least `n` builds in `state`; returns them.
    #[track_caller]
    pub fn wait_builds(&self, image: &str, state: BuildState, n: usize) -> Vec<BuildInfo> {
        self.wait(&format!("{n} {state} build(s) of {image}"), || {
            let b = self.builds_in(image, state);
            (b.len() >= n).then_some(b)
        })
    }

    /// Waits for a `ready` build of `image` that is not in `known`; adds it to `known`.
    #[track_caller]
    pub fn wait_new_ready(&self, image: &str, known: &mut Vec<String>) -> BuildInfo {
        let b = self.wait(
            &format!("a new ready build of {image} (besides {known:?})"),
            || {
                self.builds_in(image, BuildState::Ready)
                    .into_iter()
                    .find(|b| !known.contains(&b.id))
            },
        );
        known.push(b.id.clone());
        b
    }

    /// Waits for `f` to return `Some`; on time-out panics with the tree and every builder's
    /// log tail.
    #[track_caller]
    pub fn wait<T>(&self, what: &str, f: impl FnMut() -> Option<T>) -> T {
        match poll_for(WAIT, f) {
            Some(v) => v,
            None => panic!(
                "timed out after {WAIT:?}: waiting for {what}\n{}",
                self.dump()
            ),
        }
    }

    /// The ZooKeeper tree and the tails of the builder logs, for failure messages.
    pub fn dump(&self) -> String {
        let mut out = format!(
            "--- tree {} ---\n{}",
            self.chroot,
            self.server.tree(&self.chroot)
        );
        for n in 0..4 {
            let log = self.path(&format!("builder{n}.log"));
            if log.exists() {
                out.push_str(&format!(
                    "--- builder{n}.log (tail) ---\n{}\n",
                    file_tail(&log, 80)
                ));
            }
        }
        out
    }

    /// Creates the `request-build` znode the way `nodepool image-build` does.
    pub fn request_build(&self, image: &str) {
        self.zk
            .ensure_path(&paths::image_build_request_path(image))
            .unwrap();
    }

    pub fn request_pending(&self, image: &str) -> bool {
        self.zk
            .exists(&paths::image_build_request_path(image))
            .unwrap()
            .is_some()
    }

    pub fn pause(&self, image: &str) {
        self.zk
            .create_with_parents(&paths::image_pause_path(image), b"", Mode::Persistent)
            .unwrap();
    }

    pub fn unpause(&self, image: &str) {
        self.zk
            .delete(&paths::image_pause_path(image), None)
            .unwrap();
    }

    /// Touches a fake-dib control file in builder `n`'s images dir.
    pub fn control(&self, n: usize, name: &str, content: &str) -> PathBuf {
        let p = self.images_dir(n).join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    /// Local files of a build in builder `n`'s images dir.
    pub fn local_files(&self, n: usize, image: &str, build: &str) -> Vec<String> {
        let prefix = format!("{image}-{build}.");
        let mut v: Vec<String> = std::fs::read_dir(self.images_dir(n))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        v.sort();
        v
    }

    /// The build log of a build.
    pub fn build_log(&self, n: usize, image: &str, build: &str) -> String {
        std::fs::read_to_string(self.log_dir(n).join(format!("{image}-{build}.log")))
            .unwrap_or_default()
    }

    /// Waits until `path` does not exist.
    #[track_caller]
    pub fn wait_gone(&self, path: &Path) {
        wait_until(WAIT, &format!("{} to disappear", path.display()), || {
            !path.exists()
        });
    }

    /// The directory a `dir-cloud` provider uploads into.
    pub fn cloud_dir(&self, provider: &str) -> PathBuf {
        self.path(&format!("cloud-{provider}"))
    }

    /// A `[[providers]]` entry using the command driver with `etc/quickstart/dir-cloud`,
    /// listing `images`; `extra` is added to the provider table (before its diskimages).
    pub fn provider(&self, name: &str, format: &str, images: &[&str], extra: &str) -> String {
        let script = super::repo_root().join("etc/quickstart/dir-cloud");
        let cloud = self.cloud_dir(name);
        let mut t = format!(
            "\n[[providers]]\nname = \"{name}\"\ndriver = \"command\"\nimage-format = \"{format}\"\n\
             upload-command = [\"{s}\", \"upload\", \"{c}\", \"{{file}}\", \"{{external_name}}\"]\n\
             delete-command = [\"{s}\", \"delete\", \"{c}\", \"{{external_id}}\"]\n{extra}\n",
            s = script.display(),
            c = cloud.display(),
        );
        for i in images {
            t.push_str(&format!("[[providers.diskimages]]\nname = \"{i}\"\n"));
        }
        t
    }

    /// Writes the config of builder `n` with the commonest body: one diskimage `fedora`
    /// built by the fake DIB, uploaded as raw to the directory cloud `cloud`.
    pub fn fedora_on_cloud(&self, n: usize, top: &str) -> PathBuf {
        let body = format!(
            "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{{fake_dib}}\"\n{}",
            self.provider("cloud", "raw", &["fedora"], "")
        );
        self.config(n, top, &body)
    }

    /// The `list-command` line of a `dir-cloud` provider (for [`TestSite::provider`]'s `extra`).
    pub fn list_command(&self, name: &str) -> String {
        format!(
            "list-command = [\"{}\", \"list\", \"{}\"]",
            super::repo_root()
                .join("etc/quickstart/dir-cloud")
                .display(),
            self.cloud_dir(name).display()
        )
    }

    /// Puts an image into the `dir-cloud` provider `name` the way its upload command does,
    /// with `env` as the builder's NODEPOOL_* variables; returns the image id.
    pub fn cloud_upload(&self, name: &str, env: &[(&str, &str)]) -> String {
        let file = self.path("outside-upload.raw");
        std::fs::write(&file, b"an image").unwrap();
        let out = std::process::Command::new(super::repo_root().join("etc/quickstart/dir-cloud"))
            .args([
                "upload".as_ref(),
                self.cloud_dir(name).as_os_str(),
                file.as_os_str(),
            ])
            .arg("outside")
            .envs(env.iter().copied())
            .output()
            .expect("run dir-cloud");
        assert!(out.status.success(), "dir-cloud upload: {out:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        stdout.lines().last().unwrap().to_string()
    }

    /// Puts an image into the `dir-cloud` provider `name` tagged as the builder tags an
    /// upload (build id, upload id, provider), as a builder killed after the cloud accepted
    /// it would leave it; returns the image id.
    pub fn tagged_cloud_upload(&self, name: &str, build: &str, upload: &str) -> String {
        self.cloud_upload(
            name,
            &[
                ("NODEPOOL_BUILD_ID", build),
                ("NODEPOOL_UPLOAD_ID", upload),
                ("NODEPOOL_PROVIDER", name),
            ],
        )
    }

    /// Writes a clouds.yaml with one `auth_type: none` cloud per (name, image_format) at
    /// `glance`; returns its path (for `OS_CLIENT_CONFIG_FILE`).
    pub fn glance_clouds(&self, glance: &GlanceServer, clouds: &[(&str, Option<&str>)]) -> String {
        let mut y = String::from("clouds:\n");
        for (name, format) in clouds {
            y.push_str(&format!(
                "  {name}:\n    auth_type: none\n    image_endpoint_override: {}\n",
                glance.url()
            ));
            if let Some(f) = format {
                y.push_str(&format!("    image_format: {f}\n"));
            }
        }
        let path = self.path("clouds.yaml");
        std::fs::write(&path, y).unwrap();
        path.display().to_string()
    }

    /// A `[[providers]]` entry of the OpenStack driver on clouds.yaml entry `cloud`, listing
    /// `images` (each with a `purpose` property); `extra` is added to the provider table.
    pub fn openstack_provider(name: &str, cloud: &str, images: &[&str], extra: &str) -> String {
        let mut t = format!(
            "\n[[providers]]\nname = \"{name}\"\ncloud = \"{cloud}\"\nrate = 0.0\n{extra}\n"
        );
        for i in images {
            t.push_str(&format!(
                "[[providers.diskimages]]\nname = \"{i}\"\n[providers.diskimages.meta]\npurpose = \"test\"\n"
            ));
        }
        t
    }

    /// Image ids in a `dir-cloud` provider.
    pub fn cloud_images(&self, provider: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.cloud_dir(provider))
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .filter(|e| {
                        e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.')
                    })
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The `properties` file of a `dir-cloud` image.
    pub fn cloud_properties(&self, provider: &str, id: &str) -> String {
        std::fs::read_to_string(self.cloud_dir(provider).join(id).join("properties"))
            .unwrap_or_default()
    }

    /// Every readable upload of `image` as (build id, upload).
    pub fn uploads(&self, image: &str) -> Vec<(String, UploadInfo)> {
        self.builds(image)
            .into_iter()
            .flat_map(|b| b.uploads.into_iter().map(move |u| (b.id.clone(), u)))
            .collect()
    }

    /// Uploads of `image` to `provider` in `state`.
    pub fn uploads_in(
        &self,
        image: &str,
        provider: &str,
        state: UploadState,
    ) -> Vec<(String, UploadInfo)> {
        self.uploads(image)
            .into_iter()
            .filter(|(_, u)| u.provider == provider && u.upload.state == state)
            .collect()
    }

    /// Waits until `image` has at least `n` uploads to `provider` in `state`.
    #[track_caller]
    pub fn wait_uploads(
        &self,
        image: &str,
        provider: &str,
        state: UploadState,
        n: usize,
    ) -> Vec<(String, UploadInfo)> {
        self.wait(
            &format!("{n} {state} upload(s) of {image} to {provider}"),
            || {
                let u = self.uploads_in(image, provider, state);
                (u.len() >= n).then_some(u)
            },
        )
    }

    /// Nothing leaked: every image in the given `dir-cloud` providers has a `ready` or
    /// `deleting` upload record; every local image file of the given builders has a build
    /// record; no empty znode at build or upload depth.
    #[track_caller]
    pub fn assert_no_leaks(&self, providers: &[&str], builders: &[usize]) {
        let images: Vec<String> = self
            .zk
            .get_children(paths::IMAGE_ROOT)
            .unwrap()
            .unwrap_or_default();
        let mut external = std::collections::BTreeSet::new();
        for image in &images {
            for id in tree::build_ids(&self.zk, image).unwrap() {
                let bp = paths::image_build_path(image, &id);
                if let Some((data, _)) = self.zk.get_data(&bp).unwrap() {
                    assert!(!data.is_empty(), "empty build znode {bp}\n{}", self.dump());
                }
                for p in tree::build_providers(&self.zk, image, &id).unwrap() {
                    for u in tree::upload_ids(&self.zk, image, &id, &p).unwrap() {
                        let up = paths::image_upload_path(image, &id, &p, &u);
                        let data = self
                            .zk
                            .get_data(&up)
                            .unwrap()
                            .map(|(d, _)| d)
                            .unwrap_or_default();
                        assert!(!data.is_empty(), "empty upload znode {up}\n{}", self.dump());
                        let rec =
                            nodepool_builder::zk::schema::ImageUpload::from_json(&data).unwrap();
                        if matches!(rec.state, UploadState::Ready | UploadState::Deleting)
                            && let Some(x) = rec.external_id
                        {
                            external.insert((p.clone(), x));
                        }
                    }
                }
            }
        }
        for p in providers {
            for id in self.cloud_images(p) {
                assert!(
                    external.contains(&(p.to_string(), id.clone())),
                    "leaked cloud image {id} in {p}\n{}",
                    self.dump()
                );
            }
        }
        for n in builders {
            for (image, id) in
                nodepool_builder::local::builds_present(&self.images_dir(*n)).unwrap()
            {
                assert!(
                    self.zk
                        .exists(&paths::image_build_path(&image, &id))
                        .unwrap()
                        .is_some(),
                    "leaked local files of {image}-{id} in builder {n}\n{}",
                    self.dump()
                );
            }
        }
    }
}
