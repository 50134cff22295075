//! Which certificate authorities the OpenStack driver trusts, chosen the way openstacksdk
//! does on Debian, and the one line a certificate failure becomes.
//!
//! # The choice ([`choose`], a pure function of the cloud entry and the environment)
//!
//! 1. `verify: false`, or `insecure: true`, in the cloud entry: no verification at all.
//!    openstacksdk lets `insecure` win over everything, and ignores a `cacert` next to
//!    `verify: false` with a warning; so do we.
//! 2. The entry's `cacert`: exactly the CAs in that file. openstacksdk hands the path to
//!    requests as `verify=<path>`, which replaces the default CAs and is not overridden by
//!    the environment.
//! 3. `OS_CACERT`: keystoneauth's and the openstack CLI's name for the CA bundle.
//! 4. `REQUESTS_CA_BUNDLE`, then `CURL_CA_BUNDLE`: what requests itself reads when `verify`
//!    is simply true. Empty values are ignored, as requests does.
//! 5. The system store. On Debian requests' default bundle is python3-certifi's, which is
//!    /etc/ssl/certs/ca-certificates.crt: the system store. `SSL_CERT_FILE` and
//!    `SSL_CERT_DIR` replace its files (rustls-native-certs reads them as OpenSSL does),
//!    which is also how the tests trust their CA without touching /etc/ssl.
//!
//! A bundle is a PEM file, or a directory of PEM files (requests passes a directory to
//! OpenSSL as its CA path). It must be readable and hold at least one certificate, or the
//! provider's driver is not set up (a clear error, like a bad clouds.yaml).
//!
//! Deliberate differences from nodepool 11: openstacksdk only turns `OS_*` variables into a
//! separate cloud called `envvars`, so nodepool ignores `OS_CACERT` for a cloud named in
//! clouds.yaml, whereas the openstack CLI lets `OS_CACERT` override the entry's `cacert`.
//! Here it is a process-wide default below the entry's own `cacert`. And there is no
//! compiled-in root list: the system store (package `ca-certificates`) is the default.
//!
//! # Read once per driver set-up, and only for https
//!
//! [`TrustStores`] belongs to one set-up of the drivers (start and each reload). A bundle is
//! read while the driver is set up (so a bad one stops that provider at once), and once
//! even when several providers name it. The system store is read on the first https
//! connection of a driver that trusts it, once for the whole set-up, and shared: on Debian 12
//! its 145 certificates cost about 0.4 MiB of memory, which a daemon whose clouds all speak
//! plain http (the benchmark's) never pays. The certificates sit behind an `Arc` shared by
//! every agent of the set-up.
//!
//! # Failures
//!
//! [`CertificateFailure::of`] recognises a rejected server certificate in a ureq error, and
//! [`CertificateFailure::describe`] makes it one line that says what is wrong, in rustls'
//! words too (`UnknownIssuer`), and which CAs were trusted. A certificate is checked before
//! any byte of the request is sent, so such a request never reached the cloud: it is not
//! retried, and an image create that failed this way needs no clean-up.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ureq::tls::{Certificate, RootCerts};

use super::clouds::CloudConfig;
use crate::provider::{ErrorKind, ProviderError};

/// The environment variables [`choose`] reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustEnv {
    /// `OS_CACERT`.
    pub os_cacert: Option<PathBuf>,
    /// `REQUESTS_CA_BUNDLE`.
    pub requests_ca_bundle: Option<PathBuf>,
    /// `CURL_CA_BUNDLE`.
    pub curl_ca_bundle: Option<PathBuf>,
    /// `SSL_CERT_FILE` and `SSL_CERT_DIR`, only to say where the system store came from.
    pub ssl_cert_file: Option<PathBuf>,
    pub ssl_cert_dir: Option<PathBuf>,
}

impl TrustEnv {
    /// This process's environment (empty values count as unset).
    pub fn from_process() -> TrustEnv {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        TrustEnv {
            os_cacert: var("OS_CACERT"),
            requests_ca_bundle: var("REQUESTS_CA_BUNDLE"),
            curl_ca_bundle: var("CURL_CA_BUNDLE"),
            ssl_cert_file: var("SSL_CERT_FILE"),
            ssl_cert_dir: var("SSL_CERT_DIR"),
        }
    }
}

/// Who named a CA bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The cloud entry's `cacert`.
    CloudsYaml,
    OsCacert,
    RequestsCaBundle,
    CurlCaBundle,
}

impl Origin {
    /// How messages name it.
    pub fn name(self) -> &'static str {
        match self {
            Origin::CloudsYaml => "clouds.yaml cacert",
            Origin::OsCacert => "OS_CACERT",
            Origin::RequestsCaBundle => "REQUESTS_CA_BUNDLE",
            Origin::CurlCaBundle => "CURL_CA_BUNDLE",
        }
    }
}

/// What a cloud's https connections trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// No certificate verification (`verify: false` or `insecure: true`).
    Unverified,
    /// The CAs of a PEM file or directory.
    Bundle { path: PathBuf, origin: Origin },
    /// The system store.
    System,
}

/// The CAs `cloud` trusts, given the environment (see the module documentation).
pub fn choose(cloud: &CloudConfig, env: &TrustEnv) -> Trust {
    if !cloud.verify {
        return Trust::Unverified;
    }
    let named = [
        (&cloud.cacert, Origin::CloudsYaml),
        (&env.os_cacert, Origin::OsCacert),
        (&env.requests_ca_bundle, Origin::RequestsCaBundle),
        (&env.curl_ca_bundle, Origin::CurlCaBundle),
    ];
    named
        .into_iter()
        .find_map(|(path, origin)| {
            path.as_ref().map(|path| Trust::Bundle {
                path: path.clone(),
                origin,
            })
        })
        .unwrap_or(Trust::System)
}

/// The certificates for one agent: `None` when verification is off.
#[derive(Clone)]
pub struct Roots {
    pub certs: Option<RootCerts>,
    /// What was trusted, for messages: `the system store (146 certificates)`.
    pub trusted: String,
}

/// What one driver trusts: roots read at set-up, or the set-up's system store, read on the
/// first https connection that needs it.
#[derive(Clone)]
pub enum DriverTrust {
    Ready(Roots),
    System(Arc<TrustStores>),
}

impl DriverTrust {
    /// The roots, reading the system store if this is its first use in the set-up.
    pub fn roots(&self) -> Roots {
        match self {
            DriverTrust::Ready(roots) => roots.clone(),
            DriverTrust::System(stores) => stores.system(),
        }
    }
}

/// The CA stores of one driver set-up: each read at most once, shared by its providers.
#[derive(Default)]
pub struct TrustStores {
    env: TrustEnv,
    system: OnceLock<Roots>,
    bundles: Mutex<Vec<(PathBuf, Roots)>>,
}

impl TrustStores {
    /// Stores for a set-up in this process's environment.
    pub fn from_process() -> TrustStores {
        TrustStores::new(TrustEnv::from_process())
    }

    pub fn new(env: TrustEnv) -> TrustStores {
        TrustStores {
            env,
            system: OnceLock::new(),
            bundles: Mutex::new(Vec::new()),
        }
    }

    /// What `cloud` trusts: a bundle is read now (once per set-up), and an error when it
    /// cannot be read or holds no certificate; the system store is left for the first https
    /// connection (see [`TrustStores::system`]).
    pub fn trust_for(self: &Arc<Self>, cloud: &CloudConfig) -> Result<DriverTrust, ProviderError> {
        let roots = match choose(cloud, &self.env) {
            Trust::Unverified => {
                if let Some(cacert) = &cloud.cacert {
                    log::warn!(
                        "cloud {}: cacert {} is ignored: certificate verification is off",
                        cloud.name,
                        cacert.display()
                    );
                }
                Roots {
                    certs: None,
                    trusted: "nothing (verification off)".into(),
                }
            }
            Trust::Bundle { path, origin } => {
                let mut bundles = self.bundles.lock().unwrap_or_else(|e| e.into_inner());
                match bundles.iter().find(|(p, _)| *p == path) {
                    Some((_, roots)) => roots.clone(),
                    None => {
                        let roots = load_bundle(&path, origin)?;
                        bundles.push((path, roots.clone()));
                        roots
                    }
                }
            }
            Trust::System => return Ok(DriverTrust::System(self.clone())),
        };
        Ok(DriverTrust::Ready(roots))
    }

    /// Whether the system store has been read in this set-up.
    pub fn system_loaded(&self) -> bool {
        self.system.get().is_some()
    }

    /// The system store, read on the first call; problems reading it are logged, and what
    /// could be read is used.
    pub fn system(&self) -> Roots {
        self.system.get_or_init(|| self.load_system()).clone()
    }

    fn load_system(&self) -> Roots {
        let loaded = rustls_native_certs::load_native_certs();
        let replaced_by = match (&self.env.ssl_cert_file, &self.env.ssl_cert_dir) {
            (Some(file), _) => Some(format!("SSL_CERT_FILE={}", file.display())),
            (None, Some(dir)) => Some(format!("SSL_CERT_DIR={}", dir.display())),
            (None, None) => None,
        };
        let store = match &replaced_by {
            Some(var) => format!("the system store ({var})"),
            None => "the system store".to_string(),
        };
        for e in &loaded.errors {
            log::warn!("{store}: {e}");
        }
        let n = loaded.certs.len();
        if n == 0 {
            log::warn!(
                "{store} holds no certificate: https to a cloud fails unless its CA is named \
                 (clouds.yaml cacert, OS_CACERT, REQUESTS_CA_BUNDLE); is the package \
                 ca-certificates installed?"
            );
        }
        log::debug!("{store}: {}", count(n));
        let certs: Vec<Certificate<'static>> = loaded
            .certs
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        let trusted = match replaced_by {
            Some(var) => format!("the system store ({var}: {})", count(n)),
            None => format!("the system store ({})", count(n)),
        };
        Roots {
            certs: Some(RootCerts::from(certs)),
            trusted,
        }
    }
}

/// Reads a PEM bundle file or directory named by `origin`.
fn load_bundle(path: &Path, origin: Origin) -> Result<Roots, ProviderError> {
    let fail = |what: String| {
        ProviderError::new(
            ErrorKind::Config,
            format!("CA bundle {} ({}): {what}", path.display(), origin.name()),
        )
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let (kind, loaded) = if meta.is_dir() {
        (
            "directory",
            rustls_native_certs::load_certs_from_paths(None, Some(path)),
        )
    } else {
        (
            "bundle",
            rustls_native_certs::load_certs_from_paths(Some(path), None),
        )
    };
    if let Some(e) = loaded.errors.first() {
        return Err(fail(e.to_string()));
    }
    if loaded.certs.is_empty() {
        return Err(fail("holds no certificate".into()));
    }
    let n = loaded.certs.len();
    let certs: Vec<Certificate<'static>> = loaded
        .certs
        .iter()
        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    Ok(Roots {
        certs: Some(RootCerts::from(certs)),
        trusted: format!(
            "the CA {kind} {} ({}, {})",
            path.display(),
            origin.name(),
            count(n)
        ),
    })
}

fn count(n: usize) -> String {
    match n {
        1 => "1 certificate".into(),
        n => format!("{n} certificates"),
    }
}

/// Why the server's certificate was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateProblem {
    /// Not signed by a trusted CA (`UnknownIssuer`).
    UnknownAuthority,
    /// Expired or not yet valid.
    OutsideValidity,
    /// Not issued for the host name or address in the URL.
    WrongHost,
    /// Anything else about the certificate (bad signature, revoked, wrong purpose, ...).
    Rejected,
}

/// A rejected server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFailure {
    pub problem: CertificateProblem,
    /// rustls' own words: `invalid peer certificate: UnknownIssuer`.
    pub detail: String,
}

impl CertificateFailure {
    /// The failure when `e` is a rejected server certificate.
    pub fn of(e: &ureq::Error) -> Option<CertificateFailure> {
        let rustls_error = match e {
            ureq::Error::Rustls(r) => r,
            ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
            _ => return None,
        };
        CertificateFailure::from_rustls(rustls_error)
    }

    /// The failure when `e` is a rejected server certificate.
    pub fn from_rustls(e: &rustls::Error) -> Option<CertificateFailure> {
        use rustls::CertificateError as C;
        let rustls::Error::InvalidCertificate(cert) = e else {
            return None;
        };
        let problem = match cert {
            C::UnknownIssuer => CertificateProblem::UnknownAuthority,
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => CertificateProblem::OutsideValidity,
            C::NotValidForName | C::NotValidForNameContext { .. } => CertificateProblem::WrongHost,
            _ => CertificateProblem::Rejected,
        };
        Some(CertificateFailure {
            problem,
            detail: e.to_string(),
        })
    }

    /// One line: what is wrong, in rustls' words too, and which CAs were trusted.
    pub fn describe(&self, trusted: &str) -> String {
        let what = match self.problem {
            CertificateProblem::UnknownAuthority => {
                "the server's certificate is signed by an unknown authority"
            }
            CertificateProblem::OutsideValidity => {
                "the server's certificate is outside its validity period"
            }
            CertificateProblem::WrongHost => "the server's certificate is not for this host",
            CertificateProblem::Rejected => "the server's certificate was rejected",
        };
        format!("{what} ({}); trusted: {trusted}", self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::openstack::clouds::{self, Auth, AuthType};

    /// A self-signed CA certificate (P-256), made once with the openssl command for these tests.
    const CA_PEM: &str = "\
-----BEGIN CERTIFICATE-----
MIIBpzCCAU2gAwIBAgIUR4mTX+jw4ynOZRVVX43+H7cLS2gwCgYIKoZIzj0EAwIw
KDEmMCQGA1UEAwwdbm9kZXBvb2wtYnVpbGRlciB1bml0IHRlc3QgQ0EwIBcNMjYx
MjA3MTgxMzAxWhgPMjEyNjExMTMxODEzMDFaMCgxJjAkBgNVBAMMHW5vZGVwb29s
LWJ1aWxkZXIgdW5pdCB0ZXN0IENBMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE
6+462geE+Hx5BBbmGAmCSEpenjSoQGH+PFAXBqesb4bFILqDNshki7cObOBvJwe6
KTeeOct2PoqdxvIS5Mw9RKNTMFEwHQYDVR0OBBYEFFmtUad2cM0k5METprv64fZP
O8sNMB8GA1UdIwQYMBaAFFmtUad2cM0k5METprv64fZPO8sNMA8GA1UdEwEB/wQF
MAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIhALQ7zmxKqEFGPxkGAd3uPLoGzA+2NN5W
mB7dIq3CYa5SAiB/ybF9BN5Ho0C874oIEB8038ZMJIINOmkuWc5De879eA==
-----END CERTIFICATE-----
";

    fn cloud(verify: bool, cacert: Option<&str>) -> CloudConfig {
        CloudConfig {
            name: "c".into(),
            source: PathBuf::from("clouds.yaml"),
            secure_source: None,
            auth_type: AuthType::None,
            auth: Auth::default(),
            default_domain: None,
            region_name: None,
            interface: "public".into(),
            image_endpoint_override: Some("https://glance.example".into()),
            image_format: None,
            verify,
            cacert: cacert.map(PathBuf::from),
        }
    }

    fn bundle(path: &str, origin: Origin) -> Trust {
        Trust::Bundle {
            path: PathBuf::from(path),
            origin,
        }
    }

    #[test]
    fn the_cloud_entry_then_os_cacert_then_requests_variables_then_the_system_store() {
        let everything = TrustEnv {
            os_cacert: Some("/os.pem".into()),
            requests_ca_bundle: Some("/requests.pem".into()),
            curl_ca_bundle: Some("/curl.pem".into()),
            ssl_cert_file: Some("/ssl.pem".into()),
            ssl_cert_dir: None,
        };
        assert_eq!(
            choose(&cloud(false, Some("/cloud.pem")), &everything),
            Trust::Unverified,
            "verify: false beats every CA"
        );
        assert_eq!(
            choose(&cloud(true, Some("/cloud.pem")), &everything),
            bundle("/cloud.pem", Origin::CloudsYaml)
        );
        assert_eq!(
            choose(&cloud(true, None), &everything),
            bundle("/os.pem", Origin::OsCacert)
        );
        let requests = TrustEnv {
            os_cacert: None,
            ..everything.clone()
        };
        assert_eq!(
            choose(&cloud(true, None), &requests),
            bundle("/requests.pem", Origin::RequestsCaBundle)
        );
        let curl = TrustEnv {
            requests_ca_bundle: None,
            ..requests.clone()
        };
        assert_eq!(
            choose(&cloud(true, None), &curl),
            bundle("/curl.pem", Origin::CurlCaBundle)
        );
        let system = TrustEnv {
            curl_ca_bundle: None,
            ..curl
        };
        assert_eq!(choose(&cloud(true, None), &system), Trust::System);
        assert_eq!(
            choose(&cloud(true, None), &TrustEnv::default()),
            Trust::System
        );
    }

    #[test]
    fn insecure_wins_over_verify_and_cacert_as_in_openstacksdk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clouds.yaml");
        let entry = "auth_type: none\n    image_endpoint_override: https://g.example\n";
        std::fs::write(
            &path,
            format!(
                "clouds:\n  insecure:\n    {entry}    insecure: true\n    verify: true\n    cacert: /nowhere.pem\n\
                 \x20 insecure-text:\n    {entry}    insecure: 'True'\n\
                 \x20 not-insecure:\n    {entry}    insecure: 'false'\n\
                 \x20 no-verify:\n    {entry}    verify: 'no'\n\
                 \x20 bad:\n    {entry}    insecure: [1]\n"
            ),
        )
        .unwrap();
        let env = TrustEnv::default();
        let trust = |name: &str| choose(&clouds::load(&path, None, name, None).unwrap(), &env);
        assert_eq!(trust("insecure"), Trust::Unverified);
        assert_eq!(trust("insecure-text"), Trust::Unverified);
        assert_eq!(trust("not-insecure"), Trust::System);
        assert_eq!(trust("no-verify"), Trust::Unverified);
        let err = clouds::load(&path, None, "bad", None).unwrap_err();
        assert!(
            err.message.contains("`insecure` must be true or false"),
            "{err}"
        );

        // The ignored cacert is not read: the driver is set up.
        let stores = Arc::new(TrustStores::new(env));
        let insecure = clouds::load(&path, None, "insecure", None).unwrap();
        match stores.trust_for(&insecure) {
            Ok(DriverTrust::Ready(roots)) => assert!(roots.certs.is_none()),
            Ok(DriverTrust::System(_)) => panic!("verification must be off"),
            Err(e) => panic!("{e}"),
        }
    }

    fn trusted(stores: &Arc<TrustStores>, cacert: &Path) -> Result<String, ProviderError> {
        let cloud = cloud(true, Some(cacert.to_str().unwrap()));
        match stores.trust_for(&cloud)? {
            DriverTrust::Ready(roots) => Ok(roots.trusted),
            DriverTrust::System(_) => panic!("a bundle was named"),
        }
    }

    #[test]
    fn bundles_are_pem_files_or_directories_read_once_per_set_up() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Arc::new(TrustStores::new(TrustEnv::default()));

        let file = dir.path().join("ca.pem");
        std::fs::write(&file, CA_PEM).unwrap();
        let described = trusted(&stores, &file).unwrap();
        assert_eq!(
            described,
            format!(
                "the CA bundle {} (clouds.yaml cacert, 1 certificate)",
                file.display()
            )
        );
        // A second provider naming the same bundle shares what was read.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(trusted(&stores, &file).unwrap(), described);
        // A new set-up reads it again.
        let fresh = Arc::new(TrustStores::new(TrustEnv::default()));
        let err = trusted(&fresh, &file).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Config);
        assert!(
            err.message.starts_with(&format!(
                "CA bundle {} (clouds.yaml cacert): cannot read it: ",
                file.display()
            )),
            "{err}"
        );

        // A directory, as requests passes it to OpenSSL: its PEM files, other files ignored.
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        std::fs::write(certs.join("ca.pem"), CA_PEM).unwrap();
        std::fs::write(certs.join("README"), "not a certificate\n").unwrap();
        assert_eq!(
            trusted(&stores, &certs).unwrap(),
            format!(
                "the CA directory {} (clouds.yaml cacert, 1 certificate)",
                certs.display()
            )
        );

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = trusted(&stores, &empty).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Config);
        assert!(err.message.ends_with("holds no certificate"), "{err}");
    }

    #[test]
    fn the_system_store_waits_for_its_first_use_and_is_read_once() {
        let stores = Arc::new(TrustStores::new(TrustEnv::default()));
        let trust = stores.trust_for(&cloud(true, None)).unwrap();
        assert!(matches!(trust, DriverTrust::System(_)));
        assert!(!stores.system_loaded(), "not read at set-up");
        let first = trust.roots();
        assert!(stores.system_loaded());
        assert!(
            first.trusted.starts_with("the system store ("),
            "{}",
            first.trusted
        );
        let again = stores.trust_for(&cloud(true, None)).unwrap().roots();
        assert_eq!(again.trusted, first.trusted);
    }

    #[test]
    fn rejected_certificates_become_one_line_naming_the_problem_and_the_trusted_cas() {
        use rustls::CertificateError as C;
        let failure = |e: C| {
            CertificateFailure::from_rustls(&rustls::Error::InvalidCertificate(e))
                .expect("a certificate failure")
        };
        let unknown = failure(C::UnknownIssuer);
        assert_eq!(unknown.problem, CertificateProblem::UnknownAuthority);
        assert_eq!(
            unknown.describe("the system store (145 certificates)"),
            "the server's certificate is signed by an unknown authority \
             (invalid peer certificate: UnknownIssuer); trusted: the system store (145 certificates)"
        );
        assert_eq!(
            failure(C::Expired).problem,
            CertificateProblem::OutsideValidity
        );
        assert_eq!(
            failure(C::NotValidYet).problem,
            CertificateProblem::OutsideValidity
        );
        assert_eq!(
            failure(C::NotValidForName).problem,
            CertificateProblem::WrongHost
        );
        assert_eq!(
            failure(C::BadSignature).problem,
            CertificateProblem::Rejected
        );
        assert!(
            failure(C::NotValidForName)
                .describe("x")
                .starts_with("the server's certificate is not for this host (")
        );
        // Other TLS failures are not about the certificate.
        assert_eq!(
            CertificateFailure::from_rustls(&rustls::Error::General("boom".into())),
            None
        );
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(C::UnknownIssuer),
        );
        assert_eq!(
            CertificateFailure::of(&ureq::Error::Io(io)).map(|f| f.problem),
            Some(CertificateProblem::UnknownAuthority),
            "rustls' error inside ureq's io error (how a failed handshake arrives)"
        );
        assert_eq!(CertificateFailure::of(&ureq::Error::ConnectionFailed), None);
    }
}
