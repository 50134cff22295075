//! The aws driver as an operator meets it: nodepool 11's aws provider keys in our TOML and
//! in nodepool.yaml (defaults, refusals), and uploads, deletions and leak detection against
//! a real EC2/EBS stand-in (moto) started by the test tooling.

use std::path::Path;

use nodepool_builder::config::{self, AwsImage, AwsImportMethod, Driver};

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config")
}

const HEAD: &str = "images-dir = \"/images\"\n[[zookeeper-servers]]\nhost = \"zk\"\n\
                    [[diskimages]]\nname = \"img\"\n";

fn load(src: &str) -> Result<config::Config, config::ConfigErrors> {
    config::load_str(Path::new("/etc/nodepool/builder.toml"), src, None)
}

#[test]
fn an_aws_provider_reads_nodepools_keys_with_nodepools_defaults() {
    let src = format!(
        "{HEAD}[[providers]]\nname = \"ec2\"\ndriver = \"aws\"\nregion-name = \"eu-west-1\"\n\
         [[providers.diskimages]]\nname = \"img\"\n"
    );
    let config = load(&src).unwrap_or_else(|e| panic!("{e}"));
    let p = &config.providers[0];
    assert_eq!(
        p.driver,
        Driver::Aws {
            region_name: "eu-west-1".into(),
            profile_name: None,
            bucket_name: None,
            image_format: "raw".into()
        }
    );
    // nodepool's aws `rate` is 2 calls per second: half a second between calls.
    assert_eq!(p.rate, 0.5);
    assert_eq!(p.image_name_format, "{image_name}-{timestamp}");
    assert_eq!(
        p.diskimages[0].aws,
        Some(AwsImage {
            import_method: AwsImportMethod::Snapshot,
            architecture: "x86_64".into(),
            ena_support: true,
            volume_size: None,
            volume_type: "gp3".into(),
            iops: None,
            throughput: None,
            imds_v2: false,
        })
    );
}

#[test]
fn the_full_fixture_aws_provider_has_every_key_in_toml_and_yaml() {
    let dir = fixtures().join("good");
    for file in ["full.toml", "full.yaml"] {
        let config = config::load(&dir.join(file), None).unwrap_or_else(|e| panic!("{e}"));
        let p = config.provider("aws-east").unwrap();
        assert_eq!(
            p.driver,
            Driver::Aws {
                region_name: "us-east-1".into(),
                profile_name: Some("nodepool".into()),
                bucket_name: Some("nodepool-images".into()),
                image_format: "raw".into()
            },
            "{file}"
        );
        assert_eq!(p.rate, 0.25, "{file}: rate 4 per second");
        assert_eq!(p.image_upload_timeout, 7200, "{file}: image-import-timeout");
        let jammy = &p.diskimages[0];
        assert_eq!(jammy.meta.get("team").map(String::as_str), Some("ci"));
        assert_eq!(
            jammy.aws,
            Some(AwsImage {
                import_method: AwsImportMethod::EbsDirect,
                architecture: "arm64".into(),
                ena_support: false,
                volume_size: Some(20),
                volume_type: "io2".into(),
                iops: Some(4000),
                throughput: Some(250),
                imds_v2: true,
            }),
            "{file}"
        );
        assert_eq!(
            p.diskimages[1].aws.as_ref().map(|a| a.import_method),
            Some(AwsImportMethod::Snapshot)
        );
    }
}

#[test]
fn bad_aws_keys_are_refused_with_their_position() {
    let src = format!(
        "{HEAD}[[providers]]\nname = \"ec2\"\ndriver = \"aws\"\nimage-format = \"qcow2\"\n\
         cloud = \"x\"\n[[providers.diskimages]]\nname = \"img\"\nimport-method = \"s3\"\n\
         imds-support = \"v1\"\nmeta = {{ a = \"b\" }}\n\
         [[providers]]\nname = \"os\"\ncloud = \"c\"\nprofile-name = \"p\"\n\
         [[providers.diskimages]]\nname = \"img\"\nimport-method = \"ebs-direct\"\n"
    );
    let errors = load(&src).unwrap_err().to_string();
    for expected in [
        "missing required key `region-name`",
        "`image-format` of an aws provider must be one of ova, vhd, vhdx, vmdk, raw",
        "`cloud` is only valid for driver \"openstack\"",
        "`import-method` must be \"snapshot\", \"image\" or \"ebs-direct\"",
        "`imds-support` must be \"v2.0\"",
        "image tags are `tags`",
        "`profile-name` is only valid for driver \"aws\"",
        "`import-method` is only valid for driver \"aws\"",
    ] {
        assert!(errors.contains(expected), "{expected:?} not in:\n{errors}");
    }
    assert!(!errors.contains("unknown key"), "{errors}");
    // nodepool 11 refuses IMDSv2 with an image import.
    let src = format!(
        "{HEAD}[[providers]]\nname = \"ec2\"\ndriver = \"aws\"\nregion-name = \"r\"\n\
         [[providers.diskimages]]\nname = \"img\"\nimport-method = \"image\"\nimds-support = \"v2.0\"\n"
    );
    let errors = load(&src).unwrap_err().to_string();
    assert!(errors.contains(":13:16:"), "{errors}");
    assert!(errors.contains("`imds-support: v2.0` needs"), "{errors}");
}
