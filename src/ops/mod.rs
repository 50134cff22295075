//! Operator subcommands: the image commands of upstream's `nodepool` CLI, built into
//! `nodepool-builder` so that an operator of a Rust-only site needs no Python.
//!
//! # What they do
//!
//! Each command loads the builder's configuration (`-c`, `-s`) for the ZooKeeper settings,
//! opens one ZooKeeper session, acts, and closes the session:
//!
//! | command | module | effect |
//! |---|---|---|
//! | `dib-image-list`, `image-list`, `image-status` | `list` | tables (or `--json`) |
//! | `image-build`, `dib-image-delete`, `image-delete`, `image-pause`, `image-unpause` | `change` | one znode written |
//! | `export-image-data`, `import-image-data` | `transfer` | backup and restore (wire spec §2.10) |
//!
//! Output, messages and exit codes are nodepool 11's (wire spec §5.2, §5.3): PrettyTable
//! tables, `DD:HH:MM:SS` ages, and the informational messages `Build <id> not found`,
//! `Cannot delete a build in progress`, `Image upload not found` and `Cannot delete because
//! image upload in progress` on stdout with exit code 0.
//!
//! # Deliberate differences from upstream
//!
//! * Rows are ordered: images by name, then builds by `state_time` (then id), then uploads by
//!   provider and upload id. Upstream follows ZooKeeper's child order.
//! * An error is one line on stderr, `nodepool-builder: error: <what>`, never a traceback;
//!   exit code 1, or 2 for a bad configuration or argument. Upstream's two `image-build`
//!   refusals keep their wording after the prefix.
//! * `image-pause` of an image that has no znode yet creates it (upstream fails, quirk Q13).
//! * `image-status` reports `building` whenever the image's build lock has a contender
//!   (upstream also requires that the first build id in ZooKeeper's child order was created
//!   after the lock directory, quirk Q4).
//! * `dib-image-delete` and `image-delete` write with the version they read, re-reading if a
//!   builder changed the record in between (upstream overwrites blindly).
//! * `export-image-data` replaces the file (upstream does not truncate, quirk Q8) and writes
//!   nothing unless every record could be read; `import-image-data` refuses a file holding
//!   anything but pause flags, builds and uploads, before writing anything.
//! * Image, provider and id arguments containing `/` are refused instead of addressing some
//!   other znode.
//! * Ages of records whose `state_time` lies in the future show as `00:00:00:00`.
//! * `--json` prints what the launcher webapp serves for the three listings.

mod change;
pub mod list;
mod table;
mod transfer;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::{Cli, OpsCommand};
use crate::config::{self, Config, ConfigErrors};
use crate::zk::{Zk, ZkConfig, ZkError};

/// How long a command waits for its ZooKeeper session (kazoo's default start timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long read-only commands retry after a connection loss.
const READ_RETRY: Duration = Duration::from_secs(30);

/// Runs one operator subcommand and returns the process exit code.
pub fn run(cli: &Cli, cmd: &OpsCommand) -> ExitCode {
    if cli.debug || std::env::var_os(crate::logging::LOG_ENV).is_some() {
        crate::logging::init_stderr(true);
    }
    match run_inner(cli, cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(OpsError::Config(errors)) => {
            eprintln!("{errors}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("nodepool-builder: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run_inner(cli: &Cli, cmd: &OpsCommand) -> Result<(), OpsError> {
    let cfg = config::load_with(
        &cli.config,
        cli.secure.as_deref(),
        &config::LoadOptions {
            leave_providers: cli.leave_providers.clone(),
        },
    )
    .map_err(OpsError::Config)?;
    check_arguments(cmd)?;
    let session = Session::connect(&cfg)?;
    let zk = &session.0;
    match cmd {
        OpsCommand::DibImageList { json } => print(list::dib_image_list(zk, *json)?),
        OpsCommand::ImageList { json } => print(list::image_list(zk, *json)?),
        OpsCommand::ImageStatus { json } => print(list::image_status(zk, *json)?),
        OpsCommand::ImageBuild { image } => change::image_build(zk, &cfg, image)?,
        OpsCommand::DibImageDelete { id } => print_opt(change::dib_image_delete(zk, id)?),
        OpsCommand::ImageDelete {
            provider,
            image,
            build_id,
            upload_id,
        } => print_opt(change::image_delete(
            zk, image, build_id, provider, upload_id,
        )?),
        OpsCommand::ImagePause { image } => change::set_paused(zk, image, true)?,
        OpsCommand::ImageUnpause { image } => change::set_paused(zk, image, false)?,
        OpsCommand::ExportImageData { path } => transfer::export(zk, path)?,
        OpsCommand::ImportImageData { path } => transfer::import(zk, path)?,
    }
    Ok(())
}

fn print(text: String) {
    println!("{text}");
}

fn print_opt(text: Option<String>) {
    if let Some(text) = text {
        println!("{text}");
    }
}

/// Refuses names that would address a znode other than the one meant.
fn check_arguments(cmd: &OpsCommand) -> Result<(), OpsError> {
    let names: Vec<(&str, &str)> = match cmd {
        OpsCommand::ImageBuild { image }
        | OpsCommand::ImagePause { image }
        | OpsCommand::ImageUnpause { image } => vec![("image", image)],
        OpsCommand::ImageDelete {
            provider,
            image,
            build_id,
            upload_id,
        } => vec![
            ("provider", provider),
            ("image", image),
            ("build id", build_id),
            ("upload id", upload_id),
        ],
        OpsCommand::DibImageDelete { id } => vec![("build", id)],
        _ => vec![],
    };
    for (what, name) in names {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(OpsError::BadArgument(format!(
                "invalid {what} {name:?}: it must not be empty, '.', '..' or contain '/'"
            )));
        }
    }
    Ok(())
}

/// The command's ZooKeeper session, closed when dropped (also on errors).
struct Session(Zk);

impl Session {
    fn connect(cfg: &Config) -> Result<Session, OpsError> {
        let zk_cfg = ZkConfig::from_config(cfg);
        let hosts = format!(
            "{}{}",
            zk_cfg.connect_string(),
            zk_cfg.chroot.as_deref().unwrap_or("")
        );
        let session = Session(Zk::connect(zk_cfg));
        if !session.0.wait_connected(CONNECT_TIMEOUT) {
            return Err(OpsError::Connect {
                hosts,
                timeout: CONNECT_TIMEOUT,
            });
        }
        Ok(session)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Why a subcommand failed.
#[derive(Debug)]
pub enum OpsError {
    /// The configuration could not be loaded; every problem is listed.
    Config(ConfigErrors),
    /// A command-line argument cannot be used.
    BadArgument(String),
    /// No ZooKeeper session within the deadline.
    Connect { hosts: String, timeout: Duration },
    /// A ZooKeeper call failed.
    Zk { doing: String, source: ZkError },
    /// A file could not be read or written.
    Io {
        doing: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The import file is not an export of image data.
    BadImport { path: PathBuf, why: String },
    /// Upstream's refusals of `image-build`, worded as upstream words them.
    Refused(String),
}

impl OpsError {
    fn exit_code(&self) -> u8 {
        match self {
            OpsError::Config(_) | OpsError::BadArgument(_) => 2,
            _ => 1,
        }
    }

    /// Wraps a ZooKeeper error with what was being done (`"reading /nodepool/images"`).
    fn zk(doing: impl Into<String>) -> impl FnOnce(ZkError) -> OpsError {
        let doing = doing.into();
        move |source| OpsError::Zk { doing, source }
    }
}

impl fmt::Display for OpsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpsError::Config(errors) => write!(f, "{errors}"),
            OpsError::BadArgument(why) => f.write_str(why),
            OpsError::Connect { hosts, timeout } => {
                write!(
                    f,
                    "cannot connect to zookeeper at {hosts} within {} s",
                    timeout.as_secs()
                )
            }
            OpsError::Zk { doing, source } => {
                let unknown = match source {
                    ZkError::ConnectionLoss(_) => " (a write may or may not have happened)",
                    _ => "",
                };
                write!(f, "{doing}: {source}{unknown}")
            }
            OpsError::Io {
                doing,
                path,
                source,
            } => write!(f, "{doing} {}: {source}", path.display()),
            OpsError::BadImport { path, why } => {
                write!(f, "{} is not an image data export: {why}", path.display())
            }
            OpsError::Refused(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for OpsError {}
