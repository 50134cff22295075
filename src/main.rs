//! The `nodepool-builder` binary: a thin layer over the library.
//!
//! Modes: `-d` (foreground, DEBUG to stderr), `-f` (foreground, INFO to stderr), and without
//! either the daemon mode of `daemon.rs` (detached, INFO to `--log-file`). With `-l FILE` the
//! logging config decides levels and destinations in every mode (see `logging`). The foreground
//! modes take the pidfile lock only when `-p` is given (systemd units pass it); the default
//! pidfile is left to the daemon mode, so that foreground runs by any user, and many of them
//! at once, work.
//!
//! CAUTION: in daemon mode nothing may start a thread before `daemon::daemonize`: logging,
//! the panic hook, the stack dump and the signal handlers are set up afterwards, in the
//! daemon. Before anything else, in every mode, `signals::reset_inherited` undoes the signal
//! state a parent may have handed on (an ignored SIGCHLD, a blocked SIGTERM).
//!
//! Exit codes: 0 success, 1 runtime failure (including "already running"), 2 usage or
//! configuration error.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use nodepool_builder::cli::{Cli, Command};
use nodepool_builder::daemon::{self, Pidfile, ReadyPipe, Role, StartOutcome};
use nodepool_builder::logging::{Destination, LogConfig, Prepared};
use nodepool_builder::service::Service;
use nodepool_builder::{
    app, config, identity, logging, registry, secret_files, signals, stackdump, thread,
};

const HINT: &str = "hint: run `nodepool-builder -d` to see the log in the foreground";

fn main() -> ExitCode {
    // First of all, while the process has one thread: undo the signal state a parent may
    // have handed on (an ignored SIGCHLD, a blocked SIGTERM), see `signals.rs`.
    if let Err(e) = signals::reset_inherited() {
        eprintln!("nodepool-builder: error: cannot reset the inherited signal state: {e}");
        return ExitCode::FAILURE;
    }
    // Then, still with one thread (it changes the environment).
    let notify_socket = daemon::take_notify_socket();
    let watchdog = daemon::take_watchdog();
    let service = Service::new(notify_socket.clone(), watchdog);
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let pidfile_given = matches.value_source("pidfile") == Some(ValueSource::CommandLine);
    if let Err(e) = make_paths_absolute(&mut cli) {
        eprintln!("nodepool-builder: error: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Some(Command::CheckConfig) => check_config(&cli),
        Some(Command::Ops(ref cmd)) => nodepool_builder::ops::run(&cli, cmd),
        None if cli.debug || cli.foreground => {
            run_foreground(cli, pidfile_given, notify_socket, service)
        }
        None => run_daemon(cli, notify_socket, service),
    }
}

/// The daemon changes to `/`, and reloads the configuration from the same path later.
fn make_paths_absolute(cli: &mut Cli) -> std::io::Result<()> {
    let absolute = |p: &Path| -> std::io::Result<PathBuf> {
        std::path::absolute(p).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot make {} absolute: {e}", p.display()),
            )
        })
    };
    cli.config = absolute(&cli.config)?;
    cli.secure = cli.secure.as_deref().map(absolute).transpose()?;
    cli.pidfile = absolute(&cli.pidfile)?;
    cli.log_file = absolute(&cli.log_file)?;
    cli.logconfig = cli.logconfig.as_deref().map(absolute).transpose()?;
    Ok(())
}

fn check_config(cli: &Cli) -> ExitCode {
    match config::load_with(&cli.config, cli.secure.as_deref(), &load_options(cli)) {
        Ok(cfg) => {
            let findings = secret_files::check(&cfg, cli.secure.as_deref());
            if refuse_secret_files(&findings) {
                return ExitCode::from(2);
            }
            for f in &findings {
                eprintln!("nodepool-builder: warning: {f}");
            }
            for name in &cfg.left_providers {
                println!("provider {name}: left to another builder (--leave-provider)");
            }
            for name in unmatched_leave_providers(cli, &cfg) {
                eprintln!(
                    "nodepool-builder: warning: --leave-provider {name}: {} has no provider of that name",
                    cli.config.display()
                );
            }
            println!("{}: configuration is valid", cli.config.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(2)
        }
    }
}

/// Loads the configuration and checks its secret files: a world-writable one is refused;
/// the others that others can read are returned, to be logged once logging is up.
fn load_config(cli: &Cli) -> Result<(config::Config, Vec<secret_files::Finding>), ExitCode> {
    let cfg = config::load_with(&cli.config, cli.secure.as_deref(), &load_options(cli)).map_err(
        |errors| {
            eprintln!("{errors}");
            ExitCode::from(2)
        },
    )?;
    let findings = secret_files::check(&cfg, cli.secure.as_deref());
    if refuse_secret_files(&findings) {
        return Err(ExitCode::from(2));
    }
    Ok((cfg, findings))
}

/// The logging configuration: the `-l` file, else nodepool's defaults writing to
/// `default_destination` (with `-d`, the nodepool loggers at DEBUG).
fn log_config(cli: &Cli, default_destination: Destination) -> Result<LogConfig, ExitCode> {
    match &cli.logconfig {
        Some(path) => logging::dictconfig::load(path).map_err(|e| {
            eprintln!("{e}");
            ExitCode::from(2)
        }),
        None => Ok(LogConfig::defaults(default_destination, cli.debug)),
    }
}

/// Logging is up: say once which parts of the `-l` file are not honoured.
fn warn_ignored_log_config(cli: &Cli, ignored: &[String]) {
    if let Some(path) = &cli.logconfig
        && !ignored.is_empty()
    {
        log::warn!(
            "Logging config {}: not honoured: {}",
            path.display(),
            ignored.join("; ")
        );
    }
}

/// Prints the fatal findings; true when there was one.
fn refuse_secret_files(findings: &[secret_files::Finding]) -> bool {
    let mut fatal = false;
    for f in findings.iter().filter(|f| f.is_fatal()) {
        eprintln!("nodepool-builder: error: {f}");
        fatal = true;
    }
    fatal
}

/// `--leave-provider` names that match no provider of the file: a typo, or a provider
/// removed since. Only a warning, so that a shared nodepool.yaml can drop the provider
/// without breaking this builder's reload.
fn unmatched_leave_providers<'a>(cli: &'a Cli, cfg: &config::Config) -> Vec<&'a str> {
    cli.leave_providers
        .iter()
        .filter(|name| !cfg.left_providers.contains(name))
        .map(String::as_str)
        .collect()
}

fn log_left_providers(cli: &Cli, cfg: &config::Config) {
    for name in &cfg.left_providers {
        log::info!("Provider {name} is left to another builder (--leave-provider)");
    }
    for name in unmatched_leave_providers(cli, cfg) {
        log::warn!(
            "--leave-provider {name}: {} has no provider of that name",
            cli.config.display()
        );
    }
}

fn warn_secret_files(findings: &[secret_files::Finding]) {
    for f in findings {
        log::warn!("{f}");
    }
}

fn load_options(cli: &Cli) -> config::LoadOptions {
    config::LoadOptions {
        leave_providers: cli.leave_providers.clone(),
    }
}

fn options(cli: &Cli, service: Service) -> app::Options {
    app::Options {
        service,
        config_path: cli.config.clone(),
        secure_path: cli.secure.clone(),
        load_options: load_options(cli),
        build_workers: cli.build_workers.into(),
        upload_workers: cli.upload_workers.into(),
    }
}

/// Logging is up: the panic hook, the main thread's registration and the stack dump.
fn install_diagnostics() -> registry::Registration {
    // A handful of threads that allocate little: two malloc arenas are plenty, and keep the
    // resident set small (glibc would otherwise make one per thread, up to 8 per core).
    // SAFETY: mallopt only changes glibc's allocator settings; called before worker threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    thread::install_panic_hook();
    let main = registry::register_current_thread("main");
    if let Err(e) = stackdump::install(stackdump::Config::default()) {
        log::warn!("SIGUSR2 stack dumps unavailable: {e}");
    }
    main
}

fn notify_ready(socket: Option<&OsString>, state: &str) {
    if let Some(socket) = socket
        && let Err(e) = daemon::notify(socket, state)
    {
        log::warn!("cannot notify systemd at {}: {e}", socket.to_string_lossy());
    }
}

fn remove_pidfile(pidfile: Option<Pidfile>) {
    if let Some(pidfile) = pidfile {
        let path = pidfile.path().to_owned();
        if let Err(e) = pidfile.remove() {
            log::warn!("cannot remove pidfile {}: {e}", path.display());
        }
    }
}

fn run_foreground(
    cli: Cli,
    pidfile_given: bool,
    notify_socket: Option<OsString>,
    service: Service,
) -> ExitCode {
    let (cfg, findings) = match load_config(&cli) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let log_cfg = match log_config(&cli, Destination::Stderr) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let pidfile = if pidfile_given {
        let taken = Pidfile::acquire(&cli.pidfile).and_then(|p| {
            p.write_pid(std::process::id())
                .map(|()| p)
                .map_err(|source| daemon::PidfileError::Io {
                    action: "write the pidfile",
                    path: cli.pidfile.clone(),
                    source,
                })
        });
        match taken {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("nodepool-builder: error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let ignored = log_cfg.ignored.clone();
    let logging_up = Prepared::open(log_cfg)
        .map_err(|e| e.to_string())
        .and_then(|p| logging::install(p, logging::Mode::Foreground).map_err(|e| e.to_string()));
    if let Err(e) = logging_up {
        eprintln!("nodepool-builder: error: {e}");
        remove_pidfile(pidfile);
        return ExitCode::FAILURE;
    }
    let _main = install_diagnostics();
    warn_ignored_log_config(&cli, &ignored);
    warn_secret_files(&findings);
    log_left_providers(&cli, &cfg);
    let result = app::run(cfg, options(&cli, service), || {
        notify_ready(notify_socket.as_ref(), "READY=1")
    });
    remove_pidfile(pidfile);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("nodepool-builder: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_daemon(cli: Cli, notify_socket: Option<OsString>, service: Service) -> ExitCode {
    daemon::close_inherited_fds();
    let (cfg, findings) = match load_config(&cli) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let log_cfg = match log_config(&cli, Destination::File(cli.log_file.clone())) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let pidfile = match Pidfile::acquire(&cli.pidfile) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("nodepool-builder: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let log = match Prepared::open(log_cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("nodepool-builder: error: {e}");
            let _ = pidfile.remove();
            return ExitCode::FAILURE;
        }
    };
    let ready = match daemon::daemonize(&pidfile, daemon::START_TIMEOUT) {
        Ok(Role::Daemon(ready)) => ready,
        Ok(Role::Parent(outcome)) => return report_start(outcome, log.main_file()),
        Err(e) => {
            eprintln!("nodepool-builder: error: cannot daemonize: {e}");
            let _ = pidfile.remove();
            return ExitCode::FAILURE;
        }
    };

    // The daemon, still with one thread.
    if let Err(e) = pidfile.write_pid(std::process::id()) {
        let message = format!("cannot write the pidfile {}: {e}", cli.pidfile.display());
        log.write_early(&format!("nodepool-builder: error: {message}"));
        ready.fail(&message);
        return ExitCode::FAILURE;
    }
    let ignored = log.ignored().to_vec();
    if let Err(e) = logging::install(log, logging::Mode::Daemon) {
        ready.fail(&format!("cannot set up logging: {e}"));
        return ExitCode::FAILURE;
    }
    let _main = install_diagnostics();
    warn_ignored_log_config(&cli, &ignored);
    log::info!(
        "nodepool-builder {} starting as a daemon: pid {}, pidfile {}, config {}",
        identity::version(),
        std::process::id(),
        cli.pidfile.display(),
        cli.config.display()
    );
    warn_secret_files(&findings);
    log_left_providers(&cli, &cfg);
    let result = run_daemon_app(cfg, &cli, &ready, notify_socket.as_ref(), service);
    remove_pidfile(Some(pidfile));
    match result {
        Ok(()) => {
            log::info!("nodepool-builder exits");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("{e}");
            // Reaches the starting command only if it failed before being ready.
            ready.fail(&e);
            ExitCode::FAILURE
        }
    }
}

fn run_daemon_app(
    cfg: config::Config,
    cli: &Cli,
    ready: &ReadyPipe,
    notify_socket: Option<&OsString>,
    service: Service,
) -> Result<(), String> {
    app::run(cfg, options(cli, service), || {
        // systemd first: once the starting command has exited, everything is announced.
        notify_ready(
            notify_socket,
            &format!("READY=1\nMAINPID={}", std::process::id()),
        );
        ready.ready();
    })
}

/// In the command that started the daemon: say how it went and pick the exit code.
fn report_start(outcome: StartOutcome, main_log: Option<&Path>) -> ExitCode {
    let log = main_log.map_or_else(
        || "the log of the logging config".to_owned(),
        |p| p.display().to_string(),
    );
    match outcome {
        StartOutcome::Ready => return ExitCode::SUCCESS,
        StartOutcome::Failed(message) => eprintln!("nodepool-builder: error: {message}"),
        StartOutcome::Vanished => {
            eprintln!("nodepool-builder: error: the daemon exited during start-up; see {log}")
        }
        StartOutcome::NotReadyYet { pid } => {
            let pid = pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
            eprintln!(
                "nodepool-builder: error: the daemon (pid {pid}) is not ready after {}s (is ZooKeeper reachable?); it keeps trying in the background; see {log}",
                daemon::START_TIMEOUT.as_secs()
            );
        }
    }
    eprintln!("{HINT}");
    ExitCode::FAILURE
}
