//! Glance behind TLS with a certificate of a private CA (the test CA of `util::zk::certs`,
//! served by uWSGI's own https socket): the daemon trusts it each way openstacksdk users
//! name a CA on Debian, and an untrusted one fails with one clear line.
//!
//! Each case runs the real daemon with exactly the trust variables it names (the test run's
//! own `OS_CACERT`, `REQUESTS_CA_BUNDLE`, `SSL_CERT_FILE`, ... are removed), one diskimage
//! and one upload to the shared https Glance. The "system store" case points `SSL_CERT_FILE`
//! at a bundle holding the test CA: that is how the store is overridden without installing a
//! CA into the machine's /etc/ssl.

use std::path::Path;

use nodepool_builder::model::UploadState;

use crate::util::builder::BuilderProcess;
use crate::util::glance::GlanceServer;
use crate::util::site::{TestSite, WAIT};
use crate::util::wait_for;
use crate::util::zk::certs;

/// The diskimage every case builds.
const IMAGE: &str = "tls";

/// An auth-less clouds.yaml entry on the https Glance, followed by `lines` (each indented by
/// four spaces).
fn glance_entry(glance: &GlanceServer, lines: &str) -> String {
    format!(
        "    auth_type: none\n    image_endpoint_override: {}\n{lines}",
        glance.url()
    )
}

/// Writes the site's `clouds.yaml` with the entries `(name, body)`; returns its path.
fn write_clouds(site: &TestSite, clouds: &[(&str, String)]) -> String {
    let mut yaml = String::from("clouds:\n");
    for (name, body) in clouds {
        yaml.push_str(&format!("  {name}:\n{body}"));
    }
    let path = site.path("clouds.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

/// Builder 0's config: diskimage [`IMAGE`] for every provider `(name, cloud)`.
fn write_config(site: &TestSite, providers: &[(&str, &str)]) {
    let mut body = format!("\n[[diskimages]]\nname = \"{IMAGE}\"\ndib-cmd = \"{{fake_dib}}\"\n");
    for (provider, cloud) in providers {
        body.push_str(&TestSite::openstack_provider(provider, cloud, &[IMAGE], ""));
    }
    site.config(0, "", &body);
}

/// The first `Failed to upload` line of `provider` in the builder's log.
fn failure_line(b: &BuilderProcess, provider: &str) -> Option<String> {
    let needle = format!("to provider {provider}: ");
    b.log()
        .lines()
        .find(|l| l.contains("Failed to upload build") && l.contains(&needle))
        .map(str::to_string)
}

/// Runs the daemon with `env` (and nothing else deciding trust) on a one-provider site whose
/// cloud has `cloud_lines`, and checks that the upload becomes ready and Glance holds it.
fn upload_is_ready(test: &str, cloud_lines: &str, env: &[(&str, &str)]) {
    let glance = GlanceServer::shared_tls();
    let site = TestSite::new(test);
    let provider = format!("tls-{test}");
    let clouds = write_clouds(&site, &[("cloud", glance_entry(glance, cloud_lines))]);
    write_config(&site, &[(&provider, "cloud")]);
    let mut all_env = vec![("OS_CLIENT_CONFIG_FILE", clouds.as_str())];
    all_env.extend_from_slice(env);
    let b = site.start_with_trust_env(0, &all_env);
    let up = wait_for(WAIT, &format!("a ready upload to {provider}"), || {
        if let Some(line) = failure_line(&b, &provider) {
            panic!("the upload over https failed: {line}");
        }
        site.uploads_in(IMAGE, &provider, UploadState::Ready)
            .pop()
            .map(|(_, up)| up)
    });
    let id = up
        .upload
        .external_id
        .expect("a ready upload has an external id");
    let image = glance.get_image(&id).expect("the image is in Glance");
    assert_eq!(image["status"], "active");
    assert_eq!(image["nodepool_provider_name"], provider.as_str());
}

/// A PEM bundle of the wrong CA and the test CA, as a system bundle holds many CAs.
fn bundle_with_test_ca(dir: &Path) -> String {
    let certs = certs();
    let mut pem = std::fs::read_to_string(&certs.wrong_ca).unwrap();
    pem.push_str(&std::fs::read_to_string(&certs.ca).unwrap());
    let path = dir.join("bundle.pem");
    std::fs::write(&path, pem).unwrap();
    path.display().to_string()
}

#[test]
fn upload_over_https_is_ready_with_clouds_yaml_cacert() {
    let ca = certs().ca.display().to_string();
    upload_is_ready("cacert", &format!("    cacert: {ca}\n"), &[]);
}

#[test]
fn upload_over_https_is_ready_with_os_cacert() {
    let ca = certs().ca.display().to_string();
    upload_is_ready("os_cacert", "", &[("OS_CACERT", &ca)]);
}

#[test]
fn upload_over_https_is_ready_with_requests_ca_bundle() {
    let dir = crate::util::test_dir("requests_ca_bundle");
    let bundle = bundle_with_test_ca(dir.path());
    upload_is_ready("requests_ca_bundle", "", &[("REQUESTS_CA_BUNDLE", &bundle)]);
}

#[test]
fn upload_over_https_is_ready_with_the_ca_in_the_system_store() {
    let dir = crate::util::test_dir("system_store");
    let bundle = bundle_with_test_ca(dir.path());
    // SSL_CERT_FILE replaces the system store's files (/etc/ssl/certs) for this daemon only.
    upload_is_ready("system_store", "", &[("SSL_CERT_FILE", &bundle)]);
}

#[test]
fn untrusted_https_glance_fails_with_one_line_naming_the_ca_problem() {
    let glance = GlanceServer::shared_tls();
    let site = TestSite::new("untrusted");
    let (plain, keystone) = ("tls-untrusted", "tls-untrusted-keystone");
    let password = "tls-untrusted-s3cret-password";
    // The second cloud authenticates with a password at an https "Keystone" of the same
    // untrusted CA: the handshake fails before the password is sent, and it is never logged.
    let keystone_entry = format!(
        "    auth_type: password\n    auth:\n      auth_url: {}/identity\n      username: nodepool\n      password: {password}\n      project_name: nodepool\n",
        glance.url()
    );
    let clouds = write_clouds(
        &site,
        &[
            ("cloud", glance_entry(glance, "")),
            ("keystone-cloud", keystone_entry),
        ],
    );
    write_config(&site, &[(plain, "cloud"), (keystone, "keystone-cloud")]);
    // Nothing names a CA: the system store decides, and the test CA is not in it.
    let b = site.start_with_trust_env(0, &[("OS_CLIENT_CONFIG_FILE", &clouds)]);
    let (line, keystone_line) = wait_for(WAIT, "both uploads to fail", || {
        Some((failure_line(&b, plain)?, failure_line(&b, keystone)?))
    });

    for (line, url) in [
        (&line, format!("{}/v2/images", glance.url())),
        (
            &keystone_line,
            format!("{}/identity/v3/auth/tokens", glance.url()),
        ),
    ] {
        assert!(line.contains(" ERROR "), "{line}");
        assert!(line.contains(&url), "the line names the URL {url}: {line}");
        assert!(
            line.contains("UnknownIssuer") && line.contains("unknown authority"),
            "the line names the CA problem: {line}"
        );
        assert!(
            line.contains("the system store"),
            "the line says which CAs were trusted: {line}"
        );
    }

    let log = b.log();
    assert!(!log.contains("panicked"), "no panic:\n{log}");
    assert!(
        !log.contains(password),
        "the password is never logged:\n{log}"
    );
    // One line per failed attempt: besides the failure itself only the scheduler's retry note
    // and the janitor's failed image listing say it; no retried request, no clean-up of an
    // image that was never created.
    let expected = [
        "Failed to upload build",
        "upload failed (",
        "cannot list cloud images for leak detection",
    ];
    for l in log.lines().filter(|l| l.contains("UnknownIssuer")) {
        assert!(
            expected.iter().any(|e| l.contains(e)),
            "the TLS failure is reported once per attempt, not by: {l}"
        );
    }
    assert!(glance.images_of(plain).is_empty(), "nothing reached Glance");
}
