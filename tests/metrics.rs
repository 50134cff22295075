//! The builder's HTTP endpoint (`[builder-webapp]`) against real tools: `promtool check
//! metrics` accepts `/metrics`, a real Prometheus scrapes it and answers PromQL about a build
//! and an upload, `/healthz` follows a real ZooKeeper going away and coming back, the JSON
//! lists match the Python nodepool CLI's rows, and the endpoint is off unless configured.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use nodepool_builder::config;
use nodepool_builder::model::{BuildState, UploadState};

use crate::util::builder::BuilderProcess;
use crate::util::nodepool::{DiskImage, NodepoolCli, Table};
use crate::util::prometheus::{Prometheus, promtool_check_metrics};
use crate::util::site::{TestSite, WAIT};
use crate::util::wait_for;
use crate::util::zk::{ZkOptions, ZkServer, free_port};

/// An HTTP answer: status code, headers as written, body.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

/// One GET on the builder's endpoint (HTTP/1.1, `Connection: close`).
fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> std::io::Result<Answer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    Ok(Answer {
        status,
        headers: head.to_string(),
        body: body.to_string(),
    })
}

#[track_caller]
fn get_ok(addr: SocketAddr, path: &str, accept: Option<&str>) -> Answer {
    let a = get(addr, path, accept).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(a.status, 200, "GET {path}: {}\n{}", a.headers, a.body);
    a
}

/// `[builder-webapp]` on a fresh loopback port; returns the config text and the address.
fn webapp_top() -> (String, SocketAddr) {
    let port = free_port();
    (
        format!("[builder-webapp]\nlisten-address = \"127.0.0.1\"\nport = {port}\n"),
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
}

/// A site whose builder 0 builds `fedora` and uploads it to the directory cloud `cloud`,
/// with the endpoint on; returns after one ready build and one ready upload.
fn built_and_uploaded(name: &str) -> (TestSite, BuilderProcess, SocketAddr) {
    let site = TestSite::new(name);
    let (top, addr) = webapp_top();
    site.fedora_on_cloud(0, &top);
    let b = site.start(0, &[]);
    site.wait_builds("fedora", BuildState::Ready, 1);
    site.wait_uploads("fedora", "cloud", UploadState::Ready, 1);
    (site, b, addr)
}

#[test]
fn promtool_accepts_the_metrics_and_prometheus_finds_the_build_and_upload() {
    let (_site, _b, addr) = built_and_uploaded("metrics_prometheus");
    // The counters are bumped when the scheduler hears of the outcome, just after the record.
    let text = wait_for(WAIT, "the upload counted on /metrics", || {
        let a = get_ok(addr, "/metrics", None);
        a.body
            .contains(
                "nodepool_builder_uploads_total{image=\"fedora\",provider=\"cloud\",state=\"ready\"} 1",
            )
            .then_some(a)
    });
    assert!(
        text.headers
            .contains("Content-Type: text/plain; version=0.0.4"),
        "{}",
        text.headers
    );
    if let Err(e) = promtool_check_metrics(&text.body) {
        panic!("{e}\n--- scraped ---\n{}", text.body);
    }
    for line in [
        "nodepool_builder_builds_total{image=\"fedora\",state=\"ready\"} 1",
        "nodepool_builder_build_duration_seconds_count{image=\"fedora\"} 1",
        "nodepool_builder_upload_duration_seconds_count{image=\"fedora\",provider=\"cloud\"} 1",
        "nodepool_builder_zookeeper_connected 1",
        "nodepool_builder_component_registered 1",
        "nodepool_builder_ready 1",
        "nodepool_builder_workers{pool=\"build\",state=\"idle\"}",
    ] {
        assert!(text.body.contains(line), "{line} in\n{}", text.body);
    }

    let prom = Prometheus::start("metrics_prometheus_server", addr);
    prom.wait_value("up{job=\"nodepool-builder\"}", |v| v == 1.0);
    prom.wait_value(
        "nodepool_builder_builds_total{image=\"fedora\",state=\"ready\"}",
        |v| v >= 1.0,
    );
    prom.wait_value(
        "nodepool_builder_uploads_total{image=\"fedora\",provider=\"cloud\",state=\"ready\"}",
        |v| v >= 1.0,
    );
    prom.wait_value(
        "sum(nodepool_builder_build_duration_seconds_count{image=\"fedora\"})",
        |v| v >= 1.0,
    );
    prom.wait_value(
        "nodepool_builder_uploaded_bytes_total{provider=\"cloud\"}",
        |v| v > 0.0,
    );
}

#[test]
fn healthz_is_503_with_the_reason_while_zookeeper_is_down_and_200_again_after() {
    // A dedicated server: this test kills it.
    let mut server = ZkServer::start(ZkOptions::tls());
    let name = "metrics_healthz";
    let chroot = server.chroot(name);
    let hosts = vec![("127.0.0.1".to_string(), server.plain_port())];
    let site = TestSite::with_session(name, ZkServer::shared(), chroot, hosts);
    let (top, addr) = webapp_top();
    let cfg = site.fedora_on_cloud(0, &format!("zookeeper-timeout = 30.0\n{top}"));
    let shared_port = format!("port = {}\n", ZkServer::shared().tls_port().unwrap());
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains(&shared_port), "{text}");
    std::fs::write(
        &cfg,
        text.replace(
            &shared_port,
            &format!("port = {}\n", server.tls_port().unwrap()),
        ),
    )
    .unwrap();
    let _b = site.start(0, &[]);
    assert_eq!(get_ok(addr, "/healthz", None).body, "ok\n");
    wait_for(WAIT, "/ready after the first tree read", || {
        (get(addr, "/ready", None).ok()?.status == 200).then_some(())
    });

    server.kill();
    let down = wait_for(WAIT, "/healthz to answer 503", || {
        get(addr, "/healthz", None).ok().filter(|a| a.status == 503)
    });
    assert!(
        down.body.contains("ZooKeeper"),
        "the reason names ZooKeeper: {:?}",
        down.body
    );
    let metrics = get_ok(addr, "/metrics", None).body;
    assert!(
        metrics.contains("nodepool_builder_zookeeper_connected 0\n"),
        "{metrics}"
    );

    server.restart();
    wait_for(WAIT, "/healthz to answer 200 again", || {
        get(addr, "/healthz", None)
            .ok()
            .filter(|a| a.status == 200 && a.body == "ok\n")
    });
    let metrics = get_ok(addr, "/metrics", None).body;
    assert!(
        metrics.contains("nodepool_builder_zookeeper_reconnects_total ")
            && !metrics.contains("nodepool_builder_zookeeper_reconnects_total 0\n"),
        "the reconnect is counted: {metrics}"
    );
}

#[test]
fn image_lists_serve_the_rows_of_the_python_cli_as_json() {
    let (site, _b, addr) = built_and_uploaded("metrics_lists");
    let python = NodepoolCli::new(
        &site,
        &site.chroot,
        &[DiskImage {
            name: "fedora",
            paused: false,
        }],
    );

    let a = get_ok(addr, "/dib-image-list", Some("application/json"));
    assert!(
        a.headers.contains("Content-Type: application/json"),
        "{}",
        a.headers
    );
    assert!(a.headers.contains("Access-Control-Allow-Origin: *"));
    let builds: serde_json::Value = serde_json::from_str(&a.body).expect(&a.body);
    let table = Table::parse(&python.run_ok(&["dib-image-list"]));
    let builds = builds.as_array().expect("a JSON list");
    assert_eq!(builds.len(), table.rows.len(), "{builds:?}\n{table:?}");
    for row in &table.rows {
        let b = builds
            .iter()
            .find(|b| b["id"] == row[table.column("ID")].as_str())
            .unwrap_or_else(|| panic!("{row:?} in {builds:?}"));
        assert_eq!(b["image"], row[table.column("Image")].as_str());
        assert_eq!(b["builder"], row[table.column("Builder")].as_str());
        let formats: Vec<&str> = b["formats"]
            .as_array()
            .expect("formats is a JSON list")
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        assert_eq!(formats.join(","), row[table.column("Formats")]);
        assert_eq!(b["state"], row[table.column("State")].as_str());
        assert!(b["age"].is_i64(), "{b}");
    }

    let a = get_ok(addr, "/image-list", Some("application/json"));
    let uploads: serde_json::Value = serde_json::from_str(&a.body).expect(&a.body);
    let uploads = uploads.as_array().expect("a JSON list");
    let table = Table::parse(&python.run_ok(&["image-list"]));
    assert_eq!(uploads.len(), table.rows.len(), "{uploads:?}\n{table:?}");
    for row in &table.rows {
        let u = uploads
            .iter()
            .find(|u| u["upload_id"] == row[table.column("Upload ID")].as_str())
            .unwrap_or_else(|| panic!("{row:?} in {uploads:?}"));
        for (key, column) in [
            ("id", "Build ID"),
            ("provider", "Provider"),
            ("image", "Image"),
            ("external_name", "Provider Image Name"),
            ("external_id", "Provider Image ID"),
            ("state", "State"),
        ] {
            assert_eq!(u[key], row[table.column(column)].as_str(), "{key}: {u}");
        }
    }

    // Without asking for JSON: the CLI's table, as the launcher webapp answers a browser.
    let text = get_ok(addr, "/dib-image-list", None).body;
    assert_eq!(Table::parse(&text).rows.len(), builds.len(), "{text}");
}

/// The listening TCP sockets of a process (from /proc), as `local_address` hex strings.
fn listening_sockets(pid: i32) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st 0A = LISTEN; field 9 is the inode.
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                found.push(f[1].to_string());
            }
        }
    }
    found
}

#[test]
fn the_endpoint_is_off_unless_configured_and_then_serves_from_a_registered_thread() {
    let site = TestSite::new("metrics_off");
    site.fedora_on_cloud(0, "");
    let b = site.start(0, &[]);
    site.wait_builds("fedora", BuildState::Ready, 1);
    assert_eq!(
        listening_sockets(b.pid()),
        Vec::<String>::new(),
        "no listening socket without [builder-webapp]"
    );
    assert!(!b.log().contains("Webapp listening"), "{}", b.log());

    // With the key, the same builder listens on exactly the configured address.
    let site = TestSite::new("metrics_on");
    let (top, addr) = webapp_top();
    site.fedora_on_cloud(0, &top);
    let mut b = site.start(0, &[]);
    let sockets = listening_sockets(b.pid());
    assert_eq!(sockets, vec![format!("0100007F:{:04X}", addr.port())]);
    // Its thread is a registered one: the SIGUSR2 stack dump shows it.
    b.signal(Signal::SIGUSR2);
    b.wait_for_log(WAIT, "End debug handler");
    let log = b.log();
    assert!(
        log.lines()
            .any(|l| l.contains("nodepool.stack_dump: Thread: ")
                && l.split_whitespace().any(|w| w == "webapp")),
        "a webapp thread in the dump:\n{log}"
    );
}

#[test]
fn a_listen_address_already_in_use_stops_the_start_with_a_clear_error() {
    let site = TestSite::new("metrics_in_use");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = site.fedora_on_cloud(
        0,
        &format!("[builder-webapp]\nlisten-address = \"127.0.0.1\"\nport = {port}\n"),
    );
    let log = site.path("builder0.log");
    let mut b = BuilderProcess::start(&["-d", "-c", cfg.to_str().unwrap()], &[], &log);
    let status = b.wait_exit(WAIT);
    assert!(!status.success(), "{status}");
    let text = b.log();
    assert!(
        text.contains(&format!(
            "builder-webapp: cannot listen on 127.0.0.1:{port}: Address already in use"
        )),
        "{text}"
    );
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn builder_webapp_config_is_checked_with_positions_in_toml_and_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let base = "images-dir = \"/tmp/i\"\n[[zookeeper-servers]]\nhost = \"zk\"\n";
    // Absent: off.
    let cfg = config::load(&write(dir.path(), "off.toml", base), None).unwrap();
    assert_eq!(cfg.builder_webapp, None);
    // Port only: every address, as the launcher's webapp.
    let cfg = config::load(
        &write(
            dir.path(),
            "on.toml",
            &format!("{base}[builder-webapp]\nport = 8006\n"),
        ),
        None,
    )
    .unwrap();
    assert_eq!(cfg.builder_webapp, Some("0.0.0.0:8006".parse().unwrap()));
    // In nodepool.yaml the launcher's `webapp` is ignored; `builder-webapp` is ours.
    let cfg = config::load(
        &write(
            dir.path(),
            "nodepool.yaml",
            "images-dir: /tmp/i\nzookeeper-servers:\n  - host: zk\nwebapp:\n  port: 8005\n\
             builder-webapp:\n  listen-address: '::1'\n  port: 8006\n",
        ),
        None,
    )
    .unwrap();
    assert_eq!(cfg.builder_webapp, Some("[::1]:8006".parse().unwrap()));
    // Bad values: one error each, at their position.
    let errors = config::load(
        &write(
            dir.path(),
            "bad.toml",
            &format!("{base}[builder-webapp]\nlisten-address = \"localhost:80\"\nport = 70000\n"),
        ),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains("bad.toml:5:18: `listen-address` must be an IP address"),
        "{errors}"
    );
    assert!(
        errors.contains("bad.toml:6:8: `port` must be between 1 and 65535"),
        "{errors}"
    );
    let errors = config::load(
        &write(
            dir.path(),
            "noport.toml",
            &format!("{base}[builder-webapp]\nlisten-address = \"127.0.0.1\"\n"),
        ),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(errors.contains("port"), "{errors}");

    // The example config documents the table commented out: off as shipped, on uncommented.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/nodepool-builder.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    assert_eq!(config::load(&example, None).unwrap().builder_webapp, None);
    let block = "# [builder-webapp]\n# listen-address = \"127.0.0.1\"\n# port = 8006\n";
    assert!(
        text.contains(block),
        "the example documents [builder-webapp]"
    );
    let on = config::load_str(
        &example,
        &text.replace(block, &block.replace("# ", "")),
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(on.builder_webapp, Some("127.0.0.1:8006".parse().unwrap()));
}

#[test]
fn uploads_due_while_every_upload_worker_is_busy_are_a_queue_depth() {
    let site = TestSite::new("metrics_upload_queue");
    let (top, addr) = webapp_top();
    let body = format!(
        "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{{fake_dib}}\"\n{}{}",
        site.provider("cloud-a", "raw", &["fedora"], ""),
        site.provider("cloud-b", "raw", &["fedora"], "")
    );
    site.config(0, &top, &body);
    // Both clouds hold an upload until told: with one upload worker the first one holds it,
    // and the second upload, due at the same time, waits for it.
    let holds: Vec<_> = ["cloud-a", "cloud-b"]
        .iter()
        .map(|c| {
            std::fs::create_dir_all(site.cloud_dir(c)).unwrap();
            let hold = site.cloud_dir(c).join("hold-upload");
            std::fs::write(&hold, "").unwrap();
            hold
        })
        .collect();
    let _b = site.start(0, &["--upload-workers", "1"]);
    let depth = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("nodepool_builder_queue_depth{queue=\"uploads\"} "))
            .map(str::to_string)
    };
    wait_for(
        WAIT,
        "one upload held and one waiting for the busy worker",
        || {
            let text = get_ok(addr, "/metrics", None).body;
            (depth(&text).as_deref() == Some("1")
                && text.contains("nodepool_builder_workers{pool=\"upload\",state=\"busy\"} 1"))
            .then_some(())
        },
    );
    for hold in &holds {
        std::fs::remove_file(hold).unwrap();
    }
    site.wait_uploads("fedora", "cloud-a", UploadState::Ready, 1);
    site.wait_uploads("fedora", "cloud-b", UploadState::Ready, 1);
    wait_for(WAIT, "the upload queue to drain", || {
        let text = get_ok(addr, "/metrics", None).body;
        (depth(&text).as_deref() == Some("0")).then_some(())
    });
}
