//! Shared test tooling: waits with deadlines, per-test directories, and the real services
//! the tests run against. Tests wait only with [`wait_until`] / [`wait_for`] (a bare sleep
//! is never a synchronisation), and most start from a [`site::TestSite`].
//!
//! Everything a test run leaves on disk lives under one directory per test process,
//! [`run_dir`], inside Cargo's `target/tmp`. Directories of test processes that are no longer
//! alive are swept away the first time a later run asks for its own.
//!
//! Missing software is installed by `scripts/test-env.sh`; fixtures run it themselves when
//! what they need is absent, and fail (never skip) when it still cannot be had.
//!
//! # Helper map
//!
//! One line per file of `tests/util` and per public item of each (`tidy::` checks that the
//! map and the files agree, so a new helper cannot be left out).
//!
//! * `mod.rs`: waits, scratch directories, processes.
//!   - [`wait_until`]: poll a condition with back-off until it holds; panic naming what was
//!     awaited after the deadline.
//!   - [`wait_for`]: the same for a condition that produces a value.
//!   - [`poll_for`]: the non-panicking core of [`wait_for`], for fixtures adding context.
//!   - [`repo_root`]: the repository root.
//!   - [`run_dir`]: this test process's scratch directory under `target/tmp`.
//!   - [`test_dir`]: a unique directory per test, removed when dropped.
//!   - [`ensure_test_env`]: run `scripts/test-env.sh` for some parts, once per process.
//!   - [`sanitize`]: a test name made fit for file and znode names.
//!   - [`file_tail`]: the last lines of a file (for failure messages).
//!   - [`keep_after_failure`]: keep a failed test's directory and say where it is.
//!   - [`cpu_secs`]: user + system CPU seconds of a process.
//!   - [`process_alive`]: whether a pid is a live (non-zombie) process.
//! * [`aws`]: the aws driver's inputs for tests that call it directly.
//!   - [`aws::aws_provider`]: an aws provider uploading `debian` with an import method.
//!   - [`aws::aws_driver`]: its driver in a given AWS environment, not the test process's.
//!   - [`aws::upload_request`]: an upload request with nodepool's tags.
//! * [`builder`]: the real `nodepool-builder` binary as a child process of a test.
//!   - [`builder::binary`]: the path of the binary under test.
//!   - [`builder::Launch`]: how to start it beyond arguments: a wrapper, variables unset.
//!   - [`builder::BuilderProcess`]: a running builder: its log, waits for log lines, signals.
//! * [`ensemble`]: a three-member TLS ZooKeeper ensemble on loopback, for failover tests.
//!   - [`ensemble::SERVE_TIMEOUT`]: how long the ensemble may take to elect a leader.
//!   - [`ensemble::Ensemble`]: three ZooKeeper JVMs; kill, restart, wait until serving.
//! * [`faultproxy`]: an HTTP proxy in front of a real Glance that injects faults.
//!   - [`faultproxy::Fault`]: what a matching request gets (500/503/415, a stall, a vanish).
//!   - [`faultproxy::Rule`]: a request pattern and its fault.
//!   - [`faultproxy::FaultProxy`]: a running proxy on a loopback port; rules set and cleared.
//! * [`glance`]: real Glance 33 and Keystone 30 servers from PyPI virtualenvs, and images.
//!   - [`glance::START_TIMEOUT`]: how long a server may take to become ready.
//!   - [`glance::FIXED_PROJECT`]: the project of every fixed-identity request.
//!   - [`glance::glance_venv`]: the Glance virtualenv.
//!   - [`glance::keystone_venv`]: the Keystone virtualenv.
//!   - [`glance::fixtures_dir`]: the directory `tests/fixtures/glance`.
//!   - [`glance::ensure_installed`]: run `scripts/glance-env.sh` for a part, once per process.
//!   - [`glance::HttpReply`]: an answer of [`glance::http`].
//!   - [`glance::http`]: one plain-HTTP JSON request.
//!   - [`glance::http_expect`]: the same, panicking unless the status is the expected one.
//!   - [`glance::GlanceServer`]: one Glance API server (shared, or a test's own).
//!   - [`glance::KeystoneOptions`]: what kind of Keystone to start.
//!   - [`glance::KeystoneServer`]: one bootstrapped Keystone: projects, users, tokens.
//!   - [`glance::keystone_token`]: a project-scoped token for a user.
//!   - [`glance::qemu_image`]: a real image file of a format, made by `qemu-img`.
//!   - [`glance::write_random`]: a file of random bytes.
//! * [`invariants`]: the invariants fault-injection tests check, continuously and at the end.
//!   - [`invariants::CloudSpec`]: a provider the invariants know: its cloud and images.
//!   - [`invariants::Cloud`]: where a provider's images live (directory cloud or Glance).
//!   - [`invariants::Checker`]: checks the invariants of one site (sample, final check).
//!   - [`invariants::now`]: seconds since the epoch, like the records' `state_time`.
//!   - [`invariants::cloud_images`]: image ids in a directory cloud.
//!   - [`invariants::Sampler`]: a thread sampling a [`invariants::Checker`] until stopped.
//! * [`moto`]: moto's server (S3, EBS direct, EC2 images) on loopback, and boto3 against it.
//!   - [`moto::START_TIMEOUT`]: how long the server may take to answer.
//!   - [`moto::BOTO3_TIMEOUT`]: how long one boto3 snippet may run.
//!   - [`moto::REGION`]: the region every client uses.
//!   - [`moto::venv`]: the moto virtualenv (with boto3), installed on first use.
//!   - [`moto::MotoServer`]: one server process: endpoint, a builder's environment, boto3
//!     snippets.
//! * [`nodepool`]: the Python nodepool 11 CLI and runners comparing it with our subcommands.
//!   - [`nodepool::CLI_TIMEOUT`]: how long one CLI call may take.
//!   - [`nodepool::nodepool_bin`]: the venv's `nodepool` script, installed on first use.
//!   - [`nodepool::DiskImage`]: one diskimage of the Python CLI's config.
//!   - [`nodepool::NodepoolCli`]: the Python CLI configured for one chroot.
//!   - [`nodepool::ops`]: run one of our operator subcommands to completion.
//!   - [`nodepool::ops_ok`]: the same, for one that must succeed; its stdout.
//!   - [`nodepool::describe`]: exit status, stdout and stderr, labelled.
//!   - [`nodepool::Table`]: a printed PrettyTable, parsed into frame lines and cells.
//!   - [`nodepool::age_seconds`]: seconds in a `DD:HH:MM:SS` age.
//! * [`prometheus`]: a real Prometheus server scraping a builder, and `promtool`.
//!   - [`prometheus::binary`]: one binary of Debian's prometheus package, installed if missing.
//!   - [`prometheus::promtool_check_metrics`]: `promtool check metrics` on a scrape's text.
//!   - [`prometheus::Prometheus`]: a running server on loopback; PromQL queries, waits for a value.
//! * [`python`]: the kazoo virtualenv and the Python helper scripts in
//!   `tests/fixtures/python/`.
//!   - [`python::RUN_TIMEOUT`]: how long [`python::run_kazoo`] lets a script run.
//!   - [`python::kazoo_python`]: the kazoo virtualenv's python, installed on first use.
//!   - [`python::kazoo_command`]: the command running one helper script.
//!   - [`python::run_kazoo`]: run a helper script to completion.
//!   - [`python::run_kazoo_ok`]: the same, for one that must exit 0; its stdout.
//!   - [`python::kz_tls_args`]: `kz.py` connection arguments over TLS with the client cert.
//!   - [`python::kz_plain_args`]: `kz.py` connection arguments over plaintext.
//!   - [`python::kz_args`]: connection arguments and a sub-command in one list.
//!   - [`python::describe_output`]: a script's stdout and stderr, labelled.
//!   - [`python::KazooChild`]: a running helper script with piped stdio, killed when dropped.
//! * [`site`]: one nodepool site per test.
//!   - [`site::TRUST_ENV_VARS`]: the variables that decide which CAs the OpenStack driver
//!     trusts.
//!   - [`site::ONE_IMAGE`]: one qcow2 diskimage `fedora`, a config body.
//!   - [`site::WAIT`]: the default wait for something the builder does.
//!   - [`site::fake_dib`]: the test image builder script, `tests/fixtures/fake-dib`.
//!   - [`site::TestSite`]: a ZooKeeper chroot, configs, builder processes and clouds, with
//!     the waits and record look-ups tests assert on.
//! * [`tmpfs`]: a small tmpfs a test mounts (as root) to fill a file system for real.
//!   - [`tmpfs::Tmpfs`]: the mount, with fillers; unmounted when dropped.
//! * [`upstream`]: the Python nodepool-builder 11 daemon and the `nodepool.yaml` it reads,
//!   for the benchmark and the mixed-fleet tests.
//!   - [`upstream::START_TIMEOUT`]: how long the Python daemon may take to start.
//!   - [`upstream::venv`]: the nodepool virtualenv, installed on first use.
//!   - [`upstream::YamlProvider`]: one OpenStack provider of a [`upstream::NodepoolYaml`].
//!   - [`upstream::NodepoolYaml`]: the inputs of one `nodepool.yaml`, rendered to text.
//!   - [`upstream::AwsYamlProvider`]: one AWS provider of a `nodepool.yaml` (for moto).
//!   - [`upstream::AWS_LAUNCH_TIMEOUT`]: how long [`upstream::aws_launch`] may take.
//!   - [`upstream::aws_launch`]: boot and delete one node from an AMI with nodepool 11's
//!     AWS driver.
//!   - [`upstream::write_config`]: the benchmark's `nodepool.yaml` for a site.
//!   - [`upstream::UpstreamOptions`]: how to start one Python builder.
//!   - [`upstream::UpstreamBuilder`]: a running Python nodepool-builder.
//! * [`zk`]: real ZooKeeper 3.8 servers from the Debian package (one shared TLS server per
//!   test binary, dedicated ones for fault injection) and the test certificates.
//!   - [`zk::START_TIMEOUT`]: how long a server may take to become ready.
//!   - [`zk::CLASSPATH`]: the jars on the server's classpath.
//!   - [`zk::ZkOptions`]: what kind of server to start.
//!   - [`zk::Certs`]: the test CA, server and client certificates (and another CA's).
//!   - [`zk::certs`]: the test certificates, made on first use.
//!   - [`zk::ZkServer`]: one ZooKeeper server: shared or dedicated, freeze, kill, restart.
//!   - [`zk::four_letter_to`]: send a four-letter word to a port, read the answer.
//!   - [`zk::free_port`]: a free loopback port not handed out before in this process.
//!   - [`zk::spawn_tied_to_process`]: spawn a child that dies with this test process.
//!   - [`zk::ensure_zookeeper_installed`]: java and the jars, installed if missing.
//!   - [`zk::find_in_path`]: the first file of a name on `PATH`.
//!   - [`zk::tls_config_lines`]: zoo.cfg lines of a TLS client port with the test certs.
//! * [`zkproxy`]: a TCP proxy in front of ZooKeeper that loses or holds back one chosen reply.
//!   - [`zkproxy::SET_DATA`]: the request type of a setData.
//!   - [`zkproxy::CREATE`]: the request types of a create.
//!   - [`zkproxy::DELETE`]: the request type of a delete.
//!   - [`zkproxy::GET_CHILDREN`]: the request types of a children list.
//!   - [`zkproxy::MULTI`]: the request type of a multi (matched by its first operation).
//!   - [`zkproxy::ZkProxy`]: a running proxy; cut the reply of the next matching request, or
//!     hold it back until released.

// Not every test module uses every helper.
#![allow(dead_code)]

pub mod aws;
pub mod builder;
pub mod ensemble;
pub mod faultproxy;
pub mod glance;
pub mod invariants;
pub mod moto;
pub mod nodepool;
pub mod prometheus;
pub mod python;
pub mod site;
pub mod tmpfs;
pub mod upstream;
pub mod zk;
pub mod zkproxy;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The longest pause between two polls of a condition.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `f` until it returns true, sleeping between polls with a back-off from 1 ms up to
/// 50 ms. Panics with `timed out after <timeout>: waiting for <what>` when `timeout` passes
/// first. `f` is always called at least once, and once more after the deadline.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    wait_for(timeout, what, || f().then_some(()))
}

/// Like [`wait_until`], for conditions that produce a value: polls `f` until it returns
/// `Some` and returns the value.
#[track_caller]
pub fn wait_for<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    match poll_for(timeout, f) {
        Some(v) => v,
        None => panic!("timed out after {timeout:?}: waiting for {what}"),
    }
}

/// The non-panicking core of [`wait_for`]: `None` when `timeout` passed without `f`
/// producing a value. For fixtures that want to add context (a log tail) to the failure.
pub fn poll_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            // One last look: the condition may have become true while we slept.
            return f();
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_POLL_INTERVAL);
    }
}

/// The repository root (the crate's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// This test process's scratch directory, `target/tmp/run-<pid>`, created on first use.
/// Directories of earlier test processes that have exited are removed at that moment,
/// unless they hold the files of a failed test (see [`keep_after_failure`]).
pub fn run_dir() -> &'static Path {
    static RUN_DIR: OnceLock<PathBuf> = OnceLock::new();
    RUN_DIR.get_or_init(|| {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        sweep_stale_run_dirs(&base);
        let dir = base.join(format!("run-{}", std::process::id()));
        // A directory with our pid belongs to a dead process that had the same pid.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create test run directory {}: {e}", dir.display()));
        dir
    })
}

/// A unique, empty directory for one test, removed when the returned value is dropped.
/// Its name starts with `name` so a failing test's files are easy to find (keep them with
/// `TempDir::keep`).
pub fn test_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{}-", sanitize(name)))
        .tempdir_in(run_dir())
        .unwrap_or_else(|e| panic!("cannot create a test directory for {name}: {e}"))
}

/// Runs `scripts/test-env.sh` with `parts` (once per distinct argument list per process)
/// and panics with its output when it fails.
pub fn ensure_test_env(parts: &[&str]) {
    static DONE: Mutex<Vec<String>> = Mutex::new(Vec::new());
    // Holding the lock while the script runs serialises concurrent callers.
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    let key = parts.join(" ");
    if done.contains(&key) {
        return;
    }
    let script = repo_root().join("scripts/test-env.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(parts)
        .current_dir(repo_root())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        panic!(
            "`{} {key}` failed ({}):\n{log}",
            script.display(),
            out.status
        );
    }
    eprint!("{log}");
    done.push(key);
}

/// Replaces everything but ASCII letters, digits, `-` and `_` with `_`, so test names can go
/// into file and znode names.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The last `n` lines of a file, or a note saying why it could not be read.
pub fn file_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Marks a run directory whose files a failed test left for inspection.
const KEEP_MARKER: &str = "KEEP";

/// Called from a test directory's owner when it is dropped: during a panic (a failing
/// test) the directory is kept, its run directory marked so later runs leave it alone
/// (delete it by hand), and its path printed.
pub fn keep_after_failure(dir: &mut tempfile::TempDir) {
    if std::thread::panicking() {
        dir.disable_cleanup(true);
        let _ = std::fs::write(run_dir().join(KEEP_MARKER), "");
        eprintln!("kept the failed test's files in {}", dir.path().display());
    }
}

/// Removes `run-<pid>` directories under `base` whose process no longer exists.
fn sweep_stale_run_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid as u32 != std::process::id()
            && !process_alive(pid)
            && !entry.path().join(KEEP_MARKER).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
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

/// Whether a process with this pid exists (a zombie counts as gone).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses, which may itself contain ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
