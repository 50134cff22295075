//! Where the aws driver finds its credentials and endpoints: the chain the AWS SDKs and
//! boto3 (which nodepool 11 uses) follow, less the parts that need another service.
//!
//! # The chain, first match wins
//!
//! 1. `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (with `AWS_SESSION_TOKEN` if set), but
//!    only when the provider names no `profile-name`: like botocore, an explicit profile
//!    overrides the environment's keys.
//! 2. The shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else
//!    `~/.aws/credentials`), section `[<profile>]`.
//! 3. The shared config file (`AWS_CONFIG_FILE`, else `~/.aws/config`), section
//!    `[profile <profile>]` (`[default]` for the default profile).
//!
//! The profile is the provider's `profile-name`, else `AWS_PROFILE`, else `default`. Keys
//! read in a section: `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`.
//! Not followed (a profile that relies on them is an error that says so): `role_arn`
//! (assume-role), `credential_process`, `sso_*`, web identity, and the instance metadata
//! service (IMDS), container credentials. The chain is walked again for every upload,
//! deletion and listing, so rotated files are picked up without a restart, and missing
//! credentials fail the one upload with a message naming every place looked at.
//!
//! # Endpoints
//!
//! `AWS_ENDPOINT_URL_EC2`, `AWS_ENDPOINT_URL_EBS`, `AWS_ENDPOINT_URL_S3`, else
//! `AWS_ENDPOINT_URL`, else `https://<service>.<region>.amazonaws.com`, as the SDKs do.
//! https endpoints are checked against the system CA store (`SSL_CERT_FILE`/`SSL_CERT_DIR`
//! replace it, as for the OpenStack driver); the SDKs' `AWS_CA_BUNDLE` is not read.
//!
//! # Secrets
//!
//! [`Credentials`] keeps the secret key and session token private; its `Debug` prints
//! neither, and the secret key leaves only into [`Credentials::with_secret`] (the signing
//! HMAC). Error messages name files and profiles, never values.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// One access key pair (and session token).
#[derive(Clone)]
pub struct Credentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    /// Where they came from, for log lines: `environment`, `/home/n/.aws/credentials [ci]`.
    source: String,
}

impl Credentials {
    pub fn new(access_key_id: &str, secret: &str, session_token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: access_key_id.to_string(),
            secret_access_key: secret.to_string(),
            session_token: session_token.map(str::to_string),
            source: "given".into(),
        }
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub fn session_token(&self) -> Option<&str> {
        self.session_token.as_deref()
    }

    /// Where the credentials were found.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Runs `f` with the secret key (for signing only).
    pub fn with_secret<T>(&self, f: impl FnOnce(&str) -> T) -> T {
        f(&self.secret_access_key)
    }

    /// The secrets, for scrubbing messages.
    pub fn secrets(&self) -> Vec<&str> {
        let mut out = vec![self.secret_access_key.as_str()];
        out.extend(self.session_token.as_deref());
        out
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The environment the chain is walked in (the process's, or a test's).
#[derive(Debug, Clone, Default)]
pub struct AwsEnv {
    pub vars: BTreeMap<String, String>,
    pub home: Option<PathBuf>,
}

const ENV_NAMES: [&str; 12] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_EC2",
    "AWS_ENDPOINT_URL_EBS",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_PROFILE",
    "HOME",
];

impl AwsEnv {
    /// This process's environment.
    pub fn from_process() -> AwsEnv {
        let vars: BTreeMap<String, String> = ENV_NAMES
            .iter()
            .filter_map(|name| {
                std::env::var(name)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(|v| (name.to_string(), v))
            })
            .collect();
        let home = vars.get("HOME").map(PathBuf::from);
        AwsEnv { vars, home }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// The shared credentials file's path.
    pub fn credentials_file(&self) -> Option<PathBuf> {
        self.var("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| self.home.as_ref().map(|h| h.join(".aws/credentials")))
    }

    /// The shared config file's path.
    pub fn config_file(&self) -> Option<PathBuf> {
        self.var("AWS_CONFIG_FILE")
            .map(PathBuf::from)
            .or_else(|| self.home.as_ref().map(|h| h.join(".aws/config")))
    }

    /// The files of the chain that exist (they may hold secrets).
    pub fn secret_files(&self) -> Vec<PathBuf> {
        [self.credentials_file(), self.config_file()]
            .into_iter()
            .flatten()
            .filter(|p| p.is_file())
            .collect()
    }

    /// The profile: the provider's, else `AWS_PROFILE`, else `default`.
    pub fn profile<'a>(&'a self, configured: Option<&'a str>) -> &'a str {
        configured
            .or_else(|| self.var("AWS_PROFILE"))
            .unwrap_or("default")
    }

    /// The endpoint of `service` (`ec2`, `ebs`, `s3`) in `region`, without a trailing `/`.
    pub fn endpoint(&self, service: &str, region: &str) -> String {
        let specific = format!("AWS_ENDPOINT_URL_{}", service.to_ascii_uppercase());
        match self.var(&specific).or_else(|| self.var("AWS_ENDPOINT_URL")) {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!("https://{service}.{region}.amazonaws.com"),
        }
    }

    /// Whether an endpoint of `service` is configured (rather than AWS's own).
    pub fn has_endpoint(&self, service: &str) -> bool {
        let specific = format!("AWS_ENDPOINT_URL_{}", service.to_ascii_uppercase());
        self.var(&specific)
            .or_else(|| self.var("AWS_ENDPOINT_URL"))
            .is_some()
    }

    /// Walks the chain for `profile_name` (the provider's `profile-name`).
    pub fn credentials(&self, profile_name: Option<&str>) -> Result<Credentials, String> {
        let profile = self.profile(profile_name);
        let mut looked = Vec::new();
        if profile_name.is_none() {
            match (
                self.var("AWS_ACCESS_KEY_ID"),
                self.var("AWS_SECRET_ACCESS_KEY"),
            ) {
                (Some(id), Some(secret)) => {
                    let mut c = Credentials::new(id, secret, self.var("AWS_SESSION_TOKEN"));
                    c.source = "environment".into();
                    return Ok(c);
                }
                (Some(_), None) | (None, Some(_)) => {
                    return Err(
                        "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set \
                         in the environment"
                            .into(),
                    );
                }
                (None, None) => looked.push("the environment (AWS_ACCESS_KEY_ID)".to_string()),
            }
        }
        let sections = [
            (self.credentials_file(), profile.to_string()),
            (
                self.config_file(),
                if profile == "default" {
                    "default".to_string()
                } else {
                    format!("profile {profile}")
                },
            ),
        ];
        let mut unsupported = None;
        for (file, section) in sections {
            let Some(file) = file else { continue };
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    looked.push(format!("{} (absent)", file.display()));
                    continue;
                }
                Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
            };
            let Some(keys) = ini_section(&text, &section) else {
                looked.push(format!("{} (no [{section}])", file.display()));
                continue;
            };
            match (
                keys.get("aws_access_key_id"),
                keys.get("aws_secret_access_key"),
            ) {
                (Some(id), Some(secret)) => {
                    let mut c = Credentials::new(
                        id,
                        secret,
                        keys.get("aws_session_token").map(String::as_str),
                    );
                    c.source = format!("{} [{section}]", file.display());
                    return Ok(c);
                }
                (Some(_), None) | (None, Some(_)) => {
                    return Err(format!(
                        "{} [{section}] has only one of aws_access_key_id and aws_secret_access_key",
                        file.display()
                    ));
                }
                (None, None) => {
                    if let Some(key) = [
                        "role_arn",
                        "credential_process",
                        "sso_session",
                        "sso_start_url",
                        "web_identity_token_file",
                    ]
                    .into_iter()
                    .find(|k| keys.contains_key(*k))
                    {
                        unsupported = Some(format!(
                            "{} [{section}] uses `{key}`, which this builder does not follow (only static keys)",
                            file.display()
                        ));
                    }
                    looked.push(format!("{} [{section}] (no keys)", file.display()));
                }
            }
        }
        Err(unsupported.unwrap_or_else(|| {
            format!(
                "no AWS credentials for profile {profile}: looked in {} (instance metadata is not used)",
                looked.join(", ")
            )
        }))
    }
}

/// The `key = value` pairs of `[section]` in an ini text (`#`/`;` comments, later values
/// win, keys lower-cased), or `None` without that section.
fn ini_section(text: &str, section: &str) -> Option<BTreeMap<String, String>> {
    let mut found = None::<BTreeMap<String, String>>;
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.split_whitespace().collect::<Vec<_>>().join(" ") == section;
            if inside && found.is_none() {
                found = Some(BTreeMap::new());
            }
            continue;
        }
        if !inside {
            continue;
        }
        if let Some((key, value)) = line.split_once('=')
            && let Some(keys) = found.as_mut()
        {
            keys.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)], home: Option<&std::path::Path>) -> AwsEnv {
        AwsEnv {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            home: home.map(PathBuf::from),
        }
    }

    #[test]
    fn environment_keys_come_first_unless_a_profile_is_configured() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        std::fs::write(
            dir.path().join(".aws/credentials"),
            "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = filesecret\n\n\
             [ci]\n# comment\naws_access_key_id=CIKEY\naws_secret_access_key=cisecret\naws_session_token = tok\n",
        )
        .unwrap();
        let e = env(
            &[
                ("AWS_ACCESS_KEY_ID", "ENVKEY"),
                ("AWS_SECRET_ACCESS_KEY", "envsecret"),
            ],
            Some(dir.path()),
        );
        let c = e.credentials(None).unwrap();
        assert_eq!((c.access_key_id(), c.source()), ("ENVKEY", "environment"));
        let c = e.credentials(Some("ci")).unwrap();
        assert_eq!(c.access_key_id(), "CIKEY");
        assert_eq!(c.session_token(), Some("tok"));
        assert!(
            c.source().ends_with(".aws/credentials [ci]"),
            "{}",
            c.source()
        );
        let e = env(&[("AWS_PROFILE", "ci")], Some(dir.path()));
        assert_eq!(e.credentials(None).unwrap().access_key_id(), "CIKEY");
        let e = env(&[], Some(dir.path()));
        assert_eq!(e.credentials(None).unwrap().access_key_id(), "FILEKEY");
    }

    #[test]
    fn the_config_file_uses_profile_sections_and_named_files_replace_home() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("cfg");
        std::fs::write(
            &config,
            "[default]\nregion = x\n[profile build]\naws_access_key_id = CFGKEY\naws_secret_access_key = s\n\
             [profile role]\nrole_arn = arn:aws:iam::1:role/x\n",
        )
        .unwrap();
        let e = env(
            &[
                ("AWS_CONFIG_FILE", config.to_str().unwrap()),
                ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/creds"),
            ],
            None,
        );
        assert_eq!(
            e.credentials(Some("build")).unwrap().access_key_id(),
            "CFGKEY"
        );
        let err = e.credentials(Some("role")).unwrap_err();
        assert!(err.contains("role_arn"), "{err}");
        let err = e.credentials(None).unwrap_err();
        assert!(
            err.contains("no AWS credentials for profile default"),
            "{err}"
        );
        assert!(err.contains("/nonexistent/creds (absent)"), "{err}");
        assert_eq!(e.secret_files(), vec![config]);
    }

    #[test]
    fn debug_output_and_errors_never_show_secrets() {
        let c = Credentials::new("AKID", "verysecret", Some("tokensecret"));
        let shown = format!("{c:?}");
        assert!(
            shown.contains("AKID")
                && !shown.contains("verysecret")
                && !shown.contains("tokensecret")
        );
        let e = env(&[("AWS_SECRET_ACCESS_KEY", "verysecret")], None);
        let err = e.credentials(None).unwrap_err();
        assert!(!err.contains("verysecret"), "{err}");
    }

    #[test]
    fn endpoints_follow_the_sdk_variables() {
        let e = env(
            &[
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000/"),
                ("AWS_ENDPOINT_URL_EBS", "http://127.0.0.1:6000"),
            ],
            None,
        );
        assert_eq!(e.endpoint("ec2", "us-east-1"), "http://127.0.0.1:5000");
        assert_eq!(e.endpoint("ebs", "us-east-1"), "http://127.0.0.1:6000");
        assert_eq!(
            env(&[], None).endpoint("ec2", "eu-west-1"),
            "https://ec2.eu-west-1.amazonaws.com"
        );
    }
}
