//! A real Prometheus server (Debian's `prometheus` package, installed by
//! `scripts/test-env.sh prometheus`) on loopback that scrapes one target every second, with
//! its own temporary storage, stopped when dropped; and `promtool check metrics`.
//!
//! Queries go through its HTTP API (`/api/v1/query`), as an operator's dashboard would.
//! A missing binary is installed; if it still cannot be found the test FAILS.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::zk::free_port;
use super::{ensure_test_env, file_tail, test_dir, wait_for};

/// How long Prometheus gets to start answering.
const START: Duration = Duration::from_secs(60);

/// One Debian binary of the prometheus package, installing the package if it is missing.
pub fn binary(name: &str) -> PathBuf {
    let path = PathBuf::from("/usr/bin").join(name);
    if !path.exists() {
        ensure_test_env(&["prometheus"]);
    }
    assert!(
        path.exists(),
        "{} is missing after `scripts/test-env.sh prometheus`",
        path.display()
    );
    path
}

/// `promtool check metrics` on `text`: `Ok` with its output, or `Err` with its complaints.
pub fn promtool_check_metrics(text: &str) -> Result<String, String> {
    let mut child = Command::new(binary("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(said)
    } else {
        Err(format!("promtool check metrics: {}:\n{said}", out.status))
    }
}

pub struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        super::keep_after_failure(&mut self.dir);
    }
}

impl Prometheus {
    /// Starts a server that scrapes `target` every second as job `nodepool-builder`, and
    /// waits until it answers.
    pub fn start(name: &str, target: SocketAddr) -> Prometheus {
        let bin = binary("prometheus");
        let dir = test_dir(name);
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: nodepool-builder\n    scrape_interval: 1s\n    \
                 scrape_timeout: 1s\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = dir.path().join("prometheus.log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("prometheus.err")).unwrap())
            .spawn()
            .expect("start prometheus");
        let mut p = Prometheus { child, port, dir };
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        let err = p.dir.path().join("prometheus.err");
        let child = &mut p.child;
        wait_for(START, "prometheus answering /-/ready", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", file_tail(&err, 40));
            }
            ureq::get(&ready).call().ok().map(|_| ())
        });
        p
    }

    /// The instant vector `promql` evaluates to now: every series' labels and value.
    pub fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
            percent_encode(promql)
        );
        let body = ureq::get(&url)
            .call()
            .unwrap_or_else(|e| panic!("prometheus query {promql}: {e}"))
            .into_body()
            .read_to_string()
            .expect("read the answer");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
        assert_eq!(answer["status"], "success", "{promql}: {body}");
        answer["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{promql}: no result list in {body}"))
            .iter()
            .map(|s| {
                let value = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("{promql}: bad sample {s}"));
                (s["metric"].clone(), value)
            })
            .collect()
    }

    /// Waits until `promql` returns a series whose value satisfies `ok`; returns its value.
    #[track_caller]
    pub fn wait_value(&self, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
        wait_for(
            START,
            &format!("prometheus to return a matching series for {promql}"),
            || {
                self.query(promql)
                    .into_iter()
                    .map(|(_, v)| v)
                    .find(|v| ok(*v))
            },
        )
    }
}

/// RFC 3986 percent-encoding of a query parameter value.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
