//! The one integration-test binary. Every module drives real servers (ZooKeeper, kazoo, ...);
//! nothing is mocked.

/// Configuration loading: good configs, twenty broken ones with file:line:col.
mod config;
/// The test harness itself: servers start, TLS works, kazoo connects.
mod harness;
/// SIGUSR2 stack capture of registered threads, in-process.
mod stackdump;
/// House rules: every src file has a //! doc; only src/thread.rs spawns threads.
mod tidy;
/// Shared test tooling: real ZooKeeper servers, certificates, Python venvs, waits.
mod util;
/// The ZooKeeper layer against real ZooKeeper (plain, TLS, faults) and kazoo.
mod zk;
/// The real binary: foreground daemon over TLS, signals, check-config.
mod daemon;
/// The subprocess runner: process groups, timeouts, logs, clean signal state.
mod command;
/// The test image builder script that stands in for diskimage-builder.
mod fake_dib;
/// Cloud drivers against a real Glance (and Keystone) from PyPI.
mod glance;
/// The build pipeline: the real binary, real ZooKeeper, the test image builder.
mod builds;
/// Daemon mode: fork, pidfile, readiness, log file, SIGHUP.
mod daemon_mode;
/// SIGUSR2 stack dumps of the real daemon.
mod stackdump_daemon;
/// The upload pipeline with the command driver and a directory cloud.
mod uploads;
/// The janitor: retention, removals, retries, orphans, local files, no leaks.
mod cleanup;
/// Operator subcommands, compared with the Python nodepool CLI on the same data.
mod ops;
/// The benchmark harness at small sizes (the full run is `cargo bench`).
mod bench_smoke;
/// One real diskimage-builder build (debian-minimal, tar and qcow2) through the daemon.
mod real_dib;
/// statsd keys as upstream emits them.
mod stats;
/// The upload pipeline against a real Glance through clouds.yaml.
mod glance_uploads;
