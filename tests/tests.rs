//! The one integration-test binary. Every module drives real servers (ZooKeeper, kazoo, ...);
//! nothing is mocked.
//!
//! Modules are laid out by capability (what a user of the builder relies on), not by the
//! fixture a test happens to use; each module's essay says what it covers and where its
//! neighbours' tests live. Run one capability with its path as the filter, e.g.
//! `cargo test --test integration -- uploads::glance_faults::`.

/// The aws driver's `snapshot` and `image` imports (S3 multipart + VM Import) against moto.
mod aws_imports;
/// The AWS test tooling: moto's server and the actions the AWS driver needs from it.
mod aws_tooling;
/// The aws driver: its configuration, and uploads, deletions and leak detection against moto.
mod aws_uploads;
/// Bad data: the fuzz targets' checks over the seed corpus, nasty records, mutated configs.
mod bad_data;
/// The benchmark harness at small sizes (the full run is `cargo bench`).
mod bench_smoke;
/// Building images with the test image builder: scheduling, failures, local disk space.
mod builds;
/// The janitor: retention, removals, retries, orphans, local files, no leaks.
mod cleanup;
/// The cloud drivers called directly: OpenStack against a real Glance and Keystone, command.
mod cloud_drivers;
/// The subprocess runner: process groups, timeouts, logs, clean signal state.
mod command;
/// Configuration loading: good configs, twenty broken ones with file:line:col.
mod config;
/// The process life of the real binary: foreground, daemon mode, signals, check-config.
mod daemon;
/// The image builder programs: real diskimage-builder, and the test script standing in for it.
mod dib;
/// Fault injection (ensemble failover, session expiry, crashes, many builders) with invariant checks.
mod faults;
/// The test harness itself: servers start, TLS works, kazoo connects.
mod harness;
/// The image gate: qemu-img checks and validate-command before `ready`; a broken image
/// fails its build, loses its files, is never uploaded, and backs off.
mod image_gate;
/// Logging as nodepool: `-l` dictConfig files, logger names, line format, filters.
mod logging;
/// The builder's HTTP endpoint: promtool, a real Prometheus scraping it, /healthz following
/// ZooKeeper, the JSON lists against the Python CLI, off unless configured.
mod metrics;
/// A mixed fleet: Python nodepool-builder 11 and ours on one ZooKeeper, one Glance, one
/// nodepool.yaml; side by side, takeover mid-upload, and the way back.
mod mixed_fleet;
/// nodepool.yaml read directly: a real site's file, the secure file, unsupported drivers.
mod nodepool_yaml;
/// Operator subcommands, compared with the Python nodepool CLI on the same data.
mod ops;
/// Progress lines of running builds and uploads; a failed DIB run's last log lines.
mod progress;
/// Security: mutual TLS, digest ACLs, no credentials in logs, secret file modes.
mod security;
/// SIGUSR2 stack dumps: the capture in-process, and the real daemon signalled.
mod stackdump;
/// statsd keys as upstream emits them.
mod stats;
/// systemd: watchdog fed only while the scheduler turns, STATUS=, STOPPING=1, SIGUSR1, the unit.
mod systemd;
/// House rules: every src file has a //! doc; only src/thread.rs spawns threads; the code
/// map and the test helper map are complete.
mod tidy;
/// Uploading images through the daemon: command driver, Glance, Glance faults, Glance TLS.
mod uploads;
/// Shared test tooling: real ZooKeeper servers, certificates, Python venvs, waits.
mod util;
/// The ZooKeeper layer against real ZooKeeper (plain, TLS, faults) and kazoo.
mod zk;
