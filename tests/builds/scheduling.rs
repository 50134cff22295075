//! When builds happen and what each is asked for, through the real binary, a real ZooKeeper
//! and the test image builder: the first build and manual requests (the `request-build`
//! znode), `rebuild-age`, pauses (config and `image-pause` znode), the formats the providers
//! need, build-only and formatless images, parent and abstract diskimages, and two builders
//! sharing the work without building one image twice.
//!
//! Builds that go wrong are in [`super::failures`], disk space and build logs in
//! [`super::local_disk`].

use std::time::Duration;

use nix::sys::signal::Signal;
use nodepool_builder::model::BuildState;
use nodepool_builder::zk::paths;

use crate::util::site::{TestSite, WAIT};
use crate::util::{cpu_secs, wait_until};

use super::ONE_IMAGE;

#[test]
fn first_build_then_manual_request_is_served_at_once() {
    let site = TestSite::new("manual_request");
    site.config(0, "", ONE_IMAGE);
    let b = site.start(0, &[]);
    let first = site.wait_builds("fedora", BuildState::Ready, 1);
    let first = &first[0];
    assert_eq!(first.build.formats, vec!["qcow2"]);
    assert_eq!(first.build.username.as_deref(), Some("zuul"));
    assert_eq!(first.build.python_path.as_deref(), Some("auto"));
    assert_eq!(first.id.len(), 32, "uuid4 hex build id");
    assert_eq!(
        site.local_files(0, "fedora", &first.id),
        [
            format!("fedora-{}.d", first.id),
            format!("fedora-{}.qcow2", first.id),
            format!("fedora-{}.qcow2.md5", first.id),
            format!("fedora-{}.qcow2.sha256", first.id)
        ]
    );
    let log = site.build_log(0, "fedora", &first.id);
    assert!(log.contains("fake-dib: elements: fedora vm"), "{log}");
    assert!(log.contains("--qemu-img-options compat=0.10"), "{log}");
    assert!(log.trim_end().ends_with("Exit code: 0"), "{log}");
    assert!(b.log().contains("no ready build"), "the cause is logged");

    site.request_build("fedora");
    let both = site.wait_builds("fedora", BuildState::Ready, 2);
    assert!(both.iter().all(|x| x.build.formats == vec!["qcow2"]));
    wait_until(
        WAIT,
        "the request-build znode to be deleted after the ready build",
        || !site.request_pending("fedora"),
    );
    assert!(b.log().contains("Manual build request for image fedora"));
    assert!(b.log().contains("request-build znode present"));
}

/// Regression (a flake of `builds::local_disk::free_space_guard_waits_for_space_without_recording_failures`):
/// the `request-build` znode a manual build satisfied was deleted after its `ready` record,
/// so a request made as soon as the build showed `ready` found the old znode, was merged into
/// it, and was deleted with it: the build asked for never came. The ready record and the
/// deletion are now one transaction. A proxy holds back the reply to the ready write (the
/// record is written, the builder has not heard yet) while the next request is made.
#[test]
fn a_request_made_as_soon_as_the_requested_build_is_ready_builds_again() {
    use crate::util::zkproxy::{self, ZkProxy};

    let site = TestSite::new("request_after_ready");
    let proxy = ZkProxy::start(site.server.plain_port());
    site.config(0, "", ONE_IMAGE);
    site.zookeeper_through(0, proxy.port());
    let _b = site.start(0, &[]);
    site.wait_builds("fedora", BuildState::Ready, 1);

    let builds = format!("{}/", paths::image_builds_path("fedora"));
    proxy.hold_reply_of(&[zkproxy::SET_DATA, zkproxy::MULTI].concat(), &builds);
    site.request_build("fedora");
    assert!(
        proxy.wait_held(WAIT),
        "waiting for the manual build's result write"
    );
    let ready = site.builds_in("fedora", BuildState::Ready);
    assert_eq!(ready.len(), 2, "the held write made the manual build ready");
    site.request_build("fedora");
    proxy.release();
    site.wait_builds("fedora", BuildState::Ready, 3);
    wait_until(WAIT, "the last request to be served", || {
        !site.request_pending("fedora")
    });
}

/// `cleanup-interval = 0` disables the janitor. Its channel, left without a sender, once
/// kept the scheduler loop spinning a core ahead of ZooKeeper events, so a request was never
/// served.
#[test]
fn with_cleanup_disabled_a_manual_request_is_served_and_idle_costs_no_cpu() {
    let site = TestSite::new("cleanup_disabled");
    site.config(0, "cleanup-interval = 0", ONE_IMAGE);
    let b = site.start(0, &[]);
    site.wait_builds("fedora", BuildState::Ready, 1);
    site.request_build("fedora");
    site.wait_builds("fedora", BuildState::Ready, 2);
    wait_until(WAIT, "the request-build znode to be served", || {
        !site.request_pending("fedora")
    });
    // The observation window of an idle daemon (a measurement, not a synchronisation).
    let before = cpu_secs(b.pid());
    std::thread::sleep(Duration::from_secs(10));
    let used = cpu_secs(b.pid()) - before;
    assert!(
        used < 0.5,
        "an idle daemon with cleanup disabled used {used:.2} s of CPU in 10 s\n{}",
        site.dump()
    );
    assert!(
        !b.log().contains("cleanup pass"),
        "no janitor pass runs with cleanup disabled"
    );
}

#[test]
fn rebuild_age_expiry_rebuilds_and_keeps_both_logs() {
    let site = TestSite::new("rebuild_age");
    site.config(
        0,
        "",
        &ONE_IMAGE.replace(
            "formats = [\"qcow2\"]",
            "formats = [\"qcow2\"]\nrebuild-age = 3600",
        ),
    );
    let b = site.start(0, &[]);
    let first = site.wait_builds("fedora", BuildState::Ready, 1).remove(0);
    // Age the ready build by rebuild-age, as upstream's test does.
    let mut aged = first.build.clone();
    aged.state_time -= 3600.0;
    site.zk
        .set_data(
            &paths::image_build_path("fedora", &first.id),
            &aged.to_json(),
            None,
        )
        .unwrap();
    let ready = site.wait_builds("fedora", BuildState::Ready, 2);
    let second = ready.iter().find(|x| x.id != first.id).unwrap();
    assert!(
        b.log()
            .contains("rebuild-age expired: newest ready build is 1h old"),
        "{}",
        b.log()
    );
    assert!(
        site.log_dir(0)
            .join(format!("fedora-{}.log", first.id))
            .exists()
    );
    assert!(
        site.log_dir(0)
            .join(format!("fedora-{}.log", second.id))
            .exists()
    );
}

#[test]
fn paused_by_config_is_never_built_while_others_are() {
    let site = TestSite::new("pause_config");
    site.config(
        0,
        "",
        r#"
[[diskimages]]
name = "paused"
dib-cmd = "{fake_dib}"
formats = ["raw"]
pause = true

[[diskimages]]
name = "active"
dib-cmd = "{fake_dib}"
formats = ["raw"]
"#,
    );
    let _b = site.start(0, &[]);
    site.request_build("paused");
    site.wait_builds("active", BuildState::Ready, 1);
    site.request_build("active");
    site.wait_builds("active", BuildState::Ready, 2);
    assert!(
        site.builds("paused").is_empty(),
        "a config-paused image is never built"
    );
    assert!(site.request_pending("paused"), "its request stays pending");
}

#[test]
fn pause_znode_holds_requests_until_unpaused() {
    let site = TestSite::new("pause_znode");
    site.config(0, "", &format!("{ONE_IMAGE}\n[[diskimages]]\nname = \"other\"\ndib-cmd = \"{{fake_dib}}\"\nformats = [\"raw\"]\n"));
    let _b = site.start(0, &[]);
    site.wait_builds("fedora", BuildState::Ready, 1);
    site.wait_builds("other", BuildState::Ready, 1);
    site.pause("fedora");
    site.request_build("fedora");
    // A request for another image, made after, is served: the scheduler has seen both.
    site.request_build("other");
    site.wait_builds("other", BuildState::Ready, 2);
    wait_until(WAIT, "the other request to be served", || {
        !site.request_pending("other")
    });
    assert_eq!(
        site.builds("fedora").len(),
        1,
        "paused: the request stays pending"
    );
    assert!(site.request_pending("fedora"));
    site.unpause("fedora");
    site.wait_builds("fedora", BuildState::Ready, 2);
    wait_until(WAIT, "request served", || !site.request_pending("fedora"));
}

#[test]
fn formats_are_the_union_with_providers_and_a_new_format_rebuilds() {
    let site = TestSite::new("formats_union");
    let providers = r#"
[[providers]]
name = "vhd-cloud"
driver = "command"
image-format = "vhd"
upload-command = ["/bin/false"]
delete-command = ["/bin/true"]
[[providers.diskimages]]
name = "fedora"
"#;
    site.config(0, "", &format!("{ONE_IMAGE}{providers}"));
    let b = site.start(0, &[]);
    let first = site.wait_builds("fedora", BuildState::Ready, 1).remove(0);
    assert_eq!(first.build.formats, vec!["qcow2", "vhd"]);
    let vhd = site.images_dir(0).join(format!("fedora-{}.vhd", first.id));
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", vhd.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("\"format\": \"vpc\""),
        "a real vhd"
    );

    // A second provider needing raw: the ready build lacks it, so the image is rebuilt.
    let raw = providers
        .replace("vhd-cloud", "raw-cloud")
        .replace("\"vhd\"", "\"raw\"");
    site.config(0, "", &format!("{ONE_IMAGE}{providers}{raw}"));
    b.signal(Signal::SIGHUP);
    let ready = site.wait_builds("fedora", BuildState::Ready, 2);
    let second = ready.iter().find(|x| x.id != first.id).unwrap();
    assert_eq!(second.build.formats, vec!["qcow2", "raw", "vhd"]);
    assert!(
        b.log().contains("formats changed: raw missing"),
        "{}",
        b.log()
    );
}

#[test]
fn build_only_and_formatless_images() {
    let site = TestSite::new("build_only");
    site.config(
        0,
        "",
        r#"
[[diskimages]]
name = "tarball"
dib-cmd = "{fake_dib}"
formats = ["tar"]

[[diskimages]]
name = "nothing"
dib-cmd = "{fake_dib}"
"#,
    );
    let _b = site.start(0, &[]);
    let t = site.wait_builds("tarball", BuildState::Ready, 1).remove(0);
    assert_eq!(t.build.formats, vec!["tar"]);
    assert!(
        site.images_dir(0)
            .join(format!("tarball-{}.tar", t.id))
            .is_file()
    );
    site.request_build("nothing");
    site.request_build("tarball");
    site.wait_builds("tarball", BuildState::Ready, 2);
    assert!(
        site.builds("nothing").is_empty(),
        "an image with no formats is never built"
    );
}

#[test]
fn parents_and_abstract_images_merge_elements_and_env() {
    let site = TestSite::new("parents");
    site.config(
        0,
        "",
        r#"
[[diskimages]]
name = "base"
abstract = true
dib-cmd = "{fake_dib}"
elements = ["fedora"]
release = 21
formats = ["raw"]
[diskimages.env-vars]
TMPDIR = "/opt/dib_tmp"
LEVEL = "base"

[[diskimages]]
name = "intermediate"
abstract = true
parent = "base"
elements = ["intermediate"]
[diskimages.env-vars]
LEVEL = "intermediate"

[[diskimages]]
name = "child"
parent = "intermediate"
elements = ["vm"]
[diskimages.env-vars]
FAKE_DIB_EXPECT_ELEMENTS = "fedora intermediate vm"
FAKE_DIB_EXPECT_ENV = "TMPDIR=/opt/dib_tmp LEVEL=intermediate DIB_RELEASE=21"
"#,
    );
    let _b = site.start(0, &[]);
    let c = site.wait_builds("child", BuildState::Ready, 1).remove(0);
    assert!(
        site.build_log(0, "child", &c.id)
            .contains("fake-dib: elements: fedora intermediate vm")
    );
    assert!(
        site.builds("base").is_empty() && site.builds("intermediate").is_empty(),
        "abstract images are not built"
    );
}

#[test]
fn two_builders_never_build_one_image_twice() {
    let site = TestSite::new("two_builders");
    let body = ONE_IMAGE.replace(
        "formats = [\"qcow2\"]",
        "formats = [\"qcow2\"]\n[diskimages.env-vars]\nFAKE_DIB_SIZE_MB = \"4\"",
    );
    site.config(0, "", &body);
    site.config(1, "", &body);
    site.control(0, "fake-dib.slow", "1");
    site.control(1, "fake-dib.slow", "1");
    let _b0 = site.start(0, &[]);
    let _b1 = site.start(1, &[]);
    let first = site.wait_builds("fedora", BuildState::Ready, 1);
    assert_eq!(first.len(), 1);
    let mut known = vec![first[0].id.clone()];
    let mut all_ids: std::collections::BTreeSet<String> = known.iter().cloned().collect();
    for n in 2..=3 {
        site.request_build("fedora");
        // While the build runs, at most one building record exists.
        site.wait(&format!("build {n}"), || {
            let all = site.builds("fedora");
            assert!(
                all.iter()
                    .filter(|b| b.build.state == BuildState::Building)
                    .count()
                    <= 1,
                "two builds at once: {all:?}"
            );
            all_ids.extend(all.iter().map(|b| b.id.clone()));
            all.iter()
                .find(|b| b.build.state == BuildState::Ready && !known.contains(&b.id))
                .map(|b| known.push(b.id.clone()))
        });
        wait_until(WAIT, "the served request-build znode to be deleted", || {
            !site.request_pending("fedora")
        });
    }
    all_ids.extend(site.builds("fedora").into_iter().map(|b| b.id));
    assert_eq!(
        all_ids.len(),
        3,
        "exactly one build per request: {all_ids:?}"
    );
}
