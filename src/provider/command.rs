//! Placeholder for the command driver (being written).

use super::{CloudImage, ErrorKind, ProviderDriver, ProviderError, UploadRequest, Uploaded};
use crate::config;

/// The command driver.
pub struct CommandDriver;

impl CommandDriver {
    pub fn new(_provider: &config::Provider) -> Result<CommandDriver, ProviderError> {
        Err(ProviderError::new(ErrorKind::Config, "the command driver is not available yet"))
    }
}

impl ProviderDriver for CommandDriver {
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
