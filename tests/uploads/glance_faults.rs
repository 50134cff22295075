//! Bad upload input end to end (issue "Faults", scenario 5): the daemon builds with the test
//! image builder and uploads through the OpenStack driver to the real (shared) Glance behind
//! a fault-injecting proxy (`util::faultproxy`). Glance answers 500, 503 or 415, stalls past
//! the provider's `image-upload-timeout`, or vanishes mid-upload. Each time the upload ends
//! `failed` with the status and the provider in the daemon log, is retried with back-off,
//! leaves no Glance image without a record (checked in Glance itself), and once the fault is
//! lifted exactly one `ready` upload exists, whose image is the provider's only one.
//!
//! The DIB side of the scenario (non-zero exit, build timeout, no files, some formats) is in
//! `builds::failures`, the post-upload hook failure in [`super::command_driver`].

use std::net::SocketAddr;
use std::time::Duration;

use nix::sys::signal::Signal;
use nodepool_builder::model::UploadState;

use crate::util::builder::BuilderProcess;
use crate::util::faultproxy::{Fault, FaultProxy, Rule};
use crate::util::glance::GlanceServer;
use crate::util::site::{TestSite, WAIT};
use crate::util::wait_until;

const IMAGE: &str = "fedora";

/// One test's world: the shared Glance, a proxy in front of it, a site whose provider
/// `provider` reaches Glance through the proxy.
struct World {
    glance: &'static GlanceServer,
    proxy: FaultProxy,
    site: TestSite,
    provider: String,
    clouds: String,
}

impl World {
    /// `upload_timeout`: the provider's `image-upload-timeout`, seconds.
    fn new(name: &str, rules: Vec<Rule>, upload_timeout: u64) -> World {
        let glance = GlanceServer::shared();
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], glance.port())));
        proxy.set(rules);
        let site = TestSite::new(name);
        let clouds = site.path("clouds.yaml");
        std::fs::write(
            &clouds,
            format!(
                "clouds:\n  sick:\n    auth_type: none\n    image_endpoint_override: {}\n",
                proxy.url()
            ),
        )
        .unwrap();
        let world = World {
            glance,
            proxy,
            site,
            provider: format!("bad-input-{}", name.replace('_', "-")),
            clouds: clouds.display().to_string(),
        };
        world.write_config(upload_timeout);
        world
    }

    fn write_config(&self, upload_timeout: u64) {
        let body = format!(
            "\n[[diskimages]]\nname = \"{IMAGE}\"\ndib-cmd = \"{{fake_dib}}\"\n\
             \n[[providers]]\nname = \"{p}\"\ncloud = \"sick\"\nrate = 0.0\n\
             image-upload-timeout = {upload_timeout}\n\
             [[providers.diskimages]]\nname = \"{IMAGE}\"\n",
            p = self.provider
        );
        // A short janitor interval: failed records and leaks are looked at often.
        self.site.config(0, "cleanup-interval = 2.0", &body);
    }

    fn start(&self) -> BuilderProcess {
        self.site
            .start_with_env(0, &[], &[("OS_CLIENT_CONFIG_FILE", &self.clouds)])
    }

    /// Ids of the provider's images in Glance.
    fn glance_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .glance
            .images_of(&self.provider)
            .iter()
            .map(|i| i["id"].as_str().unwrap_or_default().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// Panic context: proxy requests, Glance's images, the tree and the log tail.
    fn context(&self) -> String {
        format!(
            "--- proxy ---\n{}\n--- glance images of {} ---\n{:?}\n{}",
            self.proxy.requests().join("\n"),
            self.provider,
            self.glance_ids(),
            self.site.dump()
        )
    }

    /// The fault in place: the upload fails with `cause` in the log, twice (retried with
    /// back-off), with a `failed` record in between.
    fn expect_failures(&self, b: &mut BuilderProcess, cause: &str) {
        self.site
            .wait_uploads(IMAGE, &self.provider, UploadState::Failed, 1);
        b.wait_for_log(WAIT, "upload failed (");
        b.wait_for_log(WAIT, "(failure 2)");
        let log = b.log();
        let failed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("Failed to upload build"))
            .collect();
        assert!(
            failed.len() >= 2,
            "two failed attempts logged\n{}",
            self.context()
        );
        for line in &failed[..2] {
            assert!(
                line.contains(&format!("to provider {}", self.provider))
                    && line.contains(&format!("provider {}:", self.provider))
                    && line.contains(cause),
                "the failure names the provider and the cause {cause:?}: {line}\n{}",
                self.context()
            );
        }
        assert!(
            log.contains("retrying in 1s (failure 1)")
                && log.contains("retrying in 2s (failure 2)"),
            "back-off doubles\n{}",
            self.context()
        );
        assert!(
            self.site
                .uploads_in(IMAGE, &self.provider, UploadState::Ready)
                .is_empty(),
            "no ready upload while the fault lasts\n{}",
            self.context()
        );
    }

    /// The fault lifted: exactly one ready upload, whose image is the provider's only image
    /// in Glance, active; no record without data and no local file without a build.
    fn expect_recovery(&self) {
        let (_, up) = self
            .site
            .wait_uploads(IMAGE, &self.provider, UploadState::Ready, 1)
            .remove(0);
        let id = up
            .upload
            .external_id
            .clone()
            .expect("a ready upload has an id");
        let mut last = Vec::new();
        let clean = crate::util::poll_for(Duration::from_secs(90), || {
            last = self.glance_ids();
            (last == vec![id.clone()]).then_some(())
        });
        assert!(
            clean.is_some(),
            "Glance should hold only the ready upload's image {id}, has {last:?}\n{}",
            self.context()
        );
        assert_eq!(
            self.glance.get_image(&id).unwrap()["status"],
            "active",
            "{}",
            self.context()
        );
        let ready = self
            .site
            .uploads_in(IMAGE, &self.provider, UploadState::Ready);
        assert_eq!(
            ready.len(),
            1,
            "exactly one ready upload\n{}",
            self.context()
        );
        self.site.assert_no_leaks(&[], &[0]);
    }

    /// While the fault lasts, the failed attempts leave no image in Glance.
    fn expect_no_image_while_failing(&self) {
        let mut last = Vec::new();
        let clean = crate::util::poll_for(WAIT, || {
            last = self.glance_ids();
            last.is_empty().then_some(())
        });
        assert!(
            clean.is_some(),
            "failed attempts left images {last:?} in Glance\n{}",
            self.context()
        );
    }
}

/// The common course: fault from the start, failures with `cause`, no image left behind,
/// fault lifted, one ready upload.
fn fault_then_recovery(name: &str, rules: Vec<Rule>, cause: &str, injected: &str) {
    let w = World::new(name, rules, 300);
    let mut b = w.start();
    w.expect_failures(&mut b, cause);
    assert!(
        w.proxy.count(injected) >= 2,
        "the fault {injected:?} was hit on every attempt\n{}",
        w.context()
    );
    w.expect_no_image_while_failing();
    w.proxy.clear();
    w.expect_recovery();
}

#[test]
fn glance_500_on_create_is_retried_until_it_answers() {
    fault_then_recovery(
        "create_500",
        vec![Rule::create(Fault::Status(500))],
        "create: HTTP 500 Internal Server Error",
        "POST /v2/images -> injected 500",
    );
}

#[test]
fn glance_503_on_create_is_retried_until_it_answers() {
    fault_then_recovery(
        "create_503",
        vec![Rule::create(Fault::Status(503))],
        "create: HTTP 503 Service Unavailable",
        "POST /v2/images -> injected 503",
    );
}

#[test]
fn glance_500_after_writing_the_image_leaves_no_image() {
    // Glance created the image, then the answer was a 500: the driver deletes by its own id.
    fault_then_recovery(
        "create_written_500",
        vec![Rule::create(Fault::AfterForward(500))],
        "create: HTTP 500 Internal Server Error",
        "POST /v2/images -> upstream 201, injected 500",
    );
}

#[test]
fn glance_500_on_the_data_upload_deletes_the_created_image() {
    fault_then_recovery(
        "data_500",
        vec![Rule::data(Fault::Status(500))],
        "PUT data: HTTP 500 Internal Server Error",
        "/file -> injected 500",
    );
}

#[test]
fn glance_503_on_the_data_upload_deletes_the_created_image() {
    fault_then_recovery(
        "data_503",
        vec![Rule::data(Fault::Status(503))],
        "PUT data: HTTP 503 Service Unavailable",
        "/file -> injected 503",
    );
}

#[test]
fn glance_415_on_the_data_upload_deletes_the_created_image() {
    fault_then_recovery(
        "data_415",
        vec![Rule::data(Fault::Status(415))],
        "PUT data: HTTP 415 Unsupported Media Type",
        "/file -> injected 415",
    );
}

/// A stall past `image-upload-timeout`; the timeout is raised (SIGHUP) with the fault lifted
/// so the healthy upload is not raced against the short one on a busy machine.
fn stall_then_recovery(name: &str, rule: Rule, cause: &str, injected: &str) {
    let w = World::new(name, vec![rule], 5);
    let mut b = w.start();
    w.expect_failures(&mut b, cause);
    assert!(w.proxy.count(injected) >= 2, "{}", w.context());
    w.expect_no_image_while_failing();
    w.write_config(300);
    b.signal(Signal::SIGHUP);
    b.wait_for_log(WAIT, "Configuration reloaded from");
    w.proxy.clear();
    w.expect_recovery();
}

#[test]
fn glance_stalling_on_create_times_out_and_is_retried() {
    stall_then_recovery(
        "create_stall",
        Rule::create(Fault::Stall),
        "/v2/images: timed out after",
        "POST /v2/images -> stalled",
    );
}

#[test]
fn glance_stalling_on_the_data_upload_times_out_and_is_retried() {
    stall_then_recovery(
        "data_stall",
        Rule::data(Fault::Stall),
        "/file: timed out after",
        "/file -> stalled",
    );
}

#[test]
fn glance_vanishing_mid_upload_leaves_no_image_once_it_is_back() {
    let w = World::new("vanish", vec![Rule::data(Fault::Vanish)], 300);
    let mut b = w.start();
    // The first attempt cuts the connection mid-body and takes the cloud down: the created
    // image cannot be deleted now, and later attempts cannot even connect.
    wait_until(WAIT, "the proxy to vanish mid-upload", || {
        w.proxy.count("vanished mid-request") == 1
    });
    w.expect_failures(&mut b, "/v2/images");
    assert!(
        w.proxy.count("refused (down)") >= 1 || b.log().contains("Connection refused"),
        "later requests found the cloud gone\n{}",
        w.context()
    );
    assert!(
        b.log().contains("could not be deleted and will be retried"),
        "the stray image is remembered for deletion\n{}",
        w.context()
    );
    w.proxy.clear();
    w.expect_recovery();
}
