//! The synchronous ZooKeeper facade every other module uses.
//!
//! # Overview
//!
//! `zookeeper-client` is async; this daemon is made of plain OS threads. [`Zk`] hides the
//! async client completely: every operation is a blocking method that drives the crate's
//! future with `futures::executor::block_on`, raced against a per-call deadline. No future,
//! no executor and no crate type other than [`Stat`] leaks out of this module.
//!
//! # Sessions
//!
//! A supervisor thread (`zk-session`) owns the ZooKeeper session's life cycle:
//!
//! 1. connect (all configured hosts, one chroot created if missing, mutual TLS, optional
//!    digest auth), retrying forever and logging `Retrying zookeeper connection` at most every
//!    10 s, as nodepool does;
//! 2. publish the client, bump the session *generation*, set [`ConnState::Connected`], and run
//!    the registered new-session hooks on a short-lived thread (they re-create ephemerals such
//!    as the component registration and re-arm watches);
//! 3. follow the crate's session states: `Disconnected` → [`ConnState::Suspended`],
//!    `SyncConnected` → [`ConnState::Connected`]; `AuthFailed` → [`ConnState::Lost`], after
//!    which a brand-new session is built (step 1). The crate never opens a new session by
//!    itself.
//!
//! Lock guards remember the generation they were taken in; once the generation changes or the
//! state is `Lost` they know they no longer hold anything (see `lock`).
//!
//! # How long a suspended session is kept
//!
//! Like kazoo's SUSPENDED, a dropped connection does not end the session: the ZooKeeper
//! server decides when a session expires, and a standalone server restarted from its data
//! directory even restores its sessions with a fresh timeout. So while suspended nothing is
//! given up (lock holders act on nothing, a running DIB keeps running) and the session is
//! declared [`ConnState::Lost`] only when
//!
//! * the server says it expired (it answers a reconnect with session id 0), or
//! * twice the *negotiated* session timeout has passed since the disconnect was noticed
//!   without reaching the server. We cannot know when we last heard from the server (the crate
//!   keeps that to itself), but it was no later than the notice, and the server heard from us
//!   no later either; a server that stayed up expires a session at most one timeout plus one
//!   tick after it last heard from it, and the tick is at most half the timeout (the server
//!   clamps timeouts to at least two ticks). Twice the timeout is surely past that.
//!
//! `zookeeper-client` 0.11.2 gets in the way twice. Its own reconnect attempts back off
//! exponentially (100 ms doubling, per disconnect), so after a few seconds of outage it waits
//! long between attempts; and it reports `Expired` on its own 7/5 of the negotiated timeout
//! after its last receive, without asking the server. Its `Expired` therefore only means "ask
//! the server": the supervisor re-attaches to the same session with a new client
//! (`Connector::with_session`), one pass over the hosts at a time with its own short back-off,
//! until the server takes the session back (the same session resumes: same generation, locks
//! and ephemerals intact, watches re-armed by their owners), refuses it (expired: `Lost`), or
//! the two timeouts have passed (`Lost`). A frozen server is reported `Lost` 2 × the timeout
//! after its silence was noticed (the crate notices after its connection timeout, 3/5 of the
//! session timeout), that is at most about 2.7 × the timeout after its last answer.
//!
//! While the supervisor re-attaches, the expired client is out of the slot: calls fail with
//! [`ZkError::ConnectionLoss`], and a call failing on the crate's own expiry is reported as a
//! connection loss too. [`ZkError::SessionLost`] is only ever returned once the session is
//! really given up, so whoever sees it may rely on it (a lock contender is gone with it).
//!
//! # Errors
//!
//! Every shape of "the connection went away" — the crate's `ConnectionLoss`, its custom
//! "no response from connection" errors, I/O errors and our own deadline — maps to
//! [`ZkError::ConnectionLoss`]: retryable, and for writes the outcome is unknown.
//!
//! # Watches
//!
//! Only one-shot watches are used: the crate restores them after a reconnect inside the same
//! session (its persistent watches are not restored, see shared/docs/zk-client.md §5.1). A
//! watch is forwarded to a crossbeam channel by the `zk-events` thread, which does nothing but
//! forward: no I/O, no blocking.
//!
//! CAUTION: `Zk` is shared with `Arc`; the supervisor holds a clone, so call [`Zk::close`] to
//! end the session (that releases every lock and ephemeral node at once).

pub mod component;
pub mod fence;
pub mod lock;
pub mod paths;
pub mod schema;
pub mod tlscheck;
pub mod tree;
pub mod watcher;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use futures::channel::{mpsc, oneshot};
use futures::future::{BoxFuture, Either, select};
use futures::stream::{FuturesUnordered, StreamExt};
use log::{debug, info, warn};
use zookeeper_client::{
    Acls, Client, CreateMode, EventType, OneshotWatcher, SessionInfo, SessionState,
};

pub use zookeeper_client::Stat;

use crate::thread::{self, JoinHandle, ThreadKind};

/// Bound on each step of the TLS check after a failed TLS connect (per host).
const TLS_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Connection settings, derived from the `zookeeper-*` keys of the config.
#[derive(Debug, Clone, PartialEq)]
pub struct ZkConfig {
    /// Every server as (host, port); all of them are used, with one chroot.
    pub hosts: Vec<(String, u16)>,
    /// Chroot for the whole session, e.g. `/nodepool-test`; created if missing.
    pub chroot: Option<String>,
    /// Requested session timeout (`zookeeper-timeout`).
    pub session_timeout: Duration,
    /// Mutual TLS files; `None` means plaintext.
    pub tls: Option<ZkTlsFiles>,
    /// Authentication as (scheme, credentials), e.g. ("digest", b"user:password").
    pub auth: Option<(String, Vec<u8>)>,
}

/// PEM files for mutual TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct ZkTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Check the server certificate's name against the host (kazoo does not; default off).
    pub verify_hostname: bool,
}

impl ZkConfig {
    /// Builds the connection settings from the validated configuration.
    pub fn from_config(cfg: &crate::config::Config) -> ZkConfig {
        ZkConfig {
            hosts: cfg
                .zookeeper_servers
                .iter()
                .map(|s| (s.host.clone(), s.port))
                .collect(),
            // nodepool appends the chroot of every entry to every host, which kazoo mis-parses;
            // we take the first chroot given and use it once for the whole session.
            chroot: cfg.zookeeper_servers.iter().find_map(|s| s.chroot.clone()),
            session_timeout: Duration::from_secs_f64(cfg.zookeeper_timeout),
            tls: cfg.zookeeper_tls.as_ref().map(|t| ZkTlsFiles {
                ca: t.ca.clone(),
                cert: t.cert.clone(),
                key: t.key.clone(),
                verify_hostname: t.verify_hostname,
            }),
            auth: cfg
                .zookeeper_auth
                .as_ref()
                .map(|a| (a.scheme.clone(), a.credentials.clone().into_bytes())),
        }
    }

    /// `host:port,host:port` with IPv6 literals bracketed.
    pub fn connect_string(&self) -> String {
        self.hosts
            .iter()
            .map(|(h, p)| {
                if h.contains(':') && !h.starts_with('[') {
                    format!("[{h}]:{p}")
                } else {
                    format!("{h}:{p}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The facade's view of the session, as kazoo names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// No session yet (start-up, or building a new one after `Lost`).
    Connecting,
    /// Session established and connected.
    Connected,
    /// Connection dropped; the session may still be alive. Do not start lock-protected work.
    Suspended,
    /// The session expired: every lock and ephemeral node of it is gone.
    Lost,
    /// `close()` was called.
    Closed,
}

/// A session state change, as published to subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionEvent {
    pub state: ConnState,
    /// Incremented for every new ZooKeeper session.
    pub generation: u64,
}

/// Errors of the facade. Variants carry structure; callers add the znode as context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZkError {
    /// The connection is gone or the call missed its deadline; retryable, write outcome unknown.
    ConnectionLoss(String),
    /// The ZooKeeper session expired.
    SessionLost,
    NoNode,
    NodeExists,
    BadVersion,
    NotEmpty,
    NoAuth,
    /// `close()` was called.
    Closed,
    /// Anything else the server or client reported.
    Other(String),
}

impl ZkError {
    /// Whether retrying the call may succeed (the KazooRetry rule).
    pub fn is_connection_loss(&self) -> bool {
        matches!(self, ZkError::ConnectionLoss(_))
    }
}

impl fmt::Display for ZkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ZkError::ConnectionLoss(why) => write!(f, "zookeeper connection lost: {why}"),
            ZkError::SessionLost => f.write_str("zookeeper session expired"),
            ZkError::NoNode => f.write_str("no such znode"),
            ZkError::NodeExists => f.write_str("znode already exists"),
            ZkError::BadVersion => f.write_str("znode version mismatch"),
            ZkError::NotEmpty => f.write_str("znode has children"),
            ZkError::NoAuth => f.write_str("not authorized"),
            ZkError::Closed => f.write_str("zookeeper client closed"),
            ZkError::Other(e) => write!(f, "zookeeper error: {e}"),
        }
    }
}

impl std::error::Error for ZkError {}

impl From<zookeeper_client::Error> for ZkError {
    fn from(e: zookeeper_client::Error) -> ZkError {
        use zookeeper_client::Error as E;
        match e {
            E::NoNode => ZkError::NoNode,
            E::NodeExists => ZkError::NodeExists,
            E::BadVersion => ZkError::BadVersion,
            E::NotEmpty => ZkError::NotEmpty,
            E::NoAuth => ZkError::NoAuth,
            E::SessionExpired => ZkError::SessionLost,
            E::ClientClosed => ZkError::Closed,
            // Disconnects surface in several shapes (zk-client.md §5.3): all are retryable.
            E::ConnectionLoss
            | E::Timeout
            | E::NoHosts
            | E::Custom(_)
            | E::UnexpectedError(_)
            | E::SessionMoved => ZkError::ConnectionLoss(e.to_string()),
            other => ZkError::Other(other.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, ZkError>;

/// What a one-shot watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchKind {
    Created,
    Deleted,
    DataChanged,
    ChildrenChanged,
    /// The session ended (expired or closed) before the watched event happened; re-read and
    /// re-arm after the next new session.
    SessionEnded,
}

/// One fired watch: the znode path (relative to the chroot) and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub path: String,
    pub kind: WatchKind,
}

/// An armed one-shot watch; hand it to [`Zk::forward`] to receive its event on a channel.
pub struct Watch(OneshotWatcher);

/// One read of a [`Zk::multi_read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOp {
    Data(String),
    Children(String),
}

/// The answer to one [`ReadOp`].
#[derive(Debug, Clone)]
pub enum ReadResult {
    Data(Vec<u8>, Stat),
    Children(Vec<String>),
}

/// Creation mode of a znode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Persistent,
    PersistentSequential,
    Ephemeral,
    EphemeralSequential,
}

type SessionHook = Arc<dyn Fn(&Zk) + Send + Sync>;

/// The shared, cloneable ZooKeeper facade.
#[derive(Clone)]
pub struct Zk {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ZkConfig,
    call_timeout: Duration,
    /// The current session's client and the generation it is published as.
    client: RwLock<Option<(Client, u64)>>,
    /// The session timeout the server granted the current session, in milliseconds (0: no
    /// session yet).
    negotiated_ms: AtomicU64,
    state: Mutex<SessionEvent>,
    changed: Condvar,
    subscribers: Mutex<Vec<Sender<SessionEvent>>>,
    hooks: Mutex<Vec<SessionHook>>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    // CAUTION: dropped (joined) only by close(); the supervisor itself holds a `Zk` clone.
    supervisor: Mutex<Option<JoinHandle<()>>>,
    events_tx: Mutex<Option<mpsc::UnboundedSender<BoxFuture<'static, ()>>>>,
    events: Mutex<Option<JoinHandle<()>>>,
}

impl Zk {
    /// Creates the facade without connecting; register hooks, then call [`Zk::start`].
    pub fn new(cfg: ZkConfig) -> Zk {
        let call_timeout = cfg.session_timeout.max(Duration::from_secs(2));
        Zk {
            inner: Arc::new(Inner {
                cfg,
                call_timeout,
                client: RwLock::new(None),
                negotiated_ms: AtomicU64::new(0),
                state: Mutex::new(SessionEvent {
                    state: ConnState::Connecting,
                    generation: 0,
                }),
                changed: Condvar::new(),
                subscribers: Mutex::new(Vec::new()),
                hooks: Mutex::new(Vec::new()),
                stop: Mutex::new(None),
                supervisor: Mutex::new(None),
                events_tx: Mutex::new(None),
                events: Mutex::new(None),
            }),
        }
    }

    /// Creates the facade and starts connecting in the background.
    pub fn connect(cfg: ZkConfig) -> Zk {
        let zk = Zk::new(cfg);
        zk.start();
        zk
    }

    /// Starts the `zk-session` supervisor and the `zk-events` forwarder.
    pub fn start(&self) {
        let (stop_tx, stop_rx) = oneshot::channel();
        *self.inner.stop.lock().unwrap() = Some(stop_tx);
        let (ev_tx, ev_rx) = mpsc::unbounded();
        *self.inner.events_tx.lock().unwrap() = Some(ev_tx);
        *self.inner.events.lock().unwrap() = Some(thread::spawn(
            ThreadKind::ZkEvents,
            "zk-events",
            move || events_loop(ev_rx),
        ));
        let zk = self.clone();
        *self.inner.supervisor.lock().unwrap() = Some(thread::spawn(
            ThreadKind::ZkSession,
            "zk-session",
            move || zk.supervise(stop_rx),
        ));
    }

    /// Registers a hook run (on a short-lived thread) after every new ZooKeeper session,
    /// including the first.
    pub fn on_new_session(&self, hook: impl Fn(&Zk) + Send + Sync + 'static) {
        self.inner.hooks.lock().unwrap().push(Arc::new(hook));
    }

    /// Subscribes to session state changes; the receiver gets every change from now on.
    pub fn subscribe(&self) -> crossbeam_channel::Receiver<SessionEvent> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.inner.subscribers.lock().unwrap().push(tx);
        rx
    }

    /// The current state and session generation.
    pub fn session(&self) -> SessionEvent {
        *self.inner.state.lock().unwrap()
    }

    /// The current state.
    pub fn state(&self) -> ConnState {
        self.session().state
    }

    /// The configuration this facade connects with.
    pub fn config(&self) -> &ZkConfig {
        &self.inner.cfg
    }

    /// The session timeout the server granted (`zookeeper-client`'s `Client::session_timeout`
    /// is the negotiated one); the configured one before the first session.
    pub fn session_timeout(&self) -> Duration {
        match self.inner.negotiated_ms.load(Ordering::Relaxed) {
            0 => self.inner.cfg.session_timeout,
            ms => Duration::from_millis(ms),
        }
    }

    /// How long a session may stay [`ConnState::Suspended`] before it is declared `Lost`
    /// without the server's word: twice the negotiated timeout (see the module docs).
    pub fn suspension_limit(&self) -> Duration {
        self.session_timeout() * 2
    }

    /// Blocks while the state is `Suspended`, up to `timeout`; returns the session then.
    pub fn wait_while_suspended(&self, timeout: Duration) -> SessionEvent {
        self.wait_while(timeout, |st| st.state == ConnState::Suspended)
    }

    /// Blocks until the state is `Connected` or the timeout passes; returns whether connected.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        let st = self.wait_while(timeout, |st| {
            !matches!(st.state, ConnState::Connected | ConnState::Closed)
        });
        st.state == ConnState::Connected
    }

    /// Blocks until the state differs from `from` (or the timeout passes); returns the state.
    pub fn wait_state_change(&self, from: SessionEvent, timeout: Duration) -> SessionEvent {
        self.wait_while(timeout, |st| *st == from)
    }

    /// Blocks while `waiting` holds for the session state, up to `timeout`; returns the state
    /// then. The one condition-variable loop the waits above share.
    fn wait_while(
        &self,
        timeout: Duration,
        waiting: impl Fn(&SessionEvent) -> bool,
    ) -> SessionEvent {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.state.lock().unwrap();
        while waiting(&st) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .inner
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap()
                .0;
        }
        *st
    }

    /// Ends the session (releasing every lock and ephemeral node) and stops the threads.
    pub fn close(&self) {
        if let Some(stop) = self.inner.stop.lock().unwrap().take() {
            let _ = stop.send(());
        }
        let handle = self.inner.supervisor.lock().unwrap().take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        self.inner.events_tx.lock().unwrap().take();
        let events = self.inner.events.lock().unwrap().take();
        if let Some(events) = events {
            let _ = events.join();
        }
        self.set_state(ConnState::Closed, None);
    }

    // ----- data operations -------------------------------------------------------------------

    /// Stat of a znode, or `None` if it does not exist.
    pub fn exists(&self, path: &str) -> Result<Option<Stat>> {
        let c = self.client()?;
        self.wait(c.check_stat(path))
    }

    /// Data and stat of a znode, or `None` if it does not exist.
    pub fn get_data(&self, path: &str) -> Result<Option<(Vec<u8>, Stat)>> {
        let c = self.client()?;
        none_if_no_node(self.wait(c.get_data(path)))
    }

    /// Children names of a znode (unsorted, in ZooKeeper's order), or `None` if it does not exist.
    pub fn get_children(&self, path: &str) -> Result<Option<Vec<String>>> {
        let c = self.client()?;
        none_if_no_node(self.wait(c.list_children(path)))
    }

    /// Creates a znode; returns its path (with the sequence suffix for sequential modes).
    /// Open ACLs unless authentication is configured (then creator-only).
    pub fn create(&self, path: &str, data: &[u8], mode: Mode) -> Result<String> {
        self.create_with(&self.client()?, path, data, mode)
    }

    /// Creates a znode only in session `generation`: a client belongs to one session for its
    /// whole life, so checking the client's generation and sending through that very client
    /// leaves no window in which a session replaced meanwhile gets the node (an ephemeral
    /// created there would outlive a caller that believes it died with the old session).
    pub fn create_in(
        &self,
        generation: u64,
        path: &str,
        data: &[u8],
        mode: Mode,
    ) -> Result<String> {
        let slot = self.inner.client.read().unwrap().clone();
        match slot {
            Some((c, g)) if g == generation => self.create_with(&c, path, data, mode),
            Some(_) => Err(ZkError::SessionLost),
            // The slot is empty between a lost session and the next one, and while the
            // supervisor re-attaches to a suspended session (which may still come back).
            None => match self.session() {
                SessionEvent {
                    state: ConnState::Closed,
                    ..
                } => Err(ZkError::Closed),
                SessionEvent {
                    state: ConnState::Suspended,
                    generation: g,
                } if g == generation => Err(ZkError::ConnectionLoss("not connected".into())),
                _ => Err(ZkError::SessionLost),
            },
        }
    }

    fn create_with(&self, c: &Client, path: &str, data: &[u8], mode: Mode) -> Result<String> {
        let opts = create_mode(mode).with_acls(self.acls());
        let (_, seq) = self.wait(c.create(path, data, &opts))?;
        Ok(match mode {
            Mode::PersistentSequential | Mode::EphemeralSequential => format!("{path}{seq}"),
            _ => path.to_string(),
        })
    }

    /// Creates a znode, first creating missing parents with empty data.
    pub fn create_with_parents(&self, path: &str, data: &[u8], mode: Mode) -> Result<String> {
        match self.create(path, data, mode) {
            Err(ZkError::NoNode) => {
                if let Some((parent, _)) = path.rsplit_once('/').filter(|(p, _)| !p.is_empty()) {
                    self.ensure_path(parent)?;
                }
                self.create(path, data, mode)
            }
            other => other,
        }
    }

    /// `mkdir -p`: creates the znode and missing parents with empty data; existing is fine.
    pub fn ensure_path(&self, path: &str) -> Result<()> {
        let c = self.client()?;
        let opts = CreateMode::Persistent.with_acls(self.acls());
        self.wait(c.mkdir(path, &opts))
    }

    /// Overwrites a znode's data (optionally only at `version`); returns the new stat.
    pub fn set_data(&self, path: &str, data: &[u8], version: Option<i32>) -> Result<Stat> {
        let c = self.client()?;
        self.wait(c.set_data(path, data, version))
    }

    /// Overwrites `path`'s data at `version` and deletes `also_delete` in one transaction:
    /// both happen or neither. The error is the first failed operation's: `BadVersion` or
    /// `NoNode` for `path`, `NoNode` for `also_delete`.
    pub fn set_data_and_delete(
        &self,
        path: &str,
        data: &[u8],
        version: i32,
        also_delete: &str,
    ) -> Result<()> {
        let c = self.client()?;
        let mut writer = c.new_multi_writer();
        writer
            .add_set_data(path, data, Some(version))
            .and_then(|()| writer.add_delete(also_delete, None))
            .map_err(ZkError::from)?;
        self.wait(async { writer.commit().await.map_err(zookeeper_client::Error::from) })
            .map(drop)
    }

    /// Deletes a znode (optionally only at `version`).
    pub fn delete(&self, path: &str, version: Option<i32>) -> Result<()> {
        let c = self.client()?;
        self.wait(c.delete(path, version))
    }

    /// Deletes a znode and everything below it. A missing znode is fine; children appearing
    /// meanwhile (`NotEmpty`) are retried a few times.
    pub fn delete_recursive(&self, path: &str) -> Result<()> {
        let mut attempts = 0;
        loop {
            for child in self.get_children(path)?.unwrap_or_default() {
                self.delete_recursive(&format!("{path}/{child}"))?;
            }
            match self.delete(path, None) {
                Ok(()) | Err(ZkError::NoNode) => return Ok(()),
                Err(ZkError::NotEmpty) if attempts < 5 => attempts += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Retries `f` on connection loss, with back-off, until `timeout` passes or the session
    /// is lost (the KazooRetry equivalent). Only use it for idempotent operations.
    pub fn retry<T>(&self, timeout: Duration, mut f: impl FnMut(&Zk) -> Result<T>) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            match f(self) {
                Err(e) if e.is_connection_loss() && Instant::now() < deadline => {
                    if matches!(self.state(), ConnState::Lost | ConnState::Closed) {
                        return Err(e);
                    }
                    let from = self.session();
                    self.wait_state_change(
                        from,
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    );
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// Runs many reads as one ZooKeeper request (a snapshot; one packet on the wire). Each
    /// result is `None` when that znode does not exist.
    pub fn multi_read(&self, ops: &[ReadOp]) -> Result<Vec<Option<ReadResult>>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.client()?;
        let mut reader = c.new_multi_reader();
        for op in ops {
            let added = match op {
                ReadOp::Data(p) => reader.add_get_data(p),
                ReadOp::Children(p) => reader.add_get_children(p),
            };
            added.map_err(ZkError::from)?;
        }
        let results = self.wait(reader.commit())?;
        results
            .into_iter()
            .map(|r| match r {
                zookeeper_client::MultiReadResult::Data { data, stat } => {
                    Ok(Some(ReadResult::Data(data, stat)))
                }
                zookeeper_client::MultiReadResult::Children { children } => {
                    Ok(Some(ReadResult::Children(children)))
                }
                zookeeper_client::MultiReadResult::Error {
                    err: zookeeper_client::Error::NoNode,
                } => Ok(None),
                zookeeper_client::MultiReadResult::Error { err } => Err(ZkError::from(err)),
                _ => Err(ZkError::Other("unknown multi-read result".into())),
            })
            .collect()
    }

    // ----- watches -----------------------------------------------------------------------------

    /// Stat of a znode (or `None`) plus a one-shot watch for its creation, deletion or change.
    pub fn exists_watch(&self, path: &str) -> Result<(Option<Stat>, Watch)> {
        let c = self.client()?;
        let watcher = self.wait(c.check_and_watch_stat(path))?;
        Ok((watcher.0, Watch(watcher.1)))
    }

    /// Data of a znode plus a one-shot watch for its change or deletion.
    pub fn get_data_watch(&self, path: &str) -> Result<Option<(Vec<u8>, Stat, Watch)>> {
        let c = self.client()?;
        none_if_no_node(self.wait(c.get_and_watch_data(path)))
            .map(|o| o.map(|(d, s, w)| (d, s, Watch(w))))
    }

    /// Children of a znode plus a one-shot watch for a change of the children list.
    pub fn get_children_watch(&self, path: &str) -> Result<Option<(Vec<String>, Watch)>> {
        let c = self.client()?;
        none_if_no_node(self.wait(c.list_and_watch_children(path)))
            .map(|o| o.map(|(ch, w)| (ch, Watch(w))))
    }

    /// Delivers the watch's event to `tx` when it fires (through the `zk-events` thread).
    pub fn forward(&self, watch: Watch, tx: Sender<WatchEvent>) {
        let fut: BoxFuture<'static, ()> = Box::pin(async move {
            let _ = tx.send(watch_event(watch.0.changed().await));
        });
        if let Some(events) = self.inner.events_tx.lock().unwrap().as_ref() {
            let _ = events.unbounded_send(fut);
        }
    }

    /// Blocks until the watch fires or the timeout passes.
    pub fn wait_watch(&self, watch: Watch, timeout: Duration) -> Option<WatchEvent> {
        let timer = async_io::Timer::after(timeout);
        futures::executor::block_on(async {
            match select(pin!(watch.0.changed()), timer).await {
                Either::Left((ev, _)) => Some(watch_event(ev)),
                Either::Right(_) => None,
            }
        })
    }

    // ----- internals ---------------------------------------------------------------------------

    fn acls(&self) -> Acls<'static> {
        if self.inner.cfg.auth.is_some() {
            Acls::creator_all()
        } else {
            Acls::anyone_all()
        }
    }

    /// The id of the current session, while there is one.
    pub fn session_id(&self) -> Option<i64> {
        self.inner
            .client
            .read()
            .unwrap()
            .as_ref()
            .map(|(c, _)| c.session_id().0)
    }

    fn client(&self) -> Result<Client> {
        match self.inner.client.read().unwrap().as_ref() {
            Some((c, _)) => Ok(c.clone()),
            None => match self.state() {
                ConnState::Closed => Err(ZkError::Closed),
                ConnState::Lost => Err(ZkError::SessionLost),
                _ => Err(ZkError::ConnectionLoss("not connected".into())),
            },
        }
    }

    /// Drives one request to completion within the per-call deadline.
    fn wait<T>(
        &self,
        fut: impl Future<Output = std::result::Result<T, zookeeper_client::Error>>,
    ) -> Result<T> {
        let timeout = self.inner.call_timeout;
        let generation = self.session().generation;
        let timer = async_io::Timer::after(timeout);
        futures::executor::block_on(async {
            match select(pin!(fut), timer).await {
                Either::Left((r, _)) => r.map_err(|e| self.map_error(e, generation)),
                Either::Right(_) => Err(ZkError::ConnectionLoss(format!(
                    "no response within {timeout:?}"
                ))),
            }
        })
    }

    /// The crate's expiry is only final once the supervisor has asked the server (see the
    /// module docs): until it declares the session of the call lost, an expiry is a
    /// connection loss.
    fn map_error(&self, e: zookeeper_client::Error, generation: u64) -> ZkError {
        match ZkError::from(e) {
            ZkError::SessionLost if self.session_undecided(generation) => ZkError::ConnectionLoss(
                "session expired on the client side; asking the server".into(),
            ),
            other => other,
        }
    }

    /// Whether session `generation` is still the current one and not given up.
    fn session_undecided(&self, generation: u64) -> bool {
        let s = self.session();
        s.generation == generation && matches!(s.state, ConnState::Suspended | ConnState::Connected)
    }

    fn set_state(&self, state: ConnState, new_generation: Option<u64>) {
        let ev = {
            let mut st = self.inner.state.lock().unwrap();
            // Closed is final; and a repeated state (the crate may report SyncConnected twice
            // around a connect) is no news for subscribers.
            if st.state == ConnState::Closed || (st.state == state && new_generation.is_none()) {
                return;
            }
            let reconnected = state == ConnState::Connected
                && (st.state == ConnState::Suspended || new_generation.is_some_and(|g| g > 1));
            if reconnected {
                crate::metrics::global().zk_reconnected();
            } else if state == ConnState::Lost {
                crate::metrics::global().zk_session_lost();
            }
            st.state = state;
            if let Some(g) = new_generation {
                st.generation = g;
            }
            self.inner.changed.notify_all();
            *st
        };
        debug!(
            "zookeeper session state {:?} (generation {})",
            ev.state, ev.generation
        );
        self.inner
            .subscribers
            .lock()
            .unwrap()
            .retain(|tx| tx.send(ev).is_ok());
    }

    /// The `zk-session` thread.
    fn supervise(&self, stop_rx: oneshot::Receiver<()>) {
        let mut stop_rx = stop_rx;
        let mut generation = 0u64;
        let mut last_retry_log: Option<Instant> = None;
        let mut backoff = Duration::from_millis(200);
        // The state watcher of the latest session, kept to see its CloseSession acknowledged.
        let mut last_states: Option<zookeeper_client::StateWatcher> = None;
        'sessions: loop {
            crate::registry::set_activity(format!(
                "connecting to {}",
                self.inner.cfg.connect_string()
            ));
            let client = match until_stopped(self.connect_once(None), &mut stop_rx) {
                None => break 'sessions,
                Some(Ok(client)) => client,
                Some(Err(e)) => {
                    if last_retry_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        // The client hides TLS failures behind "connection lost": find out why.
                        let why = self.inner.cfg.tls.as_ref().and_then(|tls| {
                            tlscheck::diagnose(tls, &self.inner.cfg.hosts, TLS_CHECK_TIMEOUT)
                        });
                        warn!(
                            "Retrying zookeeper connection to {}: {e}{}",
                            self.inner.cfg.connect_string(),
                            why.map(|w| format!("; TLS check: {w}")).unwrap_or_default()
                        );
                        last_retry_log = Some(Instant::now());
                    }
                    if until_stopped(async_io::Timer::after(backoff), &mut stop_rx).is_none() {
                        break 'sessions;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue 'sessions;
                }
            };
            backoff = Duration::from_millis(200);
            last_retry_log = None;
            generation += 1;
            let mut client = client;
            let mut states = client.state_watcher();
            last_states = Some(client.state_watcher());
            // The negotiated timeout: the crate records the server's answer (zk-client.md §4).
            let timeout = client.session_timeout();
            self.inner
                .negotiated_ms
                .store(timeout.as_millis().max(1) as u64, Ordering::Relaxed);
            let session_id = client.session_id().0;
            let session = client.session().clone();
            info!(
                "Connected to zookeeper {} (session 0x{session_id:x}, timeout {timeout:?}, generation {generation})",
                self.inner.cfg.connect_string(),
            );
            *self.inner.client.write().unwrap() = Some((client.clone(), generation));
            self.set_state(ConnState::Connected, Some(generation));
            self.run_hooks();
            crate::registry::set_activity(format!("watching session 0x{session_id:x}"));
            // See "How long a suspended session is kept" in the module docs.
            let limit = timeout * 2;
            let mut suspended_since: Option<Instant> = None;
            loop {
                let deadline = suspended_since.map(|t| t + limit);
                let lost = match next_session_state(&mut states, &mut stop_rx, deadline) {
                    Next::Stop => break 'sessions,
                    Next::State(SessionState::Disconnected) => {
                        if suspended_since.is_none() {
                            warn!("ZooKeeper connection suspended");
                            suspended_since = Some(Instant::now());
                        }
                        self.set_state(ConnState::Suspended, None);
                        None
                    }
                    Next::State(SessionState::SyncConnected | SessionState::ConnectedReadOnly)
                        if suspended_since.is_none() =>
                    {
                        None
                    }
                    Next::State(SessionState::SyncConnected | SessionState::ConnectedReadOnly) => {
                        info!("ZooKeeper session 0x{session_id:x} resumed");
                        suspended_since = None;
                        self.set_state(ConnState::Connected, None);
                        None
                    }
                    Next::State(SessionState::Expired) => {
                        // The crate's own expiry or the server's word: ask the server.
                        let since = *suspended_since.get_or_insert_with(Instant::now);
                        self.inner.client.write().unwrap().take();
                        self.set_state(ConnState::Suspended, None);
                        crate::registry::set_activity(format!(
                            "re-attaching to session 0x{session_id:x}"
                        ));
                        match self.reattach(&session, since + limit, &mut stop_rx) {
                            Reattach::Stop => break 'sessions,
                            Reattach::Resumed(again) => {
                                client = again;
                                states = client.state_watcher();
                                last_states = Some(client.state_watcher());
                                *self.inner.client.write().unwrap() =
                                    Some((client.clone(), generation));
                                info!("ZooKeeper session 0x{session_id:x} resumed");
                                crate::registry::set_activity(format!(
                                    "watching session 0x{session_id:x}"
                                ));
                                suspended_since = None;
                                self.set_state(ConnState::Connected, None);
                                None
                            }
                            Reattach::Expired => Some("the server says it expired".to_string()),
                            Reattach::Unreachable(why) => Some(format!(
                                "no answer from ZooKeeper for {limit:?} since the connection dropped; last attempt: {why}"
                            )),
                        }
                    }
                    Next::State(state) => Some(format!("{state:?}")),
                    Next::Deadline => Some(format!(
                        "no answer from ZooKeeper for {limit:?} since the connection dropped"
                    )),
                };
                if let Some(why) = lost {
                    warn!("ZooKeeper session lost ({why}); building a new session");
                    self.inner.client.write().unwrap().take();
                    self.set_state(ConnState::Lost, None);
                    drop(client);
                    continue 'sessions;
                }
            }
        }
        // Drop every clone we hold: the crate closes the session once the last client is gone.
        // Wait (briefly) for the server to acknowledge, so our ephemeral nodes and locks are
        // gone when close() returns, not one session timeout later.
        self.inner.client.write().unwrap().take();
        if let Some(mut states) = last_states {
            let closed = async {
                loop {
                    if matches!(
                        states.changed().await,
                        SessionState::Closed | SessionState::Expired | SessionState::AuthFailed
                    ) {
                        break;
                    }
                }
            };
            let _ = futures::executor::block_on(select(
                pin!(closed),
                async_io::Timer::after(Duration::from_secs(3)),
            ));
        }
        crate::registry::clear_activity();
        info!("ZooKeeper client closed");
    }

    /// Re-attaches to the suspended `session` with new clients until the server takes it back
    /// or refuses it, or `deadline` passes (see the module docs).
    fn reattach(
        &self,
        session: &SessionInfo,
        deadline: Instant,
        stop: &mut oneshot::Receiver<()>,
    ) -> Reattach {
        let mut pause = Duration::from_millis(100);
        let mut last = String::from("none made");
        loop {
            if Instant::now() >= deadline {
                return Reattach::Unreachable(last);
            }
            let connect = pin!(self.connect_once(Some(session)));
            let attempt = select(connect, async_io::Timer::at(deadline));
            match until_stopped(attempt, stop) {
                None => return Reattach::Stop,
                Some(Either::Left((Ok(client), _))) => return Reattach::Resumed(client),
                Some(Either::Left((Err(ZkError::SessionLost), _))) => return Reattach::Expired,
                Some(Either::Left((Err(e), _))) => {
                    debug!("re-attaching to session 0x{:x}: {e}", session.id().0);
                    last = e.to_string();
                }
                Some(Either::Right(_)) => return Reattach::Unreachable(last),
            }
            let wake = (Instant::now() + pause).min(deadline);
            if until_stopped(async_io::Timer::at(wake), stop).is_none() {
                return Reattach::Stop;
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Connects a new client: to a new session, or back to `resume` (one pass over the hosts;
    /// the server answers `SessionExpired`, mapped to [`ZkError::SessionLost`], if it is gone).
    async fn connect_once(&self, resume: Option<&SessionInfo>) -> Result<Client> {
        let cfg = &self.inner.cfg;
        // A connection timeout of 3/5 of the session timeout makes the client ping every 9/40
        // of the session timeout when idle (its ping interval is 3/8 of the connection timeout),
        // about 27 pings a minute at the default 10 s, instead of 40 with the crate's default.
        let mut connector = Client::connector()
            .with_session_timeout(cfg.session_timeout)
            .with_connection_timeout(cfg.session_timeout.mul_f64(0.6));
        if let Some(session) = resume {
            connector = connector.with_session(session.clone()).with_fail_eagerly();
        }
        if let Some((scheme, auth)) = &cfg.auth {
            connector = connector.with_auth(scheme, auth);
        }
        let hosts = cfg.connect_string();
        let client = match &cfg.tls {
            Some(tls) => {
                let read = |p: &PathBuf| {
                    std::fs::read_to_string(p).map_err(|e| {
                        ZkError::Other(format!(
                            "cannot read zookeeper tls file {}: {e}",
                            p.display()
                        ))
                    })
                };
                let mut opts = zookeeper_client::TlsOptions::new()
                    .with_pem_ca(&read(&tls.ca)?)
                    .map_err(|e| {
                        ZkError::Other(format!("bad zookeeper tls ca {}: {e}", tls.ca.display()))
                    })?
                    .with_pem_identity(&read(&tls.cert)?, &read(&tls.key)?)
                    .map_err(|e| {
                        ZkError::Other(format!(
                            "bad zookeeper tls cert/key {}: {e}",
                            tls.cert.display()
                        ))
                    })?;
                if !tls.verify_hostname {
                    // SAFETY: not memory safety; the crate marks this unsafe because it weakens
                    // TLS. kazoo (and so nodepool) never checks host names either; the CA chain
                    // is still verified.
                    opts = unsafe { opts.with_no_hostname_verification() };
                }
                connector.with_tls(opts).secure_connect(&hosts).await?
            }
            None => connector.connect(&hosts).await?,
        };
        if resume.is_some() {
            // A server that took the session back may lag behind what we saw before (the
            // re-attaching client starts from zxid 0): catch it up before anyone reads.
            client.sync("/").await?;
        }
        match &cfg.chroot {
            None => Ok(client),
            Some(chroot) => {
                let opts = CreateMode::Persistent.with_acls(self.acls());
                match client.mkdir(chroot, &opts).await {
                    Ok(()) | Err(zookeeper_client::Error::NodeExists) => {}
                    Err(e) => return Err(e.into()),
                }
                client
                    .chroot(chroot.as_str())
                    .map_err(|_| ZkError::Other(format!("invalid chroot {chroot}")))
            }
        }
    }

    fn run_hooks(&self) {
        let hooks: Vec<SessionHook> = self.inner.hooks.lock().unwrap().clone();
        if hooks.is_empty() {
            return;
        }
        let zk = self.clone();
        thread::spawn(ThreadKind::ZkSession, "zk-hooks", move || {
            for hook in hooks {
                hook(&zk);
            }
        })
        .detach();
    }
}

enum Next {
    Stop,
    State(SessionState),
    Deadline,
}

/// How re-attaching to a suspended session ended.
enum Reattach {
    Stop,
    /// The server took the session back; the client is connected to it.
    Resumed(Client),
    /// The server says the session expired.
    Expired,
    /// The server could not be reached in time (the last attempt's error).
    Unreachable(String),
}

/// Waits for the next session state, a stop request, or the deadline.
fn next_session_state(
    states: &mut zookeeper_client::StateWatcher,
    stop: &mut oneshot::Receiver<()>,
    deadline: Option<Instant>,
) -> Next {
    let timer = match deadline {
        Some(d) => async_io::Timer::at(d),
        None => async_io::Timer::never(),
    };
    match until_stopped(select(pin!(states.changed()), timer), stop) {
        None => Next::Stop,
        Some(Either::Left((state, _))) => Next::State(state),
        Some(Either::Right(_)) => Next::Deadline,
    }
}

/// Runs `fut` to completion unless `stop` fires first (then `None`).
fn until_stopped<F: Future>(fut: F, stop: &mut oneshot::Receiver<()>) -> Option<F::Output> {
    futures::executor::block_on(async {
        match select(pin!(fut), stop).await {
            Either::Left((out, _)) => Some(out),
            Either::Right(_) => None,
        }
    })
}

fn create_mode(mode: Mode) -> CreateMode {
    match mode {
        Mode::Persistent => CreateMode::Persistent,
        Mode::PersistentSequential => CreateMode::PersistentSequential,
        Mode::Ephemeral => CreateMode::Ephemeral,
        Mode::EphemeralSequential => CreateMode::EphemeralSequential,
    }
}

fn none_if_no_node<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(ZkError::NoNode) => Ok(None),
        Err(e) => Err(e),
    }
}

fn watch_event(ev: zookeeper_client::WatchedEvent) -> WatchEvent {
    let kind = match ev.event_type {
        EventType::NodeCreated => WatchKind::Created,
        EventType::NodeDeleted => WatchKind::Deleted,
        EventType::NodeDataChanged => WatchKind::DataChanged,
        EventType::NodeChildrenChanged => WatchKind::ChildrenChanged,
        EventType::Session => WatchKind::SessionEnded,
    };
    WatchEvent {
        path: ev.path,
        kind,
    }
}

/// The `zk-events` thread: polls armed watches and forwards what fires. Nothing else.
fn events_loop(rx: mpsc::UnboundedReceiver<BoxFuture<'static, ()>>) {
    futures::executor::block_on(async move {
        let mut rx = rx.fuse();
        let mut armed = FuturesUnordered::new();
        loop {
            futures::select! {
                f = rx.next() => match f {
                    Some(f) => armed.push(f),
                    None => break,
                },
                _ = armed.select_next_some() => {}
            }
        }
    });
}
