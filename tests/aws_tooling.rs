//! The AWS test tooling itself: moto's server (`util::moto`) starts on loopback and the
//! actions the AWS driver relies on exist in the pinned moto version, called through boto3
//! the way nodepool 11 calls them. When moto is upgraded and drops or changes one of them,
//! these tests say so before the driver's tests fail in a less obvious way.
//!
//! The EC2 import STAND-IN (`tests/fixtures/python/aws-import-standin.py`, the one part of
//! the AWS tests that is not a real server: moto 5.2.5 has no ImportSnapshot / ImportImage)
//! is tested here through boto3: raw and VMDK imports, task states, errors, and that
//! everything else (S3 multipart) passes it unchanged.
//!
//! The interoperability reference `tests/fixtures/aws/nodepool11-ebs-direct.json` is made
//! here by nodepool 11's own builder uploading to moto: what it asked StartSnapshot and
//! RegisterImage for, and what moto kept. Rewrite it with
//! `NODEPOOL_BLESS_AWS=1 cargo test --test integration -- aws_tooling::nodepool11`.

use crate::util::moto::MotoServer;

/// EBS direct (`StartSnapshot` / `PutSnapshotBlock` / `CompleteSnapshot`) makes a completed
/// snapshot that EC2 sees with its tags, and `RegisterImage` registers an AMI from it that
/// `DescribeImages` lists by name — the `ebs-direct` import method end to end.
#[test]
fn moto_serves_ebs_direct_snapshots_and_register_image() {
    let moto = MotoServer::start("moto_serves_ebs_direct");
    let out = moto.boto3(
        r#"
import base64, hashlib
snap = ebs.start_snapshot(VolumeSize=1, Tags=[{"Key": "nodepool_build_id", "Value": "0000000001"}])
sid = snap["SnapshotId"]
block = b"\x5a" * 524288
for index in (0, 1):
    ebs.put_snapshot_block(
        SnapshotId=sid, BlockIndex=index, BlockData=block, DataLength=len(block),
        Checksum=base64.b64encode(hashlib.sha256(block).digest()).decode(),
        ChecksumAlgorithm="SHA256")
done = ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=2)
blocks = ebs.list_snapshot_blocks(SnapshotId=sid)["Blocks"]
ec2_snap = ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]
image = ec2.register_image(
    Name="ubuntu-noble-0000000001", Architecture="x86_64", RootDeviceName="/dev/sda1",
    VirtualizationType="hvm", EnaSupport=True,
    BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": sid, "VolumeSize": 1,
                                                             "VolumeType": "gp3", "DeleteOnTermination": True}}])
ec2.create_tags(Resources=[image["ImageId"]], Tags=[{"Key": "nodepool_upload_id", "Value": "0000000001"}])
found = ec2.describe_images(Filters=[{"Name": "name", "Values": ["ubuntu-noble-0000000001"]}])["Images"]
out({"complete": done["Status"], "blocks": [b["BlockIndex"] for b in blocks],
     "snapshot_state": ec2_snap["State"], "snapshot_tags": ec2_snap.get("Tags", []),
     "image_ids": [i["ImageId"] for i in found], "registered": image["ImageId"],
     "image_tags": found[0].get("Tags", []) if found else None})
"#,
    );
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("boto3 printed no JSON ({e}): {out}"));
    assert_eq!(v["complete"], "completed", "{v}");
    assert_eq!(v["blocks"], serde_json::json!([0, 1]), "{v}");
    assert_eq!(v["snapshot_state"], "completed", "{v}");
    assert_eq!(
        v["snapshot_tags"],
        serde_json::json!([{"Key": "nodepool_build_id", "Value": "0000000001"}]),
        "{v}"
    );
    assert_eq!(v["image_ids"], serde_json::json!([v["registered"]]), "{v}");
    assert_eq!(
        v["image_tags"],
        serde_json::json!([{"Key": "nodepool_upload_id", "Value": "0000000001"}]),
        "{v}"
    );
}

/// The test process's environment for a builder points only at the test's moto and files:
/// no credentials or config of the host's `~/.aws`.
#[test]
fn moto_env_points_a_builder_at_the_server_and_away_from_the_hosts_aws_files() {
    let moto = MotoServer::start("moto_env");
    let env: std::collections::HashMap<String, String> = moto.env().into_iter().collect();
    assert_eq!(env["AWS_ENDPOINT_URL"], moto.endpoint());
    assert_eq!(env["AWS_DEFAULT_REGION"], "us-east-1");
    for key in ["AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"] {
        assert!(
            std::path::Path::new(&env[key]).starts_with(moto.dir()),
            "{key}={} is not in the test's directory {}",
            env[key],
            moto.dir().display()
        );
    }
    // boto3 in that environment finds the fake credentials and the server.
    let out = moto.boto3(
        r#"
s = boto3.session.Session()
out({"key": s.get_credentials().access_key, "region": s.region_name,
     "endpoint": ec2.meta.endpoint_url})
"#,
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["key"], env["AWS_ACCESS_KEY_ID"].as_str());
    assert_eq!(v["region"], "us-east-1");
    assert_eq!(v["endpoint"], moto.endpoint().as_str());
}

/// What moto 5.2.5's `RegisterImage` keeps of a request: the name (and description). The
/// block device mapping, architecture, ENA, IMDS and the image's TagSpecifications are
/// dropped, and the AMI points at a snapshot of moto's own. The AWS driver's tests must
/// therefore check what a builder *asked* for in the stand-in's journal
/// ([`MotoServer::requests`]), which this test also shows records it. If a moto upgrade
/// starts keeping them, this test fails and the journal checks can become `DescribeImages`
/// checks.
#[test]
fn moto_register_image_keeps_only_the_name_and_the_standin_journal_keeps_the_request() {
    let moto = MotoServer::start_with_import_standin("moto_register_image");
    let out = moto.boto3(
        r#"
snap = ebs.start_snapshot(VolumeSize=1)
ebs.complete_snapshot(SnapshotId=snap["SnapshotId"], ChangedBlocksCount=0)
image = ec2.register_image(
    Name="fidelity-0000000001", Architecture="arm64", RootDeviceName="/dev/sda1",
    VirtualizationType="hvm", EnaSupport=True, ImdsSupport="v2.0",
    BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {
        "SnapshotId": snap["SnapshotId"], "VolumeSize": 1, "VolumeType": "gp3",
        "DeleteOnTermination": True}}],
    TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": "k", "Value": "v"}]}])
found = ec2.describe_images(ImageIds=[image["ImageId"]])["Images"][0]
out({"snapshot": snap["SnapshotId"], "image": found})
"#,
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let image = &v["image"];
    assert_eq!(image["Name"], "fidelity-0000000001", "{image}");
    let kept_by_moto = [
        image.get("Architecture").cloned(),
        image.get("EnaSupport").cloned(),
        image.get("ImdsSupport").cloned(),
        Some(image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"].clone())
            .filter(|s| *s == v["snapshot"]),
        Some(image["Tags"].clone()).filter(|t| t.as_array().is_some_and(|t| !t.is_empty())),
    ];
    assert_eq!(
        kept_by_moto,
        [None, None, None, None, None],
        "moto now keeps more of RegisterImage than 5.2.5 did (update util::moto's essay and \
         the AWS tests): {image}"
    );
    let register = moto
        .requests()
        .into_iter()
        .find(|r| r["action"] == "RegisterImage")
        .expect("the stand-in journal has the RegisterImage request");
    let p = &register["params"];
    assert_eq!(register["status"], 200, "{register}");
    assert_eq!(p["Architecture"], "arm64", "{p}");
    assert_eq!(
        p["BlockDeviceMapping.1.Ebs.SnapshotId"], v["snapshot"],
        "{p}"
    );
    assert_eq!(p["BlockDeviceMapping.1.Ebs.VolumeType"], "gp3", "{p}");
    assert_eq!(p["ImdsSupport"], "v2.0", "{p}");
    assert_eq!(p["TagSpecification.1.Tag.1.Key"], "k", "{p}");
}

/// The stand-in's `ImportSnapshot`: an image in moto's S3 becomes an EBS snapshot in moto
/// (volume size rounded up to GiB, exactly the image's non-zero 512 KiB blocks), the task is
/// `active` at first and `completed` with the snapshot id after a few describe calls, and it
/// carries the request's import-snapshot-task tags as AWS does.
#[test]
fn import_standin_imports_a_raw_snapshot_from_s3_through_ebs_direct() {
    let moto = MotoServer::start_with_import_standin("import_standin_snapshot");
    let started = moto.boto3(
        r#"
import hashlib
# 3 blocks of 512 KiB: data, zeros, and a short data tail.
image = b"\x01" * 524288 + b"\0" * 524288 + b"\x02" * 1000
s3.create_bucket(Bucket="images")
s3.put_object(Bucket="images", Key="img-0000000001.raw", Body=image)
task = ec2.import_snapshot(
    DiskContainer={"Format": "raw", "UserBucket": {"S3Bucket": "images", "S3Key": "img-0000000001.raw"}},
    TagSpecifications=[{"ResourceType": "import-snapshot-task",
                        "Tags": [{"Key": "nodepool_build_id", "Value": "0000000001"}]}])
out({"id": task["ImportTaskId"], "status": task["SnapshotTaskDetail"]["Status"],
     "tags": task["Tags"], "size": len(image)})
"#,
    );
    let started: serde_json::Value = serde_json::from_str(started.trim()).unwrap();
    assert_eq!(started["status"], "active", "{started}");
    assert_eq!(
        started["tags"],
        serde_json::json!([{"Key": "nodepool_build_id", "Value": "0000000001"}])
    );
    let id = started["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("import-snap-"), "{id}");
    let describe = format!(
        r#"
t = ec2.describe_import_snapshot_tasks(ImportTaskIds=["{id}"])["ImportSnapshotTasks"][0]
out(t)
"#
    );
    let mut seen = Vec::new();
    let task = crate::util::wait_for(
        std::time::Duration::from_secs(60),
        "the stand-in's import-snapshot task to complete",
        || {
            let t: serde_json::Value = serde_json::from_str(moto.boto3(&describe).trim()).unwrap();
            let status = t["SnapshotTaskDetail"]["Status"]
                .as_str()
                .unwrap()
                .to_string();
            seen.push(status.clone());
            (status != "active").then_some(t)
        },
    );
    assert_eq!(
        task["SnapshotTaskDetail"]["Status"],
        "completed",
        "{task}\n{}",
        moto.log_tail(20)
    );
    assert!(seen.len() >= 3, "completed before two describes: {seen:?}");
    assert_eq!(task["Tags"], started["tags"], "{task}");
    assert_eq!(
        task["SnapshotTaskDetail"]["DiskImageSize"],
        started["size"].as_f64().unwrap(),
        "{task}"
    );
    let sid = task["SnapshotTaskDetail"]["SnapshotId"].as_str().unwrap();
    let out = moto.boto3(&format!(
        r#"
import hashlib
snap = ec2.describe_snapshots(SnapshotIds=["{sid}"])["Snapshots"][0]
blocks = ebs.list_snapshot_blocks(SnapshotId="{sid}")["Blocks"]
data = [ebs.get_snapshot_block(SnapshotId="{sid}", BlockIndex=b["BlockIndex"], BlockToken=b["BlockToken"])["BlockData"].read() for b in blocks]
out({{"state": snap["State"], "size": snap["VolumeSize"], "blocks": [b["BlockIndex"] for b in blocks],
     "first": sorted(set(data[0])), "last_head": sorted(set(data[-1][:1000])), "last_tail": sorted(set(data[-1][1000:]))}})
"#
    ));
    let snap: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        snap,
        serde_json::json!({"state": "completed", "size": 1, "blocks": [0, 2],
                           "first": [1], "last_head": [2], "last_tail": [0]})
    );
}

/// The stand-in's `ImportImage` of a VMDK (converted to raw as AWS does): the task completes
/// with an AMI registered in moto on a snapshot of the image; unknown task ids and missing S3
/// objects fail the way AWS reports them.
#[test]
fn import_standin_imports_a_vmdk_image_and_reports_bad_requests() {
    let moto = MotoServer::start_with_import_standin("import_standin_image");
    let dir = crate::util::test_dir("import_standin_image");
    let vmdk = crate::util::glance::qemu_image(dir.path(), "img", "vmdk", 3 << 20);
    let out = moto.boto3(&format!(
        r#"
import botocore
s3.create_bucket(Bucket="images")
s3.upload_file({path}, "images", "img.vmdk")
task = ec2.import_image(
    Architecture="x86_64",
    DiskContainers=[{{"Format": "vmdk", "UserBucket": {{"S3Bucket": "images", "S3Key": "img.vmdk"}}}}],
    TagSpecifications=[{{"ResourceType": "import-image-task", "Tags": [{{"Key": "a", "Value": "b"}}]}}])
missing = ec2.import_snapshot(
    DiskContainer={{"Format": "raw", "UserBucket": {{"S3Bucket": "images", "S3Key": "nothing.raw"}}}})
try:
    ec2.describe_import_image_tasks(ImportTaskIds=["import-ami-00000000000000000"])
    unknown = None
except botocore.exceptions.ClientError as e:
    unknown = e.response["Error"]["Code"]
out({{"id": task["ImportTaskId"], "status": task["Status"], "missing": missing["ImportTaskId"],
     "unknown": unknown}})
"#,
        path = serde_json::Value::from(vmdk.display().to_string())
    ));
    let started: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(started["status"], "active", "{started}");
    assert_eq!(started["unknown"], "InvalidConversionTaskId.Malformed");
    let (id, missing) = (
        started["id"].as_str().unwrap(),
        started["missing"].as_str().unwrap(),
    );
    let describe = format!(
        r#"
i = ec2.describe_import_image_tasks(ImportTaskIds=["{id}"])["ImportImageTasks"][0]
s = ec2.describe_import_snapshot_tasks(ImportTaskIds=["{missing}"])["ImportSnapshotTasks"][0]
out({{"image": i, "missing": s}})
"#
    );
    let done = crate::util::wait_for(
        std::time::Duration::from_secs(60),
        "the stand-in's import-image task and the failing import-snapshot task to finish",
        || {
            let v: serde_json::Value = serde_json::from_str(moto.boto3(&describe).trim()).unwrap();
            (v["image"]["Status"] != "active"
                && v["missing"]["SnapshotTaskDetail"]["Status"] != "active")
                .then_some(v)
        },
    );
    let image = &done["image"];
    assert_eq!(
        image["Status"],
        "completed",
        "{image}\n{}",
        moto.log_tail(20)
    );
    assert_eq!(
        image["Tags"],
        serde_json::json!([{"Key": "a", "Value": "b"}])
    );
    let (ami, sid) = (
        image["ImageId"].as_str().unwrap(),
        image["SnapshotDetails"][0]["SnapshotId"].as_str().unwrap(),
    );
    let missing = &done["missing"]["SnapshotTaskDetail"];
    assert_eq!(missing["Status"], "deleted", "{missing}");
    assert!(
        missing["StatusMessage"]
            .as_str()
            .unwrap()
            .contains("nothing.raw"),
        "{missing}"
    );
    let out = moto.boto3(&format!(
        r#"
img = ec2.describe_images(ImageIds=["{ami}"])["Images"][0]
snap = ec2.describe_snapshots(SnapshotIds=["{sid}"])["Snapshots"][0]
blocks = ebs.list_snapshot_blocks(SnapshotId="{sid}")["Blocks"]
out({{"name": img["Name"], "state": img["State"], "snap": snap["State"], "blocks": len(blocks)}})
"#
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["name"], started["id"], "{v}");
    assert_eq!(v["state"], "available", "{v}");
    assert_eq!(v["snap"], "completed", "{v}");
    // 3 MiB of random data, converted back to raw: six full blocks.
    assert_eq!(v["blocks"], 6, "{v}");
}

/// S3 multipart uploads (how the `snapshot` and `image` methods put large images) pass the
/// stand-in unchanged: three 5 MiB parts come back as one object with the same bytes and a
/// multipart ETag, and the journal shows the part uploads.
#[test]
fn import_standin_forwards_s3_multipart_uploads_unchanged() {
    let moto = MotoServer::start_with_import_standin("import_standin_multipart");
    let out = moto.boto3(
        r#"
import hashlib, os
from boto3.s3.transfer import TransferConfig
data = os.urandom(12 * 1024 * 1024)
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multipart.bin")
open(path, "wb").write(data)
s3.create_bucket(Bucket="images")
mib5 = 5 * 1024 * 1024
s3.upload_file(path, "images", "big.raw", Config=TransferConfig(multipart_threshold=mib5, multipart_chunksize=mib5))
head = s3.head_object(Bucket="images", Key="big.raw")
back = s3.get_object(Bucket="images", Key="big.raw")["Body"].read()
out({"etag": head["ETag"], "length": head["ContentLength"],
     "same": hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()})
"#,
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["length"], 12 << 20, "{v}");
    assert_eq!(v["same"], true, "{v}");
    assert!(v["etag"].as_str().unwrap().ends_with("-3\""), "{v}");
    let parts = moto
        .requests()
        .into_iter()
        .filter(|r| {
            r["method"] == "PUT"
                && r["path"]
                    .as_str()
                    .is_some_and(|p| p.contains("partNumber="))
        })
        .count();
    assert_eq!(parts, 3, "{:?}", moto.requests());
}

/// Interoperability reference: nodepool 11's own builder (boto3, `import-method:
/// ebs-direct`) uploads a fake-dib raw image to moto (through the stand-in, for its journal)
/// and the test records what it asked for and what moto registered, normalised, in
/// `tests/fixtures/aws/nodepool11-ebs-direct.json`: the AWS driver's tests compare their
/// upload with it. The test fails when nodepool 11's behaviour no longer matches the
/// committed file; run it with `NODEPOOL_BLESS_AWS=1` to rewrite it.
#[test]
fn nodepool11_ebs_direct_upload_to_moto_matches_the_committed_reference() {
    use crate::util::upstream::{AwsYamlProvider, NodepoolYaml, UpstreamBuilder, UpstreamOptions};
    use nodepool_builder::model::UploadState;

    let moto = MotoServer::start_with_import_standin("nodepool11_ebs_direct");
    let site = crate::util::site::TestSite::new("nodepool11_ebs_direct");
    let yaml = NodepoolYaml {
        images_dir: site.images_dir(0).display().to_string(),
        build_log_dir: site.log_dir(0).display().to_string(),
        top: Vec::new(),
        images: vec!["ubuntu-noble".into()],
        env_vars: Vec::new(),
        providers: Vec::new(),
    };
    let provider = AwsYamlProvider {
        name: "aws-moto".into(),
        region: crate::util::moto::REGION.into(),
        bucket: None,
        image_format: None,
        images: vec![(
            "ubuntu-noble".into(),
            vec![
                ("import-method".into(), "ebs-direct".into()),
                ("imds-support".into(), "v2.0".into()),
            ],
        )],
        tags: vec![("team".into(), "infra".into())],
    };
    let config = site.path("nodepool.yaml");
    std::fs::write(&config, yaml.render_with_aws(&site, &[provider])).unwrap();
    std::fs::create_dir_all(site.images_dir(0)).unwrap();
    std::fs::create_dir_all(site.log_dir(0)).unwrap();
    let python = UpstreamBuilder::start_with(UpstreamOptions {
        config: config.clone(),
        clouds: site.path("clouds.yaml"),
        log: site.path("python.log"),
        cwd: site.path("python-cwd"),
        workers: (1, 1),
        env: moto.env(),
    });
    let ready = crate::util::wait_for(
        std::time::Duration::from_secs(240),
        "nodepool 11's ebs-direct upload to moto to be ready",
        || {
            if let Some(failed) = site
                .uploads_in("ubuntu-noble", "aws-moto", UploadState::Failed)
                .first()
            {
                panic!(
                    "nodepool 11's upload failed: {failed:?}\n{}\n{}",
                    python.log_tail(),
                    moto.log_tail(30)
                );
            }
            site.uploads_in("ubuntu-noble", "aws-moto", UploadState::Ready)
                .into_iter()
                .next()
        },
    );
    python.stop();
    // What nodepool 11 sent, before this test's own calls below.
    let requests = moto.requests();
    let (build_id, upload) = ready;
    let ami = upload
        .upload
        .external_id
        .clone()
        .expect("a ready upload has an external id");
    let described = moto.boto3(&format!(
        r#"
img = ec2.describe_images(ImageIds=["{ami}"])["Images"][0]
keep = ["Name", "Architecture", "BlockDeviceMappings", "EnaSupport", "ImdsSupport", "Tags",
        "RootDeviceName", "VirtualizationType", "BootMode", "State"]
snaps = ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
out({{"image": {{k: img.get(k) for k in keep}},
     "snapshots": [{{"Tags": s.get("Tags", []), "VolumeSize": s["VolumeSize"], "State": s["State"],
                    "SnapshotId": s["SnapshotId"]}} for s in snaps]}})
"#
    ));
    let described: serde_json::Value = serde_json::from_str(described.trim()).unwrap();
    // What nodepool 11 sent: StartSnapshot's JSON body (its ClientToken is a fresh uuid4),
    // the number of blocks, RegisterImage's parameters (moto keeps only the name), and the
    // calls from StartSnapshot to RegisterImage in order.
    let mut start_snapshot = requests
        .iter()
        .find(|r| r["method"] == "POST" && r["path"] == "/snapshots")
        .map(|r| r["json"].clone())
        .expect("nodepool 11 called StartSnapshot");
    if start_snapshot.get("ClientToken").is_some() {
        start_snapshot["ClientToken"] = "<uuid4 hex>".into();
    }
    let blocks = requests
        .iter()
        .filter(|r| {
            r["method"] == "PUT" && r["path"].as_str().is_some_and(|p| p.contains("/blocks/"))
        })
        .count();
    let register = requests
        .iter()
        .find(|r| r["action"] == "RegisterImage")
        .map(|r| r["params"].clone())
        .expect("nodepool 11 called RegisterImage");
    let first = requests
        .iter()
        .position(|r| r["method"] == "POST" && r["path"] == "/snapshots")
        .unwrap();
    let last = requests
        .iter()
        .position(|r| r["action"] == "RegisterImage")
        .unwrap();
    let actions: Vec<String> = requests[first..=last]
        .iter()
        .map(|r| match r["action"].as_str() {
            Some(a) => a.to_string(),
            // nodepool 11 puts blocks from several threads, in no fixed order: one entry for
            // all of them (their count is `put_snapshot_block_calls`).
            None if r["path"].as_str().is_some_and(|p| p.contains("/blocks/")) => {
                "PUT /snapshots/<snapshot>/blocks/<index> (each block)".to_string()
            }
            None => format!(
                "{} {}",
                r["method"].as_str().unwrap_or(""),
                r["path"]
                    .as_str()
                    .unwrap_or("")
                    .split('?')
                    .next()
                    .unwrap_or("")
            ),
        })
        .fold(Vec::new(), |mut seen, a| {
            if seen.last() != Some(&a) {
                seen.push(a);
            }
            seen
        });
    let snapshot_id = register["BlockDeviceMapping.1.Ebs.SnapshotId"]
        .as_str()
        .expect("RegisterImage names the uploaded snapshot")
        .to_string();
    let uploaded_snapshot = described["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["SnapshotId"] == snapshot_id.as_str())
        .cloned()
        .expect("the uploaded snapshot is in DescribeSnapshots");
    let reference = serde_json::json!({
        "about": "nodepool 11.0.0 nodepool-builder, driver aws, import-method ebs-direct, \
                  imds-support v2.0, tags {team: infra}, fake-dib 1 MiB raw image, against moto \
                  5.2.5 (through the import stand-in's journal). ids and times normalised. \
                  registered_by_moto shows what moto kept of RegisterImage (only the name); \
                  register_image_request is what nodepool 11 asked for.",
        "zookeeper_upload": {
            "external_name": upload.upload.external_name,
            "format": upload.upload.format,
        },
        "start_snapshot_request": start_snapshot,
        "put_snapshot_block_calls": blocks,
        "register_image_request": register,
        "registered_by_moto": described["image"],
        "uploaded_snapshot": uploaded_snapshot,
        "calls_from_start_snapshot_to_register_image": actions,
    });
    let normalised = normalise(
        &serde_json::to_string_pretty(&reference).unwrap(),
        &[
            (&build_id, "<build-id>"),
            (&upload.id, "<upload-id>"),
            (&ami, "ami-<id>"),
            (&snapshot_id, "snap-<uploaded>"),
        ],
    );
    let fixture = crate::util::repo_root().join("tests/fixtures/aws/nodepool11-ebs-direct.json");
    if std::env::var_os("NODEPOOL_BLESS_AWS").is_some() {
        std::fs::create_dir_all(fixture.parent().unwrap()).unwrap();
        std::fs::write(&fixture, format!("{normalised}\n")).unwrap();
    }
    let committed = std::fs::read_to_string(&fixture).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}); run with NODEPOOL_BLESS_AWS=1 to write it. Now:\n{normalised}",
            fixture.display()
        )
    });
    assert_eq!(
        committed.trim_end(),
        normalised,
        "nodepool 11's ebs-direct upload differs from {}",
        fixture.display()
    );
}

/// `text` with each known value replaced by its placeholder, then every remaining moto id
/// (`ami-…`, `snap-…`, `vol-…`), ISO date, and nodepool timestamp (ten digits) by a fixed
/// placeholder, so the reference does not change from run to run.
fn normalise(text: &str, known: &[(&str, &str)]) -> String {
    let mut text = text.to_string();
    for (value, placeholder) in known {
        text = text.replace(value, placeholder);
    }
    let mut out = String::new();
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let prefixed = ["ami-", "snap-", "vol-"].iter().find_map(|p| {
            let tail = rest.strip_prefix(p)?;
            let hex = tail.chars().take_while(|c| c.is_ascii_hexdigit()).count();
            (hex >= 8).then_some((*p, hex))
        });
        if let Some((p, hex)) = prefixed {
            out.push_str(&format!("{p}<other>"));
            rest = &rest[p.len() + hex..];
            continue;
        }
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        let starts_word = !out.ends_with(|c: char| c.is_ascii_alphanumeric());
        // 2026-12-07T21:28:23.000Z (not the API version 2016-11-15, which has no time).
        let date = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || "-:.TZ+".contains(*c))
            .count();
        if digits == 4 && starts_word && rest[..date].contains('T') {
            out.push_str("<date>");
            rest = &rest[date..];
            continue;
        }
        if digits == 10 && starts_word {
            out.push_str("<timestamp>");
            rest = &rest[digits..];
            continue;
        }
        let n = digits.max(1);
        let take = rest.char_indices().nth(n).map_or(rest.len(), |(i, _)| i);
        out.push_str(&rest[..take]);
        rest = &rest[take..];
    }
    out
}

/// nodepool 11's launcher-side AWS driver (its create and delete state machines, run by
/// `upstream::aws_launch`) boots a node from an AMI registered the `ebs-direct` way in moto:
/// RunInstances with that image, `running`, nodepool's tags on the instance, then
/// TerminateInstances. The AWS driver's tests boot from their own AMI the same way.
#[test]
fn nodepool11_aws_driver_boots_and_deletes_a_node_from_an_ebs_direct_ami_on_moto() {
    let moto = MotoServer::start_with_import_standin("nodepool11_aws_launch");
    let out = moto.boto3(
        r#"
snap = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=0)
out(ec2.register_image(
    Name="ubuntu-noble-1700000000", Architecture="x86_64", RootDeviceName="/dev/sda1",
    VirtualizationType="hvm", EnaSupport=True,
    BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap, "VolumeSize": 1,
                                                             "VolumeType": "gp3"}}])["ImageId"])
"#,
    );
    let ami: String = serde_json::from_str(out.trim()).unwrap();
    let dir = crate::util::test_dir("nodepool11_aws_launch");
    let launched = crate::util::upstream::aws_launch(&moto.env(), dir.path(), &ami);
    let created = &launched["created"];
    assert_eq!(created["state"], "complete", "{launched}");
    assert_eq!(created["image_id"], ami.as_str(), "{launched}");
    assert_eq!(created["instance_state"], "running", "{launched}");
    assert_eq!(
        created["tags"],
        serde_json::json!([{"Key": "Name", "Value": "np0000000001"},
                           {"Key": "nodepool_node_id", "Value": "0000000001"}]),
        "{launched}"
    );
    assert_eq!(launched["deleted"], true, "{launched}");
    let actions: Vec<String> = moto
        .requests()
        .iter()
        .filter_map(|r| r["action"].as_str().map(str::to_string))
        .collect();
    eprintln!("EC2 calls through the stand-in: {actions:?}");
    assert!(
        actions.iter().any(|a| a == "RunInstances"),
        "nodepool 11 booted without RunInstances: {actions:?}"
    );
    assert!(
        actions.iter().any(|a| a == "TerminateInstances"),
        "{actions:?}"
    );
}
