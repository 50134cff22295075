//! The `nodepool-builder` binary: a thin layer over the library.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.

use std::process::ExitCode;

use clap::Parser;
use nodepool_builder::cli::{Cli, Command};
use nodepool_builder::{app, config, logging, registry, stackdump, thread};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig) => check_config(&cli),
        None => run_daemon(cli),
    }
}

fn check_config(cli: &Cli) -> ExitCode {
    match config::load(&cli.config, cli.secure.as_deref()) {
        Ok(_) => {
            println!("{}: configuration is valid", cli.config.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(2)
        }
    }
}

fn run_daemon(cli: Cli) -> ExitCode {
    if !cli.debug && !cli.foreground {
        eprintln!("nodepool-builder: error: daemon mode is not available yet; run with -f or -d");
        return ExitCode::from(2);
    }
    let cfg = match config::load(&cli.config, cli.secure.as_deref()) {
        Ok(cfg) => cfg,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    logging::init_stderr(cli.debug);
    thread::install_panic_hook();
    let _main = registry::register_current_thread("main");
    if let Err(e) = stackdump::install(stackdump::Config::default()) {
        log::warn!("SIGUSR2 stack dumps unavailable: {e}");
    }
    let opts = app::Options {
        config_path: cli.config.clone(),
        secure_path: cli.secure.clone(),
        build_workers: cli.build_workers.into(),
        upload_workers: cli.upload_workers.into(),
    };
    match app::run(cfg, opts, || {}) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("nodepool-builder: error: {e}");
            ExitCode::FAILURE
        }
    }
}
