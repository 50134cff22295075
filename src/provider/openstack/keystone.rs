//! Keystone v3 for the OpenStack driver: getting a project-scoped token, keeping it until
//! shortly before it expires, and finding the image endpoint in its catalog.
//!
//! A [`Session`] holds at most one token. [`Session::current`] returns it (authenticating
//! first when there is none or it is about to expire) together with the image endpoint;
//! after a 401 the caller hands the rejected token to [`Session::invalidate`] and asks again,
//! once. Threads share the session; the lock is held while authenticating, so a burst of
//! callers waiting for a new token causes one `POST /v3/auth/tokens`, not one each.
//!
//! With `auth_type: none` there is no Keystone: no token, and the endpoint is
//! `image_endpoint_override`.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::clouds::{AuthType, CloudConfig, Secret};
use super::http::{Body, Http, describe_status, status_kind};
use crate::provider::{ErrorKind, ProviderError};

/// A token is not used in its last `lifetime / 4`, and never in its last two minutes.
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(120);

/// What requests need: the token to send (none without Keystone) and the image endpoint.
#[derive(Clone)]
pub struct Credentials {
    pub token: Option<Secret>,
    /// The unversioned image endpoint, without a trailing `/`.
    pub endpoint: String,
}

struct Token {
    credentials: Credentials,
    /// When to stop using it; `None` when Keystone did not say.
    refresh_at: Option<SystemTime>,
}

/// One provider's identity.
pub struct Session {
    cloud: CloudConfig,
    token: Mutex<Option<Token>>,
}

impl Session {
    pub fn new(cloud: CloudConfig) -> Session {
        Session {
            cloud,
            token: Mutex::new(None),
        }
    }

    pub fn cloud(&self) -> &CloudConfig {
        &self.cloud
    }

    /// Whether requests carry a Keystone token (so a 401 is worth a new one).
    pub fn uses_keystone(&self) -> bool {
        self.cloud.auth_type != AuthType::None
    }

    /// The credentials to use now, authenticating if needed.
    pub fn current(&self, http: &Http, timeout: Duration) -> Result<Credentials, ProviderError> {
        if !self.uses_keystone() {
            let endpoint = self
                .cloud
                .image_endpoint_override
                .as_deref()
                .unwrap_or_default();
            return Ok(Credentials {
                token: None,
                endpoint: unversioned(endpoint),
            });
        }
        let mut slot = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(token) = slot.as_ref() {
            if token.refresh_at.is_none_or(|at| SystemTime::now() < at) {
                return Ok(token.credentials.clone());
            }
            log::debug!(
                "cloud {}: token is about to expire; authenticating again",
                self.cloud.name
            );
        }
        *slot = None;
        let token = self.authenticate(http, timeout)?;
        let credentials = token.credentials.clone();
        *slot = Some(token);
        Ok(credentials)
    }

    /// The credentials held now, without authenticating.
    pub fn peek(&self) -> Option<Credentials> {
        self.token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|t| t.credentials.clone())
    }

    /// Forgets `rejected` (a token that got a 401), unless another thread has already
    /// replaced it.
    pub fn invalidate(&self, rejected: &Secret) {
        let mut slot = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().and_then(|t| t.credentials.token.as_ref()) == Some(rejected) {
            *slot = None;
        }
    }

    fn auth_url(&self) -> String {
        let url = self
            .cloud
            .auth
            .auth_url
            .as_deref()
            .unwrap_or_default()
            .trim_end_matches('/');
        if url.ends_with("/v3") {
            url.to_string()
        } else {
            format!("{url}/v3")
        }
    }

    fn authenticate(&self, http: &Http, timeout: Duration) -> Result<Token, ProviderError> {
        let url = format!("{}/auth/tokens", self.auth_url());
        let request = self.auth_request()?;
        let who = self.who();
        let fail = |kind: ErrorKind, detail: String| {
            ProviderError::new(
                kind,
                format!(
                    "cloud {}: keystone authentication {who} at {url} failed: {detail}",
                    self.cloud.name
                ),
            )
        };
        let body = Body::Bytes {
            content_type: "application/json",
            data: request.to_string().into_bytes(),
        };
        let reply = http
            .send("POST", &url, None, body, timeout)
            .map_err(|e| fail(e.kind(), e.message))?;
        if !reply.is_success() {
            let kind = if reply.status == 404 {
                ErrorKind::Config
            } else {
                status_kind(reply.status)
            };
            return Err(fail(kind, describe_status(&reply)));
        }
        let Some(token) = reply.subject_token.clone() else {
            return Err(fail(
                ErrorKind::Server,
                "the answer has no X-Subject-Token header".into(),
            ));
        };
        let json = reply.json().map_err(|e| fail(ErrorKind::Server, e))?;
        let body = &json["token"];
        let expires = body["expires_at"].as_str().and_then(parse_timestamp);
        let issued = body["issued_at"]
            .as_str()
            .and_then(parse_timestamp)
            .unwrap_or_else(SystemTime::now);
        let refresh_at = expires.map(|expires| {
            let lifetime = expires.duration_since(issued).unwrap_or_default();
            expires - (lifetime / 4).min(MAX_REFRESH_MARGIN)
        });
        let endpoint = match &self.cloud.image_endpoint_override {
            Some(url) => unversioned(url),
            None => self
                .image_endpoint(&body["catalog"])
                .map_err(|e| fail(ErrorKind::Config, e))?,
        };
        log::debug!(
            "cloud {}: authenticated {who}; token expires {}; image endpoint {endpoint}",
            self.cloud.name,
            body["expires_at"].as_str().unwrap_or("(never)")
        );
        Ok(Token {
            credentials: Credentials {
                token: Some(Secret::new(token)),
                endpoint,
            },
            refresh_at,
        })
    }

    /// `as user X in project Y` for messages (names and ids are not secrets).
    fn who(&self) -> String {
        let a = &self.cloud.auth;
        match self.cloud.auth_type {
            AuthType::ApplicationCredential => format!(
                "with application credential {}",
                a.application_credential_id
                    .as_deref()
                    .or(a.application_credential_name.as_deref())
                    .unwrap_or("?")
            ),
            AuthType::Token => "with a token".to_string(),
            _ => format!(
                "of user {} in project {}",
                a.username
                    .as_deref()
                    .or(a.user_id.as_deref())
                    .unwrap_or("?"),
                a.project_name
                    .as_deref()
                    .or(a.project_id.as_deref())
                    .unwrap_or("(unscoped)")
            ),
        }
    }

    /// The body of `POST /v3/auth/tokens`.
    fn auth_request(&self) -> Result<Value, ProviderError> {
        let a = &self.cloud.auth;
        let default_domain = self.cloud.default_domain.as_deref();
        let domain = |id: &Option<String>, name: &Option<String>| match (id, name) {
            (Some(id), _) => json!({ "id": id }),
            (None, Some(name)) => json!({ "name": name }),
            (None, None) => json!({ "id": default_domain.unwrap_or("default") }),
        };
        let user = || {
            let mut user = serde_json::Map::new();
            if let Some(id) = &a.user_id {
                user.insert("id".into(), json!(id));
            } else {
                user.insert("name".into(), json!(a.username));
                user.insert(
                    "domain".into(),
                    domain(&a.user_domain_id, &a.user_domain_name),
                );
            }
            user
        };
        let project_scope = || {
            if let Some(id) = &a.project_id {
                Some(json!({ "project": { "id": id } }))
            } else {
                a.project_name.as_ref().map(|name| {
                    json!({ "project": { "name": name, "domain": domain(&a.project_domain_id, &a.project_domain_name) } })
                })
            }
        };
        let secret = |s: &Option<Secret>| {
            s.as_ref()
                .map(|s| s.expose().to_string())
                .unwrap_or_default()
        };
        let (identity, scope) = match self.cloud.auth_type {
            AuthType::Password => {
                let mut user = user();
                user.insert("password".into(), json!(secret(&a.password)));
                (
                    json!({ "methods": ["password"], "password": { "user": user } }),
                    project_scope(),
                )
            }
            AuthType::ApplicationCredential => {
                let mut credential = serde_json::Map::new();
                if let Some(id) = &a.application_credential_id {
                    credential.insert("id".into(), json!(id));
                } else {
                    credential.insert("name".into(), json!(a.application_credential_name));
                    credential.insert("user".into(), Value::Object(user()));
                }
                credential.insert(
                    "secret".into(),
                    json!(secret(&a.application_credential_secret)),
                );
                // An application credential carries its own scope.
                (
                    json!({ "methods": ["application_credential"], "application_credential": credential }),
                    None,
                )
            }
            AuthType::Token => (
                json!({ "methods": ["token"], "token": { "id": secret(&a.token) } }),
                project_scope(),
            ),
            AuthType::None => unreachable!("no Keystone request without Keystone"),
        };
        let mut auth = serde_json::Map::new();
        auth.insert("identity".into(), identity);
        if let Some(scope) = scope {
            auth.insert("scope".into(), scope);
        }
        Ok(json!({ "auth": auth }))
    }

    /// The image endpoint for the cloud's interface and region.
    fn image_endpoint(&self, catalog: &Value) -> Result<String, String> {
        let interface = self.cloud.interface.as_str();
        let region = self.cloud.region_name.as_deref();
        let services = catalog
            .as_array()
            .ok_or("the token has no catalog (is a project set?)")?;
        let mut seen = Vec::new();
        for service in services.iter().filter(|s| s["type"] == "image") {
            for endpoint in service["endpoints"].as_array().into_iter().flatten() {
                let ep_interface = endpoint["interface"].as_str().unwrap_or("");
                let ep_region = endpoint["region_id"]
                    .as_str()
                    .or(endpoint["region"].as_str())
                    .unwrap_or("");
                seen.push(format!("{ep_interface}/{ep_region}"));
                if ep_interface == interface
                    && region.is_none_or(|r| r == ep_region)
                    && let Some(url) = endpoint["url"].as_str()
                {
                    return Ok(unversioned(url));
                }
            }
        }
        Err(format!(
            "no {interface} image endpoint{} in the catalog (image endpoints: {})",
            region
                .map(|r| format!(" in region {r}"))
                .unwrap_or_default(),
            if seen.is_empty() {
                "none".to_string()
            } else {
                seen.join(", ")
            }
        ))
    }
}

/// The endpoint without a trailing version (`/v2`, `/v2.0`, `/v2/`) or slash: Glance's
/// version discovery lives at the unversioned root and `GET /v2/` is a 404.
pub fn unversioned(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if let Some((base, last)) = url.rsplit_once('/') {
        let is_version = last.strip_prefix('v').is_some_and(|v| {
            !v.is_empty()
                && v.split('.')
                    .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
        });
        if is_version && base.contains("://") && !base.ends_with('/') {
            return base.trim_end_matches('/').to_string();
        }
    }
    url.to_string()
}

/// Parses Keystone's `2026-11-24T17:06:00.000000Z` (any RFC 3339 time in UTC or with an
/// offset).
pub fn parse_timestamp(text: &str) -> Option<SystemTime> {
    let (date, time) = text.split_once(['T', ' '])?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    // Split off the zone: `Z`, `+hh:mm`, `-hh:mm` or nothing (UTC).
    let (clock, offset_secs) =
        if let Some(clock) = time.strip_suffix('Z').or_else(|| time.strip_suffix('z')) {
            (clock, 0i64)
        } else if let Some(pos) = time.rfind(['+', '-']) {
            let (clock, zone) = time.split_at(pos);
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            let (h, m) = zone[1..].split_once(':').unwrap_or((&zone[1..], "0"));
            (
                clock,
                sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60),
            )
        } else {
            (time, 0)
        };
    let mut c = clock.splitn(3, ':');
    let hour: i64 = c.next()?.parse().ok()?;
    let minute: i64 = c.next()?.parse().ok()?;
    let seconds: f64 = c.next().unwrap_or("0").parse().ok()?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || !(0.0..61.0).contains(&seconds)
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let whole = days * 86400 + hour * 3600 + minute * 60 + seconds.trunc() as i64 - offset_secs;
    let nanos = (seconds.fract() * 1e9) as u32;
    if whole < 0 {
        return None;
    }
    Some(UNIX_EPOCH + Duration::new(whole as u64, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let t = parse_timestamp("1970-01-02T00:00:01.500000Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(86_401_500)
        );
        let t = parse_timestamp("2026-11-24T17:06:00Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_795_539_960
        );
        let t = parse_timestamp("2026-11-24T18:06:00+01:00").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_795_539_960
        );
        assert!(parse_timestamp("yesterday").is_none());
    }

    #[test]
    fn endpoints_lose_their_version() {
        assert_eq!(
            unversioned("http://127.0.0.1:9292"),
            "http://127.0.0.1:9292"
        );
        assert_eq!(
            unversioned("http://127.0.0.1:9292/"),
            "http://127.0.0.1:9292"
        );
        assert_eq!(
            unversioned("http://127.0.0.1:9292/v2"),
            "http://127.0.0.1:9292"
        );
        assert_eq!(
            unversioned("http://127.0.0.1:9292/v2/"),
            "http://127.0.0.1:9292"
        );
        assert_eq!(
            unversioned("https://cloud.example/image/v2.0"),
            "https://cloud.example/image"
        );
        assert_eq!(
            unversioned("https://cloud.example/image"),
            "https://cloud.example/image"
        );
        assert_eq!(
            unversioned("https://cloud.example/v2x"),
            "https://cloud.example/v2x"
        );
    }
}
