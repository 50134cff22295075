//! The AWS test tooling itself: moto's server (`util::moto`) starts on loopback and the
//! actions the AWS driver relies on exist in the pinned moto version, called through boto3
//! the way nodepool 11 calls them. When moto is upgraded and drops or changes one of them,
//! these tests say so before the driver's tests fail in a less obvious way.

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
