//! The properties every fuzz target checks, shared with the deterministic corpus run in
//! `tests/bad_data.rs` (both include this file with `#[path]`).
//!
//! Each function feeds one input to a real reader of the builder and panics when a property
//! does not hold; "no panic" alone is not the bar:
//!
//! * a build or upload record that parses agrees with the JSON it came from, and writing it
//!   and reading it back gives the same record; a rejected one is rejected for the reason
//!   the error names, with a message short enough for one log line;
//! * a znode path that parses is rebuilt exactly by the path functions;
//! * a configuration that loads is usable (every duration fits an `Instant`); one that does
//!   not load has errors, each at a `line:col` inside the file it names, in file and
//!   position order, one line each, and none quoting a line of the secure file.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use nodepool_builder::config::{self, Config, ConfigErrors};
use nodepool_builder::zk::ZkConfig;
use nodepool_builder::zk::paths::{self, ImagePath};
use nodepool_builder::zk::schema::{ImageBuild, ImageUpload, SchemaError};
use serde_json::{Map, Value};

/// Where the fuzzed main configuration claims to live (relative paths resolve against it).
/// No extension: the content decides between TOML and YAML, so both readers are fuzzed.
pub const MAIN_PATH: &str = "/fuzz/nodepool-builder";
/// Where the fuzzed secure configuration claims to live (no extension either).
pub const SECURE_PATH: &str = "/fuzz/secure";
/// Separates the main and the secure file in a `config_secure` input (TOML and YAML forbid
/// NUL).
pub const SECURE_SEPARATOR: u8 = 0;
/// The longest error message a skipped record may log: an unknown state is shown with at
/// most 64 characters, each at most 10 when escaped (`\u{10ffff}`), plus the text around it.
const MAX_MESSAGE: usize = 700;

/// The build record reader (`ImageBuild::from_json`).
pub fn build_record(data: &[u8]) -> Result<ImageBuild, SchemaError> {
    let parsed = ImageBuild::from_json(data);
    let value = serde_json::from_slice::<Value>(data).ok();
    match &parsed {
        Ok(build) => {
            let obj = object(&value);
            assert_eq!(obj["state"].as_str(), Some(build.state.as_str()));
            assert_time(obj, build.state_time);
            assert_str(obj, "builder", &build.builder);
            assert_str(obj, "builder_id", &build.builder_id);
            assert_str(obj, "shell_type", &build.shell_type);
            assert_str_or_default(obj, "username", &build.username, "zuul");
            assert_str_or_default(obj, "python_path", &build.python_path, "/usr/bin/python2");
            assert!(build.formats.len() <= data.len(), "formats from nowhere");

            let written = build.to_json();
            let reread = ImageBuild::from_json(&written).unwrap_or_else(|e| {
                panic!(
                    "a written build record does not read back: {e}\n{}",
                    String::from_utf8_lossy(&written)
                )
            });
            let mut expected = build.clone();
            expected.formats = written_formats(&build.formats);
            assert_eq!(
                reread, expected,
                "build record changed by a write and a read"
            );
            assert_eq!(reread.to_json(), expected.to_json());
        }
        Err(e) => assert_rejection(
            data,
            &value,
            e,
            &["building", "ready", "failed", "deleting"],
        ),
    }
    parsed
}

/// The upload record reader (`ImageUpload::from_json`).
pub fn upload_record(data: &[u8]) -> Result<ImageUpload, SchemaError> {
    let parsed = ImageUpload::from_json(data);
    let value = serde_json::from_slice::<Value>(data).ok();
    match &parsed {
        Ok(upload) => {
            let obj = object(&value);
            assert_eq!(obj["state"].as_str(), Some(upload.state.as_str()));
            assert_time(obj, upload.state_time);
            assert_str(obj, "external_id", &upload.external_id);
            assert_str(obj, "external_name", &upload.external_name);
            assert_str(obj, "format", &upload.format);
            assert_str(obj, "username", &upload.username);
            assert_str(obj, "python_path", &upload.python_path);
            assert_str(obj, "shell_type", &upload.shell_type);

            let written = upload.to_json();
            let reread = ImageUpload::from_json(&written).unwrap_or_else(|e| {
                panic!(
                    "a written upload record does not read back: {e}\n{}",
                    String::from_utf8_lossy(&written)
                )
            });
            assert_eq!(
                &reread, upload,
                "upload record changed by a write and a read"
            );
            assert_eq!(reread.to_json(), written);
        }
        Err(e) => assert_rejection(
            data,
            &value,
            e,
            &["uploading", "ready", "failed", "deleting"],
        ),
    }
    parsed
}

/// The positional znode path parser (`paths::parse_image_path`).
pub fn znode_path(data: &[u8]) -> ImagePath {
    let Ok(path) = std::str::from_utf8(data) else {
        return ImagePath::Other;
    };
    let parsed = paths::parse_image_path(path);
    let rebuilt = match &parsed {
        ImagePath::Image { image } => Some(paths::image_path(image)),
        ImagePath::Pause { image } => Some(paths::image_pause_path(image)),
        ImagePath::Build { image, build_id } => {
            assert_ne!(build_id, "lock", "a lock is not a build");
            Some(paths::image_build_path(image, build_id))
        }
        ImagePath::Upload {
            image,
            build_id,
            provider,
            upload_id,
        } => {
            assert_ne!(upload_id, "lock", "a lock is not an upload");
            Some(paths::image_upload_path(
                image, build_id, provider, upload_id,
            ))
        }
        ImagePath::Other => None,
    };
    if let Some(rebuilt) = rebuilt {
        assert_eq!(rebuilt, path, "{parsed:?} does not rebuild its path");
    }
    parsed
}

/// The configuration loader on one main file.
pub fn config_main(data: &[u8]) -> Option<Result<Config, ConfigErrors>> {
    let text = std::str::from_utf8(data).ok()?;
    let main = Path::new(MAIN_PATH);
    let result = config::load_str(main, text, None);
    check_config(&result, &[(main, text)]);
    Some(result)
}

/// The configuration loader on a main and a secure file, separated by one NUL byte.
pub fn config_secure(data: &[u8]) -> Option<Result<Config, ConfigErrors>> {
    let split = data.iter().position(|&b| b == SECURE_SEPARATOR)?;
    let main_text = std::str::from_utf8(&data[..split]).ok()?;
    let secure_text = std::str::from_utf8(&data[split + 1..]).ok()?;
    let (main, secure) = (Path::new(MAIN_PATH), Path::new(SECURE_PATH));
    let result = config::load_str(main, main_text, Some((secure, secure_text)));
    check_config(&result, &[(main, main_text), (secure, secure_text)]);
    Some(result)
}

/// Joins a main and a secure file into one `config_secure` input.
pub fn secure_input(main: &str, secure: &str) -> Vec<u8> {
    let mut out = main.as_bytes().to_vec();
    out.push(SECURE_SEPARATOR);
    out.extend_from_slice(secure.as_bytes());
    out
}

/// What the formats of a build become after a write and a read: sorted, deduplicated,
/// comma-joined, then split again.
pub fn written_formats(formats: &[String]) -> Vec<String> {
    let mut sorted = formats.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted
        .join(",")
        .split(',')
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect()
}

fn object(value: &Option<Value>) -> &Map<String, Value> {
    match value {
        Some(Value::Object(obj)) => obj,
        other => panic!("a record that parses must be a JSON object, not {other:?}"),
    }
}

fn assert_time(obj: &Map<String, Value>, time: f64) {
    assert!(time.is_finite(), "state_time {time} is not finite");
    match obj.get("state_time") {
        None | Some(Value::Null) => assert_eq!(time, 0.0),
        Some(Value::Number(n)) => assert_eq!(n.as_f64(), Some(time)),
        Some(other) => panic!("state_time {other:?} was accepted"),
    }
}

fn assert_str(obj: &Map<String, Value>, key: &str, got: &Option<String>) {
    match obj.get(key) {
        None | Some(Value::Null) => assert_eq!(got, &None, "{key}"),
        Some(Value::String(s)) => assert_eq!(got.as_deref(), Some(s.as_str()), "{key}"),
        Some(other) => panic!("{key} {other:?} was accepted"),
    }
}

fn assert_str_or_default(obj: &Map<String, Value>, key: &str, got: &Option<String>, default: &str) {
    if obj.contains_key(key) {
        assert_str(obj, key, got);
    } else {
        assert_eq!(got.as_deref(), Some(default), "{key} default");
    }
}

/// A record was rejected: the reason must be true of the data.
fn assert_rejection(data: &[u8], value: &Option<Value>, error: &SchemaError, states: &[&str]) {
    let message = error.to_string();
    assert!(
        message.len() <= MAX_MESSAGE && !message.contains('\n'),
        "the warning for a skipped record must be one short line: {message:?}"
    );
    match error {
        SchemaError::Empty => assert!(data.iter().all(u8::is_ascii_whitespace)),
        SchemaError::Json(_) => assert!(value.is_none(), "valid JSON rejected as invalid"),
        SchemaError::NotObject => assert!(matches!(value, Some(v) if !v.is_object())),
        SchemaError::UnknownState(shown) => {
            let state = object(value)["state"].as_str().expect("a string state");
            assert!(!states.contains(&state), "known state {state:?} rejected");
            assert!(state.starts_with(shown.as_str()) && shown.chars().count() <= 64);
        }
        SchemaError::BadField(key) => {
            let obj = object(value);
            let field = obj.get(*key);
            let wrong = match (*key, field) {
                ("state", f) => !matches!(f, Some(Value::String(_))),
                (_, None | Some(Value::Null)) => false,
                ("state_time", Some(f)) => !f.is_number(),
                ("formats", Some(Value::Array(items))) => !items.iter().all(Value::is_string),
                (_, Some(Value::String(_))) => false,
                _ => true,
            };
            assert!(wrong, "field {key:?} rejected though it is {field:?}");
        }
    }
}

/// A loaded configuration is usable; a rejected one has well-placed errors.
fn check_config(result: &Result<Config, ConfigErrors>, files: &[(&Path, &str)]) {
    match result {
        Ok(config) => check_usable(config),
        Err(errors) => {
            assert!(!errors.0.is_empty(), "rejected without an error");
            let lines_of: Vec<Vec<&str>> = files
                .iter()
                .map(|(_, text)| text.split('\n').collect())
                .collect();
            let mut last = (0, 0, 0);
            for error in &errors.0 {
                let index = files
                    .iter()
                    .position(|(path, _)| *path == error.file)
                    .unwrap_or_else(|| panic!("error in an unknown file: {error}"));
                let lines = &lines_of[index];
                assert!(
                    (1..=lines.len()).contains(&error.line),
                    "line outside the file ({} lines): {error}",
                    lines.len()
                );
                let width = lines[error.line - 1].chars().count();
                assert!(
                    (1..=width + 1).contains(&error.col),
                    "column outside line {} ({width} characters): {error}",
                    error.line
                );
                assert!(!error.message.is_empty(), "empty message at {error}");
                assert!(
                    !error.message.contains('\n'),
                    "message over lines: {error:?}"
                );
                let here = (index, error.line, error.col);
                assert!(here >= last, "errors out of order: {errors}");
                last = here;
            }
            // The secure file holds credentials: its lines are never quoted back.
            if let Some((_, secure)) = files.iter().find(|(p, _)| *p == Path::new(SECURE_PATH)) {
                let messages: Vec<&str> = errors
                    .0
                    .iter()
                    .filter(|e| e.file == Path::new(SECURE_PATH))
                    .map(|e| e.message.as_str())
                    .collect();
                let messages = messages.join("\n");
                for line in secure.lines().map(str::trim) {
                    let quotable =
                        line.len() >= 10 && (line.contains(" = ") || line.contains(": "));
                    assert!(
                        !quotable || !messages.contains(line),
                        "a secure file error echoes {line:?}: {errors}"
                    );
                }
            }
        }
    }
}

/// Everything the daemon turns into a duration or a deadline fits.
fn check_usable(config: &Config) {
    assert!(!config.zookeeper_servers.is_empty());
    let _ = ZkConfig::from_config(config);
    let seconds = |name: &str, s: f64| {
        let d = Duration::try_from_secs_f64(s)
            .unwrap_or_else(|e| panic!("{name} = {s} is no duration: {e}"));
        assert!(
            Instant::now().checked_add(d).is_some(),
            "{name} = {s} overflows a deadline"
        );
    };
    seconds("zookeeper-timeout", config.zookeeper_timeout);
    seconds("cleanup-interval", config.cleanup_interval);
    seconds("resync-interval", config.resync_interval);
    seconds("progress-interval", config.progress_interval);
    seconds("retry-backoff-initial", config.retry_backoff_initial);
    seconds("retry-backoff-max", config.retry_backoff_max);
    for d in &config.diskimages {
        seconds("rebuild-age", d.rebuild_age as f64);
        seconds("build-timeout", d.build_timeout as f64);
    }
    for p in &config.providers {
        seconds("rate", p.rate);
        seconds("image-upload-timeout", p.image_upload_timeout as f64);
    }
}
