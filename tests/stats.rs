//! statsd: a UDP listener sees upstream's keys, with upstream's types, after one build and
//! one upload (plus the four documented-but-never-emitted worker gauges).

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use nodepool_builder::model::UploadState;

use crate::util::builder::BuilderProcess;
use crate::util::site::TestSite;

#[test]
fn upstream_statsd_keys_after_one_build_and_one_upload() {
    let site = TestSite::new("statsd");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let port = sock.local_addr().unwrap().port().to_string();
    let body = format!(
        "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{{fake_dib}}\"\n{}",
        site.provider("cloud", "qcow2", &["fedora"], "")
    );
    let cfg = site.config(0, "cleanup-interval = 1.0", &body);
    let mut b = BuilderProcess::start(
        &["-d", "-c", cfg.to_str().unwrap()],
        &[("STATSD_HOST", "127.0.0.1"), ("STATSD_PORT", &port)],
        &site.path("builder0.log"),
    );
    b.wait_for_log(Duration::from_secs(60), "ready: builder_id=");
    site.wait_uploads("fedora", "cloud", UploadState::Ready, 1);
    let host = nodepool_builder::identity::fqdn();
    let want = [
        "nodepool.dib_image_build.fedora.status.duration:|ms".to_string(),
        "nodepool.dib_image_build.fedora.status.rc:0|g".into(),
        "nodepool.dib_image_build.fedora.status.last_build:|g".into(),
        "nodepool.dib_image_build.fedora.qcow2.size:|g".into(),
        "nodepool.image_update.fedora.cloud:|ms".into(),
        "nodepool.image_update.fedora.cloud:1|c".into(),
        format!("nodepool.builder.{host}.image.fedora.build.state:0|g"),
        format!("nodepool.builder.{host}.image.fedora.provider.cloud.upload.state:0|g"),
        "nodepool.image.fedora.image_build_requests:0|g".into(),
        "nodepool.image_build_requests:0|g".into(),
        format!("nodepool.builder.{host}.current_builds:0|g"),
        format!("nodepool.builder.{host}.current_uploads:0|g"),
        format!("nodepool.builder.{host}.build_workers:1|g"),
        format!("nodepool.builder.{host}.upload_workers:4|g"),
    ];
    // A pattern "key:|type" matches any value; "key:v|type" an exact one.
    let matches = |line: &str, pat: &str| {
        let (key, rest) = pat.split_once(':').unwrap();
        let (value, kind) = rest.split_once('|').unwrap();
        line.strip_prefix(key)
            .and_then(|r| r.strip_prefix(':'))
            .is_some_and(|r| {
                r.split_once('|').is_some_and(|(v, k)| {
                    k == kind && (value.is_empty() || v == value) && v.parse::<f64>().is_ok()
                })
            })
    };
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline && !want.iter().all(|w| seen.iter().any(|l| matches(l, w))) {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_string),
            );
        }
    }
    for w in &want {
        assert!(
            seen.iter().any(|l| matches(l, w)),
            "no {w} among:\n{}",
            seen.join("\n")
        );
    }
}
