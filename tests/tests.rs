//! The one integration-test binary. Every module drives real servers (ZooKeeper, kazoo, ...);
//! nothing is mocked.

/// Shared test tooling: real ZooKeeper servers, certificates, Python venvs, waits.
mod util;
/// The test harness itself: servers start, TLS works, kazoo connects.
mod harness;
/// Configuration loading: good configs, twenty broken ones with file:line:col.
mod config;
