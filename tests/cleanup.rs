//! The janitor through the real binary: the cleanup-side upstream tests of the wire spec §7
//! and the fixed quirks, with a directory cloud so leaked cloud images are visible. Every test
//! ends with a leak check.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use nix::sys::signal::Signal;
use nodepool_builder::cleanup::{self, CleanupRequest, ImageSnapshot, JanitorState};
use nodepool_builder::config;
use nodepool_builder::model::{BuildState, UploadState};
use nodepool_builder::provider::{ProviderDriver, for_provider};
use nodepool_builder::zk::{Mode, paths};

use crate::util::builder::BuilderProcess;
use crate::util::site::{TestSite, WAIT};
use crate::util::wait_until;

fn image(name: &str, extra: &str) -> String {
    format!("\n[[diskimages]]\nname = \"{name}\"\ndib-cmd = \"{{fake_dib}}\"\n{extra}\n")
}

#[test]
fn removing_an_image_from_config_deletes_uploads_builds_and_files() {
    let site = TestSite::new("image_removal");
    let keep = image("keep", "");
    let gone = image("gone", "");
    site.config(
        0,
        "cleanup-interval = 2.0",
        &format!(
            "{keep}{gone}{}",
            site.provider("cloud", "raw", &["keep", "gone"], "")
        ),
    );
    let b = site.start(0, &[]);
    let (gone_build, _) = site
        .wait_uploads("gone", "cloud", UploadState::Ready, 1)
        .remove(0);
    site.wait_uploads("keep", "cloud", UploadState::Ready, 1);
    assert_eq!(site.cloud_images("cloud").len(), 2);

    site.config(
        0,
        "cleanup-interval = 2.0",
        &format!("{keep}{}", site.provider("cloud", "raw", &["keep"], "")),
    );
    b.signal(Signal::SIGHUP);
    site.wait("the removed image's builds to go", || {
        site.builds("gone").is_empty().then_some(())
    });
    wait_until(WAIT, "its cloud image to go", || {
        site.cloud_images("cloud").len() == 1
    });
    wait_until(WAIT, "its local files to go", || {
        site.local_files(0, "gone", &gone_build).is_empty()
    });
    assert_eq!(
        site.uploads_in("keep", "cloud", UploadState::Ready).len(),
        1,
        "the other image is untouched"
    );
    site.assert_no_leaks(&["cloud"], &[0]);
}

#[test]
fn removing_an_image_from_one_provider_deletes_only_that_upload() {
    let site = TestSite::new("provider_removal");
    let img = image("fedora", "");
    site.config(
        0,
        "",
        &format!(
            "{img}{}{}",
            site.provider("p1", "raw", &["fedora"], ""),
            site.provider("p2", "raw", &["fedora"], "")
        ),
    );
    let b = site.start(0, &[]);
    site.wait_uploads("fedora", "p1", UploadState::Ready, 1);
    let p2 = site
        .wait_uploads("fedora", "p2", UploadState::Ready, 1)
        .remove(0);
    site.config(
        0,
        "",
        &format!(
            "{img}{}{}",
            site.provider("p1", "raw", &[], ""),
            site.provider("p2", "raw", &["fedora"], "")
        ),
    );
    b.signal(Signal::SIGHUP);
    site.wait("p1's upload to be deleted", || {
        site.uploads("fedora")
            .iter()
            .all(|(_, u)| u.provider != "p1")
            .then_some(())
    });
    wait_until(WAIT, "p1's cloud image to go", || {
        site.cloud_images("p1").is_empty()
    });
    assert_eq!(
        site.uploads_in("fedora", "p2", UploadState::Ready),
        vec![p2],
        "p2 unchanged"
    );
    site.assert_no_leaks(&["p1", "p2"], &[0]);
}

#[test]
fn a_third_build_rotates_out_the_oldest_keeping_two() {
    let site = TestSite::new("rotation");
    site.fedora_on_cloud(0, "build-log-retention = 1");
    let _b = site.start(0, &[]);
    let (first, _) = site
        .wait_uploads("fedora", "cloud", UploadState::Ready, 1)
        .remove(0);
    let mut known = vec![first.clone()];
    for _ in 0..2 {
        site.request_build("fedora");
        let b = site.wait_new_ready("fedora", &mut known);
        site.wait("its upload", || {
            site.uploads_in("fedora", "cloud", UploadState::Ready)
                .iter()
                .any(|(bid, _)| *bid == b.id)
                .then_some(())
        });
    }
    site.wait("the oldest build to be deleted", || {
        site.builds("fedora")
            .iter()
            .all(|b| b.id != first)
            .then_some(())
    });
    let ready = site.builds_in("fedora", BuildState::Ready);
    assert_eq!(ready.len(), 2, "{ready:?}");
    wait_until(
        WAIT,
        "the oldest build's cloud image and files to go",
        || {
            site.cloud_images("cloud").len() == 2
                && site.local_files(0, "fedora", &first).is_empty()
        },
    );
    site.assert_no_leaks(&["cloud"], &[0]);
}

#[test]
fn failing_cloud_deletes_are_retried_until_they_succeed_and_files_go_first() {
    let site = TestSite::new("delete_retries");
    site.fedora_on_cloud(0, "cleanup-interval = 1.0");
    let mut b = site.start(0, &[]);
    let (build, up) = site
        .wait_uploads("fedora", "cloud", UploadState::Ready, 1)
        .remove(0);
    std::fs::write(site.cloud_dir("cloud").join("fail-delete"), "").unwrap();
    // What `nodepool dib-image-delete` does: the build goes to deleting, no lock.
    let path = paths::image_build_path("fedora", &build);
    let mut rec = site.builds("fedora")[0].build.clone();
    rec.state = BuildState::Deleting;
    site.zk.set_data(&path, &rec.to_json(), None).unwrap();
    b.wait_for_log(WAIT, "(failure 3)");
    assert!(
        b.log().contains("delete refused (fail-delete present)"),
        "the reason is logged"
    );
    // The local files went early (the build is deleting) although the cloud delete fails.
    wait_until(WAIT, "the local files to go first", || {
        site.local_files(0, "fedora", &build).is_empty()
    });
    assert_eq!(
        site.uploads_in("fedora", "cloud", UploadState::Deleting)
            .len(),
        1,
        "the upload stays deleting, keeping its external id"
    );
    let old = up.upload.external_id.clone().unwrap();
    assert!(site.cloud_images("cloud").contains(&old));
    std::fs::remove_file(site.cloud_dir("cloud").join("fail-delete")).unwrap();
    site.wait("the build record to go once the cloud delete works", || {
        site.zk.exists(&path).unwrap().is_none().then_some(())
    });
    wait_until(WAIT, "the old cloud image to go", || {
        !site.cloud_images("cloud").contains(&old)
    });
    // Meanwhile the image was rebuilt (its only ready build was deleted) and uploaded.
    site.wait("the image to be rebuilt and uploaded", || {
        (!site
            .uploads_in("fedora", "cloud", UploadState::Ready)
            .is_empty())
        .then_some(())
    });
    site.assert_no_leaks(&["cloud"], &[0]);
}

#[test]
fn delete_after_upload_prunes_uploaded_formats_but_keeps_keep_formats() {
    let site = TestSite::new("delete_after_upload");
    std::fs::create_dir_all(site.cloud_dir("vhd")).unwrap();
    std::fs::write(site.cloud_dir("vhd").join("fail-upload"), "").unwrap();
    let body = format!(
        "{}{}{}{}",
        image(
            "fedora",
            "delete-after-upload = true\nkeep-formats = [\"qcow2\"]"
        ),
        site.provider("qcow", "qcow2", &["fedora"], ""),
        site.provider("raw", "raw", &["fedora"], ""),
        site.provider("vhd", "vhd", &["fedora"], ""),
    );
    site.config(0, "cleanup-interval = 1.0", &body);
    let _b = site.start(0, &[]);
    let (build, _) = site
        .wait_uploads("fedora", "raw", UploadState::Ready, 1)
        .remove(0);
    site.wait_uploads("fedora", "qcow", UploadState::Ready, 1);
    let dir = site.images_dir(0);
    wait_until(WAIT, "the uploaded raw file to be pruned", || {
        !dir.join(format!("fedora-{build}.raw")).exists()
    });
    assert!(
        !dir.join(format!("fedora-{build}.raw.md5")).exists(),
        "checksums go with it"
    );
    assert!(
        dir.join(format!("fedora-{build}.qcow2")).exists(),
        "kept by keep-formats although uploaded"
    );
    assert!(
        dir.join(format!("fedora-{build}.vhd")).exists(),
        "not uploaded yet (its provider fails): kept"
    );
    assert!(
        dir.join(format!("fedora-{build}.d")).is_dir(),
        "the manifest stays"
    );
    site.assert_no_leaks(&["qcow", "raw", "vhd"], &[0]);
}

#[test]
fn dib_image_delete_with_two_builders_one_offline() {
    let site = TestSite::new("two_builders_delete");
    let img = image("fedora", "formats = [\"raw\"]");
    site.config(0, "", &img);
    site.config(1, "", &img);
    let mut b0 = site.start(0, &[]);
    let build = site
        .wait_builds("fedora", BuildState::Ready, 1)
        .remove(0)
        .id;
    b0.signal(Signal::SIGTERM);
    assert!(b0.wait_exit(WAIT).success());
    assert!(!site.local_files(0, "fedora", &build).is_empty());
    // The builder that made it is offline; another builder carries out the delete.
    let path = paths::image_build_path("fedora", &build);
    let mut rec = site.builds("fedora")[0].build.clone();
    rec.state = BuildState::Deleting;
    site.zk.set_data(&path, &rec.to_json(), None).unwrap();
    let _b1 = site.start(1, &[]);
    site.wait("the other builder to delete the build record", || {
        site.zk.exists(&path).unwrap().is_none().then_some(())
    });
    assert!(
        !site.local_files(0, "fedora", &build).is_empty(),
        "builder 1 never touches builder 0's files"
    );
    // Back online, the first builder removes its own files of the deleted build.
    let _b0 = site.start(0, &[]);
    wait_until(WAIT, "builder 0 to remove its files", || {
        site.local_files(0, "fedora", &build).is_empty()
    });
    site.assert_no_leaks(&[], &[0, 1]);
}

#[test]
fn orphans_of_a_killed_builder_are_cleaned_and_the_work_redone() {
    let site = TestSite::new("orphans");
    site.fedora_on_cloud(0, "cleanup-interval = 1.0");
    let hang = site.control(0, "fake-dib.hang", "");
    let mut b = site.start(0, &[]);
    let building = site
        .wait_builds("fedora", BuildState::Building, 1)
        .remove(0)
        .id;
    let pid_file = site.images_dir(0).join("fake-dib.fedora.hang-pids");
    wait_until(WAIT, "the hung DIB to write its pids", || pid_file.exists());
    b.signal(Signal::SIGKILL);
    b.wait_exit(WAIT);
    let pids =
        std::fs::read_to_string(site.images_dir(0).join("fake-dib.fedora.hang-pids")).unwrap();
    for pid in pids.split_whitespace() {
        // A killed builder cannot stop its DIB; an operator (or the OS) would.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid.parse().unwrap()),
            Signal::SIGKILL,
        );
    }
    // An orphaned uploading record, as a builder killed mid-upload leaves it.
    std::fs::remove_file(hang).unwrap();
    let _b = site.start(0, &[]);
    site.wait(
        "the orphaned building record to go (after the dead session expires)",
        || {
            site.builds("fedora")
                .iter()
                .all(|b| b.id != building)
                .then_some(())
        },
    );
    let (ready, _) = site
        .wait_uploads("fedora", "cloud", UploadState::Ready, 1)
        .remove(0);
    let orphan = site
        .zk
        .create(&format!("{}/", paths::image_uploads_path("fedora", &ready, "cloud")), br#"{"state": "uploading", "state_time": 1.0, "external_id": null, "external_name": null, "format": null, "username": "zuul", "python_path": "auto", "shell_type": null}"#, Mode::PersistentSequential)
        .unwrap();
    site.wait("the orphaned uploading record to go", || {
        site.zk.exists(&orphan).unwrap().is_none().then_some(())
    });
    wait_until(WAIT, "the partial files of the killed build to go", || {
        site.local_files(0, "fedora", &building).is_empty()
    });
    site.assert_no_leaks(&["cloud"], &[0]);
}

#[test]
fn a_cloud_image_without_a_record_is_found_by_the_list_command_and_deleted() {
    let site = TestSite::new("listed_leak");
    site.config(
        0,
        "cleanup-interval = 1.0",
        &format!(
            "{}{}",
            image("fedora", ""),
            site.provider("cloud", "raw", &["fedora"], &site.list_command("cloud"))
        ),
    );
    let mut b = site.start(0, &[]);
    let (build, up) = site
        .wait_uploads("fedora", "cloud", UploadState::Ready, 1)
        .remove(0);
    let kept = up.upload.external_id.clone().unwrap();
    // What a builder killed right after the cloud accepted an image leaves: an image whose
    // upload has no record. And an image the builder did not upload at all.
    let leaked = site.tagged_cloud_upload("cloud", &build, "0000000099");
    let foreign = site.cloud_upload("cloud", &[]);
    b.wait_for_log(WAIT, &format!("Deleting leaked image {leaked}"));
    wait_until(WAIT, "the leaked image to go", || {
        !site.cloud_images("cloud").contains(&leaked)
    });
    let mut left = site.cloud_images("cloud");
    left.sort();
    let mut want = vec![kept, foreign];
    want.sort();
    assert_eq!(left, want, "the recorded and the foreign image stay");

    // A listing that fails is reported and deletes nothing.
    std::fs::write(site.cloud_dir("cloud").join("fail-list"), "").unwrap();
    let again = site.tagged_cloud_upload("cloud", &build, "0000000098");
    b.wait_for_log(WAIT, "cannot list cloud images for leak detection");
    assert!(
        b.log().contains("list refused (fail-list present)"),
        "the reason is logged"
    );
    assert!(site.cloud_images("cloud").contains(&again));
    std::fs::remove_file(site.cloud_dir("cloud").join("fail-list")).unwrap();
    wait_until(WAIT, "the second leak to go once listing works", || {
        !site.cloud_images("cloud").contains(&again)
    });
}

#[test]
fn empty_znodes_left_by_lock_races_are_removed() {
    let site = TestSite::new("empty_znodes");
    site.config(
        0,
        "cleanup-interval = 1.0",
        &image("fedora", "formats = [\"raw\"]"),
    );
    let _b = site.start(0, &[]);
    site.wait_builds("fedora", BuildState::Ready, 1);
    // What a lock acquisition on a just-deleted build leaves behind (upstream Q6).
    let empty = paths::image_build_path("fedora", "00000000000000000000000000000bad");
    site.zk
        .create_with_parents(&format!("{empty}/lock"), b"", Mode::Persistent)
        .unwrap();
    site.wait("the empty build znode to be removed", || {
        site.zk.exists(&empty).unwrap().is_none().then_some(())
    });
    assert_eq!(
        site.builds_in("fedora", BuildState::Ready).len(),
        1,
        "the real build is untouched"
    );
    site.assert_no_leaks(&[], &[0]);
}

/// Records our parser rejects, planted beside a real build: a build in a state nodepool 11
/// does not know (from a newer nodepool, say) with a valid upload, an empty build znode with
/// a valid upload, and an upload record with a wrong type on the real build. Each points at
/// a cloud image that `put` creates with the ids the builder would tag it with; `listed`
/// lists the cloud's images. None of them may go in five janitor passes; once the records
/// are removed, leak detection deletes them.
pub(crate) fn unreadable_records_keep_their_cloud_images(
    site: &TestSite,
    builder: &mut BuilderProcess,
    provider: &str,
    put: impl Fn(&str, &str) -> String,
    listed: impl Fn() -> Vec<String>,
) {
    let (build, _) = site
        .wait_uploads("fedora", provider, UploadState::Ready, 1)
        .remove(0);
    let upload_json = |external_id: &str| {
        format!(
            r#"{{"state": "ready", "state_time": 1.0, "external_id": "{external_id}", "external_name": "planted", "format": "raw"}}"#
        )
    };
    let mut planted = Vec::new();
    for (build_id, build_data) in [
        (
            "000000000000000000000000000000b2",
            &br#"{"state": "archived", "state_time": 1.0, "formats": "raw"}"#[..],
        ),
        ("000000000000000000000000000000b3", &b""[..]),
    ] {
        let cloud_id = put(build_id, "0000000001");
        site.zk
            .create_with_parents(
                &paths::image_build_path("fedora", build_id),
                build_data,
                Mode::Persistent,
            )
            .unwrap();
        site.zk
            .create_with_parents(
                &paths::image_upload_path("fedora", build_id, provider, "0000000001"),
                upload_json(&cloud_id).as_bytes(),
                Mode::Persistent,
            )
            .unwrap();
        planted.push((paths::image_build_path("fedora", build_id), cloud_id));
    }
    let cloud_id = put(&build, "0000000077");
    let bad_upload = paths::image_upload_path("fedora", &build, provider, "0000000077");
    site.zk
        .create_with_parents(
            &bad_upload,
            format!(
                r#"{{"state": "ready", "state_time": 1.0, "external_id": 5, "note": "{cloud_id}"}}"#
            )
            .as_bytes(),
            Mode::Persistent,
        )
        .unwrap();
    planted.push((bad_upload, cloud_id));

    let passes = |b: &BuilderProcess| b.log().matches("cleanup pass:").count();
    let before = passes(builder);
    site.wait("five janitor passes over the planted records", || {
        (passes(builder) >= before + 5).then_some(())
    });
    let images = listed();
    for (record, cloud_id) in &planted {
        assert!(
            images.contains(cloud_id),
            "cloud image {cloud_id} of {record} was deleted\n{}",
            site.dump()
        );
        assert!(
            site.zk.exists(record).unwrap().is_some(),
            "{record} is kept"
        );
    }
    let log = builder.log();
    let (_, unreadable_upload_image) = planted.last().unwrap();
    assert_eq!(
        log.matches(&format!("keeping cloud image {unreadable_upload_image}"))
            .count(),
        1,
        "one warning for the image kept by an unreadable upload record"
    );
    assert!(!log.contains("Deleting leaked image"), "nothing deleted");

    // The records gone, the images are leaks like any other.
    for (record, _) in &planted {
        site.zk.delete_recursive(record).unwrap();
    }
    site.wait("the cloud images of the removed records to go", || {
        let images = listed();
        planted
            .iter()
            .all(|(_, id)| !images.contains(id))
            .then_some(())
    });
}

#[test]
fn unreadable_records_keep_their_images_in_a_directory_cloud() {
    let site = TestSite::new("unreadable_records_dir");
    site.config(
        0,
        "cleanup-interval = 1.0",
        &format!(
            "{}{}",
            image("fedora", ""),
            site.provider("cloud", "raw", &["fedora"], &site.list_command("cloud"))
        ),
    );
    let mut b = site.start(0, &[]);
    unreadable_records_keep_their_cloud_images(
        &site,
        &mut b,
        "cloud",
        |build, upload| site.tagged_cloud_upload("cloud", build, upload),
        || site.cloud_images("cloud"),
    );
    site.assert_no_leaks(&["cloud"], &[0]);
}

/// The janitor decides from a snapshot of the tree, and an upload may finish between that
/// snapshot and the janitor's write. Here the snapshot still says `uploading` (as the watcher
/// saw it before the upload finished) when the record already says `ready` with its cloud
/// image, and the provider no longer lists the image (as after a SIGHUP mid-upload). The pass
/// must not write its stale `deleting` (without `external_id`) over the `ready` record, which
/// would leave the cloud image without a record; the next pass deletes both.
#[test]
fn an_upload_that_became_ready_after_the_janitor_read_it_is_not_clobbered() {
    let site = TestSite::new("stale_snapshot");
    let cfg_path = site.config(
        0,
        "",
        &format!(
            "{}{}{}",
            image("fedora", ""),
            image("other", ""),
            site.provider("cloud", "raw", &["other"], "")
        ),
    );
    let cfg = Arc::new(config::load(&cfg_path, None).expect("the test config loads"));
    let driver: Arc<dyn ProviderDriver> = Arc::from(for_provider(&cfg.providers[0], None).unwrap());

    let build = "00000000000000000000000000000c0d";
    let cloud_id = site.tagged_cloud_upload("cloud", build, "0000000001");
    site.zk
        .create_with_parents(
            &paths::image_build_path("fedora", build),
            br#"{"state": "ready", "state_time": 1.0, "formats": "raw"}"#,
            Mode::Persistent,
        )
        .unwrap();
    let upload = paths::image_upload_path("fedora", build, "cloud", "0000000001");
    let ready = format!(
        r#"{{"state": "ready", "state_time": 2.0, "external_id": "{cloud_id}", "external_name": "fedora-1", "format": "raw"}}"#
    );
    site.zk
        .create_with_parents(&upload, ready.as_bytes(), Mode::Persistent)
        .unwrap();

    let mut stale = site.builds("fedora");
    stale[0].uploads[0].upload.state = UploadState::Uploading;
    stale[0].uploads[0].upload.external_id = None;
    let stale_pass = CleanupRequest {
        cfg,
        drivers: BTreeMap::from([("cloud".to_string(), driver)]),
        provider_formats: BTreeMap::from([("cloud".to_string(), "raw".to_string())]),
        snapshot: Some(BTreeMap::from([(
            "fedora".to_string(),
            ImageSnapshot {
                builds: stale,
                unreadable: Vec::new(),
            },
        )])),
        abandoned: BTreeSet::new(),
    };
    let mut janitor = JanitorState::default();
    cleanup::pass(&site.zk, &stale_pass, &mut janitor);
    let (data, _) = site
        .zk
        .get_data(&upload)
        .unwrap()
        .expect("the record stays");
    assert_eq!(
        String::from_utf8(data).unwrap(),
        ready,
        "the ready record is untouched by a pass that read it as uploading"
    );
    assert!(site.cloud_images("cloud").contains(&cloud_id));

    let fresh_pass = CleanupRequest {
        snapshot: None,
        ..stale_pass
    };
    cleanup::pass(&site.zk, &fresh_pass, &mut janitor);
    assert!(
        site.zk.exists(&upload).unwrap().is_none(),
        "the obsolete upload's record goes\n{}",
        site.dump()
    );
    assert!(
        !site.cloud_images("cloud").contains(&cloud_id),
        "with its cloud image"
    );
    site.assert_no_leaks(&["cloud"], &[0]);
}

/// The same race through the real daemon: an upload held in the cloud while a SIGHUP takes
/// the image off its provider. Whatever the janitor's passes saw meanwhile, the upload ends
/// `ready` and is then deleted through its record, cloud image included: nothing leaks (the
/// provider has no `list-command`, so no leak detection could mend a lost record).
#[test]
fn an_image_taken_off_its_provider_mid_upload_is_deleted_with_its_cloud_image() {
    let site = TestSite::new("removed_mid_upload");
    let with = |images: &[&str]| {
        site.config(
            0,
            "cleanup-interval = 1.0",
            &format!(
                "{}{}{}",
                image("fedora", ""),
                image("other", ""),
                site.provider("cloud", "raw", images, "")
            ),
        )
    };
    with(&["fedora"]);
    std::fs::create_dir_all(site.cloud_dir("cloud")).unwrap();
    let hold = site.cloud_dir("cloud").join("hold-upload");
    std::fs::write(&hold, "").unwrap();
    let mut b = site.start(0, &[]);
    let held = site.cloud_dir("cloud").join("upload-held");
    wait_until(WAIT, "the upload to be held in the cloud", || held.exists());

    with(&["other"]);
    b.signal(Signal::SIGHUP);
    b.wait_for_log(WAIT, "Configuration reloaded from");
    let passes = |b: &BuilderProcess| b.log().matches("cleanup pass:").count();
    let before = passes(&b);
    site.wait("two janitor passes while the upload is held", || {
        (passes(&b) >= before + 2).then_some(())
    });
    std::fs::remove_file(&hold).unwrap();

    b.wait_for_log(WAIT, "Deleting image build fedora-");
    site.wait("fedora's upload record and its cloud image to go", || {
        let others: Vec<String> = site
            .uploads("other")
            .into_iter()
            .filter_map(|(_, u)| u.upload.external_id)
            .collect();
        (site.uploads("fedora").is_empty() && site.cloud_images("cloud") == others).then_some(())
    });
    let log = b.log();
    let deleting = log
        .lines()
        .find(|l| l.contains("Deleting image build fedora-"))
        .unwrap();
    assert!(
        deleting.contains("from cloud (external_id "),
        "deleted through the record's external_id: {deleting}"
    );
    site.assert_no_leaks(&["cloud"], &[0]);
}
