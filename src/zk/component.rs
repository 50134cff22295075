//! Component registration: `/nodepool/components/builder/<hostname><seq>` (wire spec §2.8).
//!
//! Like nodepool, the builder ensures the three component roots exist and registers an
//! ephemeral sequential node carrying its JSON record. Sequential names matter: after a session
//! loss the old node may linger on the server for up to one session timeout, and a fixed name
//! would collide. Registration is re-done from a new-session hook.

use log::info;

use super::{Mode, Result, Zk, paths, schema};

/// Registers this builder; returns the created node's path.
pub fn register_builder(zk: &Zk, hostname: &str, version: &str) -> Result<String> {
    for kind in paths::COMPONENT_KINDS {
        zk.ensure_path(&paths::component_kind_path(kind))?;
    }
    let data = schema::builder_component_json(hostname, version);
    let node = zk.create(&paths::builder_component_prefix(hostname), &data, Mode::EphemeralSequential)?;
    info!("Registered builder component {node}");
    Ok(node)
}

/// Makes `register_builder` run after every new ZooKeeper session (the first one included),
/// retrying on connection loss for up to one session timeout.
pub fn register_on_every_session(zk: &Zk, hostname: String, version: String) {
    zk.on_new_session(move |zk| {
        let timeout = zk.config().session_timeout;
        if let Err(e) = zk.retry(timeout, |zk| register_builder(zk, &hostname, &version)) {
            log::error!("could not register builder component: {e}");
        }
    });
}
