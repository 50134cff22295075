//! A TCP proxy in front of a real ZooKeeper's plaintext port that loses (or holds back, see
//! below) one chosen reply: the request reaches the server and is carried out, the answer
//! never reaches the client and the connection is cut. That is the window in which a client
//! cannot know whether its write happened (the "connection loss" of ZooKeeper's
//! documentation), made to order.
//!
//! # How it reads the stream
//!
//! ZooKeeper frames every packet with a 4-byte big-endian length. The first packet each way
//! is the session handshake and is passed through. After it, a request starts with `xid`
//! and `type` (both int32) and, for the operations we cut, the path as an int32 length and
//! bytes; a reply starts with `xid`, `zxid` (int64) and `err`. [`ZkProxy::cut_reply_of`] arms
//! a one-shot rule: the next request of one of the given types whose path contains a given
//! text is forwarded and its `xid` remembered; when the server's reply with that `xid`
//! arrives it is dropped and both connections are shut. Because the cut waits for the
//! reply, the server has certainly done the work: no timing is involved.
//!
//! [`ZkProxy::hold_reply_of`] arms the other one-shot rule: the matching reply is held back
//! (and every reply after it on that connection, as ZooKeeper answers in order) until
//! [`ZkProxy::release`]. Between [`ZkProxy::wait_held`] and the release the server has
//! answered but the client does not know the answer yet: a test changes the tree there to
//! put a change exactly between two requests of the client.
//!
//! Threads: one acceptor, two per connection; all end when the proxy is dropped (the
//! acceptor is woken by a connection of our own).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The request type of a setData.
pub const SET_DATA: &[i32] = &[5];
/// Request types of a create: create, create2, createContainer, createTTL.
pub const CREATE: &[i32] = &[1, 15, 19, 21];
/// The request type of a delete.
pub const DELETE: &[i32] = &[2];
/// The request type of a multi (a transaction); a rule matches it by its first operation's
/// path.
pub const MULTI: &[i32] = &[14];
/// Request types of a children list: getChildren, getChildren2.
pub const GET_CHILDREN: &[i32] = &[8, 12];

struct Rule {
    types: Vec<i32>,
    path_part: String,
    action: Action,
}

/// What happens to the reply a [`Rule`] picked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Lost, the connection cut, and the proxy down after it if `then_down` (see
    /// [`ZkProxy::cut_reply_then_go_down`]).
    Cut { then_down: bool },
    /// Held back until [`ZkProxy::release`].
    Hold,
}

/// Where a held reply is.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
enum Hold {
    #[default]
    Nothing,
    /// The reply arrived and waits for the release.
    Holding,
    Released,
}

struct Shared {
    upstream: SocketAddr,
    rule: Mutex<Option<Rule>>,
    cuts: AtomicUsize,
    hold: Mutex<Hold>,
    hold_changed: Condvar,
    /// While down, every new connection is closed at once.
    down: AtomicBool,
    /// Every connection pair, to shut them when the proxy goes.
    conns: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

pub struct ZkProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl ZkProxy {
    /// A proxy on a free loopback port in front of `127.0.0.1:upstream_port`.
    pub fn start(upstream_port: u16) -> ZkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the zookeeper proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            rule: Mutex::new(None),
            cuts: AtomicUsize::new(0),
            hold: Mutex::new(Hold::Nothing),
            hold_changed: Condvar::new(),
            down: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let acceptor = test_thread("zk-proxy", move || {
            for client in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let s = s.clone();
                test_thread("zk-proxy-conn", move || {
                    let _ = serve(&s, client);
                });
            }
        });
        ZkProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Arms the one-shot cut: the reply to the next request of one of `types` whose path
    /// contains `path_part` is lost, and that connection cut.
    pub fn cut_reply_of(&self, types: &[i32], path_part: &str) {
        self.arm(types, path_part, Action::Cut { then_down: false });
    }

    /// Arms the one-shot hold: the reply to the next request of one of `types` whose path
    /// contains `path_part` (and every later reply on its connection) waits for
    /// [`ZkProxy::release`].
    pub fn hold_reply_of(&self, types: &[i32], path_part: &str) {
        *self.shared.hold.lock().unwrap() = Hold::Nothing;
        self.arm(types, path_part, Action::Hold);
    }

    /// Waits up to `timeout` for the held reply to arrive from the server (so the request
    /// has been carried out); false if it did not.
    pub fn wait_held(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut hold = self.shared.hold.lock().unwrap();
        while *hold != Hold::Holding {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            hold = self
                .shared
                .hold_changed
                .wait_timeout(hold, deadline - now)
                .unwrap()
                .0;
        }
        true
    }

    /// Lets the held reply (and those behind it) go on to the client.
    pub fn release(&self) {
        *self.shared.hold.lock().unwrap() = Hold::Released;
        self.shared.hold_changed.notify_all();
    }

    /// Like [`ZkProxy::cut_reply_of`], and from the cut on the proxy is down: ZooKeeper is
    /// unreachable through it (the session is lost) until [`ZkProxy::set_down`]`(false)`.
    pub fn cut_reply_then_go_down(&self, types: &[i32], path_part: &str) {
        self.arm(types, path_part, Action::Cut { then_down: true });
    }

    /// Makes ZooKeeper unreachable through the proxy (every connection is closed at once)
    /// or reachable again.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    fn arm(&self, types: &[i32], path_part: &str, action: Action) {
        *self.shared.rule.lock().unwrap() = Some(Rule {
            types: types.to_vec(),
            path_part: path_part.to_string(),
            action,
        });
    }

    /// How many replies have been lost so far.
    pub fn cuts(&self) -> usize {
        self.shared.cuts.load(Ordering::SeqCst)
    }

    /// Whether an armed cut is still waiting for its request.
    pub fn armed(&self) -> bool {
        self.shared.rule.lock().unwrap().is_some()
    }
}

impl Drop for ZkProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.release();
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        let _ = TcpStream::connect(self.addr);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// A named test-side thread (the daemon's spawn wrapper is for the daemon's own threads).
fn test_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    #[allow(clippy::disallowed_methods)]
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawn a zookeeper proxy thread")
}

/// One length-framed packet, the length included.
fn read_packet(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let n = i32::from_be_bytes(len);
    if !(0..=16 << 20).contains(&n) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad frame length",
        ));
    }
    let mut p = len.to_vec();
    p.resize(4 + n as usize, 0);
    r.read_exact(&mut p[4..])?;
    Ok(p)
}

fn int32(p: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(p.get(at..at + 4)?.try_into().ok()?))
}

/// The path of a request whose body starts with one (create, delete, ...); of a multi, the
/// path of its first operation (after the operation header: type, done flag, error).
fn request_path(p: &[u8]) -> Option<String> {
    let at = if int32(p, 8)? == MULTI[0] { 21 } else { 12 };
    let n = usize::try_from(int32(p, at)?).ok()?;
    Some(String::from_utf8_lossy(p.get(at + 4..at + 4 + n)?).into_owned())
}

fn serve(s: &Arc<Shared>, client: TcpStream) -> io::Result<()> {
    if s.down.load(Ordering::SeqCst) {
        let _ = client.shutdown(Shutdown::Both);
        return Ok(());
    }
    let server = TcpStream::connect(s.upstream)?;
    {
        let mut conns = s.conns.lock().unwrap();
        conns.push(client.try_clone()?);
        conns.push(server.try_clone()?);
    }
    // The xid whose reply a rule picked and what to do with it, set by the request side.
    let doomed: Arc<Mutex<Option<(i32, Action)>>> = Arc::new(Mutex::new(None));
    let (mut c_in, mut s_out) = (client.try_clone()?, server.try_clone()?);
    let (shared, doomed_req) = (s.clone(), doomed.clone());
    let requests = test_thread("zk-proxy-requests", move || -> io::Result<()> {
        s_out.write_all(&read_packet(&mut c_in)?)?;
        loop {
            let p = read_packet(&mut c_in)?;
            if let (Some(xid), Some(kind)) = (int32(&p, 4), int32(&p, 8)) {
                let mut rule = shared.rule.lock().unwrap();
                let hit = rule.as_ref().is_some_and(|r| {
                    r.types.contains(&kind)
                        && request_path(&p).is_some_and(|path| path.contains(&r.path_part))
                });
                if hit && let Some(r) = rule.take() {
                    *doomed_req.lock().unwrap() = Some((xid, r.action));
                }
            }
            s_out.write_all(&p)?;
        }
    });
    let (mut s_in, mut c_out) = (server.try_clone()?, client.try_clone()?);
    let replies = (|| -> io::Result<()> {
        c_out.write_all(&read_packet(&mut s_in)?)?;
        loop {
            let p = read_packet(&mut s_in)?;
            let picked = *doomed.lock().unwrap();
            match picked {
                Some((xid, Action::Cut { then_down })) if int32(&p, 4) == Some(xid) => {
                    if then_down {
                        s.down.store(true, Ordering::SeqCst);
                    }
                    s.cuts.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                Some((xid, Action::Hold)) if int32(&p, 4) == Some(xid) => {
                    *doomed.lock().unwrap() = None;
                    let mut hold = s.hold.lock().unwrap();
                    *hold = Hold::Holding;
                    s.hold_changed.notify_all();
                    while *hold == Hold::Holding {
                        hold = s.hold_changed.wait(hold).unwrap();
                    }
                }
                _ => {}
            }
            c_out.write_all(&p)?;
        }
    })();
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
    let _ = requests.join();
    replies
}
