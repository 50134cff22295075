//! Logging as nodepool 11 does it: its logger names, its line format, its `-l` configs.
//!
//! Every record is renamed to the logger nodepool would have used ([`names`]:
//! `nodepool.builder.BuildWorker.0`, `nodepool.zk.ZooKeeper`, …), filtered, formatted as
//! `%(asctime)s %(levelname)s %(name)s: %(message)s` with continuation lines indented
//! ([`format`]), and written to the handlers a Python-style configuration ([`dictconfig`])
//! routes it to. So grep patterns, alerts and filters written for nodepool keep working.
//!
//! Which configuration (wire spec §6.2):
//!
//! * `-l FILE`: the handlers and logger levels of the dictConfig file; `-d`/`-f` then only
//!   mean "foreground", as upstream.
//! * otherwise [`LogConfig::defaults`]: the `nodepool` loggers at INFO (DEBUG with `-d`), all
//!   others (the ZooKeeper client, TLS, HTTP) at WARNING, like upstream's kazoo/requests
//!   loggers; so `-d` does not show the ZooKeeper client's per-packet DEBUG lines. Written
//!   to stderr in the foreground (upstream writes to stdout), or to the `--log-file` in
//!   daemon mode.
//! * `NODEPOOL_BUILDER_LOG` (env_logger directives, matched against the nodepool names,
//!   e.g. `info,nodepool.builder.BuildWorker=debug,zookeeper_client=debug`), when set and
//!   not empty, decides which records are emitted instead of the logger levels; handler levels and
//!   routing still apply.
//!
//! Files: every file handler's file is opened with `O_APPEND` (so logrotate's
//! `copytruncate` leaves no hole and concurrent writers never overwrite each other) before
//! the daemon forks, so an unusable path is reported at once. [`reopen`] (SIGHUP) opens every
//! path again and swaps the new file in: after logrotate has renamed the old file, the
//! following lines go to a new file at the configured path. A record is formatted into one
//! buffer and written with one `write_all` under the file's mutex, so it is never split
//! between the old and the new file, nor interleaved with another thread's.
//!
//! In daemon mode fds 0–2 are `/dev/null` (as under upstream's DaemonContext, stream
//! handlers therefore write nothing), except that the main log file (the first file handler
//! of the root logger, else the first file handler) is also `dup2`ed onto fd 2, so that panic
//! messages and anything else written to stderr land in it.
//!
//! CAUTION: nothing may log while holding a file mutex (the logger would take it again).

pub mod dictconfig;
pub mod format;
pub mod names;

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use log::{LevelFilter, Log, Metadata, Record};

pub use dictconfig::{Destination, LogConfig, LogConfigError};

/// Environment variable holding an env_logger filter, e.g. `info,nodepool.stack_dump=debug`.
pub const LOG_ENV: &str = "NODEPOOL_BUILDER_LOG";

/// The installed logger.
static LOGGER: OnceLock<NodepoolLogger> = OnceLock::new();

/// Where the process runs; decides what stream handlers and fd 2 mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `-d`, `-f`, operator subcommands: stream handlers write to the terminal.
    Foreground,
    /// Detached: stdio is `/dev/null`; the main log file also receives fd 2.
    Daemon,
}

/// Opening a log file failed.
#[derive(Debug)]
pub struct LogFileError {
    /// What was being done, e.g. "create the log directory".
    pub action: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

impl std::fmt::Display for LogFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot {} {}: {}",
            self.action,
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for LogFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A configuration with its files open, ready for [`install`] (possibly after a fork).
pub struct Prepared {
    config: LogConfig,
    /// The open file of each file handler, by handler index.
    files: Vec<Option<File>>,
}

impl Prepared {
    /// Opens every file handler's file (see [`open_log_file`]).
    pub fn open(config: LogConfig) -> Result<Prepared, LogFileError> {
        let files = config
            .handlers
            .iter()
            .map(|h| match &h.destination {
                Destination::File(path) => open_log_file(path).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        Ok(Prepared { config, files })
    }

    /// The main log file: the first file handler of root, else the first file handler.
    pub fn main_file(&self) -> Option<&Path> {
        main_file_index(&self.config).map(|i| match &self.config.handlers[i].destination {
            Destination::File(p) => p.as_path(),
            _ => unreachable!("main_file_index picks file handlers"),
        })
    }

    /// Parts of a `-l` file that are not honoured (to be logged once logging is up).
    pub fn ignored(&self) -> &[String] {
        &self.config.ignored
    }

    /// Writes a line straight into the main file, for errors before [`install`].
    pub fn write_early(&self, line: &str) {
        if let Some(i) = main_file_index(&self.config)
            && let Some(mut f) = self.files[i].as_ref()
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

fn main_file_index(config: &LogConfig) -> Option<usize> {
    let is_file = |&i: &usize| matches!(config.handlers[i].destination, Destination::File(_));
    config
        .root
        .handlers
        .iter()
        .copied()
        .find(is_file)
        .or_else(|| (0..config.handlers.len()).find(is_file))
}

/// Installs the logger writing to stderr with the default configuration (operator
/// subcommands, which run in the foreground without `-l`).
pub fn init_stderr(debug: bool) {
    let prepared = Prepared::open(LogConfig::defaults(Destination::Stderr, debug))
        .expect("a stderr-only configuration opens no file");
    let _ = install(prepared, Mode::Foreground);
}

/// Installs the logger. In [`Mode::Daemon`] the main log file is also pointed at by fd 2.
///
/// Returns an error if a logger was already installed or fd 2 cannot be redirected.
pub fn install(prepared: Prepared, mode: Mode) -> io::Result<()> {
    let Prepared { config, mut files } = prepared;
    let stderr_file = match mode {
        Mode::Daemon => main_file_index(&config),
        Mode::Foreground => None,
    };
    if let Some(file) = stderr_file.and_then(|i| files[i].as_ref()) {
        redirect_stderr(file)?;
    }
    let sinks = config
        .handlers
        .iter()
        .zip(files.iter_mut())
        .map(|(h, file)| match (&h.destination, mode) {
            (Destination::File(path), _) => Sink::File(FileSink {
                path: path.clone(),
                file: Mutex::new(file.take().expect("opened by Prepared::open")),
            }),
            (Destination::Stderr, Mode::Foreground) => Sink::Stderr,
            (Destination::Stdout, Mode::Foreground) => Sink::Stdout,
            _ => Sink::Null,
        })
        .collect();
    let env = env_filter().map(|filter| env_logger::Builder::new().parse_filters(&filter).build());
    let max_level = match &env {
        Some(env) => env.filter(),
        None => level_filter(config.lowest_level()),
    };
    let logger = NodepoolLogger {
        config,
        env,
        sinks,
        stderr_file,
    };
    if LOGGER.set(logger).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "logging is already set up",
        ));
    }
    log::set_logger(LOGGER.get().expect("just set"))
        .map_err(|e| io::Error::new(io::ErrorKind::AlreadyExists, e))?;
    log::set_max_level(max_level);
    Ok(())
}

/// `NODEPOOL_BUILDER_LOG`, unless unset or empty (`NODEPOOL_BUILDER_LOG= cmd` clears it).
fn env_filter() -> Option<String> {
    std::env::var(LOG_ENV).ok().filter(|f| !f.trim().is_empty())
}

/// The least `log` level filter that lets records at Python level `level` through.
fn level_filter(level: u32) -> LevelFilter {
    match level {
        0..=5 => LevelFilter::Trace,
        6..=10 => LevelFilter::Debug,
        11..=20 => LevelFilter::Info,
        21..=30 => LevelFilter::Warn,
        31..=40 => LevelFilter::Error,
        _ => LevelFilter::Off,
    }
}

/// Opens (creating it, and its missing parent directories with mode 0755) a log file for
/// appending. Call it before forking, so that an unusable path is reported at once.
pub fn open_log_file(path: &Path) -> Result<File, LogFileError> {
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| LogFileError {
                action: "create the log directory",
                path: dir.to_owned(),
                source,
            })?;
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)
        .map_err(|source| LogFileError {
            action: "open the log file",
            path: path.to_owned(),
            source,
        })
}

/// Reopens every log file at its configured path (SIGHUP, after logrotate moved it away)
/// and logs the outcome. Does nothing when logging goes to no file.
///
/// On failure the old file stays in use and a warning says why.
pub fn reopen() {
    let Some(logger) = LOGGER.get() else {
        return;
    };
    for (i, sink) in logger.sinks.iter().enumerate() {
        let Sink::File(target) = sink else {
            continue;
        };
        match open_log_file(&target.path) {
            Ok(file) => {
                let redirected = if logger.stderr_file == Some(i) {
                    redirect_stderr(&file)
                } else {
                    Ok(())
                };
                // The old file is closed when the guard's previous value drops, after the swap.
                let old = std::mem::replace(&mut *target.lock(), file);
                drop(old);
                log::info!("Reopened log file {}", target.path.display());
                if let Err(e) = redirected {
                    log::warn!("cannot point stderr at the reopened log file: {e}");
                }
            }
            Err(e) => log::warn!("{e}; still writing to the previous log file"),
        }
    }
}

/// The logger: nodepool names, then the level decision, then the handlers.
struct NodepoolLogger {
    config: LogConfig,
    /// `NODEPOOL_BUILDER_LOG`, which replaces the logger levels when set.
    env: Option<env_logger::Logger>,
    /// One per handler of `config`.
    sinks: Vec<Sink>,
    /// The sink whose file is also fd 2 (daemon mode).
    stderr_file: Option<usize>,
}

impl NodepoolLogger {
    fn emitted(&self, name: &str, level: log::Level) -> bool {
        match &self.env {
            Some(env) => env.enabled(&Metadata::builder().level(level).target(name).build()),
            None => format::python_level(level) >= self.config.effective_level(name),
        }
    }
}

impl Log for NodepoolLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let thread = std::thread::current();
        let name = names::logger_name(metadata.target(), thread.name());
        self.emitted(&name, metadata.level())
    }

    fn log(&self, record: &Record<'_>) {
        let thread = std::thread::current();
        let name = names::logger_name(record.target(), thread.name());
        if !self.emitted(&name, record.level()) {
            return;
        }
        let mask = self
            .config
            .handlers_for(&name, format::python_level(record.level()));
        if mask == 0 {
            return;
        }
        let message = match record.args().as_str() {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(record.args().to_string()),
        };
        let asctime = format::LocalTime::of(SystemTime::now()).asctime();
        let mut line = Vec::with_capacity(asctime.len() + name.len() + message.len() + 16);
        format::format_record(
            &mut line,
            &asctime,
            format::level_name(record.level()),
            &name,
            &message,
        );
        for (i, sink) in self.sinks.iter().enumerate() {
            if mask & 1 << i != 0 {
                sink.write(&line);
            }
        }
    }

    fn flush(&self) {}
}

/// Where one handler's lines go.
enum Sink {
    Stderr,
    Stdout,
    Null,
    File(FileSink),
}

impl Sink {
    fn write(&self, line: &[u8]) {
        // A log line that cannot be written has nowhere to be reported.
        let _ = match self {
            Sink::Stderr => io::stderr().lock().write_all(line),
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line).and_then(|()| out.flush())
            }
            Sink::Null => Ok(()),
            Sink::File(f) => f.lock().write_all(line),
        };
    }
}

struct FileSink {
    path: PathBuf,
    file: Mutex<File>,
}

impl FileSink {
    fn lock(&self) -> MutexGuard<'_, File> {
        // A panic while writing leaves the file usable; keep logging.
        self.file.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Points fd 2 at `file`.
fn redirect_stderr(file: &File) -> io::Result<()> {
    // SAFETY: dup2 on a descriptor we own onto fd 2; fd 2 stays open throughout (dup2
    // replaces it atomically), so no other code sees a closed stderr.
    if unsafe { libc::dup2(file.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_levels_map_to_the_least_log_filter_that_passes_them() {
        assert_eq!(level_filter(0), LevelFilter::Trace);
        assert_eq!(level_filter(dictconfig::DEBUG), LevelFilter::Debug);
        assert_eq!(level_filter(15), LevelFilter::Info);
        assert_eq!(level_filter(dictconfig::WARNING), LevelFilter::Warn);
        assert_eq!(level_filter(40), LevelFilter::Error);
        assert_eq!(level_filter(50), LevelFilter::Off);
    }

    #[test]
    fn the_main_file_is_roots_first_file_handler() {
        let cfg = dictconfig::parse(
            r#"
version: 1
handlers:
  a: {class: logging.FileHandler, filename: a.log}
  console: {class: logging.StreamHandler}
  b: {class: logging.FileHandler, filename: b.log}
root: {handlers: [console, b]}
"#,
            Path::new("/x"),
        )
        .unwrap();
        assert_eq!(main_file_index(&cfg), Some(2));
        let none = LogConfig::defaults(Destination::Stderr, false);
        assert_eq!(main_file_index(&none), None);
    }
}
