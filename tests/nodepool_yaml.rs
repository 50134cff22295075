//! nodepool.yaml read directly, as a site running nodepool 11 has it: launcher keys (labels,
//! pools, webapp, a static provider) beside the builder's, a secure file named `secure.conf`
//! (YAML found by its content), `%(NODEPOOL_*)` substitution, and a provider whose driver
//! manages images this builder cannot upload (azure), left to another builder with
//! `--leave-provider` or refused at start-up.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;
use nodepool_builder::model::{BuildState, UploadState};

use crate::util::builder::binary;
use crate::util::site::{TestSite, WAIT, fake_dib};
use crate::util::wait_until;

/// Writes `nodepool.yaml` (builder 0) and `secure.conf`; `provider_images` is the YAML of the
/// `cloud` provider's `diskimages` value. Returns (main, secure).
fn write_site_yaml(site: &TestSite, provider_images: &str) -> (PathBuf, PathBuf) {
    let certs = site.server.certs();
    let dir_cloud = crate::util::repo_root().join("etc/quickstart/dir-cloud");
    let cloud = site.cloud_dir("cloud");
    let main = format!(
        r#"# The nodepool.yaml of a small site: launcher and builder share it.
webapp:
  port: 8005
  listen_address: 127.0.0.1
max-hold-age: 86400
tenant-resource-limits:
  - tenant-name: example
    max-servers: 10

images-dir: "%(NODEPOOL_TEST_IMAGES_DIR)"
build-log-dir: {logs}
zookeeper-timeout: 6
resync-interval: 30.0
retry-backoff-initial: 1.0
retry-backoff-max: 4.0

zookeeper-servers:
  - host: localhost
    port: {port}
    chroot: {chroot}

labels:
  - name: fedora-small
    min-ready: 1
  - name: static-node
    min-ready: 0

diskimages:
  - name: base
    abstract: true
    dib-cmd: {fake_dib}
    env-vars:
      DIB_CHECKSUM: '1'
  - name: fedora
    parent: base
    release: 40
    pause: no

providers:
  - name: cloud
    driver: command
    image-format: raw
    upload-command: [{script}, upload, {cloud}, '{{file}}', '{{external_name}}']
    delete-command: [{script}, delete, {cloud}, '{{external_id}}']
    max-concurrency: 10
    boot-timeout: 120
    pools:
      - name: main
        max-servers: 5
        labels:
          - name: fedora-small
            diskimage: fedora
            min-ram: 1024
    diskimages: {provider_images}
  - name: static-hosts
    driver: static
    pools:
      - name: main
        nodes:
          - name: host1.example.com
            labels: static-node
  - name: azure-west
    driver: azure
    zuul-public-key: ssh-rsa AAAA
    location: westeurope
    resource-group: nodepool
    auth-path: /etc/nodepool/azure.json
    diskimages:
      - name: fedora
    pools:
      - name: main
        max-servers: 2
"#,
        logs = site.log_dir(0).display(),
        port = site.server.tls_port().unwrap(),
        chroot = site.chroot,
        fake_dib = fake_dib().display(),
        script = dir_cloud.display(),
        cloud = cloud.display(),
    );
    let secure = format!(
        "# nodepool's secure file, YAML under its usual name.\nzookeeper-tls:\n  ca: {}\n  cert: {}\n  key: {}\ndiskimages:\n  - name: fedora\n    env-vars:\n      REGISTRY_PASSWORD: not-in-the-main-file\n",
        certs.ca.display(),
        certs.cert.display(),
        certs.key.display(),
    );
    let main_path = site.path("nodepool.yaml");
    let secure_path = site.path("secure.conf");
    std::fs::write(&main_path, main).unwrap();
    std::fs::write(&secure_path, secure).unwrap();
    (main_path, secure_path)
}

fn check_config(main: &Path, secure: &Path, extra: &[&str], images: &Path) -> std::process::Output {
    Command::new(binary())
        .args(["check-config", "-c", main.to_str().unwrap()])
        .args(["-s", secure.to_str().unwrap()])
        .args(extra)
        .env("NODEPOOL_TEST_IMAGES_DIR", images)
        .output()
        .unwrap()
}

#[test]
fn a_sites_nodepool_yaml_builds_uploads_reloads_and_cleans_up() {
    let site = TestSite::new("nodepool_yaml_site");
    let images = site.images_dir(0);
    let (main, secure) = write_site_yaml(
        &site,
        "\n      - name: fedora\n        config-drive: true\n        connection-type: ssh\n        meta:\n          purpose: test\n",
    );

    let out = check_config(&main, &secure, &["--leave-provider", "azure-west"], &images);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    assert!(
        stdout.contains("provider azure-west: left to another builder"),
        "{stdout}"
    );

    let images_env = images.display().to_string();
    let mut b = site.start_config(
        0,
        &main,
        &[
            "-s",
            secure.to_str().unwrap(),
            "--leave-provider",
            "azure-west",
        ],
        &[("NODEPOOL_TEST_IMAGES_DIR", &images_env)],
    );
    b.wait_for_log(WAIT, "Provider azure-west is left to another builder");
    let build = site.wait_builds("fedora", BuildState::Ready, 1).remove(0);
    // images-dir came from %(NODEPOOL_TEST_IMAGES_DIR).
    assert!(
        images.join(format!("fedora-{}.raw", build.id)).exists(),
        "the build is in the substituted images-dir"
    );
    let upload = site
        .wait_uploads("fedora", "cloud", UploadState::Ready, 1)
        .remove(0)
        .1;
    let external = upload.upload.external_id.clone().unwrap();
    assert_eq!(site.cloud_images("cloud"), vec![external.clone()]);
    // Nothing was uploaded to (or recorded for) the providers left alone or without images.
    let providers: Vec<String> = site
        .uploads("fedora")
        .iter()
        .map(|(_, u)| u.provider.clone())
        .collect();
    assert_eq!(providers, vec!["cloud".to_string()]);

    // The operator takes the image off the provider: the reload (SIGHUP) reads the YAML
    // again and the janitor removes the cloud image and its record, as with TOML.
    write_site_yaml(&site, "[]");
    b.signal(Signal::SIGHUP);
    b.wait_for_log(WAIT, "Configuration reloaded from");
    site.wait("the cloud image to be deleted", || {
        site.cloud_images("cloud").is_empty().then_some(())
    });
    wait_until(WAIT, "the upload record to be removed", || {
        site.uploads("fedora").is_empty()
    });
    site.assert_no_leaks(&["cloud"], &[0]);
}

#[test]
fn a_provider_we_cannot_upload_to_is_a_start_up_error_naming_it() {
    let site = TestSite::new("nodepool_yaml_azure");
    let images = site.images_dir(0);
    let (main, secure) = write_site_yaml(&site, "[{name: fedora}]");
    let out = check_config(&main, &secure, &[], &images);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(&main).unwrap();
    let line = 1 + text.lines().position(|l| l == "    driver: azure").unwrap();
    assert_eq!(
        stderr.trim(),
        format!(
            "{}:{line}:13: provider azure-west: driver `azure` manages images, but this builder cannot upload to it; run it on nodepool's builder and pass --leave-provider azure-west here",
            main.display()
        )
    );
    // The daemon refuses to start the same way, before it does anything.
    let out = Command::new(binary())
        .args(["-f", "-c", main.to_str().unwrap()])
        .args(["-s", secure.to_str().unwrap()])
        .env("NODEPOOL_TEST_IMAGES_DIR", &images)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("provider azure-west: driver `azure`"),
        "{out:?}"
    );
    // A name that matches nothing is only a warning.
    let out = check_config(
        &main,
        &secure,
        &[
            "--leave-provider",
            "azure-west",
            "--leave-provider",
            "azure-typo",
        ],
        &images,
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning: --leave-provider azure-typo: ")
    );
}
