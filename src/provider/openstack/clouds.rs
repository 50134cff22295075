//! `clouds.yaml`: finding it the way openstacksdk does, merging `secure.yaml` over it, and
//! turning one cloud entry into a [`CloudConfig`].
//!
//! # Where the files are
//!
//! openstacksdk looks for `clouds.yaml` (also `clouds.yml`, `clouds.json`) in the current
//! directory, `~/.config/openstack` (`$XDG_CONFIG_HOME/openstack` when that is set),
//! `/etc/xdg/openstack` and `/etc/openstack`, and takes the first file that exists;
//! `OS_CLIENT_CONFIG_FILE` names a file that is tried before all of them. `secure.yaml` is
//! looked up the same way (with `OS_CLIENT_SECURE_FILE` first), and its content is merged
//! over `clouds.yaml` key by key, so passwords can live in a file of their own. [`locate`]
//! does the search for a given [`SearchEnv`]; [`SearchEnv::from_process`] reads the real
//! environment.
//!
//! # What is read from a cloud entry
//!
//! `auth_type` (`password` by default, `v3applicationcredential`, `token`, `none`/`noauth`),
//! `auth` (`auth_url`, `username`/`user_id`, `password`, `project_name`/`project_id`
//! (`tenant_*` too), `user_domain_name`/`_id`, `project_domain_name`/`_id`,
//! `application_credential_id`/`_name`/`_secret`, `token`); auth keys written at the top
//! level of the entry are accepted too, as openstacksdk does. Also `default_domain`,
//! `region_name` or `regions` (a region's `values` are merged over the entry), `interface`
//! (`endpoint_type`), `image_endpoint_override`, `image_format`, `verify`, `insecure` and
//! `cacert` (what these mean for TLS, and the environment variables beside them: [`super::trust`]).
//!
//! # Which files hold secrets
//!
//! [`secret_files`] names the files the driver reads that may hold credentials, for the
//! permission check of `secret_files`: `secure.yaml`, and `clouds.yaml` when a
//! `password`, `application_credential_secret`, `token` or `secret` has a value anywhere in
//! it.
//!
//! Secrets are held in [`Secret`], whose `Debug` output is `<redacted>`, and no error
//! message of this module quotes a value from the files.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use crate::provider::{ErrorKind, ProviderError};

/// File names tried in each directory, in order.
const CLOUDS_NAMES: [&str; 3] = ["clouds.yaml", "clouds.yml", "clouds.json"];
const SECURE_NAMES: [&str; 3] = ["secure.yaml", "secure.yml", "secure.json"];

/// What the search depends on; [`SearchEnv::from_process`] fills it from the environment.
#[derive(Debug, Clone, Default)]
pub struct SearchEnv {
    /// `OS_CLIENT_CONFIG_FILE`.
    pub client_config_file: Option<PathBuf>,
    /// `OS_CLIENT_SECURE_FILE`.
    pub client_secure_file: Option<PathBuf>,
    /// The current directory.
    pub cwd: Option<PathBuf>,
    /// `HOME`.
    pub home: Option<PathBuf>,
    /// `XDG_CONFIG_HOME`.
    pub xdg_config_home: Option<PathBuf>,
}

impl SearchEnv {
    /// The search environment of this process.
    pub fn from_process() -> SearchEnv {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        SearchEnv {
            client_config_file: var("OS_CLIENT_CONFIG_FILE"),
            client_secure_file: var("OS_CLIENT_SECURE_FILE"),
            cwd: std::env::current_dir().ok(),
            home: var("HOME"),
            xdg_config_home: var("XDG_CONFIG_HOME"),
        }
    }

    /// The directories searched, in order.
    pub fn search_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if let Some(cwd) = &self.cwd {
            dirs.push(cwd.clone());
        }
        if let Some(xdg) = &self.xdg_config_home {
            dirs.push(xdg.join("openstack"));
        } else if let Some(home) = &self.home {
            dirs.push(home.join(".config/openstack"));
        }
        dirs.push(PathBuf::from("/etc/xdg/openstack"));
        dirs.push(PathBuf::from("/etc/openstack"));
        dirs
    }

    /// Every `clouds.yaml` candidate, in the order they are tried.
    pub fn clouds_candidates(&self) -> Vec<PathBuf> {
        self.candidates(self.client_config_file.as_ref(), &CLOUDS_NAMES)
    }

    /// Every `secure.yaml` candidate, in the order they are tried.
    pub fn secure_candidates(&self) -> Vec<PathBuf> {
        self.candidates(self.client_secure_file.as_ref(), &SECURE_NAMES)
    }

    fn candidates(&self, first: Option<&PathBuf>, names: &[&str]) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = first.cloned().into_iter().collect();
        for dir in self.search_dirs() {
            out.extend(names.iter().map(|n| dir.join(n)));
        }
        out
    }
}

/// The files found by [`locate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub clouds: Option<PathBuf>,
    pub secure: Option<PathBuf>,
    /// Every `clouds.yaml` candidate, for the "not found" message.
    pub searched: Vec<PathBuf>,
}

/// Finds `clouds.yaml` and `secure.yaml` as openstacksdk does (first existing file of each).
pub fn locate(env: &SearchEnv) -> Located {
    let searched = env.clouds_candidates();
    Located {
        clouds: searched.iter().find(|p| p.is_file()).cloned(),
        secure: env.secure_candidates().into_iter().find(|p| p.is_file()),
        searched,
    }
}

/// Keys whose (non-empty) values make a `clouds.yaml` a secret file.
const SECRET_KEYS: [&str; 4] = [
    "password",
    "application_credential_secret",
    "token",
    "secret",
];

/// The files found for `env` that may hold credentials: the `secure.yaml`, and the
/// `clouds.yaml` when it holds a secret.
pub fn secret_files(env: &SearchEnv) -> Vec<PathBuf> {
    let found = locate(env);
    found
        .secure
        .into_iter()
        .chain(found.clouds.filter(|p| holds_secrets(p)))
        .collect()
}

/// Whether a `clouds.yaml` has a non-empty value under one of [`SECRET_KEYS`] anywhere.
fn holds_secrets(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(doc) = serde_yaml_ng::from_str::<Value>(&text) else {
        return false;
    };
    has_secret(&doc)
}

fn has_secret(v: &Value) -> bool {
    match v {
        Value::Mapping(m) => m.iter().any(|(k, v)| {
            let secret_key = k.as_str().is_some_and(|k| SECRET_KEYS.contains(&k));
            (secret_key && v.as_str().is_some_and(|s| !s.is_empty())) || has_secret(v)
        }),
        Value::Sequence(s) => s.iter().any(has_secret),
        Value::Tagged(t) => has_secret(&t.value),
        _ => false,
    }
}

/// A credential: shown as `<redacted>` by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The credential itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How the driver authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    /// Keystone v3 password (`password`, `v3password`).
    Password,
    /// Keystone v3 application credential (`v3applicationcredential`).
    ApplicationCredential,
    /// Keystone v3 token (`token`, `v3token`): an existing token is exchanged for a scoped one.
    Token,
    /// No Keystone (`none`, `noauth`): needs `image_endpoint_override`; no token is sent.
    None,
}

/// The `auth` section of a cloud entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    pub auth_url: Option<String>,
    pub username: Option<String>,
    pub user_id: Option<String>,
    pub password: Option<Secret>,
    pub project_name: Option<String>,
    pub project_id: Option<String>,
    pub user_domain_name: Option<String>,
    pub user_domain_id: Option<String>,
    pub project_domain_name: Option<String>,
    pub project_domain_id: Option<String>,
    pub application_credential_id: Option<String>,
    pub application_credential_name: Option<String>,
    pub application_credential_secret: Option<Secret>,
    pub token: Option<Secret>,
}

/// One cloud entry of `clouds.yaml` (secure.yaml merged, region values applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudConfig {
    /// The entry's name.
    pub name: String,
    /// The file it came from (and the secure file merged over it).
    pub source: PathBuf,
    pub secure_source: Option<PathBuf>,
    pub auth_type: AuthType,
    pub auth: Auth,
    /// `default_domain`: the domain of the user and project when none is given.
    pub default_domain: Option<String>,
    pub region_name: Option<String>,
    /// `public` (default), `internal` or `admin`.
    pub interface: String,
    pub image_endpoint_override: Option<String>,
    pub image_format: Option<String>,
    /// False when `verify: false` or `insecure: true` turns TLS certificate verification off.
    pub verify: bool,
    /// `cacert`: a PEM bundle (or directory) of CAs to trust instead of the system store.
    pub cacert: Option<PathBuf>,
}

impl CloudConfig {
    /// Every credential of this entry, for scrubbing messages.
    pub fn secrets(&self) -> Vec<String> {
        [
            &self.auth.password,
            &self.auth.application_credential_secret,
            &self.auth.token,
        ]
        .into_iter()
        .flatten()
        .map(|s| s.expose().to_string())
        .filter(|s| !s.is_empty())
        .collect()
    }
}

/// Loads cloud `cloud` from `clouds` (and `secure` merged over it). `region` (the provider's
/// `region-name`) wins over the entry's own region.
pub fn load(
    clouds: &Path,
    secure: Option<&Path>,
    cloud: &str,
    region: Option<&str>,
) -> Result<CloudConfig, ProviderError> {
    let mut root = read_yaml(clouds)?;
    if let Some(secure) = secure {
        let over = read_yaml(secure)?;
        merge(&mut root, over);
    }
    let clouds_map = match root.get("clouds") {
        Some(Value::Mapping(m)) => m,
        _ => {
            return Err(config_error(format!(
                "{}: no `clouds` mapping",
                clouds.display()
            )));
        }
    };
    let Some(entry) = clouds_map.get(cloud) else {
        let mut names: Vec<String> = clouds_map
            .keys()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect();
        names.sort();
        return Err(config_error(format!(
            "cloud `{cloud}` is not in {} (it has: {})",
            clouds.display(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    };
    let Value::Mapping(entry) = entry else {
        return Err(config_error(format!(
            "{}: cloud `{cloud}` is not a mapping",
            clouds.display()
        )));
    };
    let mut entry = entry.clone();
    let where_ = || format!("{}: cloud `{cloud}`", clouds.display());

    let region_name = match region {
        Some(r) => Some(r.to_string()),
        None => scalar(&entry, "region_name").or_else(|| first_region(&entry)),
    };
    if let Some(region_name) = &region_name {
        apply_region_values(&mut entry, region_name);
    }

    let empty = Mapping::new();
    let auth_map = match entry.get("auth") {
        Some(Value::Mapping(m)) => m,
        Some(Value::Null) | None => &empty,
        Some(_) => {
            return Err(config_error(format!(
                "{}: `auth` is not a mapping",
                where_()
            )));
        }
    };
    // openstacksdk accepts auth keys at the top level of the entry too.
    let get = |key: &str| scalar(auth_map, key).or_else(|| scalar(&entry, key));
    let secret = |key: &str| get(key).map(Secret);
    let auth = Auth {
        auth_url: get("auth_url"),
        username: get("username").or_else(|| get("user_name")),
        user_id: get("user_id"),
        password: secret("password"),
        project_name: get("project_name").or_else(|| get("tenant_name")),
        project_id: get("project_id").or_else(|| get("tenant_id")),
        user_domain_name: get("user_domain_name"),
        user_domain_id: get("user_domain_id"),
        project_domain_name: get("project_domain_name"),
        project_domain_id: get("project_domain_id"),
        application_credential_id: get("application_credential_id"),
        application_credential_name: get("application_credential_name"),
        application_credential_secret: secret("application_credential_secret"),
        token: secret("token"),
    };

    let auth_type = match scalar(&entry, "auth_type")
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("password") | Some("v3password") => AuthType::Password,
        Some("v3applicationcredential")
        | Some("applicationcredential")
        | Some("application_credential") => AuthType::ApplicationCredential,
        Some("token") | Some("v3token") => AuthType::Token,
        Some("none") | Some("noauth") => AuthType::None,
        Some(other) => {
            return Err(config_error(format!(
                "{}: auth_type `{other}` is not supported (use password, v3applicationcredential, token or none)",
                where_()
            )));
        }
    };

    let interface = scalar(&entry, "interface")
        .or_else(|| scalar(&entry, "endpoint_type"))
        .map(|i| i.trim_end_matches("URL").to_ascii_lowercase())
        .unwrap_or_else(|| "public".to_string());
    let flag = |key: &str, default: bool| match entry.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => Ok(!matches!(
            s.to_ascii_lowercase().as_str(),
            "false" | "no" | "0" | "off"
        )),
        Some(_) => Err(config_error(format!(
            "{}: `{key}` must be true or false",
            where_()
        ))),
    };
    // openstacksdk: `insecure` wins over `verify`.
    let verify = flag("verify", true)? && !flag("insecure", false)?;
    let config = CloudConfig {
        name: cloud.to_string(),
        source: clouds.to_path_buf(),
        secure_source: secure.map(Path::to_path_buf),
        auth_type,
        auth,
        default_domain: scalar(&entry, "default_domain")
            .or_else(|| scalar(auth_map, "default_domain")),
        region_name,
        interface,
        image_endpoint_override: scalar(&entry, "image_endpoint_override"),
        image_format: scalar(&entry, "image_format"),
        verify,
        cacert: scalar(&entry, "cacert").map(|p| expand_home(&p)),
    };
    check(&config).map_err(|e| config_error(format!("{}: {e}", where_())))?;
    Ok(config)
}

/// What each auth type needs.
fn check(c: &CloudConfig) -> Result<(), String> {
    let a = &c.auth;
    match c.auth_type {
        AuthType::None => {
            if c.image_endpoint_override.is_none() {
                return Err("auth_type none needs image_endpoint_override".into());
            }
            return Ok(());
        }
        AuthType::Password => {
            if a.username.is_none() && a.user_id.is_none() {
                return Err("password auth needs auth.username or auth.user_id".into());
            }
            if a.password.is_none() {
                return Err("password auth needs auth.password".into());
            }
        }
        AuthType::ApplicationCredential => {
            if a.application_credential_secret.is_none() {
                return Err(
                    "application credential auth needs auth.application_credential_secret".into(),
                );
            }
            if a.application_credential_id.is_none()
                && (a.application_credential_name.is_none()
                    || (a.username.is_none() && a.user_id.is_none()))
            {
                return Err(
                    "application credential auth needs auth.application_credential_id, or \
                            auth.application_credential_name with auth.username or auth.user_id"
                        .into(),
                );
            }
        }
        AuthType::Token => {
            if a.token.is_none() {
                return Err("token auth needs auth.token".into());
            }
        }
    }
    if a.auth_url.is_none() {
        return Err("auth.auth_url is missing".into());
    }
    Ok(())
}

fn config_error(message: String) -> ProviderError {
    ProviderError::new(ErrorKind::Config, message)
}

fn read_yaml(path: &Path) -> Result<Value, ProviderError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| config_error(format!("cannot read {}: {e}", path.display())))?;
    if text.trim().is_empty() {
        return Ok(Value::Mapping(Mapping::new()));
    }
    // serde_yaml_ng's syntax errors give a position, never the offending text.
    serde_yaml_ng::from_str(&text)
        .map_err(|e| config_error(format!("cannot parse {}: {e}", path.display())))
}

/// Merges `over` into `base`: mappings key by key, recursively; anything else is replaced.
pub fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(base), Value::Mapping(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

/// A scalar as a string (YAML numbers and booleans too: `password: 1234` is a string here).
fn scalar(map: &Mapping, key: &str) -> Option<String> {
    match map.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The first entry of `regions` (a name or a `{name: ...}` mapping).
fn first_region(entry: &Mapping) -> Option<String> {
    let Some(Value::Sequence(regions)) = entry.get("regions") else {
        return None;
    };
    regions.iter().find_map(|r| match r {
        Value::String(s) => Some(s.clone()),
        Value::Mapping(m) => scalar(m, "name"),
        _ => None,
    })
}

/// Merges the `values` of the `regions` entry named `region` over the cloud entry.
fn apply_region_values(entry: &mut Mapping, region: &str) {
    let values = match entry.get("regions") {
        Some(Value::Sequence(regions)) => regions.iter().find_map(|r| match r {
            Value::Mapping(m) if scalar(m, "name").as_deref() == Some(region) => {
                m.get("values").cloned()
            }
            _ => None,
        }),
        _ => None,
    };
    if let Some(values) = values {
        let mut merged = Value::Mapping(std::mem::take(entry));
        merge(&mut merged, values);
        if let Value::Mapping(m) = merged {
            *entry = m;
        }
    }
}

fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clouds_yaml_holds_secrets_only_with_a_value() {
        let yaml = |t: &str| serde_yaml_ng::from_str::<Value>(t).unwrap();
        assert!(has_secret(&yaml(
            "clouds:\n  c:\n    auth:\n      password: x\n"
        )));
        assert!(!has_secret(&yaml(
            "clouds:\n  c:\n    auth:\n      username: u\n"
        )));
        assert!(!has_secret(&yaml(
            "clouds:\n  c:\n    auth:\n      password: ''\n"
        )));
    }
}
