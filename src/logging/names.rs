//! nodepool's logger names for our log records.
//!
//! Operators of nodepool 11 grep, alert and filter on its logger names (wire spec §6.2):
//! `nodepool.builder.BuildWorker.<n>`, `nodepool.builder.UploadWorker.<n>`,
//! `nodepool.builder.CleanupWorker.0`, `nodepool.builder.NodePoolBuilder`,
//! `nodepool.zk.ZooKeeper`, ... Our records carry Rust module paths as their target
//! (`nodepool_builder::build`), so the logger maps every record to the name nodepool would
//! have used *before* filtering and formatting: `NODEPOOL_BUILDER_LOG` directives and the
//! levels of a `-l` logging config then act on nodepool's names.
//!
//! [`logger_name`] decides from the module and the thread's name. Upstream names its worker
//! threads after their loggers (a `BuildWorker.3` thread logs on
//! `nodepool.builder.BuildWorker.3`); our `build-3` thread is that worker, so the logger name
//! also says which thread logged, and lines correlate with SIGUSR2 dumps:
//!
//! | record from | logger name |
//! |---|---|
//! | a target already named `nodepool…` (e.g. `nodepool.stack_dump`) | unchanged |
//! | `zk::component` | `nodepool.Component` |
//! | `zk::*` on the `zk-session`/`zk-hooks` threads (connection state, retries) | `nodepool.zk.ZooKeeperClient` |
//! | other `zk::*` | `nodepool.zk.ZooKeeper` |
//! | `stats` | `nodepool.stats` |
//! | `provider::openstack::*` without an explicit name | `nodepool.OpenStackAdapter` (the driver itself logs on `nodepool.OpenStackAdapter.<provider>`) |
//! | anything else of ours on `build-N` / `upload-N` / `cleanup` | `nodepool.builder.BuildWorker.N` / `nodepool.builder.UploadWorker.N` / `nodepool.builder.CleanupWorker.0` |
//! | anything else of ours (main, scheduler, signals, zk-watch, output readers, …) | `nodepool.builder.NodePoolBuilder` |
//! | other crates (`zookeeper_client`, `rustls`, `ureq`, …) | unchanged |
//!
//! The scheduler has no counterpart upstream (each worker polls for itself there), so what it
//! decides is logged under the builder's own name.

use std::borrow::Cow;

/// Module path prefix of this crate (the library and the binary share it).
const CRATE: &str = "nodepool_builder";

/// The logger of the builder itself (upstream's `NodePoolBuilder`).
pub const BUILDER: &str = "nodepool.builder.NodePoolBuilder";
/// Logger of the ZooKeeper layer.
pub const ZOOKEEPER: &str = "nodepool.zk.ZooKeeper";
/// Logger of the ZooKeeper connection (session state, retries).
pub const ZOOKEEPER_CLIENT: &str = "nodepool.zk.ZooKeeperClient";
/// Logger of component registration.
pub const COMPONENT: &str = "nodepool.Component";
/// Logger of statsd reporting.
pub const STATS: &str = "nodepool.stats";
/// Prefix of the OpenStack driver's loggers (`nodepool.OpenStackAdapter.<provider>`).
pub const OPENSTACK: &str = "nodepool.OpenStackAdapter";
/// Prefix of the aws driver's loggers (`nodepool.AwsAdapter.<provider>`).
pub const AWS: &str = "nodepool.AwsAdapter";

/// The nodepool logger name for a record with `target` (a module path, or an explicit
/// nodepool name) logged on the thread called `thread`.
pub fn logger_name<'a>(target: &'a str, thread: Option<&str>) -> Cow<'a, str> {
    let Some(module) = crate_module(target) else {
        return Cow::Borrowed(target);
    };
    let first_two = {
        let mut parts = module.split("::");
        (parts.next().unwrap_or(""), parts.next())
    };
    match first_two {
        ("zk", Some("component")) => return Cow::Borrowed(COMPONENT),
        ("zk", _) => {
            return Cow::Borrowed(match thread {
                Some("zk-session" | "zk-hooks") => ZOOKEEPER_CLIENT,
                _ => ZOOKEEPER,
            });
        }
        ("stats", _) => return Cow::Borrowed(STATS),
        ("provider", Some("openstack")) => return Cow::Borrowed(OPENSTACK),
        ("provider", Some("aws")) => return Cow::Borrowed(AWS),
        _ => {}
    }
    match thread.map(worker_of_thread) {
        Some(Some(name)) => Cow::Owned(name),
        _ => Cow::Borrowed(BUILDER),
    }
}

/// The module path inside this crate (`""` for its root), or `None` for another crate's
/// target or an explicit name.
fn crate_module(target: &str) -> Option<&str> {
    let rest = target.strip_prefix(CRATE)?;
    if rest.is_empty() {
        Some("")
    } else {
        rest.strip_prefix("::")
    }
}

/// The worker logger of a worker thread (`build-3` → `nodepool.builder.BuildWorker.3`).
fn worker_of_thread(thread: &str) -> Option<String> {
    if thread == "cleanup" {
        return Some("nodepool.builder.CleanupWorker.0".to_owned());
    }
    let (kind, n) = thread.rsplit_once('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let worker = match kind {
        "build" => "BuildWorker",
        "upload" => "UploadWorker",
        _ => return None,
    };
    Some(format!("nodepool.builder.{worker}.{n}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(target: &str, thread: &str) -> String {
        logger_name(target, Some(thread)).into_owned()
    }

    #[test]
    fn worker_threads_log_under_their_worker_names() {
        assert_eq!(
            name("nodepool_builder::build", "build-3"),
            "nodepool.builder.BuildWorker.3"
        );
        assert_eq!(
            name("nodepool_builder::command", "build-0"),
            "nodepool.builder.BuildWorker.0"
        );
        assert_eq!(
            name("nodepool_builder::upload", "upload-12"),
            "nodepool.builder.UploadWorker.12"
        );
        assert_eq!(
            name("nodepool_builder::provider::command", "upload-1"),
            "nodepool.builder.UploadWorker.1"
        );
        assert_eq!(
            name("nodepool_builder::cleanup", "cleanup"),
            "nodepool.builder.CleanupWorker.0"
        );
    }

    #[test]
    fn other_threads_of_ours_log_as_the_builder() {
        for (target, thread) in [
            ("nodepool_builder", "main"),
            ("nodepool_builder::app", "main"),
            ("nodepool_builder::scheduler", "scheduler"),
            ("nodepool_builder::signals", "signals"),
            ("nodepool_builder::command", "dib-out-17"),
            ("nodepool_builder::thread", "build-x"),
            ("nodepool_builder::thread", "upload-"),
        ] {
            assert_eq!(name(target, thread), BUILDER, "{target} on {thread}");
        }
        assert_eq!(logger_name("nodepool_builder::app", None), BUILDER);
    }

    #[test]
    fn the_zookeeper_layer_logs_as_upstream_whatever_the_thread() {
        assert_eq!(name("nodepool_builder::zk", "zk-session"), ZOOKEEPER_CLIENT);
        assert_eq!(name("nodepool_builder::zk", "zk-hooks"), ZOOKEEPER_CLIENT);
        assert_eq!(name("nodepool_builder::zk::lock", "build-0"), ZOOKEEPER);
        assert_eq!(name("nodepool_builder::zk::watcher", "zk-watch"), ZOOKEEPER);
        assert_eq!(name("nodepool_builder::zk::component", "main"), COMPONENT);
        assert_eq!(name("nodepool_builder::stats", "upload-0"), STATS);
        assert_eq!(
            name("nodepool_builder::provider::openstack::http", "upload-0"),
            OPENSTACK
        );
    }

    #[test]
    fn explicit_names_and_other_crates_keep_their_target() {
        assert_eq!(
            name("nodepool.stack_dump", "stackdump"),
            "nodepool.stack_dump"
        );
        assert_eq!(
            name("nodepool.OpenStackAdapter.cloud-a", "upload-2"),
            "nodepool.OpenStackAdapter.cloud-a"
        );
        assert_eq!(
            name("zookeeper_client::session", "build-0"),
            "zookeeper_client::session"
        );
        assert_eq!(name("rustls::client", "main"), "rustls::client");
        // A crate whose name merely starts like ours is not ours.
        assert_eq!(
            name("nodepool_builderx::a", "build-0"),
            "nodepool_builderx::a"
        );
        assert!(matches!(
            logger_name("ureq::unit", Some("upload-0")),
            Cow::Borrowed(_)
        ));
    }
}
