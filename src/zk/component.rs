//! Component registration: `/nodepool/components/builder/<hostname><seq>` (wire spec §2.8).
//!
//! Like nodepool, the builder ensures the three component roots exist and registers an
//! ephemeral sequential node carrying its JSON record. Sequential names matter: after a session
//! loss the old node may linger on the server for up to one session timeout, and a fixed name
//! would collide. Registration is re-done from a new-session hook.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use log::info;

use super::{Mode, Result, Zk, ZkError, paths, schema};

/// Registers this builder in session `generation`; returns the created node's path.
pub fn register_builder(zk: &Zk, generation: u64, hostname: &str, version: &str) -> Result<String> {
    for kind in paths::COMPONENT_KINDS {
        zk.ensure_path(&paths::component_kind_path(kind))?;
    }
    let data = schema::builder_component_json(hostname, version);
    let node = zk.create_in(
        generation,
        &paths::builder_component_prefix(hostname),
        &data,
        Mode::EphemeralSequential,
    )?;
    info!("Registered builder component {node}");
    Ok(node)
}

/// Tracks which session generation the builder is registered in.
#[derive(Clone, Default)]
pub struct Registration {
    state: Arc<(Mutex<Registered>, Condvar)>,
}

/// The session generation registered in (0: none yet) and the registration node.
type Registered = (u64, Option<String>);

impl Registration {
    /// Waits until the component is registered in the current session; returns its node.
    pub fn wait(&self, zk: &Zk, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.state;
        let mut st = lock.lock().unwrap();
        loop {
            if st.0 != 0 && st.0 == zk.session().generation {
                return st.1.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = cond
                .wait_timeout(st, (deadline - now).min(Duration::from_millis(200)))
                .unwrap()
                .0;
        }
    }
}

/// Our session's registration node, if there is one: after a connection loss during the
/// create, the node may exist although its reply never came.
fn own_registration(zk: &Zk, hostname: &str) -> Result<Option<String>> {
    let Some(session) = zk.session_id() else {
        return Ok(None);
    };
    let root = paths::component_kind_path("builder");
    for child in zk.get_children(&root)?.unwrap_or_default() {
        let node = format!("{root}/{child}");
        if child.starts_with(hostname)
            && zk
                .exists(&node)?
                .is_some_and(|stat| stat.ephemeral_owner == session)
        {
            return Ok(Some(node));
        }
    }
    Ok(None)
}

/// Makes `register_builder` run after every new ZooKeeper session (the first one included),
/// retrying on connection loss for up to one session timeout. A retry after a connection
/// loss first adopts a node our session already created, so the builder is never
/// registered twice.
pub fn register_on_every_session(zk: &Zk, hostname: String, version: String) -> Registration {
    let registration = Registration::default();
    let state = registration.state.clone();
    zk.on_new_session(move |zk| {
        let generation = zk.session().generation;
        let timeout = zk.config().session_timeout;
        let mut maybe_created = false;
        let registered = zk.retry(timeout, |zk| {
            if zk.session().generation != generation {
                return Err(ZkError::SessionLost); // The next session's hook registers.
            }
            if maybe_created && let Some(node) = own_registration(zk, &hostname)? {
                info!("Adopted builder component {node} after a connection loss");
                return Ok(node);
            }
            let created = register_builder(zk, generation, &hostname, &version);
            if matches!(&created, Err(e) if e.is_connection_loss()) {
                maybe_created = true;
            }
            created
        });
        match registered {
            Ok(node) => {
                let (lock, cond) = &*state;
                *lock.lock().unwrap() = (generation, Some(node));
                cond.notify_all();
            }
            Err(e) => log::error!("could not register builder component: {e}"),
        }
    });
    registration
}
