//! `tests/fixtures/fake-dib`, the stand-in for diskimage-builder, run through
//! `command::spawn` the way the builder runs DIB: real images from qemu-img, checksum
//! files, the manifest directory, argument and environment checks, and the control files.
//! Every build test in `builds` (and most upload tests) relies on it behaving like
//! `disk-image-create`; the real one is in [`super::real`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crossbeam_channel::never;
use nodepool_builder::command::{self, Outcome, Spec, shell_split};

use crate::util::{process_alive, repo_root, test_dir, wait_until};

fn fake_dib() -> PathBuf {
    repo_root().join("tests/fixtures/fake-dib")
}

/// One fake build of `image` into `images`, set up as the builder sets up a DIB run.
struct Build {
    images: PathBuf,
    image: String,
    base: PathBuf,
    log: PathBuf,
    spec: Spec,
}

impl Build {
    /// The command line nodepool builds (§1.4), split with shell rules, and its environment.
    fn new(images: &Path, image: &str, formats: &str, elements: &str) -> Build {
        let base = images.join(format!("{image}-0000000001"));
        let mut line = format!(
            "{} -x -t {formats} --checksum --no-tmpfs",
            fake_dib().display()
        );
        if formats.contains("qcow2") {
            line.push_str(" --qemu-img-options 'compat=0.10'");
        }
        line.push_str(&format!(" -o {} {elements}", base.display()));
        let mut words = shell_split(&line).unwrap();
        let program = words.remove(0);
        let log = images.join(format!("logs/{image}-0000000001.log"));
        let mut spec = Spec::new(program, words);
        spec.env = vec![
            ("DIB_RELEASE".into(), String::new()),
            ("DIB_IMAGE_NAME".into(), image.into()),
            ("DIB_IMAGE_FILENAME".into(), base.display().to_string()),
        ];
        spec.output = nodepool_builder::command::Output::Log(log.clone());
        spec.timeout = Some(Duration::from_secs(60));
        spec.grace = Duration::from_secs(5);
        Build {
            images: images.to_path_buf(),
            image: image.to_string(),
            base,
            log,
            spec,
        }
    }

    fn env(mut self, key: &str, value: &str) -> Build {
        self.spec.env.push((key.into(), value.into()));
        self
    }

    fn without_env(mut self, key: &str) -> Build {
        self.spec.env.retain(|(k, _)| k != key);
        self
    }

    fn run(&self) -> Outcome {
        command::spawn(self.spec.clone())
            .unwrap_or_else(|e| panic!("{e}"))
            .wait(&never())
            .unwrap()
    }

    fn file(&self, suffix: &str) -> PathBuf {
        PathBuf::from(format!("{}{suffix}", self.base.display()))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.log.display()))
    }

    fn control(&self, name: &str) -> PathBuf {
        self.images.join(name)
    }

    fn done(&self) -> bool {
        self.images
            .join(format!("fake-dib.{}.done", self.image))
            .exists()
    }

    /// The names in the images directory that start with the build's base name.
    fn outputs(&self) -> Vec<String> {
        let prefix = self.base.file_name().unwrap().to_str().unwrap().to_string();
        let mut names: Vec<String> = std::fs::read_dir(&self.images)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .map(|n| n[prefix.len()..].to_string())
            .collect();
        names.sort();
        names
    }
}

/// `qemu-img info --output=json` of a file.
fn qemu_info(path: &Path) -> serde_json::Value {
    let output = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .expect("run qemu-img");
    assert!(
        output.status.success(),
        "qemu-img info {}: {output:?}",
        path.display()
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Runs `tool -c <file>` in `dir` and asserts it succeeds.
fn verify_checksum(tool: &str, dir: &Path, file: &str) {
    let output = Command::new(tool)
        .args(["-c", file])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{tool} -c {file}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn two_formats_give_real_images_checksums_and_a_manifest() {
    let dir = test_dir("fake-dib-formats");
    let build = Build::new(
        dir.path(),
        "ubuntu-noble",
        "qcow2,vhd",
        "ubuntu-minimal vm simple-init",
    );
    let started = Instant::now();
    assert_eq!(build.run(), Outcome::Exited(0), "{}", build.log_text());
    let elapsed = started.elapsed();
    // Well under a second on an idle machine; generous here for a busy one.
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");

    assert_eq!(
        build.outputs(),
        [
            ".d",
            ".qcow2",
            ".qcow2.md5",
            ".qcow2.sha256",
            ".vhd",
            ".vhd.md5",
            ".vhd.sha256"
        ]
    );
    let qcow2 = qemu_info(&build.file(".qcow2"));
    assert_eq!(qcow2["format"], "qcow2");
    assert_eq!(qcow2["virtual-size"], 1024 * 1024);
    let vhd = qemu_info(&build.file(".vhd"));
    assert_eq!(vhd["format"], "vpc");
    assert_eq!(
        vhd["virtual-size"],
        1024 * 1024,
        "force_size=on keeps the size exact"
    );
    for ext in ["qcow2", "vhd"] {
        let name = format!("ubuntu-noble-0000000001.{ext}");
        let md5 = std::fs::read_to_string(build.file(&format!(".{ext}.md5"))).unwrap();
        let (hash, file) = md5.trim_end().split_once("  ").unwrap();
        assert_eq!((hash.len(), file), (32, name.as_str()), "{md5:?}");
        verify_checksum("md5sum", dir.path(), &format!("{name}.md5"));
        verify_checksum("sha256sum", dir.path(), &format!("{name}.sha256"));
    }
    assert!(build.file(".d").is_dir());
    assert!(std::fs::read_dir(build.file(".d")).unwrap().count() > 0);
    assert!(build.done());

    let log = build.log_text();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "fake-dib: args: -x -t qcow2,vhd --checksum --no-tmpfs --qemu-img-options compat=0.10 \
             -o {} ubuntu-minimal vm simple-init",
            build.base.display()
        )
    );
    assert_eq!(
        lines[1],
        "fake-dib: elements: ubuntu-minimal vm simple-init"
    );
    assert!(lines[2].starts_with("fake-dib: pid "), "{log}");
    assert!(
        log.contains(&format!("fake-dib: wrote {}", build.file(".vhd").display())),
        "{log}"
    );
}

#[test]
fn compat_0_10_gives_a_version_2_qcow2() {
    let dir = test_dir("fake-dib-compat");
    let build = Build::new(dir.path(), "old", "qcow2", "vm");
    assert_eq!(build.run(), Outcome::Exited(0), "{}", build.log_text());
    let info = qemu_info(&build.file(".qcow2"));
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10", "{info}");
    let bytes = std::fs::read(build.file(".qcow2")).unwrap();
    assert_eq!(&bytes[..8], b"QFI\xfb\x00\x00\x00\x02");

    // Without the option, qemu-img's default is version 3.
    let mut build = Build::new(dir.path(), "new", "qcow2", "vm");
    let at = build
        .spec
        .args
        .iter()
        .position(|a| a == "--qemu-img-options")
        .unwrap();
    build.spec.args.drain(at..at + 2);
    assert_eq!(build.run(), Outcome::Exited(0), "{}", build.log_text());
    let info = qemu_info(&build.file(".qcow2"));
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1", "{info}");
}

#[test]
fn tar_raw_vmdk_and_other_formats() {
    let dir = test_dir("fake-dib-other");
    let build = Build::new(dir.path(), "containers", "tar,raw,vmdk,squashfs", "base")
        .env("FAKE_DIB_SIZE_MB", "2");
    assert_eq!(build.run(), Outcome::Exited(0), "{}", build.log_text());

    let listing = Command::new("tar")
        .arg("-tf")
        .arg(build.file(".tar"))
        .output()
        .unwrap();
    assert!(listing.status.success(), "{listing:?}");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.lines().any(|l| l == "./etc/hostname"), "{listing}");

    let raw = std::fs::metadata(build.file(".raw")).unwrap();
    assert_eq!(raw.len(), 2 * 1024 * 1024);
    let vmdk = qemu_info(&build.file(".vmdk"));
    assert_eq!(vmdk["format"], "vmdk");
    assert_eq!(
        vmdk["format-specific"]["data"]["create-type"],
        "streamOptimized"
    );
    assert!(std::fs::metadata(build.file(".squashfs")).unwrap().len() > 0);
    for ext in ["tar", "raw", "vmdk", "squashfs"] {
        let name = format!("containers-0000000001.{ext}");
        verify_checksum("md5sum", dir.path(), &format!("{name}.md5"));
        verify_checksum("sha256sum", dir.path(), &format!("{name}.sha256"));
    }
}

#[test]
fn bad_arguments_exit_2() {
    let dir = test_dir("fake-dib-args");
    let base = dir.path().join("img-1").display().to_string();
    let cases: [&[&str]; 6] = [
        &[
            "-x",
            "-t",
            "qcow2",
            "--checksum",
            "--no-tmpfs",
            "--frobnicate",
            "-o",
            &base,
            "vm",
        ],
        &["-x", "-t", "qcow2", "--checksum", "--no-tmpfs", "vm"],
        &["-x", "--checksum", "--no-tmpfs", "-o", &base, "vm"],
        &["-x", "-o", &base, "-t"],
        &["-x", "-t", "qcow2,,vhd", "-o", &base, "vm"],
        &["-x", "-t", "qcow2", "-o", &base, "vm", "--checksum"],
    ];
    for (n, args) in cases.iter().enumerate() {
        let log = dir.path().join(format!("args-{n}.log"));
        let mut spec = Spec::new(
            fake_dib().display().to_string(),
            args.iter().map(|a| a.to_string()).collect(),
        );
        spec.env = vec![
            ("DIB_RELEASE".into(), String::new()),
            ("DIB_IMAGE_NAME".into(), "img".into()),
            ("DIB_IMAGE_FILENAME".into(), base.clone()),
        ];
        spec.output = nodepool_builder::command::Output::Log(log.clone());
        let outcome = command::spawn(spec).unwrap().wait(&never()).unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(outcome, Outcome::Exited(2), "{args:?}: {text}");
        assert!(text.starts_with("fake-dib: error: "), "{args:?}: {text}");
    }
    assert!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .all(|e| { e.file_name().to_string_lossy().starts_with("args-") })
    );
}

#[test]
fn environment_checks_fail_with_exit_1_and_say_why() {
    let dir = test_dir("fake-dib-env");
    let images = dir.path();
    let cases = [
        (
            Build::new(images, "a", "raw", "vm").without_env("DIB_IMAGE_NAME"),
            "fake-dib: error: DIB_IMAGE_NAME is not set".to_string(),
        ),
        (
            Build::new(images, "b", "raw", "vm").env("DIB_IMAGE_FILENAME", "/elsewhere/b"),
            format!(
                "fake-dib: error: DIB_IMAGE_FILENAME is '/elsewhere/b', expected '{}'",
                images.join("b-0000000001").display()
            ),
        ),
        (
            Build::new(images, "c", "raw", "vm").without_env("DIB_RELEASE"),
            "fake-dib: error: DIB_RELEASE is not set".to_string(),
        ),
        (
            Build::new(images, "d", "raw", "fedora vm")
                .env("FAKE_DIB_EXPECT_ELEMENTS", "fedora intermediate vm"),
            "fake-dib: error: elements are 'fedora vm', expected 'fedora intermediate vm'"
                .to_string(),
        ),
        (
            Build::new(images, "e", "raw", "vm")
                .env("TMPDIR", "/opt/dib_tmp")
                .env(
                    "FAKE_DIB_EXPECT_ENV",
                    "TMPDIR=/opt/dib_tmp DIB_CLOUD_IMAGES=http://x/y",
                ),
            "fake-dib: error: DIB_CLOUD_IMAGES is not set, expected 'http://x/y'".to_string(),
        ),
        (
            Build::new(images, "f", "raw", "vm")
                .env("DIB_CLOUD_IMAGES", "http://x/z")
                .env("FAKE_DIB_EXPECT_ENV", "DIB_CLOUD_IMAGES=http://x/y"),
            "fake-dib: error: DIB_CLOUD_IMAGES is 'http://x/z', expected 'http://x/y'".to_string(),
        ),
    ];
    for (build, reason) in cases {
        assert_eq!(build.run(), Outcome::Exited(1), "{}", build.log_text());
        let text = build.log_text();
        assert!(
            text.lines().any(|l| l == reason),
            "expected {reason:?} in:\n{text}"
        );
        assert!(build.outputs().is_empty(), "{:?}", build.outputs());
    }

    // The same expectations, met.
    let build = Build::new(images, "g", "raw", "fedora intermediate vm")
        .env("DIB_RELEASE", "21")
        .env("DIB_CLOUD_IMAGES", "http://x/y")
        .env("FAKE_DIB_EXPECT_ELEMENTS", "fedora intermediate vm")
        .env(
            "FAKE_DIB_EXPECT_ENV",
            "DIB_RELEASE=21 DIB_CLOUD_IMAGES=http://x/y",
        );
    assert_eq!(build.run(), Outcome::Exited(0), "{}", build.log_text());
    assert!(build.done());
}

#[test]
fn pause_waits_before_writing_anything() {
    let dir = test_dir("fake-dib-pause");
    let build = Build::new(dir.path(), "img", "qcow2,raw", "vm");
    let pause = build.control("fake-dib.pause");
    std::fs::write(&pause, "").unwrap();
    let running = command::spawn(build.spec.clone()).unwrap();
    wait_until(
        Duration::from_secs(10),
        "fake-dib to say it is paused",
        || std::fs::read_to_string(&build.log).is_ok_and(|t| t.contains("fake-dib: paused (")),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(process_alive(running.pid()));
    assert!(build.outputs().is_empty(), "{:?}", build.outputs());

    // The per-image pause holds it too, after the global one is gone.
    let own = build.control("fake-dib.img.pause");
    std::fs::write(&own, "").unwrap();
    std::fs::remove_file(&pause).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(process_alive(running.pid()));
    assert!(build.outputs().is_empty(), "{:?}", build.outputs());

    std::fs::remove_file(&own).unwrap();
    assert_eq!(running.wait(&never()).unwrap(), Outcome::Exited(0));
    assert!(build.file(".qcow2").exists() && build.file(".raw").exists());
    assert!(build.done());
}

#[test]
fn hang_is_killed_with_its_grandchild_by_the_runner_timeout() {
    let dir = test_dir("fake-dib-hang");
    let mut build = Build::new(dir.path(), "img", "qcow2", "vm");
    build.spec.timeout = Some(Duration::from_secs(2));
    std::fs::write(build.control("fake-dib.img.hang"), "").unwrap();
    let running = command::spawn(build.spec.clone()).unwrap();
    let leader = running.pid();
    let pids_file = build.control("fake-dib.img.hang-pids");
    wait_until(Duration::from_secs(10), "the hang-pids file", || {
        pids_file.exists()
    });
    let pids: Vec<i32> = std::fs::read_to_string(&pids_file)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_eq!(pids[0], leader);
    assert!(pids.iter().all(|&pid| process_alive(pid)));

    assert_eq!(running.wait(&never()).unwrap(), Outcome::TimedOut);
    assert!(pids.iter().all(|&pid| !process_alive(pid)), "{pids:?}");
    wait_until(
        Duration::from_secs(10),
        "both processes to be reaped",
        || {
            pids.iter()
                .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        },
    );
    assert!(build.outputs().is_empty(), "{:?}", build.outputs());
    assert!(!build.done());
    assert!(
        build.log_text().contains("fake-dib: hanging ("),
        "{}",
        build.log_text()
    );
}

#[test]
fn fail_and_should_fail_write_the_files_then_exit_127() {
    let dir = test_dir("fake-dib-fail");
    let build = Build::new(dir.path(), "img", "qcow2,vhd", "vm");
    std::fs::write(build.control("fake-dib.fail"), "").unwrap();
    assert_eq!(build.run(), Outcome::Exited(127), "{}", build.log_text());
    assert!(build.file(".qcow2").exists() && build.file(".vhd.sha256").exists());
    assert!(build.file(".d").is_dir());
    assert!(!build.done());
    assert!(build.log_text().contains("fake-dib: failing ("));

    let dir = test_dir("fake-dib-should-fail");
    let build = Build::new(dir.path(), "img", "raw", "vm").env("SHOULD_FAIL", "true");
    assert_eq!(build.run(), Outcome::Exited(127), "{}", build.log_text());
    assert!(build.file(".raw").exists());
    assert!(!build.done());
    assert!(
        build
            .log_text()
            .contains("fake-dib: failing (SHOULD_FAIL=true)")
    );
}

#[test]
fn nofiles_and_partial() {
    let dir = test_dir("fake-dib-nofiles");
    let build = Build::new(dir.path(), "img", "qcow2,vhd", "vm");
    std::fs::write(build.control("fake-dib.img.nofiles"), "").unwrap();
    assert_eq!(build.run(), Outcome::Exited(0), "{}", build.log_text());
    assert!(build.outputs().is_empty(), "{:?}", build.outputs());
    assert!(!build.done());

    let dir = test_dir("fake-dib-partial");
    let build = Build::new(dir.path(), "img", "qcow2,vhd", "vm");
    std::fs::write(build.control("fake-dib.partial"), "").unwrap();
    // Another image's control file has no effect on this one.
    std::fs::write(build.control("fake-dib.other.fail"), "").unwrap();
    assert_eq!(build.run(), Outcome::Exited(0), "{}", build.log_text());
    assert_eq!(
        build.outputs(),
        [".d", ".qcow2", ".qcow2.md5", ".qcow2.sha256"]
    );
    assert!(build.done());
}

#[test]
fn slow_sleeps_before_exiting() {
    let dir = test_dir("fake-dib-slow");
    let build = Build::new(dir.path(), "img", "raw", "vm");
    std::fs::write(build.control("fake-dib.img.slow"), "1\n").unwrap();
    let started = Instant::now();
    assert_eq!(build.run(), Outcome::Exited(0), "{}", build.log_text());
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(build.done());
    assert!(build.log_text().contains("fake-dib: sleeping 1s ("));
}
