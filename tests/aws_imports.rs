//! The aws driver's `snapshot` and `image` import methods as an operator meets them: the
//! builder stages the image in S3 (multipart), EC2's VM Import makes the snapshot or AMI,
//! and the AMI and snapshot carry nodepool's tags, while the S3 object is gone afterwards.
//!
//! moto 5.2.5 has S3 and EC2 but no VM Import, so these tests run against
//! `MotoServer::start_with_import_standin`: the stand-in answers `ImportSnapshot` /
//! `ImportImage` and their `Describe…Tasks` on moto's real S3 and EBS APIs and keeps a
//! journal of every request (`requests()`), which is how the tests see what the builder
//! asked `RegisterImage` for (moto keeps only the name). A failed import is what the
//! stand-in reports for an object it cannot convert: `deleted`, as AWS does.

use std::path::Path;
use std::time::Duration;

use nodepool_builder::config::{self, AwsImportMethod};
use nodepool_builder::model::UploadState;
use nodepool_builder::provider::aws::AwsDriver;
use nodepool_builder::provider::{ErrorKind, ProviderDriver, UploadRequest};
use serde_json::{Value, json};

use crate::util::faultproxy::{Fault, FaultProxy, Rule};
use crate::util::moto::MotoServer;

const BUCKET: &str = "nodepool-images";
/// The image size: more than two of the driver's 8 MiB parts (S3's minimum is 5 MiB).
const IMAGE_MB: u64 = 17;

/// Creates the bucket the provider stages images in.
fn create_bucket(moto: &MotoServer) {
    moto.boto3(&format!("s3.create_bucket(Bucket=\"{BUCKET}\")"));
}

/// What moto holds: the objects and unfinished multipart uploads of the bucket, our tagged
/// snapshots, and every AMI (with the snapshots its mapping names).
fn cloud_state(moto: &MotoServer) -> Value {
    let out = moto.boto3(&format!(
        r#"
state = {{"objects": [], "multipart": [], "snapshots": {{}}, "images": {{}}}}
state["objects"] = [o["Key"] for o in s3.list_objects_v2(Bucket="{BUCKET}").get("Contents", [])]
state["multipart"] = [u["Key"] for u in s3.list_multipart_uploads(Bucket="{BUCKET}").get("Uploads", [])]
for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]:
    tags = {{t["Key"]: t["Value"] for t in s.get("Tags", [])}}
    if "Created by the import stand-in" in s.get("Description", "") or tags:
        state["snapshots"][s["SnapshotId"]] = {{"size": s["VolumeSize"], "tags": tags}}
for i in ec2.describe_images(Owners=["self"])["Images"]:
    state["images"][i["ImageId"]] = {{"name": i["Name"],
        "tags": {{t["Key"]: t["Value"] for t in i.get("Tags", [])}}}}
out(state)
"#
    ));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("no JSON ({e}): {out}"))
}

/// The journal entries of EC2 `action`.
fn actions(moto: &MotoServer, action: &str) -> Vec<Value> {
    moto.requests()
        .into_iter()
        .filter(|r| r["action"] == action)
        .collect()
}

/// The S3 part uploads (`PUT …?partNumber=N&uploadId=…`) in the journal.
fn part_uploads(moto: &MotoServer) -> usize {
    moto.requests()
        .iter()
        .filter(|r| {
            r["method"] == "PUT"
                && r["path"]
                    .as_str()
                    .is_some_and(|p| p.contains("partNumber="))
                && r["status"] == 200
        })
        .count()
}

/// A site with one aws provider importing `fedora` (a random raw image of [`IMAGE_MB`]).
fn start_site(
    moto: &MotoServer,
    name: &str,
    import_method: &str,
) -> (
    crate::util::site::TestSite,
    crate::util::builder::BuilderProcess,
) {
    let site = crate::util::site::TestSite::new(name);
    site.config(
        0,
        "",
        &format!(
            "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{{fake_dib}}\"\nformats = [\"raw\"]\n\
             [diskimages.env-vars]\nFAKE_DIB_SIZE_MB = \"{IMAGE_MB}\"\n\
             \n[[providers]]\nname = \"ec2\"\ndriver = \"aws\"\nregion-name = \"us-east-1\"\nrate = 0\n\
             [providers.object-storage]\nbucket-name = \"{BUCKET}\"\n\
             [[providers.diskimages]]\nname = \"fedora\"\nimport-method = \"{import_method}\"\n\
             tags = {{ team = \"ci\" }}\n"
        ),
    );
    let env = moto.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = site.start_with_env(0, &[], &env);
    (site, b)
}

fn nodepool_tags(build: &str, upload: &str) -> Value {
    json!({
        "nodepool_build_id": build,
        "nodepool_upload_id": upload,
        "nodepool_provider_name": "ec2",
        "team": "ci",
    })
}

#[test]
fn a_snapshot_import_registers_a_tagged_ami_with_nodepools_mapping_and_deletes_the_object() {
    let moto = MotoServer::start_with_import_standin("aws_import_snapshot");
    create_bucket(&moto);
    let (site, b) = start_site(&moto, "aws_import_snapshot", "snapshot");
    let (build, up) = site
        .wait_uploads("fedora", "ec2", UploadState::Ready, 1)
        .remove(0);
    let ami = up.upload.external_id.clone().unwrap();
    let name = up.upload.external_name.clone().unwrap();
    assert!(ami.starts_with("ami-"), "{up:?}");

    let state = cloud_state(&moto);
    let tags = nodepool_tags(&build, &up.id);
    assert_eq!(state["images"][&ami]["tags"], tags, "{state}");
    assert_eq!(state["images"][&ami]["name"], name.as_str(), "{state}");
    let snapshots = state["snapshots"].as_object().unwrap();
    assert_eq!(snapshots.len(), 1, "one imported snapshot: {state}");
    let (snapshot, snap) = snapshots.iter().next().unwrap();
    assert_eq!(snap["tags"], tags, "{state}");
    assert_eq!(
        state["objects"],
        json!([]),
        "the S3 object is deleted: {state}"
    );
    assert_eq!(state["multipart"], json!([]), "{state}");

    // The object nodepool 11 names, imported with the provider's format and the task tags.
    let import = actions(&moto, "ImportSnapshot");
    assert_eq!(import.len(), 1, "{import:?}");
    let p = &import[0]["params"];
    assert_eq!(p["DiskContainer.Format"], "raw", "{p}");
    assert_eq!(p["DiskContainer.UserBucket.S3Bucket"], BUCKET, "{p}");
    assert_eq!(
        p["DiskContainer.UserBucket.S3Key"],
        format!("{name}.raw"),
        "{p}"
    );
    assert_eq!(
        p["TagSpecification.1.ResourceType"], "import-snapshot-task",
        "{p}"
    );
    // 17 MiB went up in three parts (8 + 8 + 1 MiB), never as one body.
    assert_eq!(part_uploads(&moto), 3, "{:?}", moto.requests());

    // RegisterImage was asked for what nodepool 11 asks (moto drops all but the name).
    let register = actions(&moto, "RegisterImage");
    assert_eq!(register.len(), 1, "{register:?}");
    let p = &register[0]["params"];
    for (key, want) in [
        ("Name", name.as_str()),
        ("Architecture", "x86_64"),
        ("RootDeviceName", "/dev/sda1"),
        ("VirtualizationType", "hvm"),
        ("EnaSupport", "true"),
        ("BlockDeviceMapping.1.DeviceName", "/dev/sda1"),
        ("BlockDeviceMapping.1.Ebs.SnapshotId", snapshot.as_str()),
        ("BlockDeviceMapping.1.Ebs.VolumeSize", "1"),
        ("BlockDeviceMapping.1.Ebs.VolumeType", "gp3"),
        ("BlockDeviceMapping.1.Ebs.DeleteOnTermination", "true"),
        ("TagSpecification.1.ResourceType", "image"),
    ] {
        assert_eq!(p[key], want, "RegisterImage {key}: {p}");
    }
    assert!(p.get("ImdsSupport").is_none(), "{p}");
    assert!(
        !b.log().contains("testing-secret-key"),
        "the secret key is never logged"
    );
}

#[test]
fn an_image_import_tags_the_imported_ami_and_its_snapshot_and_deletes_the_object() {
    let moto = MotoServer::start_with_import_standin("aws_import_image");
    create_bucket(&moto);
    let (site, _b) = start_site(&moto, "aws_import_image", "image");
    let (build, up) = site
        .wait_uploads("fedora", "ec2", UploadState::Ready, 1)
        .remove(0);
    let ami = up.upload.external_id.clone().unwrap();
    let name = up.upload.external_name.clone().unwrap();

    let state = cloud_state(&moto);
    let tags = nodepool_tags(&build, &up.id);
    // EC2 names an imported AMI after its task; the record names it by id.
    assert!(
        state["images"][&ami]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("import-ami-")),
        "{state}"
    );
    assert_eq!(state["images"][&ami]["tags"], tags, "{state}");
    let snapshots = state["snapshots"].as_object().unwrap();
    assert_eq!(snapshots.len(), 1, "{state}");
    assert_eq!(snapshots.values().next().unwrap()["tags"], tags, "{state}");
    assert_eq!(
        state["objects"],
        json!([]),
        "the S3 object is deleted: {state}"
    );

    let import = actions(&moto, "ImportImage");
    assert_eq!(import.len(), 1, "{import:?}");
    let p = &import[0]["params"];
    assert_eq!(p["Architecture"], "x86_64", "{p}");
    assert_eq!(p["DiskContainer.1.Format"], "raw", "{p}");
    assert_eq!(p["DiskContainer.1.UserBucket.S3Bucket"], BUCKET, "{p}");
    assert_eq!(
        p["DiskContainer.1.UserBucket.S3Key"],
        format!("{name}.raw"),
        "{p}"
    );
    assert_eq!(
        p["TagSpecification.1.ResourceType"], "import-image-task",
        "{p}"
    );
    assert!(
        actions(&moto, "RegisterImage").is_empty(),
        "ImportImage makes the AMI; the builder registers none"
    );
    assert_eq!(part_uploads(&moto), 3, "{:?}", moto.requests());

    // Deleting the upload's AMI (the janitor, `image-delete`) removes the imported
    // snapshot too, found by the upload's tags.
    vmdk_driver(&moto.env(), AwsImportMethod::Image)
        .delete(&ami)
        .unwrap_or_else(|e| panic!("{e}"));
    let state = cloud_state(&moto);
    assert_eq!(state["images"], json!({}), "{state}");
    assert_eq!(state["snapshots"], json!({}), "{state}");
}

/// A driver for a `vmdk` provider `ec2` staging in [`BUCKET`] with `import_method`, in the
/// AWS environment `vars`.
fn vmdk_driver(vars: &[(String, String)], import_method: AwsImportMethod) -> AwsDriver {
    let provider = crate::util::aws::aws_provider("ec2", "vmdk", Some(BUCKET), import_method);
    crate::util::aws::aws_driver(&provider, vars)
}

fn vmdk_request(file: &Path) -> UploadRequest {
    crate::util::aws::upload_request(file, "ec2", "vmdk", &[])
}

#[test]
fn a_failed_import_fails_the_upload_and_leaves_no_object_snapshot_or_ami() {
    let moto = MotoServer::start_with_import_standin("aws_import_failed");
    create_bucket(&moto);
    let dir = tempfile::tempdir().unwrap();
    // Not a VMDK: EC2's conversion fails and the task ends `deleted`.
    let file = dir.path().join("debian.vmdk");
    std::fs::write(&file, vec![b'x'; 6 << 20]).unwrap();
    for (method, action) in [
        (AwsImportMethod::Snapshot, "ImportSnapshot"),
        (AwsImportMethod::Image, "ImportImage"),
    ] {
        let err = vmdk_driver(&moto.env(), method)
            .upload(&vmdk_request(&file))
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Server, "{err}");
        assert!(
            err.message.contains("import task import-")
                && err.message.contains("failed: ClientError"),
            "{action}: {err}"
        );
        let state = cloud_state(&moto);
        assert_eq!(
            state,
            json!({"objects": [], "multipart": [], "snapshots": {}, "images": {}}),
            "{action}: nothing is left behind"
        );
        assert_eq!(actions(&moto, action).len(), 1, "{action}");
    }
    assert!(actions(&moto, "RegisterImage").is_empty());
}

#[test]
fn an_upload_to_a_bucket_that_does_not_exist_fails_clearly_and_imports_nothing() {
    // The bucket does not exist: CreateMultipartUpload fails, nothing is imported.
    let moto = MotoServer::start_with_import_standin("aws_import_no_bucket");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("debian.vmdk");
    std::fs::write(&file, b"x").unwrap();
    let err = vmdk_driver(&moto.env(), AwsImportMethod::Snapshot)
        .upload(&vmdk_request(&file))
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    assert!(
        err.message
            .contains("CreateMultipartUpload: HTTP 404 NoSuchBucket"),
        "{err}"
    );
    assert!(actions(&moto, "ImportSnapshot").is_empty());
}

#[test]
fn snapshot_and_image_imports_without_a_bucket_are_config_errors() {
    let head = "images-dir = \"/images\"\n[[zookeeper-servers]]\nhost = \"zk\"\n\
                [[diskimages]]\nname = \"img\"\n[[diskimages]]\nname = \"img2\"\n\
                [[diskimages]]\nname = \"img3\"\n";
    let src = format!(
        "{head}[[providers]]\nname = \"ec2\"\ndriver = \"aws\"\nregion-name = \"r\"\n\
         [[providers.diskimages]]\nname = \"img\"\n\
         [[providers.diskimages]]\nname = \"img2\"\nimport-method = \"image\"\n\
         [[providers.diskimages]]\nname = \"img3\"\nimport-method = \"ebs-direct\"\n"
    );
    let errors = config::load_str(Path::new("/etc/nodepool/builder.toml"), &src, None)
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains(
            "import-method \"snapshot\" (the default) stages the image in S3: it needs the provider's `object-storage.bucket-name`"
        ),
        "{errors}"
    );
    assert!(
        errors.contains(":18:1: import-method \"image\" stages the image in S3"),
        "{errors}"
    );
    assert_eq!(
        errors.matches("stages the image in S3").count(),
        2,
        "{errors}"
    );
    // With the bucket, the same config loads.
    let src = src.replace(
        "region-name = \"r\"\n",
        "region-name = \"r\"\nobject-storage = { bucket-name = \"b\" }\n",
    );
    config::load_str(Path::new("/etc/nodepool/builder.toml"), &src, None)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_part_s3_refuses_aborts_the_multipart_upload_and_imports_nothing() {
    let moto = MotoServer::start_with_import_standin("aws_import_part_fails");
    create_bucket(&moto);
    let proxy = FaultProxy::start(moto.endpoint_addr());
    // Every PUT through the proxy (only S3's UploadPart goes there) gets a 500.
    proxy.set(vec![Rule::new("PUT", "", Fault::Status(500))]);
    let mut vars = moto.env();
    vars.push(("AWS_ENDPOINT_URL_S3".into(), proxy.url()));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("debian.vmdk");
    std::fs::write(&file, vec![b'x'; 1 << 20]).unwrap();

    let err = vmdk_driver(&vars, AwsImportMethod::Snapshot)
        .upload(&vmdk_request(&file))
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Server, "{err}");
    assert!(err.message.contains("UploadPart 1: HTTP 500"), "{err}");
    // Three attempts, then AbortMultipartUpload: S3 keeps no parts, nothing is imported.
    // (The proxy records an exchange when it has relayed the answer: wait for the record.)
    crate::util::wait_until(
        Duration::from_secs(10),
        "the proxy to record the AbortMultipartUpload",
        || proxy.count("DELETE ") == 1,
    );
    assert_eq!(proxy.count("PUT "), 3, "{:?}", proxy.requests());
    let state = cloud_state(&moto);
    assert_eq!(
        state,
        json!({"objects": [], "multipart": [], "snapshots": {}, "images": {}}),
        "{:?}",
        proxy.requests()
    );
    assert!(actions(&moto, "ImportSnapshot").is_empty());
}
