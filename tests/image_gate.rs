//! The image gate through the real binary: every built file is checked with `qemu-img`
//! (and an optional `validate-command`) before the build may be `ready`. A broken image
//! (truncated, mislabelled, refused by the site's own check, or a check that hangs) makes a
//! `failed` build with the reason in the log, loses its files at once, is never uploaded,
//! and backs off like a DIB failure. The test DIB writes the broken images on request
//! (`FAKE_DIB_CORRUPT`).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use nodepool_builder::model::{BuildState, UploadState};

use crate::util::builder::BuilderProcess;
use crate::util::site::{TestSite, WAIT};
use crate::util::{process_alive, wait_for};

/// `fedora` in qcow2 (and `extra` lines in its table), uploaded as qcow2 to the directory
/// cloud `cloud`.
fn fedora(site: &TestSite, extra: &str) -> String {
    format!(
        "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{{fake_dib}}\"\nformats = [\"qcow2\"]\n{extra}\n{}",
        site.provider("cloud", "qcow2", &["fedora"], "")
    )
}

/// An executable script in the site's directory.
fn script(site: &TestSite, name: &str, body: &str) -> PathBuf {
    let path = site.path(name);
    std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The build id of the first gate failure in the daemon log, once there is one; and the
/// line itself.
fn gate_failure(b: &mut BuilderProcess) -> (String, String) {
    b.wait_for_log(WAIT, "image gate failed");
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains("image gate failed"))
        .unwrap()
        .to_string();
    assert!(line.contains(" ERROR "), "an ERROR line: {line}");
    let id = line
        .split("image=fedora build=")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .unwrap_or_else(|| panic!("the line names the build: {line}"))
        .to_string();
    (id, log)
}

/// A refused build: no ready build, nothing uploaded, its local files gone, and the reason
/// in its build log.
fn assert_refused(site: &TestSite, id: &str, reason: &str) {
    assert!(site.builds_in("fedora", BuildState::Ready).is_empty());
    assert!(site.uploads("fedora").is_empty(), "never uploaded");
    assert!(
        site.cloud_images("cloud").is_empty(),
        "nothing in the cloud"
    );
    assert_eq!(
        site.local_files(0, "fedora", id),
        Vec::<String>::new(),
        "the refused build's files are removed at once"
    );
    let build_log = site.build_log(0, "fedora", id);
    assert!(
        build_log.contains("Image gate failed") && build_log.contains(reason),
        "{build_log}"
    );
}

#[test]
fn a_good_image_passes_the_gate_reaches_the_validate_command_and_is_uploaded() {
    let site = TestSite::new("gate_good");
    let args = site.path("validate.args");
    let validate = script(
        &site,
        "validate",
        &format!(
            "qemu-img info \"$2\" >/dev/null || exit 9\nprintf '%s\\n' \"$@\" > {}",
            args.display()
        ),
    );
    let extra = format!(
        "validate-command = [\"{}\", \"--format={{format}}\", \"{{file}}\", \"{{image_name}}\", \"{{build_id}}\"]",
        validate.display()
    );
    site.config(0, "", &fedora(&site, &extra));
    let b = site.start(0, &[]);
    let build = site.wait_builds("fedora", BuildState::Ready, 1).remove(0);
    site.wait_uploads("fedora", "cloud", UploadState::Ready, 1);
    let file = site
        .images_dir(0)
        .join(format!("fedora-{}.qcow2", build.id));
    assert_eq!(
        std::fs::read_to_string(&args).unwrap(),
        format!("--format=qcow2\n{}\nfedora\n{}\n", file.display(), build.id),
        "every placeholder reaches the command as one argument"
    );
    let log = b.log();
    assert!(!log.contains("image gate failed"), "{log}");
    assert!(
        log.contains(&format!(
            "image=fedora build={}: image gate passed in",
            build.id
        )),
        "{log}"
    );
}

#[test]
fn a_truncated_qcow2_fails_the_build_loses_its_files_and_is_never_uploaded() {
    let site = TestSite::new("gate_truncated");
    site.config(
        0,
        "",
        &fedora(
            &site,
            "[diskimages.env-vars]\nFAKE_DIB_CORRUPT = \"truncate\"",
        ),
    );
    let mut b = site.start(0, &[]);
    let (id, log) = gate_failure(&mut b);
    assert!(
        log.contains("qemu-img check found") && log.contains("corrupt"),
        "{log}"
    );
    assert_eq!(
        log.matches("exceeding the end of the file").count(),
        log.matches("nodepool.builder.BuildWorker.0:   ERROR: counting reference")
            .count(),
        "qemu-img's own words are in the log, once, in the ERROR line: {log}"
    );
    assert!(log.contains("exceeding the end of the file"), "{log}");
    assert_refused(&site, &id, "corrupt");
}

#[test]
fn raw_bytes_in_a_qcow2_file_fail_as_the_wrong_format_and_back_off() {
    let site = TestSite::new("gate_wrong_format");
    site.config(
        0,
        "",
        &fedora(
            &site,
            "[diskimages.env-vars]\nFAKE_DIB_CORRUPT = \"wrong-format\"",
        ),
    );
    let mut b = site.start(0, &[]);
    let (id, log) = gate_failure(&mut b);
    let expected = format!("fedora-{id}.qcow2 is raw, expected qcow2");
    assert!(log.contains(&expected), "{log}");
    assert_refused(&site, &id, "is raw, expected qcow2");
    // Backs off as a DIB failure does: 1 s, then 2 s (retry-backoff-initial = 1).
    b.wait_for_log(WAIT, "retrying in 2s (failure 2)");
    assert!(
        b.log().contains("retrying in 1s (failure 1)"),
        "{}",
        b.log()
    );
}

#[test]
fn a_validate_command_exiting_1_fails_the_build_with_its_output_in_the_log() {
    let site = TestSite::new("gate_validate_exit");
    let validate = script(
        &site,
        "validate",
        "echo \"booting $1\"\necho 'no login prompt within 300s' >&2\nexit 1",
    );
    let extra = format!(
        "validate-command = [\"{}\", \"{{file}}\"]",
        validate.display()
    );
    site.config(0, "", &fedora(&site, &extra));
    let mut b = site.start(0, &[]);
    let (id, log) = gate_failure(&mut b);
    assert!(
        log.contains(&format!(
            "validate-command failed on {} (exit code 1)",
            site.images_dir(0)
                .join(format!("fedora-{id}.qcow2"))
                .display()
        )),
        "{log}"
    );
    assert!(log.contains("no login prompt within 300s"), "{log}");
    assert!(log.contains("booting "), "stdout too: {log}");
    assert_refused(&site, &id, "no login prompt within 300s");
}

#[test]
fn a_validate_command_hanging_past_its_timeout_fails_and_its_process_group_is_gone() {
    let site = TestSite::new("gate_validate_hang");
    let pids = site.path("validate.pids");
    let validate = script(
        &site,
        "validate",
        &format!(
            "sleep 3600 &\nprintf '%s\\n%s\\n' $$ $! > {p}.tmp\nmv {p}.tmp {p}\necho 'waiting for the marker'\nwait",
            p = pids.display()
        ),
    );
    let extra = format!(
        "validate-command = [\"{}\", \"{{file}}\"]\nvalidate-timeout = 2",
        validate.display()
    );
    site.config(0, "", &fedora(&site, &extra));
    let mut b = site.start(0, &[]);
    let (id, log) = gate_failure(&mut b);
    assert!(log.contains("timed out after 2s"), "{log}");
    assert!(log.contains("waiting for the marker"), "{log}");
    assert_refused(&site, &id, "timed out after 2s");
    let pids: Vec<i32> = wait_for(WAIT, "the validate command's pids", || {
        std::fs::read_to_string(&pids).ok()
    })
    .lines()
    .map(|l| l.parse().unwrap())
    .collect();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        assert!(
            !process_alive(pid),
            "pid {pid} of the validate command's group still runs"
        );
    }
}

#[test]
fn image_gate_false_turns_the_qemu_img_checks_off() {
    let site = TestSite::new("gate_off");
    site.config(
        0,
        "image-gate = false",
        &fedora(
            &site,
            "[diskimages.env-vars]\nFAKE_DIB_CORRUPT = \"wrong-format\"",
        ),
    );
    let b = site.start(0, &[]);
    site.wait_builds("fedora", BuildState::Ready, 1);
    assert!(!b.log().contains("image gate failed"), "{}", b.log());
}

/// statsd counts a refused build as failed: DIB exited 0, but the `rc` gauge is 1.
#[test]
fn a_refused_build_counts_as_failed_in_statsd() {
    let site = TestSite::new("gate_statsd");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let port = sock.local_addr().unwrap().port().to_string();
    let cfg = site.config(
        0,
        "",
        &fedora(
            &site,
            "[diskimages.env-vars]\nFAKE_DIB_CORRUPT = \"truncate\"",
        ),
    );
    let mut b = BuilderProcess::start(
        &["-d", "-c", cfg.to_str().unwrap()],
        &[("STATSD_HOST", "127.0.0.1"), ("STATSD_PORT", &port)],
        &site.path("builder0.log"),
    );
    gate_failure(&mut b);
    let key = "nodepool.dib_image_build.fedora.status.rc:";
    let mut buf = [0u8; 65536];
    let rc = wait_for(WAIT, "the build's rc gauge", || {
        let n = sock.recv(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .find_map(|l| l.strip_prefix(key).map(str::to_string))
    });
    assert_eq!(rc, "1|g");
}
