//! The aws driver as an operator meets it: nodepool 11's aws provider keys in our TOML and
//! in nodepool.yaml (defaults, refusals), and uploads, deletions and leak detection against
//! a real EC2/EBS stand-in (moto) started by the test tooling.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nodepool_builder::config::{self, AwsImage, AwsImportMethod, Driver};
use nodepool_builder::provider::aws::AwsDriver;
use nodepool_builder::provider::aws::credentials::AwsEnv;
use nodepool_builder::provider::openstack::trust::TrustStores;
use nodepool_builder::provider::{ErrorKind, ProviderDriver, UploadRequest};
use serde_json::{Value, json};

use crate::util::faultproxy::{Fault, FaultProxy, Rule};
use crate::util::moto::MotoServer;

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
         object-storage = {{ bucket-name = \"images\" }}\n\
         [[providers.diskimages]]\nname = \"img\"\n"
    );
    let config = load(&src).unwrap_or_else(|e| panic!("{e}"));
    let p = &config.providers[0];
    assert_eq!(
        p.driver,
        Driver::Aws {
            region_name: "eu-west-1".into(),
            profile_name: None,
            bucket_name: Some("images".into()),
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

// ---- the driver against moto ----------------------------------------------------------

const PROVIDER: &str = "ec2-test";
const BLOCK: usize = 512 * 1024;

fn aws_provider() -> config::Provider {
    crate::util::aws::aws_provider(PROVIDER, "raw", None, AwsImportMethod::EbsDirect)
}

/// A driver in `vars` (a builder's AWS environment), never the test process's own.
fn driver(vars: Vec<(String, String)>) -> AwsDriver {
    crate::util::aws::aws_driver(&aws_provider(), &vars)
}

/// A raw image of three 512 KiB blocks: data, zeros, and 100 bytes of data at the end.
fn image_file(dir: &Path) -> PathBuf {
    let mut data = vec![b'A'; BLOCK];
    data.extend(vec![0u8; BLOCK]);
    data.extend(vec![b'B'; 100]);
    let path = dir.join("debian.raw");
    std::fs::write(&path, data).unwrap();
    path
}

fn request(file: &Path) -> UploadRequest {
    crate::util::aws::upload_request(file, PROVIDER, "raw", &[("team", "ci")])
}

/// What moto holds: our snapshots (by owner), every AMI, as JSON.
fn cloud_state(moto: &MotoServer) -> Value {
    let out = moto.boto3(
        r#"
snaps = ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
state = {"snapshots": {}, "images": {}}
for s in snaps:
    tags = {t["Key"]: t["Value"] for t in s.get("Tags", [])}
    if "nodepool_build_id" not in tags:
        continue  # moto's own snapshots behind AMIs
    blocks = ebs.list_snapshot_blocks(SnapshotId=s["SnapshotId"])["Blocks"]
    state["snapshots"][s["SnapshotId"]] = {"state": s["State"], "size": s["VolumeSize"],
        "tags": tags, "blocks": [b["BlockIndex"] for b in blocks]}
for i in ec2.describe_images(Owners=["self"])["Images"]:
    state["images"][i["ImageId"]] = {"name": i["Name"], "state": i["State"],
        "tags": {t["Key"]: t["Value"] for t in i.get("Tags", [])}}
out(state)
"#,
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("no JSON ({e}): {out}"))
}

#[test]
fn ebs_direct_upload_registers_a_tagged_ami_from_the_written_blocks() {
    let moto = MotoServer::start("aws_ebs_direct_upload");
    let dir = tempfile::tempdir().unwrap();
    let req = request(&image_file(dir.path()));
    let driver = driver(moto.env());

    let uploaded = driver
        .upload(&req)
        .unwrap_or_else(|e| panic!("{e}; moto: {}", moto.log_tail(20)));
    assert!(uploaded.external_id.starts_with("ami-"), "{uploaded:?}");

    let state = cloud_state(&moto);
    let image = &state["images"][&uploaded.external_id];
    assert_eq!(image["name"], "debian-1700000000", "{state}");
    let tags = json!({
        "nodepool_build_id": req.build_id,
        "nodepool_upload_id": "0000000001",
        "nodepool_provider_name": PROVIDER,
        "team": "ci",
    });
    assert_eq!(image["tags"], tags, "{state}");
    let snapshots = state["snapshots"].as_object().unwrap();
    assert_eq!(snapshots.len(), 1, "{state}");
    let snapshot = snapshots.values().next().unwrap();
    assert_eq!(snapshot["tags"], tags, "{state}");
    assert_eq!(snapshot["state"], "completed", "{state}");
    assert_eq!(snapshot["size"], 1, "{state}: 1.0 MiB rounds up to 1 GiB");
    // The all-zero block in the middle is not sent; the short last block is.
    assert_eq!(snapshot["blocks"], json!([0, 2]), "{state}");
    assert_eq!(
        req.progress.transfer().map(|t| t.sent),
        Some(2 * BLOCK as u64 + 100)
    );

    // The launcher-side view: the AMI is what leak detection lists, its snapshot is not.
    let listed = driver.list_images().unwrap();
    let ids: Vec<&str> = listed.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, [uploaded.external_id.as_str()]);
    assert_eq!(listed[0].properties["nodepool_build_id"], req.build_id);
}

#[test]
fn deleting_an_ami_deregisters_it_and_deletes_its_snapshot() {
    let moto = MotoServer::start("aws_delete");
    let dir = tempfile::tempdir().unwrap();
    let req = request(&image_file(dir.path()));
    let driver = driver(moto.env());
    let id = driver.upload(&req).unwrap().external_id;

    driver.delete(&id).unwrap_or_else(|e| panic!("{e}"));
    let state = cloud_state(&moto);
    assert_eq!(state["images"], json!({}), "{state}");
    assert_eq!(state["snapshots"], json!({}), "{state}");
    // Deleting what is gone is success (the janitor may try twice).
    driver
        .delete(&id)
        .unwrap_or_else(|e| panic!("second delete: {e}"));
    assert!(driver.list_images().unwrap().is_empty());
}

#[test]
fn an_upload_without_credentials_fails_clearly_and_creates_nothing() {
    let moto = MotoServer::start("aws_no_credentials");
    let dir = tempfile::tempdir().unwrap();
    let req = request(&image_file(dir.path()));
    let vars: Vec<(String, String)> = moto
        .env()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS_KEY_ID") && k != "AWS_SECRET_ACCESS_KEY")
        .collect();
    let err = driver(vars).upload(&req).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Auth, "{err}");
    assert!(
        err.message.starts_with(&format!(
            "provider {PROVIDER}: upload of debian-1700000000: no AWS credentials for profile default: "
        )) && err.message.contains("aws-credentials (no [default])"),
        "{err}"
    );
    let state = cloud_state(&moto);
    assert_eq!(state, json!({"images": {}, "snapshots": {}}));
}

#[test]
fn a_failed_block_write_deletes_the_snapshot_and_registers_nothing() {
    let moto = MotoServer::start("aws_failed_block");
    let proxy = FaultProxy::start(moto.endpoint_addr());
    proxy.set(vec![Rule::new("PUT", "/blocks/2", Fault::Status(500))]);
    let dir = tempfile::tempdir().unwrap();
    let req = request(&image_file(dir.path()));
    let mut vars = moto.env();
    vars.push(("AWS_ENDPOINT_URL_EBS".into(), proxy.url()));
    let secret = vars
        .iter()
        .find(|(k, _)| k == "AWS_SECRET_ACCESS_KEY")
        .map(|(_, v)| v.clone())
        .unwrap();

    let err = driver(vars).upload(&req).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Server, "{err}");
    assert!(
        err.message.contains("PutSnapshotBlock 2: HTTP 500"),
        "{err}"
    );
    assert!(!err.message.contains(&secret), "{err}");
    // Three attempts, as upstream's uploader makes, then the snapshot is deleted.
    assert_eq!(proxy.count("/blocks/2"), 3, "{:?}", proxy.requests());
    let state = cloud_state(&moto);
    assert_eq!(
        state,
        json!({"images": {}, "snapshots": {}}),
        "{:?}",
        proxy.requests()
    );
}

// ---- the builder daemon with an aws provider ---------------------------------------------

/// Registers, through boto3, an AMI from a one-block snapshot of ours with `tags` (none: a
/// foreign AMI) and returns its id.
fn register_ami(moto: &MotoServer, name: &str, tags: &[(&str, &str)]) -> String {
    let tags: Vec<Value> = tags
        .iter()
        .map(|(k, v)| json!({"Key": k, "Value": v}))
        .collect();
    let out = moto.boto3(&format!(
        r#"
import base64, hashlib
tags = json.loads('{tags}')
snap = ebs.start_snapshot(VolumeSize=1, **({{"Tags": tags}} if tags else {{}}))["SnapshotId"]
block = b"\x01" * 524288
ebs.put_snapshot_block(SnapshotId=snap, BlockIndex=0, BlockData=block, DataLength=len(block),
    Checksum=base64.b64encode(hashlib.sha256(block).digest()).decode(), ChecksumAlgorithm="SHA256")
ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=1)
ami = ec2.register_image(Name="{name}", RootDeviceName="/dev/sda1", VirtualizationType="hvm",
    BlockDeviceMappings=[{{"DeviceName": "/dev/sda1", "Ebs": {{"SnapshotId": snap}}}}])["ImageId"]
if tags:
    ec2.create_tags(Resources=[ami], Tags=tags)
print(ami)
"#,
        tags = Value::from(tags)
    ));
    out.trim().to_string()
}

#[test]
fn the_builder_records_its_ami_and_the_janitor_deletes_only_untracked_tagged_amis() {
    let moto = MotoServer::start("aws_site");
    let site = crate::util::site::TestSite::new("aws_site");
    site.config(
        0,
        "cleanup-interval = 1.0",
        "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{fake_dib}\"\nformats = [\"raw\"]\n\
         \n[[providers]]\nname = \"ec2\"\ndriver = \"aws\"\nregion-name = \"us-east-1\"\nrate = 0\n\
         [[providers.diskimages]]\nname = \"fedora\"\nimport-method = \"ebs-direct\"\n\
         tags = { team = \"ci\" }\n",
    );
    let env = moto.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut b = site.start_with_env(0, &[], &env);
    let (build, up) = site
        .wait_uploads(
            "fedora",
            "ec2",
            nodepool_builder::model::UploadState::Ready,
            1,
        )
        .remove(0);
    let ami = up.upload.external_id.clone().unwrap();
    assert!(ami.starts_with("ami-"), "{up:?}");
    assert_eq!(up.upload.format.as_deref(), Some("raw"));
    let state = cloud_state(&moto);
    let tags = &state["images"][&ami]["tags"];
    assert_eq!(tags["nodepool_build_id"], build.as_str(), "{state}");
    assert_eq!(tags["nodepool_upload_id"], up.id.as_str(), "{state}");
    assert_eq!(tags["nodepool_provider_name"], "ec2", "{state}");
    assert_eq!(tags["team"], "ci", "{state}");
    assert_eq!(
        state["images"][&ami]["name"],
        up.upload.external_name.clone().unwrap().as_str()
    );

    // An AMI a killed builder left (its upload has no record), and one that is not ours.
    let leaked = register_ami(
        &moto,
        "fedora-leaked",
        &[
            ("nodepool_build_id", &build),
            ("nodepool_upload_id", "0000000099"),
            ("nodepool_provider_name", "ec2"),
        ],
    );
    let foreign = register_ami(&moto, "someone-elses", &[]);
    b.wait_for_log(WAIT_LONG, &format!("Deleting leaked image {leaked}"));
    crate::util::wait_until(WAIT_LONG, "the leaked AMI and its snapshot to go", || {
        let state = cloud_state(&moto);
        state["images"].get(&leaked).is_none()
            && state["snapshots"]
                .as_object()
                .unwrap()
                .values()
                .all(|s| s["tags"]["nodepool_upload_id"] != "0000000099")
    });
    let state = cloud_state(&moto);
    let mut left: Vec<&String> = state["images"].as_object().unwrap().keys().collect();
    left.sort();
    let mut want = vec![&ami, &foreign];
    want.sort();
    assert_eq!(left, want, "the recorded and the foreign AMI stay: {state}");
    assert!(
        !b.log().contains("testing-secret-key"),
        "the secret key is never logged"
    );
}

const WAIT_LONG: Duration = Duration::from_secs(90);

// ---- the same requests as nodepool 11 ------------------------------------------------------

/// Tags of a flat `TagSpecification.1.Tag.N.*` parameter set, and the other parameters.
fn split_tags(
    params: &serde_json::Map<String, Value>,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut keys = BTreeMap::new();
    let mut values = BTreeMap::new();
    let mut rest = BTreeMap::new();
    for (k, v) in params {
        let v = v.as_str().unwrap_or_default().to_string();
        match k.strip_prefix("TagSpecification.1.Tag.") {
            Some(t) if t.ends_with(".Key") => {
                keys.insert(t.trim_end_matches(".Key").to_string(), v);
            }
            Some(t) if t.ends_with(".Value") => {
                values.insert(t.trim_end_matches(".Value").to_string(), v);
            }
            _ => {
                rest.insert(k.clone(), v);
            }
        }
    }
    let tags = keys
        .into_iter()
        .map(|(n, k)| (k, values.get(&n).cloned().unwrap_or_default()))
        .collect();
    (tags, rest)
}

/// Build and upload ids, the snapshot id and the timestamp replaced by the fixture's markers.
fn normalise(
    map: BTreeMap<String, String>,
    build: &str,
    snapshot: &str,
) -> BTreeMap<String, String> {
    map.into_iter()
        .map(|(k, v)| {
            let v = if v == build {
                "<build-id>".to_string()
            } else if v == "0000000001" {
                "<upload-id>".to_string()
            } else if v == snapshot {
                "snap-<uploaded>".to_string()
            } else if k == "Name" {
                format!("{}-<timestamp>", v.rsplit_once('-').unwrap().0)
            } else {
                v
            };
            (k, v)
        })
        .collect()
}

#[test]
fn ebs_direct_sends_the_requests_nodepool_11_sends() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/aws/nodepool11-ebs-direct.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let moto = MotoServer::start_with_import_standin("aws_like_nodepool");
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(&image_file(dir.path()));
    req.external_name = "ubuntu-noble-1700000000".into();
    req.properties.insert("team".into(), "infra".into());
    req.properties
        .insert("nodepool_provider_name".into(), "aws-moto".into());
    let mut provider = aws_provider();
    provider.name = "aws-moto".into();
    provider.diskimages[0].aws.as_mut().unwrap().imds_v2 = true;
    let env = AwsEnv {
        vars: moto.env().into_iter().collect(),
        home: None,
    };
    let driver =
        AwsDriver::with_env(&provider, env, &Arc::new(TrustStores::from_process())).unwrap();
    driver.upload(&req).unwrap_or_else(|e| panic!("{e}"));

    let requests = moto.requests();
    let start = requests
        .iter()
        .find(|r| r["method"] == "POST" && r["path"] == "/snapshots")
        .expect("a StartSnapshot");
    let snapshot = requests
        .iter()
        .find_map(|r| {
            r["path"]
                .as_str()?
                .strip_prefix("/snapshots/completion/")
                .map(str::to_string)
        })
        .expect("a CompleteSnapshot");
    // The order of calls: start, blocks, completion, register (then our CreateTags).
    let mut calls: Vec<String> = Vec::new();
    for r in &requests {
        let call = match (r["action"].as_str(), r["path"].as_str()) {
            (Some(action), _) => action.to_string(),
            (None, Some(path)) if path.contains("/blocks/") => {
                "PUT /snapshots/<snapshot>/blocks/<index> (each block)".to_string()
            }
            (None, Some(path)) => format!(
                "{} {}",
                r["method"].as_str().unwrap(),
                path.replace(&snapshot, "snap-<uploaded>")
            ),
            _ => continue,
        };
        if calls.last() != Some(&call) {
            calls.push(call);
        }
    }
    let from_start: Vec<&String> = calls
        .iter()
        .skip_while(|c| *c != "POST /snapshots")
        .take(4)
        .collect();
    assert_eq!(
        json!(from_start),
        reference["calls_from_start_snapshot_to_register_image"],
        "{calls:?}"
    );

    // StartSnapshot: the same size and tags (ours adds a Description: the AMI's name).
    let tags_of = |list: &Value| -> BTreeMap<String, String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["Key"].as_str().unwrap().into(),
                    t["Value"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    assert_eq!(
        start["json"]["VolumeSize"],
        reference["start_snapshot_request"]["VolumeSize"]
    );
    assert_eq!(
        normalise(tags_of(&start["json"]["Tags"]), &req.build_id, &snapshot),
        tags_of(&reference["start_snapshot_request"]["Tags"])
    );
    assert_eq!(start["json"]["ClientToken"].as_str().unwrap().len(), 32);

    // RegisterImage: the same parameters and tags (in another order).
    let register = requests
        .iter()
        .find(|r| r["action"] == "RegisterImage")
        .expect("a RegisterImage");
    let (ours_tags, ours) = split_tags(register["params"].as_object().unwrap());
    let (their_tags, theirs) = split_tags(reference["register_image_request"].as_object().unwrap());
    assert_eq!(normalise(ours, &req.build_id, &snapshot), theirs);
    assert_eq!(normalise(ours_tags, &req.build_id, &snapshot), their_tags);
}

// ---- snapshot and image imports through S3 (EC2's import answered by the stand-in) ----------

/// A driver for `method` with bucket `images`, against `moto` (with the import stand-in), and
/// the bucket made.
fn s3_driver(moto: &MotoServer, method: AwsImportMethod, format: &str) -> AwsDriver {
    moto.boto3(r#"s3.create_bucket(Bucket="images")"#);
    let provider = crate::util::aws::aws_provider(PROVIDER, format, Some("images"), method);
    crate::util::aws::aws_driver(&provider, &moto.env())
}

/// A raw image of two S3 parts: 8 MiB (data, zeros, data) and 100 bytes.
fn two_part_image(dir: &Path) -> PathBuf {
    let mut data = vec![b'A'; BLOCK];
    data.resize(8 << 20, 0);
    data.extend(vec![b'B'; BLOCK]);
    data.truncate((8 << 20) + 100);
    let path = dir.join("debian.raw");
    std::fs::write(&path, data).unwrap();
    path
}

/// The bucket's objects and unfinished multipart uploads.
fn bucket_state(moto: &MotoServer) -> Value {
    let out = moto.boto3(
        r#"
objects = [o["Key"] for o in s3.list_objects_v2(Bucket="images").get("Contents", [])]
uploads = [u["Key"] for u in s3.list_multipart_uploads(Bucket="images").get("Uploads", [])]
out({"objects": objects, "uploads": uploads})
"#,
    );
    serde_json::from_str(out.trim()).unwrap()
}

fn actions(moto: &MotoServer) -> Vec<String> {
    moto.requests()
        .iter()
        .map(|r| match r["action"].as_str() {
            Some(a) => a.to_string(),
            None => format!(
                "{} {}",
                r["method"].as_str().unwrap_or(""),
                r["path"].as_str().unwrap_or("")
            ),
        })
        .collect()
}

#[test]
fn a_snapshot_import_goes_through_s3_and_leaves_a_tagged_ami_and_an_empty_bucket() {
    let moto = MotoServer::start_with_import_standin("aws_import_snapshot");
    let dir = tempfile::tempdir().unwrap();
    let driver = s3_driver(&moto, AwsImportMethod::Snapshot, "raw");
    let req = request(&two_part_image(dir.path()));

    let ami = driver
        .upload(&req)
        .unwrap_or_else(|e| panic!("{e}; {:?}", actions(&moto)))
        .external_id;

    let requests = moto.requests();
    let import = requests
        .iter()
        .find(|r| r["action"] == "ImportSnapshot")
        .expect("an ImportSnapshot");
    let (tags, params) = split_tags(import["params"].as_object().unwrap());
    assert_eq!(params["DiskContainer.Format"], "raw");
    assert_eq!(params["DiskContainer.UserBucket.S3Bucket"], "images");
    assert_eq!(
        params["DiskContainer.UserBucket.S3Key"],
        "debian-1700000000.raw"
    );
    assert_eq!(
        params["TagSpecification.1.ResourceType"],
        "import-snapshot-task"
    );
    assert_eq!(tags, req.properties);
    let parts: Vec<&Value> = requests
        .iter()
        .filter(|r| {
            r["method"] == "PUT" && r["path"].as_str().unwrap_or("").contains("partNumber=")
        })
        .collect();
    assert_eq!(
        parts.len(),
        2,
        "8 MiB + 100 bytes is two parts: {:?}",
        actions(&moto)
    );
    assert_eq!(
        req.progress.transfer().map(|t| t.sent),
        Some((8 << 20) + 100)
    );
    let register = requests
        .iter()
        .find(|r| r["action"] == "RegisterImage")
        .expect("a RegisterImage");
    let snapshot = register["params"]["BlockDeviceMapping.1.Ebs.SnapshotId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        register["params"]["BlockDeviceMapping.1.Ebs.VolumeSize"],
        "1"
    );

    let state = cloud_state(&moto);
    assert_eq!(
        state["images"][&ami]["tags"]["nodepool_build_id"],
        req.build_id.as_str(),
        "{state}"
    );
    assert_eq!(
        state["snapshots"][&snapshot]["tags"]["team"], "ci",
        "{state}"
    );
    // The stand-in wrote the image's non-zero 512 KiB blocks: the first and the one at 8 MiB.
    assert_eq!(
        state["snapshots"][&snapshot]["blocks"],
        json!([0, 16]),
        "{state}"
    );
    assert_eq!(bucket_state(&moto), json!({"objects": [], "uploads": []}));

    driver.delete(&ami).unwrap();
    let state = cloud_state(&moto);
    assert_eq!(state, json!({"images": {}, "snapshots": {}}));
}

#[test]
fn an_image_import_tags_the_ami_and_its_snapshot() {
    let moto = MotoServer::start_with_import_standin("aws_import_image");
    let dir = tempfile::tempdir().unwrap();
    let driver = s3_driver(&moto, AwsImportMethod::Image, "raw");
    let req = request(&image_file(dir.path()));

    let ami = driver
        .upload(&req)
        .unwrap_or_else(|e| panic!("{e}; {:?}", actions(&moto)))
        .external_id;
    let requests = moto.requests();
    let import = requests
        .iter()
        .find(|r| r["action"] == "ImportImage")
        .expect("an ImportImage");
    assert_eq!(import["params"]["Architecture"], "x86_64");
    assert_eq!(
        import["params"]["DiskContainer.1.UserBucket.S3Key"],
        "debian-1700000000.raw"
    );
    assert!(
        !requests.iter().any(|r| r["action"] == "RegisterImage"),
        "EC2 registers it"
    );
    let state = cloud_state(&moto);
    assert_eq!(
        state["images"][&ami]["tags"]["nodepool_upload_id"], "0000000001",
        "{state}"
    );
    let snapshots = state["snapshots"].as_object().unwrap();
    assert_eq!(snapshots.len(), 1, "{state}");
    assert_eq!(
        snapshots.values().next().unwrap()["tags"]["nodepool_build_id"],
        req.build_id.as_str()
    );
    assert_eq!(bucket_state(&moto), json!({"objects": [], "uploads": []}));
    let listed: Vec<String> = driver
        .list_images()
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(listed, [ami]);
}

#[test]
fn a_failed_import_fails_the_upload_with_ec2s_reason_and_leaves_nothing() {
    let moto = MotoServer::start_with_import_standin("aws_import_fails");
    let dir = tempfile::tempdir().unwrap();
    let driver = s3_driver(&moto, AwsImportMethod::Snapshot, "vhd");
    let file = dir.path().join("debian.vhd");
    std::fs::write(&file, b"this is not a vhd").unwrap();
    let mut req = request(&file);
    req.format = "vhd".into();

    let err = driver.upload(&req).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Server, "{err}");
    assert!(
        err.message.contains("import task import-snap-") && err.message.contains("failed: "),
        "{err}"
    );
    assert_eq!(bucket_state(&moto), json!({"objects": [], "uploads": []}));
    assert_eq!(cloud_state(&moto), json!({"images": {}, "snapshots": {}}));
}

#[test]
fn a_snapshot_import_without_a_bucket_is_a_clear_configuration_error() {
    let moto = MotoServer::start("aws_no_bucket");
    let dir = tempfile::tempdir().unwrap();
    let mut provider = aws_provider();
    provider.diskimages[0].aws.as_mut().unwrap().import_method = AwsImportMethod::Snapshot;
    let env = AwsEnv {
        vars: moto.env().into_iter().collect(),
        home: None,
    };
    let driver =
        AwsDriver::with_env(&provider, env, &Arc::new(TrustStores::from_process())).unwrap();
    let err = driver
        .upload(&request(&image_file(dir.path())))
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Config, "{err}");
    assert!(
        err.message
            .contains("import-method snapshot needs object-storage.bucket-name"),
        "{err}"
    );
}

#[test]
fn aws_credentials_from_a_profile_never_reach_the_logs_and_their_file_is_checked() {
    use std::os::unix::fs::PermissionsExt;
    let moto = MotoServer::start("aws_secrets");
    let site = crate::util::site::TestSite::new("aws_secrets");
    let (secret, token) = (
        "Aws-S3cret-key-4711-do-not-log",
        "Aws-session-t0ken-0815-do-not-log",
    );
    let credentials = site.path("aws-credentials");
    std::fs::write(
        &credentials,
        format!(
            "[default]\n[ci]\naws_access_key_id = AKIDPROFILECI\naws_secret_access_key = {secret}\n\
             aws_session_token = {token}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o644)).unwrap();
    let provider = |name: &str, profile: &str| {
        format!(
            "\n[[providers]]\nname = \"{name}\"\ndriver = \"aws\"\nregion-name = \"us-east-1\"\n\
             profile-name = \"{profile}\"\nrate = 0\n[[providers.diskimages]]\nname = \"fedora\"\n\
             import-method = \"ebs-direct\"\n"
        )
    };
    site.config(
        0,
        "",
        &format!(
            "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{{fake_dib}}\"\nformats = [\"raw\"]\n{}{}",
            provider("ec2-ci", "ci"),
            provider("ec2-none", "missing")
        ),
    );
    // The test's credentials file instead of moto's empty one. moto's keys stay in the
    // environment: a provider naming a profile must not use them (ec2-none fails).
    let mut env = moto.env();
    for (k, v) in env.iter_mut() {
        if k == "AWS_SHARED_CREDENTIALS_FILE" {
            *v = credentials.display().to_string();
        }
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut b = site.start_with_env(0, &[], &env);
    b.wait_for_log(
        WAIT_LONG,
        &format!(
            "secret file {} is readable by its group and everyone (mode 0644)",
            credentials.display()
        ),
    );
    site.wait_uploads(
        "fedora",
        "ec2-ci",
        nodepool_builder::model::UploadState::Ready,
        1,
    );
    b.wait_for_log(WAIT_LONG, "no AWS credentials for profile missing");
    drop(b);

    let log = std::fs::read_to_string(site.path("builder0.log")).unwrap();
    for s in [secret, token] {
        assert!(!log.contains(s), "the daemon log shows {s:?}");
        for dir in [site.log_dir(0), site.images_dir(0)] {
            let found = files_containing(&dir, s);
            assert!(found.is_empty(), "{s:?} is in {found:?}");
        }
    }
}

fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if std::fs::read(&path).is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle)) {
            found.push(path.display().to_string());
        }
    }
    found
}
