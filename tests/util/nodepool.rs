//! The real Python `nodepool` 11.0.0 CLI (`target/test-env/nodepool-venv`, made by
//! `scripts/nodepool-env.sh`), pointed at a test's ZooKeeper chroot, and our own operator
//! subcommands, run the same way so their outputs can be compared.
//!
//! * [`NodepoolCli::new`] writes a minimal `nodepool.yaml` (TLS ZooKeeper with the test
//!   client certificate, the chroot, the diskimages) and [`NodepoolCli::run`] runs
//!   `nodepool -c nodepool.yaml ARGS…`. Each call costs 1.5–3 s (imports), so tests call it
//!   only where a comparison needs it.
//! * [`ops`] runs `nodepool-builder -c <config> ARGS…` to completion.
//! * [`Table`] parses PrettyTable output for comparisons that ignore row order and the
//!   seconds an `Age` column ticks between two calls.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::site::TestSite;
use super::{poll_for, repo_root};

/// How long one CLI call may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// The venv's `nodepool` script. Runs `scripts/nodepool-env.sh` once per process (it returns
/// at once when the venv is in place); panics with its output if the venv cannot be had.
pub fn nodepool_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = BIN.get_or_init(|| {
        let script = repo_root().join("scripts/nodepool-env.sh");
        let out = Command::new("bash")
            .arg(&script)
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(repo_root().join("target/test-env/nodepool-venv/bin/nodepool"))
    });
    match result {
        Ok(bin) => bin.clone(),
        Err(e) => panic!("no nodepool venv: {e}"),
    }
}

/// One diskimage of the Python CLI's config.
pub struct DiskImage<'a> {
    pub name: &'a str,
    /// `pause: true` in the config.
    pub paused: bool,
}

/// The Python CLI configured for one chroot.
pub struct NodepoolCli {
    config: PathBuf,
    dir: PathBuf,
    /// More environment for every call (e.g. `OS_CLIENT_CONFIG_FILE` for a config with
    /// OpenStack providers, whose clouds the CLI loads).
    env: Vec<(String, String)>,
}

impl NodepoolCli {
    /// Writes `<dir>/nodepool-<chroot name>.yaml` for `chroot` on `site`'s server.
    pub fn new(site: &TestSite, chroot: &str, diskimages: &[DiskImage]) -> NodepoolCli {
        let certs = site.server.certs();
        let mut yaml = format!(
            "zookeeper-servers:\n  - host: localhost\n    port: {port}\n    chroot: {chroot}\n\
             zookeeper-tls:\n  ca: {ca}\n  cert: {cert}\n  key: {key}\n\
             images-dir: {images}\ndiskimages:\n",
            port = site.server.tls_port().expect("the shared server has TLS"),
            ca = certs.ca.display(),
            cert = certs.cert.display(),
            key = certs.key.display(),
            images = site.path("python-images").display(),
        );
        if diskimages.is_empty() {
            yaml = yaml.replace("diskimages:\n", "diskimages: []\n");
        }
        for d in diskimages {
            yaml.push_str(&format!("  - name: {}\n    formats: [qcow2]\n", d.name));
            if d.paused {
                yaml.push_str("    pause: true\n");
            }
        }
        let config = site.path(&format!("nodepool-{}.yaml", chroot.trim_start_matches('/')));
        std::fs::write(&config, yaml).unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        NodepoolCli {
            config,
            dir: site.dir.path().to_path_buf(),
            env: Vec::new(),
        }
    }

    /// The CLI on an existing config (e.g. the `nodepool.yaml` a Python builder reads), run
    /// in `dir` with `env` added to every call.
    pub fn with_config(config: &Path, dir: &Path, env: Vec<(String, String)>) -> NodepoolCli {
        NodepoolCli {
            config: config.to_path_buf(),
            dir: dir.to_path_buf(),
            env,
        }
    }

    /// Runs `nodepool -c <config> ARGS…` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(nodepool_bin());
        cmd.arg("-c")
            .arg(&self.config)
            .args(args)
            .env("PYTHONWARNINGS", "ignore::UserWarning:nodepool.version")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir);
        run_to_end(cmd, CLI_TIMEOUT)
    }

    /// Runs a command that must exit 0 and returns its stdout.
    #[track_caller]
    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "nodepool {} failed:\n{}",
            args.join(" "),
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Runs `nodepool-builder -c <config> ARGS…` to completion.
pub fn ops(config: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(super::builder::binary());
    cmd.arg("-c").arg(config).args(args);
    run_to_end(cmd, CLI_TIMEOUT)
}

/// Like [`ops`], for a command that must exit 0 and print nothing on stderr; returns stdout.
#[track_caller]
pub fn ops_ok(config: &Path, args: &[&str]) -> String {
    let out = ops(config, args);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "nodepool-builder {} failed:\n{}",
        args.join(" "),
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Exit status, stdout and stderr, labelled, for failure messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit: {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_to_end(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let description = format!("{cmd:?}");
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {description}: {e}"));
    let pid = child.id();
    let started = Instant::now();
    // wait_with_output drains both pipes; a watchdog kills the process if it overstays.
    let (tx, rx) = std::sync::mpsc::channel();
    #[allow(clippy::disallowed_methods)]
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = poll_for(timeout, || rx.try_recv().ok());
    match out {
        Some(Ok(out)) => out,
        Some(Err(e)) => panic!("waiting for {description}: {e}"),
        None => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!(
                "{description} did not finish within {:?}",
                started.elapsed()
            );
        }
    }
}

/// A PrettyTable as printed: its frame lines (borders and header) and its data rows as cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Border and header lines, in order, with the data rows left out.
    pub frame: Vec<String>,
    /// Cells of every data row, trimmed, in printed order.
    pub rows: Vec<Vec<String>>,
    /// Header cells.
    pub headers: Vec<String>,
}

impl Table {
    /// Parses `text` (a whole table, as the CLI prints it). Panics if it is not one.
    #[track_caller]
    pub fn parse(text: &str) -> Table {
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.len() >= 4 && lines[0].starts_with('+') && lines[2].starts_with('+'),
            "not a table:\n{text}"
        );
        let cells = |line: &str| -> Vec<String> {
            let inner = line
                .strip_prefix('|')
                .and_then(|l| l.strip_suffix('|'))
                .unwrap_or_else(|| panic!("bad row {line:?} in\n{text}"));
            inner.split('|').map(|c| c.trim().to_string()).collect()
        };
        let mut frame = vec![
            lines[0].to_string(),
            lines[1].to_string(),
            lines[2].to_string(),
        ];
        let mut rows = Vec::new();
        for line in &lines[3..lines.len() - 1] {
            rows.push(cells(line));
        }
        frame.push(lines[lines.len() - 1].to_string());
        Table {
            headers: cells(lines[1]),
            frame,
            rows,
        }
    }

    /// The index of a column.
    #[track_caller]
    pub fn column(&self, header: &str) -> usize {
        self.headers
            .iter()
            .position(|h| h == header)
            .unwrap_or_else(|| panic!("no column {header:?} in {:?}", self.headers))
    }

    /// Rows sorted, with the cells of age columns replaced by `<age>` (when not empty).
    pub fn normalized_rows(&self) -> Vec<Vec<String>> {
        let age_columns: Vec<usize> = self
            .headers
            .iter()
            .enumerate()
            .filter(|(_, h)| h.ends_with("Age"))
            .map(|(i, _)| i)
            .collect();
        let mut rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .map(|(i, c)| {
                        if age_columns.contains(&i) && !c.is_empty() {
                            "<age>".to_string()
                        } else {
                            c.clone()
                        }
                    })
                    .collect()
            })
            .collect();
        rows.sort();
        rows
    }
}

/// Seconds in a `DD:HH:MM:SS` age.
#[track_caller]
pub fn age_seconds(age: &str) -> u64 {
    let parts: Vec<u64> = age
        .split(':')
        .map(|p| p.parse().unwrap_or_else(|_| panic!("bad age {age:?}")))
        .collect();
    assert_eq!(parts.len(), 4, "bad age {age:?}");
    ((parts[0] * 24 + parts[1]) * 60 + parts[2]) * 60 + parts[3]
}
