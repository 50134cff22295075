//! Component registration: `/nodepool/components/builder/<hostname><seq>` (wire spec §2.8).
//!
//! Like nodepool, the builder ensures the three component roots exist and registers an
//! ephemeral sequential node carrying its JSON record. Sequential names matter: after a session
//! loss the old node may linger on the server for up to one session timeout, and a fixed name
//! would collide. Registration is re-done from a new-session hook.
//!
//! The hook keeps trying for as long as its session lives, whatever the failure: a connection
//! loss, or ZooKeeper refusing the create (an ACL on the component root). nodepool registers
//! once at start-up and stops on failure; a hook that gave up would instead leave the builder
//! unregistered for the rest of the session, and a daemon waiting for the registration
//! waiting for ever. The last failure is kept so the daemon can say why it is not registered.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use log::{info, warn};

use super::{ConnState, Mode, Result, Zk, paths, schema};

/// The longest pause between two registration attempts.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// How often a registration that keeps failing is logged.
const WARN_EVERY: Duration = Duration::from_secs(60);

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

/// Where the registration stands.
#[derive(Default)]
struct Registered {
    /// The session generation registered in (0: none yet).
    generation: u64,
    /// The registration node.
    node: Option<String>,
    /// Why the latest attempt failed, until one succeeds.
    last_error: Option<String>,
}

impl Registration {
    /// Waits until the component is registered in the current session; returns its node.
    pub fn wait(&self, zk: &Zk, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.state;
        let mut st = lock.lock().unwrap();
        loop {
            if st.generation != 0 && st.generation == zk.session().generation {
                return st.node.clone();
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

    /// Whether the component is registered in the current session (no waiting).
    pub fn is_current(&self, zk: &Zk) -> bool {
        let generation = self.state.0.lock().unwrap().generation;
        generation != 0 && generation == zk.session().generation
    }

    /// Why the latest registration attempt failed, while none has succeeded since.
    pub fn last_error(&self) -> Option<String> {
        self.state.0.lock().unwrap().last_error.clone()
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
/// retrying whatever fails for as long as that session lives. A retry after a connection
/// loss first adopts a node our session already created, so the builder is never
/// registered twice.
pub fn register_on_every_session(zk: &Zk, hostname: String, version: String) -> Registration {
    let registration = Registration::default();
    let state = registration.state.clone();
    zk.on_new_session(move |zk| {
        let generation = zk.session().generation;
        let mut maybe_created = false;
        let mut pause = Duration::from_millis(100);
        let mut warned: Option<Instant> = None;
        loop {
            let session = zk.session();
            if session.generation != generation
                || matches!(session.state, ConnState::Lost | ConnState::Closed)
            {
                return; // The next session's hook registers.
            }
            let attempt = match maybe_created {
                true => own_registration(zk, &hostname).and_then(|adopted| match adopted {
                    Some(node) => {
                        info!("Adopted builder component {node} after a connection loss");
                        Ok(node)
                    }
                    None => register_builder(zk, generation, &hostname, &version),
                }),
                false => register_builder(zk, generation, &hostname, &version),
            };
            let (lock, cond) = &*state;
            match attempt {
                Ok(node) => {
                    let mut st = lock.lock().unwrap();
                    *st = Registered {
                        generation,
                        node: Some(node),
                        last_error: None,
                    };
                    cond.notify_all();
                    return;
                }
                Err(e) => {
                    // The create may have landed although its reply was lost.
                    maybe_created |= e.is_connection_loss();
                    lock.lock().unwrap().last_error = Some(e.to_string());
                    if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                        warn!("cannot register the builder component yet ({e}); retrying");
                        warned = Some(Instant::now());
                    }
                }
            }
            zk.wait_state_change(session, pause);
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    });
    registration
}
