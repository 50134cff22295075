//! statsd: the keys nodepool 11's builder emits (wire spec §6.1), same names and types, plus
//! the four keys upstream documents but never emits (`current_builds`, `current_uploads`,
//! `build_workers`, `upload_workers`).
//!
//! Only this module knows the key names. Enabled iff `STATSD_HOST` is set (`STATSD_PORT`
//! defaults to 8125), like upstream; no prefix. Host name components are the FQDN unescaped,
//! as upstream (dots make extra levels). Sending is fire-and-forget UDP: a statsd outage never
//! slows or fails the builder.

use std::net::{ToSocketAddrs, UdpSocket};
use std::time::Duration;

use cadence::{Counted, Gauged, StatsdClient, Timed, UdpMetricSink};
use log::{info, warn};

/// Build and upload worker states reported per image (upstream's numbers).
pub const STATE_IDLE: u64 = 0;
pub const STATE_BUILDING: u64 = 1;
pub const STATE_UPLOADING: u64 = 2;
pub const STATE_PAUSED: u64 = 3;

/// The statsd client, or nothing when `STATSD_HOST` is unset.
#[derive(Clone)]
pub struct Stats {
    client: Option<std::sync::Arc<StatsdClient>>,
    fqdn: String,
}

impl Stats {
    /// A disabled client.
    pub fn disabled() -> Stats {
        Stats {
            client: None,
            fqdn: String::new(),
        }
    }

    /// From `STATSD_HOST` / `STATSD_PORT`, as upstream.
    pub fn from_env(fqdn: &str) -> Stats {
        let Ok(host) = std::env::var("STATSD_HOST") else {
            return Stats::disabled();
        };
        let port: u16 = std::env::var("STATSD_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(8125);
        let addr = match (host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
        {
            Some(a) => a,
            None => {
                warn!("statsd disabled: cannot resolve STATSD_HOST {host}:{port}");
                return Stats::disabled();
            }
        };
        let bind = if addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        let sink = UdpSocket::bind(bind)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                s.set_nonblocking(true).map_err(|e| e.to_string())?;
                UdpMetricSink::from(addr, s).map_err(|e| e.to_string())
            });
        match sink {
            Ok(sink) => {
                info!("statsd enabled: sending to {addr}");
                let client = StatsdClient::builder("", sink)
                    .with_error_handler(|e| log::debug!("statsd: {e}"))
                    .build();
                Stats {
                    client: Some(std::sync::Arc::new(client)),
                    fqdn: fqdn.to_string(),
                }
            }
            Err(e) => {
                warn!("statsd disabled: {e}");
                Stats::disabled()
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.client.is_some()
    }

    fn gauge(&self, key: &str, value: u64) {
        if let Some(c) = &self.client {
            let _ = c.gauge(key, value);
        }
    }

    /// After every DIB run: `status.duration` (timer), `status.rc` and `status.last_build`
    /// (gauges).
    pub fn build_done(&self, image: &str, duration: Duration, rc: i32, now_epoch: u64) {
        if let Some(c) = &self.client {
            let base = format!("nodepool.dib_image_build.{image}.status");
            let _ = c.time(&format!("{base}.duration"), duration);
            let _ = c.gauge(&format!("{base}.rc"), rc.max(0) as u64);
            let _ = c.gauge(&format!("{base}.last_build"), now_epoch);
        }
    }

    /// Per format after a successful build: allocated size in bytes.
    pub fn build_size(&self, image: &str, ext: &str, bytes: u64) {
        self.gauge(
            &format!("nodepool.dib_image_build.{image}.{ext}.size"),
            bytes,
        );
    }

    /// After each successful upload (hook included): timer and counter.
    pub fn upload_done(&self, image: &str, provider: &str, duration: Duration) {
        if let Some(c) = &self.client {
            let key = format!("nodepool.image_update.{image}.{provider}");
            let _ = c.time(&key, duration);
            let _ = c.count(&key, 1);
        }
    }

    /// Per image, every janitor pass: this builder's build state and upload states.
    pub fn image_states(
        &self,
        image: &str,
        build_state: u64,
        uploads: &[(String, u64)],
        requested: bool,
    ) {
        if !self.enabled() {
            return;
        }
        let host = &self.fqdn;
        self.gauge(
            &format!("nodepool.builder.{host}.image.{image}.build.state"),
            build_state,
        );
        for (provider, state) in uploads {
            self.gauge(
                &format!("nodepool.builder.{host}.image.{image}.provider.{provider}.upload.state"),
                *state,
            );
        }
        self.gauge(
            &format!("nodepool.image.{image}.image_build_requests"),
            u64::from(requested),
        );
    }

    /// Every janitor pass: pending build requests, and the documented worker gauges.
    pub fn builder_totals(
        &self,
        requests: u64,
        current_builds: u64,
        current_uploads: u64,
        build_workers: u64,
        upload_workers: u64,
    ) {
        if !self.enabled() {
            return;
        }
        let host = &self.fqdn;
        self.gauge("nodepool.image_build_requests", requests);
        self.gauge(
            &format!("nodepool.builder.{host}.current_builds"),
            current_builds,
        );
        self.gauge(
            &format!("nodepool.builder.{host}.current_uploads"),
            current_uploads,
        );
        self.gauge(
            &format!("nodepool.builder.{host}.build_workers"),
            build_workers,
        );
        self.gauge(
            &format!("nodepool.builder.{host}.upload_workers"),
            upload_workers,
        );
    }
}
