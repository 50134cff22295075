//! Wiring of the daemon: identity, ZooKeeper session and component registration, control
//! signals, the scheduler's workers (pools, janitor, watcher) and provider drivers, and ordered
//! shutdown.
//!
//! Start-up order matters: signal handlers first (before any worker thread), then the
//! ZooKeeper session with its new-session hooks, then the workers; "ready" is announced only
//! once ZooKeeper is connected and every thread is up, and once the component is registered
//! or one session timeout has passed trying (the registration is retried meanwhile: see
//! `zk::component`). The HTTP endpoint (`webapp`), when configured, listens before the
//! session is started, so a listen failure is a start-up error. The last step of the
//! shutdown stops every command still running (`command::stop_all`): a detached upload's
//! command and everything in its process group.
//! Under systemd, the `watchdog` thread (`service`) starts with "ready" and stops after the
//! scheduler.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded, never, unbounded};
use log::{debug, error, info, warn};

use crate::cleanup::Janitor;
use crate::command;
use crate::config::{Config, LoadOptions};
use crate::identity;
use crate::progress;
use crate::provider;
use crate::scheduler;
use crate::service::Service;
use crate::signals::{self, ControlSignal};
use crate::stats::Stats;
use crate::thread::{self, ThreadKind};
use crate::webapp::Webapp;
use crate::zk::watcher::Watcher;
use crate::zk::{Zk, ZkConfig, component};
use crate::{build, upload};

/// How long commands still running at exit get between SIGTERM and SIGKILL.
const COMMAND_STOP_GRACE: Duration = Duration::from_secs(5);

/// Daemon options from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub config_path: PathBuf,
    pub secure_path: Option<PathBuf>,
    /// Used again for every reload.
    pub load_options: LoadOptions,
    pub build_workers: usize,
    pub upload_workers: usize,
    /// systemd's notification socket and watchdog (a no-op without them).
    pub service: Service,
}

/// Runs the daemon until SIGTERM/SIGINT. `ready` is called once ZooKeeper is connected and
/// every thread is up (daemon mode uses it to release the waiting parent).
pub fn run(cfg: Config, opts: Options, ready: impl FnOnce()) -> Result<(), String> {
    let cfg = Arc::new(cfg);
    let builder_id = identity::builder_id(&cfg.images_dir)
        .map_err(|e| format!("images-dir {} is not usable: {e}", cfg.images_dir.display()))?;
    let hostname = identity::hostname();
    let fqdn = identity::fqdn();
    let (ctl_tx, ctl_rx) = unbounded();
    signals::install(ctl_tx).map_err(|e| format!("cannot install signal handlers: {e}"))?;

    let zk_cfg = ZkConfig::from_config(&cfg);
    if zk_cfg.tls.is_none() {
        warn!("ZooKeeper connection is plaintext; nodepool 11 itself requires TLS (zookeeper-tls)");
    }
    let zk = Zk::new(zk_cfg);
    let registration =
        component::register_on_every_session(&zk, hostname.clone(), identity::version());
    // Before the session: a listen failure stops the start-up, and /healthz answers (503)
    // while ZooKeeper is still being reached.
    let webapp = match cfg.builder_webapp {
        Some(addr) => match Webapp::start(addr, &zk, registration.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                zk.close();
                return Err(e);
            }
        },
        None => None,
    };
    zk.start();
    info!("Waiting for ZooKeeper {}", zk.config().connect_string());
    if !wait_for_zookeeper(&zk, &ctl_rx) {
        zk.close();
        info!("Stopped before ZooKeeper was reached");
        return Ok(());
    }
    // Like upstream, announce readiness once the component is registered, but never wait for
    // it for ever: ZooKeeper may refuse it (an ACL on the component root). After one session
    // timeout the daemon starts anyway; the registration goes on being retried.
    let registered_by = Instant::now() + zk.session_timeout();
    while registration.wait(&zk, Duration::from_millis(500)).is_none() {
        if let Ok(ControlSignal::Shutdown) = ctl_rx.try_recv() {
            zk.close();
            return Ok(());
        }
        if Instant::now() >= registered_by {
            error!(
                "the builder component is not registered yet ({}); starting anyway, the registration is retried",
                registration
                    .last_error()
                    .unwrap_or_else(|| "no answer from ZooKeeper".into())
            );
            break;
        }
    }
    debug!("Starting listener for build jobs");
    info!(
        "nodepool-builder {} ready: builder_id={builder_id} host={hostname} fqdn={fqdn} build-workers={} upload-workers={}",
        identity::version(),
        opts.build_workers,
        opts.upload_workers
    );
    ready();
    let watchdog = opts.service.start_watchdog();
    let progress = match progress::Ticker::start(cfg.progress_interval) {
        Ok(t) => Some(t),
        Err(e) => {
            error!("cannot start the progress thread, no progress lines: {e}");
            None
        }
    };

    // The scheduler thread owns everything from here; it returns after ordered shutdown.
    let stats = Stats::from_env(&fqdn);
    let (workers, sources) = start_workers(&zk, &cfg, &opts, &stats, ctl_rx);
    let setup = scheduler::Setup {
        zk: zk.clone(),
        drivers: provider_drivers(&cfg),
        make_drivers: provider_drivers,
        cfg,
        config_path: opts.config_path.clone(),
        secure_path: opts.secure_path.clone(),
        load_options: opts.load_options.clone(),
        build_workers: opts.build_workers,
        upload_workers: opts.upload_workers,
        builder_id,
        fqdn,
        stats,
        workers,
        sources,
        service: opts.service.clone(),
    };
    let sched = thread::spawn(ThreadKind::Scheduler, "scheduler", move || {
        scheduler::run(setup)
    });
    if sched.join().is_err() {
        error!("the scheduler panicked; shutting down");
    }
    drop(progress);
    drop(watchdog);
    drop(webapp);
    info!("Shutting down: closing the ZooKeeper session");
    zk.close();
    // Uploads past their grace are left to their threads, but not their commands: an
    // upload command running on would create a cloud image nobody records.
    let stopped = command::stop_all(COMMAND_STOP_GRACE);
    if stopped > 0 {
        info!("Stopped {stopped} command(s) still running");
    }
    info!("nodepool-builder stopped");
    Ok(())
}

/// Starts the scheduler's workers (build and upload pools, the janitor, the ZooKeeper
/// watcher) and the channels their results come back on.
fn start_workers(
    zk: &Zk,
    cfg: &Config,
    opts: &Options,
    stats: &Stats,
    signals: Receiver<ControlSignal>,
) -> (scheduler::Workers, scheduler::Sources) {
    let (zk_tx, zk_rx) = unbounded();
    let (build_tx, build_rx) = unbounded();
    let (cancel_tx, cancel_rx) = bounded::<()>(0);
    let builds = build::start_pool(opts.build_workers, zk, build_tx, cancel_rx, stats.clone());
    let (upload_tx, upload_rx) = unbounded();
    let uploads = upload::start_pool(opts.upload_workers, zk, upload_tx, stats.clone());
    // Cleanup disabled (`cleanup-interval = 0`): no janitor, and a source that never fires in
    // its place. A receiver whose senders are gone is always ready, so selecting on it would
    // spin the loop ahead of every other source.
    let (janitor, cleanup_rx) = if cfg.cleanup_interval > 0.0 {
        let (cleanup_tx, cleanup_rx) = unbounded();
        (Some(Janitor::start(zk, cleanup_tx)), cleanup_rx)
    } else {
        (None, never())
    };
    let watcher = Watcher::start(zk, scheduler::image_names(cfg), zk_tx);
    (
        scheduler::Workers {
            builds,
            cancel_builds: cancel_tx,
            uploads,
            janitor,
            watcher,
        },
        scheduler::Sources {
            signals,
            zk: zk_rx,
            builds: build_rx,
            uploads: upload_rx,
            cleanup: cleanup_rx,
        },
    )
}

/// Sets up the driver of every configured provider; a provider whose driver cannot be set up
/// is logged and left out (no uploads to it), as upstream does, and its format is taken from
/// the config.
fn provider_drivers(cfg: &Config) -> scheduler::Drivers {
    let mut drivers = BTreeMap::new();
    let mut formats = BTreeMap::new();
    // One set-up: the OpenStack providers share the CA stores it reads.
    let setup = provider::DriverSetup::new(None);
    for p in &cfg.providers {
        let format = match setup.driver(p) {
            Ok(d) => {
                let format = d.image_format().to_string();
                drivers.insert(p.name.clone(), Arc::from(d));
                format
            }
            Err(e) => {
                error!(
                    "provider={}: cannot set up its driver, no uploads to it: {e}",
                    p.name
                );
                match provider::configured_format(p) {
                    provider::ConfiguredFormat::Named(format) => format,
                    provider::ConfiguredFormat::DriverDefault(format) => {
                        warn!(
                            "provider={}: cannot read its cloud's image format; assuming {format}",
                            p.name
                        );
                        format.into()
                    }
                }
            }
        };
        formats.insert(p.name.clone(), format);
    }
    scheduler::Drivers { drivers, formats }
}

/// Waits until connected; returns false if asked to stop first.
fn wait_for_zookeeper(zk: &Zk, ctl_rx: &Receiver<ControlSignal>) -> bool {
    loop {
        if zk.wait_connected(Duration::from_millis(250)) {
            return true;
        }
        if let Ok(ControlSignal::Shutdown) = ctl_rx.try_recv() {
            return false;
        }
    }
}
