//! The aws driver: image uploads to Amazon EC2 as nodepool 11's aws adapter makes them, so
//! that nodepool's launcher finds the AMIs and our janitor recognises them.
//!
//! # An `ebs-direct` upload on the wire
//!
//! ```text
//! POST ebs  /snapshots                      StartSnapshot: size in GiB, ClientToken, tags
//! PUT  ebs  /snapshots/<id>/blocks/<n>      PutSnapshotBlock: 512 KiB, SHA-256, 4 in flight
//! POST ebs  /snapshots/completion/<id>      CompleteSnapshot, until "completed"
//! POST ec2  Action=RegisterImage            the snapshot as /dev/sda1, hvm, tags
//! POST ec2  Action=CreateTags               the same tags on the AMI once more
//! ```
//!
//! The AMI and its snapshot carry the request's properties as tags: `nodepool_build_id`,
//! `nodepool_upload_id`, `nodepool_provider_name` and the diskimage `metadata` and provider
//! diskimage `tags` (upstream's `meta`), the same keys nodepool 11 writes. The AMI's name is
//! the upload's external name (`{image_name}-{timestamp}` unless `image-name-format` says
//! otherwise; nodepool 11 fixes it for aws). The AMI id is the upload's `external_id`.
//! `CreateTags` after `RegisterImage` is our addition: AWS applies the `TagSpecifications`
//! already, but EC2 stand-ins (moto, which the tests use) drop them, and an AMI without its
//! tags is one nobody's leak detection finds; a failed `CreateTags` fails the upload.
//! Details and the deliberate differences (all-zero blocks are not sent) are in [`ebs`].
//!
//! Blocks go out from [`BLOCK_WORKERS`] threads (`ebs-put-N`, started through
//! `crate::thread` for this one upload and joined before it returns), fed through a bounded
//! channel, so memory stays at a few MiB whatever the image size. A failed block is retried
//! twice (throttling, 5xx, a broken connection), as upstream's uploader does.
//!
//! # `snapshot` and `image` imports
//!
//! ```text
//! S3   POST/PUT/POST <bucket>/<name>.<format>   multipart upload, see [`s3`]
//! POST ec2  Action=ImportSnapshot              (image: ImportImage) the object, task tags
//! POST ec2  Action=DescribeImportSnapshotTasks until completed or deleted, 1 s .. 30 s apart
//! DELETE S3 <bucket>/<name>.<format>           whatever the outcome
//! POST ec2  Action=CreateTags                  the snapshot (image: the AMI and its snapshot)
//! POST ec2  Action=RegisterImage, CreateTags   snapshot only, as for ebs-direct
//! ```
//!
//! As upstream: `ResourceCountLimitExceeded` (too many imports) is retried every 30 s, the
//! import task carries the tags, and the imported snapshot and AMI are tagged afterwards
//! (EC2 does not); the volume size is `volume-size`, else the imported snapshot's. Unlike
//! upstream, a failed tagging fails the upload and removes what the import made (an untagged
//! AMI is one leak detection never finds), an import still running at the upload's deadline
//! is cancelled (`CancelImportTask`), and the first poll comes after 1 s, not 30 s.
//!
//! # Nothing leaks
//!
//! A failure after `StartSnapshot` (or after an import made a snapshot) deletes the snapshot; a failed `RegisterImage` first
//! deregisters any AMI tagged with this upload's ids (the answer may have been lost after
//! the AMI was made). What cannot be deleted then (the cloud is down) is left to the
//! janitor: [`ProviderDriver::list_images`] lists our AMIs by `nodepool_provider_name`, and
//! our snapshots that no listed AMI uses (their id is `snap-…`), and the janitor deletes
//! those whose build and upload have no record. [`ProviderDriver::delete`] deregisters the
//! AMI and then deletes its snapshots: the ones its block device mapping names and ours
//! tagged with the same build and upload ids (a stand-in may map a snapshot of its own); a
//! `snap-…` id deletes just the snapshot. What is already gone counts as deleted. A snapshot
//! counts as used (not listed) when an AMI maps it or carries its build and upload ids.
//!
//! # Rate
//!
//! nodepool's aws `rate` is calls per second (default 2); the config turns it into our
//! seconds between calls. It spaces the EC2 calls and `StartSnapshot`/`CompleteSnapshot`,
//! not the block writes (upstream does not limit those either).
//!
//! # Credentials
//!
//! Found for each operation by [`credentials`] (environment, shared files, profiles); a
//! missing credential fails that upload with a message naming where it looked. Signing is
//! [`sigv4`]. No message contains a secret: requests and their headers are never logged or
//! quoted, and every message passes through `scrub`.

pub mod credentials;
pub mod ebs;
pub mod ec2;
pub mod s3;
pub mod sigv4;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use self::credentials::{AwsEnv, Credentials};
use self::ebs::{Block, Completion};
use super::openstack::http::{Body, Http, Reply, status_kind};
use super::openstack::trust::{DriverTrust, TrustStores};
use super::{CloudImage, ErrorKind, ProviderDriver, ProviderError, UploadRequest, Uploaded};
use crate::config::{self, AwsImage, AwsImportMethod};

/// Threads writing snapshot blocks during one `ebs-direct` upload.
pub const BLOCK_WORKERS: usize = 4;
/// Attempts per block (upstream: 3).
const BLOCK_ATTEMPTS: u32 = 3;
/// Longest wait for one API call.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the clean-up after a failed upload may take.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest pause between two `CompleteSnapshot` polls.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(10);
/// Longest pause between two polls of an import task (upstream waits 30 s before each).
const MAX_IMPORT_POLL: Duration = Duration::from_secs(30);
/// Pause before asking again when too many imports run (upstream's `IMAGE_UPLOAD_SLEEP`).
const IMPORT_LIMIT_PAUSE: Duration = Duration::from_secs(30);
/// The tag every image and snapshot of this provider carries.
const PROVIDER_TAG: &str = "nodepool_provider_name";

/// One aws provider.
pub struct AwsDriver {
    name: String,
    log_target: String,
    image_format: String,
    region: String,
    profile_name: Option<String>,
    bucket_name: Option<String>,
    images: BTreeMap<String, AwsImage>,
    env: AwsEnv,
    api: Arc<Api>,
}

/// The endpoints and HTTP clients, shared with the block writers.
struct Api {
    region: String,
    ec2: String,
    ebs: String,
    s3: String,
    /// Path-style S3 URLs (a configured endpoint) rather than virtual-hosted ones.
    s3_path_style: bool,
    /// Rate-limited: EC2 calls, StartSnapshot, CompleteSnapshot.
    calls: Http,
    /// Unlimited: PutSnapshotBlock.
    blocks: Http,
}

/// How a finished import task ended (`wait_import` returns only finished tasks).
enum Imported {
    /// Its snapshot, and for an image import its AMI.
    Done {
        snapshot_id: String,
        image_id: Option<String>,
    },
    /// EC2's status message.
    Failed(String),
}

impl AwsDriver {
    /// The driver for `provider` in this process's environment.
    pub fn new(
        provider: &config::Provider,
        stores: &Arc<TrustStores>,
    ) -> Result<AwsDriver, ProviderError> {
        AwsDriver::with_env(provider, AwsEnv::from_process(), stores)
    }

    /// The driver for `provider` in `env` (endpoints are read now, credentials per call).
    pub fn with_env(
        provider: &config::Provider,
        env: AwsEnv,
        stores: &Arc<TrustStores>,
    ) -> Result<AwsDriver, ProviderError> {
        let config::Driver::Aws {
            region_name,
            profile_name,
            image_format,
            bucket_name,
        } = &provider.driver
        else {
            return Err(ProviderError::new(
                ErrorKind::Config,
                format!("provider {}: not an aws provider", provider.name),
            ));
        };
        let trust = || DriverTrust::System(stores.clone());
        let api = Api {
            region: region_name.clone(),
            ec2: env.endpoint("ec2", region_name),
            ebs: env.endpoint("ebs", region_name),
            s3: env.endpoint("s3", region_name),
            s3_path_style: env.has_endpoint("s3"),
            calls: Http::new(trust(), provider.rate),
            blocks: Http::new(trust(), 0.0),
        };
        Ok(AwsDriver {
            name: provider.name.clone(),
            log_target: format!("{}.{}", crate::logging::names::AWS, provider.name),
            image_format: image_format.clone(),
            region: region_name.clone(),
            profile_name: profile_name.clone(),
            bucket_name: bucket_name.clone(),
            images: provider
                .diskimages
                .iter()
                .filter_map(|d| d.aws.clone().map(|a| (d.name.clone(), a)))
                .collect(),
            env,
            api: Arc::new(api),
        })
    }

    fn error(&self, kind: ErrorKind, message: impl AsRef<str>) -> ProviderError {
        ProviderError::new(
            kind,
            format!("provider {}: {}", self.name, message.as_ref()),
        )
    }

    /// The credentials for one operation (`context` names it in the error).
    fn credentials(&self, context: &str) -> Result<Credentials, ProviderError> {
        self.env
            .credentials(self.profile_name.as_deref())
            .map_err(|e| self.error(ErrorKind::Auth, format!("{context}: {e}")))
    }
}

/// Replaces every secret of `creds` in `message` (a last line of defence).
fn scrub(message: String, creds: &Credentials) -> String {
    creds
        .secrets()
        .into_iter()
        .filter(|s| s.len() >= 4)
        .fold(message, |m, s| m.replace(s, "<redacted>"))
}

/// What went wrong in one call.
#[derive(Debug)]
struct CallError {
    kind: ErrorKind,
    /// EC2's error code, when it sent one.
    code: Option<String>,
    message: String,
    /// Whether the cloud may have acted on the request.
    maybe_sent: bool,
    retryable: bool,
}

impl CallError {
    /// The cloud answered, but not with what the call needs (an answer we cannot read, or
    /// one reporting a failure): it may have acted, and asking again will not help.
    fn bad_answer(message: String) -> CallError {
        CallError {
            kind: ErrorKind::Server,
            code: None,
            message,
            maybe_sent: true,
            retryable: false,
        }
    }
}

impl Api {
    /// Signs and sends one request to `endpoint`.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        http: &Http,
        service: &'static str,
        endpoint: &str,
        creds: &Credentials,
        method: &str,
        (path, query): (&str, &[(String, String)]),
        mut headers: Vec<(String, String)>,
        body: Vec<u8>,
        content_type: &'static str,
        payload_sha256: &str,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let (scheme_host, base) = split_endpoint(endpoint);
        let host = scheme_host
            .split_once("://")
            .map_or(scheme_host, |(_, h)| h);
        let path = format!("{base}{path}");
        let signed = sigv4::sign(
            &sigv4::Request {
                method,
                host,
                path: &path,
                query,
                headers: &headers,
                payload_sha256,
            },
            sigv4::Scope {
                region: &self.region,
                service,
            },
            creds,
            SystemTime::now(),
        );
        headers.extend(signed.headers);
        headers.push(("Host".into(), host.to_string()));
        let url = if query.is_empty() {
            format!("{scheme_host}{path}")
        } else {
            format!("{scheme_host}{path}?{}", sigv4::canonical_query(query))
        };
        let body = if body.is_empty() && method != "POST" {
            Body::None
        } else {
            Body::Bytes {
                content_type,
                data: body,
            }
        };
        http.send_with(method, &url, &headers, body, timeout)
            .map_err(|e| CallError {
                kind: e.kind(),
                code: None,
                retryable: !e.timed_out && e.certificate.is_none(),
                maybe_sent: e.maybe_sent,
                message: scrub(e.message, creds),
            })
    }

    /// One EC2 Query API action; the answer's XML on success.
    fn ec2(
        &self,
        creds: &Credentials,
        action: &str,
        params: &[(String, String)],
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let body = ec2::form(action, params).into_bytes();
        let hash = sigv4::sha256_hex(&body);
        let reply = self.send(
            &self.calls,
            "ec2",
            &self.ec2,
            creds,
            "POST",
            ("/", &[]),
            Vec::new(),
            body,
            "application/x-www-form-urlencoded; charset=utf-8",
            &hash,
            timeout.min(CALL_TIMEOUT),
        )?;
        if reply.is_success() {
            return Ok(reply.body);
        }
        let error = ec2::parse_error(&reply.body);
        let kind = match error.as_ref().map(|e| e.code.as_str()) {
            Some(
                "AuthFailure"
                | "UnauthorizedOperation"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch",
            ) => ErrorKind::Auth,
            Some(code) if code.ends_with(".NotFound") => ErrorKind::NotFound,
            _ => status_kind(reply.status),
        };
        let message = match &error {
            Some(e) => format!("{action}: HTTP {} {}: {}", reply.status, e.code, e.message),
            None => format!("{action}: HTTP {}", reply.status),
        };
        Err(CallError {
            kind,
            code: error.map(|e| e.code),
            message: scrub(message, creds),
            maybe_sent: true,
            retryable: reply.status >= 500 || reply.status == 429,
        })
    }

    /// One EBS direct API call; the answer's body on success.
    #[allow(clippy::too_many_arguments)]
    fn ebs(
        &self,
        creds: &Credentials,
        http: &Http,
        what: &str,
        method: &str,
        path: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        content_type: &'static str,
        payload_sha256: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let reply = self.send(
            http,
            "ebs",
            &self.ebs,
            creds,
            method,
            (path, &[]),
            headers,
            body,
            content_type,
            payload_sha256,
            timeout.min(CALL_TIMEOUT),
        )?;
        if reply.is_success() {
            return Ok(reply.body);
        }
        Err(CallError {
            kind: status_kind(reply.status),
            code: None,
            message: scrub(
                format!(
                    "{what}: HTTP {}: {}",
                    reply.status,
                    ebs::error_message(&reply.body)
                ),
                creds,
            ),
            maybe_sent: true,
            retryable: reply.status >= 500 || reply.status == 429,
        })
    }

    /// One S3 call on `bucket`/`key`; the answer on success.
    #[allow(clippy::too_many_arguments)]
    fn s3(
        &self,
        creds: &Credentials,
        what: &str,
        method: &str,
        bucket: &str,
        key: &str,
        query: &[(String, String)],
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        payload_sha256: &str,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let (endpoint, path) = if self.s3_path_style {
            (
                self.s3.clone(),
                format!("/{bucket}/{}", s3::encode_key(key)),
            )
        } else {
            (
                format!("https://{bucket}.s3.{}.amazonaws.com", self.region),
                format!("/{}", s3::encode_key(key)),
            )
        };
        // Parts are the bulk of the data: they are not rate-limited, like EBS blocks.
        let http = if method == "PUT" {
            &self.blocks
        } else {
            &self.calls
        };
        let reply = self.send(
            http,
            "s3",
            &endpoint,
            creds,
            method,
            (&path, query),
            headers,
            body,
            "application/octet-stream",
            payload_sha256,
            timeout.min(CALL_TIMEOUT),
        )?;
        if reply.is_success() {
            return Ok(reply);
        }
        let error = ec2::parse_error(&reply.body);
        let message = match &error {
            Some(e) => format!("{what}: HTTP {} {}: {}", reply.status, e.code, e.message),
            None => format!("{what}: HTTP {}", reply.status),
        };
        Err(CallError {
            kind: status_kind(reply.status),
            code: error.map(|e| e.code),
            message: scrub(message, creds),
            maybe_sent: true,
            retryable: reply.status >= 500 || reply.status == 429,
        })
    }

    /// Writes one block, retrying what may pass on a second try.
    fn put_block(
        &self,
        creds: &Credentials,
        snapshot: &str,
        block: &Block,
        deadline: Instant,
    ) -> Result<(), CallError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CallError {
                    kind: ErrorKind::Timeout,
                    code: None,
                    message: format!("PutSnapshotBlock {}: the upload's time is up", block.index),
                    maybe_sent: false,
                    retryable: false,
                });
            }
            let headers = vec![
                (
                    "x-amz-Data-Length".to_string(),
                    block.data.len().to_string(),
                ),
                ("x-amz-Checksum".to_string(), block.checksum_b64.clone()),
                ("x-amz-Checksum-Algorithm".to_string(), "SHA256".to_string()),
            ];
            let result = self.ebs(
                creds,
                &self.blocks,
                &format!("PutSnapshotBlock {}", block.index),
                "PUT",
                &format!("/snapshots/{snapshot}/blocks/{}", block.index),
                headers,
                block.data.clone(),
                "application/octet-stream",
                &block.sha256_hex,
                left,
            );
            match result {
                Ok(_) => return Ok(()),
                Err(e) if e.retryable && attempt < BLOCK_ATTEMPTS => {
                    log::debug!("{}; retrying", e.message);
                    std::thread::sleep(Duration::from_secs(u64::from(attempt)).min(left));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// `http://host:port` and the base path (without a trailing `/`) of an endpoint URL.
fn split_endpoint(endpoint: &str) -> (&str, &str) {
    let after_scheme = endpoint.find("://").map_or(0, |i| i + 3);
    match endpoint[after_scheme..].find('/') {
        Some(i) => endpoint.split_at(after_scheme + i),
        None => (endpoint, ""),
    }
}

/// The query parameters selecting our provider's resources (`tag:` filter, owner self).
fn provider_filter(owner_key: &str, provider: &str) -> Vec<(String, String)> {
    vec![
        (owner_key.to_string(), "self".to_string()),
        ("Filter.1.Name".to_string(), format!("tag:{PROVIDER_TAG}")),
        ("Filter.1.Value.1".to_string(), provider.to_string()),
    ]
}

/// `RegisterImage`'s parameters for `snapshot` as nodepool 11 sends them.
pub fn register_params(
    name: &str,
    image: &AwsImage,
    snapshot: &str,
    volume_size: u64,
    tags: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = [
        ("Name", name.to_string()),
        ("Architecture", image.architecture.clone()),
        ("RootDeviceName", "/dev/sda1".into()),
        ("VirtualizationType", "hvm".into()),
        ("EnaSupport", image.ena_support.to_string()),
        ("BlockDeviceMapping.1.DeviceName", "/dev/sda1".into()),
        (
            "BlockDeviceMapping.1.Ebs.DeleteOnTermination",
            "true".into(),
        ),
        ("BlockDeviceMapping.1.Ebs.SnapshotId", snapshot.to_string()),
        (
            "BlockDeviceMapping.1.Ebs.VolumeSize",
            volume_size.to_string(),
        ),
        (
            "BlockDeviceMapping.1.Ebs.VolumeType",
            image.volume_type.clone(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(iops) = image.iops {
        p.push(("BlockDeviceMapping.1.Ebs.Iops".into(), iops.to_string()));
    }
    if let Some(throughput) = image.throughput {
        p.push((
            "BlockDeviceMapping.1.Ebs.Throughput".into(),
            throughput.to_string(),
        ));
    }
    if image.imds_v2 {
        p.push(("ImdsSupport".into(), "v2.0".into()));
    }
    p.extend(ec2::tag_specification(1, "image", tags));
    p
}

impl AwsDriver {
    fn call_error(&self, context: &str, e: CallError) -> ProviderError {
        self.error(e.kind, format!("{context}: {}", e.message))
    }

    /// All AMIs of ours (owner self) matching `params`, every page.
    fn describe_images(
        &self,
        creds: &Credentials,
        params: Vec<(String, String)>,
    ) -> Result<Vec<ec2::Ami>, CallError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut p = params.clone();
            if let Some(t) = &token {
                p.push(("NextToken".into(), t.clone()));
            }
            let xml = self.api.ec2(creds, "DescribeImages", &p, CALL_TIMEOUT)?;
            let (page, next) = ec2::parse_images(&xml)
                .map_err(|m| CallError::bad_answer(format!("DescribeImages: {m}")))?;
            out.extend(page);
            match next {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    fn describe_snapshots(&self, creds: &Credentials) -> Result<Vec<ec2::Snapshot>, CallError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut p = provider_filter("Owner.1", &self.name);
            if let Some(t) = &token {
                p.push(("NextToken".into(), t.clone()));
            }
            let xml = self.api.ec2(creds, "DescribeSnapshots", &p, CALL_TIMEOUT)?;
            let (page, next) = ec2::parse_snapshots(&xml)
                .map_err(|m| CallError::bad_answer(format!("DescribeSnapshots: {m}")))?;
            out.extend(page);
            match next {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    /// Deletes a snapshot; one that is gone already counts as deleted.
    fn delete_snapshot(
        &self,
        creds: &Credentials,
        id: &str,
        timeout: Duration,
    ) -> Result<(), CallError> {
        match self.api.ec2(
            creds,
            "DeleteSnapshot",
            &[("SnapshotId".into(), id.into())],
            timeout,
        ) {
            Err(e) if e.code.as_deref() == Some("InvalidSnapshot.NotFound") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Deregisters an AMI; one that is gone already counts as deregistered.
    fn deregister(
        &self,
        creds: &Credentials,
        id: &str,
        timeout: Duration,
    ) -> Result<(), CallError> {
        match self.api.ec2(
            creds,
            "DeregisterImage",
            &[("ImageId".into(), id.into())],
            timeout,
        ) {
            Err(e)
                if matches!(
                    e.code.as_deref(),
                    Some("InvalidAMIID.NotFound" | "InvalidAMIID.Unavailable")
                ) =>
            {
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    /// Removes what a failed upload made: AMIs tagged with its ids (when `register_sent`),
    /// then the snapshot. Problems are logged; the janitor finds what stays.
    fn discard(
        &self,
        creds: &Credentials,
        req: &UploadRequest,
        snapshot: &str,
        register_sent: bool,
    ) {
        if register_sent {
            let params = vec![
                ("Owner.1".to_string(), "self".to_string()),
                (
                    "Filter.1.Name".to_string(),
                    "tag:nodepool_upload_id".to_string(),
                ),
                ("Filter.1.Value.1".to_string(), req.upload_id.clone()),
                (
                    "Filter.2.Name".to_string(),
                    "tag:nodepool_build_id".to_string(),
                ),
                ("Filter.2.Value.1".to_string(), req.build_id.clone()),
            ];
            match self.describe_images(creds, params) {
                Ok(amis) => {
                    for ami in amis {
                        if ami.tags.get(PROVIDER_TAG) != Some(&self.name) {
                            continue;
                        }
                        if let Err(e) = self.deregister(creds, &ami.id, DISCARD_TIMEOUT) {
                            log::warn!(target: &self.log_target, "provider {}: cannot deregister AMI {} of the failed upload of {}: {}; the janitor will", self.name, ami.id, req.external_name, e.message);
                        }
                    }
                }
                Err(e) => {
                    log::warn!(target: &self.log_target, "provider {}: cannot look for an AMI of the failed upload of {}: {}", self.name, req.external_name, e.message)
                }
            }
        }
        if let Err(e) = self.delete_snapshot(creds, snapshot, DISCARD_TIMEOUT) {
            log::warn!(target: &self.log_target, "provider {}: cannot delete snapshot {snapshot} of the failed upload of {}: {}; the janitor will", self.name, req.external_name, e.message);
        } else {
            log::info!(target: &self.log_target, "provider {}: deleted snapshot {snapshot} of the failed upload of {}", self.name, req.external_name);
        }
    }

    fn upload_ebs_direct(
        &self,
        req: &UploadRequest,
        image: &AwsImage,
        creds: &Credentials,
    ) -> Result<Uploaded, ProviderError> {
        let deadline = Instant::now() + req.timeout;
        let context = format!("upload of {} ({})", req.external_name, req.image_name);
        let file = File::open(&req.file).map_err(|e| {
            self.error(
                ErrorKind::Io,
                format!("{context}: cannot open {}: {e}", req.file.display()),
            )
        })?;
        let len = file
            .metadata()
            .map_err(|e| {
                self.error(
                    ErrorKind::Io,
                    format!("{context}: {}: {e}", req.file.display()),
                )
            })?
            .len();
        let size_gib = ebs::volume_size_gib(len);
        req.progress.start(len);
        let start = ebs::start_body(
            size_gib,
            &uuid::Uuid::new_v4().simple().to_string(),
            &req.properties,
            &req.external_name,
        );
        let hash = sigv4::sha256_hex(&start);
        let answer = self
            .api
            .ebs(
                creds,
                &self.api.calls,
                "StartSnapshot",
                "POST",
                "/snapshots",
                Vec::new(),
                start,
                "application/json",
                &hash,
                deadline.saturating_duration_since(Instant::now()),
            )
            .map_err(|e| self.call_error(&context, e))?;
        let snapshot = ebs::parse_start(&answer)
            .map_err(|m| self.error(ErrorKind::Server, format!("{context}: StartSnapshot: {m}")))?;
        log::debug!(target: &self.log_target, "provider {}: {context}: writing {len} bytes to snapshot {snapshot} ({size_gib} GiB)", self.name);
        let written = match self.write_blocks(req, creds, &snapshot, file, deadline) {
            Ok(n) => n,
            Err(e) => {
                self.discard(creds, req, &snapshot, false);
                return Err(self.call_error(&context, e));
            }
        };
        if let Err(e) = self.complete(creds, &snapshot, written, deadline) {
            self.discard(creds, req, &snapshot, false);
            return Err(self.call_error(&context, e));
        }
        let volume = image.volume_size.unwrap_or(0).max(size_gib);
        log::debug!(target: &self.log_target, "provider {}: {context}: {written} blocks written to snapshot {snapshot}", self.name);
        self.register(req, image, creds, &snapshot, volume, deadline, &context)
    }

    /// Registers `snapshot` as the upload's AMI and tags it; on failure removes the AMI (if
    /// one may exist) and the snapshot.
    #[allow(clippy::too_many_arguments)]
    fn register(
        &self,
        req: &UploadRequest,
        image: &AwsImage,
        creds: &Credentials,
        snapshot: &str,
        volume: u64,
        deadline: Instant,
        context: &str,
    ) -> Result<Uploaded, ProviderError> {
        let params = register_params(&req.external_name, image, snapshot, volume, &req.properties);
        let left = deadline.saturating_duration_since(Instant::now());
        match self.api.ec2(creds, "RegisterImage", &params, left) {
            Ok(xml) => match ec2::parse_image_id(&xml) {
                Ok(id) => {
                    if let Err(e) = self.tag(creds, &id, &req.properties, deadline) {
                        self.discard(creds, req, snapshot, true);
                        return Err(self.call_error(context, e));
                    }
                    log::info!(target: &self.log_target, "provider {}: {context}: registered AMI {id} from snapshot {snapshot}", self.name);
                    Ok(Uploaded { external_id: id })
                }
                Err(m) => {
                    self.discard(creds, req, snapshot, true);
                    Err(self.error(ErrorKind::Server, format!("{context}: RegisterImage: {m}")))
                }
            },
            Err(e) => {
                self.discard(creds, req, snapshot, e.maybe_sent);
                Err(self.call_error(context, e))
            }
        }
    }

    /// The `snapshot` and `image` import methods: the file to S3, EC2's import from there,
    /// the object deleted whatever the outcome.
    fn upload_via_s3(
        &self,
        req: &UploadRequest,
        image: &AwsImage,
        creds: &Credentials,
    ) -> Result<Uploaded, ProviderError> {
        let deadline = Instant::now() + req.timeout;
        let context = format!("upload of {} ({})", req.external_name, req.image_name);
        let Some(bucket) = &self.bucket_name else {
            return Err(self.error(
                ErrorKind::Config,
                format!(
                    "{context}: import-method {} needs object-storage.bucket-name",
                    image.import_method.as_str()
                ),
            ));
        };
        let key = s3::object_key(&req.external_name, &req.format);
        self.put_object(req, creds, bucket, &key, deadline)
            .map_err(|e| self.call_error(&context, e))?;
        let imported = match image.import_method {
            AwsImportMethod::Image => {
                self.import_image(req, image, creds, bucket, &key, deadline, &context)
            }
            _ => self.import_snapshot(req, image, creds, bucket, &key, deadline, &context),
        };
        match self.api.s3(
            creds,
            "DeleteObject",
            "DELETE",
            bucket,
            &key,
            &[],
            Vec::new(),
            Vec::new(),
            sigv4::EMPTY_SHA256,
            DISCARD_TIMEOUT,
        ) {
            Ok(_) => {
                log::debug!(target: &self.log_target, "provider {}: {context}: deleted s3://{bucket}/{key}", self.name)
            }
            Err(e) => {
                log::warn!(target: &self.log_target, "provider {}: {context}: cannot delete s3://{bucket}/{key}: {}", self.name, e.message)
            }
        }
        imported
    }

    /// Streams the file to `bucket`/`key` as a multipart upload (aborted on failure).
    fn put_object(
        &self,
        req: &UploadRequest,
        creds: &Credentials,
        bucket: &str,
        key: &str,
        deadline: Instant,
    ) -> Result<(), CallError> {
        let io = |message: String| CallError {
            kind: ErrorKind::Io,
            code: None,
            message,
            maybe_sent: false,
            retryable: false,
        };
        let mut file = File::open(&req.file)
            .map_err(|e| io(format!("cannot open {}: {e}", req.file.display())))?;
        let len = file
            .metadata()
            .map_err(|e| io(format!("{}: {e}", req.file.display())))?
            .len();
        req.progress.start(len);
        let left = || deadline.saturating_duration_since(Instant::now());
        let headers = vec![
            ("x-amz-tagging".to_string(), s3::tagging(&req.properties)),
            ("x-amz-checksum-algorithm".to_string(), "SHA256".to_string()),
        ];
        let reply = self.api.s3(
            creds,
            "CreateMultipartUpload",
            "POST",
            bucket,
            key,
            &[("uploads".into(), String::new())],
            headers,
            Vec::new(),
            sigv4::EMPTY_SHA256,
            left(),
        )?;
        let upload_id = s3::parse_upload_id(&reply.body)
            .map_err(|m| CallError::bad_answer(format!("CreateMultipartUpload: {m}")))?;
        let upload = |query: Vec<(String, String)>| {
            let mut q = query;
            q.push(("uploadId".into(), upload_id.clone()));
            q
        };
        let part_size = s3::part_size(len);
        let mut parts = Vec::new();
        let result = (|| {
            loop {
                let mut data = Vec::with_capacity(part_size as usize);
                (&mut file)
                    .take(part_size)
                    .read_to_end(&mut data)
                    .map_err(|e| io(format!("reading {}: {e}", req.file.display())))?;
                if data.is_empty() && !parts.is_empty() {
                    break;
                }
                let number = parts.len() as u32 + 1;
                let digest = <sha2::Sha256 as sha2::Digest>::digest(&data);
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                let b64 =
                    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, digest);
                let sent = data.len() as u64;
                let mut attempt = 0;
                let reply = loop {
                    attempt += 1;
                    let query = upload(vec![("partNumber".into(), number.to_string())]);
                    let headers = vec![("x-amz-checksum-sha256".to_string(), b64.clone())];
                    match self.api.s3(
                        creds,
                        &format!("UploadPart {number}"),
                        "PUT",
                        bucket,
                        key,
                        &query,
                        headers,
                        data.clone(),
                        &hex,
                        left(),
                    ) {
                        Ok(reply) => break reply,
                        Err(e) if e.retryable && attempt < BLOCK_ATTEMPTS => {
                            log::debug!("{}; retrying", e.message);
                            std::thread::sleep(Duration::from_secs(u64::from(attempt)).min(left()));
                        }
                        Err(e) => return Err(e),
                    }
                };
                let etag = reply.etag.ok_or_else(|| {
                    CallError::bad_answer(format!("UploadPart {number}: the answer has no ETag"))
                })?;
                parts.push(s3::Part {
                    number,
                    etag,
                    checksum_b64: b64,
                });
                req.progress.add(sent);
                if sent < part_size {
                    break;
                }
            }
            let body = s3::complete_body(&parts);
            let hash = sigv4::sha256_hex(&body);
            let reply = self.api.s3(
                creds,
                "CompleteMultipartUpload",
                "POST",
                bucket,
                key,
                &upload(Vec::new()),
                Vec::new(),
                body,
                &hash,
                left(),
            )?;
            match s3::complete_failed(&reply.body) {
                Some(m) => Err(CallError::bad_answer(format!(
                    "CompleteMultipartUpload: {m}"
                ))),
                None => Ok(()),
            }
        })();
        if result.is_err()
            && let Err(e) = self.api.s3(
                creds,
                "AbortMultipartUpload",
                "DELETE",
                bucket,
                key,
                &upload(Vec::new()),
                Vec::new(),
                Vec::new(),
                sigv4::EMPTY_SHA256,
                DISCARD_TIMEOUT,
            )
        {
            log::warn!(target: &self.log_target, "provider {}: cannot abort the upload of s3://{bucket}/{key}: {}", self.name, e.message);
        }
        result
    }

    /// Starts an import (`ImportSnapshot`, `ImportImage`), retrying while AWS says too many
    /// imports run (`ResourceCountLimitExceeded`), as upstream does; the task id.
    fn start_import(
        &self,
        creds: &Credentials,
        action: &str,
        params: &[(String, String)],
        deadline: Instant,
    ) -> Result<String, CallError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.api.ec2(creds, action, params, left) {
                Ok(xml) => {
                    return ec2::parse_import_task_id(&xml)
                        .map_err(|m| CallError::bad_answer(format!("{action}: {m}")));
                }
                Err(e)
                    if e.code.as_deref() == Some("ResourceCountLimitExceeded")
                        && left > IMPORT_LIMIT_PAUSE =>
                {
                    log::warn!(target: &self.log_target, "provider {}: {}; trying again in {IMPORT_LIMIT_PAUSE:?}", self.name, e.message);
                    std::thread::sleep(IMPORT_LIMIT_PAUSE);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Polls an import task until it is done (back-off up to [`MAX_IMPORT_POLL`]); on the
    /// deadline the task is cancelled (best effort).
    fn wait_import(
        &self,
        creds: &Credentials,
        task: &str,
        image: bool,
        deadline: Instant,
    ) -> Result<Imported, CallError> {
        let action = if image {
            "DescribeImportImageTasks"
        } else {
            "DescribeImportSnapshotTasks"
        };
        let mut pause = Duration::from_secs(1);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                if let Err(e) = self.api.ec2(
                    creds,
                    "CancelImportTask",
                    &[("ImportTaskId".into(), task.into())],
                    DISCARD_TIMEOUT,
                ) {
                    log::warn!(target: &self.log_target, "provider {}: cannot cancel import task {task}: {}", self.name, e.message);
                }
                return Err(CallError {
                    kind: ErrorKind::Timeout,
                    code: None,
                    message: format!(
                        "import task {task} not done when the upload's time was up (cancelled)"
                    ),
                    maybe_sent: true,
                    retryable: false,
                });
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(MAX_IMPORT_POLL);
            let xml = match self.api.ec2(
                creds,
                action,
                &[("ImportTaskId.1".into(), task.into())],
                CALL_TIMEOUT,
            ) {
                Ok(xml) => xml,
                Err(e) if e.retryable => {
                    log::debug!("{}; polling again", e.message);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let status = ec2::parse_import_status(&xml, task, image)
                .map_err(|m| CallError::bad_answer(format!("{action}: {m}")))?;
            match status {
                ec2::ImportStatus::Running(what) => {
                    log::debug!(target: &self.log_target, "provider {}: import task {task}: {what}", self.name);
                }
                ec2::ImportStatus::Completed {
                    snapshot_id,
                    image_id,
                } => {
                    return Ok(Imported::Done {
                        snapshot_id,
                        image_id,
                    });
                }
                ec2::ImportStatus::Failed(m) => return Ok(Imported::Failed(m)),
            }
        }
    }

    /// Starts an import task (`ImportImage` when `image`, else `ImportSnapshot`) with `params`,
    /// the task tagged with `tags` (as upstream), and waits for it: its id, its snapshot and,
    /// for an image import, its AMI. A failed task is an error naming it.
    fn run_import(
        &self,
        creds: &Credentials,
        image: bool,
        mut params: Vec<(String, String)>,
        tags: &BTreeMap<String, String>,
        deadline: Instant,
        context: &str,
    ) -> Result<(String, String, Option<String>), ProviderError> {
        let (action, task_type) = if image {
            ("ImportImage", "import-image-task")
        } else {
            ("ImportSnapshot", "import-snapshot-task")
        };
        params.extend(ec2::tag_specification(1, task_type, tags));
        let task = self
            .start_import(creds, action, &params, deadline)
            .map_err(|e| self.call_error(context, e))?;
        log::debug!(target: &self.log_target, "provider {}: {context}: import task {task}", self.name);
        match self.wait_import(creds, &task, image, deadline) {
            Ok(Imported::Done {
                snapshot_id,
                image_id,
            }) => Ok((task, snapshot_id, image_id)),
            Ok(Imported::Failed(m)) => Err(self.error(
                ErrorKind::Server,
                format!("{context}: import task {task} failed: {m}"),
            )),
            Err(e) => Err(self.call_error(context, e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn import_snapshot(
        &self,
        req: &UploadRequest,
        image: &AwsImage,
        creds: &Credentials,
        bucket: &str,
        key: &str,
        deadline: Instant,
        context: &str,
    ) -> Result<Uploaded, ProviderError> {
        let params = vec![
            ("DiskContainer.Format".into(), req.format.clone()),
            ("DiskContainer.UserBucket.S3Bucket".into(), bucket.into()),
            ("DiskContainer.UserBucket.S3Key".into(), key.into()),
        ];
        let (_, snapshot, _) =
            self.run_import(creds, false, params, &req.properties, deadline, context)?;
        let sized = self
            .tag(creds, &snapshot, &req.properties, deadline)
            .and_then(|()| match image.volume_size {
                Some(size) => Ok(size),
                None => self
                    .api
                    .ec2(
                        creds,
                        "DescribeSnapshots",
                        &[("SnapshotId.1".into(), snapshot.clone())],
                        CALL_TIMEOUT,
                    )
                    .and_then(|xml| {
                        ec2::parse_snapshot_size(&xml)
                            .map_err(|m| CallError::bad_answer(format!("DescribeSnapshots: {m}")))
                    }),
            });
        match sized {
            Ok(volume) => self.register(req, image, creds, &snapshot, volume, deadline, context),
            Err(e) => {
                self.discard(creds, req, &snapshot, false);
                Err(self.call_error(context, e))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn import_image(
        &self,
        req: &UploadRequest,
        image: &AwsImage,
        creds: &Credentials,
        bucket: &str,
        key: &str,
        deadline: Instant,
        context: &str,
    ) -> Result<Uploaded, ProviderError> {
        let params = vec![
            ("Architecture".into(), image.architecture.clone()),
            ("DiskContainer.1.Format".into(), req.format.clone()),
            ("DiskContainer.1.UserBucket.S3Bucket".into(), bucket.into()),
            ("DiskContainer.1.UserBucket.S3Key".into(), key.into()),
        ];
        let (task, snapshot, ami) =
            self.run_import(creds, true, params, &req.properties, deadline, context)?;
        let Some(ami) = ami else {
            self.discard(creds, req, &snapshot, false);
            return Err(self.error(
                ErrorKind::Server,
                format!("{context}: import task {task} completed without an image id"),
            ));
        };
        // EC2 tags neither the AMI nor its snapshot of an image import: tag both, as upstream.
        let tagged = self
            .tag(creds, &ami, &req.properties, deadline)
            .and_then(|()| self.tag(creds, &snapshot, &req.properties, deadline));
        if let Err(e) = tagged {
            if let Err(d) = self.deregister(creds, &ami, DISCARD_TIMEOUT) {
                log::warn!(target: &self.log_target, "provider {}: {context}: cannot deregister AMI {ami}: {}; the janitor cannot find it untagged", self.name, d.message);
            }
            self.discard(creds, req, &snapshot, false);
            return Err(self.call_error(context, e));
        }
        log::info!(target: &self.log_target, "provider {}: {context}: imported AMI {ami} with snapshot {snapshot}", self.name);
        Ok(Uploaded { external_id: ami })
    }

    /// Tags `resource` again with `CreateTags` (RegisterImage's `TagSpecifications` already
    /// did on AWS; EC2 stand-ins such as moto drop them, and an AMI without its tags is one
    /// the janitor cannot find).
    fn tag(
        &self,
        creds: &Credentials,
        resource: &str,
        tags: &BTreeMap<String, String>,
        deadline: Instant,
    ) -> Result<(), CallError> {
        let mut params = vec![("ResourceId.1".to_string(), resource.to_string())];
        for (i, (k, v)) in tags.iter().enumerate() {
            params.push((format!("Tag.{}.Key", i + 1), k.clone()));
            params.push((format!("Tag.{}.Value", i + 1), v.clone()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        self.api.ec2(creds, "CreateTags", &params, left).map(|_| ())
    }

    /// `CompleteSnapshot` until the snapshot is completed.
    fn complete(
        &self,
        creds: &Credentials,
        snapshot: &str,
        written: u64,
        deadline: Instant,
    ) -> Result<(), CallError> {
        let mut pause = Duration::from_millis(200);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = self.api.ebs(
                creds,
                &self.api.calls,
                "CompleteSnapshot",
                "POST",
                &format!("/snapshots/completion/{snapshot}"),
                vec![("x-amz-ChangedBlocksCount".to_string(), written.to_string())],
                Vec::new(),
                "application/json",
                sigv4::EMPTY_SHA256,
                left,
            )?;
            let status = ebs::parse_complete(&answer)
                .map_err(|m| CallError::bad_answer(format!("CompleteSnapshot: {m}")))?;
            match status {
                Completion::Completed => return Ok(()),
                Completion::Error => {
                    return Err(CallError::bad_answer(format!(
                        "CompleteSnapshot: snapshot {snapshot} is in state error"
                    )));
                }
                Completion::Pending => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CallError {
                    kind: ErrorKind::Timeout,
                    code: None,
                    message: format!(
                        "snapshot {snapshot} still pending when the upload's time was up"
                    ),
                    maybe_sent: true,
                    retryable: false,
                });
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(MAX_POLL_INTERVAL);
        }
    }

    /// Reads the file block by block and hands the blocks to [`BLOCK_WORKERS`] writer
    /// threads; returns the number of blocks written. Stops at the first failed block.
    fn write_blocks(
        &self,
        req: &UploadRequest,
        creds: &Credentials,
        snapshot: &str,
        mut file: File,
        deadline: Instant,
    ) -> Result<u64, CallError> {
        let (blocks_tx, blocks_rx) = crossbeam_channel::bounded::<Block>(BLOCK_WORKERS * 2);
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Result<(), CallError>>();
        let failed = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for n in 0..BLOCK_WORKERS {
            let (api, creds, snapshot) = (self.api.clone(), creds.clone(), snapshot.to_string());
            let (rx, tx, failed) = (blocks_rx.clone(), done_tx.clone(), failed.clone());
            let spawned = crate::thread::try_spawn(
                crate::thread::ThreadKind::BlockWriter,
                format!("ebs-put-{n}"),
                move || {
                    for block in rx {
                        if failed.load(Ordering::Relaxed) {
                            continue;
                        }
                        let result = api.put_block(&creds, &snapshot, &block, deadline);
                        if result.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        if tx.send(result).is_err() {
                            return;
                        }
                    }
                },
            );
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) if workers.is_empty() => {
                    return Err(CallError {
                        kind: ErrorKind::Io,
                        code: None,
                        message: format!("cannot start a block writer thread: {e}"),
                        maybe_sent: false,
                        retryable: false,
                    });
                }
                Err(_) => break,
            }
        }
        drop(blocks_rx);
        drop(done_tx);
        let mut sent = 0u64;
        let mut written = 0u64;
        let mut first_error: Option<CallError> = None;
        let mut note =
            |result: Result<(), CallError>, first_error: &mut Option<CallError>| match result {
                Ok(()) => written += 1,
                Err(e) => {
                    if first_error.is_none() {
                        *first_error = Some(e);
                    }
                }
            };
        let mut index = 0u64;
        loop {
            while let Ok(result) = done_rx.try_recv() {
                note(result, &mut first_error);
            }
            if first_error.is_some() {
                break;
            }
            let mut data = Vec::with_capacity(ebs::BLOCK_SIZE);
            match (&mut file)
                .take(ebs::BLOCK_SIZE as u64)
                .read_to_end(&mut data)
            {
                Ok(0) => break,
                Ok(n) => req.progress.add(n as u64),
                Err(e) => {
                    first_error = Some(CallError {
                        kind: ErrorKind::Io,
                        code: None,
                        message: format!("reading {}: {e}", req.file.display()),
                        maybe_sent: false,
                        retryable: false,
                    });
                    break;
                }
            }
            if let Some(block) = Block::new(index, data) {
                if blocks_tx.send(block).is_err() {
                    break;
                }
                sent += 1;
            }
            index += 1;
        }
        if first_error.is_some() {
            failed.store(true, Ordering::Relaxed);
        }
        drop(blocks_tx);
        for result in done_rx.iter() {
            note(result, &mut first_error);
        }
        drop(workers);
        match first_error {
            Some(e) => Err(e),
            None if written == sent => Ok(written),
            None => Err(CallError::bad_answer(format!(
                "{written} of {sent} blocks were written"
            ))),
        }
    }
}

impl ProviderDriver for AwsDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn image_format(&self) -> &str {
        &self.image_format
    }

    fn upload(&self, req: &UploadRequest) -> Result<Uploaded, ProviderError> {
        let Some(image) = self.images.get(&req.image_name) else {
            return Err(self.error(
                ErrorKind::Config,
                format!(
                    "diskimage {} is not configured for this provider",
                    req.image_name
                ),
            ));
        };
        let creds = self.credentials(&format!("upload of {}", req.external_name))?;
        log::debug!(target: &self.log_target, "provider {}: uploading {} to region {} with credentials from {}", self.name, req.external_name, self.region, creds.source());
        match image.import_method {
            AwsImportMethod::EbsDirect => self.upload_ebs_direct(req, image, &creds),
            AwsImportMethod::Snapshot | AwsImportMethod::Image => {
                self.upload_via_s3(req, image, &creds)
            }
        }
    }

    fn delete(&self, external_id: &str) -> Result<(), ProviderError> {
        let context = format!("delete of {external_id}");
        let creds = self.credentials(&context)?;
        if external_id.starts_with("snap-") {
            return self
                .delete_snapshot(&creds, external_id, CALL_TIMEOUT)
                .map_err(|e| self.call_error(&context, e));
        }
        let params = vec![
            ("Owner.1".to_string(), "self".to_string()),
            ("ImageId.1".to_string(), external_id.to_string()),
        ];
        let amis = match self.describe_images(&creds, params) {
            Ok(amis) => amis,
            Err(e)
                if e.code
                    .as_deref()
                    .is_some_and(|c| c.starts_with("InvalidAMIID.")) =>
            {
                Vec::new()
            }
            Err(e) => return Err(self.call_error(&context, e)),
        };
        let mut snapshots: Vec<String> = amis.iter().flat_map(|a| a.snapshot_ids.clone()).collect();
        // The snapshots of the same upload (by its tags) too: the AMI's mapping names the one
        // we wrote on AWS, but a stand-in may have swapped in its own.
        if let Some(ami) = amis.iter().find(|a| a.id == external_id)
            && let (Some(build), Some(upload)) = (
                ami.tags.get("nodepool_build_id"),
                ami.tags.get("nodepool_upload_id"),
            )
            && ami.tags.get(PROVIDER_TAG) == Some(&self.name)
        {
            let tagged = self
                .describe_snapshots(&creds)
                .map_err(|e| self.call_error(&context, e))?;
            snapshots.extend(
                tagged
                    .into_iter()
                    .filter(|s| {
                        s.tags.get("nodepool_build_id") == Some(build)
                            && s.tags.get("nodepool_upload_id") == Some(upload)
                    })
                    .map(|s| s.id),
            );
        }
        snapshots.sort();
        snapshots.dedup();
        self.deregister(&creds, external_id, CALL_TIMEOUT)
            .map_err(|e| self.call_error(&context, e))?;
        for snapshot in snapshots {
            self.delete_snapshot(&creds, &snapshot, CALL_TIMEOUT)
                .map_err(|e| self.call_error(&context, e))?;
        }
        Ok(())
    }

    fn list_images(&self) -> Result<Vec<CloudImage>, ProviderError> {
        let creds = self.credentials("listing images")?;
        let amis = self
            .describe_images(&creds, provider_filter("Owner.1", &self.name))
            .map_err(|e| self.call_error("listing images", e))?;
        let snapshots = self
            .describe_snapshots(&creds)
            .map_err(|e| self.call_error("listing snapshots", e))?;
        Ok(our_resources(amis, snapshots))
    }
}

/// The build and upload ids a resource is tagged with.
fn upload_of(tags: &BTreeMap<String, String>) -> Option<(&String, &String)> {
    Some((
        tags.get("nodepool_build_id")?,
        tags.get("nodepool_upload_id")?,
    ))
}

/// Our AMIs, and our snapshots that none of them uses, as cloud images for leak detection.
/// A snapshot is used when an AMI maps it or carries the same build and upload ids (it is
/// deleted with that AMI).
fn our_resources(amis: Vec<ec2::Ami>, snapshots: Vec<ec2::Snapshot>) -> Vec<CloudImage> {
    let used: std::collections::BTreeSet<&String> =
        amis.iter().flat_map(|a| &a.snapshot_ids).collect();
    let uploads: std::collections::BTreeSet<(&String, &String)> =
        amis.iter().filter_map(|a| upload_of(&a.tags)).collect();
    let orphans: Vec<CloudImage> = snapshots
        .iter()
        .filter(|s| !used.contains(&s.id))
        .filter(|s| upload_of(&s.tags).is_none_or(|u| !uploads.contains(&u)))
        .map(|s| CloudImage {
            id: s.id.clone(),
            name: format!("snapshot {}", s.id),
            properties: s.tags.clone(),
        })
        .collect();
    amis.into_iter()
        .map(|a| CloudImage {
            id: a.id,
            name: a.name,
            properties: a.tags,
        })
        .chain(orphans)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> AwsImage {
        AwsImage {
            import_method: AwsImportMethod::EbsDirect,
            architecture: "x86_64".into(),
            ena_support: true,
            volume_size: None,
            volume_type: "gp3".into(),
            iops: Some(3000),
            throughput: None,
            imds_v2: true,
        }
    }

    #[test]
    fn register_image_parameters_follow_nodepool() {
        let tags = BTreeMap::from([("nodepool_build_id".to_string(), "b1".to_string())]);
        let p: BTreeMap<String, String> = register_params("img-1", &image(), "snap-1", 2, &tags)
            .into_iter()
            .collect();
        assert_eq!(p["RootDeviceName"], "/dev/sda1");
        assert_eq!(p["VirtualizationType"], "hvm");
        assert_eq!(p["EnaSupport"], "true");
        assert_eq!(p["BlockDeviceMapping.1.Ebs.SnapshotId"], "snap-1");
        assert_eq!(p["BlockDeviceMapping.1.Ebs.VolumeSize"], "2");
        assert_eq!(p["BlockDeviceMapping.1.Ebs.VolumeType"], "gp3");
        assert_eq!(p["BlockDeviceMapping.1.Ebs.DeleteOnTermination"], "true");
        assert_eq!(p["BlockDeviceMapping.1.Ebs.Iops"], "3000");
        assert!(!p.contains_key("BlockDeviceMapping.1.Ebs.Throughput"));
        assert_eq!(p["ImdsSupport"], "v2.0");
        assert_eq!(p["TagSpecification.1.ResourceType"], "image");
        assert_eq!(p["TagSpecification.1.Tag.1.Key"], "nodepool_build_id");
    }

    #[test]
    fn leak_listing_has_our_amis_and_only_orphaned_snapshots() {
        let tags = BTreeMap::from([(PROVIDER_TAG.to_string(), "p".to_string())]);
        let upload = |b: &str| {
            let mut t = tags.clone();
            t.insert("nodepool_build_id".into(), b.into());
            t.insert("nodepool_upload_id".into(), "0000000001".into());
            t
        };
        let amis = vec![ec2::Ami {
            id: "ami-1".into(),
            name: "n".into(),
            state: "available".into(),
            snapshot_ids: vec!["snap-used".into()],
            tags: upload("b1"),
        }];
        let snaps = [
            ("snap-used", tags.clone()),
            ("snap-same-upload", upload("b1")),
            ("snap-orphan", upload("b2")),
        ]
        .map(|(id, tags)| ec2::Snapshot {
            id: id.into(),
            state: "completed".into(),
            tags,
        })
        .to_vec();
        let ids: Vec<String> = our_resources(amis, snaps)
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids, ["ami-1", "snap-orphan"]);
    }

    #[test]
    fn endpoints_split_into_origin_and_base_path() {
        assert_eq!(
            split_endpoint("http://127.0.0.1:5000"),
            ("http://127.0.0.1:5000", "")
        );
        assert_eq!(split_endpoint("https://h/base"), ("https://h", "/base"));
    }
}
