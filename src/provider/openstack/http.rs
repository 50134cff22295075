//! The HTTP layer of the OpenStack driver: ureq agents per provider (one for http, and one
//! for https made on the first https URL), the provider's rate limit, one retry of idempotent
//! requests on a broken connection, and turning answers into one-line messages.
//!
//! Every request, Keystone's included, first waits for its turn in the provider's
//! [`RateLimiter`]. Answers are returned whatever their status (`http_status_as_error` is
//! off); callers decide what a status means. Bodies of answers are read up to
//! [`MAX_BODY`]; request bodies are either small byte buffers or a streamed reader with a
//! known length (`Content-Length` is set by hand so ureq does not fall back to chunked
//! encoding).
//!
//! CAUTION: uWSGI-served APIs (Glance, Keystone) may close a connection after each response
//! without saying so; a pooled connection then fails on its next use. GET and DELETE are
//! therefore retried once on a transport error. Nothing else is retried here, and neither is
//! a rejected server certificate: it is rejected again, and the request was never sent.
//!
//! The CAs the https agent trusts come from [`super::trust`] when it is made (so a cloud
//! reached only over http never reads the system store); a rejected certificate becomes one
//! line naming the problem and those CAs.

use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ureq::http::StatusCode;
use ureq::tls::{RootCerts, TlsConfig, TlsProvider};
use ureq::{Agent, SendBody};

use super::trust::{CertificateFailure, CertificateProblem, DriverTrust, Roots};
use crate::provider::ErrorKind;

/// The largest answer body read into memory.
pub const MAX_BODY: u64 = 16 << 20;
/// Connecting may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Minimum spacing between the starts of two API calls, shared by every thread using it.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    /// When the next call may start.
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// `seconds` between calls; 0 (or less) means no limit.
    pub fn new(seconds: f64) -> RateLimiter {
        let interval = if seconds > 0.0 && seconds.is_finite() {
            Duration::from_secs_f64(seconds)
        } else {
            Duration::ZERO
        };
        RateLimiter {
            interval,
            next: Mutex::new(None),
        }
    }

    /// Blocks until this call's turn. Each caller reserves its slot under the lock and
    /// sleeps outside it, so concurrent callers are spaced out rather than released together.
    pub fn wait(&self) {
        if self.interval.is_zero() {
            return;
        }
        let now = Instant::now();
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + self.interval);
            start
        };
        if start > now {
            std::thread::sleep(start - now);
        }
    }
}

/// A request body.
pub enum Body {
    None,
    /// Bytes with their content type.
    Bytes {
        content_type: &'static str,
        data: Vec<u8>,
    },
    /// A stream of exactly `len` bytes.
    Stream {
        content_type: &'static str,
        len: u64,
        reader: Box<dyn Read + Send>,
    },
}

/// An answer: status, the headers we look at, and the body (unless streamed away).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// `X-Subject-Token` (Keystone), never logged.
    pub subject_token: Option<String>,
    /// `ETag` (S3's part uploads).
    pub etag: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("the answer is not JSON ({e})"))
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub struct TransportError {
    pub timed_out: bool,
    /// False when the request certainly never reached the server (no connection was made),
    /// true when the server may have acted on it.
    pub maybe_sent: bool,
    /// Set when the server's certificate was rejected (the request was not sent).
    pub certificate: Option<CertificateProblem>,
    pub message: String,
}

impl TransportError {
    pub fn kind(&self) -> ErrorKind {
        if self.timed_out {
            ErrorKind::Timeout
        } else {
            ErrorKind::Io
        }
    }
}

/// One provider's HTTP client.
pub struct Http {
    /// For `http://` URLs: it needs no CAs (it trusts none, should a proxy ever bring TLS).
    plain: Agent,
    /// For `https://` URLs, made on the first one, with the CAs `trust` names then.
    tls: OnceLock<TlsAgent>,
    trust: DriverTrust,
    rate: RateLimiter,
}

/// An agent for https and what it trusts.
struct TlsAgent {
    agent: Agent,
    /// For certificate failures: `the system store (145 certificates)`.
    trusted: String,
}

impl Http {
    /// A client trusting what `trust` names, with the provider's rate.
    pub fn new(trust: DriverTrust, rate: f64) -> Http {
        let nothing = Roots {
            certs: Some(RootCerts::from(Vec::new())),
            trusted: "nothing".into(),
        };
        Http {
            plain: agent(nothing),
            tls: OnceLock::new(),
            trust,
            rate: RateLimiter::new(rate),
        }
    }

    /// The agent for `url`, and what it trusts.
    fn agent_for(&self, url: &str) -> (&Agent, &str) {
        let https = url
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
        if !https {
            return (&self.plain, "nothing");
        }
        let tls = self.tls.get_or_init(|| {
            let roots = self.trust.roots();
            TlsAgent {
                trusted: roots.trusted.clone(),
                agent: agent(roots),
            }
        });
        (&tls.agent, &tls.trusted)
    }

    /// Sends one request and returns the answer, whatever its status. `timeout` bounds the
    /// whole exchange. GET and DELETE are retried once on a transport error.
    pub fn send(
        &self,
        method: &str,
        url: &str,
        token: Option<&str>,
        body: Body,
        timeout: Duration,
    ) -> Result<Reply, TransportError> {
        let mut headers = vec![("Accept".to_string(), "application/json".to_string())];
        if let Some(token) = token {
            headers.push(("X-Auth-Token".to_string(), token.to_string()));
        }
        self.send_with(method, url, &headers, body, timeout)
    }

    /// [`Http::send`] with the caller's headers (the aws driver's signed ones). A retry
    /// sends the same headers again, so a signature must stay valid for the whole call.
    pub fn send_with(
        &self,
        method: &str,
        url: &str,
        headers: &[(String, String)],
        mut body: Body,
        timeout: Duration,
    ) -> Result<Reply, TransportError> {
        let deadline = Instant::now() + timeout;
        let idempotent = matches!(method, "GET" | "DELETE");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError {
                    timed_out: true,
                    maybe_sent: attempt > 1,
                    certificate: None,
                    message: format!("{method} {}: no time left", strip_query(url)),
                });
            }
            self.rate.wait();
            match self.send_once(method, url, headers, &mut body, left) {
                Ok(reply) => return Ok(reply),
                Err(e) if idempotent && attempt == 1 && !e.timed_out && e.certificate.is_none() => {
                    log::debug!("{method} {url} failed ({}); retrying once", e.message);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn send_once(
        &self,
        method: &str,
        url: &str,
        headers: &[(String, String)],
        body: &mut Body,
        timeout: Duration,
    ) -> Result<Reply, TransportError> {
        let (agent, trusted) = self.agent_for(url);
        let fail = |e: ureq::Error| {
            let certificate = CertificateFailure::of(&e);
            let message = match (&e, &certificate) {
                // A certificate is checked before anything is sent.
                (_, Some(failure)) => format!(
                    "{method} {}: {}",
                    strip_query(url),
                    failure.describe(trusted)
                ),
                // ureq says only "timeout: global"; the operator needs to know which wait ran out.
                (ureq::Error::Timeout(ureq::Timeout::Global), None) => format!(
                    "{method} {}: timed out after {:.1?} without an answer",
                    strip_query(url),
                    timeout
                ),
                _ => format!("{method} {}: {e}", strip_query(url)),
            };
            TransportError {
                timed_out: matches!(e, ureq::Error::Timeout(_)),
                maybe_sent: certificate.is_none() && !never_sent(&e),
                certificate: certificate.map(|c| c.problem),
                message,
            }
        };
        let mut builder = ureq::http::Request::builder().method(method).uri(url);
        for (name, value) in headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let result = match body {
            Body::None => {
                let req = builder.body(()).map_err(|e| bad_request(method, url, e))?;
                agent.run(
                    agent
                        .configure_request(req)
                        .timeout_global(Some(timeout))
                        .build(),
                )
            }
            Body::Bytes { content_type, data } => {
                let req = builder
                    .header("Content-Type", *content_type)
                    .body(data.as_slice())
                    .map_err(|e| bad_request(method, url, e))?;
                agent.run(
                    agent
                        .configure_request(req)
                        .timeout_global(Some(timeout))
                        .build(),
                )
            }
            Body::Stream {
                content_type,
                len,
                reader,
            } => {
                let req = builder
                    .header("Content-Type", *content_type)
                    .header("Content-Length", len.to_string())
                    .body(SendBody::from_reader(reader.as_mut()))
                    .map_err(|e| bad_request(method, url, e))?;
                agent.run(
                    agent
                        .configure_request(req)
                        .timeout_global(Some(timeout))
                        .build(),
                )
            }
        };
        let mut response = result.map_err(fail)?;
        let status = response.status().as_u16();
        let subject_token = response
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let etag = response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(fail)?;
        Ok(Reply {
            status,
            subject_token,
            etag,
            body,
        })
    }
}

/// An agent trusting `roots` (no verification when it has no certificates).
fn agent(roots: Roots) -> Agent {
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        );
    let tls = match roots.certs {
        Some(certs) => tls.root_certs(certs),
        None => tls.disable_verification(true),
    };
    Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .user_agent(concat!("nodepool-builder/", env!("CARGO_PKG_VERSION")))
        .max_redirects(0)
        .tls_config(tls.build())
        .build()
        .into()
}

/// Whether `e` means that no connection was made, so the server cannot have seen the request.
fn never_sent(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed
        | ureq::Error::BadUri(_)
        | ureq::Error::Http(_) => true,
        ureq::Error::Timeout(t) => matches!(t, ureq::Timeout::Resolve | ureq::Timeout::Connect),
        ureq::Error::Io(io) => matches!(io.kind(), std::io::ErrorKind::ConnectionRefused),
        _ => false,
    }
}

fn bad_request(method: &str, url: &str, e: ureq::http::Error) -> TransportError {
    TransportError {
        timed_out: false,
        maybe_sent: false,
        certificate: None,
        message: format!(
            "{method} {}: cannot build the request: {e}",
            strip_query(url)
        ),
    }
}

/// `HTTP 415 Unsupported Media Type: <the server's message>`, on one line.
pub fn describe_status(reply: &Reply) -> String {
    let reason = StatusCode::from_u16(reply.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let detail = server_message(&reply.body);
    let mut out = format!("HTTP {} {reason}", reply.status)
        .trim_end()
        .to_string();
    if !detail.is_empty() {
        out.push_str(": ");
        out.push_str(&detail);
    }
    out
}

/// The error kind of an HTTP status.
pub fn status_kind(status: u16) -> ErrorKind {
    match status {
        401 | 403 => ErrorKind::Auth,
        404 => ErrorKind::NotFound,
        409 => ErrorKind::Conflict,
        413 => ErrorKind::TooLarge,
        415 => ErrorKind::UnsupportedMedia,
        408 | 504 => ErrorKind::Timeout,
        500..=599 => ErrorKind::Server,
        _ => ErrorKind::Config,
    }
}

/// The message of an OpenStack error body, cleaned to one short line: Glance's
/// `{"message": "...<br /><br />"}`, Keystone's `{"error": {"message": ...}}`, or HTML/text.
pub fn server_message(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(json) => json
            .get("message")
            .or_else(|| json.get("error").and_then(|e| e.get("message")))
            .or_else(|| json.get("title"))
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .unwrap_or_default(),
        Err(_) => strip_tags(&String::from_utf8_lossy(&body[..body.len().min(4096)])),
    };
    let text = text.replace("<br />", " ");
    let mut line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 300 {
        line = line.chars().take(300).collect::<String>() + "...";
    }
    line
}

fn strip_tags(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

/// The URL without its query (queries may carry filter values, never secrets, but they make
/// messages long).
pub fn strip_query(url: &str) -> &str {
    url.split_once('?').map_or(url, |(base, _)| base)
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass through).
pub fn query_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::openstack::trust::{TrustEnv, TrustStores};

    /// A loopback port nothing listens on.
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    #[test]
    fn only_the_first_https_request_reads_the_system_store() {
        let stores = Arc::new(TrustStores::new(TrustEnv::default()));
        let http = Http::new(DriverTrust::System(stores.clone()), 0.0);
        let port = closed_port();
        let timeout = Duration::from_secs(10);
        let plain = http.send(
            "GET",
            &format!("http://127.0.0.1:{port}/v2/images"),
            None,
            Body::None,
            timeout,
        );
        assert!(plain.is_err(), "nothing listens there");
        assert!(!stores.system_loaded(), "plain http needs no CAs");
        let tls = http
            .send(
                "GET",
                &format!("https://127.0.0.1:{port}/v2/images"),
                None,
                Body::None,
                timeout,
            )
            .unwrap_err();
        assert!(
            stores.system_loaded(),
            "the https agent trusts the system store"
        );
        assert_eq!(
            tls.certificate, None,
            "no certificate was seen: {}",
            tls.message
        );
        assert!(!tls.maybe_sent, "{}", tls.message);
    }
}
