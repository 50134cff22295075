//! `-l LOGCONFIG`: the part of a Python logging dictConfig that nodepool deployments use.
//!
//! nodepool 11 loads `-l FILE` with `yaml.safe_load` when its extension is `.yaml`, `.yml`
//! or `.json`, and hands it to `logging.config.dictConfig`; any other file goes to
//! `logging.config.fileConfig` (an ini file). We read the dictConfig form and honour what
//! decides *which records end up where*:
//!
//! * handlers of class `logging.handlers.WatchedFileHandler`, `logging.FileHandler`,
//!   `logging.handlers.RotatingFileHandler` and `logging.handlers.TimedRotatingFileHandler`
//!   become a plain file opened for appending at `filename` (relative to the working
//!   directory, as Python opens it); SIGHUP reopens it, which is what logrotate needs (the
//!   size/time rotation parameters are not honoured: logrotate rotates);
//! * `logging.StreamHandler` writes to stderr, or to stdout with `stream: ext://sys.stdout`;
//!   `logging.NullHandler` drops records;
//! * every handler's `level`;
//! * `root` and `loggers`: `level`, `handlers`, `propagate`, with Python's semantics: a
//!   record is emitted when its level reaches the *effective* level of its logger (its own,
//!   else its nearest configured ancestor's, else root's, WARNING by default), and then goes
//!   to the handlers of its logger and of every ancestor up to the first with
//!   `propagate: false`, each handler applying its own level. Ancestors are found by
//!   dropping the last `.`-separated part of the name (also at `::`, for other crates'
//!   targets such as `zookeeper_client::session`).
//!
//! Ignored, and named together in one warning at start-up ([`LogConfig::ignored`]):
//! formatters whose format is not nodepool's own (`%(asctime)s %(levelname)s %(name)s:
//! %(message)s`, which is the only line format we write), filters, handler classes other
//! than the above (their records are dropped), rotation and other handler parameters,
//! streams other than stdout/stderr, and `incremental`. `disable_existing_loggers` has no
//! meaning here (all loggers are configured at once) and is silently accepted.
//!
//! Errors (the file is refused, with every problem listed): an unreadable file, an ini
//! file, YAML that is not a mapping, a `version` other than 1, unknown level names, a
//! logger naming a handler that does not exist, a file handler without `filename`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

/// nodepool's format string; a formatter with it is what we write anyway.
pub const NODEPOOL_FORMAT: &str = "%(asctime)s %(levelname)s %(name)s: %(message)s";

/// Python's `logging.WARNING`, the root logger's level unless configured.
pub const WARNING: u32 = 30;
/// Python's `logging.INFO`.
pub const INFO: u32 = 20;
/// Python's `logging.DEBUG`.
pub const DEBUG: u32 = 10;

/// At most this many handlers (routing keeps them in a bit mask).
const MAX_HANDLERS: usize = 64;

/// Where a handler writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A file opened for appending, reopened on SIGHUP.
    File(PathBuf),
    Stderr,
    Stdout,
    /// Nothing (`NullHandler`, or an unsupported class).
    Null,
}

/// One handler: a destination and the least level it accepts (Python numbers; 0 = all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handler {
    pub name: String,
    pub level: u32,
    pub destination: Destination,
}

/// One logger's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggerSpec {
    /// `None`: inherit the nearest ancestor's level (Python's NOTSET).
    pub level: Option<u32>,
    /// Indexes into [`LogConfig::handlers`].
    pub handlers: Vec<usize>,
    pub propagate: bool,
}

/// A logging configuration: the built-in default or a `-l` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    pub handlers: Vec<Handler>,
    /// The root logger; its level is always set.
    pub root: LoggerSpec,
    pub loggers: BTreeMap<String, LoggerSpec>,
    /// What the file asked for that is not honoured, one item each, e.g.
    /// `formatter "custom"`; empty for the defaults.
    pub ignored: Vec<String>,
}

/// A `-l` file that cannot be used, with every problem found.
#[derive(Debug)]
pub struct LogConfigError {
    pub path: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for LogConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {p}", self.path.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for LogConfigError {}

impl LogConfig {
    /// nodepool's configuration without `-l` (wire spec §6.2): one handler writing
    /// everything it is given to `destination`; the `nodepool` loggers at INFO (DEBUG with
    /// `debug`), every other logger (the ZooKeeper client, TLS, HTTP crates; upstream's
    /// kazoo, requests and openstack loggers) at WARNING.
    pub fn defaults(destination: Destination, debug: bool) -> LogConfig {
        let nodepool = LoggerSpec {
            level: Some(if debug { DEBUG } else { INFO }),
            handlers: Vec::new(),
            propagate: true,
        };
        LogConfig {
            handlers: vec![Handler {
                name: "default".to_owned(),
                level: 0,
                destination,
            }],
            root: LoggerSpec {
                level: Some(WARNING),
                handlers: vec![0],
                propagate: true,
            },
            loggers: BTreeMap::from([("nodepool".to_owned(), nodepool)]),
            ignored: Vec::new(),
        }
    }

    /// The level a record on logger `name` needs to be emitted (Python's
    /// `getEffectiveLevel`).
    pub fn effective_level(&self, name: &str) -> u32 {
        let mut current = Some(name);
        while let Some(n) = current {
            if let Some(level) = self.loggers.get(n).and_then(|l| l.level) {
                return level;
            }
            current = parent(n);
        }
        self.root.level.unwrap_or(WARNING)
    }

    /// The handlers (bit `i` for `handlers[i]`) an emitted record on logger `name` at
    /// `level` goes to: those of the logger and its ancestors up to the first that does
    /// not propagate, each only if the record reaches the handler's level.
    pub fn handlers_for(&self, name: &str, level: u32) -> u64 {
        let mut mask = 0;
        let mut current = Some(name);
        while let Some(n) = current {
            if let Some(spec) = self.loggers.get(n) {
                mask |= self.mask(spec, level);
                if !spec.propagate {
                    return mask;
                }
            }
            current = parent(n);
        }
        mask | self.mask(&self.root, level)
    }

    fn mask(&self, spec: &LoggerSpec, level: u32) -> u64 {
        spec.handlers
            .iter()
            .filter(|&&i| self.handlers[i].level <= level)
            .fold(0, |m, &i| m | 1 << i)
    }

    /// The lowest level any logger is set to: records below it are never emitted.
    pub fn lowest_level(&self) -> u32 {
        self.loggers
            .values()
            .filter_map(|l| l.level)
            .chain(self.root.level)
            .min()
            .unwrap_or(WARNING)
    }
}

/// The parent logger's name (`a.b` of `a.b.c`, `zookeeper_client` of
/// `zookeeper_client::session`), `None` at the top (the parent is root).
pub fn parent(name: &str) -> Option<&str> {
    let dot = name.rfind('.');
    let colons = name.rfind("::");
    match (dot, colons) {
        (Some(d), Some(c)) => Some(&name[..d.max(c)]),
        (Some(i), None) | (None, Some(i)) => Some(&name[..i]),
        (None, None) => None,
    }
    .filter(|p| !p.is_empty())
}

/// Reads and checks a `-l` file. Relative handler file names are made absolute against the
/// current directory (call before the daemon changes to `/`).
pub fn load(path: &Path) -> Result<LogConfig, LogConfigError> {
    let fail = |problem: String| LogConfigError {
        path: path.to_owned(),
        problems: vec![problem],
    };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !matches!(ext, "yaml" | "yml" | "json") {
        return Err(fail(
            "not a dictConfig file: nodepool-builder reads logging configs in YAML or JSON \
             (.yaml, .yml, .json), not the ini form of logging.config.fileConfig"
                .to_owned(),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(format!("cannot read the logging config: {e}")))?;
    let base = std::path::absolute(Path::new("."))
        .map_err(|e| fail(format!("cannot find the current directory: {e}")))?;
    parse(&text, &base).map_err(|problems| LogConfigError {
        path: path.to_owned(),
        problems,
    })
}

/// Parses a dictConfig document; relative file names are taken relative to `base`.
pub fn parse(text: &str, base: &Path) -> Result<LogConfig, Vec<String>> {
    let doc: Value = serde_yaml_ng::from_str(text).map_err(|e| vec![format!("{e}")])?;
    let Value::Mapping(top) = doc else {
        return Err(vec!["a logging config must be a mapping".to_owned()]);
    };
    let mut problems = Vec::new();
    let mut ignored = Vec::new();
    match top.get("version") {
        Some(v) if v.as_u64() == Some(1) => {}
        Some(v) => problems.push(format!("unsupported version {}", show(v))),
        None => problems.push("the version key is missing (dictConfig needs version: 1)".into()),
    }
    for (key, value) in &top {
        match key.as_str().unwrap_or("") {
            "version" | "handlers" | "loggers" | "root" | "formatters" => {}
            "disable_existing_loggers" => {}
            "incremental" if value.as_bool() == Some(false) => {}
            other => ignored.push(other.to_owned()),
        }
    }
    for (name, spec) in entries(top.get("formatters"), "formatters", &mut problems) {
        if !is_nodepool_formatter(spec) {
            ignored.push(format!("formatter {name:?}"));
        }
    }

    let mut handlers = Vec::new();
    for (name, spec) in entries(top.get("handlers"), "handlers", &mut problems) {
        let at = format!("handlers.{name}");
        let Value::Mapping(spec) = spec else {
            problems.push(format!("{at}: must be a mapping"));
            continue;
        };
        let level = match spec.get("level") {
            None => 0,
            Some(v) => match level(v) {
                Ok(l) => l,
                Err(e) => {
                    problems.push(format!("{at}.level: {e}"));
                    0
                }
            },
        };
        let class = spec.get("class").and_then(Value::as_str).unwrap_or("");
        let mut known_keys = vec!["class", "level", "formatter"];
        let destination = match class {
            "logging.handlers.WatchedFileHandler"
            | "logging.FileHandler"
            | "logging.handlers.RotatingFileHandler"
            | "logging.handlers.TimedRotatingFileHandler" => {
                known_keys.push("filename");
                if spec.get("mode").and_then(Value::as_str) == Some("a") {
                    known_keys.push("mode");
                }
                match spec.get("filename").and_then(Value::as_str) {
                    Some(f) if !f.is_empty() => Destination::File(base.join(f)),
                    _ => {
                        problems.push(format!("{at}: a {class} needs a filename"));
                        Destination::Null
                    }
                }
            }
            "logging.StreamHandler" => {
                known_keys.push("stream");
                match spec.get("stream").and_then(Value::as_str) {
                    None | Some("ext://sys.stderr") => Destination::Stderr,
                    Some("ext://sys.stdout") => Destination::Stdout,
                    Some(other) => {
                        ignored.push(format!("{at}.stream {other:?} (stderr is used)"));
                        Destination::Stderr
                    }
                }
            }
            "logging.NullHandler" => Destination::Null,
            _ => {
                let class = spec
                    .get("class")
                    .or_else(|| spec.get("()"))
                    .map(show)
                    .unwrap_or_else(|| "without a class".to_owned());
                ignored.push(format!("{at} (class {class}; its records are dropped)"));
                known_keys = Vec::new();
                Destination::Null
            }
        };
        if !known_keys.is_empty() {
            let extra: Vec<String> = spec
                .keys()
                .filter_map(|k| k.as_str())
                .filter(|k| !known_keys.contains(k))
                .map(|k| k.to_owned())
                .collect();
            if !extra.is_empty() {
                ignored.push(format!("{at}: {}", extra.join(", ")));
            }
        }
        handlers.push(Handler {
            name,
            level,
            destination,
        });
    }
    if handlers.len() > MAX_HANDLERS {
        problems.push(format!("more than {MAX_HANDLERS} handlers"));
    }

    let mut loggers = BTreeMap::new();
    let mut root = None;
    for (name, spec) in entries(top.get("loggers"), "loggers", &mut problems) {
        let at = format!("loggers.{name}");
        if let Some(spec) = logger(spec, &at, &handlers, &mut problems, &mut ignored) {
            if name.is_empty() {
                root = Some(spec);
            } else {
                loggers.insert(name, spec);
            }
        }
    }
    if let Some(spec) = top.get("root") {
        root = logger(spec, "root", &handlers, &mut problems, &mut ignored);
    }
    let mut root = root.unwrap_or(LoggerSpec {
        level: None,
        handlers: Vec::new(),
        propagate: true,
    });
    // Root always has a level: WARNING unless configured (NOTSET there means "all").
    root.level = Some(root.level.unwrap_or(WARNING));
    if let Some(Value::Mapping(r)) = top.get("root")
        && r.get("level").and_then(|v| level(v).ok()) == Some(0)
    {
        root.level = Some(0);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(LogConfig {
        handlers,
        root,
        loggers,
        ignored,
    })
}

/// The entries of a mapping section, by name; a section that is not a mapping is a problem.
fn entries<'v>(
    section: Option<&'v Value>,
    what: &str,
    problems: &mut Vec<String>,
) -> Vec<(String, &'v Value)> {
    match section {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Mapping(m)) => m
            .iter()
            .map(|(k, v)| (k.as_str().map_or_else(|| show(k), str::to_owned), v))
            .collect(),
        Some(other) => {
            problems.push(format!("{what}: must be a mapping, not {}", show(other)));
            Vec::new()
        }
    }
}

fn logger(
    spec: &Value,
    at: &str,
    handlers: &[Handler],
    problems: &mut Vec<String>,
    ignored: &mut Vec<String>,
) -> Option<LoggerSpec> {
    let spec = match spec {
        Value::Null => {
            return Some(LoggerSpec {
                level: None,
                handlers: Vec::new(),
                propagate: true,
            });
        }
        Value::Mapping(m) => m,
        _ => {
            problems.push(format!("{at}: must be a mapping"));
            return None;
        }
    };
    let level = match spec.get("level").map(level) {
        None | Some(Ok(0)) => None,
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            problems.push(format!("{at}.level: {e}"));
            None
        }
    };
    let mut indexes = Vec::new();
    match spec.get("handlers") {
        None | Some(Value::Null) => {}
        Some(Value::Sequence(names)) => {
            for n in names {
                let n = n.as_str().map_or_else(|| show(n), str::to_owned);
                match handlers.iter().position(|h| h.name == n) {
                    Some(i) => indexes.push(i),
                    None => problems.push(format!("{at}.handlers: no handler named {n:?}")),
                }
            }
        }
        Some(other) => problems.push(format!(
            "{at}.handlers: must be a list, not {}",
            show(other)
        )),
    }
    let propagate = match spec.get("propagate") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_u64() != Some(0),
        Some(other) => {
            problems.push(format!(
                "{at}.propagate: must be true or false, not {}",
                show(other)
            ));
            true
        }
    };
    let extra: Vec<&str> = spec
        .keys()
        .filter_map(|k| k.as_str())
        .filter(|k| !matches!(*k, "level" | "handlers" | "propagate"))
        .collect();
    if !extra.is_empty() {
        ignored.push(format!("{at}: {}", extra.join(", ")));
    }
    Some(LoggerSpec {
        level,
        handlers: indexes,
        propagate,
    })
}

/// A level as Python accepts it: a name (`DEBUG`, `INFO`, `WARNING`/`WARN`, `ERROR`,
/// `CRITICAL`/`FATAL`, `NOTSET`; any case) or a number.
fn level(v: &Value) -> Result<u32, String> {
    if let Some(n) = v.as_u64() {
        return u32::try_from(n).map_err(|_| format!("level {n} is too large"));
    }
    let Some(name) = v.as_str() else {
        return Err(format!("not a level: {}", show(v)));
    };
    match name.to_ascii_uppercase().as_str() {
        "NOTSET" => Ok(0),
        "DEBUG" => Ok(DEBUG),
        "INFO" => Ok(INFO),
        "WARNING" | "WARN" => Ok(WARNING),
        "ERROR" => Ok(40),
        "CRITICAL" | "FATAL" => Ok(50),
        _ => Err(format!("unknown level {name:?}")),
    }
}

/// A formatter that writes what we write anyway: nodepool's format, no date format.
fn is_nodepool_formatter(spec: &Value) -> bool {
    let Value::Mapping(m) = spec else {
        return false;
    };
    let class_ok = match m.get("class").and_then(Value::as_str) {
        None => true,
        Some(c) => matches!(
            c,
            "logging.Formatter" | "nodepool.logconfig.MultiLineFormatter"
        ),
    };
    class_ok
        && m.get("format").and_then(Value::as_str) == Some(NODEPOOL_FORMAT)
        && m.keys()
            .all(|k| matches!(k.as_str(), Some("format" | "class")))
}

/// A YAML value, short, for messages.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => serde_yaml_ng::to_string(other)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_FILES: &str = r#"
version: 1
formatters:
  simple:
    class: nodepool.logconfig.MultiLineFormatter
    format: '%(asctime)s %(levelname)s %(name)s: %(message)s'
  terse:
    format: '%(levelname)s %(message)s'
handlers:
  normal:
    class: logging.handlers.WatchedFileHandler
    filename: /var/log/nodepool/builder.log
    level: INFO
    formatter: simple
  builds:
    class: logging.handlers.RotatingFileHandler
    filename: builds-debug.log
    maxBytes: 1000000
    backupCount: 3
    formatter: terse
  console:
    class: logging.StreamHandler
    stream: ext://sys.stdout
    level: WARNING
  mail:
    class: logging.handlers.SMTPHandler
    mailhost: localhost
loggers:
  nodepool:
    level: INFO
    handlers: [normal]
  nodepool.builder.BuildWorker:
    level: DEBUG
    handlers: [builds]
  zookeeper_client:
    level: ERROR
    handlers: [console]
    propagate: false
root:
  level: WARN
  handlers: [console]
"#;

    fn two_files() -> LogConfig {
        parse(TWO_FILES, Path::new("/srv")).unwrap()
    }

    fn handler_names(cfg: &LogConfig, mask: u64) -> Vec<&str> {
        (0..cfg.handlers.len())
            .filter(|i| mask & 1 << i != 0)
            .map(|i| cfg.handlers[i].name.as_str())
            .collect()
    }

    #[test]
    fn file_stream_and_null_handlers_are_understood() {
        let cfg = two_files();
        let dest: Vec<(&str, &Destination, u32)> = cfg
            .handlers
            .iter()
            .map(|h| (h.name.as_str(), &h.destination, h.level))
            .collect();
        assert_eq!(
            dest,
            [
                (
                    "normal",
                    &Destination::File("/var/log/nodepool/builder.log".into()),
                    INFO
                ),
                (
                    "builds",
                    &Destination::File("/srv/builds-debug.log".into()),
                    0
                ),
                ("console", &Destination::Stdout, WARNING),
                ("mail", &Destination::Null, 0),
            ]
        );
    }

    #[test]
    fn levels_are_inherited_from_the_nearest_configured_ancestor() {
        let cfg = two_files();
        assert_eq!(cfg.effective_level("nodepool.builder.BuildWorker.0"), DEBUG);
        assert_eq!(cfg.effective_level("nodepool.builder.UploadWorker.0"), INFO);
        assert_eq!(cfg.effective_level("nodepool"), INFO);
        assert_eq!(cfg.effective_level("zookeeper_client::session"), 40);
        assert_eq!(cfg.effective_level("ureq::unit"), WARNING);
        assert_eq!(cfg.lowest_level(), DEBUG);
    }

    #[test]
    fn records_propagate_to_ancestor_handlers_each_with_its_level() {
        let cfg = two_files();
        let to = |name, level| handler_names(&cfg, cfg.handlers_for(name, level));
        // A build worker's DEBUG line reaches only the handler without a level.
        assert_eq!(to("nodepool.builder.BuildWorker.1", DEBUG), ["builds"]);
        // Its WARNING goes to its own file, nodepool's and root's.
        assert_eq!(
            to("nodepool.builder.BuildWorker.1", WARNING),
            ["normal", "builds", "console"]
        );
        assert_eq!(to("nodepool.builder.UploadWorker.0", INFO), ["normal"]);
        // propagate: false stops at the logger.
        assert_eq!(to("zookeeper_client::session", 40), ["console"]);
    }

    #[test]
    fn what_is_not_honoured_is_named() {
        let cfg = two_files();
        assert_eq!(
            cfg.ignored,
            [
                "formatter \"terse\"",
                "handlers.builds: maxBytes, backupCount",
                "handlers.mail (class \"logging.handlers.SMTPHandler\"; its records are dropped)",
            ]
        );
    }

    #[test]
    fn defaults_are_nodepools() {
        let cfg = LogConfig::defaults(Destination::Stderr, false);
        assert_eq!(cfg.effective_level("nodepool.builder.BuildWorker.0"), INFO);
        assert_eq!(cfg.effective_level("zookeeper_client::session"), WARNING);
        assert_eq!(cfg.handlers_for("nodepool.stack_dump", DEBUG), 1);
        let debug = LogConfig::defaults(Destination::Stderr, true);
        assert_eq!(debug.effective_level("nodepool.zk.ZooKeeper"), DEBUG);
        // -d does not turn on the ZooKeeper client's per-packet lines.
        assert_eq!(
            debug.effective_level("zookeeper_client::session::depot"),
            WARNING
        );
    }

    #[test]
    fn root_defaults_to_warning_and_notset_means_everything() {
        let cfg = parse("version: 1\nroot: {handlers: []}\n", Path::new("/")).unwrap();
        assert_eq!(cfg.effective_level("nodepool"), WARNING);
        let cfg = parse("version: 1\nroot: {level: NOTSET}\n", Path::new("/")).unwrap();
        assert_eq!(cfg.effective_level("nodepool"), 0);
        let cfg = parse(
            "version: 1\nloggers: {'': {level: DEBUG}}\n",
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(cfg.effective_level("anything"), DEBUG);
    }

    #[test]
    fn json_is_read_too() {
        let cfg = parse(
            r#"{"version": 1, "handlers": {"f": {"class": "logging.FileHandler", "filename": "x.log"}},
                "root": {"level": "INFO", "handlers": ["f"]}}"#,
            Path::new("/tmp"),
        )
        .unwrap();
        assert_eq!(
            cfg.handlers[0].destination,
            Destination::File("/tmp/x.log".into())
        );
        assert_eq!(cfg.effective_level("nodepool"), INFO);
    }

    #[test]
    fn every_problem_is_reported() {
        let problems = parse(
            r#"
version: 2
handlers:
  f: {class: logging.FileHandler, level: LOUD}
loggers:
  nodepool: {level: verbose, handlers: [f, nope], propagate: maybe}
"#,
            Path::new("/"),
        )
        .unwrap_err();
        assert_eq!(
            problems,
            [
                "unsupported version 2",
                "handlers.f.level: unknown level \"LOUD\"",
                "handlers.f: a logging.FileHandler needs a filename",
                "loggers.nodepool.level: unknown level \"verbose\"",
                "loggers.nodepool.handlers: no handler named \"nope\"",
                "loggers.nodepool.propagate: must be true or false, not \"maybe\"",
            ]
        );
        assert!(parse("- a\n- b\n", Path::new("/")).is_err());
        assert_eq!(
            parse("handlers: {}\n", Path::new("/")).unwrap_err(),
            ["the version key is missing (dictConfig needs version: 1)"]
        );
    }

    #[test]
    fn ini_files_are_refused_with_a_clear_error() {
        let err = load(Path::new("/etc/nodepool/logging.conf")).unwrap_err();
        assert!(err.to_string().contains("not the ini form"), "{err}");
        let err = load(Path::new("/nonexistent/logging.yaml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/logging.yaml: cannot read the logging config"),
            "{err}"
        );
    }

    #[test]
    fn parents_follow_dots_and_double_colons() {
        assert_eq!(
            parent("nodepool.builder.BuildWorker.0"),
            Some("nodepool.builder.BuildWorker")
        );
        assert_eq!(parent("nodepool"), None);
        assert_eq!(
            parent("zookeeper_client::session"),
            Some("zookeeper_client")
        );
        assert_eq!(parent("a::b.c"), Some("a::b"));
    }
}
