//! Placeholder for the OpenStack driver (being written).
use std::path::Path;

use super::{CloudImage, ErrorKind, ProviderDriver, ProviderError, UploadRequest, Uploaded};
use crate::config;

/// The OpenStack driver.
pub struct OpenStackDriver;

impl OpenStackDriver {
    pub fn new(_provider: &config::Provider, _clouds_yaml: Option<&Path>) -> Result<OpenStackDriver, ProviderError> {
        Err(ProviderError::new(ErrorKind::Config, "the openstack driver is not available yet"))
    }
}

impl ProviderDriver for OpenStackDriver {
    fn name(&self) -> &str {
        ""
    }
    fn image_format(&self) -> &str {
        "qcow2"
    }
    fn upload(&self, _req: &UploadRequest) -> Result<Uploaded, ProviderError> {
        Err(ProviderError::new(ErrorKind::Config, "not available"))
    }
    fn delete(&self, _external_id: &str) -> Result<(), ProviderError> {
        Err(ProviderError::new(ErrorKind::Config, "not available"))
    }
    fn list_images(&self) -> Result<Vec<CloudImage>, ProviderError> {
        Ok(Vec::new())
    }
}
