//! Command line of `nodepool-builder`: upstream's daemon flags plus operator subcommands.
//!
//! Our additions: `--leave-provider NAME` (a provider of a shared nodepool.yaml that another
//! builder serves) and `check-config`. `-c` defaults to our TOML file when it exists and
//! to nodepool's `/etc/nodepool/nodepool.yaml` otherwise, so that an installation made for
//! nodepool's builder runs unchanged.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

/// Default config path: ours, in TOML.
pub const DEFAULT_CONFIG: &str = "/etc/nodepool/nodepool-builder.toml";
/// nodepool's default config path, used when [`DEFAULT_CONFIG`] does not exist.
pub const DEFAULT_NODEPOOL_CONFIG: &str = "/etc/nodepool/nodepool.yaml";
/// Default pidfile, as upstream.
pub const DEFAULT_PIDFILE: &str = "/var/run/nodepool/nodepool-builder.pid";
/// Default daemon log file, as upstream.
pub const DEFAULT_LOG_FILE: &str = "/var/log/nodepool/nodepool-builder.log";

/// The `-c` default: [`DEFAULT_CONFIG`] if it exists, else nodepool's [`DEFAULT_NODEPOOL_CONFIG`].
pub fn default_config() -> PathBuf {
    choose_default_config(|path| path.exists())
}

/// [`default_config`] with the existence check as a parameter.
pub fn choose_default_config(exists: impl Fn(&Path) -> bool) -> PathBuf {
    if exists(Path::new(DEFAULT_CONFIG)) {
        PathBuf::from(DEFAULT_CONFIG)
    } else {
        PathBuf::from(DEFAULT_NODEPOOL_CONFIG)
    }
}

/// Builds and uploads disk images for nodepool; a drop-in replacement for nodepool-builder 11.
#[derive(Debug, Parser)]
#[command(name = "nodepool-builder", version, about)]
pub struct Cli {
    /// Configuration file: our TOML or nodepool's nodepool.yaml (default: the TOML file if it
    /// exists, else /etc/nodepool/nodepool.yaml).
    #[arg(short = 'c', long = "config", global = true, default_value_os_t = default_config())]
    pub config: PathBuf,
    /// Secure configuration file (credentials, ZooKeeper servers and TLS).
    #[arg(short = 's', long = "secure", global = true)]
    pub secure: Option<PathBuf>,
    /// Leave this provider of the config to another builder (e.g. nodepool's, for a driver
    /// this one cannot upload to): no uploads, no cleanup. Repeatable.
    #[arg(long = "leave-provider", value_name = "NAME", global = true)]
    pub leave_providers: Vec<String>,
    /// Pid file (locked while the daemon runs).
    #[arg(short = 'p', long = "pidfile", default_value = DEFAULT_PIDFILE)]
    pub pidfile: PathBuf,
    /// Do not daemonize; DEBUG logging to stderr (unless -l).
    #[arg(short = 'd')]
    pub debug: bool,
    /// Do not daemonize; INFO logging to stderr (unless -l).
    #[arg(short = 'f')]
    pub foreground: bool,
    /// Python logging dictConfig (.yaml, .yml, .json): its file and stream handlers and
    /// logger levels replace the default logging (file handlers are reopened on SIGHUP).
    #[arg(short = 'l', value_name = "LOGCONFIG")]
    pub logconfig: Option<PathBuf>,
    /// Log file in daemon mode without -l (reopened on SIGHUP).
    #[arg(long = "log-file", default_value = DEFAULT_LOG_FILE)]
    pub log_file: PathBuf,
    /// Number of build worker threads.
    #[arg(long = "build-workers", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub build_workers: u16,
    /// Number of upload worker threads.
    #[arg(long = "upload-workers", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub upload_workers: u16,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Operator subcommands; without one, the daemon runs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration and exit 0 (valid) or 2 (every error listed).
    CheckConfig,
    /// Operator commands on the image data in ZooKeeper (`nodepool`'s image subcommands).
    #[command(flatten)]
    Ops(OpsCommand),
}

/// The image subcommands of upstream's `nodepool` CLI, run against the ZooKeeper named in the
/// builder's own config (`-c`, `-s`). Output, messages and exit codes follow nodepool 11
/// (wire spec §5.2, §5.3); see `ops` for the deliberate differences.
#[derive(Debug, Subcommand)]
pub enum OpsCommand {
    /// List every build of every image.
    DibImageList {
        /// Print JSON (the launcher webapp's field names) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List every upload of every build.
    ImageList {
        /// Print JSON (the launcher webapp's field names) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show every image's pause flag and manual build request.
    ImageStatus {
        /// Print JSON (the launcher webapp's field names) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Request a build of a configured diskimage.
    ImageBuild {
        /// The diskimage name.
        image: String,
    },
    /// Mark a build (and so its uploads) for deletion.
    DibImageDelete {
        /// `<image>-<build id>`, as `dib-image-list` shows it.
        id: String,
    },
    /// Mark one upload for deletion.
    ImageDelete {
        /// Provider name.
        #[arg(long)]
        provider: String,
        /// Image name.
        #[arg(long)]
        image: String,
        /// Build id.
        #[arg(long = "build-id")]
        build_id: String,
        /// Upload id.
        #[arg(long = "upload-id")]
        upload_id: String,
    },
    /// Pause the builds of an image (on every builder).
    ImagePause {
        /// The image name.
        image: String,
    },
    /// Resume the builds of an image.
    ImageUnpause {
        /// The image name.
        image: String,
    },
    /// Write every pause flag, build and upload record to a JSON file (mode 0600).
    ExportImageData {
        /// The output file (replaced).
        path: PathBuf,
    },
    /// Restore pause flags, builds and uploads from a file written by export-image-data.
    ImportImageData {
        /// The file to read.
        path: PathBuf,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_prefers_our_toml_and_falls_back_to_nodepool_yaml() {
        assert_eq!(
            choose_default_config(|p| p == Path::new(DEFAULT_CONFIG)),
            Path::new(DEFAULT_CONFIG)
        );
        assert_eq!(
            choose_default_config(|_| false),
            Path::new(DEFAULT_NODEPOOL_CONFIG)
        );
    }
}
