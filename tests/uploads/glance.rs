//! The upload pipeline end to end against a real Glance from PyPI: the daemon builds with the
//! test image builder and uploads through the OpenStack driver configured by clouds.yaml.
//! Upstream's upload tests (two providers with their formats), Glance dying mid-upload
//! (retried, exactly one ready upload, no stray image), two builders racing for one build, and
//! unreadable records keeping their images. Glance's faults one by one are in
//! [`super::glance_faults`], https in [`super::glance_tls`].

use std::time::Duration;

use nodepool_builder::model::{BuildState, UploadState};

use crate::util::glance::GlanceServer;
use crate::util::site::{TestSite, WAIT};
use crate::util::wait_until;

fn md5_of(path: &std::path::Path) -> String {
    let out = std::process::Command::new("md5sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn one_build_goes_to_two_glance_providers_in_their_formats() {
    let glance = GlanceServer::shared();
    let site = TestSite::new("glance_two");
    let clouds = site.glance_clouds(glance, &[("vhd-cloud", Some("vhd")), ("plain-cloud", None)]);
    let (pv, pq) = ("glance-two-vhd", "glance-two-qcow2");
    let body = format!(
        "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{{fake_dib}}\"\n[diskimages.metadata]\nowner = \"ci\"\n{}{}",
        TestSite::openstack_provider(pv, "vhd-cloud", &["fedora"], ""),
        TestSite::openstack_provider(pq, "plain-cloud", &["fedora"], ""),
    );
    site.config(0, "", &body);
    let _b = site.start_with_env(0, &[], &[("OS_CLIENT_CONFIG_FILE", &clouds)]);
    let build = site.wait_builds("fedora", BuildState::Ready, 1).remove(0);
    assert_eq!(
        build.build.formats,
        vec!["qcow2", "vhd"],
        "formats from clouds.yaml: vhd, and openstacksdk's default qcow2"
    );
    for (provider, format) in [(pv, "vhd"), (pq, "qcow2")] {
        let (_, up) = site
            .wait_uploads("fedora", provider, UploadState::Ready, 1)
            .remove(0);
        let id = up.upload.external_id.clone().unwrap();
        let img = glance.get_image(&id).expect("the image exists in Glance");
        assert_eq!(img["status"], "active");
        assert_eq!(img["disk_format"], format);
        assert_eq!(img["container_format"], "bare");
        assert_eq!(img["visibility"], "private");
        assert_eq!(img["name"].as_str(), up.upload.external_name.as_deref());
        assert_eq!(img["nodepool_build_id"], build.id.as_str());
        assert_eq!(img["nodepool_upload_id"], up.id.as_str());
        assert_eq!(img["nodepool_provider_name"], provider);
        assert_eq!(img["owner"], "ci", "diskimage metadata");
        assert_eq!(img["purpose"], "test", "provider meta");
        let file = site
            .images_dir(0)
            .join(format!("fedora-{}.{format}", build.id));
        assert_eq!(
            img["checksum"].as_str().unwrap(),
            md5_of(&file),
            "Glance got exactly the file"
        );
        assert_eq!(
            glance.images_of(provider).len(),
            1,
            "one image per provider"
        );
    }
}

#[test]
fn glance_killed_mid_upload_is_retried_and_leaves_no_stray_image() {
    let mut glance = GlanceServer::start();
    let site = TestSite::new("glance_killed");
    let clouds = site.glance_clouds(&glance, &[("cloud", None)]);
    let provider = "glance-killed";
    let body = format!(
        "\n[[diskimages]]\nname = \"big\"\ndib-cmd = \"{{fake_dib}}\"\n[diskimages.env-vars]\nFAKE_DIB_SIZE_MB = \"384\"\n{}",
        TestSite::openstack_provider(provider, "cloud", &["big"], "")
    );
    site.config(0, "", &body);
    let mut b = site.start_with_env(0, &[], &[("OS_CLIENT_CONFIG_FILE", &clouds)]);
    site.wait_uploads("big", provider, UploadState::Uploading, 1);
    // Kill Glance while the file streams, then bring it back.
    wait_until(WAIT, "the upload to reach Glance", || {
        glance.image_count() > 0
    });
    glance.kill();
    b.wait_for_log(WAIT, "Failed to upload build");
    glance.restart();
    let (_, up) = site
        .wait_uploads("big", provider, UploadState::Ready, 1)
        .remove(0);
    assert!(b.log().contains("retrying in"), "retried with back-off");
    let id = up.upload.external_id.unwrap();
    wait_until(
        Duration::from_secs(90),
        "the partial image of the killed attempt to be deleted",
        || {
            let ids: Vec<String> = glance
                .images_of(provider)
                .iter()
                .map(|i| i["id"].as_str().unwrap_or_default().to_string())
                .collect();
            ids == vec![id.clone()]
        },
    );
    assert_eq!(
        site.uploads_in("big", provider, UploadState::Ready).len(),
        1,
        "exactly one ready upload"
    );
    assert_eq!(glance.get_image(&id).unwrap()["status"], "active");
}

#[test]
fn two_builders_with_the_files_upload_once_per_provider() {
    let site = TestSite::new("two_uploaders");
    std::fs::create_dir_all(site.cloud_dir("cloud")).unwrap();
    std::fs::write(site.cloud_dir("cloud").join("slow-upload"), "1").unwrap();
    let body = format!(
        "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{{fake_dib}}\"\n{}",
        site.provider("cloud", "raw", &["fedora"], "")
    );
    site.config(0, "", &body);
    // Builder 1 shares builder 0's images directory, so both hold the build's files.
    let shared_dir = site.images_dir(0).display().to_string();
    let cfg1 = site.config(1, "", &body);
    let text = std::fs::read_to_string(&cfg1)
        .unwrap()
        .replace(&site.images_dir(1).display().to_string(), &shared_dir);
    std::fs::write(&cfg1, text).unwrap();
    let _b0 = site.start(0, &[]);
    let _b1 = site.start(1, &[]);
    let (build, _) = site
        .wait_uploads("fedora", "cloud", UploadState::Ready, 1)
        .remove(0);
    site.request_build("fedora");
    let mut known = vec![build];
    let second = site.wait_new_ready("fedora", &mut known);
    site.wait("the second build's upload", || {
        site.uploads_in("fedora", "cloud", UploadState::Ready)
            .iter()
            .any(|(b, _)| *b == second.id)
            .then_some(())
    });
    for b in site.builds("fedora") {
        let n = b.uploads_to("cloud").count();
        assert!(
            n <= 1,
            "one upload record per (build, provider), got {n} for {}",
            b.id
        );
    }
    assert!(
        site.uploads_in("fedora", "cloud", UploadState::Failed)
            .is_empty()
    );
    wait_until(WAIT, "two images in the cloud", || {
        site.cloud_images("cloud").len() == 2
    });
    site.assert_no_leaks(&["cloud"], &[0]);
}

/// The existence-keyed leak detection of `cleanup::unreadable_records_keep_their_cloud_images`
/// on a real Glance through the OpenStack driver: images Glance holds for records we cannot
/// read survive five janitor passes.
#[test]
fn unreadable_records_keep_their_images_in_glance() {
    let glance = GlanceServer::shared();
    let site = TestSite::new("unreadable_records_glance");
    let clouds = site.glance_clouds(glance, &[("unreadable-cloud", Some("raw"))]);
    let provider = "glance-unreadable";
    let body = format!(
        "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{{fake_dib}}\"\n{}",
        TestSite::openstack_provider(provider, "unreadable-cloud", &["fedora"], ""),
    );
    site.config(0, "cleanup-interval = 1.0", &body);
    let mut b = site.start_with_env(0, &[], &[("OS_CLIENT_CONFIG_FILE", &clouds)]);
    let url = glance.url();
    crate::cleanup::unreadable_records_keep_their_cloud_images(
        &site,
        &mut b,
        provider,
        |build, upload| {
            // What a builder leaves when it dies right after Glance created the image.
            let image = serde_json::json!({
                "name": format!("fedora-planted-{upload}"),
                "disk_format": "raw",
                "container_format": "bare",
                "nodepool_build_id": build,
                "nodepool_upload_id": upload,
                "nodepool_provider_name": provider,
            });
            let reply = crate::util::glance::http_expect(
                "POST",
                &format!("{url}/v2/images"),
                None,
                Some(&image),
                201,
            );
            reply.json()["id"].as_str().unwrap().to_string()
        },
        || {
            glance
                .images_of(provider)
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_string())
                .collect()
        },
    );
    assert_eq!(glance.images_of(provider).len(), 1, "only the real upload");
}
