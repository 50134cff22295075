//! moto's server (PyPI `moto[server]`, the exact version `scripts/moto-env.sh` pins) on a
//! loopback port, for the AWS driver's tests: the real S3, EBS direct and EC2 image APIs of a
//! server process that speaks AWS's wire protocols, reached the way a site reaches AWS
//! through a private endpoint, the standard `AWS_ENDPOINT_URL`.
//!
//! Each [`MotoServer`] is its own process (its state is in memory, so tests never see each
//! other's AMIs), killed when dropped, logging into its own directory under the test run
//! directory. [`MotoServer::env`] is what a builder process gets: the endpoint, fake
//! credentials, region `us-east-1`, and `AWS_CONFIG_FILE` / `AWS_SHARED_CREDENTIALS_FILE`
//! pointing at empty files of the test so nothing of the host's `~/.aws` leaks in.
//! [`MotoServer::boto3`] runs a Python snippet with boto3 clients bound to the server, so a
//! test can look at what a builder registered with the same library the reference
//! implementation uses.
//!
//! What moto 5.2.5 does and does not do (checked against its source and by calling it):
//! * EBS direct `StartSnapshot` / `PutSnapshotBlock` / `CompleteSnapshot` work, and the
//!   snapshot (with its tags) shows up in EC2 `DescribeSnapshots`.
//! * `RegisterImage` keeps only `Name` and `Description`: the block device mapping,
//!   architecture, ENA, IMDS, boot mode and `TagSpecifications` of the request are dropped,
//!   and the AMI gets a fresh 15 GiB `standard` snapshot of moto's own. Tests that care what
//!   a builder asked for must look at the request, not at `DescribeImages`.
//! * `ImportSnapshot`, `DescribeImportSnapshotTasks`, `ImportImage` and
//!   `DescribeImportImageTasks` are not implemented (HTTP 500, `NotImplementedError`).
//!
//! The one STAND-IN: for the `snapshot` and `image` import methods,
//! [`MotoServer::start_with_import_standin`] puts `tests/fixtures/python/aws-import-standin.py`
//! in front of moto. It answers only the four VM Import actions moto lacks, doing their work
//! on moto's real S3 and EBS direct APIs (and RegisterImage for `ImportImage`), and forwards
//! every other request unchanged; its docstring says exactly what it does. It also keeps a
//! journal of every request ([`MotoServer::requests`]), the way to see what a builder asked
//! `RegisterImage` for. Clients sign requests for the stand-in's host, which is the Host
//! header moto receives, and moto does not check signatures in any case.
//!
//! Missing venv: [`venv`] runs `scripts/test-env.sh moto`; if it is still missing the test
//! fails (never skips).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::glance::http;
use super::zk::{free_port, spawn_tied_to_process};
use super::{file_tail, keep_after_failure, poll_for, repo_root, run_dir, sanitize};

/// How long moto's server may take to answer after it was started.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one [`MotoServer::boto3`] snippet may run.
pub const BOTO3_TIMEOUT: Duration = Duration::from_secs(120);

/// The region every client of the test tooling uses.
pub const REGION: &str = "us-east-1";

/// The moto virtualenv (with boto3), installed on first use; panics when it cannot be had.
pub fn venv() -> PathBuf {
    super::ensure_test_env(&["moto"]);
    let venv = repo_root().join("target/test-env/moto-venv");
    assert!(
        venv.join("bin/moto_server").is_file(),
        "no moto_server in {} after `scripts/test-env.sh moto`",
        venv.display()
    );
    venv
}

/// One moto server process on a loopback port, with its directory (log, AWS config files,
/// snippets). Killed when dropped.
#[derive(Debug)]
pub struct MotoServer {
    port: u16,
    child: Option<Child>,
    /// The import stand-in in front of moto: its port and process.
    standin: Option<(u16, Child)>,
    /// CAUTION: declared last so it is removed after `Drop::drop` has killed the server.
    dir: tempfile::TempDir,
}

impl MotoServer {
    /// Starts moto's server for the test `name` and waits until it answers.
    pub fn start(name: &str) -> MotoServer {
        let venv = venv();
        let dir = tempfile::Builder::new()
            .prefix(&format!("moto-{}-", sanitize(name)))
            .tempdir_in(run_dir())
            .unwrap_or_else(|e| panic!("cannot create a moto directory: {e}"));
        // Empty AWS config files: boto3 and our builder read these instead of ~/.aws.
        for file in ["aws-config", "aws-credentials"] {
            std::fs::write(dir.path().join(file), "")
                .unwrap_or_else(|e| panic!("cannot write {file}: {e}"));
        }
        let port = free_port();
        let log = dir.path().join("moto.log");
        let mut cmd = Command::new(venv.join("bin/moto_server"));
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let child = spawn_logged(cmd, &log);
        let mut server = MotoServer {
            port,
            child: Some(child),
            standin: None,
            dir,
        };
        server.wait_ready("moto_server", "moto.log");
        server
    }

    /// Like [`MotoServer::start`], with the EC2 import stand-in
    /// (`tests/fixtures/python/aws-import-standin.py`) in front of moto: `ImportSnapshot`,
    /// `ImportImage` and their `Describe…Tasks` are answered by the stand-in (moto lacks
    /// them), everything else is forwarded to moto. [`MotoServer::endpoint`] is then the
    /// stand-in's, and [`MotoServer::requests`] lists what clients sent.
    pub fn start_with_import_standin(name: &str) -> MotoServer {
        // The stand-in converts non-raw images with qemu-img.
        super::ensure_test_env(&["qemu"]);
        let mut server = MotoServer::start(name);
        let port = free_port();
        let mut cmd = Command::new(venv().join("bin/python"));
        cmd.arg(repo_root().join("tests/fixtures/python/aws-import-standin.py"))
            .args(["--listen", &port.to_string(), "--moto", &server.moto_url()])
            .arg("--journal")
            .arg(server.journal_path())
            .env("AWS_DEFAULT_REGION", REGION);
        let child = spawn_logged(cmd, &server.dir.path().join("standin.log"));
        server.standin = Some((port, child));
        server.wait_ready("the import stand-in", "standin.log");
        server
    }

    /// Waits until [`MotoServer::endpoint`] answers (through the stand-in when there is one).
    fn wait_ready(&mut self, what: &str, log: &str) {
        let url = format!("{}/moto-api/data.json", self.endpoint());
        let ready = poll_for(START_TIMEOUT, || {
            let children = [self.child.as_mut(), self.standin.as_mut().map(|(_, c)| c)];
            for child in children.into_iter().flatten() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(Err(format!("{what}: a server process exited: {status}")));
                }
            }
            match http("GET", &url, None, None) {
                Ok(reply) if reply.status == 200 => Some(Ok(())),
                _ => None,
            }
        });
        let failure = match ready {
            Some(Ok(())) => return,
            Some(Err(e)) => e,
            None => format!("{what} did not answer {url} within {START_TIMEOUT:?}"),
        };
        panic!(
            "{failure}; {log}:\n{}",
            file_tail(&self.dir.path().join(log), 30)
        );
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.path().join("standin-requests.jsonl")
    }

    /// Every request that went through the import stand-in, in order, as JSON objects:
    /// `{"action", "params", "status"}` for EC2 query-API requests (`params` flat, as sent:
    /// `BlockDeviceMapping.1.Ebs.VolumeType`, …), `{"method", "path", "status"}` for the
    /// others, with `"json"` the body when it was small JSON (EBS direct's `StartSnapshot`
    /// with its tags). Panics when there is no stand-in. This is how a test sees what a builder asked
    /// `RegisterImage` for: moto keeps only the name.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        assert!(
            self.standin.is_some(),
            "requests() needs MotoServer::start_with_import_standin"
        );
        let text = std::fs::read_to_string(self.journal_path()).unwrap_or_default();
        text.lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("bad stand-in journal line ({e}): {l}"))
            })
            .collect()
    }

    /// The URL of moto itself.
    fn moto_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The endpoint clients use (`AWS_ENDPOINT_URL`): the import stand-in's when there is
    /// one, moto's otherwise.
    pub fn endpoint(&self) -> String {
        match &self.standin {
            Some((port, _)) => format!("http://127.0.0.1:{port}"),
            None => self.moto_url(),
        }
    }

    /// The address behind [`MotoServer::endpoint`], for a fault proxy in front of it.
    pub fn endpoint_addr(&self) -> std::net::SocketAddr {
        let port = self.standin.as_ref().map_or(self.port, |(port, _)| *port);
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// The server's directory (its log is `moto.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The environment of a process that talks to this server as if it were AWS: the
    /// endpoint, fake credentials, the region, and AWS config files of the test (never the
    /// host's `~/.aws`).
    pub fn env(&self) -> Vec<(String, String)> {
        let file = |f: &str| self.dir.path().join(f).display().to_string();
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "testing-access-key".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "testing-secret-key".to_string()),
            ("AWS_DEFAULT_REGION", REGION.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_CONFIG_FILE", file("aws-config")),
            ("AWS_SHARED_CREDENTIALS_FILE", file("aws-credentials")),
            // No instance-metadata credential look-ups against a link-local address.
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Runs `python_code` in the moto venv with boto3 clients `ec2`, `ebs` and `s3` bound to
    /// this server (and `json`, plus `out(value)` printing a value as sorted JSON) and
    /// returns its stdout. Panics with stdout and stderr when it fails or outlives
    /// [`BOTO3_TIMEOUT`].
    pub fn boto3(&self, python_code: &str) -> String {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = self.dir.path();
        let script = d.join(format!("snippet-{n}.py"));
        let (stdout, stderr) = (
            d.join(format!("snippet-{n}.out")),
            d.join(format!("snippet-{n}.err")),
        );
        std::fs::write(&script, format!("{BOTO3_PRELUDE}\n{python_code}\n"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", script.display()));
        let mut cmd = Command::new(venv().join("bin/python"));
        cmd.arg(&script)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("PYTHONWARNINGS", "ignore")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(file_for(&stdout))
            .stderr(file_for(&stderr));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let status = poll_for(BOTO3_TIMEOUT, || child.try_wait().ok().flatten());
        let out = std::fs::read_to_string(&stdout).unwrap_or_default();
        let described = || {
            format!(
                "--- stdout ---\n{out}\n--- stderr ---\n{}",
                file_tail(&stderr, 40)
            )
        };
        match status {
            Some(s) if s.success() => out,
            Some(s) => panic!(
                "boto3 snippet {} failed ({s}):\n{}",
                script.display(),
                described()
            ),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "boto3 snippet {} still running after {BOTO3_TIMEOUT:?}:\n{}",
                    script.display(),
                    described()
                )
            }
        }
    }

    /// The last lines of moto's log and the stand-in's (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let mut tail = format!(
            "--- moto.log ---\n{}",
            file_tail(&self.dir.path().join("moto.log"), lines)
        );
        if self.standin.is_some() {
            tail += &format!(
                "\n--- standin.log ---\n{}",
                file_tail(&self.dir.path().join("standin.log"), lines)
            );
        }
        tail
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let standin = self.standin.take().map(|(_, c)| c);
        for mut child in standin.into_iter().chain(self.child.take()) {
            // Its own process group (spawn_tied_to_process): kill the server and anything it
            // started.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
        }
        keep_after_failure(&mut self.dir);
    }
}

/// What every [`MotoServer::boto3`] snippet starts with.
const BOTO3_PRELUDE: &str = r#"
import json
import boto3

ec2 = boto3.client("ec2")
ebs = boto3.client("ebs")
s3 = boto3.client("s3")


def out(value):
    print(json.dumps(value, default=str, sort_keys=True))
"#;

fn file_for(path: &Path) -> std::fs::File {
    std::fs::File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
}

/// Spawns `cmd` in its own process group, tied to this test process, with stdout and stderr
/// appended to `log`.
fn spawn_logged(mut cmd: Command, log: &Path) -> Child {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    let described = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().expect("cannot clone a log file handle"))
        .stderr(file)
        .env("PYTHONWARNINGS", "ignore")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    spawn_tied_to_process(cmd).unwrap_or_else(|e| panic!("cannot start {described}: {e}"))
}
