//! The life of the real binary's process as an operator or a service manager sees it:
//!
//! * [`foreground`]: `-f` against a TLS-only ZooKeeper, registration, SIGINT/SIGTERM,
//!   `check-config`, a careless parent's signal state;
//! * [`detached`]: daemon mode as an init script runs it: readiness before the starting
//!   command exits, the pidfile, no terminal, SIGHUP reload and log reopening,
//!   `NOTIFY_SOCKET`, the signal state of the daemon's children.
//!
//! Elsewhere: SIGUSR2 stack dumps in `stackdump`; logging configuration in `logging`;
//! stopping during a build or an upload in `builds::failures` and `uploads::command_driver`;
//! crashes and restarts under load in `faults`.

mod detached;
mod foreground;
