//! Command line of `nodepool-builder`: upstream's daemon flags plus operator subcommands.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Default config path (nodepool's is nodepool.yaml; ours is TOML).
pub const DEFAULT_CONFIG: &str = "/etc/nodepool/nodepool-builder.toml";
/// Default pidfile, as upstream.
pub const DEFAULT_PIDFILE: &str = "/var/run/nodepool/nodepool-builder.pid";
/// Default daemon log file, as upstream.
pub const DEFAULT_LOG_FILE: &str = "/var/log/nodepool/nodepool-builder.log";

/// Builds and uploads disk images for nodepool; a drop-in replacement for nodepool-builder 11.
#[derive(Debug, Parser)]
#[command(name = "nodepool-builder", version, about)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(short = 'c', long = "config", global = true, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Secure configuration file (credentials, ZooKeeper servers and TLS).
    #[arg(short = 's', long = "secure", global = true)]
    pub secure: Option<PathBuf>,
    /// Pid file (locked while the daemon runs).
    #[arg(short = 'p', long = "pidfile", default_value = DEFAULT_PIDFILE)]
    pub pidfile: PathBuf,
    /// Do not daemonize; DEBUG logging to stderr.
    #[arg(short = 'd')]
    pub debug: bool,
    /// Do not daemonize; INFO logging to stderr.
    #[arg(short = 'f')]
    pub foreground: bool,
    /// Log file in daemon mode (reopened on SIGHUP).
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
}
