//! Builds that go wrong, through the real binary, a real ZooKeeper and the test image builder
//! (issue "Faults", the DIB side of scenario 5): DIB failing (retried with back-off), timing
//! out (its whole process group killed), exiting 0 without every format or without any
//! file; a SIGTERM to the builder and a lost ZooKeeper session mid-build. Each ends in a
//! `failed` build record.
//!
//! A full file system during a build is in [`super::local_disk`]; failed uploads are in
//! `uploads`.

use std::time::Duration;

use nix::sys::signal::Signal;
use nodepool_builder::model::BuildState;
use nodepool_builder::zk::paths;

use crate::util::site::{TestSite, WAIT};
use crate::util::zk::{ZkOptions, ZkServer};
use crate::util::{process_alive, wait_for, wait_until};

use super::ONE_IMAGE;

#[test]
fn build_timeout_kills_the_whole_group_and_records_failed() {
    let site = TestSite::new("build_timeout");
    site.config(
        0,
        "",
        &ONE_IMAGE.replace(
            "formats = [\"qcow2\"]",
            "formats = [\"qcow2\"]\nbuild-timeout = 2",
        ),
    );
    site.control(0, "fake-dib.hang", "");
    let b = site.start(0, &[]);
    let failed = site.wait_builds("fedora", BuildState::Failed, 1).remove(0);
    let pids =
        std::fs::read_to_string(site.images_dir(0).join("fake-dib.fedora.hang-pids")).unwrap();
    for pid in pids.split_whitespace() {
        let pid: i32 = pid.parse().unwrap();
        wait_until(
            Duration::from_secs(15),
            &format!("hung DIB process {pid} to be gone"),
            || !process_alive(pid),
        );
    }
    assert!(
        failed.build.formats.is_empty(),
        "a failed record has no formats"
    );
    assert!(
        b.log().contains("Build timeout for image fedora"),
        "{}",
        b.log()
    );
}

#[test]
fn dib_failure_records_failed_and_retries_with_backoff() {
    let site = TestSite::new("dib_failure");
    site.config(0, "", ONE_IMAGE);
    let fail = site.control(0, "fake-dib.fail", "");
    let mut b = site.start(0, &[]);
    let failed = site.wait_builds("fedora", BuildState::Failed, 1);
    assert!(
        site.build_log(0, "fedora", &failed[0].id)
            .trim_end()
            .ends_with("Exit code: 127")
    );
    b.wait_for_log(WAIT, "retrying in 2s (failure 2)");
    let log = b.log();
    assert!(
        log.contains("DIB failed creating fedora (127) (timeout=False)"),
        "{log}"
    );
    assert!(
        log.contains("retrying in 1s (failure 1)"),
        "back-off doubles: {log}"
    );
    std::fs::remove_file(fail).unwrap();
    site.wait_builds("fedora", BuildState::Ready, 1);
    // The janitor removes failed builds once a ready one exists, records and files.
    site.wait("failed builds to be cleaned up", || {
        site.builds_in("fedora", BuildState::Failed)
            .is_empty()
            .then_some(())
    });
    site.wait("their local files to go", || {
        (site.local_files(0, "fedora", &failed[0].id).is_empty()).then_some(())
    });
}

#[test]
fn dib_exiting_0_without_all_formats_is_a_failed_build() {
    let site = TestSite::new("dib_partial");
    site.config(
        0,
        "",
        &ONE_IMAGE.replace("formats = [\"qcow2\"]", "formats = [\"qcow2\", \"raw\"]"),
    );
    site.control(0, "fake-dib.partial", "");
    let mut b = site.start(0, &[]);
    // (The janitor removes failed records quickly, so the log is the witness.)
    b.wait_for_log(WAIT, "DIB exited 0 but did not write");
    b.wait_for_log(WAIT, "(failure 2)");
    assert!(site.builds_in("fedora", BuildState::Ready).is_empty());
}

#[test]
fn dib_exiting_0_without_any_file_is_a_failed_build_naming_the_file() {
    let site = TestSite::new("dib_nofiles");
    site.config(0, "", ONE_IMAGE);
    let nofiles = site.control(0, "fake-dib.nofiles", "");
    let mut b = site.start(0, &[]);
    b.wait_for_log(WAIT, "(failure 1)");
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains("DIB exited 0 but did not write"))
        .unwrap_or_else(|| panic!("the cause is logged: {log}"));
    assert!(
        line.contains(".qcow2") && line.contains("image=fedora build="),
        "{line}"
    );
    assert!(site.builds_in("fedora", BuildState::Ready).is_empty());
    std::fs::remove_file(nofiles).unwrap();
    site.wait_builds("fedora", BuildState::Ready, 1);
}

#[test]
fn sigterm_during_a_build_kills_dib_and_records_failed() {
    let site = TestSite::new("sigterm_build");
    site.config(0, "", ONE_IMAGE);
    site.control(0, "fake-dib.hang", "");
    let mut b = site.start(0, &[]);
    let hang_pids = site.images_dir(0).join("fake-dib.fedora.hang-pids");
    wait_until(WAIT, "the hung build to start", || hang_pids.exists());
    let pids: Vec<i32> = wait_for(WAIT, "both pids written", || {
        let p: Vec<i32> = std::fs::read_to_string(&hang_pids)
            .ok()?
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        (p.len() == 2).then_some(p)
    });
    b.signal(Signal::SIGTERM);
    let status = b.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", b.log());
    for pid in pids {
        assert!(
            !process_alive(pid),
            "DIB process {pid} survived the builder"
        );
    }
    let builds = site.builds("fedora");
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0].build.state, BuildState::Failed, "{builds:?}");
    assert!(
        !nodepool_builder::zk::lock::is_locked(&site.zk, &paths::image_build_lock_path("fedora"))
            .unwrap(),
        "lock released"
    );
}

#[test]
fn session_loss_during_a_build_records_failed_then_rebuilds() {
    // A dedicated server: this test freezes it. Leaked on purpose: it dies with the process.
    let server: &'static ZkServer = Box::leak(Box::new(ZkServer::start(ZkOptions::tls())));
    let site = TestSite::on("session_loss", server);
    site.config(0, "", ONE_IMAGE);
    let cfg = site.path("builder0.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("zookeeper-timeout = 6.0", "zookeeper-timeout = 4.0");
    std::fs::write(&cfg, text).unwrap();
    let pause = site.control(0, "fake-dib.pause", "");
    let mut b = site.start(0, &[]);
    site.wait_builds("fedora", BuildState::Building, 1);
    let pid = nix::unistd::Pid::from_raw(server.pid() as i32);
    nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
    b.wait_for_log(Duration::from_secs(30), "ZooKeeper session lost");
    nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
    b.wait_for_log(Duration::from_secs(30), "generation 2)");
    std::fs::remove_file(pause).unwrap();
    b.wait_for_log(WAIT, "ZooKeeper lost while building fedora");
    // The result was recorded as failed in the new session, then the image was rebuilt.
    site.wait_builds("fedora", BuildState::Ready, 1);
    assert!(
        b.log()
            .contains("build failed (ZooKeeper lost while building fedora)"),
        "{}",
        b.log()
    );
}
