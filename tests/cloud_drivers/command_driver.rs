//! The command driver (`provider::command`) called directly, with shell-script "clouds"
//! (`tests/fixtures/glance/fake-cloud-*.sh`): uploads and deletes with arguments passed
//! verbatim, the list command, failures carrying the exit status and stderr, and timeouts
//! that stop the whole process group.

use std::path::Path;
use std::time::{Duration, Instant};

use nodepool_builder::config::{Driver, Provider};
use nodepool_builder::provider::{ErrorKind, for_provider};

use crate::util::glance::{fixtures_dir, write_random};
use crate::util::{process_alive, repo_root, test_dir, wait_until};

use super::request;

fn command_provider(name: &str, mode: &str, store: &Path) -> Provider {
    let upload = fixtures_dir().join("fake-cloud-upload.sh");
    let delete = fixtures_dir().join("fake-cloud-delete.sh");
    Provider {
        name: name.to_string(),
        driver: Driver::Command {
            upload_command: vec![
                "/bin/sh".into(),
                upload.to_string_lossy().into_owned(),
                mode.into(),
                store.to_string_lossy().into_owned(),
                "{file}".into(),
                "{external_name}".into(),
            ],
            delete_command: vec![
                "/bin/sh".into(),
                delete.to_string_lossy().into_owned(),
                store.to_string_lossy().into_owned(),
                "{external_id}".into(),
            ],
            list_command: None,
            image_format: "raw".into(),
        },
        rate: 1.0,
        image_name_format: "{image_name}-{timestamp}".into(),
        image_upload_timeout: 60,
        post_upload_hook: None,
        diskimages: Vec::new(),
    }
}

#[test]
fn command_driver_uploads_and_deletes() {
    let dir = test_dir("command-ok");
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    // A file name with a space and a quote: arguments are never split or interpreted.
    let file = dir.path().join("my image's.raw");
    write_random(&file, 1 << 20);
    let driver = for_provider(&command_provider("cmd", "ok", &store), None).unwrap();
    assert_eq!(driver.image_format(), "raw");
    let mut req = request("cmd", &file, "raw");
    req.properties
        .insert("os.distro-name".into(), "debian".into());
    let uploaded = driver.upload(&req).unwrap_or_else(|e| panic!("{e}"));
    assert!(uploaded.external_id.starts_with("fake-"), "{uploaded:?}");
    let copied = store.join(&uploaded.external_id);
    assert_eq!(
        std::fs::read(&copied).unwrap(),
        std::fs::read(&file).unwrap()
    );
    let env = std::fs::read_to_string(store.join(format!("{}.env", uploaded.external_id))).unwrap();
    for line in [
        format!("NODEPOOL_FILE={}", file.display()),
        "NODEPOOL_FORMAT=raw".to_string(),
        "NODEPOOL_IMAGE_NAME=debian".to_string(),
        format!("NODEPOOL_BUILD_ID={}", req.build_id),
        "NODEPOOL_UPLOAD_ID=0000000001".to_string(),
        format!("NODEPOOL_EXTERNAL_NAME={}", req.external_name),
        "NODEPOOL_PROVIDER=cmd".to_string(),
        "NODEPOOL_META_DISTRO=debian bookworm".to_string(),
        "NODEPOOL_META_OS_DISTRO_NAME=debian".to_string(),
        format!("NODEPOOL_META_NODEPOOL_BUILD_ID={}", req.build_id),
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "missing {line:?} in:\n{env}"
        );
    }
    assert!(driver.list_images().unwrap().is_empty());
    driver.delete(&uploaded.external_id).unwrap();
    assert!(!copied.exists());
    let deleted = std::fs::read_to_string(store.join("deleted")).unwrap();
    assert_eq!(deleted, format!("{0} {0} cmd\n", uploaded.external_id));
}

#[test]
fn command_driver_lists_what_its_list_command_prints() {
    let dir = test_dir("command-list");
    let cloud = dir.path().join("cloud");
    let file = dir.path().join("x.raw");
    write_random(&file, 4096);
    let dir_cloud = repo_root().join("etc/quickstart/dir-cloud");
    let template = |args: &[&str]| -> Vec<String> {
        let mut argv = vec![dir_cloud.to_string_lossy().into_owned()];
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    };
    let cloud_arg = cloud.to_string_lossy().into_owned();
    let with_list = |list_command: Vec<String>| Driver::Command {
        upload_command: template(&["upload", &cloud_arg, "{file}", "{external_name}"]),
        delete_command: template(&["delete", &cloud_arg, "{external_id}"]),
        list_command: Some(list_command),
        image_format: "raw".into(),
    };
    let mut provider = command_provider("cmd-list", "ok", dir.path());
    provider.driver = with_list(template(&["list", &cloud_arg]));
    let driver = for_provider(&provider, None).unwrap();
    assert!(driver.list_images().unwrap().is_empty(), "an empty cloud");
    let req = request("cmd-list", &file, "raw");
    let uploaded = driver.upload(&req).unwrap_or_else(|e| panic!("{e}"));
    let listed = driver.list_images().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, uploaded.external_id);
    assert_eq!(listed[0].name, req.external_name);
    let prop = |k: &str| listed[0].properties.get(k).map(String::as_str);
    assert_eq!(prop("nodepool_build_id"), Some(req.build_id.as_str()));
    assert_eq!(prop("nodepool_upload_id"), Some("0000000001"));
    assert_eq!(prop("nodepool_provider_name"), Some("cmd-list"));

    // A listing that fails, or prints anything but image lines, or too much, is an error
    // (and the janitor deletes nothing on an error).
    std::fs::write(cloud.join("fail-list"), "").unwrap();
    let err = driver.list_images().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Command, "{err}");
    assert!(err.message.contains("list refused"), "{err}");
    for (argv, want) in [
        (
            vec!["/bin/echo", "abc"],
            "line 1: expected `ID BUILD_ID UPLOAD_ID [NAME]`",
        ),
        (
            vec!["/bin/echo", "abc not-an-id 0000000001"],
            "are not a nodepool build id",
        ),
        (
            vec![
                "/bin/sh",
                "-c",
                "yes 'x 00ff 0000000001' | head -c 17000000",
            ],
            "printed more than 16777216 bytes",
        ),
    ] {
        provider.driver = with_list(argv.iter().map(|a| a.to_string()).collect());
        let err = for_provider(&provider, None)
            .unwrap()
            .list_images()
            .unwrap_err();
        assert!(err.message.contains(want), "{argv:?}: {err}");
    }
    // Its template knows only {provider}.
    provider.driver = with_list(template(&["list", "{external_id}"]));
    let err = for_provider(&provider, None).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Config, "{err}");
    assert!(err.message.contains("list-command"), "{err}");
}

#[test]
fn command_driver_failure_carries_exit_status_and_stderr() {
    let dir = test_dir("command-fail");
    let file = dir.path().join("x.raw");
    write_random(&file, 1024);
    let driver = for_provider(&command_provider("cmd-fail", "fail", dir.path()), None).unwrap();
    let req = request("cmd-fail", &file, "raw");
    let err = driver.upload(&req).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Command, "{err}");
    assert!(err.message.contains("exit status 3"), "{err}");
    assert!(
        err.message
            .contains("first complaint | quota exceeded for debian-"),
        "{err}"
    );
    assert!(err.message.contains("cmd-fail"), "{err}");
    assert!(!err.message.contains('\n'), "{err}");

    let driver = for_provider(&command_provider("cmd-silent", "silent", dir.path()), None).unwrap();
    let err = driver.upload(&req).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Command, "{err}");
    assert!(
        err.message.contains("no image id") && err.message.contains("nothing to say"),
        "{err}"
    );

    let mut provider = command_provider("cmd-bad", "ok", dir.path());
    if let Driver::Command { upload_command, .. } = &mut provider.driver {
        upload_command.push("{image_path}".into());
    }
    let err = for_provider(&provider, None).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Config, "{err}");
    assert!(err.message.contains("{image_path}"), "{err}");

    let mut provider = command_provider("cmd-missing", "ok", dir.path());
    if let Driver::Command { upload_command, .. } = &mut provider.driver {
        upload_command[0] = dir
            .path()
            .join("no-such-program")
            .to_string_lossy()
            .into_owned();
    }
    let err = for_provider(&provider, None)
        .unwrap()
        .upload(&req)
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Command, "{err}");
    assert!(err.message.contains("no-such-program"), "{err}");
}

#[test]
fn command_driver_timeout_stops_a_command_that_never_stops_writing() {
    let dir = test_dir("command-flood");
    let file = dir.path().join("x.raw");
    write_random(&file, 1024);
    let mut provider = command_provider("cmd-flood", "ok", dir.path());
    if let Driver::Command { upload_command, .. } = &mut provider.driver {
        *upload_command = vec!["yes".into(), "{external_name}".into()];
    }
    let driver = for_provider(&provider, None).unwrap();
    let mut req = request("cmd-flood", &file, "raw");
    req.timeout = Duration::from_secs(1);
    let started = Instant::now();
    let err = driver.upload(&req).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Timeout, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn command_driver_timeout_kills_the_process_group() {
    let dir = test_dir("command-hang");
    let file = dir.path().join("x.raw");
    write_random(&file, 1024);
    let driver = for_provider(&command_provider("cmd-hang", "hang", dir.path()), None).unwrap();
    let mut req = request("cmd-hang", &file, "raw");
    req.timeout = Duration::from_secs(2);
    let started = Instant::now();
    let err = driver.upload(&req).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Timeout, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    let read_pid = |name: &str| -> i32 {
        let text = std::fs::read_to_string(dir.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        text.trim().parse().unwrap()
    };
    let (pid, child) = (read_pid("pid"), read_pid("child-pid"));
    wait_until(
        Duration::from_secs(10),
        "the command and its child to be gone",
        || !process_alive(pid) && !process_alive(child),
    );
}
