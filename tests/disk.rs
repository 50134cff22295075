//! A full file system during a build (issue "Faults", scenario 7): images-dir is a small
//! tmpfs the test mounts and fills. DIB runs out of space while writing an image: the build
//! is `failed`, the daemon log says it ran out of disk space, the half-written file goes with
//! the failed build, and once space returns (a filler file removed) the next build is ready.
//! The other half of the scenario, images-dir below `images-dir-required-free`, is
//! `builds::free_space_guard_waits_for_space_without_recording_failures`.

use nodepool_builder::model::BuildState;

use crate::util::site::TestSite;
use crate::util::tmpfs::Tmpfs;

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
