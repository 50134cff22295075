//! Security (issue "Faults", scenario 8), through the real binary and a real ZooKeeper:
//! mutual TLS that refuses clients without a certificate, plain text and other CAs, with the
//! reason in the daemon log; digest authentication with creator-only ACLs; credentials that
//! never reach a log or a stack dump; secret files readable by others.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nodepool_builder::model::BuildState;
use nodepool_builder::zk::{Zk, ZkConfig, paths, tree};

use crate::util::builder::BuilderProcess;
use crate::util::np::{Site, WAIT};
use crate::util::python::{describe_output, kz_args, kz_plain_args, run_kazoo};
use crate::util::zk::ZkServer;

const ONE_IMAGE: &str =
    "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{fake_dib}\"\nformats = [\"raw\"]\n";

/// Runs the TLS probe against the shared server's TLS port; returns its one line.
fn probe(extra: &[&str]) -> String {
    let server = ZkServer::shared();
    let certs = server.certs();
    let port = server.tls_port().unwrap().to_string();
    let ca = certs.ca.display().to_string();
    let mut args = vec!["127.0.0.1", port.as_str(), "--ca", ca.as_str()];
    args.extend_from_slice(extra);
    let out = run_kazoo("zk_tls_probe.py", &args);
    assert!(out.status.success(), "{}", describe_output(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn tls_port_answers_only_clients_with_a_certificate_of_its_ca() {
    let certs = ZkServer::shared().certs();
    let (cert, key) = (
        certs.cert.display().to_string(),
        certs.key.display().to_string(),
    );
    let with_cert = probe(&["--cert", &cert, "--key", &key]);
    assert!(
        with_cert.starts_with("answered"),
        "the control: {with_cert}"
    );
    let no_cert = probe(&[]);
    assert!(
        no_cert.starts_with("refused"),
        "no client certificate: {no_cert}"
    );
    let plain = probe(&["--plain"]);
    assert!(
        plain.starts_with("refused"),
        "plain text to the TLS port: {plain}"
    );
    let (wcert, wkey) = (
        certs.wrong_ca_cert.display().to_string(),
        certs.wrong_ca_key.display().to_string(),
    );
    let wrong = probe(&["--cert", &wcert, "--key", &wkey]);
    assert!(
        wrong.starts_with("refused"),
        "a certificate of another CA: {wrong}"
    );
}

/// Starts the daemon of `site` with its TLS files replaced as `edit` says; returns it
/// without waiting for readiness.
fn start_with_tls(site: &Site, edit: &dyn Fn(String) -> String) -> BuilderProcess {
    let cfg = site.config(0, "", ONE_IMAGE);
    let text = edit(std::fs::read_to_string(&cfg).unwrap());
    std::fs::write(&cfg, text).unwrap();
    BuilderProcess::start(
        &["-d", "-c", cfg.to_str().unwrap()],
        &[(
            "NODEPOOL_BUILDER_LOG",
            "debug,zookeeper_client=info,rustls=info,ureq=info",
        )],
        &site.path("builder0.log"),
    )
}

#[test]
fn daemon_with_a_certificate_of_another_ca_says_why_it_cannot_connect() {
    let site = Site::new("tls_wrong_client_ca");
    let certs = site.server.certs();
    let mut b = start_with_tls(&site, &|t| {
        t.replace(
            &certs.cert.display().to_string(),
            &certs.wrong_ca_cert.display().to_string(),
        )
        .replace(
            &certs.key.display().to_string(),
            &certs.wrong_ca_key.display().to_string(),
        )
    });
    b.wait_for_log(WAIT, "Retrying zookeeper connection");
    let line = retry_line(&b);
    assert!(
        line.contains("TLS check: localhost:")
            && line.contains("the server refused the TLS connection (received fatal alert")
            && line.contains(&certs.wrong_ca_cert.display().to_string()),
        "the operator is told the server refused our certificate: {line}"
    );
    assert!(!b.log().contains("ready: builder_id="), "{}", b.log());
}

/// The first `Retrying zookeeper connection` line of the log.
fn retry_line(b: &BuilderProcess) -> String {
    b.log()
        .lines()
        .find(|l| l.contains("Retrying zookeeper connection"))
        .unwrap()
        .to_string()
}

#[test]
fn daemon_not_trusting_the_server_says_why_it_cannot_connect() {
    let site = Site::new("tls_wrong_server_ca");
    let certs = site.server.certs();
    let mut b = start_with_tls(&site, &|t| {
        t.replace(
            &format!("ca = \"{}\"", certs.ca.display()),
            &format!("ca = \"{}\"", certs.wrong_ca.display()),
        )
    });
    b.wait_for_log(WAIT, "Retrying zookeeper connection");
    let line = retry_line(&b);
    assert!(
        line.contains("TLS handshake failed: the server's certificate is not trusted")
            && line.contains("UnknownIssuer")
            && line.contains(&certs.wrong_ca.display().to_string()),
        "the operator is told the server's certificate is not trusted by the CA file: {line}"
    );
    assert!(!b.log().contains("ready: builder_id="), "{}", b.log());
}

const ZK_DIGEST: &str = "np-builder:Zk-digest-S3cret-pw";

/// A secure file (`-s`) with `[zookeeper-auth]`.
fn secure_with_digest(site: &Site) -> std::path::PathBuf {
    let path = site.path("secure.toml");
    std::fs::write(
        &path,
        format!("[zookeeper-auth]\nscheme = \"digest\"\ncredentials = \"{ZK_DIGEST}\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A session of the test's own, authenticated like the builder.
fn digest_session(site: &Site) -> Zk {
    let zk = Zk::connect(ZkConfig {
        hosts: vec![("127.0.0.1".into(), site.server.plain_port())],
        chroot: Some(site.chroot.clone()),
        session_timeout: Duration::from_secs(10),
        tls: None,
        auth: Some(("digest".into(), ZK_DIGEST.as_bytes().to_vec())),
    });
    assert!(zk.wait_connected(Duration::from_secs(30)), "digest session");
    zk
}

/// kazoo on the plain port (no TLS identity), with or without a digest.
fn kz(site: &Site, digest: Option<&str>, cmd: &[&str]) -> std::process::Output {
    let mut args = kz_plain_args(site.server, &site.chroot);
    if let Some(d) = digest {
        args.extend(["--digest".to_string(), d.to_string()]);
    }
    run_kazoo("kz.py", &kz_args(&args, cmd))
}

#[test]
fn digest_auth_makes_every_builder_znode_creator_only() {
    let site = Site::new("digest_acl");
    let secure = secure_with_digest(&site);
    site.config(0, "", ONE_IMAGE);
    let _b = site.start(0, &["-s", secure.to_str().unwrap()]);
    let zk = digest_session(&site);
    let build = crate::util::wait_for(WAIT, "a ready build, read with the digest", || {
        tree::read_image(&zk, "fedora")
            .ok()?
            .into_iter()
            .find(|b| b.build.state == BuildState::Ready)
    });
    let components = zk
        .get_children("/nodepool/components/builder")
        .unwrap()
        .unwrap_or_default();
    assert_eq!(components.len(), 1, "{components:?}");
    let nodes = [
        "/nodepool".to_string(),
        paths::IMAGE_ROOT.to_string(),
        paths::image_build_path("fedora", &build.id),
        format!("/nodepool/components/builder/{}", components[0]),
    ];
    for node in &nodes {
        // With the digest, kazoo reads and sees one ACL: the digest identity, all perms.
        let out = kz(&site, Some(ZK_DIGEST), &["getacl", node]);
        assert!(out.status.success(), "{node}: {}", describe_output(&out));
        let acl = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // Creator-only: the builder's identities, all permissions. Besides the digest, the
        // server's x509 provider adds the identity of the builder's TLS certificate.
        assert!(
            acl.lines().any(|l| l.starts_with("digest:np-builder:"))
                && acl.lines().all(|l| (l.starts_with("digest:np-builder:")
                    || l.starts_with("x509:"))
                    && l.ends_with(":31")),
            "{node}: creator-only ACL, got {acl:?}"
        );
        assert!(
            !acl.contains("S3cret"),
            "the ACL holds a hash, not the password: {acl}"
        );
        let out = kz(&site, Some(ZK_DIGEST), &["get", node]);
        assert!(out.status.success(), "{node}: {}", describe_output(&out));
        // Without it (or with another password), kazoo can neither read nor write.
        for digest in [None, Some("np-builder:wrong")] {
            for cmd in [vec!["get", node.as_str()], vec!["set", node.as_str(), "x"]] {
                let out = kz(&site, digest, &cmd);
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    out.status.code() == Some(1) && err.contains("NoAuth"),
                    "{node}: {cmd:?} with {digest:?} must be refused: {}",
                    describe_output(&out)
                );
            }
        }
    }
    // Nothing was changed by the refused writes.
    assert_eq!(
        tree::read_image(&zk, "fedora").unwrap()[0].build.state,
        BuildState::Ready
    );
    zk.close();
}
