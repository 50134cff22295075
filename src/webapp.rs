//! The builder's HTTP endpoint (thread `webapp`), off unless `builder-webapp` is configured:
//!
//! * `/metrics`: Prometheus text format 0.0.4 (`metrics` owns the names);
//! * `/healthz`: 200 `ok` while the ZooKeeper session is connected and the builder component
//!   is registered in it, else 503 with the reason on one line;
//! * `/ready`: 200 once start-up is done, 503 before and from the start of shutdown. Start-up
//!   is done when the daemon announced readiness (ZooKeeper connected, the component
//!   registered or one session timeout given up waiting for it, see `app`) and the scheduler
//!   got the watcher's first read of the image tree;
//! * `/dib-image-list`, `/image-list`: the rows of `nodepool dib-image-list` / `image-list`,
//!   as nodepool 11's launcher webapp serves them: JSON (the CLI's JSON keys) when the
//!   `Accept` header prefers `application/json`, else the text table; with
//!   `Access-Control-Allow-Origin: *`.
//!
//! nodepool.yaml's `webapp` key belongs to the launcher (port 8005 by default; launcher and
//! builder often share the file), so the builder never listens because of it: its own key is
//! `builder-webapp` (see `config`).
//!
//! Hand-written over `std::net` with `httparse` (already built for ureq) rather than a server
//! crate: `tiny_http`, the usual small synchronous server, starts an unnamed accept thread and
//! a pool of unnamed connection threads that the registry and the SIGUSR2 stack dump would
//! never see (invariant 3). Here one registered thread accepts and answers one request per
//! connection (`Connection: close`), with 2 s read and write timeouts so a stuck client
//! delays the next scrape by at most that; requests are small (8 KiB at most).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use log::{debug, info, warn};

use crate::metrics;
use crate::ops::list;
use crate::registry;
use crate::thread::{self, JoinHandle, ThreadKind};
use crate::zk::component::Registration;
use crate::zk::{ConnState, Zk};

const IO_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_REQUEST: usize = 8192;

/// Whether the builder is healthy, and if not why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ok,
    Unavailable(String),
}

/// `/healthz`'s decision from the session state and the registration.
pub fn health(state: ConnState, registered: bool, registration_error: Option<String>) -> Health {
    match state {
        ConnState::Connected if registered => Health::Ok,
        ConnState::Connected => Health::Unavailable(format!(
            "the builder component is not registered in the ZooKeeper session{}",
            registration_error
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )),
        ConnState::Connecting => Health::Unavailable("connecting to ZooKeeper".into()),
        ConnState::Suspended => {
            Health::Unavailable("ZooKeeper connection lost (the session may still resume)".into())
        }
        ConnState::Lost => Health::Unavailable("ZooKeeper session lost; opening a new one".into()),
        ConnState::Closed => Health::Unavailable("ZooKeeper session closed (shutting down)".into()),
    }
}

/// Whether an `Accept` header asks for JSON rather than text, as the launcher webapp decides
/// (its offers in order: text/html, text/plain, application/json; the highest quality wins,
/// the earlier offer on a tie; no header means text).
pub fn wants_json(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return false;
    };
    let offers = ["text/html", "text/plain", "application/json"];
    let mut quality = [0.0f64; 3];
    for part in accept.split(',') {
        let mut params = part.split(';');
        let media = params.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = params
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f64>().ok())
            .unwrap_or(1.0);
        for (i, offer) in offers.iter().enumerate() {
            let (ty, _) = offer.split_once('/').unwrap_or((offer, ""));
            let matches = media == *offer || media == "*/*" || media == format!("{ty}/*");
            if matches {
                quality[i] = quality[i].max(q);
            }
        }
    }
    let best = quality.iter().copied().fold(0.0, f64::max);
    best > 0.0 && quality[0] < best && quality[1] < best
}

/// The running endpoint; dropping it stops and joins its thread.
pub struct Webapp {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    handle: Option<JoinHandle<()>>,
}

impl Webapp {
    /// Listens on `addr` and serves on the `webapp` thread. A listen failure is returned
    /// (the daemon does not start without the endpoint it was told to serve).
    pub fn start(addr: SocketAddr, zk: &Zk, registration: Registration) -> Result<Webapp, String> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| format!("builder-webapp: cannot listen on {addr}: {e}"))?;
        let addr = listener.local_addr().unwrap_or(addr);
        info!("Webapp listening on {addr}");
        metrics::global().start_recording();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let zk = zk.clone();
        let handle = thread::try_spawn(ThreadKind::Webapp, "webapp", move || {
            registry::set_activity(format!("serving http on {addr}"));
            for conn in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                match conn {
                    Ok(stream) => {
                        if let Err(e) = serve(stream, &zk, &registration) {
                            debug!("webapp: {e}");
                        }
                    }
                    Err(e) => warn!("webapp: accept failed: {e}"),
                }
            }
        })
        .map_err(|e| format!("builder-webapp: cannot start its thread: {e}"))?;
        Ok(Webapp {
            stop,
            addr,
            handle: Some(handle),
        })
    }
}

impl Drop for Webapp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        match TcpStream::connect_timeout(&wake, IO_TIMEOUT) {
            Ok(_) => drop(self.handle.take()),
            Err(e) => {
                warn!("webapp: cannot wake its thread to stop it ({e}); leaving it");
                if let Some(h) = self.handle.take() {
                    h.detach();
                }
            }
        }
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

fn serve(mut stream: TcpStream, zk: &Zk, registration: &Registration) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (method, path, accept) = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(()); // Closed before a full request (our own wake-up connection).
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let accept = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("accept"))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned());
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                    accept,
                );
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => continue,
            Ok(httparse::Status::Partial) => {
                return respond(
                    &mut stream,
                    "GET",
                    Response::text(431, "request too large\n"),
                );
            }
            Err(e) => {
                return respond(
                    &mut stream,
                    "GET",
                    Response::text(400, format!("bad request: {e}\n")),
                );
            }
        }
    };
    let response = if method != "GET" && method != "HEAD" {
        Response::text(405, "only GET and HEAD\n")
    } else {
        route(&path, accept.as_deref(), zk, registration)
    };
    respond(&mut stream, &method, response)
}

fn route(path: &str, accept: Option<&str>, zk: &Zk, registration: &Registration) -> Response {
    let path = path.split('?').next().unwrap_or("");
    let registered = registration.is_current(zk);
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics::global().render(zk.state() == ConnState::Connected, registered),
        },
        "/healthz" => match health(zk.state(), registered, registration.last_error()) {
            Health::Ok => Response::text(200, "ok\n"),
            Health::Unavailable(reason) => Response::text(503, format!("{reason}\n")),
        },
        "/ready" => {
            if metrics::global().is_ready() {
                Response::text(200, "ready\n")
            } else {
                Response::text(503, "not ready: starting up or shutting down\n")
            }
        }
        "/dib-image-list" | "/image-list" => {
            let json = wants_json(accept);
            let listed = if path == "/dib-image-list" {
                list::dib_image_list(zk, json)
            } else {
                list::image_list(zk, json)
            };
            match listed {
                Ok(body) if json => Response {
                    status: 200,
                    content_type: "application/json; charset=utf-8",
                    body,
                },
                Ok(body) => Response::text(200, body),
                Err(e) => Response::text(503, format!("cannot read ZooKeeper: {e}\n")),
            }
        }
        _ => Response::text(404, "not found\n"),
    }
}

fn respond(stream: &mut TcpStream, method: &str, r: Response) -> io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nAccess-Control-Allow-Origin: *\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(r.body.as_bytes());
    }
    stream.write_all(&out)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_only_when_the_accept_header_prefers_it() {
        assert!(!wants_json(None));
        assert!(!wants_json(Some("*/*")));
        assert!(wants_json(Some("application/json")));
        assert!(!wants_json(Some("text/plain")));
        assert!(wants_json(Some("text/plain;q=0.5, application/json")));
        assert!(!wants_json(Some("application/json, text/plain")));
    }

    #[test]
    fn health_names_the_reason() {
        assert_eq!(health(ConnState::Connected, true, None), Health::Ok);
        assert!(matches!(
            health(ConnState::Connected, false, Some("NoAuth".into())),
            Health::Unavailable(r) if r.contains("not registered") && r.contains("NoAuth")
        ));
        assert!(matches!(
            health(ConnState::Suspended, true, None),
            Health::Unavailable(r) if r.contains("connection lost")
        ));
    }
}
