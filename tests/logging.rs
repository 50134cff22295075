//! Logging as nodepool 11 does it, through the real binary: `-l` dictConfig files (file
//! handlers with their own levels, logger levels, propagation, SIGHUP reopening), nodepool's
//! logger names and line format, `NODEPOOL_BUILDER_LOG` filters on those names, and `-d`
//! without the ZooKeeper client's per-packet lines.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use nodepool_builder::model::{BuildState, UploadState};

use crate::util::builder::BuilderProcess;
use crate::util::site::{TestSite, WAIT};
use crate::util::wait_until;

/// One line of nodepool's format, `%(asctime)s %(levelname)s %(name)s: %(message)s`.
#[derive(Debug)]
struct Line<'a> {
    level: &'a str,
    name: &'a str,
    message: &'a str,
}

/// Parses a line of nodepool's format (`2026-12-07 18:00:00,123 INFO name: message`), or
/// `None` when the line is not one.
fn parse_line(line: &str) -> Option<Line<'_>> {
    // The timestamp: digits where the pattern has '9', the other characters literally.
    const SHAPE: &str = "9999-99-99 99:99:99,999 ";
    let stamp = line.get(..SHAPE.len())?;
    let shape_ok = stamp.bytes().zip(SHAPE.bytes()).all(|(c, s)| {
        if s == b'9' {
            c.is_ascii_digit()
        } else {
            c == s
        }
    });
    if !shape_ok {
        return None;
    }
    let rest = &line[SHAPE.len()..];
    let (level, rest) = rest.split_once(' ')?;
    if !matches!(level, "DEBUG" | "INFO" | "WARNING" | "ERROR") {
        return None;
    }
    let (name, message) = rest.split_once(": ")?;
    if name.is_empty() || name.contains(' ') {
        return None;
    }
    Some(Line {
        level,
        name,
        message,
    })
}

/// Every line of `text`, parsed; panics naming the first line not in nodepool's format.
#[track_caller]
fn parse_all<'a>(text: &'a str, what: &str) -> Vec<Line<'a>> {
    text.lines()
        .map(|l| {
            parse_line(l).unwrap_or_else(|| {
                panic!("a line of {what} not in nodepool's format: {l:?}\n{text}")
            })
        })
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn is_worker(name: &str, worker: &str) -> bool {
    name.strip_prefix(&format!("nodepool.builder.{worker}."))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[test]
fn the_line_format_reader_accepts_nodepools_lines_only() {
    let l = parse_line("2026-12-07 18:00:00,123 WARNING nodepool.zk.ZooKeeper: a: b").unwrap();
    assert_eq!(
        (l.level, l.name, l.message),
        ("WARNING", "nodepool.zk.ZooKeeper", "a: b")
    );
    assert!(parse_line("2026-12-07T18:00:00.123Z INFO [main] x: y").is_none());
    assert!(parse_line("2026-12-07 18:00:00,123 WARN x: y").is_none());
}

#[test]
fn a_logging_config_file_routes_each_record_to_the_handlers_its_levels_allow() {
    let site = TestSite::new("logging_config");
    let cfg = site.fedora_on_cloud(0, "");
    let main_log = site.path("var/builder.log");
    let build_log = site.path("var/build-debug.log");
    let logconfig = site.path("logging.yaml");
    std::fs::write(
        &logconfig,
        format!(
            r#"version: 1
formatters:
  simple:
    class: nodepool.logconfig.MultiLineFormatter
    format: '%(asctime)s %(levelname)s %(name)s: %(message)s'
  terse:
    format: '%(levelname)s %(message)s'
handlers:
  normal:
    class: logging.handlers.WatchedFileHandler
    filename: {main}
    level: INFO
    formatter: simple
  builds:
    class: logging.handlers.RotatingFileHandler
    filename: {builds}
    maxBytes: 1048576
    backupCount: 3
    formatter: terse
loggers:
  nodepool.builder.BuildWorker:
    level: DEBUG
    handlers: [builds]
root:
  level: INFO
  handlers: [normal]
"#,
            main = main_log.display(),
            builds = build_log.display()
        ),
    )
    .unwrap();
    let stderr = site.path("stderr.log");
    let mut b = BuilderProcess::start(
        &[
            "-f",
            "-c",
            cfg.to_str().unwrap(),
            "-l",
            logconfig.to_str().unwrap(),
        ],
        &[],
        &stderr,
    );
    wait_until(WAIT, "the builder to be ready (in the INFO file)", || {
        read(&main_log).contains("ready: builder_id=")
    });
    site.wait_builds("fedora", BuildState::Ready, 1);
    site.wait_uploads("fedora", "cloud", UploadState::Ready, 1);
    wait_until(WAIT, "the upload's ready line in the INFO file", || {
        read(&main_log).contains("in cloud is ready")
    });

    // The INFO file: every logger, nothing below INFO, nodepool's names and format.
    let text = read(&main_log);
    let lines = parse_all(&text, "the INFO file");
    assert!(
        lines.iter().all(|l| l.level != "DEBUG"),
        "the INFO handler got a DEBUG line:\n{text}"
    );
    let named = |pred: &dyn Fn(&Line) -> bool| lines.iter().any(pred);
    assert!(
        named(&|l| l.name == "nodepool.builder.NodePoolBuilder"
            && l.message.contains("ready: builder_id=")),
        "{text}"
    );
    assert!(
        named(
            &|l| is_worker(l.name, "BuildWorker") && l.message.starts_with("Building image fedora")
        ),
        "{text}"
    );
    assert!(
        named(&|l| is_worker(l.name, "UploadWorker") && l.message.contains("in cloud is ready")),
        "{text}"
    );
    assert!(
        named(&|l| l.name == "nodepool.zk.ZooKeeperClient"
            && l.message.starts_with("Connected to zookeeper")),
        "{text}"
    );
    // The formatter that is not nodepool's, and the rotation parameters, are named once.
    let ignored: Vec<&Line> = lines
        .iter()
        .filter(|l| l.message.starts_with("Logging config "))
        .collect();
    assert_eq!(ignored.len(), 1, "{text}");
    assert_eq!(ignored[0].level, "WARNING");
    assert!(
        ignored[0]
            .message
            .ends_with("not honoured: formatter \"terse\"; handlers.builds: maxBytes, backupCount"),
        "{}",
        ignored[0].message
    );

    // The build workers' file: only their records, DEBUG included.
    let text = read(&build_log);
    let lines = parse_all(&text, "the build workers' file");
    assert!(
        lines.iter().all(|l| is_worker(l.name, "BuildWorker")),
        "a record of another logger in the build workers' file:\n{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.level == "DEBUG" && l.message.contains("DIB ran for")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.level == "INFO" && l.message.starts_with("DIB image fedora is built")),
        "{text}"
    );
    // No handler writes to stderr.
    assert_eq!(read(&stderr), "", "nothing on stderr");

    // logrotate moves both files away; SIGHUP reopens both paths.
    let moved_main = site.path("var/builder.log.1");
    let moved_build = site.path("var/build-debug.log.1");
    std::fs::rename(&main_log, &moved_main).unwrap();
    std::fs::rename(&build_log, &moved_build).unwrap();
    b.signal(Signal::SIGHUP);
    wait_until(
        WAIT,
        "the configuration reload in the new INFO file",
        || read(&main_log).contains("Configuration reloaded from"),
    );
    assert!(
        read(&main_log).contains(&format!("Reopened log file {}", build_log.display())),
        "{}",
        read(&main_log)
    );
    let old_build = read(&moved_build);
    site.request_build("fedora");
    site.wait_builds("fedora", BuildState::Ready, 2);
    wait_until(
        WAIT,
        "the second build in the new build workers' file",
        || read(&build_log).contains("DIB image fedora is built"),
    );
    parse_all(&read(&build_log), "the reopened build workers' file");
    parse_all(&read(&main_log), "the reopened INFO file");
    assert_eq!(
        read(&moved_build),
        old_build,
        "nothing more is written to the moved file"
    );
    b.signal(Signal::SIGTERM);
    assert!(b.wait_exit(Duration::from_secs(20)).success());
    assert_eq!(read(&stderr), "", "nothing on stderr");
}

#[test]
fn an_ini_logging_config_is_refused_with_a_clear_error() {
    let site = TestSite::new("logging_ini");
    let cfg = site.fedora_on_cloud(0, "");
    let ini = site.path("logging.conf");
    std::fs::write(&ini, "[loggers]\nkeys=root\n").unwrap();
    let out = std::process::Command::new(crate::util::builder::binary())
        .args([
            "-f",
            "-c",
            cfg.to_str().unwrap(),
            "-l",
            ini.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}: not a dictConfig file", ini.display()))
            && stderr.contains("(.yaml, .yml, .json)"),
        "{stderr}"
    );
}

#[test]
fn a_nodepool_builder_log_filter_acts_on_nodepool_logger_names() {
    let site = TestSite::new("logging_env_filter");
    let cfg = site.fedora_on_cloud(0, "");
    let log = site.path("builder.log");
    let b = BuilderProcess::start(
        &["-f", "-c", cfg.to_str().unwrap()],
        &[(
            "NODEPOOL_BUILDER_LOG",
            "warn,nodepool.builder.BuildWorker=debug",
        )],
        &log,
    );
    site.wait_builds("fedora", BuildState::Ready, 1);
    wait_until(
        WAIT,
        "the build worker's line about the built image",
        || b.log().contains("DIB image fedora is built"),
    );
    let text = b.log();
    let lines = parse_all(&text, "the log");
    assert!(
        lines
            .iter()
            .filter(|l| matches!(l.level, "DEBUG" | "INFO"))
            .all(|l| is_worker(l.name, "BuildWorker")),
        "only the build workers log below WARNING:\n{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.level == "DEBUG" && l.name == "nodepool.builder.BuildWorker.0"),
        "{text}"
    );
    assert!(!text.contains("ready: builder_id="), "{text}");
}

#[test]
fn debug_mode_shows_nodepool_debug_lines_but_not_the_zookeeper_clients_packets() {
    let site = TestSite::new("logging_debug");
    let cfg = site.fedora_on_cloud(0, "");
    let log = site.path("builder.log");
    let mut b = BuilderProcess::start(&["-d", "-c", cfg.to_str().unwrap()], &[], &log);
    b.wait_for_log(WAIT, "ready: builder_id=");
    site.wait_builds("fedora", BuildState::Ready, 1);
    site.wait_uploads("fedora", "cloud", UploadState::Ready, 1);
    wait_until(WAIT, "the upload's ready line", || {
        b.log().contains("in cloud is ready")
    });
    let text = b.log();
    let lines = parse_all(&text, "the -d log");
    assert!(
        lines.iter().any(|l| l.level == "DEBUG"
            && l.name == "nodepool.builder.NodePoolBuilder"
            && l.message == "Starting listener for build jobs"),
        "nodepool's DEBUG marker line:\n{text}"
    );
    let foreign: Vec<&Line> = lines
        .iter()
        .filter(|l| !l.name.starts_with("nodepool.") && matches!(l.level, "DEBUG" | "INFO"))
        .collect();
    assert!(
        foreign.is_empty(),
        "other crates' (ZooKeeper client, TLS, HTTP) lines below WARNING: {foreign:#?}"
    );
}
