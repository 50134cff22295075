//! Security (issue "Faults", scenario 8), through the real binary and a real ZooKeeper:
//! mutual TLS that refuses clients without a certificate, plain text and other CAs, with the
//! reason in the daemon log; digest authentication with creator-only ACLs; credentials that
//! never reach a log or a stack dump; secret files readable by others.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nix::sys::signal::Signal;
use nodepool_builder::model::{BuildState, UploadState};
use nodepool_builder::zk::{Zk, ZkConfig, paths, tree};

use crate::util::builder::BuilderProcess;
use crate::util::glance::{GlanceServer, KeystoneServer};
use crate::util::python::{describe_output, kz_args, kz_plain_args, run_kazoo};
use crate::util::site::{TestSite, WAIT};
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
fn start_with_tls(site: &TestSite, edit: &dyn Fn(String) -> String) -> BuilderProcess {
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
    let site = TestSite::new("tls_wrong_client_ca");
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
    let site = TestSite::new("tls_wrong_server_ca");
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
fn secure_with_digest(site: &TestSite) -> std::path::PathBuf {
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
fn digest_session(site: &TestSite) -> Zk {
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
fn kz(site: &TestSite, digest: Option<&str>, cmd: &[&str]) -> std::process::Output {
    let mut args = kz_plain_args(site.server, &site.chroot);
    if let Some(d) = digest {
        args.extend(["--digest".to_string(), d.to_string()]);
    }
    run_kazoo("kz.py", &kz_args(&args, cmd))
}

#[test]
fn digest_auth_makes_every_builder_znode_creator_only() {
    let site = TestSite::new("digest_acl");
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
    // Writing with the digest works (a node of our own under /nodepool), without it not.
    let probe = "/nodepool/kazoo-probe";
    let out = kz(&site, None, &["create", probe, "x"]);
    assert!(
        out.status.code() == Some(1) && String::from_utf8_lossy(&out.stderr).contains("NoAuth"),
        "{}",
        describe_output(&out)
    );
    for cmd in [vec!["create", probe, "x"], vec!["delete", probe]] {
        let out = kz(&site, Some(ZK_DIGEST), &cmd);
        assert!(out.status.success(), "{cmd:?}: {}", describe_output(&out));
    }
    // Nothing was changed by the refused writes.
    assert_eq!(
        tree::read_image(&zk, "fedora").unwrap()[0].build.state,
        BuildState::Ready
    );
    zk.close();
}

/// Every file under `dir` (recursively) whose content contains `needle`.
fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if std::fs::read(&path).is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle)) {
            found.push(path.display().to_string());
        }
    }
    found
}

#[test]
fn credentials_never_reach_logs_or_stack_dumps() {
    let keystone = KeystoneServer::shared();
    let glance = GlanceServer::shared_with_keystone();
    let pid = std::process::id();
    let user = format!("np-secrets-{pid}");
    let good_password = "Ks-upload-S3cret-pw-4711";
    let bad_password = "Ks-wrong-S3cret-pw-0815";
    keystone.create_user(
        &user,
        good_password,
        KeystoneServer::NODEPOOL_PROJECT,
        "member",
    );
    let site = TestSite::new("no_secrets");
    let cloud = |name: &str, user: &str| {
        format!(
            "  {name}:\n    auth_type: password\n    region_name: RegionOne\n    auth:\n      auth_url: {}\n      username: {user}\n      project_name: {}\n      user_domain_name: Default\n      project_domain_name: Default\n",
            keystone.auth_url(),
            KeystoneServer::NODEPOOL_PROJECT
        )
    };
    let clouds = site.path("clouds.yaml");
    std::fs::write(
        &clouds,
        format!(
            "clouds:\n{}{}",
            cloud("ks-good", &user),
            cloud("ks-bad", KeystoneServer::NODEPOOL_USER)
        ),
    )
    .unwrap();
    // The passwords live in secure.yaml, readable by us only.
    let secure_yaml = site.path("secure.yaml");
    std::fs::write(
        &secure_yaml,
        format!(
            "clouds:\n  ks-good:\n    auth:\n      password: {good_password}\n  ks-bad:\n    auth:\n      password: {bad_password}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&secure_yaml, std::fs::Permissions::from_mode(0o600)).unwrap();
    let secure = secure_with_digest(&site);
    let (good, bad) = (format!("secrets-good-{pid}"), format!("secrets-bad-{pid}"));
    let provider = |name: &str, cloud: &str| {
        format!(
            "\n[[providers]]\nname = \"{name}\"\ncloud = \"{cloud}\"\nrate = 0.0\n[[providers.diskimages]]\nname = \"fedora\"\n"
        )
    };
    site.config(
        0,
        "",
        &format!(
            "{ONE_IMAGE}{}{}",
            provider(&good, "ks-good"),
            provider(&bad, "ks-bad")
        ),
    );
    let mut b = site.start_with_env(
        0,
        &["-s", secure.to_str().unwrap()],
        &[
            ("OS_CLIENT_CONFIG_FILE", clouds.to_str().unwrap()),
            ("OS_CLIENT_SECURE_FILE", secure_yaml.to_str().unwrap()),
        ],
    );
    let zk = digest_session(&site);
    let up = crate::util::poll_for(WAIT, || {
        tree::read_image(&zk, "fedora")
            .ok()?
            .into_iter()
            .flat_map(|b| b.uploads)
            .find(|u| u.provider == good && u.upload.state == UploadState::Ready)
    })
    .unwrap_or_else(|| {
        panic!(
            "timed out after {WAIT:?}: waiting for a ready upload through Keystone\n{}",
            crate::util::file_tail(&site.path("builder0.log"), 40)
        )
    });
    assert!(
        glance
            .get_image(up.upload.external_id.as_deref().unwrap())
            .is_some()
    );
    // The other cloud's password is wrong: its uploads fail with Keystone's 401.
    b.wait_for_log(WAIT, &format!("to provider {bad}: provider {bad}"));
    b.wait_for_log(WAIT, "401");
    // A stack dump of every thread, while everything holds its credentials.
    b.signal(Signal::SIGUSR2);
    b.wait_for_log(WAIT, "End debug handler");
    zk.close();
    drop(b);

    let zk_password = ZK_DIGEST.split_once(':').unwrap().1;
    let log = std::fs::read_to_string(site.path("builder0.log")).unwrap();
    assert!(
        log.contains("Beginning debug handler"),
        "the dump is in the log"
    );
    for secret in [good_password, bad_password, zk_password, ZK_DIGEST] {
        assert!(
            !log.contains(secret),
            "the daemon log shows {secret:?}:\n{}",
            log.lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
        for dir in [site.log_dir(0), site.images_dir(0)] {
            let found = files_containing(&dir, secret);
            assert!(found.is_empty(), "{secret:?} is in {found:?}");
        }
    }
    // Nor do Keystone tokens (fernet tokens start with gAAAAA).
    assert!(!log.contains("gAAAAA"), "a token in the log");
}

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn check_config(
    cfg: &std::path::Path,
    secure: &std::path::Path,
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut cmd = std::process::Command::new(crate::util::builder::binary());
    cmd.args([
        "check-config",
        "-c",
        cfg.to_str().unwrap(),
        "-s",
        secure.to_str().unwrap(),
    ]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn secret_files_readable_by_others_are_named_once_and_world_writable_ones_refused() {
    let site = TestSite::new("secret_modes");
    let secure = secure_with_digest(&site);
    // An OpenStack provider: its clouds.yaml holds a password, its secure.yaml does too.
    let clouds = site.path("clouds.yaml");
    std::fs::write(
        &clouds,
        "clouds:\n  c:\n    auth_type: password\n    auth:\n      auth_url: http://127.0.0.1:9/v3\n      username: u\n      password: in-clouds-yaml\n      project_name: p\n",
    )
    .unwrap();
    let secure_yaml = site.path("os-secure.yaml");
    std::fs::write(
        &secure_yaml,
        "clouds:\n  c:\n    auth:\n      password: in-secure-yaml\n",
    )
    .unwrap();
    let body = format!(
        "{ONE_IMAGE}\n[[providers]]\nname = \"p\"\ncloud = \"c\"\n[[providers.diskimages]]\nname = \"fedora\"\n"
    );
    let cfg = site.config(0, "", &body);
    let env = [
        ("OS_CLIENT_CONFIG_FILE", clouds.to_str().unwrap()),
        ("OS_CLIENT_SECURE_FILE", secure_yaml.to_str().unwrap()),
    ];
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // All three private: no warning.
    for f in [&secure, &clouds, &secure_yaml] {
        chmod(f, 0o600);
    }
    let out = check_config(&cfg, &secure, &env);
    assert!(
        out.status.success() && !stderr(&out).contains("warning"),
        "{out:?}"
    );

    // Readable by others: one warning per file, naming it and its mode; still valid.
    chmod(&secure, 0o644);
    chmod(&clouds, 0o640);
    chmod(&secure_yaml, 0o604);
    let out = check_config(&cfg, &secure, &env);
    let err = stderr(&out);
    assert!(out.status.success(), "{out:?}");
    for (f, what) in [
        (&secure, "readable by its group and everyone (mode 0644)"),
        (&clouds, "readable by its group (mode 0640)"),
        (&secure_yaml, "readable by everyone (mode 0604)"),
    ] {
        let line = format!("warning: secret file {} is {what}", f.display());
        assert_eq!(err.matches(&line).count(), 1, "{line:?} once in:\n{err}");
    }
    assert_eq!(err.lines().count(), 3, "{err}");

    // The daemon says the same once, in its log, and runs.
    let mut b = site.start_with_env(0, &["-s", secure.to_str().unwrap()], &env);
    b.wait_for_log(WAIT, "ready: builder_id=");
    let log = b.log();
    for f in [&secure, &clouds, &secure_yaml] {
        assert_eq!(
            log.matches(&format!("secret file {} is readable", f.display()))
                .count(),
            1,
            "{log}"
        );
    }
    drop(b);

    // A clouds.yaml without secrets may be readable by everyone.
    std::fs::write(&clouds, "clouds:\n  c:\n    auth_type: password\n    auth:\n      auth_url: http://127.0.0.1:9/v3\n      username: u\n      project_name: p\n").unwrap();
    chmod(&clouds, 0o644);
    let out = check_config(&cfg, &secure, &env);
    assert!(
        !stderr(&out).contains(&clouds.display().to_string()),
        "{out:?}"
    );

    // Writable by everyone: refused by check-config and by the daemon, which never starts.
    chmod(&secure_yaml, 0o666);
    let out = check_config(&cfg, &secure, &env);
    let line = format!(
        "error: secret file {} is writable by everyone (mode 0666); refusing to use it",
        secure_yaml.display()
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains(&line), "{out:?}");
    let mut b = BuilderProcess::start(
        &[
            "-d",
            "-c",
            cfg.to_str().unwrap(),
            "-s",
            secure.to_str().unwrap(),
        ],
        &env,
        &site.path("refused.log"),
    );
    let status = b.wait_exit(WAIT);
    assert_eq!(status.code(), Some(2), "{}", b.log());
    assert!(
        b.log().contains(&line) && !b.log().contains("ready"),
        "{}",
        b.log()
    );
}
