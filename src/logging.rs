//! Logging: env_logger with `timestamp LEVEL [thread] target: message` lines, so log lines
//! correlate with stack dumps. The filter comes from `NODEPOOL_BUILDER_LOG` (env_logger
//! syntax), else INFO (DEBUG with `-d`).
//!
//! Two destinations:
//!
//! * Foreground (`-d`, `-f`): stderr, through [`init_stderr`].
//! * Daemon mode: the log file (`--log-file`), through [`init_file`]. The file is opened with
//!   `O_APPEND` (so `copytruncate` leaves no hole and concurrent writers never overwrite each
//!   other), and is also `dup2`ed onto fd 2, so that panic messages and anything else written
//!   to stderr land in it. [`reopen`] (called on SIGHUP) opens the path again and swaps the
//!   new file in: after logrotate has renamed the old file, the following lines go to a new
//!   file at the configured path.
//!
//! The current file sits behind a mutex inside a writer handed to env_logger as
//! `Target::Pipe`. env_logger formats a whole record into a buffer and writes it with one
//! `write_all`, so a record is never split between the old and the new file.
//!
//! CAUTION: nothing may log while holding the file mutex (the logger would take it again).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Environment variable holding an env_logger filter, e.g. `info,nodepool.stack_dump=debug`.
pub const LOG_ENV: &str = "NODEPOOL_BUILDER_LOG";

/// The log file of daemon mode, once [`init_file`] has run.
static FILE_TARGET: OnceLock<FileTarget> = OnceLock::new();

struct FileTarget {
    path: PathBuf,
    file: Mutex<File>,
}

impl FileTarget {
    fn lock(&self) -> MutexGuard<'_, File> {
        // A panic while writing leaves the file usable; keep logging.
        self.file.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Opening the log file failed.
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

/// Installs the logger writing to stderr (foreground modes).
pub fn init_stderr(debug: bool) {
    let default = if debug { "debug" } else { "info" };
    builder(default).target(env_logger::Target::Stderr).init();
}

/// Opens (creating it, and its missing parent directories with mode 0755) the daemon log file
/// for appending. Call it before forking, so that an unusable path is reported at once.
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

/// Installs the logger writing to `file` (opened by [`open_log_file`] from `path`) at INFO
/// unless `NODEPOOL_BUILDER_LOG` says otherwise, and points fd 2 at the file.
///
/// Returns an error if the logger was already installed or fd 2 cannot be redirected.
pub fn init_file(file: File, path: PathBuf) -> io::Result<()> {
    redirect_stderr(&file)?;
    let target = FileTarget {
        path,
        file: Mutex::new(file),
    };
    if FILE_TARGET.set(target).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the log file is already set up",
        ));
    }
    builder("info")
        .write_style(env_logger::WriteStyle::Never)
        .target(env_logger::Target::Pipe(Box::new(CurrentFile)))
        .try_init()
        .map_err(|e| io::Error::new(io::ErrorKind::AlreadyExists, e))
}

/// The daemon log file, if logging goes to one.
pub fn log_file_path() -> Option<&'static Path> {
    FILE_TARGET.get().map(|t| t.path.as_path())
}

/// Reopens the log file at its configured path (SIGHUP, after logrotate moved it away) and
/// logs the outcome. Does nothing when logging goes to stderr.
///
/// On failure the old file stays in use and a warning says why.
pub fn reopen() {
    let Some(target) = FILE_TARGET.get() else {
        return;
    };
    match open_log_file(&target.path) {
        Ok(file) => {
            let redirected = redirect_stderr(&file);
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

/// The env_logger builder with our line format and the filter from [`LOG_ENV`].
fn builder(default_filter: &str) -> env_logger::Builder {
    let filter = std::env::var(LOG_ENV).unwrap_or_else(|_| default_filter.to_string());
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(&filter).format(|buf, record| {
        let thread = std::thread::current();
        writeln!(
            buf,
            "{} {} [{}] {}: {}",
            buf.timestamp_millis(),
            record.level(),
            thread.name().unwrap_or("?"),
            record.target(),
            record.args()
        )
    });
    builder
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

/// The writer env_logger gets: writes to whatever file is current.
struct CurrentFile;

impl CurrentFile {
    fn target() -> io::Result<&'static FileTarget> {
        FILE_TARGET
            .get()
            .ok_or_else(|| io::Error::other("the log file is not set up"))
    }
}

impl Write for CurrentFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Self::target()?.lock().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        // One lock for the whole record, so a reopen never splits it.
        Self::target()?.lock().write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Self::target()?.lock().flush()
    }
}
