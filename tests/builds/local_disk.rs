//! What a build needs and leaves on the local disk, through the real binary: the
//! `images-dir-required-free` guard (building waits for space and records no failure), a full
//! file system during a build (issue "Faults", scenario 7), and build-log retention.
//!
//! A full file system: images-dir is a small tmpfs the test mounts and fills. DIB runs out
//! of space while writing an image: the build is `failed`, the daemon log says it ran out of
//! disk space, the half-written file goes with the failed build, and once space returns (a
//! filler file removed) the next build is ready.
//!
//! Removing old builds' files is the janitor's, in `cleanup`.

use nix::sys::signal::Signal;
use nodepool_builder::model::BuildState;

use crate::util::site::{TestSite, WAIT};
use crate::util::tmpfs::Tmpfs;
use crate::util::wait_until;

use super::ONE_IMAGE;

const MIB: u64 = 1024 * 1024;

#[test]
fn full_images_dir_fails_the_build_cleanly_and_building_resumes_with_space() {
    let site = TestSite::new("disk_full");
    let tmpfs = Tmpfs::mount(&site.images_dir(0), 8);
    // fake-dib makes a 2 MiB raw disk in a work directory, then copies it to the image
    // file: with 5 MiB taken, the work file fits and the copy does not.
    let filler = tmpfs.fill("filler", 5 * MIB);
    let body = "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{fake_dib}\"\nformats = [\"raw\"]\n\
                images-dir-required-free = 0\n[diskimages.env-vars]\nFAKE_DIB_SIZE_MB = \"2\"\n";
    // A short janitor interval: failed builds and their files are removed quickly.
    site.config(0, "cleanup-interval = 1.0", body);
    let mut b = site.start(0, &[]);
    let failed = site.wait_builds("fedora", BuildState::Failed, 1).remove(0);
    b.wait_for_log(crate::util::site::WAIT, "out of disk space");
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("build={}: DIB failed creating fedora", failed.id)))
        .unwrap_or_else(|| panic!("the failure is logged\n{}", site.dump()));
    assert!(
        line.contains("out of disk space: the build log says \"No space left on device\"")
            && line.contains(&format!("images-dir {}", tmpfs.path().display())),
        "the daemon log says why: {line}"
    );
    let build_log = site.build_log(0, "fedora", &failed.id);
    assert!(
        build_log.contains("No space left on device"),
        "the build log has the tool's error: {build_log}"
    );
    // The half-written image file leaves with the failed build (the janitor), and DIB's
    // work directory is gone too.
    site.wait("the failed build's files to be removed", || {
        site.local_files(0, "fedora", &failed.id)
            .is_empty()
            .then_some(())
    });
    b.wait_for_log(crate::util::site::WAIT, "(failure 2)");
    assert!(
        site.builds_in("fedora", BuildState::Ready).is_empty(),
        "no build is ready without space\n{}",
        site.dump()
    );
    // Space returns: the next attempt builds the image.
    std::fs::remove_file(&filler).unwrap();
    let ready = site.wait_builds("fedora", BuildState::Ready, 1).remove(0);
    let file = tmpfs.path().join(format!("fedora-{}.raw", ready.id));
    assert_eq!(
        std::fs::metadata(&file).map(|m| m.len()).ok(),
        Some(2 * MIB),
        "the ready build's image is complete\n{}",
        site.dump()
    );
    site.wait("failed builds to be cleaned up", || {
        site.builds_in("fedora", BuildState::Failed)
            .is_empty()
            .then_some(())
    });
    let leftovers: Vec<String> = std::fs::read_dir(tmpfs.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.starts_with(".fake-dib-work") || (n.starts_with("fedora-") && !n.contains(&ready.id))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "half-written files left: {leftovers:?}"
    );
    site.assert_no_leaks(&[], &[0]);
    drop(b);
}

#[test]
fn build_log_retention_keeps_exact_image_logs_only() {
    let site = TestSite::new("log_retention");
    site.config(
        0,
        "build-log-retention = 1",
        &format!("{ONE_IMAGE}\n[[diskimages]]\nname = \"fedora-extra\"\ndib-cmd = \"{{fake_dib}}\"\nformats = [\"raw\"]\n"),
    );
    let _b = site.start(0, &[]);
    site.wait_builds("fedora-extra", BuildState::Ready, 1);
    let mut known = vec![
        site.wait_builds("fedora", BuildState::Ready, 1)[0]
            .id
            .clone(),
    ];
    for _ in 2..=3 {
        site.request_build("fedora");
        site.wait_new_ready("fedora", &mut known);
        // The worker deletes the request after recording `ready`: a request made before
        // that would be the same znode, served by the build that just finished.
        wait_until(WAIT, "the served request-build znode to be deleted", || {
            !site.request_pending("fedora")
        });
    }
    let logs: Vec<String> = std::fs::read_dir(site.log_dir(0))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let fedora = logs
        .iter()
        .filter(|l| l.starts_with("fedora-") && !l.starts_with("fedora-extra-"))
        .count();
    // Pruning runs before each build and keeps max(retention, 1): 1 + the new one.
    assert_eq!(fedora, 2, "{logs:?}");
    assert_eq!(
        logs.iter()
            .filter(|l| l.starts_with("fedora-extra-"))
            .count(),
        1,
        "another image's logs are not pruned: {logs:?}"
    );
}

#[test]
fn free_space_guard_waits_for_space_without_recording_failures() {
    let site = TestSite::new("free_space");
    let small = "\n[[diskimages]]\nname = \"small\"\ndib-cmd = \"{fake_dib}\"\nformats = [\"raw\"]\nimages-dir-required-free = 0\n";
    site.config(
        0,
        "images-dir-required-free = 1000000",
        &format!("{ONE_IMAGE}{small}"),
    );
    let mut b = site.start(0, &[]);
    b.wait_for_log(WAIT, "not building: images-dir has");
    // The per-image override lets another image build meanwhile, again and again.
    for n in 1..=3 {
        if n > 1 {
            site.request_build("small");
        }
        site.wait_builds("small", BuildState::Ready, n);
    }
    assert!(
        site.builds("fedora").is_empty(),
        "no failed records pile up"
    );
    assert_eq!(
        b.log().matches("not building: images-dir has").count(),
        1,
        "the reason is logged once"
    );
    assert!(!std::fs::read_dir(site.log_dir(0)).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("fedora-")
    }));
    site.config(
        0,
        "images-dir-required-free = 0",
        &format!("{ONE_IMAGE}{small}"),
    );
    b.signal(Signal::SIGHUP);
    site.wait_builds("fedora", BuildState::Ready, 1);
}
