//! The upload pipeline through the real binary with the command driver and a directory
//! "cloud" (`etc/quickstart/dir-cloud`): the upload-side upstream tests of the wire spec §7
//! that do not need Glance, plus retries without record pile-up and hook failures without
//! leaks.

use std::time::Duration;

use nodepool_builder::model::{BuildState, UploadState};
use nodepool_builder::zk::paths;

use crate::util::site::{TestSite, WAIT};
use crate::util::wait_until;

fn image(name: &str, formats: &str) -> String {
    format!(
        "\n[[diskimages]]\nname = \"{name}\"\ndib-cmd = \"{{fake_dib}}\"\nformats = [{formats}]\n"
    )
}

#[test]
fn one_build_uploads_vhd_and_qcow2_to_two_providers() {
    let site = TestSite::new("two_providers");
    let body = format!(
        "{}{}{}",
        image("fedora", ""),
        site.provider("vhd-cloud", "vhd", &["fedora"], ""),
        site.provider(
            "qcow-cloud",
            "qcow2",
            &["fedora"],
            "image-name-format = \"{image_name}-{upload_id}\""
        )
    );
    site.config(0, "", &body);
    let mut b = site.start(0, &[]);
    let build = site.wait_builds("fedora", BuildState::Ready, 1).remove(0);
    assert_eq!(build.build.formats, vec!["qcow2", "vhd"]);
    let vhd = site
        .wait_uploads("fedora", "vhd-cloud", UploadState::Ready, 1)
        .remove(0)
        .1;
    let qcow = site
        .wait_uploads("fedora", "qcow-cloud", UploadState::Ready, 1)
        .remove(0)
        .1;
    assert_eq!(vhd.upload.format.as_deref(), Some("vhd"));
    assert_eq!(qcow.upload.format.as_deref(), Some("qcow2"));
    assert_eq!(
        vhd.id, "0000000001",
        "the first upload id, as upstream (the lock dir takes 0)"
    );
    assert_eq!(
        qcow.upload.external_name.as_deref(),
        Some(format!("fedora-{}", qcow.id).as_str())
    );
    let vname = vhd.upload.external_name.clone().unwrap();
    let ts: u64 = vname
        .strip_prefix("fedora-")
        .unwrap()
        .parse()
        .expect("default name {image_name}-{timestamp}");
    assert!(ts > 1_700_000_000);
    assert_eq!(vhd.upload.username.as_deref(), Some("zuul"));
    assert_eq!(vhd.upload.python_path.as_deref(), Some("auto"));
    // The cloud holds exactly these images, tagged for the launcher's leak detection.
    let ext = vhd.upload.external_id.clone().unwrap();
    assert_eq!(site.cloud_images("vhd-cloud"), vec![ext.clone()]);
    let props = site.cloud_properties("vhd-cloud", &ext);
    assert!(
        props.contains(&format!("NODEPOOL_META_NODEPOOL_BUILD_ID={}", build.id)),
        "{props}"
    );
    assert!(
        props.contains("NODEPOOL_META_NODEPOOL_UPLOAD_ID=0000000001"),
        "{props}"
    );
    assert!(
        props.contains("NODEPOOL_META_NODEPOOL_PROVIDER_NAME=vhd-cloud"),
        "{props}"
    );
    let copied = site
        .cloud_dir("vhd-cloud")
        .join(&ext)
        .join(format!("{vname}.vhd"));
    assert_eq!(
        std::fs::read(&copied).unwrap(),
        std::fs::read(site.images_dir(0).join(format!("fedora-{}.vhd", build.id))).unwrap(),
        "the cloud got the vhd file"
    );
    b.wait_for_log(
        WAIT,
        &format!(
            "Image build fedora-{} (external_id {ext}) in vhd-cloud is ready",
            build.id
        ),
    );
    site.assert_no_leaks(&["vhd-cloud", "qcow-cloud"], &[0]);
}

#[test]
fn a_failing_provider_does_not_block_the_other_and_failures_do_not_pile_up() {
    let site = TestSite::new("failing_provider");
    std::fs::create_dir_all(site.cloud_dir("bad")).unwrap();
    std::fs::write(site.cloud_dir("bad").join("fail-upload"), "").unwrap();
    let body = format!(
        "{}{}{}",
        image("fedora", ""),
        site.provider("bad", "raw", &["fedora"], ""),
        site.provider("good", "raw", &["fedora"], "")
    );
    site.config(0, "", &body);
    let mut b = site.start(0, &[]);
    site.wait_uploads("fedora", "good", UploadState::Ready, 1);
    b.wait_for_log(WAIT, "provider=bad upload=");
    b.wait_for_log(WAIT, "(failure 3)");
    let log = b.log();
    assert!(log.contains("Failed to upload build"), "{log}");
    assert!(
        log.contains("upload refused (fail-upload present)"),
        "the command's stderr reaches the log: {log}"
    );
    assert!(
        site.uploads_in("fedora", "bad", UploadState::Failed).len() <= 1,
        "failed records of retries do not pile up"
    );
    assert!(site.cloud_images("bad").is_empty());
    std::fs::remove_file(site.cloud_dir("bad").join("fail-upload")).unwrap();
    site.wait_uploads("fedora", "bad", UploadState::Ready, 1);
    site.wait("the last failed record to be removed", || {
        site.uploads_in("fedora", "bad", UploadState::Failed)
            .is_empty()
            .then_some(())
    });
    assert_eq!(
        site.uploads_in("fedora", "good", UploadState::Ready).len(),
        1,
        "exactly one ready upload per provider"
    );
    site.assert_no_leaks(&["bad", "good"], &[0]);
}

#[test]
fn provider_pause_holds_uploads_of_that_image_only() {
    let site = TestSite::new("upload_pause");
    let mut body = format!("{}{}", image("held", ""), image("free", ""));
    body.push_str(
        &site
            .provider("cloud", "qcow2", &[], "")
            .replace("\n[[providers.diskimages]]", ""),
    );
    body.push_str("[[providers.diskimages]]\nname = \"held\"\npause = true\n[[providers.diskimages]]\nname = \"free\"\n");
    site.config(0, "", &body);
    let _b = site.start(0, &[]);
    site.wait_builds("held", BuildState::Ready, 1);
    site.wait_uploads("free", "cloud", UploadState::Ready, 1);
    site.request_build("free");
    site.wait_uploads("free", "cloud", UploadState::Ready, 2);
    assert!(
        site.uploads("held").is_empty(),
        "paused for this provider: built, not uploaded"
    );
}

#[test]
fn post_upload_hook_runs_and_its_failure_deletes_the_cloud_image() {
    let site = TestSite::new("post_upload_hook");
    let hook = site.path("hook");
    std::fs::write(&hook, "#!/bin/sh\necho \"hook $1 $2 $3\"\n[ -e \"$(dirname \"$3\")/hook-fails\" ] && { echo broken >&2; exit 3; }\ntouch \"$3.post\"\n").unwrap();
    std::process::Command::new("chmod")
        .args(["+x", hook.to_str().unwrap()])
        .status()
        .unwrap();
    let body = format!(
        "{}{}",
        image("fedora", ""),
        site.provider(
            "cloud",
            "raw",
            &["fedora"],
            &format!("post-upload-hook = \"{}\"", hook.display())
        )
    );
    site.config(0, "", &body);
    let mut b = site.start(0, &[]);
    let (build, up) = site
        .wait_uploads("fedora", "cloud", UploadState::Ready, 1)
        .remove(0);
    assert!(
        site.images_dir(0)
            .join(format!("fedora-{build}.raw.post"))
            .exists(),
        "the hook got the local file name"
    );
    b.wait_for_log(
        WAIT,
        &format!("hook cloud {}", up.upload.external_id.unwrap()),
    );

    site.control(0, "hook-fails", "");
    site.request_build("fedora");
    b.wait_for_log(WAIT, "post-upload hook");
    site.wait("a failed upload for the new build", || {
        site.builds("fedora")
            .iter()
            .any(|x| {
                x.id != build
                    && x.uploads
                        .iter()
                        .any(|u| u.upload.state == UploadState::Failed)
            })
            .then_some(())
    });
    assert_eq!(
        site.cloud_images("cloud").len(),
        1,
        "the hook's cloud image was deleted, only the first remains"
    );
    site.assert_no_leaks(&["cloud"], &[0]);
}

#[test]
fn image_delete_of_the_only_upload_leads_to_a_reupload() {
    let site = TestSite::new("reupload");
    let body = format!(
        "{}{}",
        image("fedora", ""),
        site.provider("cloud", "qcow2", &["fedora"], "")
    );
    site.config(0, "", &body);
    let _b = site.start(0, &[]);
    let (build, up) = site
        .wait_uploads("fedora", "cloud", UploadState::Ready, 1)
        .remove(0);
    // What `nodepool image-delete` does: set the upload to deleting, without a lock.
    let path = paths::image_upload_path("fedora", &build, "cloud", &up.id);
    let mut rec = up.upload.clone();
    rec.state = UploadState::Deleting;
    site.zk.set_data(&path, &rec.to_json(), None).unwrap();
    let again = site.wait("a new ready upload", || {
        site.uploads_in("fedora", "cloud", UploadState::Ready)
            .into_iter()
            .find(|(_, u)| u.id != up.id)
    });
    assert!(again.1.id > up.id, "a new upload id");
    site.wait("the deleted upload's record to go", || {
        site.zk.exists(&path).unwrap().is_none().then_some(())
    });
    wait_until(WAIT, "the deleted upload's cloud image to go", || {
        site.cloud_images("cloud") == vec![again.1.upload.external_id.clone().unwrap()]
    });
    site.assert_no_leaks(&["cloud"], &[0]);
}

#[test]
fn uploads_start_as_soon_as_the_build_is_ready() {
    // Twenty images × three providers from an empty tree: everything ends ready, nothing twice.
    let site = TestSite::new("burst");
    let names: Vec<String> = (0..20).map(|i| format!("img{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut body: String = names.iter().map(|n| image(n, "")).collect();
    for p in ["p1", "p2", "p3"] {
        body.push_str(&site.provider(p, "raw", &refs, ""));
    }
    site.config(0, "", &body);
    let _b = site.start(0, &["--build-workers", "2", "--upload-workers", "8"]);
    site.wait("60 ready uploads", || {
        let n: usize = names
            .iter()
            .map(|n| {
                site.uploads(n)
                    .iter()
                    .filter(|(_, u)| u.upload.state == UploadState::Ready)
                    .count()
            })
            .sum();
        (n == 60).then_some(())
    });
    for n in &names {
        for p in ["p1", "p2", "p3"] {
            assert_eq!(
                site.uploads_in(n, p, UploadState::Ready).len(),
                1,
                "{n} {p}"
            );
        }
    }
    for p in ["p1", "p2", "p3"] {
        assert_eq!(site.cloud_images(p).len(), 20);
    }
    site.assert_no_leaks(&["p1", "p2", "p3"], &[0]);
}

#[test]
fn sigterm_during_an_upload_stops_within_the_grace_and_the_upload_is_redone_once() {
    use nix::sys::signal::Signal;
    let site = TestSite::new("sigterm_upload");
    std::fs::create_dir_all(site.cloud_dir("cloud")).unwrap();
    std::fs::write(site.cloud_dir("cloud").join("slow-upload"), "300").unwrap();
    site.fedora_on_cloud(0, "cleanup-interval = 1.0");
    let mut b = site.start(0, &[]);
    let (build, _) = site
        .wait_uploads("fedora", "cloud", UploadState::Uploading, 1)
        .remove(0);
    let cloud = site.cloud_dir("cloud").display().to_string();
    let uploader = || {
        let out = std::process::Command::new("pgrep")
            .args(["-f", &format!("dir-cloud upload {cloud}")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .collect::<Vec<_>>()
    };
    wait_until(WAIT, "the upload command to run", || !uploader().is_empty());
    let started = std::time::Instant::now();
    b.signal(Signal::SIGTERM);
    let status = b.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", b.log());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "stopped within the upload grace period: {:?}",
        started.elapsed()
    );
    wait_until(
        Duration::from_secs(10),
        "the upload command to die with the builder",
        || uploader().is_empty(),
    );
    assert!(
        site.cloud_images("cloud").is_empty(),
        "no cloud image from the interrupted upload"
    );
    assert!(
        !nodepool_builder::zk::lock::is_locked(
            &site.zk,
            &paths::image_upload_lock_path("fedora", &build, "cloud")
        )
        .unwrap(),
        "the upload lock went with the session"
    );
    // Restarted, the builder removes the orphaned uploading record and uploads once.
    std::fs::remove_file(site.cloud_dir("cloud").join("slow-upload")).unwrap();
    let _b = site.start(0, &[]);
    site.wait_uploads("fedora", "cloud", UploadState::Ready, 1);
    site.wait("the orphaned uploading record to go", || {
        site.uploads_in("fedora", "cloud", UploadState::Uploading)
            .is_empty()
            .then_some(())
    });
    assert_eq!(site.cloud_images("cloud").len(), 1);
    site.assert_no_leaks(&["cloud"], &[0]);
}

/// Writes an executable upload script into the site's directory and returns the config body:
/// the `fedora` diskimage, and a command provider `cloud` (raw) whose upload command is the
/// script (called with `{file}`), whose delete command is `true`, with `extra` added to it.
fn scripted_upload(site: &TestSite, script: &str, extra: &str) -> String {
    let path = site.path("upload-script");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    format!(
        "{}\n[[providers]]\nname = \"cloud\"\ndriver = \"command\"\nimage-format = \"raw\"\n\
         upload-command = [\"{}\", \"{{file}}\"]\ndelete-command = [\"true\"]\n{extra}\n\
         [[providers.diskimages]]\nname = \"fedora\"\n",
        image("fedora", ""),
        path.display()
    )
}

/// Waits for the first upload of `fedora` to `cloud` that is `ready` or `failed`.
fn first_finished_upload(site: &TestSite) -> (String, nodepool_builder::zk::tree::UploadInfo) {
    site.wait("an upload of fedora to end ready or failed", || {
        site.uploads("fedora").into_iter().find(|(_, u)| {
            u.provider == "cloud"
                && matches!(u.upload.state, UploadState::Ready | UploadState::Failed)
        })
    })
}

#[test]
fn an_upload_id_that_is_not_one_printable_token_fails_the_upload_with_the_output_quoted() {
    let site = TestSite::new("bad_upload_id");
    let body = scripted_upload(
        &site,
        "#!/bin/sh\necho \"copying $1\"\necho 'image 42 (pending)'\necho 'a warning' >&2\n",
        "",
    );
    site.config(0, "", &body);
    let mut b = site.start(0, &[]);
    let (_, upload) = first_finished_upload(&site);
    assert_eq!(
        upload.upload.state,
        UploadState::Failed,
        "an id with spaces is no image id: {:?}\n{}",
        upload.upload,
        site.dump()
    );
    b.wait_for_log(WAIT, "Failed to upload build");
    let log = b.log();
    assert!(
        log.contains("\"image 42 (pending)\""),
        "the error quotes the id line: {log}"
    );
    assert!(
        log.contains("copying ") && log.contains("a warning"),
        "the error quotes the command's stdout and stderr: {log}"
    );
}

#[test]
fn a_timed_out_upload_command_gets_sigterm_for_its_whole_group_before_sigkill() {
    let site = TestSite::new("upload_timeout_term");
    let terms = site.path("terms");
    // The command and a child of it both note SIGTERM and exit; SIGKILL would leave no note.
    let script = format!(
        "#!/bin/sh\n\
         sh -c 'trap \"echo child >> {t}; exit 0\" TERM; while :; do sleep 0.1; done' &\n\
         trap 'echo leader >> {t}; exit 1' TERM\n\
         while :; do sleep 0.1; done\n",
        t = terms.display()
    );
    let body = scripted_upload(&site, &script, "image-upload-timeout = 2");
    site.config(0, "", &body);
    let mut b = site.start(0, &[]);
    let (_, upload) = first_finished_upload(&site);
    assert_eq!(upload.upload.state, UploadState::Failed, "{}", site.dump());
    b.wait_for_log(WAIT, "Failed to upload build");
    let noted = std::fs::read_to_string(&terms).unwrap_or_default();
    assert!(
        noted.lines().any(|l| l == "leader") && noted.lines().any(|l| l == "child"),
        "both the command and its child got SIGTERM first: {noted:?}\n{}",
        b.log()
    );
    assert!(b.log().contains("did not finish within"), "{}", b.log());
}

/// Kills a process when dropped, so a failing test leaves no stray `sleep` behind.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[test]
fn processes_an_upload_command_leaves_in_its_group_are_killed_when_it_exits() {
    let site = TestSite::new("upload_leftovers");
    let pid_file = site.path("leftover.pid");
    let script = format!(
        "#!/bin/sh\nsleep 120 >/dev/null 2>&1 &\necho $! > {}\necho image-1\n",
        pid_file.display()
    );
    let body = scripted_upload(&site, &script, "");
    site.config(0, "", &body);
    let _b = site.start(0, &[]);
    let (_, upload) = first_finished_upload(&site);
    assert_eq!(upload.upload.state, UploadState::Ready, "{}", site.dump());
    assert_eq!(upload.upload.external_id.as_deref(), Some("image-1"));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _guard = KillOnDrop(pid);
    wait_until(
        Duration::from_secs(10),
        "the sleep the upload command left behind to be killed",
        || !crate::util::process_alive(pid),
    );
}

#[test]
fn a_builder_running_as_pid_1_of_a_pid_namespace_uploads() {
    // As in a container: the daemon is PID 1, so its commands' parent is PID 1 too.
    let site = TestSite::new("pid_1_uploads");
    site.fedora_on_cloud(0, "");
    let b = site.start_wrapped(
        0,
        &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
        &[],
        &[],
    );
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", b.pid()))
        .unwrap_or_default();
    let daemon = children.split_whitespace().next().expect("unshare's child");
    let status = std::fs::read_to_string(format!("/proc/{daemon}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")),
        "the builder is PID 1 in its namespace:\n{status}"
    );
    let (_, upload) = first_finished_upload(&site);
    assert_eq!(
        upload.upload.state,
        UploadState::Ready,
        "{}\n{}",
        site.dump(),
        b.log()
    );
    assert_eq!(site.cloud_images("cloud").len(), 1);
}

#[test]
fn stopping_the_builder_stops_every_process_of_a_running_upload_command() {
    // An upload command that is a wrapper script: the real upload is its child. Were only
    // the script killed, the child would go on and create a cloud image nobody records.
    use nix::sys::signal::Signal;
    let site = TestSite::new("stop_upload_group");
    let pid_file = site.path("child.pid");
    let script = format!(
        "#!/bin/sh\nsleep 300 &\necho $! > {}\nwait\necho image-1\n",
        pid_file.display()
    );
    let body = scripted_upload(&site, &script, "");
    site.config(0, "", &body);
    let mut b = site.start(0, &[]);
    let child: i32 = site.wait("the upload command's child to start", || {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    });
    let _guard = KillOnDrop(child);
    b.signal(Signal::SIGTERM);
    let status = b.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", b.log());
    wait_until(
        Duration::from_secs(10),
        "the upload command's child to die with the builder",
        || !crate::util::process_alive(child),
    );
}
