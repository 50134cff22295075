//! The OpenStack driver (`provider::openstack`) called directly against real servers: Glance
//! 33 (fixed identity, and behind Keystone 30), with real qcow2, raw and vhd files made by
//! qemu-img; uploads, checksums, listing, rate limiting, timeouts, Glance dying or down,
//! https trust, clouds.yaml and secure.yaml lookup, Keystone tokens and credentials.
//!
//! Most OpenStack tests share one Glance and tell their images apart by provider name
//! (every test uses a unique one); the tests that kill Glance start their own. All
//! Keystone tests share one Keystone, except the token-expiry test, which needs short
//! tokens.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use md5::Digest;
use nodepool_builder::config::{Driver, Provider};
use nodepool_builder::provider::openstack::OpenStackDriver;
use nodepool_builder::provider::openstack::clouds::{self, AuthType, SearchEnv};
use nodepool_builder::provider::{ErrorKind, ProviderDriver, for_provider};
use serde_json::Value;

use crate::util::glance::{
    GlanceServer, KeystoneOptions, KeystoneServer, qemu_image, write_random,
};
use crate::util::{test_dir, wait_for, wait_until};

use super::request;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A provider name no other test uses.
fn unique(name: &str) -> String {
    format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

fn openstack_provider(name: &str, cloud: &str, rate: f64) -> Provider {
    Provider {
        name: name.to_string(),
        driver: Driver::OpenStack {
            cloud: cloud.to_string(),
            region_name: None,
            image_format: None,
        },
        rate,
        image_name_format: "{image_name}-{timestamp}".to_string(),
        image_upload_timeout: 3600,
        post_upload_hook: None,
        diskimages: Vec::new(),
    }
}

/// `dir/clouds.yaml` with cloud `test` talking to `glance` without Keystone.
fn noauth_clouds(dir: &Path, glance: &GlanceServer) -> PathBuf {
    let path = dir.join("clouds.yaml");
    std::fs::write(
        &path,
        format!(
            "clouds:\n  test:\n    auth_type: none\n    image_endpoint_override: {}/v2/\n",
            glance.url()
        ),
    )
    .unwrap();
    path
}

/// A driver for provider `name` on the shared fixed-identity Glance.
fn shared_driver(dir: &Path, name: &str, rate: f64) -> Box<dyn ProviderDriver> {
    let clouds = noauth_clouds(dir, GlanceServer::shared());
    for_provider(&openstack_provider(name, "test", rate), Some(&clouds)).expect("driver")
}

fn digest_file<D: Digest>(path: &Path) -> String {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = D::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Uploads a `format` image of `mib` MiB and checks everything Glance says about it.
fn upload_and_check(format: &str, mib: u64) {
    let dir = test_dir(&format!("upload-{format}"));
    let provider = unique(&format!("upload-{format}"));
    let driver = shared_driver(dir.path(), &provider, 0.0);
    let file = qemu_image(dir.path(), "image", format, mib << 20);
    let req = request(&provider, &file, format);
    let uploaded = driver
        .upload(&req)
        .unwrap_or_else(|e| panic!("upload failed: {e}"));
    let glance = GlanceServer::shared();
    let image = glance
        .get_image(&uploaded.external_id)
        .expect("the uploaded image exists");
    let md5 = digest_file::<md5::Md5>(&file);
    let sha256 = digest_file::<sha2::Sha256>(&file);
    let sha512 = digest_file::<sha2::Sha512>(&file);
    let size = std::fs::metadata(&file).unwrap().len();
    assert_eq!(image["status"], "active", "{image:#}");
    assert_eq!(image["name"], req.external_name.as_str(), "{image:#}");
    assert_eq!(image["disk_format"], format, "{image:#}");
    assert_eq!(image["container_format"], "bare", "{image:#}");
    assert_eq!(image["visibility"], "private", "{image:#}");
    assert_eq!(image["size"], size, "{image:#}");
    assert_eq!(image["checksum"], md5.as_str(), "{image:#}");
    assert_eq!(image["os_hash_algo"], "sha512", "{image:#}");
    assert_eq!(image["os_hash_value"], sha512.as_str(), "{image:#}");
    for (key, value) in &req.properties {
        assert_eq!(image[key], value.as_str(), "property {key}: {image:#}");
    }
    assert_eq!(
        image["owner_specified.openstack.md5"],
        md5.as_str(),
        "{image:#}"
    );
    assert_eq!(
        image["owner_specified.openstack.sha256"],
        sha256.as_str(),
        "{image:#}"
    );
    assert_eq!(
        image["owner_specified.openstack.object"],
        format!("images/{}", req.external_name),
        "{image:#}"
    );
    driver.delete(&uploaded.external_id).unwrap();
    assert!(glance.get_image(&uploaded.external_id).is_none());
}

// ---------------------------------------------------------------------------------------
// Uploads to a fixed-identity Glance
// ---------------------------------------------------------------------------------------

#[test]
fn uploads_qcow2() {
    upload_and_check("qcow2", 16);
}

#[test]
fn uploads_raw() {
    upload_and_check("raw", 8);
}

#[test]
fn uploads_vhd() {
    upload_and_check("vhd", 8);
}

#[test]
fn checksums_from_sidecar_files_are_used() {
    let dir = test_dir("sidecar");
    let provider = unique("sidecar");
    let driver = shared_driver(dir.path(), &provider, 0.0);
    let file = qemu_image(dir.path(), "image", "qcow2", 4 << 20);
    let mut req = request(&provider, &file, "qcow2");
    // Values no hash of the file has: they can only have come from the request.
    req.md5 = Some("0123456789abcdef0123456789abcdef".to_string());
    req.sha256 = Some("ab".repeat(32));
    let uploaded = driver
        .upload(&req)
        .unwrap_or_else(|e| panic!("upload failed: {e}"));
    let image = GlanceServer::shared()
        .get_image(&uploaded.external_id)
        .unwrap();
    assert_eq!(
        image["owner_specified.openstack.md5"],
        "0123456789abcdef0123456789abcdef"
    );
    assert_eq!(image["owner_specified.openstack.sha256"], "ab".repeat(32));
    // Glance computes its own checksum from the data.
    assert_eq!(image["checksum"], digest_file::<md5::Md5>(&file).as_str());
    driver.delete(&uploaded.external_id).unwrap();
}

#[test]
fn raw_bytes_declared_qcow2_are_rejected_and_nothing_is_left() {
    let dir = test_dir("mismatch");
    let provider = unique("mismatch");
    let driver = shared_driver(dir.path(), &provider, 0.0);
    let file = dir.path().join("not-really.qcow2");
    write_random(&file, 32 << 20);
    let glance = GlanceServer::shared();
    let stored_before = glance.stored_files();
    let err = driver
        .upload(&request(&provider, &file, "qcow2"))
        .expect_err("a raw file declared qcow2 must fail");
    assert_eq!(err.kind, ErrorKind::UnsupportedMedia, "{err}");
    assert!(err.message.contains(&provider), "{err}");
    assert!(err.message.contains("415"), "{err}");
    assert!(!err.message.contains('\n'), "one line: {err}");
    assert!(
        glance.images_of(&provider).is_empty(),
        "left behind: {:#?}",
        glance.images_of(&provider)
    );
    // The rejected data is gone from the store too (only a DELETE removes it).
    let new_files: Vec<String> = glance
        .stored_files()
        .into_iter()
        .filter(|f| !stored_before.contains(f))
        .collect();
    let leftovers: Vec<&String> = new_files
        .iter()
        .filter(|f| err.message.contains(f.as_str()))
        .collect();
    assert!(
        leftovers.is_empty(),
        "data left in the store: {leftovers:?}"
    );
}

#[test]
fn delete_removes_the_image_and_unknown_ids_are_fine() {
    let dir = test_dir("delete");
    let provider = unique("delete");
    let driver = shared_driver(dir.path(), &provider, 0.0);
    let file = qemu_image(dir.path(), "image", "qcow2", 1 << 20);
    let uploaded = driver.upload(&request(&provider, &file, "qcow2")).unwrap();
    let glance = GlanceServer::shared();
    assert!(glance.get_image(&uploaded.external_id).is_some());
    driver.delete(&uploaded.external_id).unwrap();
    assert!(glance.get_image(&uploaded.external_id).is_none());
    driver
        .delete(&uploaded.external_id)
        .expect("deleting a deleted image succeeds");
    driver
        .delete(&uuid::Uuid::new_v4().hyphenated().to_string())
        .expect("deleting an unknown image succeeds");
    let err = driver.delete("../../v2/images").expect_err("not an id");
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
}

#[test]
fn list_images_finds_images_by_provider_name_across_pages() {
    let dir = test_dir("list");
    let provider = unique("list");
    let other = unique("list-other");
    let driver = shared_driver(dir.path(), &provider, 0.0);
    let other_driver = shared_driver(dir.path(), &other, 0.0);
    let file = qemu_image(dir.path(), "image", "qcow2", 1 << 20);
    let mine = driver.upload(&request(&provider, &file, "qcow2")).unwrap();
    let theirs = other_driver
        .upload(&request(&other, &file, "qcow2"))
        .unwrap();
    // A few bare (queued) images more, listed two per page.
    let glance = GlanceServer::shared();
    let mut created = vec![mine.external_id.clone()];
    for i in 0..6 {
        let body = serde_json::json!({"name": format!("filler-{i}"), "disk_format": "raw",
            "container_format": "bare", "nodepool_provider_name": provider, "nodepool_build_id": "filler"});
        let reply = crate::util::glance::http_expect(
            "POST",
            &format!("{}/v2/images", glance.url()),
            None,
            Some(&body),
            201,
        );
        created.push(reply.json()["id"].as_str().unwrap().to_string());
    }
    let clouds = noauth_clouds(dir.path(), glance);
    let paging = OpenStackDriver::new(&openstack_provider(&provider, "test", 0.0), Some(&clouds))
        .unwrap()
        .with_list_page_size(2);
    let mut expected = created.clone();
    expected.sort();
    for lister in [driver.as_ref(), &paging as &dyn ProviderDriver] {
        let mut listed_ids: Vec<String> = lister
            .list_images()
            .unwrap()
            .iter()
            .map(|i| i.id.clone())
            .collect();
        listed_ids.sort();
        assert_eq!(listed_ids, expected);
    }
    let listed = driver.list_images().unwrap();
    let found = listed.iter().find(|i| i.id == mine.external_id).unwrap();
    assert!(found.name.starts_with("debian-"), "{found:?}");
    assert_eq!(
        found.properties.get("nodepool_provider_name"),
        Some(&provider)
    );
    assert_eq!(
        found
            .properties
            .get("nodepool_upload_id")
            .map(String::as_str),
        Some("0000000001")
    );
    assert_eq!(
        found.properties.get("status").map(String::as_str),
        Some("active")
    );
    let other_listed = other_driver.list_images().unwrap();
    assert_eq!(
        other_listed
            .iter()
            .map(|i| i.id.as_str())
            .collect::<Vec<_>>(),
        [theirs.external_id.as_str()]
    );
    for id in created {
        driver.delete(&id).unwrap();
    }
    other_driver.delete(&theirs.external_id).unwrap();
    assert!(driver.list_images().unwrap().is_empty());
}

#[test]
fn rate_spaces_api_calls_also_across_threads() {
    let dir = test_dir("rate");
    let provider = unique("rate");
    let driver = shared_driver(dir.path(), &provider, 0.5);
    let started = Instant::now();
    for _ in 0..3 {
        driver.list_images().unwrap();
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1),
        "3 calls at rate 0.5 took only {elapsed:?}"
    );

    // The limit is the provider's, not the thread's.
    let driver = shared_driver(dir.path(), &provider, 0.5);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| driver.list_images().unwrap());
        }
    });
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1),
        "3 concurrent calls at rate 0.5 took only {elapsed:?}"
    );
}

#[test]
fn concurrent_uploads_to_one_provider_all_succeed() {
    let dir = test_dir("concurrent");
    let provider = unique("concurrent");
    let driver = shared_driver(dir.path(), &provider, 0.0);
    let files: Vec<PathBuf> = (0..3)
        .map(|i| qemu_image(dir.path(), &format!("image{i}"), "qcow2", 4 << 20))
        .collect();
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|file| {
                let driver = &driver;
                let provider = &provider;
                s.spawn(move || driver.upload(&request(provider, file, "qcow2")))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{e}"))
                    .external_id
            })
            .collect()
    });
    let glance = GlanceServer::shared();
    for (id, file) in ids.iter().zip(&files) {
        let image = glance.get_image(id).unwrap();
        assert_eq!(image["status"], "active");
        assert_eq!(image["checksum"], digest_file::<md5::Md5>(file).as_str());
        driver.delete(id).unwrap();
    }
}

#[test]
fn upload_timeout_is_an_error_and_leaves_nothing() {
    let dir = test_dir("timeout");
    let provider = unique("timeout");
    let driver = shared_driver(dir.path(), &provider, 0.0);
    let file = qemu_image(dir.path(), "image", "raw", 256 << 20);
    let mut req = request(&provider, &file, "raw");
    req.timeout = Duration::from_millis(300);
    let err = driver
        .upload(&req)
        .expect_err("300 ms is not enough for 256 MiB");
    assert_eq!(err.kind, ErrorKind::Timeout, "{err}");
    // When even the create timed out, the image may appear after the driver gave up on it;
    // the driver's later calls delete it then.
    let glance = GlanceServer::shared();
    wait_until(
        Duration::from_secs(30),
        "no image of the timed-out upload",
        || {
            driver.list_images().is_ok_and(|l| l.is_empty())
                && glance.images_of(&provider).is_empty()
        },
    );
}

#[test]
fn missing_file_is_an_io_error_before_anything_is_created() {
    let dir = test_dir("missing");
    let provider = unique("missing");
    let driver = shared_driver(dir.path(), &provider, 0.0);
    let err = driver
        .upload(&request(&provider, &dir.path().join("nope.qcow2"), "qcow2"))
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Io, "{err}");
    assert!(err.message.contains("nope.qcow2"), "{err}");
    assert!(GlanceServer::shared().images_of(&provider).is_empty());
}

// ---------------------------------------------------------------------------------------
// A Glance that dies mid-upload
// ---------------------------------------------------------------------------------------

/// This process's peak resident set size (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn glance_killed_mid_upload_leaks_nothing_after_restart() {
    let dir = test_dir("killed");
    let mut glance = GlanceServer::start();
    let provider = unique("killed");
    let clouds = noauth_clouds(dir.path(), &glance);
    let driver = for_provider(&openstack_provider(&provider, "test", 0.0), Some(&clouds)).unwrap();
    let file = qemu_image(dir.path(), "big", "raw", 512 << 20);
    let req = request(&provider, &file, "raw");
    let peak_before = peak_rss();
    let result = std::thread::scope(|s| {
        let upload = s.spawn(|| driver.upload(&req));
        let url = glance.url();
        let saving = wait_for(
            Duration::from_secs(60),
            "the upload to reach Glance",
            || {
                let reply =
                    crate::util::glance::http("GET", &format!("{url}/v2/images"), None, None)
                        .ok()?;
                let json: Value = serde_json::from_slice(&reply.body).ok()?;
                json["images"]
                    .as_array()?
                    .iter()
                    .find(|i| {
                        i["nodepool_provider_name"] == provider.as_str() && i["status"] == "saving"
                    })
                    .cloned()
            },
        );
        // Half the file has reached Glance's store: the driver streams it, so this process
        // has not grown by anything like the file's size (a whole-file read would be 512 MiB).
        let stored = glance
            .dir()
            .join("images")
            .join(saving["id"].as_str().unwrap());
        wait_until(
            Duration::from_secs(60),
            "256 MiB to reach Glance's store",
            || std::fs::metadata(&stored).is_ok_and(|m| m.len() >= 256 << 20),
        );
        let grown = peak_rss().saturating_sub(peak_before);
        assert!(
            grown < 300 << 20,
            "peak RSS grew by {} MiB during the upload",
            grown >> 20
        );
        glance.kill();
        (upload.join().unwrap(), saving)
    });
    let (result, saving) = result;
    let err = result.expect_err("the upload cannot succeed when Glance dies");
    assert!(
        matches!(err.kind, ErrorKind::Io | ErrorKind::Server),
        "{err}"
    );
    let id = saving["id"].as_str().unwrap().to_string();
    assert!(
        err.message.contains(&id),
        "the message names the image: {err}"
    );

    glance.restart();
    // The driver retries the delete it could not do on its next call.
    let listed = driver.list_images().unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    assert!(
        glance.images_of(&provider).is_empty(),
        "leaked: {:#?}",
        glance.images_of(&provider)
    );
    assert!(glance.get_image(&id).is_none());
}

#[test]
fn glance_down_is_an_io_error_naming_the_provider() {
    let dir = test_dir("down");
    let mut glance = GlanceServer::start();
    let provider = unique("down");
    let clouds = noauth_clouds(dir.path(), &glance);
    let driver = for_provider(&openstack_provider(&provider, "test", 0.0), Some(&clouds)).unwrap();
    glance.kill();
    let file = qemu_image(dir.path(), "image", "qcow2", 1 << 20);
    let err = driver
        .upload(&request(&provider, &file, "qcow2"))
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Io, "{err}");
    assert!(err.message.contains(&provider), "{err}");
    glance.restart();
    // Nothing was created, and the create's id (deleted or never there) is not retried forever.
    driver.list_images().unwrap();
    assert!(glance.images_of(&provider).is_empty());
}

#[test]
fn https_glance_with_cacert_verify_insecure_and_the_system_store() {
    let dir = test_dir("https");
    let glance = GlanceServer::start_tls();
    let ca = crate::util::zk::certs().ca.clone();
    let provider = unique("https");
    let clouds = dir.path().join("clouds.yaml");
    std::fs::write(
        &clouds,
        format!(
            "clouds:\n\
             \x20 private-ca:\n    auth_type: none\n    image_endpoint_override: {url}\n    cacert: {ca}\n\
             \x20 no-verify:\n    auth_type: none\n    image_endpoint_override: {url}\n    verify: false\n\
             \x20 insecure:\n    auth_type: none\n    image_endpoint_override: {url}\n    insecure: true\n    cacert: {wrong}\n\
             \x20 public-roots:\n    auth_type: none\n    image_endpoint_override: {url}\n\
             \x20 bad-cacert:\n    auth_type: none\n    image_endpoint_override: {url}\n    cacert: {missing}\n",
            url = glance.url(),
            ca = ca.display(),
            wrong = crate::util::zk::certs().wrong_ca.display(),
            missing = dir.path().join("missing.pem").display(),
        ),
    )
    .unwrap();
    let driver = for_provider(
        &openstack_provider(&provider, "private-ca", 0.0),
        Some(&clouds),
    )
    .unwrap();
    let file = qemu_image(dir.path(), "image", "qcow2", 1 << 20);
    let uploaded = driver
        .upload(&request(&provider, &file, "qcow2"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        glance.get_image(&uploaded.external_id).unwrap()["status"],
        "active"
    );

    let insecure = for_provider(
        &openstack_provider(&provider, "no-verify", 0.0),
        Some(&clouds),
    )
    .unwrap();
    assert_eq!(insecure.list_images().unwrap().len(), 1);
    // openstacksdk: `insecure` wins over a cacert, even one of the wrong CA.
    let insecure = for_provider(
        &openstack_provider(&provider, "insecure", 0.0),
        Some(&clouds),
    )
    .unwrap();
    assert_eq!(insecure.list_images().unwrap().len(), 1);

    // The test CA is not in the system store (unless the test run names it in
    // REQUESTS_CA_BUNDLE or the like, which this process would honour).
    let public = for_provider(
        &openstack_provider(&provider, "public-roots", 0.0),
        Some(&clouds),
    )
    .unwrap();
    let err = public.list_images().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Io, "{err}");
    assert!(err.message.contains("UnknownIssuer"), "{err}");

    let err = for_provider(
        &openstack_provider(&provider, "bad-cacert", 0.0),
        Some(&clouds),
    )
    .err()
    .unwrap();
    assert_eq!(err.kind, ErrorKind::Config, "{err}");
    assert!(err.message.contains("missing.pem"), "{err}");
    driver.delete(&uploaded.external_id).unwrap();
}

// ---------------------------------------------------------------------------------------
// clouds.yaml
// ---------------------------------------------------------------------------------------

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn clouds_yaml_lookup_order_follows_openstacksdk() {
    let dir = test_dir("clouds-lookup");
    let cwd = dir.path().join("cwd");
    let home = dir.path().join("home");
    let explicit = dir.path().join("explicit/my-clouds.yaml");
    std::fs::create_dir_all(&cwd).unwrap();
    let mut env = SearchEnv {
        client_config_file: None,
        client_secure_file: None,
        cwd: Some(cwd.clone()),
        home: Some(home.clone()),
        xdg_config_home: None,
    };
    let etc = Path::new("/etc/openstack/clouds.yaml");
    let expect_nothing = if etc.exists() || Path::new("/etc/xdg/openstack/clouds.yaml").exists() {
        None
    } else {
        Some(())
    };
    if expect_nothing.is_some() {
        assert_eq!(clouds::locate(&env).clouds, None);
    }
    write(&home.join(".config/openstack/clouds.yaml"), "clouds: {}\n");
    assert_eq!(
        clouds::locate(&env).clouds,
        Some(home.join(".config/openstack/clouds.yaml"))
    );
    write(&cwd.join("clouds.yaml"), "clouds: {}\n");
    assert_eq!(clouds::locate(&env).clouds, Some(cwd.join("clouds.yaml")));
    write(&explicit, "clouds: {}\n");
    env.client_config_file = Some(explicit.clone());
    assert_eq!(clouds::locate(&env).clouds, Some(explicit.clone()));
    // XDG_CONFIG_HOME replaces ~/.config.
    let xdg = dir.path().join("xdg");
    write(&xdg.join("openstack/clouds.yml"), "clouds: {}\n");
    let env = SearchEnv {
        client_config_file: None,
        cwd: None,
        xdg_config_home: Some(xdg.clone()),
        ..env
    };
    assert_eq!(
        clouds::locate(&env).clouds,
        Some(xdg.join("openstack/clouds.yml"))
    );
    let searched = clouds::locate(&env).searched;
    assert_eq!(searched[0], xdg.join("openstack/clouds.yaml"));
    assert!(
        searched.contains(&PathBuf::from("/etc/openstack/clouds.yaml")),
        "{searched:?}"
    );
    assert!(
        !searched.contains(&home.join(".config/openstack/clouds.yaml")),
        "{searched:?}"
    );
}

#[test]
fn secure_yaml_is_merged_over_clouds_yaml() {
    let dir = test_dir("clouds-secure");
    let cwd = dir.path().join("cwd");
    let home = dir.path().join("home");
    write(
        &cwd.join("clouds.yaml"),
        "clouds:\n  mycloud:\n    auth:\n      auth_url: https://keystone.example:5000\n      username: nodepool\n      \
         project_name: ci\n      user_domain_name: Default\n      project_domain_name: Default\n    \
         region_name: RegionOne\n    image_format: raw\n  other:\n    auth_type: none\n    \
         image_endpoint_override: http://glance.example\n",
    );
    write(
        &home.join(".config/openstack/secure.yaml"),
        "clouds:\n  mycloud:\n    auth:\n      password: 12345\n",
    );
    let env = SearchEnv {
        client_config_file: None,
        client_secure_file: None,
        cwd: Some(cwd.clone()),
        home: Some(home.clone()),
        xdg_config_home: None,
    };
    let found = clouds::locate(&env);
    assert_eq!(found.clouds, Some(cwd.join("clouds.yaml")));
    assert_eq!(
        found.secure,
        Some(home.join(".config/openstack/secure.yaml"))
    );
    let cloud = clouds::load(
        found.clouds.as_deref().unwrap(),
        found.secure.as_deref(),
        "mycloud",
        None,
    )
    .unwrap();
    assert_eq!(cloud.auth_type, AuthType::Password);
    assert_eq!(cloud.auth.username.as_deref(), Some("nodepool"));
    // A YAML number is a password too.
    assert_eq!(
        cloud.auth.password.as_ref().map(|p| p.expose()),
        Some("12345")
    );
    assert_eq!(cloud.region_name.as_deref(), Some("RegionOne"));
    assert_eq!(cloud.image_format.as_deref(), Some("raw"));
    assert_eq!(cloud.interface, "public");
    assert!(
        !format!("{cloud:?}").contains("12345"),
        "Debug shows the password: {cloud:?}"
    );

    // OS_CLIENT_SECURE_FILE comes first.
    let explicit_secure = dir.path().join("elsewhere/secure.yaml");
    write(
        &explicit_secure,
        "clouds:\n  mycloud:\n    auth:\n      password: from-env\n    region_name: RegionTwo\n",
    );
    let env = SearchEnv {
        client_secure_file: Some(explicit_secure.clone()),
        ..env
    };
    let found = clouds::locate(&env);
    assert_eq!(found.secure, Some(explicit_secure));
    let cloud = clouds::load(
        found.clouds.as_deref().unwrap(),
        found.secure.as_deref(),
        "mycloud",
        None,
    )
    .unwrap();
    assert_eq!(
        cloud.auth.password.as_ref().map(|p| p.expose()),
        Some("from-env")
    );
    assert_eq!(cloud.region_name.as_deref(), Some("RegionTwo"));
    // The provider's region-name wins.
    let cloud = clouds::load(
        found.clouds.as_deref().unwrap(),
        None,
        "mycloud",
        Some("RegionThree"),
    )
    .unwrap_err();
    assert_eq!(
        cloud.kind,
        ErrorKind::Config,
        "without secure.yaml there is no password"
    );
    assert!(cloud.message.contains("password"), "{cloud}");

    let err = clouds::load(&cwd.join("clouds.yaml"), None, "nosuch", None).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Config);
    assert!(
        err.message.contains("nosuch") && err.message.contains("mycloud, other"),
        "{err}"
    );
}

#[test]
fn clouds_yaml_regions_auth_types_and_image_format() {
    let dir = test_dir("clouds-misc");
    let path = dir.path().join("clouds.yaml");
    write(
        &path,
        "clouds:\n\
         \x20 regions:\n\
         \x20   auth:\n\
         \x20     auth_url: http://k.example/v3\n\
         \x20     application_credential_id: abc\n\
         \x20     application_credential_secret: shh\n\
         \x20   auth_type: v3applicationcredential\n\
         \x20   interface: internal\n\
         \x20   regions:\n\
         \x20     - name: r1\n\
         \x20       values:\n\
         \x20         image_endpoint_override: http://glance-r1.example/v2\n\
         \x20     - r2\n\
         \x20 fmt:\n\
         \x20   auth_type: none\n\
         \x20   image_endpoint_override: http://127.0.0.1:1/\n\
         \x20   image_format: vhd\n\
         \x20 bad:\n\
         \x20   auth_type: kerberos\n",
    );
    let cloud = clouds::load(&path, None, "regions", None).unwrap();
    assert_eq!(cloud.auth_type, AuthType::ApplicationCredential);
    assert_eq!(cloud.region_name.as_deref(), Some("r1"));
    assert_eq!(cloud.interface, "internal");
    assert_eq!(
        cloud.image_endpoint_override.as_deref(),
        Some("http://glance-r1.example/v2")
    );
    let cloud = clouds::load(&path, None, "regions", Some("r2")).unwrap();
    assert_eq!(cloud.image_endpoint_override, None);
    let err = clouds::load(&path, None, "bad", None).unwrap_err();
    assert!(err.message.contains("kerberos"), "{err}");

    // image_format: provider first, then the cloud's, then qcow2.
    let mut provider = openstack_provider("fmt", "fmt", 1.0);
    assert_eq!(
        for_provider(&provider, Some(&path)).unwrap().image_format(),
        "vhd"
    );
    provider.driver = Driver::OpenStack {
        cloud: "fmt".into(),
        region_name: None,
        image_format: Some("raw".into()),
    };
    assert_eq!(
        for_provider(&provider, Some(&path)).unwrap().image_format(),
        "raw"
    );
    let driver = for_provider(&openstack_provider("r", "regions", 1.0), Some(&path)).unwrap();
    assert_eq!(driver.image_format(), "qcow2");
    assert_eq!(driver.name(), "r");
    let err = for_provider(&openstack_provider("x", "missing", 1.0), Some(&path))
        .err()
        .unwrap();
    assert_eq!(err.kind, ErrorKind::Config);
    assert!(err.message.starts_with("provider x: "), "{err}");
}

// ---------------------------------------------------------------------------------------
// Keystone
// ---------------------------------------------------------------------------------------

/// `dir/clouds.yaml` with cloud `ks` authenticating at `keystone` with `auth` (YAML lines
/// indented for the `auth:` mapping) and `extra` top-level lines.
fn keystone_clouds(
    dir: &Path,
    keystone: &KeystoneServer,
    auth_type: &str,
    auth: &[(&str, &str)],
    extra: &str,
) -> PathBuf {
    let mut text = format!(
        "clouds:\n  ks:\n    auth_type: {auth_type}\n    auth:\n      auth_url: {}\n",
        keystone.auth_url()
    );
    for (key, value) in auth {
        text.push_str(&format!("      {key}: \"{value}\"\n"));
    }
    text.push_str(extra);
    let path = dir.join("clouds.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn password_auth<'a>(user: &'a str, password: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("username", user),
        ("password", password),
        ("project_name", KeystoneServer::NODEPOOL_PROJECT),
        ("user_domain_name", "Default"),
        ("project_domain_name", "Default"),
    ]
}

/// How many `POST /v3/auth/tokens` Keystone has served (from uWSGI's request log).
fn token_requests(keystone: &KeystoneServer) -> usize {
    let log = std::fs::read_to_string(keystone.dir().join("log/uwsgi.log")).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("POST /v3/auth/tokens"))
        .count()
}

#[test]
fn keystone_password_auth_and_catalog_endpoint() {
    let keystone = KeystoneServer::shared();
    let glance = GlanceServer::shared_with_keystone();
    let dir = test_dir("keystone-password");
    let provider = unique("ks-password");
    let clouds = keystone_clouds(
        dir.path(),
        keystone,
        "password",
        &password_auth(
            KeystoneServer::NODEPOOL_USER,
            KeystoneServer::NODEPOOL_PASSWORD,
        ),
        "    region_name: RegionOne\n",
    );
    let driver = for_provider(&openstack_provider(&provider, "ks", 0.0), Some(&clouds)).unwrap();
    let file = qemu_image(dir.path(), "image", "qcow2", 2 << 20);
    let uploaded = driver
        .upload(&request(&provider, &file, "qcow2"))
        .unwrap_or_else(|e| panic!("{e}"));
    let image = glance
        .get_image(&uploaded.external_id)
        .expect("uploaded through the catalog endpoint");
    assert_eq!(image["status"], "active");
    let project_id = keystone.create_project(KeystoneServer::NODEPOOL_PROJECT);
    assert_eq!(
        image["owner"],
        project_id.as_str(),
        "owned by the real project"
    );
    assert_eq!(driver.list_images().unwrap().len(), 1);
    driver.delete(&uploaded.external_id).unwrap();
    assert!(glance.get_image(&uploaded.external_id).is_none());

    // A region without an image endpoint is a configuration error.
    let provider = unique("ks-region");
    let mut config = openstack_provider(&provider, "ks", 0.0);
    config.driver = Driver::OpenStack {
        cloud: "ks".into(),
        region_name: Some("Nowhere".into()),
        image_format: None,
    };
    let err = for_provider(&config, Some(&clouds))
        .unwrap()
        .list_images()
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Config, "{err}");
    assert!(err.message.contains("Nowhere"), "{err}");
}

#[test]
fn keystone_revoked_token_is_replaced_transparently() {
    let keystone = KeystoneServer::shared();
    let glance = GlanceServer::shared_with_keystone();
    let dir = test_dir("keystone-revoked");
    let user = unique("revoked");
    let user_id = keystone.create_user(
        &user,
        "revokedpw",
        KeystoneServer::NODEPOOL_PROJECT,
        "member",
    );
    let provider = unique("ks-revoked");
    let clouds = keystone_clouds(
        dir.path(),
        keystone,
        "password",
        &password_auth(&user, "revokedpw"),
        "",
    );
    let driver = for_provider(&openstack_provider(&provider, "ks", 0.0), Some(&clouds)).unwrap();
    driver.list_images().unwrap();
    // A token issued at the same time as the driver's, to show that the revocation works.
    let witness = keystone.token(&user, "revokedpw", KeystoneServer::NODEPOOL_PROJECT);
    let images_url = format!("{}/v2/images", glance.url());
    crate::util::glance::http_expect("GET", &images_url, Some(&witness), None, 200);
    // Disabling the user revokes its tokens; Keystone's revocations have one-second
    // granularity, so a token issued in the same second would count as revoked too.
    keystone.set_user_enabled(&user_id, false);
    keystone.set_user_enabled(&user_id, true);
    std::thread::sleep(Duration::from_millis(1500));
    crate::util::glance::http_expect("GET", &images_url, Some(&witness), None, 401);
    let file = qemu_image(dir.path(), "image", "qcow2", 1 << 20);
    let uploaded = driver
        .upload(&request(&provider, &file, "qcow2"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        glance.get_image(&uploaded.external_id).unwrap()["status"],
        "active"
    );
    driver.delete(&uploaded.external_id).unwrap();
}

#[test]
fn keystone_token_expiry_reauthenticates() {
    // Tokens of this Keystone live 4 s. Glance is the shared fixed-identity one, reached
    // through image_endpoint_override: a keystone-mode Glance would itself re-authenticate
    // its service user for every request with tokens this short (keystoneauth renews
    // tokens with less than two minutes left). The 401 path against keystonemiddleware is
    // the revoked-token test's.
    let keystone = KeystoneServer::start(KeystoneOptions {
        token_expiration: Duration::from_secs(4),
    });
    let glance = GlanceServer::shared();
    let dir = test_dir("keystone-expiry");
    let provider = unique("ks-expiry");
    let clouds = keystone_clouds(
        dir.path(),
        &keystone,
        "password",
        &password_auth(
            KeystoneServer::NODEPOOL_USER,
            KeystoneServer::NODEPOOL_PASSWORD,
        ),
        &format!("    image_endpoint_override: {}\n", glance.url()),
    );
    let driver = for_provider(&openstack_provider(&provider, "ks", 0.0), Some(&clouds)).unwrap();
    let file = qemu_image(dir.path(), "image", "qcow2", 1 << 20);
    let first = driver
        .upload(&request(&provider, &file, "qcow2"))
        .unwrap_or_else(|e| panic!("{e}"));
    let after_first = token_requests(&keystone);
    std::thread::sleep(Duration::from_secs(5));
    let second = driver
        .upload(&request(&provider, &file, "qcow2"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        token_requests(&keystone) > after_first,
        "no new token after the old one expired"
    );
    for id in [&first.external_id, &second.external_id] {
        assert_eq!(glance.get_image(id).unwrap()["status"], "active");
        driver.delete(id).unwrap();
    }
}

#[test]
fn keystone_application_credential() {
    let keystone = KeystoneServer::shared();
    let glance = GlanceServer::shared_with_keystone();
    let dir = test_dir("keystone-appcred");
    let (id, secret) = keystone.create_application_credential(
        KeystoneServer::NODEPOOL_USER,
        KeystoneServer::NODEPOOL_PASSWORD,
        KeystoneServer::NODEPOOL_PROJECT,
        &unique("nodepool-builder"),
    );
    let provider = unique("ks-appcred");
    let clouds = keystone_clouds(
        dir.path(),
        keystone,
        "v3applicationcredential",
        &[
            ("application_credential_id", &id),
            ("application_credential_secret", &secret),
        ],
        "",
    );
    let driver = for_provider(&openstack_provider(&provider, "ks", 0.0), Some(&clouds)).unwrap();
    let file = qemu_image(dir.path(), "image", "raw", 1 << 20);
    let uploaded = driver
        .upload(&request(&provider, &file, "raw"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        glance.get_image(&uploaded.external_id).unwrap()["status"],
        "active"
    );
    driver.delete(&uploaded.external_id).unwrap();

    let clouds = keystone_clouds(
        dir.path(),
        keystone,
        "v3applicationcredential",
        &[
            ("application_credential_id", &id),
            ("application_credential_secret", "Wrong-Secret-4711"),
        ],
        "",
    );
    let driver = for_provider(&openstack_provider(&provider, "ks", 0.0), Some(&clouds)).unwrap();
    let err = driver.list_images().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Auth, "{err}");
    assert!(!err.message.contains("Wrong-Secret-4711"), "{err}");
    assert!(!err.message.contains(&secret), "{err}");
}

#[test]
fn credentials_never_appear_in_error_messages() {
    let keystone = KeystoneServer::shared();
    GlanceServer::shared_with_keystone();
    let dir = test_dir("keystone-secrets");
    let password = "Sup3r-Secret-Password-0815";
    let provider = unique("ks-secret");
    let clouds = keystone_clouds(
        dir.path(),
        keystone,
        "password",
        &password_auth(KeystoneServer::NODEPOOL_USER, password),
        "",
    );
    let driver = for_provider(&openstack_provider(&provider, "ks", 0.0), Some(&clouds)).unwrap();
    let file = qemu_image(dir.path(), "image", "qcow2", 1 << 20);
    let err = driver
        .upload(&request(&provider, &file, "qcow2"))
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Auth, "{err}");
    assert!(err.message.contains(&provider), "{err}");
    assert!(err.message.contains("401"), "{err}");
    assert!(err.message.contains("user nodepool"), "{err}");
    for shown in [err.message.clone(), format!("{err:?}"), err.to_string()] {
        assert!(!shown.contains(password), "the password leaked: {shown}");
    }
    assert!(
        driver
            .delete("0b7bd1c3-1111-4c43-9b0e-000000000000")
            .unwrap_err()
            .kind
            == ErrorKind::Auth
    );
    assert!(
        GlanceServer::shared_with_keystone()
            .images_of(&provider)
            .is_empty()
    );
    // Nor does Debug of the loaded cloud show it.
    let os =
        OpenStackDriver::new(&openstack_provider(&provider, "ks", 0.0), Some(&clouds)).unwrap();
    assert!(!format!("{:?}", os.cloud()).contains(password));
}
