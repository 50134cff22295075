//! Real Glance 33 and Keystone 30 servers for tests, from the PyPI virtualenvs that
//! `scripts/glance-env.sh` installs under `target/test-env/` (real-services.md §b).
//!
//! * [`GlanceServer::shared`]: one Glance per test binary in fixed-identity mode (every
//!   request is project `nodepool-project`, any token or none is accepted). Tests share it
//!   by giving their providers unique names and looking only at images carrying their
//!   `nodepool_provider_name`.
//! * [`GlanceServer::start`]: a dedicated one, for tests that kill or restart it;
//!   [`GlanceServer::start_tls`] serves https with the ZooKeeper fixture's test certificates
//!   (uWSGI's own https socket), and [`GlanceServer::shared_tls`] is one such per test binary.
//! * [`KeystoneServer::shared`] and [`GlanceServer::shared_with_keystone`]: one Keystone per
//!   test binary, bootstrapped with the projects, users and image endpoints of §b.8, and a
//!   Glance that validates tokens against it. [`KeystoneOptions::token_expiration`] gives a
//!   dedicated Keystone short-lived tokens.
//!
//! # How a server runs
//!
//! Each server gets a fresh state directory under the test run directory (configuration,
//! sqlite database, image store, logs) and a loopback port probed free. Both run under
//! uWSGI in the foreground with the flags of §b.3 (`Connection: close` included). Glance
//! loads `tests/fixtures/glance/nodepool_sqlite_fix.py` (busy timeout and `BEGIN IMMEDIATE`
//! against sqlite's "database is locked") and, in fixed-identity mode,
//! `nodepool_fixed_identity.py`, with the pipelines of `glance-api-paste.ini`. The database
//! schema is made once per test binary (`db_sync` takes seconds) and copied into each new
//! server's directory.
//!
//! Glance is ready when `GET /healthcheck` answers 200 and `GET /` answers 300; Keystone when
//! `GET /v3` answers 200. A server that exits or is not ready within [`START_TIMEOUT`] fails
//! the test with its log tails; nothing here ever skips.
//!
//! # Lifetime
//!
//! CAUTION: like the ZooKeeper fixture, every uWSGI master is forked by the long-lived
//! spawner thread of [`super::zk::spawn_tied_to_process`], with `PR_SET_PDEATHSIG(SIGKILL)`
//! and a process group of its own; uWSGI's `--no-orphans` makes its workers follow a dead
//! master. Servers therefore die with the test binary however it ends. Dropping a server
//! kills its process group; the shared ones die with the process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use nodepool_builder::provider::openstack::parse_timestamp;
use serde_json::{Value, json};

use super::zk::{free_port, spawn_tied_to_process};
use super::{file_tail, poll_for, repo_root, run_dir};

/// How long a server may take to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound on each HTTP request the fixture makes.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// The project every fixed-identity request runs as (the `owner` of its images).
pub const FIXED_PROJECT: &str = "nodepool-project";

/// The Glance virtualenv.
pub fn glance_venv() -> PathBuf {
    repo_root().join("target/test-env/glance-venv")
}

/// The Keystone virtualenv.
pub fn keystone_venv() -> PathBuf {
    repo_root().join("target/test-env/keystone-venv")
}

/// `tests/fixtures/glance`.
pub fn fixtures_dir() -> PathBuf {
    repo_root().join("tests/fixtures/glance")
}

/// Runs `scripts/glance-env.sh <part>` once per part and process (it returns at once when
/// the venv is there). Panics with its output when it fails.
pub fn ensure_installed(part: &str) {
    static DONE: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.iter().any(|p| p == part) {
        return;
    }
    let script = repo_root().join("scripts/glance-env.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(part)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        panic!(
            "`{} {part}` failed ({}):\n{log}",
            script.display(),
            out.status
        );
    }
    done.push(part.to_string());
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// An answer of [`http`].
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub subject_token: Option<String>,
    pub body: Vec<u8>,
}

impl HttpReply {
    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("answer {} is not JSON ({e}): {}", self.status, self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        // The fixture only talks to its own servers: https without verification.
        let tls = ureq::tls::TlsConfig::builder()
            .unversioned_rustls_crypto_provider(std::sync::Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .disable_verification(true)
            .build();
        ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(HTTP_TIMEOUT))
            .max_redirects(0)
            .build()
            .into()
    })
}

/// One plain-HTTP request (with `Accept: application/json`, optional `X-Auth-Token` and a
/// JSON body, sent as a Glance JSON patch when it is an array). `Err` only when there was no
/// answer.
pub fn http(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<HttpReply, String> {
    let mut builder = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .header("Accept", "application/json");
    if let Some(token) = token {
        builder = builder.header("X-Auth-Token", token);
    }
    let result = match body {
        Some(body) => {
            // A JSON array can only be a Glance JSON patch; everything else is plain JSON.
            let content_type = if body.is_array() {
                "application/openstack-images-v2.1-json-patch"
            } else {
                "application/json"
            };
            let data = body.to_string().into_bytes();
            let req = builder
                .header("Content-Type", content_type)
                .body(data)
                .map_err(|e| e.to_string())?;
            agent().run(req)
        }
        None => agent().run(builder.body(()).map_err(|e| e.to_string())?),
    };
    let mut response = result.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = response.status().as_u16();
    let subject_token = response
        .headers()
        .get("x-subject-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .map_err(|e| format!("{method} {url}: reading the answer: {e}"))?;
    Ok(HttpReply {
        status,
        subject_token,
        body,
    })
}

/// Like [`http`], but panics unless the answer's status is `expect`.
#[track_caller]
pub fn http_expect(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
    expect: u16,
) -> HttpReply {
    let reply = http(method, url, token, body).unwrap_or_else(|e| panic!("{e}"));
    if reply.status != expect {
        panic!(
            "{method} {url}: expected HTTP {expect}, got {}: {}",
            reply.status,
            reply.text()
        );
    }
    reply
}

// ---------------------------------------------------------------------------------------
// uWSGI processes
// ---------------------------------------------------------------------------------------

/// A uWSGI master (and its workers, in its process group).
#[derive(Debug)]
struct UwsgiProcess {
    child: Child,
}

impl UwsgiProcess {
    fn spawn(mut cmd: Command, log: &Path) -> Result<UwsgiProcess, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let described = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .env("PYTHONWARNINGS", "ignore")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        let child =
            spawn_tied_to_process(cmd).map_err(|e| format!("cannot start {described}: {e}"))?;
        Ok(UwsgiProcess { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the master has exited.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("cannot wait: {e}")),
        }
    }

    /// SIGKILL to the whole process group (master and workers), then reap the master.
    fn kill(mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The uWSGI flags of real-services §b.3, without the app.
fn uwsgi_command(venv: &Path, port: u16, tls: Option<(&Path, &Path)>) -> Command {
    let mut cmd = Command::new(venv.join("bin/uwsgi"));
    cmd.args([
        "--master",
        "--die-on-term",
        "--need-app",
        "--lazy-apps",
        "--enable-threads",
        "--no-orphans",
    ])
    .args(["--processes", "1", "--threads", "4"])
    .args(match tls {
        None => ["--http-socket".to_string(), format!("127.0.0.1:{port}")],
        Some((cert, key)) => [
            "--https-socket".to_string(),
            format!("127.0.0.1:{port},{},{}", cert.display(), key.display()),
        ],
    })
    .args(["--add-header", "Connection: close"])
    .args([
        "--http-chunked-input",
        "--http-auto-chunked",
        "--chunked-input-limit",
        "16777216",
    ])
    .args([
        "--socket-timeout",
        "300",
        "--chunked-input-timeout",
        "300",
        "--buffer-size",
        "65535",
    ]);
    cmd
}

fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "<non-string panic>".into())
    })
}

/// Runs a setup command to completion, panicking with its output on failure.
fn run_setup(mut cmd: Command, what: &str) {
    let described = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .env("PYTHONWARNINGS", "ignore")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {described}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}): {described}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Glance
// ---------------------------------------------------------------------------------------

/// How a Glance authenticates requests.
#[derive(Debug, Clone)]
enum GlanceAuth {
    /// Every request is project [`FIXED_PROJECT`].
    FixedIdentity,
    /// keystonemiddleware against this Keystone; the fixture reads as the nodepool user.
    Keystone { keystone_url: String },
}

/// One Glance API server (uWSGI) and its state directory.
#[derive(Debug)]
pub struct GlanceServer {
    port: u16,
    auth: GlanceAuth,
    /// Serves https with the test certificates of [`super::zk::certs`].
    tls: bool,
    process: Option<UwsgiProcess>,
    pid: u32,
    /// How many times it has been started.
    generation: u32,
    /// CAUTION: declared last so it is removed after `Drop::drop` has killed the server.
    dir: tempfile::TempDir,
}

impl GlanceServer {
    /// Starts a dedicated Glance in fixed-identity mode and waits until it is ready.
    pub fn start() -> GlanceServer {
        GlanceServer::start_with(GlanceAuth::FixedIdentity, false)
    }

    /// Like [`GlanceServer::start`], serving https with the server certificate of
    /// [`super::zk::certs`] (signed by its test CA, valid for 127.0.0.1).
    pub fn start_tls() -> GlanceServer {
        GlanceServer::start_with(GlanceAuth::FixedIdentity, true)
    }

    /// Starts a dedicated Glance that validates tokens against `keystone`, and registers it
    /// in Keystone's catalog as the `public`, `internal` and `admin` image endpoint of
    /// region `RegionOne`. One such Glance per Keystone (the catalog would otherwise list
    /// several image endpoints per region); use [`GlanceServer::start_with_keystone_region`]
    /// for more.
    pub fn start_with_keystone(keystone: &KeystoneServer) -> GlanceServer {
        GlanceServer::start_with_keystone_region(keystone, KeystoneServer::REGION)
    }

    /// Like [`GlanceServer::start_with_keystone`], registered in `region` (created if needed).
    pub fn start_with_keystone_region(keystone: &KeystoneServer, region: &str) -> GlanceServer {
        let server = GlanceServer::start_with(
            GlanceAuth::Keystone {
                keystone_url: keystone.url(),
            },
            false,
        );
        keystone.add_image_endpoints(&server.url(), region);
        server
    }

    /// The fixed-identity Glance shared by every test of this binary, started on first use.
    /// Never kill or restart it.
    pub fn shared() -> &'static GlanceServer {
        static SHARED: OnceLock<Result<GlanceServer, String>> = OnceLock::new();
        match SHARED.get_or_init(|| catch_panic(GlanceServer::start)) {
            Ok(server) => server,
            Err(e) => panic!("the shared Glance server could not be started: {e}"),
        }
    }

    /// A fixed-identity Glance serving https (as [`GlanceServer::start_tls`]) shared by every
    /// test of this binary, started on first use. Never kill or restart it.
    pub fn shared_tls() -> &'static GlanceServer {
        static SHARED: OnceLock<Result<GlanceServer, String>> = OnceLock::new();
        match SHARED.get_or_init(|| catch_panic(GlanceServer::start_tls)) {
            Ok(server) => server,
            Err(e) => panic!("the shared https Glance server could not be started: {e}"),
        }
    }

    /// The Glance of [`KeystoneServer::shared`], in keystone mode, started on first use.
    pub fn shared_with_keystone() -> &'static GlanceServer {
        static SHARED: OnceLock<Result<GlanceServer, String>> = OnceLock::new();
        let keystone = KeystoneServer::shared();
        match SHARED.get_or_init(|| catch_panic(|| GlanceServer::start_with_keystone(keystone))) {
            Ok(server) => server,
            Err(e) => panic!("the shared keystone-mode Glance server could not be started: {e}"),
        }
    }

    fn start_with(auth: GlanceAuth, tls: bool) -> GlanceServer {
        ensure_installed("glance");
        let template = glance_template_db();
        let mut last_error = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("glance-")
                .tempdir_in(run_dir())
                .unwrap_or_else(|e| panic!("cannot create a Glance directory: {e}"));
            let mut server = GlanceServer {
                port: free_port(),
                auth: auth.clone(),
                tls,
                process: None,
                pid: 0,
                generation: 0,
                dir,
            };
            server.write_config();
            std::fs::copy(template, server.dir().join("glance.sqlite"))
                .unwrap_or_else(|e| panic!("cannot copy the Glance database template: {e}"));
            match server.launch() {
                Ok(()) => return server,
                Err(e) if e.contains("Address already in use") => last_error = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("Glance could not get a free port in 3 attempts; last failure:\n{last_error}")
    }

    /// `http://127.0.0.1:<port>` (`https://` for [`GlanceServer::start_tls`]): the
    /// unversioned image endpoint.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The state directory (`etc/`, `images/`, `log/`, `glance.sqlite`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The uWSGI master's pid. Panics when killed.
    pub fn pid(&self) -> u32 {
        assert!(
            self.process.is_some(),
            "pid() of a Glance server that is not running"
        );
        self.pid
    }

    /// Whether this Glance validates Keystone tokens.
    pub fn uses_keystone(&self) -> bool {
        matches!(self.auth, GlanceAuth::Keystone { .. })
    }

    /// Kills uWSGI (SIGKILL to its process group) and reaps it; state and port are kept for
    /// [`GlanceServer::restart`]. Does nothing when it is not running.
    pub fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill();
        }
    }

    /// Kills Glance if it runs, starts it again on the same port and state, and waits until
    /// it is ready.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.launch() {
            panic!("Glance restart failed: {e}");
        }
    }

    /// The last `n` lines of uWSGI's and Glance's logs.
    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "uwsgi.log:\n{}\nglance-api.log:\n{}",
            file_tail(&self.dir().join("log/uwsgi.log"), n),
            file_tail(&self.dir().join("log/glance-api.log"), n)
        )
    }

    /// A token the fixture's own reads can use (a nodepool member token in keystone mode).
    fn reader_token(&self) -> Option<String> {
        match &self.auth {
            GlanceAuth::FixedIdentity => None,
            GlanceAuth::Keystone { keystone_url } => Some(keystone_token(
                keystone_url,
                KeystoneServer::NODEPOOL_USER,
                KeystoneServer::NODEPOOL_PASSWORD,
                KeystoneServer::NODEPOOL_PROJECT,
            )),
        }
    }

    /// Every image the fixture's project sees (all statuses), following `next` links.
    /// Panics (with the log tail) when Glance does not answer.
    pub fn images(&self) -> Vec<Value> {
        let token = self.reader_token();
        let mut images = Vec::new();
        let mut path = "/v2/images?limit=1000".to_string();
        loop {
            let url = format!("{}{path}", self.url());
            let reply = http("GET", &url, token.as_deref(), None)
                .unwrap_or_else(|e| panic!("{e}\nGlance log tail:\n{}", self.log_tail(20)));
            assert_eq!(reply.status, 200, "GET {url}: {}", reply.text());
            let json = reply.json();
            images.extend(json["images"].as_array().cloned().unwrap_or_default());
            match json["next"].as_str() {
                Some(next) => path = next.to_string(),
                None => return images,
            }
        }
    }

    /// The images carrying `nodepool_provider_name = provider`.
    pub fn images_of(&self, provider: &str) -> Vec<Value> {
        self.images()
            .into_iter()
            .filter(|i| i["nodepool_provider_name"] == provider)
            .collect()
    }

    /// How many images the fixture's project sees.
    pub fn image_count(&self) -> usize {
        self.images().len()
    }

    /// One image, `None` when Glance answers 404.
    pub fn get_image(&self, id: &str) -> Option<Value> {
        let url = format!("{}/v2/images/{id}", self.url());
        let reply = http("GET", &url, self.reader_token().as_deref(), None)
            .unwrap_or_else(|e| panic!("{e}\nGlance log tail:\n{}", self.log_tail(20)));
        match reply.status {
            200 => Some(reply.json()),
            404 => None,
            other => panic!("GET {url}: HTTP {other}: {}", reply.text()),
        }
    }

    /// Deletes an image (404 is fine).
    pub fn delete_image(&self, id: &str) {
        let url = format!("{}/v2/images/{id}", self.url());
        let reply = http("DELETE", &url, self.reader_token().as_deref(), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(reply.status, 204 | 404),
            "DELETE {url}: HTTP {}: {}",
            reply.status,
            reply.text()
        );
    }

    /// Files in the image store (data of images, including data a 415 left behind).
    pub fn stored_files(&self) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(self.dir().join("images"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }

    fn write_config(&self) {
        let s = self.dir().to_path_buf();
        for sub in ["etc", "images", "staging", "tasks", "lock", "log", "cache"] {
            std::fs::create_dir_all(s.join(sub))
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", s.join(sub).display()));
        }
        std::fs::write(
            s.join("etc/glance-api.conf"),
            glance_conf(&s, &self.url(), &self.auth),
        )
        .unwrap_or_else(|e| panic!("cannot write glance-api.conf: {e}"));
    }

    fn launch(&mut self) -> Result<(), String> {
        self.generation += 1;
        let log = self.dir().join("log/uwsgi.log");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| {
                use std::io::Write;
                writeln!(
                    f,
                    "==== tests/util/glance.rs: starting Glance #{} ====",
                    self.generation
                )
            });
        let certs = self.tls.then(super::zk::certs);
        let tls = certs.map(|c| (c.server_cert.as_path(), c.server_key.as_path()));
        let mut cmd = uwsgi_command(&glance_venv(), self.port, tls);
        cmd.args(["--pythonpath", &fixtures_dir().to_string_lossy()])
            .args(["--import", "nodepool_sqlite_fix"])
            .args(["--module", "glance.wsgi.api:application"])
            .env("OS_GLANCE_CONFIG_DIR", self.dir().join("etc"))
            .current_dir(self.dir());
        let process = UwsgiProcess::spawn(cmd, &log)?;
        self.pid = process.pid();
        self.process = Some(process);
        let started = Instant::now();
        let base = self.url();
        let mut last = String::from("nothing checked yet");
        let ready = poll_for(START_TIMEOUT, || {
            if let Some(status) = self.process.as_mut().and_then(|p| p.exited()) {
                return Some(Err(format!("uWSGI exited during start-up ({status})")));
            }
            let health = http("GET", &format!("{base}/healthcheck"), None, None);
            let root = http("GET", &format!("{base}/"), None, None);
            match (health, root) {
                (Ok(h), Ok(r)) if h.status == 200 && r.status == 300 => Some(Ok(())),
                (h, r) => {
                    last = format!(
                        "/healthcheck: {}, /: {}",
                        h.map(|h| h.status.to_string()).unwrap_or_else(|e| e),
                        r.map(|r| r.status.to_string()).unwrap_or_else(|e| e)
                    );
                    None
                }
            }
        });
        let failure = match ready {
            Some(Ok(())) => {
                eprintln!(
                    "Glance pid {} ready on {} after {:.1?} (dir {})",
                    self.pid,
                    self.url(),
                    started.elapsed(),
                    self.dir().display()
                );
                return Ok(());
            }
            Some(Err(e)) => {
                self.process = None;
                e
            }
            None => {
                self.kill();
                format!("Glance was not ready within {START_TIMEOUT:?}; last check: {last}")
            }
        };
        Err(format!(
            "{failure}\nstate directory: {}\n{}",
            self.dir().display(),
            self.log_tail(40)
        ))
    }
}

impl Drop for GlanceServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn glance_conf(s: &Path, url: &str, auth: &GlanceAuth) -> String {
    let s = s.display();
    let (flavor, keystone) = match auth {
        GlanceAuth::FixedIdentity => ("fixedidentity", String::new()),
        GlanceAuth::Keystone { keystone_url } => (
            "keystone",
            format!(
                "\n[keystone_authtoken]\n\
                 www_authenticate_uri = {keystone_url}\n\
                 auth_url = {keystone_url}\n\
                 auth_type = password\n\
                 user_domain_name = Default\n\
                 project_domain_name = Default\n\
                 project_name = {project}\n\
                 username = {user}\n\
                 password = {password}\n\
                 # Validate every token at Keystone: expiry and revocation show at once.\n\
                 token_cache_time = -1\n",
                project = KeystoneServer::SERVICE_PROJECT,
                user = KeystoneServer::GLANCE_USER,
                password = KeystoneServer::GLANCE_PASSWORD,
            ),
        ),
    };
    format!(
        "# Written by tests/util/glance.rs.\n\
         [DEFAULT]\n\
         debug = false\n\
         log_file = {s}/log/glance-api.log\n\
         enabled_backends = fs:file\n\
         enabled_import_methods = [glance-direct,web-download,copy-image]\n\
         show_image_direct_url = true\n\
         public_endpoint = {url}\n\
         worker_self_reference_url = {url}\n\
         image_cache_dir = {s}/cache\n\
         \n\
         [database]\n\
         connection = sqlite:///{s}/glance.sqlite\n\
         \n\
         [paste_deploy]\n\
         flavor = {flavor}\n\
         config_file = {paste}\n\
         \n\
         [glance_store]\n\
         default_backend = fs\n\
         \n\
         [fs]\n\
         filesystem_store_datadir = {s}/images/\n\
         \n\
         [os_glance_staging_store]\n\
         filesystem_store_datadir = {s}/staging/\n\
         \n\
         [os_glance_tasks_store]\n\
         filesystem_store_datadir = {s}/tasks/\n\
         \n\
         [oslo_concurrency]\n\
         lock_path = {s}/lock\n\
         \n\
         [oslo_policy]\n\
         enforce_new_defaults = true\n\
         {keystone}",
        paste = fixtures_dir().join("glance-api-paste.ini").display(),
    )
}

/// A Glance database with the current schema, made once per test binary with `db_sync`.
fn glance_template_db() -> &'static Path {
    static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = TEMPLATE.get_or_init(|| {
        catch_panic(|| {
            let dir = run_dir().join("glance-template");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("log"))
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
            let conf = dir.join("glance-api.conf");
            std::fs::write(
                &conf,
                glance_conf(&dir, "http://127.0.0.1:9", &GlanceAuth::FixedIdentity),
            )
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
            let mut cmd = Command::new(glance_venv().join("bin/glance-manage"));
            cmd.arg("--config-file").arg(&conf).arg("db_sync");
            run_setup(cmd, "glance-manage db_sync");
            dir.join("glance.sqlite")
        })
    });
    match result {
        Ok(path) => path,
        Err(e) => panic!("cannot make the Glance database: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// Keystone
// ---------------------------------------------------------------------------------------

/// What kind of Keystone to start.
#[derive(Debug, Clone, Copy)]
pub struct KeystoneOptions {
    /// `[token] expiration`: how long tokens live.
    pub token_expiration: Duration,
}

impl Default for KeystoneOptions {
    fn default() -> Self {
        KeystoneOptions {
            token_expiration: Duration::from_secs(3600),
        }
    }
}

/// One Keystone (uWSGI), bootstrapped with the setup of real-services §b.8: admin
/// (`admin`/[`KeystoneServer::ADMIN_PASSWORD`] in project `admin`), projects `service` and
/// `nodepool`, users `glance` (admin on `service`) and `nodepool` (member on `nodepool`),
/// and the `image` service. Image endpoints are added by the Glance fixture.
#[derive(Debug)]
pub struct KeystoneServer {
    port: u16,
    opts: KeystoneOptions,
    process: Option<UwsgiProcess>,
    /// CAUTION: declared last so it is removed after `Drop::drop` has killed the server.
    dir: tempfile::TempDir,
}

impl KeystoneServer {
    pub const ADMIN_USER: &'static str = "admin";
    pub const ADMIN_PASSWORD: &'static str = "secret";
    pub const ADMIN_PROJECT: &'static str = "admin";
    pub const SERVICE_PROJECT: &'static str = "service";
    pub const GLANCE_USER: &'static str = "glance";
    pub const GLANCE_PASSWORD: &'static str = "glancepw";
    pub const NODEPOOL_PROJECT: &'static str = "nodepool";
    pub const NODEPOOL_USER: &'static str = "nodepool";
    pub const NODEPOOL_PASSWORD: &'static str = "nodepoolpw";
    pub const REGION: &'static str = "RegionOne";

    /// Starts and bootstraps a dedicated Keystone; waits until it is ready.
    pub fn start(opts: KeystoneOptions) -> KeystoneServer {
        ensure_installed("keystone");
        let template = keystone_template_db();
        let dir = tempfile::Builder::new()
            .prefix("keystone-")
            .tempdir_in(run_dir())
            .unwrap_or_else(|e| panic!("cannot create a Keystone directory: {e}"));
        let mut server = KeystoneServer {
            port: free_port(),
            opts,
            process: None,
            dir,
        };
        let k = server.dir().to_path_buf();
        for sub in ["etc", "fernet-keys", "credential-keys", "log"] {
            std::fs::create_dir_all(k.join(sub))
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", k.join(sub).display()));
        }
        std::fs::write(
            k.join("etc/keystone.conf"),
            keystone_conf(&k, opts.token_expiration),
        )
        .unwrap_or_else(|e| panic!("cannot write keystone.conf: {e}"));
        std::fs::copy(template, k.join("keystone.sqlite"))
            .unwrap_or_else(|e| panic!("cannot copy the Keystone database: {e}"));
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or("root".into());
        let group = nix::unistd::Group::from_gid(nix::unistd::getgid())
            .ok()
            .flatten()
            .map(|g| g.name)
            .unwrap_or("root".into());
        let manage = |args: &[&str]| {
            let mut cmd = Command::new(keystone_venv().join("bin/keystone-manage"));
            cmd.arg("--config-file")
                .arg(k.join("etc/keystone.conf"))
                .args(args);
            run_setup(cmd, &format!("keystone-manage {}", args[0]));
        };
        manage(&[
            "fernet_setup",
            "--keystone-user",
            &user,
            "--keystone-group",
            &group,
        ]);
        manage(&[
            "credential_setup",
            "--keystone-user",
            &user,
            "--keystone-group",
            &group,
        ]);
        let v3 = format!("{}/v3", server.url());
        manage(&[
            "bootstrap",
            "--bootstrap-password",
            Self::ADMIN_PASSWORD,
            "--bootstrap-admin-url",
            &v3,
            "--bootstrap-internal-url",
            &v3,
            "--bootstrap-public-url",
            &v3,
            "--bootstrap-region-id",
            Self::REGION,
        ]);
        if let Err(e) = server.launch() {
            panic!("{e}");
        }
        server.create_accounts();
        server
    }

    /// The Keystone shared by every test of this binary (default options), started on
    /// first use.
    pub fn shared() -> &'static KeystoneServer {
        static SHARED: OnceLock<Result<KeystoneServer, String>> = OnceLock::new();
        match SHARED
            .get_or_init(|| catch_panic(|| KeystoneServer::start(KeystoneOptions::default())))
        {
            Ok(server) => server,
            Err(e) => panic!("the shared Keystone server could not be started: {e}"),
        }
    }

    /// `http://127.0.0.1:<port>` (unversioned).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:<port>/v3`: what goes into clouds.yaml's `auth_url`.
    pub fn auth_url(&self) -> String {
        format!("{}/v3", self.url())
    }

    pub fn options(&self) -> KeystoneOptions {
        self.opts
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last `n` lines of uWSGI's and Keystone's logs.
    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "uwsgi.log:\n{}\nkeystone.log:\n{}",
            file_tail(&self.dir().join("log/uwsgi.log"), n),
            file_tail(&self.dir().join("log/keystone.log"), n)
        )
    }

    /// A project-scoped token for `user` (domain Default).
    pub fn token(&self, user: &str, password: &str, project: &str) -> String {
        keystone_token(&self.url(), user, password, project)
    }

    /// An admin token (project `admin`).
    pub fn admin_token(&self) -> String {
        self.token(Self::ADMIN_USER, Self::ADMIN_PASSWORD, Self::ADMIN_PROJECT)
    }

    /// Sends an admin request to `/v3/<path>` and panics unless the status is `expect`.
    #[track_caller]
    pub fn admin(&self, method: &str, path: &str, body: Option<&Value>, expect: u16) -> Value {
        let token = self.admin_token();
        let reply = http_expect(
            method,
            &format!("{}/v3/{path}", self.url()),
            Some(&token),
            body,
            expect,
        );
        if reply.body.is_empty() {
            Value::Null
        } else {
            reply.json()
        }
    }

    /// Creates a project in domain Default (or finds it); returns its id.
    pub fn create_project(&self, name: &str) -> String {
        let found = self.admin("GET", &format!("projects?name={name}"), None, 200);
        if let Some(id) = found["projects"][0]["id"].as_str() {
            return id.to_string();
        }
        let created = self.admin(
            "POST",
            "projects",
            Some(&json!({"project": {"name": name, "domain_id": "default"}})),
            201,
        );
        created["project"]["id"]
            .as_str()
            .expect("project id")
            .to_string()
    }

    /// Creates a user in domain Default with `role` on `project`; returns the user's id.
    pub fn create_user(&self, name: &str, password: &str, project: &str, role: &str) -> String {
        let project_id = self.create_project(project);
        let created = self.admin(
            "POST",
            "users",
            Some(
                &json!({"user": {"name": name, "password": password, "domain_id": "default",
                                   "default_project_id": project_id}}),
            ),
            201,
        );
        let user_id = created["user"]["id"].as_str().expect("user id").to_string();
        let roles = self.admin("GET", &format!("roles?name={role}"), None, 200);
        let role_id = roles["roles"][0]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no role {role}"))
            .to_string();
        self.admin(
            "PUT",
            &format!("projects/{project_id}/users/{user_id}/roles/{role_id}"),
            None,
            204,
        );
        user_id
    }

    /// The id of a user (by name, domain Default).
    pub fn user_id(&self, name: &str) -> String {
        let found = self.admin("GET", &format!("users?name={name}"), None, 200);
        found["users"][0]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no user {name}"))
            .to_string()
    }

    /// Enables or disables a user. Disabling revokes the user's tokens.
    pub fn set_user_enabled(&self, user_id: &str, enabled: bool) {
        self.admin(
            "PATCH",
            &format!("users/{user_id}"),
            Some(&json!({"user": {"enabled": enabled}})),
            200,
        );
    }

    /// Creates an application credential of `user` (who must have a role on `project`);
    /// returns `(id, secret)`.
    pub fn create_application_credential(
        &self,
        user: &str,
        password: &str,
        project: &str,
        name: &str,
    ) -> (String, String) {
        let token = self.token(user, password, project);
        let user_id = self.user_id(user);
        let reply = http_expect(
            "POST",
            &format!("{}/v3/users/{user_id}/application_credentials", self.url()),
            Some(&token),
            Some(&json!({"application_credential": {"name": name}})),
            201,
        );
        let json = reply.json();
        let credential = &json["application_credential"];
        (
            credential["id"]
                .as_str()
                .expect("application credential id")
                .to_string(),
            credential["secret"]
                .as_str()
                .expect("application credential secret")
                .to_string(),
        )
    }

    /// Registers `glance_url` as the public, internal and admin image endpoint in `region`.
    pub fn add_image_endpoints(&self, glance_url: &str, region: &str) {
        let regions = self.admin("GET", "regions", None, 200);
        if !regions["regions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["id"] == region)
        {
            self.admin(
                "POST",
                "regions",
                Some(&json!({"region": {"id": region}})),
                201,
            );
        }
        let services = self.admin("GET", "services?type=image", None, 200);
        let service_id = services["services"][0]["id"]
            .as_str()
            .expect("image service")
            .to_string();
        for interface in ["public", "internal", "admin"] {
            self.admin(
                "POST",
                "endpoints",
                Some(
                    &json!({"endpoint": {"service_id": service_id, "interface": interface,
                                           "url": glance_url, "region_id": region}}),
                ),
                201,
            );
        }
    }

    /// Projects, users, roles and the image service of §b.8.
    fn create_accounts(&self) {
        self.create_user(
            Self::GLANCE_USER,
            Self::GLANCE_PASSWORD,
            Self::SERVICE_PROJECT,
            "admin",
        );
        self.create_user(
            Self::NODEPOOL_USER,
            Self::NODEPOOL_PASSWORD,
            Self::NODEPOOL_PROJECT,
            "member",
        );
        self.admin(
            "POST",
            "services",
            Some(&json!({"service": {"type": "image", "name": "glance"}})),
            201,
        );
    }

    fn launch(&mut self) -> Result<(), String> {
        let log = self.dir().join("log/uwsgi.log");
        let mut cmd = uwsgi_command(&keystone_venv(), self.port, None);
        cmd.args(["--module", "keystone.wsgi.api:application"])
            .env("OS_KEYSTONE_CONFIG_DIR", self.dir().join("etc"))
            .current_dir(self.dir());
        let process = UwsgiProcess::spawn(cmd, &log)?;
        let pid = process.pid();
        self.process = Some(process);
        let started = Instant::now();
        let url = format!("{}/v3", self.url());
        let mut last = String::from("nothing checked yet");
        let ready = poll_for(START_TIMEOUT, || {
            if let Some(status) = self.process.as_mut().and_then(|p| p.exited()) {
                return Some(Err(format!("uWSGI exited during start-up ({status})")));
            }
            match http("GET", &url, None, None) {
                Ok(reply) if reply.status == 200 => Some(Ok(())),
                Ok(reply) => {
                    last = format!("GET /v3: {}", reply.status);
                    None
                }
                Err(e) => {
                    last = e;
                    None
                }
            }
        });
        let failure = match ready {
            Some(Ok(())) => {
                eprintln!(
                    "Keystone pid {pid} ready on {} after {:.1?}",
                    self.url(),
                    started.elapsed()
                );
                return Ok(());
            }
            Some(Err(e)) => {
                self.process = None;
                e
            }
            None => {
                if let Some(p) = self.process.take() {
                    p.kill();
                }
                format!("Keystone was not ready within {START_TIMEOUT:?}; last check: {last}")
            }
        };
        Err(format!(
            "{failure}\nstate directory: {}\n{}",
            self.dir().display(),
            self.log_tail(40)
        ))
    }
}

impl Drop for KeystoneServer {
    fn drop(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill();
        }
    }
}

fn keystone_conf(k: &Path, expiration: Duration) -> String {
    let k = k.display();
    format!(
        "# Written by tests/util/glance.rs.\n\
         [DEFAULT]\n\
         log_file = {k}/log/keystone.log\n\
         \n\
         [database]\n\
         connection = sqlite:///{k}/keystone.sqlite\n\
         \n\
         [token]\n\
         provider = fernet\n\
         expiration = {expiration}\n\
         \n\
         [fernet_tokens]\n\
         key_repository = {k}/fernet-keys/\n\
         \n\
         [fernet_receipts]\n\
         key_repository = {k}/fernet-keys/\n\
         \n\
         [credential]\n\
         key_repository = {k}/credential-keys/\n",
        expiration = expiration.as_secs().max(1),
    )
}

/// A Keystone database with the current schema, made once per test binary.
fn keystone_template_db() -> &'static Path {
    static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = TEMPLATE.get_or_init(|| {
        catch_panic(|| {
            let dir = run_dir().join("keystone-template");
            let _ = std::fs::remove_dir_all(&dir);
            for sub in ["etc", "log", "fernet-keys", "credential-keys"] {
                std::fs::create_dir_all(dir.join(sub))
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
            }
            let conf = dir.join("etc/keystone.conf");
            std::fs::write(&conf, keystone_conf(&dir, Duration::from_secs(3600)))
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
            let mut cmd = Command::new(keystone_venv().join("bin/keystone-manage"));
            cmd.arg("--config-file").arg(&conf).arg("db_sync");
            run_setup(cmd, "keystone-manage db_sync");
            dir.join("keystone.sqlite")
        })
    });
    match result {
        Ok(path) => path,
        Err(e) => panic!("cannot make the Keystone database: {e}"),
    }
}

/// A project-scoped token from the Keystone at `url` (unversioned) for a Default-domain
/// user; panics when Keystone refuses. Tokens are reused for the first half of their
/// lifetime (fetching one costs a few hundred milliseconds).
pub fn keystone_token(url: &str, user: &str, password: &str, project: &str) -> String {
    type Key = (String, String, String, String);
    static CACHE: Mutex<Vec<(Key, String, SystemTime)>> = Mutex::new(Vec::new());
    let key: Key = (
        url.to_string(),
        user.to_string(),
        password.to_string(),
        project.to_string(),
    );
    let now = SystemTime::now();
    {
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|(_, _, reuse_until)| *reuse_until > now);
        if let Some((_, token, _)) = cache.iter().find(|(k, _, _)| *k == key) {
            return token.clone();
        }
    }
    let body = json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"id": "default"}, "password": password}}},
        "scope": {"project": {"name": project, "domain": {"id": "default"}}}}});
    let reply = http_expect(
        "POST",
        &format!("{url}/v3/auth/tokens"),
        None,
        Some(&body),
        201,
    );
    let token = reply
        .subject_token
        .clone()
        .expect("Keystone's answer has no X-Subject-Token");
    let json = reply.json();
    let stamp = |key: &str| json["token"][key].as_str().and_then(parse_timestamp);
    if let (Some(issued), Some(expires)) = (stamp("issued_at"), stamp("expires_at")) {
        let half = expires.duration_since(issued).unwrap_or_default() / 2;
        CACHE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((key, token.clone(), issued + half));
    }
    token
}

// ---------------------------------------------------------------------------------------
// Test images
// ---------------------------------------------------------------------------------------

/// Writes `bytes` of random data to `dir/<name>.raw` and converts it with `qemu-img` to
/// `format` (`qcow2`, `raw`, `vhd` (`-O vpc -o force_size=on`), `vmdk`); returns the path of
/// `dir/<name>.<format>`. Random data keeps the images incompressible, so sizes are real.
pub fn qemu_image(dir: &Path, name: &str, format: &str, bytes: u64) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    write_random(&raw, bytes);
    if format == "raw" {
        return raw;
    }
    let out = dir.join(format!("{name}.{format}"));
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-q", "-f", "raw"]);
    match format {
        "vhd" => cmd.args(["-O", "vpc", "-o", "force_size=on"]),
        other => cmd.args(["-O", other]),
    };
    cmd.arg(&raw).arg(&out);
    if super::zk::find_in_path("qemu-img").is_none() {
        ensure_installed("glance");
    }
    run_setup(cmd, "qemu-img convert");
    let _ = std::fs::remove_file(&raw);
    out
}

/// `bytes` of random data (from the kernel) written to `path`.
pub fn write_random(path: &Path, bytes: u64) {
    use std::io::{Read, Write};
    let mut urandom = std::fs::File::open("/dev/urandom").expect("cannot open /dev/urandom");
    let mut file = std::fs::File::create(path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        urandom
            .read_exact(&mut buf[..n])
            .expect("cannot read /dev/urandom");
        file.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        left -= n as u64;
    }
}
