//! The cloud drivers (`src/provider`) called directly, without the daemon or ZooKeeper:
//!
//! * [`openstack`]: the OpenStack driver against a real Glance and Keystone from PyPI;
//! * [`command_driver`]: the command driver with shell-script "clouds".
//!
//! The upload pipeline that drives them from build records, through the real binary, is in
//! `uploads`.

mod command_driver;
mod openstack;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use nodepool_builder::provider::UploadRequest;

/// An upload of `file` (in `format`) to `provider` as the builder asks for one: a fresh build
/// id, upload 1, nodepool's `nodepool_*` properties and a `distro` one, a 300 s timeout.
fn request(provider: &str, file: &Path, format: &str) -> UploadRequest {
    let build_id = uuid::Uuid::new_v4().simple().to_string();
    let properties = BTreeMap::from([
        ("nodepool_build_id".to_string(), build_id.clone()),
        ("nodepool_upload_id".to_string(), "0000000001".to_string()),
        ("nodepool_provider_name".to_string(), provider.to_string()),
        ("distro".to_string(), "debian bookworm".to_string()),
    ]);
    UploadRequest {
        image_name: "debian".to_string(),
        build_id,
        upload_id: "0000000001".to_string(),
        external_name: format!("debian-{}", std::process::id()),
        file: file.to_path_buf(),
        format: format.to_string(),
        md5: None,
        sha256: None,
        properties,
        timeout: Duration::from_secs(300),
        progress: Default::default(),
    }
}
