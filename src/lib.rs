//! nodepool-builder: a drop-in Rust replacement for nodepool 11's image builder daemon.
//!
//! # Code map
//!
//! One line per entry of `src/`, in its order (`tests/tidy.rs` checks that they match).
//!
//! * `app`: wiring of the daemon: identity, ZooKeeper session and component registration,
//!   signal handlers, the worker pools, janitor, watcher and drivers handed to the scheduler
//!   thread, ordered shutdown (stopping every child process).
//! * `build`: the build workers (`build-N`): one diskimage-builder run per job, recorded in
//!   ZooKeeper as nodepool 11's BuildWorker does, local files and build logs.
//! * `cleanup`: the janitor (`cleanup` thread): retention, removals, leaked cloud images (keyed
//!   on which znodes exist), local files.
//! * `cli`: the command line: upstream's daemon flags and the operator subcommands.
//! * `command`: the subprocess runner, the one owner of child processes (DIB, hooks, the
//!   command driver's commands): process groups, clean signal state, timeouts.
//! * `config`: the configuration, our TOML or nodepool.yaml itself (its builder subset),
//!   read through one document tree, validated with every error as `file:line:col`.
//! * `daemon`: daemon mode: pidfile lock, double fork with a readiness pipe, `sd_notify`.
//! * `gate`: the image gate: `qemu-img info`/`check` of every built file and the optional
//!   `validate-command`, before a build may be recorded `ready`.
//! * `identity`: who this builder is: `builder_id.txt`, host name, fully qualified name.
//! * `lib.rs`: this map and the architecture invariants.
//! * `local`: the images-dir and build-log dir: file names of a build (image, checksum and
//!   manifest files, build logs) and reading them back, scanning, deletion, free space.
//! * `logging`: nodepool's logger names and line format, `-l` dictConfig files, reopening.
//! * `main.rs`: the binary: inherited signal state reset, flags, fork, exit codes.
//! * `metrics`: Prometheus metric families (names, help, types) and their text format.
//! * `model`: domain vocabulary (build and upload states, build ids, back-off), no serde.
//! * `ops`: the operator subcommands of upstream's `nodepool` CLI (lists, changes,
//!   export/import), in PrettyTable's layout.
//! * `pool`: the worker pool of builds and uploads: named workers, one outcome per job (also
//!   on panic), shutdown that joins (builds) or waits a grace period, then detaches (uploads).
//! * `progress`: the progress of running builds and uploads in one table, and the
//!   `progress` thread that logs it every `progress-interval`.
//! * `provider`: cloud drivers behind one trait: OpenStack (Glance and Keystone through
//!   clouds.yaml, CA trust as openstacksdk), aws (EC2 and EBS direct, SigV4, the AWS
//!   credential chain) and the command driver.
//! * `registry`: the process-wide registry of our threads and what each is doing.
//! * `scheduler`: the `scheduler` thread, an event loop that owns scheduling state; its
//!   decisions (what to build and why, uploads, wake-ups, back-off, retention with the
//!   recency bridge) are pure functions in `scheduler::core`, unit-tested without servers.
//! * `secret_files`: warns about secret files others can read, refuses world-writable ones.
//! * `service`: systemd beyond `READY=1`: the watchdog fed while the scheduler loop turns,
//!   `STATUS=` with a one-line summary, `STOPPING=1`.
//! * `signals`: SIGTERM/SIGINT/SIGHUP as messages, and the reset of inherited signal state.
//! * `stackdump`: the SIGUSR2 backtrace of every registered thread.
//! * `stats`: statsd, with nodepool 11's key names.
//! * `thread`: the one place that starts threads (names, registration, joining handles).
//! * `upload`: the upload workers (`upload-N`): one build to one provider, recorded as
//!   nodepool 11's UploadWorker does, the post-upload hook.
//! * `webapp`: the optional HTTP endpoint (`webapp` thread): `/metrics`, `/healthz`, `/ready`,
//!   and the launcher webapp's `/dib-image-list` and `/image-list`.
//! * `zk`: the synchronous ZooKeeper facade over `zookeeper-client` (`zk::Zk`, sessions kept as
//!   long as the server keeps them), the znode layout (`zk::paths`), the wire records
//!   (`zk::schema`), tree readers (`zk::tree`), the kazoo lock recipe (`zk::lock`), result
//!   writes with lost replies (`zk::fence`), the watcher thread (`zk::watcher`), component
//!   registration (`zk::component`) and TLS failure diagnosis (`zk::tlscheck`).
//!
//! # Architecture invariants
//!
//! 1. Only `scheduler` mutates scheduling state; everyone else sends it a message.
//! 2. Only `zk::schema` knows the JSON of znodes, only `zk::paths` the tree layout, only
//!    `local` the file names of images-dir and build logs, only `provider::*` a cloud
//!    protocol (and what a driver reads and defaults to), only `stats` the statsd key names,
//!    only `metrics` the Prometheus names.
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
pub mod gate;
pub mod identity;
pub mod local;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod pool;
pub mod progress;
pub mod provider;
pub mod registry;
pub mod scheduler;
pub mod secret_files;
pub mod service;
pub mod signals;
pub mod stackdump;
pub mod stats;
pub mod thread;
pub mod upload;
pub mod webapp;
pub mod zk;
