//! Writing a build's or an upload's result exactly once, although a reply can be lost.
//!
//! A worker creates its record (`building`, `uploading`) and later overwrites it with the
//! result. If the connection drops while the result is on its way, the worker cannot know
//! whether it landed: a write sent just before a server froze may even land after the
//! worker gave its session up. Acting on a wrong guess is harmful either way: deleting the
//! files or the cloud image of a result that did land leaves a `ready` record that names
//! something gone.
//!
//! So the result is written only over the record as it was created (version 0), and an
//! unknown outcome is *settled*: a fence record (a `failed` one) is written over version 0
//! in whatever session there is now. If the fence lands, the late write (conditional on the
//! same version) never can; if the version has moved, the record is read to see whether it
//! holds our result.
//!
//! Settling waits for ZooKeeper as long as it takes: how long the server stays away says
//! nothing about whether the write landed, so no deadline turns "cannot ask" into "lost".
//! Only when the answer cannot be had at all (the daemon is stopping, or ZooKeeper refuses
//! the question) is the outcome [`Settled::Unknown`], and the
//! caller then deletes nothing: the cloud image and the local files stay for whoever reads
//! the record next (an orphaned record is cleaned up, its cloud image found by leak
//! detection).

use std::time::{Duration, Instant};

use log::{info, warn};

use super::{ConnState, Zk, ZkError, lock::LockGuard};

/// Writes `data` over the record at `path` as it was created (version 0), retrying on
/// connection loss for up to `timeout`. With `guard`, every attempt first checks the lock
/// still holds. A retry that finds the version moved because an earlier attempt landed
/// (its reply lost) succeeds.
///
/// `consumes` is a znode the result satisfies (the `request-build` of a manual build): it
/// is deleted in the same transaction, so whoever sees the result no longer sees the
/// request, and a request made after it is a new one. Already gone is fine. A lost write
/// settled later took the deletion with it or left both undone.
pub fn write_result(
    zk: &Zk,
    path: &str,
    data: &[u8],
    guard: Option<&LockGuard>,
    consumes: Option<&str>,
    timeout: Duration,
) -> Result<(), ZkError> {
    zk.retry(timeout, |zk| {
        // A retry may run on a new session: write only while the lock still holds.
        if guard.is_some_and(|g| !g.is_valid()) {
            return Err(ZkError::SessionLost);
        }
        let written = match consumes {
            Some(other) => match zk.set_data_and_delete(path, data, 0, other) {
                // `other` is gone (or `path` is, which the plain write finds out again).
                Err(ZkError::NoNode) => zk.set_data(path, data, Some(0)).map(drop),
                written => written,
            },
            None => zk.set_data(path, data, Some(0)).map(drop),
        };
        match written {
            Ok(()) => Ok(()),
            Err(ZkError::BadVersion) if holds(zk, path, data)? => Ok(()),
            Err(e) => Err(e),
        }
    })
}

/// What became of a result write whose outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// It landed: the record holds the result.
    Recorded,
    /// It never will: the fence landed, or the record is gone or holds something else.
    NotRecorded,
    /// ZooKeeper could not be asked (the daemon is stopping, or the question was
    /// refused): keep everything the result names.
    Unknown,
}

/// How often a settle waiting for ZooKeeper looks again (and notices a stop).
const SETTLE_POLL: Duration = Duration::from_secs(1);

/// Settles a write of `data` to `path` whose outcome was lost (see the module docs) by
/// writing `fence` over version 0, waiting for ZooKeeper as long as the session is open
/// and `stopping` says no (a stop must not wait for a ZooKeeper that is away).
pub fn settle(
    zk: &Zk,
    path: &str,
    data: &[u8],
    fence: &[u8],
    stopping: &dyn Fn() -> bool,
) -> Settled {
    let mut waiting_since: Option<Instant> = None;
    loop {
        if zk.state() == ConnState::Closed || stopping() {
            warn!("{path}: stopping before ZooKeeper could say whether the result write landed");
            return Settled::Unknown;
        }
        let session = zk.session();
        if !zk.wait_connected(SETTLE_POLL) {
            if waiting_since.is_none() {
                warn!(
                    "{path}: ZooKeeper unreachable; waiting to learn whether the result write landed, deleting nothing meanwhile"
                );
                waiting_since = Some(Instant::now());
            }
            continue;
        }
        let answer = match zk.set_data(path, fence, Some(0)) {
            Ok(_) | Err(ZkError::NoNode) => Ok(false),
            Err(ZkError::BadVersion) => holds(zk, path, data),
            Err(e) => Err(e),
        };
        if let Some(since) = waiting_since.take() {
            info!(
                "{path}: ZooKeeper answered after {:.1}s",
                since.elapsed().as_secs_f64()
            );
        }
        match answer {
            Ok(true) => return Settled::Recorded,
            Ok(false) => return Settled::NotRecorded,
            Err(e) if e.is_connection_loss() || e == ZkError::SessionLost => {
                // Not connected after all: wait for the next state (briefly), ask again.
                zk.wait_state_change(session, Duration::from_millis(200));
            }
            Err(e) => {
                warn!("{path}: cannot settle the result write ({e}); deleting nothing");
                return Settled::Unknown;
            }
        }
    }
}

/// Whether the record at `path` holds exactly `data`.
fn holds(zk: &Zk, path: &str, data: &[u8]) -> Result<bool, ZkError> {
    Ok(zk.get_data(path)?.is_some_and(|(d, _)| d == data))
}
