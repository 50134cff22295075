//! The aws driver's inputs for the tests that call it directly (`tests/aws_uploads.rs`,
//! `tests/aws_imports.rs`): a provider as the config loader would make it, a driver bound to
//! a given AWS environment (a builder's, e.g. [`super::moto::MotoServer::env`], never the test
//! process's own), and an upload request carrying nodepool's tags. The daemon's own reading
//! of these keys is tested from TOML and YAML in `tests/aws_uploads.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nodepool_builder::config::{self, AwsImage, AwsImportMethod, Driver, ProviderDiskImage};
use nodepool_builder::provider::UploadRequest;
use nodepool_builder::provider::aws::AwsDriver;
use nodepool_builder::provider::aws::credentials::AwsEnv;
use nodepool_builder::provider::openstack::trust::TrustStores;

/// An aws provider `name` in `us-east-1` (no rate limit, 300 s upload timeout) uploading the
/// diskimage `debian` in `image_format` with `import_method`, staging in `bucket` (the
/// `snapshot` and `image` imports need one); every other key at nodepool's default.
pub fn aws_provider(
    name: &str,
    image_format: &str,
    bucket: Option<&str>,
    import_method: AwsImportMethod,
) -> config::Provider {
    config::Provider {
        name: name.into(),
        driver: Driver::Aws {
            region_name: "us-east-1".into(),
            profile_name: None,
            bucket_name: bucket.map(str::to_string),
            image_format: image_format.into(),
        },
        rate: 0.0,
        image_name_format: "{image_name}-{timestamp}".into(),
        image_upload_timeout: 300,
        post_upload_hook: None,
        diskimages: vec![ProviderDiskImage {
            name: "debian".into(),
            pause: false,
            meta: BTreeMap::new(),
            aws: Some(AwsImage {
                import_method,
                architecture: "x86_64".into(),
                ena_support: true,
                volume_size: None,
                volume_type: "gp3".into(),
                iops: None,
                throughput: None,
                imds_v2: false,
            }),
        }],
    }
}

/// The driver of `provider` in the AWS environment `vars` (no home directory: no
/// `~/.aws` files but those `vars` name).
pub fn aws_driver(provider: &config::Provider, vars: &[(String, String)]) -> AwsDriver {
    let env = AwsEnv {
        vars: vars.iter().cloned().collect(),
        home: None,
    };
    AwsDriver::with_env(provider, env, &Arc::new(TrustStores::from_process()))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Upload 0000000001 of a new build of `debian` from `file` in `format` to `provider`,
/// tagged with nodepool's three keys plus `tags`, named `debian-1700000000`, 120 s to go.
pub fn upload_request(
    file: &Path,
    provider: &str,
    format: &str,
    tags: &[(&str, &str)],
) -> UploadRequest {
    let build_id = uuid::Uuid::new_v4().simple().to_string();
    let mut properties = BTreeMap::from([
        ("nodepool_build_id".to_string(), build_id.clone()),
        ("nodepool_upload_id".to_string(), "0000000001".to_string()),
        ("nodepool_provider_name".to_string(), provider.to_string()),
    ]);
    properties.extend(tags.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    UploadRequest {
        image_name: "debian".into(),
        build_id,
        upload_id: "0000000001".into(),
        external_name: "debian-1700000000".into(),
        file: file.to_path_buf(),
        format: format.into(),
        md5: None,
        sha256: None,
        properties,
        timeout: Duration::from_secs(120),
        progress: Default::default(),
    }
}
