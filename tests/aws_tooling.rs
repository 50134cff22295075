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
