//! A fault-injecting HTTP/1.1 proxy in front of a real server (Glance): tests point a cloud's
//! endpoint at the proxy and make chosen requests fail the way a sick cloud does, while every
//! other request reaches the real server unchanged.
//!
//! # What it does with one connection
//!
//! It reads the request head (request line and headers), then looks for the first [`Rule`]
//! matching the method and the path's end. Without a match the request is forwarded: the head
//! and exactly the request body (by `Content-Length`, or chunk by chunk) go to the upstream
//! server, the whole answer (by its `Content-Length`, chunked, or up to the close) comes back
//! to the client, and both connections are closed. With a match, the rule's [`Fault`] decides:
//!
//! * [`Fault::Status`]: the body is read and dropped, then `HTTP <code>` with a Glance-like
//!   JSON error body is answered; upstream never sees the request.
//! * [`Fault::AfterForward`]: the request is forwarded and the real answer read, then replaced
//!   by `HTTP <code>` (the cloud did the work, the client hears it failed).
//! * [`Fault::Stall`]: the body is read, then nothing is answered until the rules change
//!   ([`FaultProxy::clear`] or another [`FaultProxy::set`]) or the proxy is dropped.
//! * [`Fault::Hold`]: the first bytes of the body are read, then nothing more is read or
//!   answered until the rules change or the proxy is dropped (the client blocks mid-body).
//! * [`Fault::Vanish`]: half of the body is forwarded upstream, then both connections are cut
//!   and the proxy goes *down*: every live connection is cut and every new one closed
//!   unanswered until [`FaultProxy::clear`]. That is a cloud vanishing mid-upload.
//!
//! Injected answers carry `Connection: close`, so no client reuses a connection the proxy
//! closes. Every request is recorded as `"<METHOD> <path> -> <what happened>"`
//! ([`FaultProxy::requests`]) for assertions and failure messages.
//!
//! Threads: one acceptor, one per connection; all end when the proxy is dropped (the
//! acceptor is woken by a connection of our own).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long the proxy waits for either side to send something before giving up on it.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// What a matching request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status without asking upstream.
    Status(u16),
    /// Forward, then answer this status instead of upstream's answer.
    AfterForward(u16),
    /// Never answer (until the rules change).
    Stall,
    /// Read this many bytes of the body, then neither read on nor answer until the rules
    /// change: a cloud that stops taking an upload part-way (the client's writes block).
    Hold(u64),
    /// Forward half the body, cut the connections, and stay down until cleared.
    Vanish,
}

/// A request pattern and its fault.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `POST`, `PUT`, ... or `*` for any.
    pub method: String,
    /// The request path (without query) must end with this.
    pub path_suffix: String,
    pub fault: Fault,
}

impl Rule {
    pub fn new(method: &str, path_suffix: &str, fault: Fault) -> Rule {
        Rule {
            method: method.to_string(),
            path_suffix: path_suffix.to_string(),
            fault,
        }
    }

    /// Glance's image create, `POST /v2/images`.
    pub fn create(fault: Fault) -> Rule {
        Rule::new("POST", "/v2/images", fault)
    }

    /// Glance's image data upload, `PUT /v2/images/<id>/file`.
    pub fn data(fault: Fault) -> Rule {
        Rule::new("PUT", "/file", fault)
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        (self.method == "*" || self.method == method) && path.ends_with(&self.path_suffix)
    }
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    /// Bumped whenever the rules change: stalled connections wake up and close.
    epoch: u64,
    down: bool,
    /// Live connections (client side and upstream side), cut when the proxy goes down.
    live: Vec<TcpStream>,
    requests: Vec<String>,
}

struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
    changed: Condvar,
    stopping: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, line: String) {
        self.lock().requests.push(line);
    }
}

/// A running proxy on a loopback port.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy forwarding to `upstream` (`127.0.0.1:<port>`), with no rules.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("fault proxy: cannot bind a loopback port: {e}"));
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        let s = shared.clone();
        // Test-side threads: the daemon's spawn wrapper is for the daemon's own threads.
        #[allow(clippy::disallowed_methods)]
        let acceptor = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let s = s.clone();
                    #[allow(clippy::disallowed_methods)]
                    let _ = std::thread::Builder::new()
                        .name("fault-proxy-conn".into())
                        .spawn(move || handle(&s, conn));
                }
            })
            .expect("spawn the fault proxy");
        FaultProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the rules (and wakes stalled connections, which then close).
    pub fn set(&self, rules: Vec<Rule>) {
        let mut st = self.shared.lock();
        st.rules = rules;
        st.epoch += 1;
        self.shared.changed.notify_all();
    }

    /// No rules, not down: everything is forwarded again.
    pub fn clear(&self) {
        let mut st = self.shared.lock();
        st.rules.clear();
        st.down = false;
        st.epoch += 1;
        self.shared.changed.notify_all();
    }

    /// Every request so far, as `"<METHOD> <path> -> <outcome>"`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// How many recorded requests contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.contains(needle))
            .count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        {
            let mut st = self.shared.lock();
            st.epoch += 1;
            for c in st.live.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
            self.shared.changed.notify_all();
        }
        // Wake the acceptor so it sees `stopping`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// The request head: request line, method, path, raw bytes, and how the body is framed.
struct Head {
    raw: Vec<u8>,
    method: String,
    path: String,
    framing: Framing,
}

#[derive(Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked,
    /// No length: the body runs to the close (answers only).
    ToClose,
}

fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    let mut first = String::new();
    let mut length = None;
    let mut chunked = false;
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return if raw.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "head cut short",
                ))
            };
        }
        raw.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if text.is_empty() {
            break;
        }
        if first.is_empty() {
            first = text;
            continue;
        }
        if let Some((k, v)) = text.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse::<u64>().ok();
            } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let framing = if chunked {
        Framing::Chunked
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::ToClose,
        }
    };
    Ok(Some(Head {
        raw,
        method,
        path,
        framing,
    }))
}

/// Copies a body framed by `framing` from `r` to `w` (raw, framing included); `limit` stops
/// after that many bytes of a fixed-length body. `request` says a body without length is
/// empty (requests) rather than running to the close (answers).
fn copy_body(
    r: &mut impl BufRead,
    w: &mut impl Write,
    framing: Framing,
    request: bool,
    limit: Option<u64>,
) -> io::Result<()> {
    match framing {
        Framing::Length(n) => {
            let n = limit.map_or(n, |l| l.min(n));
            let copied = io::copy(&mut r.take(n), w)?;
            if copied < n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body cut short",
                ));
            }
        }
        Framing::ToClose if request => {}
        Framing::ToClose => {
            io::copy(r, w)?;
        }
        Framing::Chunked => loop {
            let mut size_line = Vec::new();
            r.read_until(b'\n', &mut size_line)?;
            w.write_all(&size_line)?;
            let text = String::from_utf8_lossy(&size_line);
            let size = u64::from_str_radix(text.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailers up to the empty line.
                loop {
                    let mut line = Vec::new();
                    if r.read_until(b'\n', &mut line)? == 0 {
                        return Ok(());
                    }
                    w.write_all(&line)?;
                    if line == b"\r\n" || line == b"\n" {
                        return Ok(());
                    }
                }
            }
            io::copy(&mut r.take(size + 2), w)?;
        },
    }
    w.flush()
}

fn answer(client: &mut TcpStream, status: u16) {
    let reason = match status {
        415 => "Unsupported Media Type",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Injected Fault",
    };
    let body = format!(
        "{{\"code\": {status}, \"title\": \"{reason}\", \"message\": \"injected by the fault proxy: {status} {reason}\"}}"
    );
    let text = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(text.as_bytes());
    let _ = client.flush();
}

fn register(shared: &Shared, conn: &TcpStream) -> bool {
    let mut st = shared.lock();
    if st.down || shared.stopping.load(Ordering::SeqCst) {
        return false;
    }
    if let Ok(c) = conn.try_clone() {
        st.live.push(c);
    }
    true
}

fn unregister(shared: &Shared, conn: &TcpStream) {
    let Ok(addr) = conn.local_addr() else { return };
    let peer = conn.peer_addr().ok();
    shared
        .lock()
        .live
        .retain(|c| !(c.local_addr().ok() == Some(addr) && c.peer_addr().ok() == peer));
}

fn handle(shared: &Shared, client: TcpStream) {
    let _ = client.set_read_timeout(Some(IO_TIMEOUT));
    let _ = client.set_write_timeout(Some(IO_TIMEOUT));
    if !register(shared, &client) {
        shared.record("(new connection) -> refused (down)".into());
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let _ = serve(shared, &client);
    unregister(shared, &client);
    let _ = client.shutdown(Shutdown::Both);
}

fn serve(shared: &Shared, client: &TcpStream) -> io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut writer = client.try_clone()?;
    let Some(head) = read_head(&mut reader)? else {
        return Ok(());
    };
    let (fault, epoch) = {
        let st = shared.lock();
        if st.down {
            drop(st);
            shared.record(format!("{} {} -> refused (down)", head.method, head.path));
            return Ok(());
        }
        let fault = st
            .rules
            .iter()
            .find(|r| r.matches(&head.method, &head.path))
            .map(|r| r.fault);
        (fault, st.epoch)
    };
    let what = format!("{} {}", head.method, head.path);
    match fault {
        Some(Fault::Status(code)) => {
            copy_body(&mut reader, &mut io::sink(), head.framing, true, None)?;
            shared.record(format!("{what} -> injected {code}"));
            answer(&mut writer, code);
            Ok(())
        }
        Some(fault @ (Fault::Stall | Fault::Hold(_))) => {
            let limit = match fault {
                Fault::Hold(n) => Some(n),
                _ => None,
            };
            copy_body(&mut reader, &mut io::sink(), head.framing, true, limit)?;
            shared.record(format!("{what} -> stalled"));
            let mut st = shared.lock();
            while st.epoch == epoch && !shared.stopping.load(Ordering::SeqCst) {
                st = shared
                    .changed
                    .wait_timeout(st, Duration::from_secs(1))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            Ok(())
        }
        Some(Fault::Vanish) => {
            let mut up = connect_upstream(shared)?;
            up.write_all(&head.raw)?;
            let half = match head.framing {
                Framing::Length(n) => Some(n / 2),
                _ => Some(0),
            };
            let _ = copy_body(&mut reader, &mut up, head.framing, true, half);
            shared.record(format!("{what} -> vanished mid-request"));
            let mut st = shared.lock();
            st.down = true;
            for c in st.live.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
            drop(st);
            let _ = up.shutdown(Shutdown::Both);
            Ok(())
        }
        Some(Fault::AfterForward(code)) => {
            let (status, _) = forward(shared, &head, &mut reader, &mut io::sink())?;
            shared.record(format!("{what} -> upstream {status}, injected {code}"));
            answer(&mut writer, code);
            Ok(())
        }
        None => {
            let (status, _) = forward(shared, &head, &mut reader, &mut writer)?;
            shared.record(format!("{what} -> upstream {status}"));
            Ok(())
        }
    }
}

fn connect_upstream(shared: &Shared) -> io::Result<TcpStream> {
    let up = TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(10))?;
    up.set_read_timeout(Some(IO_TIMEOUT))?;
    up.set_write_timeout(Some(IO_TIMEOUT))?;
    if !register(shared, &up) {
        let _ = up.shutdown(Shutdown::Both);
        return Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "proxy down",
        ));
    }
    Ok(up)
}

/// Sends the request upstream and copies the answer to `out`; returns the upstream status.
fn forward(
    shared: &Shared,
    head: &Head,
    reader: &mut impl BufRead,
    out: &mut impl Write,
) -> io::Result<(u16, ())> {
    let mut up = connect_upstream(shared)?;
    let result = (|| {
        up.write_all(&head.raw)?;
        copy_body(reader, &mut up, head.framing, true, None)?;
        let mut up_reader = BufReader::new(up.try_clone()?);
        let Some(reply) = read_head(&mut up_reader)? else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "no answer upstream",
            ));
        };
        // For an answer the "method" slot holds the protocol and "path" the status.
        let status = reply.path.parse::<u16>().unwrap_or(0);
        out.write_all(&reply.raw)?;
        copy_body(&mut up_reader, out, reply.framing, false, None)?;
        Ok((status, ()))
    })();
    unregister(shared, &up);
    let _ = up.shutdown(Shutdown::Both);
    result
}
