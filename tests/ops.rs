//! The operator subcommands (`src/ops`) against data made by a real builder run on the shared
//! TLS ZooKeeper, compared with the Python nodepool 11 CLI on the same chroot.
//!
//! Uploads are written directly with the schema types (byte-exact like upstream's), since no
//! provider is configured. The builders run with `cleanup-interval = 0` (no janitor), so the
//! records a test writes or marks `deleting` stay until the test has looked at them. The
//! Python CLI costs 0.5–3 s per call, so it runs only where a comparison needs it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nodepool_builder::model::{BuildState, UploadState, now_epoch};
use nodepool_builder::zk::schema::{ImageBuild, ImageUpload};
use nodepool_builder::zk::{Mode, Zk, ZkConfig, paths};

use crate::util::builder::BuilderProcess;
use crate::util::nodepool::{DiskImage, NodepoolCli, Table, age_seconds, describe, ops, ops_ok};
use crate::util::site::{TestSite, WAIT};
use crate::util::{poll_for, process_alive, wait_until};

fn diskimage(name: &str, formats: &str, extra: &str) -> String {
    format!(
        "\n[[diskimages]]\nname = \"{name}\"\ndib-cmd = \"{{fake_dib}}\"\nformats = [{formats}]\n{extra}\n"
    )
}

/// A builder that is stopped with SIGTERM when dropped (also when a test fails), so a build
/// held by `fake-dib.<image>.hang` does not outlive the test: the builder kills DIB's group.
struct Graceful(BuilderProcess);

impl Drop for Graceful {
    fn drop(&mut self) {
        let pid = self.0.pid();
        self.0.signal(Signal::SIGTERM);
        // No panics here: this may run while a failed test unwinds.
        let _ = poll_for(Duration::from_secs(30), || {
            (!process_alive(pid)).then_some(())
        });
    }
}

/// Adds an upload record the way an upload worker does: the `images/lock` directory first,
/// then a sequential child with an empty prefix. Returns the upload id.
fn add_upload(zk: &Zk, image: &str, build: &str, provider: &str, upload: &ImageUpload) -> String {
    zk.ensure_path(&paths::image_upload_lock_path(image, build, provider))
        .unwrap();
    let prefix = format!("{}/", paths::image_uploads_path(image, build, provider));
    let node = zk
        .create(&prefix, &upload.to_json(), Mode::PersistentSequential)
        .unwrap();
    node[prefix.len()..].to_string()
}

fn ready_upload(state_time: f64, external_id: &str, external_name: &str) -> ImageUpload {
    let mut u = ImageUpload::uploading(Some("zuul"), Some("auto"), None, state_time);
    u.state = UploadState::Ready;
    u.external_id = Some(external_id.into());
    u.external_name = Some(external_name.into());
    u.format = Some("qcow2".into());
    u
}

/// Asserts that two tables printed by different programs are the same table: identical
/// borders and header, the same rows in any order, and ages at most `slack` apart.
#[track_caller]
fn assert_same_table(ours: &str, python: &str, slack: Duration) {
    let (a, b) = (Table::parse(ours), Table::parse(python));
    let both = format!("--- ours ---\n{ours}\n--- python ---\n{python}");
    assert_eq!(a.frame, b.frame, "borders and header differ:\n{both}");
    assert_eq!(
        a.normalized_rows(),
        b.normalized_rows(),
        "rows differ:\n{both}"
    );
    // Ages of the same row may differ by the seconds that passed between the two calls.
    let ages: Vec<usize> = (0..a.headers.len())
        .filter(|&i| a.headers[i].ends_with("Age"))
        .collect();
    let rest = |row: &[String]| -> Vec<String> {
        row.iter()
            .enumerate()
            .filter(|(i, _)| !ages.contains(i))
            .map(|(_, c)| c.clone())
            .collect()
    };
    for row in &a.rows {
        let other = b.rows.iter().find(|r| rest(r) == rest(row)).unwrap();
        for &i in &ages {
            if row[i].is_empty() || other[i].is_empty() {
                assert_eq!(row[i], other[i], "{both}");
                continue;
            }
            let (x, y) = (age_seconds(&row[i]), age_seconds(&other[i]));
            assert!(
                x.abs_diff(y) <= slack.as_secs() + 1,
                "{}: ours {x} s, python {y} s in row {row:?}\n{both}",
                a.headers[i]
            );
        }
    }
}

/// Asserts that an `Age` cell shows `age` seconds plus at most the time passed since `since`
/// (the epoch time the record was written with a `state_time` of `since - age`).
#[track_caller]
fn assert_age(cell: &str, age: u64, since: f64) {
    let shown = age_seconds(cell);
    let passed = (now_epoch() - since).ceil() as u64;
    assert!(
        shown + 1 >= age && shown <= age + passed + 1,
        "age {cell} ({shown} s) is not {age} s plus at most {passed} s"
    );
}

/// Every znode under `/nodepool/images` with its data, without lock directories, their
/// contenders and build requests.
fn image_tree(zk: &Zk) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![paths::IMAGE_ROOT.to_string()];
    while let Some(path) = stack.pop() {
        let Some((data, _)) = zk.get_data(&path).unwrap() else {
            continue;
        };
        for child in zk.get_children(&path).unwrap().unwrap_or_default() {
            if child != "lock" && child != "request-build" {
                stack.push(format!("{path}/{child}"));
            }
        }
        out.insert(path, data);
    }
    out
}

#[test]
fn listings_match_the_python_cli() {
    let site = TestSite::new("ops_listings");
    let images = [
        diskimage("alpha", "\"qcow2\"", ""),
        diskimage("beta", "\"qcow2\", \"raw\"", ""),
        diskimage("gamma", "\"qcow2\"", ""),
        diskimage("frozen", "\"qcow2\"", "pause = true"),
    ]
    .concat();
    let cfg = site.config(0, "cleanup-interval = 0.0", &images);
    site.control(0, "fake-dib.gamma.hang", "");
    let _b = Graceful(site.start(0, &["--build-workers", "3"]));
    let alpha = site.wait_builds("alpha", BuildState::Ready, 1).remove(0);
    let beta = site.wait_builds("beta", BuildState::Ready, 1).remove(0);
    let gamma = site.wait_builds("gamma", BuildState::Building, 1).remove(0);

    // beta: paused in ZooKeeper with a request that therefore stays pending; gamma: a request
    // while its build holds the lock; delta: paused before any builder has seen it.
    ops_ok(&cfg, &["image-pause", "beta"]);
    ops_ok(&cfg, &["image-build", "beta"]);
    ops_ok(&cfg, &["image-build", "gamma"]);
    assert_eq!(ops_ok(&cfg, &["image-pause", "delta"]), "");
    let now = now_epoch();
    let u1 = add_upload(
        &site.zk,
        "alpha",
        &alpha.id,
        "prov-1",
        &ready_upload(
            now - 100.0,
            "ab1f6b3464d147e28a759f6d5570997a",
            "alpha-1795536820",
        ),
    );
    let u2 = add_upload(
        &site.zk,
        "alpha",
        &alpha.id,
        "prov-2",
        &ImageUpload::uploading(Some("zuul"), Some("auto"), None, now - 5.0),
    );
    let u3 = add_upload(
        &site.zk,
        "beta",
        &beta.id,
        "prov-1",
        &ImageUpload::bare_failed(now - 3725.0),
    );
    assert_eq!(
        (u1.as_str(), u2.as_str(), u3.as_str()),
        ("0000000001", "0000000001", "0000000001")
    );

    let python = NodepoolCli::new(
        &site,
        &site.chroot,
        &[
            DiskImage {
                name: "alpha",
                paused: false,
            },
            DiskImage {
                name: "beta",
                paused: false,
            },
            DiskImage {
                name: "gamma",
                paused: false,
            },
            DiskImage {
                name: "frozen",
                paused: true,
            },
        ],
    );
    for command in ["dib-image-list", "image-list", "image-status"] {
        let started = Instant::now();
        let ours = ops_ok(&cfg, &[command]);
        let ours_took = started.elapsed();
        let theirs = python.run_ok(&[command]);
        eprintln!(
            "--- {command}: ours {ours_took:?}, python {:?} ---\n{ours}",
            started.elapsed() - ours_took
        );
        assert_same_table(&ours, &theirs, started.elapsed());
    }

    // What the tables hold, beyond being upstream's.
    let builds = Table::parse(&ops_ok(&cfg, &["dib-image-list"]));
    let state = |id: &str| {
        builds
            .rows
            .iter()
            .find(|r| r[0] == id)
            .map(|r| (r[3].clone(), r[4].clone()))
    };
    assert_eq!(
        state(&format!("alpha-{}", alpha.id)),
        Some(("qcow2".into(), "ready".into()))
    );
    assert_eq!(
        state(&format!("beta-{}", beta.id)),
        Some(("qcow2,raw".into(), "paused".into()))
    );
    assert_eq!(
        state(&format!("gamma-{}", gamma.id)),
        Some(("qcow2".into(), "building".into()))
    );
    let status = Table::parse(&ops_ok(&cfg, &["image-status"])).normalized_rows();
    let row = |cells: [&str; 4]| cells.map(String::from).to_vec();
    for expected in [
        row(["alpha", "False", "", ""]),
        row(["beta", "True", "pending", "<age>"]),
        row(["delta", "True", "", ""]),
        row(["gamma", "False", "building", "<age>"]),
    ] {
        assert!(status.contains(&expected), "{expected:?} not in {status:?}");
    }
    let uploads = Table::parse(&ops_ok(&cfg, &["image-list"]));
    assert_eq!(uploads.rows.len(), 3, "{uploads:?}");
    let ready = uploads
        .rows
        .iter()
        .find(|r| r[2] == "prov-1" && r[3] == "alpha")
        .unwrap();
    assert_eq!(
        ready[..7],
        [
            alpha.id.as_str(),
            "0000000001",
            "prov-1",
            "alpha",
            "alpha-1795536820",
            "ab1f6b3464d147e28a759f6d5570997a",
            "ready"
        ]
    );
    assert_age(&ready[7], 100, now);
    let failed = uploads.rows.iter().find(|r| r[3] == "beta").unwrap();
    assert_eq!(failed[4..7], ["", "", "failed"]);
    assert_age(&failed[7], 3725, now);

    // JSON for scripts: the launcher webapp's keys, in its order.
    let json = ops_ok(&cfg, &["dib-image-list", "--json"]);
    assert!(
        json.starts_with("[{\"id\":") && json.contains("\"image\":\"beta\",\"builder\":"),
        "{json}"
    );
    let builds: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let b = builds.iter().find(|b| b["image"] == "beta").unwrap();
    assert_eq!(b["formats"], serde_json::json!(["qcow2", "raw"]));
    assert_eq!(b["state"], "paused");
    assert_eq!(b["age"], serde_json::json!(beta.build.state_time as i64));
    let uploads: Vec<serde_json::Value> =
        serde_json::from_str(&ops_ok(&cfg, &["image-list", "--json"])).unwrap();
    let u = uploads.iter().find(|u| u["provider"] == "prov-2").unwrap();
    assert_eq!(u["id"], serde_json::json!(alpha.id));
    assert_eq!(
        (&u["upload_id"], &u["state"], &u["external_id"]),
        (
            &serde_json::json!("0000000001"),
            &serde_json::json!("uploading"),
            &serde_json::Value::Null
        )
    );
    let status: Vec<serde_json::Value> =
        serde_json::from_str(&ops_ok(&cfg, &["image-status", "--json"])).unwrap();
    let g = status.iter().find(|s| s["image"] == "gamma").unwrap();
    assert_eq!(
        (&g["paused"], &g["build_request"]),
        (&serde_json::json!(false), &serde_json::json!("building"))
    );
    assert!(g["build_request_age"].as_i64().unwrap() <= now_epoch() as i64);
    let d = status.iter().find(|s| s["image"] == "delta").unwrap();
    assert_eq!(d["build_request_age"], serde_json::Value::Null);
}

#[test]
fn python_image_build_and_image_pause_drive_our_builder() {
    let site = TestSite::new("ops_python_drives");
    let cfg = site.config(0, "", &diskimage("fedora", "\"qcow2\"", ""));
    let _b = Graceful(site.start(0, &[]));
    site.wait_builds("fedora", BuildState::Ready, 1);
    let python = NodepoolCli::new(
        &site,
        &site.chroot,
        &[DiskImage {
            name: "fedora",
            paused: false,
        }],
    );

    python.run_ok(&["image-pause", "fedora"]);
    assert!(
        site.zk
            .exists(&paths::image_pause_path("fedora"))
            .unwrap()
            .is_some()
    );
    python.run_ok(&["image-build", "fedora"]);
    assert!(
        site.request_pending("fedora"),
        "nodepool image-build creates request-build"
    );
    let status = Table::parse(&ops_ok(&cfg, &["image-status"])).normalized_rows();
    assert_eq!(
        status,
        vec![
            ["fedora", "True", "pending", "<age>"]
                .map(String::from)
                .to_vec()
        ]
    );
    let held = poll_for(Duration::from_secs(3), || {
        (site.builds("fedora").len() > 1).then_some(())
    });
    assert!(
        held.is_none(),
        "a paused image must not be built: {:?}",
        site.builds("fedora")
    );
    let listed = Table::parse(&ops_ok(&cfg, &["dib-image-list"]));
    assert_eq!(listed.rows[0][4], "paused");

    python.run_ok(&["image-unpause", "fedora"]);
    site.wait_builds("fedora", BuildState::Ready, 2);
    wait_until(WAIT, "the request to be deleted after the build", || {
        !site.request_pending("fedora")
    });
}

#[test]
fn messages_and_errors_of_the_changing_commands() {
    let site = TestSite::new("ops_errors");
    let images = [
        diskimage("fedora", "\"qcow2\"", ""),
        diskimage("hung", "\"qcow2\"", ""),
        diskimage("frozen", "\"qcow2\"", "pause = true"),
    ]
    .concat();
    let cfg = site.config(0, "cleanup-interval = 0.0", &images);
    site.control(0, "fake-dib.hung.hang", "");
    let _b = Graceful(site.start(0, &["--build-workers", "2"]));
    let fedora = site.wait_builds("fedora", BuildState::Ready, 1).remove(0);
    let hung = site.wait_builds("hung", BuildState::Building, 1).remove(0);
    let stdout = |args: &[&str]| ops_ok(&cfg, args);

    // dib-image-delete: upstream's messages on stdout, exit 0.
    assert_eq!(
        stdout(&["dib-image-delete", "fedora-0123abcd"]),
        "Build fedora-0123abcd not found\n"
    );
    assert_eq!(
        stdout(&["dib-image-delete", "nodash"]),
        "Build nodash not found\n"
    );
    assert_eq!(
        stdout(&["dib-image-delete", &format!("hung-{}", hung.id)]),
        "Cannot delete a build in progress\n"
    );
    assert_eq!(site.builds("hung")[0].build.state, BuildState::Building);
    // Image names contain '-': the id is split at the last one.
    assert_eq!(
        stdout(&["dib-image-delete", &format!("fedora-{}", fedora.id)]),
        ""
    );
    let path = paths::image_build_path("fedora", &fedora.id);
    let (data, _) = site.zk.get_data(&path).unwrap().unwrap();
    let deleting = ImageBuild::from_json(&data).unwrap();
    assert_eq!(deleting.state, BuildState::Deleting);
    assert!(deleting.state_time > fedora.build.state_time);
    let expected = ImageBuild {
        state: BuildState::Deleting,
        state_time: deleting.state_time,
        ..fedora.build.clone()
    };
    assert_eq!(
        String::from_utf8(data).unwrap(),
        String::from_utf8(expected.to_json()).unwrap(),
        "every other field kept"
    );

    // image-delete.
    let delete = |upload: &str| {
        stdout(&[
            "image-delete",
            "--provider",
            "prov",
            "--image",
            "fedora",
            "--build-id",
            &fedora.id,
            "--upload-id",
            upload,
        ])
    };
    assert_eq!(delete("0000000001"), "Image upload not found\n");
    let uploading = add_upload(
        &site.zk,
        "fedora",
        &fedora.id,
        "prov",
        &ImageUpload::uploading(Some("zuul"), Some("auto"), None, now_epoch()),
    );
    assert_eq!(
        delete(&uploading),
        "Cannot delete because image upload in progress\n"
    );
    let ready = ready_upload(now_epoch() - 10.0, "ext-1", "fedora-1");
    let id = add_upload(&site.zk, "fedora", &fedora.id, "prov", &ready);
    assert_eq!(delete(&id), "");
    let (data, _) = site
        .zk
        .get_data(&paths::image_upload_path("fedora", &fedora.id, "prov", &id))
        .unwrap()
        .unwrap();
    let after = ImageUpload::from_json(&data).unwrap();
    assert!(after.state_time > ready.state_time, "a new state_time");
    let expected = ImageUpload {
        state: UploadState::Deleting,
        state_time: after.state_time,
        ..ready
    };
    assert_eq!(data, expected.to_json(), "external_id and the rest kept");

    // image-build refusals: upstream's words after our prefix, one line, exit 1, nothing written.
    let out = ops(&cfg, &["image-build", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "nodepool-builder: error: Trying to build a non disk-image-builder image: nope\n"
    );
    assert!(out.stdout.is_empty());
    assert!(
        site.zk
            .exists(&paths::image_path("nope"))
            .unwrap()
            .is_none()
    );
    let out = ops(&cfg, &["image-build", "frozen"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "nodepool-builder: error: Skipping build request for image frozen; paused\n"
    );
    assert!(!site.request_pending("frozen"));

    // image-pause of an image no builder has seen works; both commands are idempotent.
    assert!(
        site.zk
            .exists(&paths::image_path("newcomer"))
            .unwrap()
            .is_none()
    );
    for _ in 0..2 {
        assert_eq!(stdout(&["image-pause", "newcomer"]), "");
        assert!(
            site.zk
                .exists(&paths::image_pause_path("newcomer"))
                .unwrap()
                .is_some()
        );
    }
    for _ in 0..2 {
        assert_eq!(stdout(&["image-unpause", "newcomer"]), "");
        assert!(
            site.zk
                .exists(&paths::image_pause_path("newcomer"))
                .unwrap()
                .is_none()
        );
    }

    // Arguments that would address another znode; a config that does not load.
    let out = ops(&cfg, &["image-pause", "a/b"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("nodepool-builder: error: invalid image \"a/b\"")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
    let out = ops(&site.path("missing.toml"), &["image-status"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing.toml: cannot read config file"),
        "{}",
        describe(&out)
    );
}

#[test]
fn export_then_import_reproduces_the_tree_and_upload_ids_continue() {
    let site = TestSite::new("ops_export");
    let cfg = site.config(
        0,
        "cleanup-interval = 0.0",
        &diskimage("fedora", "\"qcow2\"", ""),
    );
    let b = Graceful(site.start(0, &[]));
    let build = site.wait_builds("fedora", BuildState::Ready, 1).remove(0);
    drop(b);
    ops_ok(&cfg, &["image-pause", "fedora"]);
    site.request_build("fedora");
    let now = now_epoch();
    let first = add_upload(
        &site.zk,
        "fedora",
        &build.id,
        "prov",
        &ready_upload(now - 20.0, "ext-1", "fedora-1"),
    );
    let second = add_upload(
        &site.zk,
        "fedora",
        &build.id,
        "prov",
        &ready_upload(now - 10.0, "ext-2", "fedora-2"),
    );
    let third = add_upload(
        &site.zk,
        "fedora",
        &build.id,
        "prov",
        &ImageUpload::bare_failed(now),
    );
    assert_eq!(
        [first.as_str(), second.as_str(), third.as_str()],
        ["0000000001", "0000000002", "0000000003"]
    );
    site.zk
        .delete(
            &paths::image_upload_path("fedora", &build.id, "prov", &second),
            None,
        )
        .unwrap();

    // A new file gets mode 0600; an existing longer one is replaced, not overwritten in part.
    let file = site.path("export.json");
    ops_ok(&cfg, &["export-image-data", file.to_str().unwrap()]);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let exported = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, "x".repeat(exported.len() * 2)).unwrap();
    ops_ok(&cfg, &["export-image-data", file.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), exported);
    let ours: BTreeMap<String, String> = serde_json::from_str(&exported).unwrap();
    let build_path = paths::image_build_path("fedora", &build.id);
    let expected_keys = [
        paths::image_pause_path("fedora"),
        build_path.clone(),
        paths::image_upload_path("fedora", &build.id, "prov", &first),
        paths::image_upload_path("fedora", &build.id, "prov", &third),
    ];
    assert_eq!(ours.keys().cloned().collect::<Vec<_>>(), {
        let mut k = expected_keys.to_vec();
        k.sort();
        k
    });
    assert!(
        exported.starts_with("{\"/nodepool/images/fedora/pause\": \"\", "),
        "Python's json.dump layout: {exported}"
    );

    // The same data as nodepool's own export.
    let python = NodepoolCli::new(
        &site,
        &site.chroot,
        &[DiskImage {
            name: "fedora",
            paused: false,
        }],
    );
    let theirs_file = site.path("export-python.json");
    python.run_ok(&["export-image-data", theirs_file.to_str().unwrap()]);
    let theirs: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(&theirs_file).unwrap()).unwrap();
    assert_eq!(ours, theirs);

    // Import into a fresh chroot.
    let target = site.server.chroot("ops_import_target");
    let target_cfg = site.path("import-target.toml");
    std::fs::write(
        &target_cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(&site.chroot, &target),
    )
    .unwrap();
    let empty = ops_ok(&target_cfg, &["image-list"]);
    assert_eq!(empty, python_empty_image_list(&site, &target));
    // A file with anything but image data is refused before anything is written.
    let bad = site.path("bad.json");
    std::fs::write(
        &bad,
        r#"{"/nodepool/images/fedora/pause": "", "/nodepool/nodes/0000000001": "{}"}"#,
    )
    .unwrap();
    let out = ops(&target_cfg, &["import-image-data", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().count(),
        1,
        "{}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("\"/nodepool/nodes/0000000001\" is not a pause flag, build or upload path")
    );

    ops_ok(&target_cfg, &["import-image-data", file.to_str().unwrap()]);
    let target_zk = Zk::connect(ZkConfig {
        chroot: Some(target.clone()),
        ..site.zk.config().clone()
    });
    assert!(target_zk.wait_connected(Duration::from_secs(30)));
    let source_tree = image_tree(&site.zk);
    let target_tree = image_tree(&target_zk);
    assert_eq!(
        source_tree.keys().collect::<Vec<_>>(),
        target_tree.keys().collect::<Vec<_>>(),
        "the same znodes, locks and requests aside"
    );
    assert_eq!(source_tree, target_tree, "the same data");

    // The next upload id continues past the imported ones.
    let next = add_upload(
        &target_zk,
        "fedora",
        &build.id,
        "prov",
        &ImageUpload::bare_failed(now_epoch()),
    );
    assert!(
        next.as_str() > third.as_str(),
        "next upload id {next} after importing {first} and {third}"
    );
    assert!(
        target_zk
            .exists(&paths::image_upload_path(
                "fedora", &build.id, "prov", &second
            ))
            .unwrap()
            .is_none()
    );
    target_zk.close();
}

/// The Python CLI's `image-list` on an empty chroot.
fn python_empty_image_list(site: &TestSite, chroot: &str) -> String {
    NodepoolCli::new(site, chroot, &[]).run_ok(&["image-list"])
}
