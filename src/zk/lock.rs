//! kazoo's `Lock` recipe, wire-compatible with nodepool 11 and kazoo 2.9 (wire spec §2.6).
//!
//! # The recipe
//!
//! A lock is a directory znode (e.g. `/nodepool/images/<image>/builds/lock`), created with its
//! parents if missing. A contender creates an ephemeral sequential child named
//! `<uuid4 hex>__lock__<10-digit sequence>` with empty data. It holds the lock when no other
//! child matching `__lock__(-?\d{10})$` has a smaller sequence (compared as strings, exactly
//! as kazoo does, so Python and Rust order contenders identically). A non-blocking try that
//! finds a predecessor deletes its own node and reports "not acquired"; a blocking acquire
//! watches its predecessor and waits, up to a timeout. Release deletes the node; losing the
//! ZooKeeper session releases everything.
//!
//! # Hazards
//!
//! * Sequential creates are not idempotent: after a connection loss during the create we list
//!   the directory (once connected again) and adopt the child carrying our unique prefix
//!   before creating anything again, so no orphan contender is left behind to block
//!   everyone until our session ends, which for a daemon is never. The create is bound to
//!   the guard's session (`Zk::create_in`), so it cannot land in the session that replaces
//!   it either.
//! * For the same reason every later step survives a connection loss in the same session:
//!   the reads are retried, and giving a contender up (a failed try, a timeout, a release)
//!   retries its delete until it is done or the session is gone (and the node with it). A
//!   lost reply of a delete is harmless: the retry finds the node gone.
//! * Taking a lock re-creates a deleted build or upload znode as an empty node (that is how
//!   kazoo behaves too); record readers skip empty data.
//! * A [`LockGuard`] knows the session generation it was taken in. After the session is lost
//!   it reports `is_valid() == false`: long critical sections (a DIB build holding the image
//!   build lock for hours) check it before writing their result.
//! * While the session is suspended it may still come back with our contender in it (see
//!   `zk`'s "How long a suspended session is kept"), so nothing here concludes anything from
//!   a connection loss: each step retries until the session is connected again or given up,
//!   for longer than a session can stay suspended. A watch ending with the client (the crate
//!   expires its client before the supervisor asks the server) is no proof either: the
//!   contenders are read again once connected. Only a lost session (or a new generation)
//!   means our contender is gone.
//! * The recipe is not re-entrant: an in-process table keeps two threads of this process from
//!   contending through ZooKeeper for the same path.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::{ConnState, Mode, Zk, ZkError};

/// Why a lock could not be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockError {
    /// ZooKeeper failed (connection loss, session expiry, ...).
    Zk(ZkError),
    /// A blocking acquire did not get the lock in time (kazoo's `LockTimeout`).
    Timeout { path: String },
    /// Our contender node vanished while we waited (session lost).
    Lost { path: String },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Zk(e) => write!(f, "{e}"),
            LockError::Timeout { path } => write!(f, "Timeout trying to acquire lock {path}"),
            LockError::Lost { path } => write!(f, "lock {path} lost while acquiring it"),
        }
    }
}

impl std::error::Error for LockError {}

impl From<ZkError> for LockError {
    fn from(e: ZkError) -> LockError {
        LockError::Zk(e)
    }
}

/// A held lock. Dropping it releases the lock (best effort, bounded by the call deadline).
pub struct LockGuard {
    zk: Zk,
    path: String,
    node: String,
    generation: u64,
    released: bool,
    // Dropped after `Drop::drop` deleted the node: only then may another thread of ours try.
    _local: LocalMark,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("node", &self.node)
            .field("generation", &self.generation)
            .finish()
    }
}

impl LockGuard {
    /// The lock directory.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Our contender node (`<dir>/<uuid>__lock__<seq>`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// False once the ZooKeeper session the lock was taken in is lost (then someone else may
    /// hold it). While merely suspended the lock may still be ours: this returns true, and the
    /// caller decides whether "maybe" is good enough.
    pub fn is_valid(&self) -> bool {
        let s = self.zk.session();
        s.generation == self.generation && !matches!(s.state, ConnState::Lost | ConnState::Closed)
    }

    /// Releases the lock now.
    pub fn release(mut self) -> Result<(), ZkError> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<(), ZkError> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let generation = self.generation;
        let deleted = self.zk.retry(op_timeout(&self.zk), |zk| {
            if zk.session().generation != generation {
                // The session that owned the node is gone, and the node with it.
                return Ok(());
            }
            match zk.delete(&self.node, None) {
                // NoNode: gone already, or our earlier delete worked and its reply was lost.
                Ok(()) | Err(ZkError::NoNode) => Ok(()),
                Err(e) => Err(e),
            }
        });
        match deleted {
            Ok(()) | Err(ZkError::SessionLost) | Err(ZkError::Closed) => Ok(()),
            // Retried until the session was given up: the node ends with it.
            Err(e) if e.is_connection_loss() && !self.is_valid() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            warn!(
                "could not release lock {}: {e}; it is freed when the session ends",
                self.node
            );
        }
    }
}

/// Tries the lock once without waiting: `Ok(None)` if someone else holds it (nodepool's
/// "Did not get lock on <path>"), leaving no contender node behind.
pub fn try_lock(zk: &Zk, path: &str) -> Result<Option<LockGuard>, LockError> {
    acquire(zk, path, None)
}

/// Waits for the lock up to `timeout` (kazoo's `acquire(timeout=…)`).
pub fn lock(zk: &Zk, path: &str, timeout: Duration) -> Result<LockGuard, LockError> {
    match acquire(zk, path, Some(Instant::now() + timeout))? {
        Some(guard) => Ok(guard),
        None => Err(LockError::Timeout {
            path: path.to_string(),
        }),
    }
}

/// The contender node names of a lock directory in lock order (holder first); empty when the
/// lock is free or the directory does not exist.
pub fn contenders(zk: &Zk, path: &str) -> Result<Vec<String>, ZkError> {
    let mut names: Vec<(String, String)> = zk
        .get_children(path)?
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| sequence_of(&c).map(|s| (s.to_string(), c.clone())))
        .collect();
    names.sort();
    Ok(names.into_iter().map(|(_, c)| c).collect())
}

/// Whether anyone (any process) holds or waits for the lock.
pub fn is_locked(zk: &Zk, path: &str) -> Result<bool, ZkError> {
    Ok(!contenders(zk, path)?.is_empty())
}

/// The sequence part of a contender name (`…__lock__0000000007` → `0000000007`), as kazoo's
/// `__lock__(-?\d{10})$` pattern reads it.
fn sequence_of(name: &str) -> Option<&str> {
    let idx = name.rfind("__lock__")?;
    let seq = &name[idx + "__lock__".len()..];
    let digits = seq.strip_prefix('-').unwrap_or(seq);
    (digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit())).then_some(seq)
}

static LOCAL: Mutex<Option<HashSet<String>>> = Mutex::new(None);
static LOCAL_FREED: Condvar = Condvar::new();

/// This process's claim on a lock path; unclaimed on drop.
struct LocalMark(String);

impl Drop for LocalMark {
    fn drop(&mut self) {
        if let Some(set) = LOCAL.lock().unwrap().as_mut() {
            set.remove(&self.0);
        }
        LOCAL_FREED.notify_all();
    }
}

/// Claims `key` (facade and path) for this process; waits up to `deadline` (or not at all) if
/// another thread of ours has it.
fn mark_local(key: &str, deadline: Option<Instant>) -> Option<LocalMark> {
    let mut held = LOCAL.lock().unwrap();
    loop {
        let set = held.get_or_insert_with(HashSet::new);
        if set.insert(key.to_string()) {
            return Some(LocalMark(key.to_string()));
        }
        let deadline = deadline?;
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        held = LOCAL_FREED.wait_timeout(held, deadline - now).unwrap().0;
    }
}

fn acquire(zk: &Zk, path: &str, deadline: Option<Instant>) -> Result<Option<LockGuard>, LockError> {
    // Keyed by facade too: two facades (tests, tools) may talk to different trees.
    let key = format!("{:p}:{path}", std::sync::Arc::as_ptr(&zk.inner));
    let Some(mark) = mark_local(&key, deadline) else {
        debug!("lock {path} is held by another thread of this process");
        return Ok(None);
    };
    acquire_remote(zk, path, deadline, mark)
}

fn acquire_remote(
    zk: &Zk,
    path: &str,
    deadline: Option<Instant>,
    mark: LocalMark,
) -> Result<Option<LockGuard>, LockError> {
    let session = zk.session();
    let generation = session.generation;
    let op_timeout = op_timeout(zk);
    let prefix = format!("{}__lock__", uuid::Uuid::new_v4().simple());
    // Usually the lock directory exists: try the contender first and create the directory
    // (with its parents, as kazoo does) only when it is missing.
    let node = match create_contender(zk, path, &prefix, generation, op_timeout) {
        Err(ZkError::NoNode) => {
            zk.retry(op_timeout, |zk| zk.ensure_path(path))?;
            create_contender(zk, path, &prefix, generation, op_timeout)?
        }
        other => other?,
    };
    let mut guard = LockGuard {
        zk: zk.clone(),
        path: path.to_string(),
        node,
        generation,
        released: false,
        _local: mark,
    };
    // From here on, dropping `guard` deletes our contender, whatever goes wrong.
    let our_name = guard
        .node
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let our_seq = sequence_of(&our_name).unwrap_or_default().to_string();
    loop {
        let session = zk.session();
        if session.generation != generation || session.state == ConnState::Lost {
            // Our contender went with the session.
            guard.released = true;
            return Err(LockError::Lost {
                path: path.to_string(),
            });
        }
        let children = zk
            .retry(op_timeout, |zk| zk.get_children(path))?
            .unwrap_or_default();
        if !children.contains(&our_name) {
            guard.released = true;
            return Err(LockError::Lost {
                path: path.to_string(),
            });
        }
        let predecessor = children
            .iter()
            .filter_map(|c| sequence_of(c).map(|s| (s, c)))
            .filter(|(s, _)| *s < our_seq.as_str())
            .max()
            .map(|(_, c)| c.clone());
        let Some(predecessor) = predecessor else {
            return Ok(Some(guard));
        };
        let Some(deadline) = deadline else {
            guard.release_inner()?;
            return Ok(None);
        };
        let predecessor = format!("{path}/{predecessor}");
        let (stat, watch) = zk.retry(op_timeout, |zk| zk.exists_watch(&predecessor))?;
        if stat.is_none() {
            continue;
        }
        let now = Instant::now();
        if now >= deadline {
            guard.release_inner()?;
            return Ok(None);
        }
        // Whatever ended the wait (the predecessor changed, the client expired, the time is
        // up), the next turn reads the contenders again, once connected.
        let _ = zk.wait_watch(watch, deadline - now);
    }
}

/// How long one lock step keeps retrying through a connection loss: longer than a session
/// can stay suspended (a step given up while the session may still resume could leave our
/// contender behind, blocking the lock for the session's life).
fn op_timeout(zk: &Zk) -> Duration {
    (zk.suspension_limit() + zk.session_timeout()).max(Duration::from_secs(2))
}

/// Creates our contender node in session `generation`. After a connection loss the create
/// may have reached the server: from then on each attempt first looks for a child with our
/// prefix and adopts it, and creates only when there is none. Never in a later session
/// (`Zk::create_in`): a node created there would outlive the guard that believes it died
/// with the old one.
fn create_contender(
    zk: &Zk,
    dir: &str,
    prefix: &str,
    generation: u64,
    timeout: Duration,
) -> Result<String, ZkError> {
    let target = format!("{dir}/{prefix}");
    let mut maybe_created = false;
    zk.retry(timeout, |zk| {
        if maybe_created {
            let children = zk.get_children(dir)?.unwrap_or_default();
            if let Some(mine) = children.iter().find(|c| c.starts_with(prefix)) {
                debug!("adopted lock contender {dir}/{mine} after a connection loss");
                return Ok(format!("{dir}/{mine}"));
            }
        }
        let created = zk.create_in(generation, &target, b"", Mode::EphemeralSequential);
        if matches!(&created, Err(e) if e.is_connection_loss()) {
            maybe_created = true;
        }
        created
    })
}

#[cfg(test)]
mod tests {
    use super::sequence_of;

    #[test]
    fn contender_names_parse_like_kazoo() {
        assert_eq!(
            sequence_of("fee85617bc21485ab097a1def35ffc89__lock__0000000001"),
            Some("0000000001")
        );
        assert_eq!(sequence_of("x__lock__-000000001"), None);
        assert_eq!(sequence_of("x__lock__-0000000001"), Some("-0000000001"));
        assert_eq!(sequence_of("x__lock__00000001"), None);
        assert_eq!(sequence_of("x__rlock__0000000001"), None);
        assert_eq!(sequence_of("lock"), None);
    }
}
