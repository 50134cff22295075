//! Cloud drivers behind one trait: OpenStack (Glance v2 + Keystone, configured through
//! clouds.yaml), Amazon EC2 (`aws`, nodepool 11's image uploads) and the command driver (our
//! addition).
//!
//! Only `provider::*` knows a cloud protocol. The upload worker builds an [`UploadRequest`]
//! (name, file, format, checksums, properties) and calls [`ProviderDriver::upload`]; the
//! cleanup worker calls [`ProviderDriver::delete`] with the `external_id` stored in ZooKeeper.
//! Drivers are blocking and may be called from several upload threads at once.
//!
//! What a driver knows before it is set up is asked of this module too, so that nobody else
//! repeats it: the image format its provider's config implies ([`configured_format`], with
//! the driver's default) and the files it reads credentials from ([`secret_files`], for the
//! permission check of `secret_files`).

pub mod aws;
pub mod command;
pub mod openstack;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config;

/// Everything a driver needs to upload one image file.
#[derive(Debug, Clone)]
pub struct UploadRequest {
    /// The diskimage name (`{image_name}`).
    pub image_name: String,
    pub build_id: String,
    pub upload_id: String,
    /// The cloud image name, already expanded from `image-name-format`.
    pub external_name: String,
    /// The local file to upload (`<images-dir>/<image>-<build_id>.<format>`).
    pub file: PathBuf,
    /// The file's format (`qcow2`, `raw`, `vhd`, ...), i.e. the cloud's `disk_format`.
    pub format: String,
    /// md5 hex from the `.md5` file next to the image, if present.
    pub md5: Option<String>,
    /// sha256 hex from the `.sha256` file next to the image, if present.
    pub sha256: Option<String>,
    /// Image properties: diskimage `metadata`, provider `meta`, and the `nodepool_build_id`,
    /// `nodepool_upload_id`, `nodepool_provider_name` tags.
    pub properties: BTreeMap<String, String>,
    /// `image-upload-timeout`: the whole upload, including waiting for the image to be active.
    pub timeout: Duration,
    /// Bytes of `file` sent so far: a driver that streams the file counts them here (the
    /// `progress` lines read them); one that does not leaves it alone.
    pub progress: std::sync::Arc<crate::progress::ByteCount>,
}

/// What a successful upload returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// The cloud's id for the image: stored as the upload's `external_id`.
    pub external_id: String,
}

/// A cloud image as listed by a driver (for leak detection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudImage {
    pub id: String,
    pub name: String,
    pub properties: BTreeMap<String, String>,
}

/// Broad classes of driver failure; the message says exactly what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad or missing driver configuration (clouds.yaml entry, endpoint, command template).
    Config,
    /// 401/403 after re-authenticating.
    Auth,
    /// 404: the image (or endpoint) does not exist.
    NotFound,
    /// 409: conflicting state.
    Conflict,
    /// 413: the cloud refuses the size.
    TooLarge,
    /// 415: the data does not match the declared format.
    UnsupportedMedia,
    /// 5xx.
    Server,
    /// The upload or a request did not finish in time.
    Timeout,
    /// Network or local file errors.
    Io,
    /// A command driver's command failed.
    Command,
}

/// A driver error: what kind, and a one-line message naming the cloud, image and cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ProviderError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ProviderError {
        ProviderError {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ProviderError {}

/// One configured provider's connection to its cloud.
pub trait ProviderDriver: Send + Sync {
    /// The provider name from the config.
    fn name(&self) -> &str;

    /// The image format this provider takes (OpenStack: provider `image-format`, else the
    /// cloud's `image_format` in clouds.yaml, else `qcow2`; command: its `image-format`).
    fn image_format(&self) -> &str;

    /// Uploads the file and waits until the cloud image is usable. On failure the driver
    /// removes any cloud image it created for this request before returning (nothing leaks).
    fn upload(&self, req: &UploadRequest) -> Result<Uploaded, ProviderError>;

    /// Deletes a cloud image by id. Deleting an image that no longer exists is success.
    fn delete(&self, external_id: &str) -> Result<(), ProviderError>;

    /// Lists the cloud images carrying `nodepool_provider_name=<this provider>`, for leak
    /// detection. A command provider without a `list-command` returns an empty list.
    fn list_images(&self) -> Result<Vec<CloudImage>, ProviderError>;
}

/// A provider's image format as far as its config says, without setting up its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfiguredFormat {
    /// The config names it (`image-format`).
    Named(String),
    /// The config leaves it to the cloud (OpenStack: the `clouds.yaml` entry's
    /// `image_format`); this is the driver's default, what it takes when the cloud says
    /// nothing either.
    DriverDefault(&'static str),
}

impl ConfiguredFormat {
    /// The format, named or default.
    pub fn format(&self) -> &str {
        match self {
            ConfiguredFormat::Named(f) => f,
            ConfiguredFormat::DriverDefault(f) => f,
        }
    }
}

/// A provider's image format from its config alone (for a provider whose driver could not
/// be set up, and for decisions made before any driver exists).
pub fn configured_format(provider: &config::Provider) -> ConfiguredFormat {
    match &provider.driver {
        config::Driver::OpenStack {
            image_format: Some(f),
            ..
        } => ConfiguredFormat::Named(f.clone()),
        config::Driver::OpenStack {
            image_format: None, ..
        } => ConfiguredFormat::DriverDefault(openstack::DEFAULT_IMAGE_FORMAT),
        config::Driver::Command { image_format, .. } | config::Driver::Aws { image_format, .. } => {
            ConfiguredFormat::Named(image_format.clone())
        }
    }
}

/// The files a provider's driver reads that may hold credentials, as it would find them in
/// this process's environment: for OpenStack the `secure.yaml` and a `clouds.yaml` holding a
/// secret (`openstack::clouds::secret_files`); for aws the shared credentials and config
/// files that exist (`aws::credentials`); none for the command driver, whose commands are
/// the operator's.
pub fn secret_files(provider: &config::Provider) -> Vec<PathBuf> {
    match &provider.driver {
        config::Driver::OpenStack { .. } => {
            openstack::clouds::secret_files(&openstack::clouds::SearchEnv::from_process())
        }
        config::Driver::Aws { .. } => aws::credentials::AwsEnv::from_process().secret_files(),
        config::Driver::Command { .. } => Vec::new(),
    }
}

/// Creates the driver for a configured provider. `clouds_yaml` overrides the clouds.yaml
/// search (tests and `OS_CLIENT_CONFIG_FILE` handling live in the OpenStack driver).
pub fn for_provider(
    provider: &config::Provider,
    clouds_yaml: Option<&Path>,
) -> Result<Box<dyn ProviderDriver>, ProviderError> {
    DriverSetup::new(clouds_yaml).driver(provider)
}

/// One set-up of drivers (at start and at each reload): what its drivers share, i.e. the CA
/// stores of the OpenStack driver, each read at most once and only when a provider needs it.
pub struct DriverSetup<'a> {
    clouds_yaml: Option<&'a Path>,
    trust: std::sync::Arc<openstack::trust::TrustStores>,
}

impl<'a> DriverSetup<'a> {
    /// A set-up in this process's environment; `clouds_yaml` as for [`for_provider`].
    pub fn new(clouds_yaml: Option<&'a Path>) -> DriverSetup<'a> {
        DriverSetup {
            clouds_yaml,
            trust: std::sync::Arc::new(openstack::trust::TrustStores::from_process()),
        }
    }

    /// Creates the driver for a configured provider.
    pub fn driver(
        &self,
        provider: &config::Provider,
    ) -> Result<Box<dyn ProviderDriver>, ProviderError> {
        match &provider.driver {
            config::Driver::OpenStack { .. } => Ok(Box::new(openstack::OpenStackDriver::new_in(
                provider,
                self.clouds_yaml,
                &self.trust,
            )?)),
            config::Driver::Command { .. } => Ok(Box::new(command::CommandDriver::new(provider)?)),
            config::Driver::Aws { .. } => Ok(Box::new(aws::AwsDriver::new(provider, &self.trust)?)),
        }
    }
}
