//! The OpenStack driver: image uploads to Glance v2, authenticated by Keystone v3, configured
//! through `clouds.yaml` the way openstacksdk users expect.
//!
//! # An upload on the wire
//!
//! ```text
//! POST   /v3/auth/tokens                 only without a valid token (keystone.rs)
//! POST   /v2/images                      JSON: id (ours), name, disk_format, container_format
//!                                        bare, visibility private, the request's properties and
//!                                        owner_specified.openstack.{md5,sha256,object}
//! PUT    /v2/images/<id>/file            the file, streamed, Content-Length set, hashed on the way
//! PATCH  /v2/images/<id>                 only when md5/sha256 were computed while streaming
//! GET    /v2/images/<id>                 until status is active (Glance is usually there already)
//! ```
//!
//! The image id is a UUID we choose and send with the create. Glance accepts it, and it means
//! that when the create's answer is lost (timeout, connection reset, a 500 after the row was
//! written) we still know which image to delete. The id in the create's answer is the one
//! used afterwards; images are never looked up by name (names repeat).
//!
//! # Nothing leaks
//!
//! On any failure after the create was sent, the image is deleted before the error is
//! returned; a 415 (data not matching `disk_format`) leaves the rejected data in Glance's
//! store, and only a delete removes it. When that delete fails too (the cloud is down), the
//! id is remembered and the delete retried at the start of every later call of this driver.
//! When the create itself got no answer, the image may appear only after we gave up on it, so
//! its delete is retried for a minute even while it answers 404; a create that never left
//! (no connection) needs no cleanup at all. The list lives in the driver object: a daemon
//! that exits or re-creates its drivers (configuration reload) forgets it, and the janitor's
//! leak detection ([`ProviderDriver::list_images`] by `nodepool_provider_name`) takes over.
//!
//! # Authentication
//!
//! A Keystone token is reused until shortly before its `expires_at`; a 401 from Glance makes
//! the driver authenticate again and repeat the request once (the PUT reopens the file).
//!
//! # TLS
//!
//! Which CAs are trusted (the cloud's `cacert`, `OS_CACERT`, `REQUESTS_CA_BUNDLE`, the system
//! store; `verify: false`/`insecure: true`) is decided in [`trust`], as openstacksdk decides
//! it on Debian; the stores are read once per driver set-up. A rejected server certificate
//! is one line naming the problem and the trusted CAs; nothing was sent, so a create that
//! failed this way leaves nothing to clean up.
//!
//! # Errors
//!
//! One line naming the provider, the image and what the cloud said (`HTTP 415 Unsupported
//! Media Type: Image disk_format qcow2 does not match stream data raw`). Credentials never
//! appear: messages never include request bodies or headers, and every message passes
//! through `OpenStackDriver::scrub`, which replaces any credential of the cloud entry and
//! the current token with `<redacted>` as a last line of defence.

pub mod clouds;
pub(crate) mod http;
mod keystone;
pub mod trust;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use md5::Digest;
use serde_json::{Value, json};

use self::clouds::{CloudConfig, SearchEnv, Secret};
use self::http::{Body, Http, Reply, TransportError, describe_status, query_encode, status_kind};
use self::keystone::Session;
use self::trust::TrustStores;
use super::{CloudImage, ErrorKind, ProviderDriver, ProviderError, UploadRequest, Uploaded};
use crate::config;

pub use self::keystone::{parse_timestamp, unversioned};

/// Longest wait for one small API call (create, patch, get, delete, list page).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the delete after a failed upload may take.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the delete of an image whose create had an unknown outcome is retried.
const UNCERTAIN_CREATE_WINDOW: Duration = Duration::from_secs(60);
/// Images per page of `list_images` (Glance's own maximum is usually 1000).
const DEFAULT_LIST_PAGE_SIZE: u32 = 100;
/// The format when neither the provider nor the cloud says.
pub const DEFAULT_IMAGE_FORMAT: &str = "qcow2";
/// Pause between two status polls, at most.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Read size when streaming the file.
const STREAM_CHUNK: usize = 1 << 20;
/// Image attributes that are not properties (left out of [`CloudImage::properties`]).
const NOT_PROPERTIES: [&str; 5] = ["id", "name", "self", "file", "schema"];

/// One OpenStack provider.
pub struct OpenStackDriver {
    name: String,
    /// The logger of this provider, `nodepool.OpenStackAdapter.<name>` as upstream's.
    log_target: String,
    image_format: String,
    http: Http,
    session: Session,
    /// Images whose delete after a failed upload did not go through; retried by every call.
    pending_deletes: Mutex<Vec<PendingDelete>>,
    /// Images per page of `list_images`.
    list_page_size: u32,
}

impl OpenStackDriver {
    /// Reads the provider's cloud from `clouds_yaml` (and a `secure.yaml` next to it), or
    /// from the files openstacksdk would find (see [`clouds`]); trusts CAs as [`trust`] says,
    /// reading them for this driver alone.
    pub fn new(
        provider: &config::Provider,
        clouds_yaml: Option<&Path>,
    ) -> Result<OpenStackDriver, ProviderError> {
        OpenStackDriver::new_in(
            provider,
            clouds_yaml,
            &Arc::new(TrustStores::from_process()),
        )
    }

    /// [`OpenStackDriver::new`] for one driver of a set-up whose providers share `stores`.
    pub fn new_in(
        provider: &config::Provider,
        clouds_yaml: Option<&Path>,
        stores: &Arc<TrustStores>,
    ) -> Result<OpenStackDriver, ProviderError> {
        let config::Driver::OpenStack {
            cloud,
            region_name,
            image_format,
        } = &provider.driver
        else {
            return Err(ProviderError::new(
                ErrorKind::Config,
                format!("provider {}: not an openstack provider", provider.name),
            ));
        };
        let (clouds_file, secure_file) = match clouds_yaml {
            Some(path) => {
                let secure = path
                    .parent()
                    .map(|dir| dir.join("secure.yaml"))
                    .filter(|p| p.is_file());
                (path.to_path_buf(), secure)
            }
            None => {
                let found = clouds::locate(&SearchEnv::from_process());
                let Some(clouds_file) = found.clouds else {
                    let searched: Vec<String> = found
                        .searched
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect();
                    return Err(ProviderError::new(
                        ErrorKind::Config,
                        format!(
                            "provider {}: no clouds.yaml found (looked for {})",
                            provider.name,
                            searched.join(", ")
                        ),
                    ));
                };
                (clouds_file, found.secure)
            }
        };
        let cloud = clouds::load(
            &clouds_file,
            secure_file.as_deref(),
            cloud,
            region_name.as_deref(),
        )
        .map_err(|e| {
            ProviderError::new(e.kind, format!("provider {}: {}", provider.name, e.message))
        })?;
        OpenStackDriver::with_cloud(provider, cloud, image_format.clone(), stores)
    }

    /// A driver for an already loaded cloud entry.
    pub fn with_cloud(
        provider: &config::Provider,
        cloud: CloudConfig,
        image_format: Option<String>,
        stores: &Arc<TrustStores>,
    ) -> Result<OpenStackDriver, ProviderError> {
        let image_format = image_format
            .or_else(|| cloud.image_format.clone())
            .unwrap_or_else(|| DEFAULT_IMAGE_FORMAT.to_string());
        let trust = stores.trust_for(&cloud).map_err(|e| {
            ProviderError::new(e.kind, format!("provider {}: {}", provider.name, e.message))
        })?;
        let http = Http::new(trust, provider.rate);
        Ok(OpenStackDriver {
            name: provider.name.clone(),
            log_target: format!("{}.{}", crate::logging::names::OPENSTACK, provider.name),
            image_format,
            http,
            session: Session::new(cloud),
            pending_deletes: Mutex::new(Vec::new()),
            list_page_size: DEFAULT_LIST_PAGE_SIZE,
        })
    }

    /// Sets how many images `list_images` asks for per page (at least 1); tests use small
    /// pages to exercise the paging.
    pub fn with_list_page_size(mut self, images: u32) -> OpenStackDriver {
        self.list_page_size = images.max(1);
        self
    }

    /// The cloud entry this driver uses.
    pub fn cloud(&self) -> &CloudConfig {
        self.session.cloud()
    }

    /// Ids of images whose delete after a failed upload is still to be retried.
    pub fn pending_deletes(&self) -> Vec<String> {
        let pending = self
            .pending_deletes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pending.iter().map(|p| p.id.clone()).collect()
    }

    /// Replaces every credential in `error`'s message with `<redacted>`.
    fn scrub(&self, mut error: ProviderError) -> ProviderError {
        let mut secrets = self.session.cloud().secrets();
        if let Some(token) = self.session.peek().and_then(|c| c.token) {
            secrets.push(token.expose().to_string());
        }
        for secret in secrets.iter().filter(|s| s.len() >= 3) {
            if error.message.contains(secret.as_str()) {
                error.message = error.message.replace(secret.as_str(), "<redacted>");
            }
        }
        error
    }

    /// Sends one request to the image API (`path` starts with `/v2/`) with a current token,
    /// authenticating again and retrying once after a 401. `make_body` is called for each
    /// attempt. Returns the answer whatever its status.
    fn call(
        &self,
        method: &str,
        path: &str,
        timeout: Duration,
        make_body: &mut dyn FnMut() -> Result<Body, ProviderError>,
        context: &dyn Fn() -> String,
    ) -> Result<Reply, ProviderError> {
        self.call_detailed(method, path, timeout, make_body, context)
            .map_err(|(error, _maybe_sent)| error)
    }

    /// [`OpenStackDriver::call`], whose error also says whether the request may have reached
    /// the cloud (false when no connection was made, or authentication failed first).
    fn call_detailed(
        &self,
        method: &str,
        path: &str,
        timeout: Duration,
        make_body: &mut dyn FnMut() -> Result<Body, ProviderError>,
        context: &dyn Fn() -> String,
    ) -> Result<Reply, (ProviderError, bool)> {
        let deadline = Instant::now() + timeout;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let credentials = self
                .session
                .current(&self.http, left.min(CALL_TIMEOUT))
                .map_err(|e| {
                    let message = format!("provider {}: {}: {}", self.name, context(), e.message);
                    (ProviderError::new(e.kind, message), attempt > 1)
                })?;
            let url = format!("{}{path}", credentials.endpoint);
            let token = credentials.token.as_ref().map(Secret::expose);
            let left = deadline.saturating_duration_since(Instant::now());
            let body = make_body().map_err(|e| (e, attempt > 1))?;
            let reply = self
                .http
                .send(method, &url, token, body, left)
                .map_err(|e| {
                    let maybe_sent = e.maybe_sent || attempt > 1;
                    (self.transport(context, e), maybe_sent)
                })?;
            if reply.status == 401 && attempt == 1 && self.session.uses_keystone() {
                log::debug!(
                    target: &self.log_target,
                    "provider {}: {method} {path}: 401; authenticating again",
                    self.name
                );
                if let Some(rejected) = &credentials.token {
                    self.session.invalidate(rejected);
                }
                continue;
            }
            return Ok(reply);
        }
    }

    /// A simple call without a body, or with a JSON body.
    fn call_simple(
        &self,
        method: &str,
        path: &str,
        json_body: Option<(&'static str, Vec<u8>)>,
        timeout: Duration,
        context: &dyn Fn() -> String,
    ) -> Result<Reply, ProviderError> {
        let mut make_body = || {
            Ok(match &json_body {
                None => Body::None,
                Some((content_type, data)) => Body::Bytes {
                    content_type,
                    data: data.clone(),
                },
            })
        };
        self.call(method, path, timeout, &mut make_body, context)
    }

    fn transport(&self, context: &dyn Fn() -> String, e: TransportError) -> ProviderError {
        ProviderError::new(
            e.kind(),
            format!("provider {}: {}: {}", self.name, context(), e.message),
        )
    }

    fn status_error(
        &self,
        context: &dyn Fn() -> String,
        what: &str,
        reply: &Reply,
    ) -> ProviderError {
        ProviderError::new(
            status_kind(reply.status),
            format!(
                "provider {}: {}: {what}: {}",
                self.name,
                context(),
                describe_status(reply)
            ),
        )
    }

    /// Retries the deletes that failed earlier; keeps those that fail again, and those of
    /// creates with an unknown outcome that may still appear.
    fn retry_pending_deletes(&self) {
        let pending = std::mem::take(
            &mut *self
                .pending_deletes
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for entry in pending {
            let id = &entry.id;
            match self.delete_image(id, DISCARD_TIMEOUT) {
                Ok(true) => {
                    log::info!(
                        target: &self.log_target,
                        "provider {}: deleted image {id} left behind by a failed upload",
                        self.name
                    )
                }
                Ok(false) if entry.uncertain && entry.since.elapsed() < UNCERTAIN_CREATE_WINDOW => {
                    self.remember_pending(entry)
                }
                Ok(false) => {}
                Err(e) => {
                    log::warn!(
                        target: &self.log_target,
                        "provider {}: image {id} left behind by a failed upload: {}",
                        self.name,
                        e.message
                    );
                    self.remember_pending(entry);
                }
            }
        }
    }

    fn remember_pending(&self, entry: PendingDelete) {
        let mut pending = self
            .pending_deletes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !pending.iter().any(|p| p.id == entry.id) {
            pending.push(entry);
        }
    }

    /// Deletes the image of a failed upload; returns a note for the error message.
    fn discard(&self, id: &str) -> String {
        match self.delete_image(id, DISCARD_TIMEOUT) {
            Ok(_) => format!(" (image {id} deleted)"),
            Err(e) => {
                self.remember_pending(PendingDelete {
                    id: id.to_string(),
                    since: Instant::now(),
                    uncertain: false,
                });
                log::warn!(
                    target: &self.log_target,
                    "provider {}: cannot delete image {id} of a failed upload: {}",
                    self.name,
                    e.message
                );
                format!(
                    " (image {id} could not be deleted and will be retried: {})",
                    e.message
                )
            }
        }
    }

    /// Like [`OpenStackDriver::discard`], for a create whose answer was lost: the image may
    /// not exist yet (the cloud may still be working on the create), so a 404 is not the end
    /// of it; the delete is retried by later calls for [`UNCERTAIN_CREATE_WINDOW`].
    fn discard_uncertain(&self, id: &str) -> String {
        if let Ok(true) = self.delete_image(id, DISCARD_TIMEOUT) {
            return format!(" (image {id} deleted)");
        }
        self.remember_pending(PendingDelete {
            id: id.to_string(),
            since: Instant::now(),
            uncertain: true,
        });
        format!(" (image {id} may have been created; its delete will be retried)")
    }

    /// Deletes an image; `Ok(false)` when it did not exist.
    fn delete_image(&self, id: &str, timeout: Duration) -> Result<bool, ProviderError> {
        check_id(&self.name, id)?;
        let context = || format!("delete image {id}");
        let reply = self.call_simple(
            "DELETE",
            &format!("/v2/images/{id}"),
            None,
            timeout,
            &context,
        )?;
        match reply.status {
            200..=299 => Ok(true),
            404 => Ok(false),
            _ => Err(self.status_error(&context, "DELETE", &reply)),
        }
    }

    fn upload_inner(&self, req: &UploadRequest) -> Result<Uploaded, ProviderError> {
        let deadline = Instant::now() + req.timeout;
        let context = || format!("upload of image {} ({})", req.external_name, req.image_name);
        let io_error = |what: &str, e: io::Error| {
            ProviderError::new(
                ErrorKind::Io,
                format!(
                    "provider {}: {}: {what} {}: {e}",
                    self.name,
                    context(),
                    req.file.display()
                ),
            )
        };
        let size = std::fs::metadata(&req.file)
            .map_err(|e| io_error("cannot read", e))?
            .len();

        let our_id = uuid::Uuid::new_v4().hyphenated().to_string();
        let create = self.create_body(req, &our_id);
        let create = create.to_string().into_bytes();
        let mut make_body = || {
            Ok(Body::Bytes {
                content_type: "application/json",
                data: create.clone(),
            })
        };
        let created = self.call_detailed(
            "POST",
            "/v2/images",
            left(deadline).min(CALL_TIMEOUT),
            &mut make_body,
            &context,
        );
        let id = match created {
            Ok(reply) if reply.status == 201 || reply.status == 200 => {
                let json = reply.json().unwrap_or(Value::Null);
                match json["id"].as_str() {
                    Some(id) if check_id(&self.name, id).is_ok() => id.to_string(),
                    _ => {
                        let note = self.discard(&our_id);
                        return Err(ProviderError::new(
                            ErrorKind::Server,
                            format!(
                                "provider {}: {}: the create answer has no image id{note}",
                                self.name,
                                context()
                            ),
                        ));
                    }
                }
            }
            Ok(reply) => {
                let error = self.status_error(&context, "create", &reply);
                // A 5xx may come after the image was written (real-services b.2).
                let note = if reply.status >= 500 {
                    self.discard(&our_id)
                } else {
                    String::new()
                };
                return Err(ProviderError::new(error.kind, error.message + &note));
            }
            // Nothing reached the cloud: nothing to clean up.
            Err((e, false)) => return Err(e),
            Err((e, true)) => {
                // The create may have arrived even though its answer did not.
                let note = self.discard_uncertain(&our_id);
                return Err(ProviderError::new(e.kind, e.message + &note));
            }
        };
        log::debug!(
            target: &self.log_target,
            "provider {}: created image {id} for {}",
            self.name,
            req.external_name
        );

        match self.fill_image(req, &id, size, deadline, &context) {
            Ok(()) => Ok(Uploaded { external_id: id }),
            Err(e) => {
                let note = self.discard(&id);
                Err(ProviderError::new(e.kind, e.message + &note))
            }
        }
    }

    /// `POST /v2/images` body: the request's properties as strings, then our fields.
    fn create_body(&self, req: &UploadRequest, id: &str) -> Value {
        let mut body = serde_json::Map::new();
        for (key, value) in &req.properties {
            body.insert(key.clone(), Value::String(value.clone()));
        }
        body.insert(
            "owner_specified.openstack.md5".into(),
            json!(req.md5.clone().unwrap_or_default()),
        );
        body.insert(
            "owner_specified.openstack.sha256".into(),
            json!(req.sha256.clone().unwrap_or_default()),
        );
        body.insert(
            "owner_specified.openstack.object".into(),
            json!(format!("images/{}", req.external_name)),
        );
        body.insert("id".into(), json!(id));
        body.insert("name".into(), json!(req.external_name));
        body.insert("disk_format".into(), json!(req.format));
        body.insert("container_format".into(), json!("bare"));
        body.insert("visibility".into(), json!("private"));
        Value::Object(body)
    }

    /// Uploads the data, records computed checksums, waits for `active` and checks what
    /// Glance received.
    fn fill_image(
        &self,
        req: &UploadRequest,
        id: &str,
        size: u64,
        deadline: Instant,
        context: &dyn Fn() -> String,
    ) -> Result<(), ProviderError> {
        let hashes = std::sync::Arc::new(Mutex::new(None::<Hashes>));
        let want_sha256 = req.sha256.is_none();
        let mut make_body = || {
            let file = File::open(&req.file).map_err(|e| {
                ProviderError::new(
                    ErrorKind::Io,
                    format!(
                        "provider {}: {}: cannot open {}: {e}",
                        self.name,
                        context(),
                        req.file.display()
                    ),
                )
            })?;
            req.progress.start(size);
            let reader = HashingReader::new(file, want_sha256, hashes.clone())
                .counting(std::sync::Arc::clone(&req.progress));
            Ok(Body::Stream {
                content_type: "application/octet-stream",
                len: size,
                reader: Box::new(reader),
            })
        };
        let reply = self.call(
            "PUT",
            &format!("/v2/images/{id}/file"),
            left(deadline),
            &mut make_body,
            context,
        )?;
        match reply.status {
            200..=299 => {}
            // The image already has data (a retried request): check below what it got.
            409 => log::debug!(
                target: &self.log_target,
                "provider {}: image {id} already has data (409)",
                self.name
            ),
            _ => return Err(self.status_error(context, "PUT data", &reply)),
        }
        let hashes = hashes.lock().unwrap_or_else(|e| e.into_inner()).take();
        let hashes = hashes.filter(|h| h.bytes == size).map(Hashes::finish);

        if let Some(computed) = &hashes {
            let mut patch = Vec::new();
            if req.md5.is_none() {
                patch.push(json!({ "op": "add", "path": "/owner_specified.openstack.md5", "value": computed.md5 }));
            }
            if let (None, Some(sha256)) = (&req.sha256, &computed.sha256) {
                patch.push(json!({ "op": "add", "path": "/owner_specified.openstack.sha256", "value": sha256 }));
            }
            if !patch.is_empty() {
                let reply = self.call_simple(
                    "PATCH",
                    &format!("/v2/images/{id}"),
                    Some((
                        "application/openstack-images-v2.1-json-patch",
                        Value::Array(patch).to_string().into_bytes(),
                    )),
                    left(deadline).min(CALL_TIMEOUT),
                    context,
                )?;
                if !reply.is_success() {
                    return Err(self.status_error(context, "PATCH checksums", &reply));
                }
            }
        }

        let image = self.wait_active(id, deadline, context)?;
        if let Some(got) = image["size"].as_u64()
            && got != size
        {
            return Err(ProviderError::new(
                ErrorKind::Io,
                format!(
                    "provider {}: {}: Glance stored {got} bytes of {size}",
                    self.name,
                    context()
                ),
            ));
        }
        if let (Some(computed), Some(checksum)) = (&hashes, image["checksum"].as_str())
            && !checksum.eq_ignore_ascii_case(&computed.md5)
        {
            return Err(ProviderError::new(
                ErrorKind::Io,
                format!(
                    "provider {}: {}: Glance's checksum {checksum} differs from the file's md5 {}",
                    self.name,
                    context(),
                    computed.md5
                ),
            ));
        }
        Ok(())
    }

    /// Polls the image until it is `active`; `killed`, `deleted` or the deadline end it.
    fn wait_active(
        &self,
        id: &str,
        deadline: Instant,
        context: &dyn Fn() -> String,
    ) -> Result<Value, ProviderError> {
        let mut pause = Duration::ZERO;
        let mut last_status = String::from("unknown");
        loop {
            if !pause.is_zero() {
                let now = Instant::now();
                if now + pause >= deadline {
                    return Err(ProviderError::new(
                        ErrorKind::Timeout,
                        format!(
                            "provider {}: {}: image {id} not active within the upload timeout (status {last_status})",
                            self.name,
                            context()
                        ),
                    ));
                }
                std::thread::sleep(pause);
            }
            pause = (pause * 2).clamp(Duration::from_millis(250), MAX_POLL_INTERVAL);
            let reply = self.call_simple(
                "GET",
                &format!("/v2/images/{id}"),
                None,
                left(deadline).min(CALL_TIMEOUT),
                context,
            )?;
            if !reply.is_success() {
                return Err(self.status_error(context, "GET image", &reply));
            }
            let image = reply.json().map_err(|e| {
                ProviderError::new(
                    ErrorKind::Server,
                    format!("provider {}: {}: GET image: {e}", self.name, context()),
                )
            })?;
            let status = image["status"].as_str().unwrap_or("").to_string();
            match status.as_str() {
                "active" => return Ok(image),
                "killed" | "deleted" | "pending_delete" | "deactivated" => {
                    return Err(ProviderError::new(
                        ErrorKind::Server,
                        format!(
                            "provider {}: {}: image {id} went to status {status}",
                            self.name,
                            context()
                        ),
                    ));
                }
                _ => last_status = status,
            }
        }
    }

    fn list_inner(&self) -> Result<Vec<CloudImage>, ProviderError> {
        let context = || "list images".to_string();
        let base = "/v2/images";
        let mut query = format!(
            "nodepool_provider_name={}&limit={}",
            query_encode(&self.name),
            self.list_page_size
        );
        let mut images = Vec::new();
        for _page in 0..10_000 {
            let reply = self.call_simple(
                "GET",
                &format!("{base}?{query}"),
                None,
                CALL_TIMEOUT,
                &context,
            )?;
            if !reply.is_success() {
                return Err(self.status_error(&context, "GET", &reply));
            }
            let json = reply.json().map_err(|e| {
                ProviderError::new(
                    ErrorKind::Server,
                    format!("provider {}: list images: {e}", self.name),
                )
            })?;
            for image in json["images"].as_array().into_iter().flatten() {
                images.push(cloud_image(image));
            }
            // `next` is a path relative to the server root; keep only its query, so an
            // endpoint with a path prefix still works.
            match json["next"].as_str().and_then(|next| next.split_once('?')) {
                Some((_, next_query)) if next_query != query => query = next_query.to_string(),
                _ => return Ok(images),
            }
        }
        Ok(images)
    }
}

impl ProviderDriver for OpenStackDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn image_format(&self) -> &str {
        &self.image_format
    }

    fn upload(&self, req: &UploadRequest) -> Result<Uploaded, ProviderError> {
        self.retry_pending_deletes();
        let started = Instant::now();
        let result = self.upload_inner(req).map_err(|e| self.scrub(e));
        if let Ok(uploaded) = &result {
            log::debug!(
                target: &self.log_target,
                "provider {}: uploaded {} as image {} in {:.1?}",
                self.name,
                req.external_name,
                uploaded.external_id,
                started.elapsed()
            );
        }
        result
    }

    fn delete(&self, external_id: &str) -> Result<(), ProviderError> {
        self.retry_pending_deletes();
        self.delete_image(external_id, CALL_TIMEOUT)
            .map(|_existed| ())
            .map_err(|e| self.scrub(e))
    }

    fn list_images(&self) -> Result<Vec<CloudImage>, ProviderError> {
        self.retry_pending_deletes();
        self.list_inner().map_err(|e| self.scrub(e))
    }
}

/// An image to delete on the next call of the driver.
struct PendingDelete {
    id: String,
    since: Instant,
    /// Its create's answer was lost: a 404 may only mean "not created yet".
    uncertain: bool,
}

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Image ids go into URL paths: only UUID-like characters are accepted.
fn check_id(provider: &str, id: &str) -> Result<(), ProviderError> {
    if !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        Ok(())
    } else {
        Err(ProviderError::new(
            ErrorKind::NotFound,
            format!("provider {provider}: {id:?} is not an image id"),
        ))
    }
}

fn cloud_image(image: &Value) -> CloudImage {
    let mut properties = BTreeMap::new();
    if let Some(map) = image.as_object() {
        for (key, value) in map {
            if let (false, Some(text)) = (NOT_PROPERTIES.contains(&key.as_str()), value.as_str()) {
                properties.insert(key.clone(), text.to_string());
            }
        }
    }
    CloudImage {
        id: image["id"].as_str().unwrap_or_default().to_string(),
        name: image["name"].as_str().unwrap_or_default().to_string(),
        properties,
    }
}

/// md5 (always) and sha256 (when asked) of everything read through a [`HashingReader`].
struct Hashes {
    bytes: u64,
    md5: md5::Md5,
    sha256: Option<sha2::Sha256>,
}

/// Final hex digests.
struct Computed {
    md5: String,
    sha256: Option<String>,
}

impl Hashes {
    fn finish(self) -> Computed {
        Computed {
            md5: hex(&self.md5.finalize()),
            sha256: self.sha256.map(|s| hex(&s.finalize())),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes the file while ureq streams it; the result lands in the shared slot when the
/// reader is dropped (after the request, whatever its outcome).
struct HashingReader {
    file: File,
    hashes: Option<Hashes>,
    slot: std::sync::Arc<Mutex<Option<Hashes>>>,
    /// Where the bytes read are counted for the progress lines.
    progress: Option<std::sync::Arc<crate::progress::ByteCount>>,
}

impl HashingReader {
    fn new(file: File, sha256: bool, slot: std::sync::Arc<Mutex<Option<Hashes>>>) -> HashingReader {
        let hashes = Hashes {
            bytes: 0,
            md5: md5::Md5::new(),
            sha256: sha256.then(sha2::Sha256::new),
        };
        HashingReader {
            file,
            hashes: Some(hashes),
            slot,
            progress: None,
        }
    }

    /// Also counts the bytes read in `progress`.
    fn counting(mut self, progress: std::sync::Arc<crate::progress::ByteCount>) -> HashingReader {
        self.progress = Some(progress);
        self
    }
}

impl Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limit = buf.len().min(STREAM_CHUNK);
        let n = self.file.read(&mut buf[..limit])?;
        if let Some(h) = &mut self.hashes {
            h.bytes += n as u64;
            h.md5.update(&buf[..n]);
            if let Some(sha) = &mut h.sha256 {
                sha.update(&buf[..n]);
            }
        }
        if let Some(p) = &self.progress {
            p.add(n as u64);
        }
        Ok(n)
    }
}

impl Drop for HashingReader {
    fn drop(&mut self) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = self.hashes.take();
    }
}
