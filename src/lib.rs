//! nodepool-builder: a drop-in Rust replacement for nodepool 11's image builder daemon.
//!
//! # Code map
//!
//! * `config`: the configuration, our TOML or nodepool.yaml itself (its builder subset),
//!   validated with every error reported as `file:line:col`.
//! * `model`: domain vocabulary (image, build, upload, provider, states), no serde.
//! * `zk`: the synchronous ZooKeeper facade over `zookeeper-client` (`zk::Zk`), the znode
//!   layout (`zk::paths`), the wire records (`zk::schema`), the kazoo lock recipe
//!   (`zk::lock`) and component registration (`zk::component`).
//! * `thread`, `registry`, `stackdump`: every thread is spawned through `thread::spawn`,
//!   registered by name, and dumped with a real backtrace on SIGUSR2.
//! * `scheduler`, `build`, `upload`, `cleanup`, `provider`, `stats`: the daemon's work.
//! * `secret_files`: warns about secret files others can read, refuses world-writable ones.
//! * `cli`, `app`: command line and wiring.
//!
//! # Architecture invariants
//!
//! 1. Only `scheduler` mutates scheduling state; everyone else sends it a message.
//! 2. Only `zk::schema` knows the JSON of znodes, only `zk::paths` the tree layout, only
//!    `provider::*` a cloud protocol, only `stats` the statsd key names.
//! 3. Only `thread.rs` spawns threads.
//! 4. No signal handler blocks, allocates or logs; no ZooKeeper event path blocks or does I/O.
//! 5. A panic or error while handling one image never stops work on other images.
//! 6. Every wait has a deadline; every ZooKeeper call goes through the facade's per-call deadline.
//! 7. Fork happens before any thread exists.
//! 8. What other nodepool components see (znodes, JSON bytes, lock names, file names, log
//!    marker lines, statsd keys, CLI-visible states) follows nodepool 11 exactly.

pub mod app;
pub mod build;
pub mod cleanup;
pub mod cli;
pub mod command;
pub mod config;
pub mod daemon;
pub mod identity;
pub mod logging;
pub mod model;
pub mod ops;
pub mod provider;
pub mod registry;
pub mod scheduler;
pub mod secret_files;
pub mod signals;
pub mod stackdump;
pub mod stats;
pub mod thread;
pub mod upload;
pub mod zk;
