//! One real diskimage-builder build through the daemon: `debian-minimal` as a `tar` and a
//! `qcow2`, with DIB 3.43 from `scripts/dib-env.sh` (shared/docs/real-services.md §c). Every
//! other build test uses the test script checked in [`super::test_script`].
//!
//! Why two formats: DIB writes the `--checksum` files (`.md5`, `.sha256`) only for formats
//! that go through its image conversion; a `tar` is written straight from the build root and
//! gets none. The `qcow2` (of the same build, from the same root) carries the checksums, and
//! also shows that upstream's `--qemu-img-options 'compat=0.10'` reaches `qemu-img`.
//!
//! The build takes about 2–3 minutes on an idle machine (less when the debootstrap and apt
//! caches in `target/test-env/dib-cache` are there from an earlier run) and writes about
//! 1.2 GB, which the test removes again when it passes. The Debian mirrors DIB uses are the
//! ones apt uses on this machine, read from its sources at run time and handed to DIB through
//! the diskimage's `env-vars`, the way a nodepool operator would.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nodepool_builder::model::BuildState;
use nodepool_builder::zk::tree::BuildInfo;

use crate::util::builder::BuilderProcess;
use crate::util::site::TestSite;
use crate::util::{file_tail, poll_for, process_alive, repo_root};

const IMAGE: &str = "debian-minimal-test";

/// How long the whole build may take before the test gives up (the daemon's own
/// `build-timeout` is longer, so a slow build fails here with the logs, not as a timeout).
const BUILD_WAIT: Duration = Duration::from_secs(15 * 60);

/// Runs `scripts/dib-env.sh` (installs what is missing, quick otherwise) and returns the
/// venv's `bin` directory.
fn ensure_dib_env() -> PathBuf {
    let script = repo_root().join("scripts/dib-env.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(repo_root())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "`{}` failed ({}):\n{log}",
        script.display(),
        out.status
    );
    eprint!("{log}");
    eprintln!(
        "real_dib: dib-env.sh took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let bin = repo_root().join("target/test-env/dib-venv/bin");
    assert!(
        bin.join("disk-image-create").is_file(),
        "no disk-image-create in {}",
        bin.display()
    );
    bin
}

/// The Debian mirrors apt uses on this machine: (archive, security). Read from the deb822
/// files in `/etc/apt/sources.list.d/` (the stanza whose suites name `bookworm` and the one
/// naming `bookworm-security`), or from one-line `deb` entries in `/etc/apt/sources.list`.
fn apt_mirrors() -> (String, String) {
    let mut stanzas: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir("/etc/apt/sources.list.d")
        .map(|it| {
            it.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sources"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for stanza in text.split("\n\n") {
            let field = |name: &str| -> Vec<String> {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.split_whitespace().map(str::to_string).collect())
                    .unwrap_or_default()
            };
            let enabled = stanza.lines().all(|l| l.trim() != "Enabled: no");
            if enabled && field("Types:").iter().any(|t| t == "deb") {
                stanzas.push((field("URIs:"), field("Suites:")));
            }
        }
    }
    let one_line = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    for line in one_line.lines() {
        let mut words = line.split_whitespace().peekable();
        if words.next() != Some("deb") {
            continue;
        }
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            // Options: `[a=b c=d]`, possibly over several words.
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            stanzas.push((vec![uri.to_string()], vec![suite.to_string()]));
        }
    }
    let find = |suite: &str| {
        stanzas
            .iter()
            .find(|(uris, suites)| !uris.is_empty() && suites.iter().any(|s| s == suite))
            .map(|(uris, _)| uris[0].clone())
    };
    match (find("bookworm"), find("bookworm-security")) {
        (Some(archive), Some(security)) => (archive, security),
        other => panic!(
            "cannot find the bookworm and bookworm-security mirrors in the apt sources of this machine \
             (/etc/apt/sources.list.d/*.sources, /etc/apt/sources.list); found {other:?}"
        ),
    }
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The daemon, stopped with SIGTERM when dropped (also while a failed test unwinds) so its
/// shutdown stops DIB's whole process group; SIGKILL only if that takes over a minute.
struct Daemon(BuilderProcess);

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.0.pid();
        if pid > 0 && process_alive(pid) {
            self.0.signal(Signal::SIGTERM);
            let _ = poll_for(Duration::from_secs(60), || {
                (!process_alive(pid)).then_some(())
            });
        }
    }
}

/// The newest build log of `IMAGE` in `dir`, for failure messages when the build id is not
/// known.
fn newest_build_log(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(IMAGE))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

fn failure(site: &TestSite, what: &str, log: Option<PathBuf>) -> String {
    let log = log.or_else(|| newest_build_log(&site.log_dir(0)));
    let tail = match &log {
        Some(p) => format!(
            "--- build log {} (tail) ---\n{}",
            p.display(),
            file_tail(p, 120)
        ),
        None => "--- no build log ---".to_string(),
    };
    format!("{what}\n{tail}\n{}", site.dump())
}

/// Runs `cmd` in `dir`; panics with its output unless it succeeds; returns stdout.
fn run(cmd: &mut Command, dir: &Path) -> String {
    let out = cmd
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} in {} failed ({}):\n{}{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn debian_minimal_is_built_by_real_dib() {
    let install_started = Instant::now();
    let bin = ensure_dib_env();
    let install_time = install_started.elapsed();
    let (archive, security) = apt_mirrors();

    let site = TestSite::new("real_dib");
    let cache = repo_root().join("target/test-env/dib-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let cached = cache
        .join("debootstrap-debian-bookworm-amd64.tar.gz")
        .exists();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into())
    );
    // DIB needs /usr/sbin (debootstrap, losetup, mkfs) even when the caller's PATH lacks it.
    let path = format!("{path}:/usr/local/sbin:/usr/sbin:/sbin");
    let body = format!(
        r#"
[[diskimages]]
name = "{IMAGE}"
dib-cmd = {dib}
elements = ["debian-minimal"]
formats = ["tar", "qcow2"]
release = "bookworm"
build-timeout = 1500

[diskimages.env-vars]
DIB_DISTRIBUTION_MIRROR = {archive}
DIB_DEBIAN_SECURITY_MIRROR = {security}
DIB_IMAGE_CACHE = {cache}
DIB_DEBOOTSTRAP_CACHE = "1"
DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE = "1"
PATH = {path}
"#,
        dib = toml_str(&bin.join("disk-image-create").display().to_string()),
        archive = toml_str(&archive),
        security = toml_str(&security),
        cache = toml_str(&cache.display().to_string()),
        path = toml_str(&path),
    );
    site.config(0, "", &body);

    let build_started = Instant::now();
    let daemon = Daemon(site.start(0, &[]));
    // A failed build would be retried by the scheduler: stop at the first one instead. The
    // tree is read once a second, not at every poll, for the minutes the build takes.
    let mut last_read: Option<Instant> = None;
    let result = poll_for(BUILD_WAIT, || {
        if last_read.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return None;
        }
        last_read = Some(Instant::now());
        site.builds(IMAGE)
            .into_iter()
            .find(|b| matches!(b.build.state, BuildState::Ready | BuildState::Failed))
    });
    let build: BuildInfo = match result {
        Some(b) if b.build.state == BuildState::Ready => b,
        Some(b) => {
            let log = site.log_dir(0).join(format!("{IMAGE}-{}.log", b.id));
            panic!(
                "{}",
                failure(
                    &site,
                    &format!("the DIB build failed: {:?}", b.build),
                    Some(log)
                )
            );
        }
        None => panic!(
            "{}",
            failure(
                &site,
                &format!("timed out after {BUILD_WAIT:?}: waiting for a ready build of {IMAGE}"),
                None
            )
        ),
    };
    let build_time = build_started.elapsed();
    let id = build.id.clone();
    let log_path = site.log_dir(0).join(format!("{IMAGE}-{id}.log"));
    let fail = |what: &str| failure(&site, what, Some(log_path.clone()));

    // The record.
    let mut formats = build.build.formats.clone();
    formats.sort();
    assert_eq!(
        formats,
        ["qcow2", "tar"],
        "{}",
        fail("formats of the ready build")
    );

    // The build log: DIB's trace output, the debootstrap step, and upstream's last line.
    let log = std::fs::read_to_string(&log_path)
        .unwrap_or_else(|e| panic!("{}", fail(&format!("cannot read the build log: {e}"))));
    // DIB prefixes each line with a timestamp: `2026-01-02 03:04:05.678 | + <file>:<line> : ...`.
    let traced = log
        .lines()
        .filter(|l| {
            l.split_once(" | ")
                .map_or(*l, |(_, rest)| rest)
                .starts_with("+ ")
        })
        .count();
    assert!(
        traced > 100,
        "{}",
        fail(&format!("only {traced} trace (-x) lines in the build log"))
    );
    assert!(
        log.contains("08-debootstrap"),
        "{}",
        fail("the build log does not mention root.d/08-debootstrap")
    );
    assert!(
        log.trim_end().ends_with("Exit code: 0"),
        "{}",
        fail("the build log does not end with `Exit code: 0`")
    );
    let used_cache = log.contains("found in cache. Using.");
    let daemon_log = daemon.0.log();
    let output = format!(
        "-o {} debian-minimal",
        site.images_dir(0).join(format!("{IMAGE}-{id}")).display()
    );
    for want in [
        "-x -t ",
        " --checksum --no-tmpfs --qemu-img-options ",
        &output,
    ] {
        assert!(
            daemon_log.contains(want),
            "{}",
            fail(&format!(
                "the daemon log does not show DIB started with `{want}`"
            ))
        );
    }

    // The files: tar, qcow2 with its checksums, manifest directory (and no checksums for the
    // tar, see the module doc).
    let images = site.images_dir(0);
    let tar = format!("{IMAGE}-{id}.tar");
    let qcow2 = format!("{IMAGE}-{id}.qcow2");
    assert_eq!(
        site.local_files(0, IMAGE, &id),
        [
            format!("{IMAGE}-{id}.d"),
            qcow2.clone(),
            format!("{qcow2}.md5"),
            format!("{qcow2}.sha256"),
            tar.clone()
        ],
        "{}",
        fail("the build's files")
    );
    let manifests = std::fs::read_dir(images.join(format!("{IMAGE}-{id}.d")))
        .map(|it| it.count())
        .unwrap_or(0);
    assert!(
        manifests > 0,
        "{}",
        fail("the manifest directory is missing or empty")
    );
    let size = std::fs::metadata(images.join(&tar)).unwrap().len();
    assert!(
        size > 100 << 20,
        "{}",
        fail(&format!("the tar is only {size} bytes"))
    );
    let listing = run(Command::new("tar").args(["-tf", &tar]), &images);
    let entries = listing.lines().count();
    for want in [
        "./etc/debian_version",
        "./etc/os-release",
        "./usr/bin/apt-get",
    ] {
        assert!(
            listing.lines().any(|l| l == want),
            "{}",
            fail(&format!(
                "`tar -tf {tar}` ({entries} entries) does not list {want}"
            ))
        );
    }
    let version = run(
        Command::new("tar").args(["-xOf", &tar, "./etc/debian_version"]),
        &images,
    );
    assert!(
        version.starts_with("12."),
        "{}",
        fail(&format!(
            "/etc/debian_version in the tar is {version:?}, not bookworm's 12.x"
        ))
    );
    run(
        Command::new("md5sum").args(["-c", &format!("{qcow2}.md5")]),
        &images,
    );
    run(
        Command::new("sha256sum").args(["-c", &format!("{qcow2}.sha256")]),
        &images,
    );
    let info = run(
        Command::new("qemu-img").args(["info", "--output=json", &qcow2]),
        &images,
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["format"],
        "qcow2",
        "{}",
        fail(&format!("qemu-img info: {info}"))
    );
    assert_eq!(
        info["format-specific"]["data"]["compat"],
        "0.10",
        "{}",
        fail(&format!("qemu-img info: {info}"))
    );
    let qcow2_size = std::fs::metadata(images.join(&qcow2)).unwrap().len();

    eprintln!(
        "real_dib: install check {:.1} s; build {id} ready after {:.1} s (debootstrap cache {}), \
         tar {} MB with {entries} entries, qcow2 {} MB, {manifests} manifest entries, {traced} trace lines",
        install_time.as_secs_f64(),
        build_time.as_secs_f64(),
        match (cached, used_cache) {
            (true, true) => "used",
            (true, false) => "present but not used",
            (false, _) => "written",
        },
        size >> 20,
        qcow2_size >> 20,
    );

    // Stop the daemon, then remove the ~1.2 GB of output.
    drop(daemon);
    for name in site.local_files(0, IMAGE, &id) {
        let p = images.join(name);
        let removed = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        removed.unwrap_or_else(|e| panic!("cannot remove {}: {e}", p.display()));
    }
    assert!(site.local_files(0, IMAGE, &id).is_empty());
}
