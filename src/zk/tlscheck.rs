//! Why a TLS connection to ZooKeeper fails, in words an operator can act on.
//!
//! `zookeeper-client` turns every failed TLS connection into a plain connection loss (the
//! reason goes only to its debug log), so without help the daemon could only say
//! `zookeeper connection lost: timeout` for a server certificate from another CA or a
//! client certificate the server refuses. When a TLS connect fails, the session supervisor
//! calls [`diagnose`]: it repeats the handshake itself, blocking, with the same PEM files
//! and the same host-name policy, sends a ZooKeeper connect request and reads the first
//! bytes of the answer. What went wrong becomes one phrase for the retry log line:
//!
//! * the handshake fails on the server's certificate: it is not trusted by `ca`;
//! * the server sends an alert, during the handshake or right after it (TLS 1.3 checks the
//!   client certificate after the client has finished): it refused our certificate;
//! * the server closes without answering: it probably refused our certificate;
//! * no TCP connection at all: the connect error.
//!
//! When the probe gets an answer it says nothing: the failure was something else.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct};

use super::ZkTlsFiles;

/// Checks each host in turn; returns the first explanation found, as
/// `<host>:<port>: <why>`, or `None` when every host answered (or the files cannot be read:
/// the connect itself reports that).
pub fn diagnose(tls: &ZkTlsFiles, hosts: &[(String, u16)], timeout: Duration) -> Option<String> {
    let config = Arc::new(client_config(tls).ok()?);
    hosts.iter().find_map(|(host, port)| {
        probe(&config, tls, host, *port, timeout).map(|why| format!("{host}:{port}: {why}"))
    })
}

fn client_config(tls: &ZkTlsFiles) -> Result<ClientConfig, String> {
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read(&tls.ca)?) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&tls.cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(&read(&tls.key)?).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = if tls.verify_hostname {
        webpki
    } else {
        Arc::new(AnyName(webpki))
    };
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())
}

/// A ZooKeeper ConnectRequest: protocol 0, no session, 30 s, empty password, read-write.
fn connect_request() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&0i32.to_be_bytes());
    body.extend_from_slice(&0i64.to_be_bytes());
    body.extend_from_slice(&30_000i32.to_be_bytes());
    body.extend_from_slice(&0i64.to_be_bytes());
    body.extend_from_slice(&16i32.to_be_bytes());
    body.extend_from_slice(&[0u8; 16]);
    body.push(0);
    let mut out = (body.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

fn probe(
    config: &Arc<ClientConfig>,
    tls: &ZkTlsFiles,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Option<String> {
    let addr = match (host, port).to_socket_addrs() {
        Ok(mut addrs) => addrs.next()?,
        Err(e) => return Some(format!("cannot resolve: {e}")),
    };
    let mut tcp = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return Some(format!("cannot connect: {e}")),
    };
    tcp.set_read_timeout(Some(timeout)).ok()?;
    tcp.set_write_timeout(Some(timeout)).ok()?;
    let name = ServerName::try_from(host.to_string()).ok()?;
    let mut conn = ClientConnection::new(config.clone(), name).ok()?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            return Some(handshake_error(tls, &e.to_string()));
        }
    }
    let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
    if let Err(e) = stream
        .write_all(&connect_request())
        .and_then(|()| stream.flush())
    {
        return Some(refused(tls, &e.to_string()));
    }
    let mut answer = [0u8; 4];
    match stream.read(&mut answer) {
        Ok(0) => Some(format!(
            "the server closed the TLS connection without answering; it probably does not accept the client certificate {} (not signed by a CA it trusts?)",
            tls.cert.display()
        )),
        Ok(_) => None,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Some(format!(
                "TLS handshake done, but no answer within {timeout:?}"
            ))
        }
        Err(e) => Some(refused(tls, &e.to_string())),
    }
}

fn handshake_error(tls: &ZkTlsFiles, e: &str) -> String {
    if e.contains("invalid peer certificate") {
        format!(
            "TLS handshake failed: the server's certificate is not trusted ({e}); is {} the CA that signed it?",
            tls.ca.display()
        )
    } else if e.contains("alert") {
        refused(tls, e)
    } else {
        format!("TLS handshake failed: {e}")
    }
}

fn refused(tls: &ZkTlsFiles, e: &str) -> String {
    format!(
        "the server refused the TLS connection ({e}); does it trust the CA of the client certificate {}?",
        tls.cert.display()
    )
}

/// Verifies the chain against the CA but accepts any host name, as kazoo does.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
