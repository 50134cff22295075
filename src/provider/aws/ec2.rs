//! The EC2 calls of the aws driver: the Query API (form-encoded POST, `Version=2016-11-15`),
//! answers in XML read with `roxmltree`.
//!
//! Calls: `RegisterImage`, `DescribeImages`, `DescribeSnapshots` (both owner `self`, paged by
//! `NextToken`), `DeregisterImage`, `DeleteSnapshot`. Errors come as
//! `<Response><Errors><Error><Code>…</Code><Message>…</Message>` and become one line with
//! the code (the code decides "already gone": `InvalidAMIID.NotFound`,
//! `InvalidAMIID.Unavailable`, `InvalidSnapshot.NotFound`). Parsing is pure
//! ([`parse_images`], [`parse_snapshots`], [`parse_error`]) and unit-tested on answers in
//! EC2's documented shape.

use std::collections::BTreeMap;

/// The EC2 API version this driver speaks.
pub const VERSION: &str = "2016-11-15";

/// An AMI as `DescribeImages` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ami {
    pub id: String,
    pub name: String,
    pub state: String,
    pub snapshot_ids: Vec<String>,
    pub tags: BTreeMap<String, String>,
}

/// A snapshot as `DescribeSnapshots` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub state: String,
    pub tags: BTreeMap<String, String>,
}

/// An EC2 error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

/// The form body of an action with its parameters.
pub fn form(action: &str, params: &[(String, String)]) -> String {
    let mut pairs = vec![
        ("Action".to_string(), action.to_string()),
        ("Version".to_string(), VERSION.to_string()),
    ];
    pairs.extend(params.iter().cloned());
    super::sigv4::encode_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// `TagSpecification.N` parameters for `resource` with `tags`.
pub fn tag_specification(
    n: usize,
    resource: &str,
    tags: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut out = vec![(
        format!("TagSpecification.{n}.ResourceType"),
        resource.to_string(),
    )];
    for (i, (k, v)) in tags.iter().enumerate() {
        out.push((format!("TagSpecification.{n}.Tag.{}.Key", i + 1), k.clone()));
        out.push((
            format!("TagSpecification.{n}.Tag.{}.Value", i + 1),
            v.clone(),
        ));
    }
    out
}

fn parse(xml: &[u8]) -> Result<roxmltree::Document<'_>, String> {
    let text = std::str::from_utf8(xml).map_err(|_| "the answer is not UTF-8".to_string())?;
    roxmltree::Document::parse(text).map_err(|e| format!("the answer is not XML ({e})"))
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

fn text(node: roxmltree::Node, name: &str) -> String {
    child(node, name)
        .and_then(|c| c.text())
        .unwrap_or("")
        .trim()
        .to_string()
}

fn items<'a, 'i>(
    node: roxmltree::Node<'a, 'i>,
    set: &str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    child(node, set)
        .into_iter()
        .flat_map(|s| s.children().filter(|c| c.has_tag_name("item")))
}

fn tags(node: roxmltree::Node) -> BTreeMap<String, String> {
    items(node, "tagSet")
        .map(|t| (text(t, "key"), text(t, "value")))
        .collect()
}

/// The images of one `DescribeImages` page and its `nextToken`.
pub fn parse_images(xml: &[u8]) -> Result<(Vec<Ami>, Option<String>), String> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    let images = items(root, "imagesSet")
        .map(|i| Ami {
            id: text(i, "imageId"),
            name: text(i, "name"),
            state: text(i, "imageState"),
            snapshot_ids: items(i, "blockDeviceMapping")
                .filter_map(|m| child(m, "ebs").map(|e| text(e, "snapshotId")))
                .filter(|s| !s.is_empty())
                .collect(),
            tags: tags(i),
        })
        .collect();
    Ok((images, next_token(root)))
}

/// The snapshots of one `DescribeSnapshots` page and its `nextToken`.
pub fn parse_snapshots(xml: &[u8]) -> Result<(Vec<Snapshot>, Option<String>), String> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    let snapshots = items(root, "snapshotSet")
        .map(|s| Snapshot {
            id: text(s, "snapshotId"),
            state: text(s, "status"),
            tags: tags(s),
        })
        .collect();
    Ok((snapshots, next_token(root)))
}

fn next_token(root: roxmltree::Node) -> Option<String> {
    Some(text(root, "nextToken")).filter(|t| !t.is_empty())
}

/// The `imageId` of a `RegisterImage` answer.
pub fn parse_image_id(xml: &[u8]) -> Result<String, String> {
    let doc = parse(xml)?;
    Some(text(doc.root_element(), "imageId"))
        .filter(|id| !id.is_empty())
        .ok_or_else(|| "the answer has no imageId".to_string())
}

/// Where an import task is (`DescribeImportSnapshotTasks`, `DescribeImportImageTasks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportStatus {
    /// Still working (`active`, or anything else AWS says on the way).
    Running(String),
    /// Done: the snapshot, and for an image import the AMI.
    Completed {
        snapshot_id: String,
        image_id: Option<String>,
    },
    /// Failed (`deleted`, `deleting`): AWS's status message.
    Failed(String),
}

/// The `importTaskId` of an `ImportSnapshot` or `ImportImage` answer.
pub fn parse_import_task_id(xml: &[u8]) -> Result<String, String> {
    let doc = parse(xml)?;
    Some(text(doc.root_element(), "importTaskId"))
        .filter(|id| !id.is_empty())
        .ok_or_else(|| "the answer has no importTaskId".to_string())
}

/// The status of task `id` in a `DescribeImportSnapshotTasks` (`image` false) or
/// `DescribeImportImageTasks` (`image` true) answer.
pub fn parse_import_status(xml: &[u8], id: &str, image: bool) -> Result<ImportStatus, String> {
    let doc = parse(xml)?;
    let set = if image {
        "importImageTaskSet"
    } else {
        "importSnapshotTaskSet"
    };
    let task = items(doc.root_element(), set)
        .find(|t| text(*t, "importTaskId") == id)
        .ok_or_else(|| format!("the answer does not list task {id}"))?;
    let (status, message, snapshot_id, image_id) = if image {
        let snapshot = items(task, "snapshotDetailSet")
            .map(|d| text(d, "snapshotId"))
            .find(|s| !s.is_empty())
            .unwrap_or_default();
        (
            text(task, "status"),
            text(task, "statusMessage"),
            snapshot,
            Some(text(task, "imageId")),
        )
    } else {
        let detail = child(task, "snapshotTaskDetail")
            .ok_or_else(|| format!("task {id} has no snapshotTaskDetail"))?;
        (
            text(detail, "status"),
            text(detail, "statusMessage"),
            text(detail, "snapshotId"),
            None,
        )
    };
    Ok(match status.to_ascii_lowercase().as_str() {
        "completed" => {
            if snapshot_id.is_empty() || image_id.as_ref().is_some_and(|i| i.is_empty()) {
                return Err(format!("task {id} completed without its ids"));
            }
            ImportStatus::Completed {
                snapshot_id,
                image_id,
            }
        }
        "deleted" | "deleting" => {
            ImportStatus::Failed(if message.is_empty() { status } else { message })
        }
        _ => ImportStatus::Running(if message.is_empty() {
            status
        } else {
            format!("{status}: {message}")
        }),
    })
}

/// The `volumeSize` (GiB) of the one snapshot of a `DescribeSnapshots` answer.
pub fn parse_snapshot_size(xml: &[u8]) -> Result<u64, String> {
    let doc = parse(xml)?;
    items(doc.root_element(), "snapshotSet")
        .next()
        .and_then(|s| text(s, "volumeSize").parse().ok())
        .ok_or_else(|| "the answer has no snapshot with a volumeSize".to_string())
}

/// The first error of an error answer, if it is one.
pub fn parse_error(xml: &[u8]) -> Option<ApiError> {
    let doc = parse(xml).ok()?;
    let error = doc.descendants().find(|n| n.has_tag_name("Error"))?;
    Some(ApiError {
        code: text(error, "Code"),
        message: text(error, "Message"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_images_answers_give_ids_snapshots_tags_and_the_next_page() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeImagesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r</requestId>
  <imagesSet>
    <item>
      <imageId>ami-1</imageId><imageState>available</imageState><name>fedora-1700000000</name>
      <blockDeviceMapping><item><deviceName>/dev/sda1</deviceName>
        <ebs><snapshotId>snap-1</snapshotId><volumeSize>1</volumeSize></ebs></item></blockDeviceMapping>
      <tagSet><item><key>nodepool_build_id</key><value>abc</value></item>
              <item><key>nodepool_upload_id</key><value>0000000001</value></item></tagSet>
    </item>
    <item><imageId>ami-2</imageId><imageState>pending</imageState><name>x</name></item>
  </imagesSet>
  <nextToken>page2</nextToken>
</DescribeImagesResponse>"#;
        let (images, next) = parse_images(xml).unwrap();
        assert_eq!(next.as_deref(), Some("page2"));
        assert_eq!(images.len(), 2);
        assert_eq!(images[0].id, "ami-1");
        assert_eq!(images[0].snapshot_ids, ["snap-1"]);
        assert_eq!(images[0].tags["nodepool_upload_id"], "0000000001");
        assert!(images[1].tags.is_empty() && images[1].snapshot_ids.is_empty());
    }

    #[test]
    fn snapshots_errors_and_register_answers_parse() {
        let xml = br#"<DescribeSnapshotsResponse><snapshotSet><item><snapshotId>snap-9</snapshotId>
            <status>completed</status><tagSet><item><key>k</key><value>v</value></item></tagSet></item>
            </snapshotSet></DescribeSnapshotsResponse>"#;
        let (snaps, next) = parse_snapshots(xml).unwrap();
        assert_eq!(next, None);
        assert_eq!(snaps[0].id, "snap-9");
        assert_eq!(snaps[0].tags["k"], "v");
        let err = br#"<?xml version="1.0"?><Response><Errors><Error><Code>InvalidAMIID.NotFound</Code>
            <Message>The image id '[ami-1]' does not exist</Message></Error></Errors><RequestID>x</RequestID></Response>"#;
        assert_eq!(
            parse_error(err),
            Some(ApiError {
                code: "InvalidAMIID.NotFound".into(),
                message: "The image id '[ami-1]' does not exist".into()
            })
        );
        assert_eq!(
            parse_image_id(
                b"<RegisterImageResponse><imageId>ami-7</imageId></RegisterImageResponse>"
            )
            .unwrap(),
            "ami-7"
        );
        assert!(parse_images(b"not xml").is_err());
    }

    #[test]
    fn import_task_answers_give_status_and_ids() {
        let snap = br#"<DescribeImportSnapshotTasksResponse><importSnapshotTaskSet><item>
            <importTaskId>import-snap-1</importTaskId><snapshotTaskDetail><status>completed</status>
            <snapshotId>snap-5</snapshotId></snapshotTaskDetail></item></importSnapshotTaskSet>
            </DescribeImportSnapshotTasksResponse>"#;
        assert_eq!(
            parse_import_status(snap, "import-snap-1", false),
            Ok(ImportStatus::Completed {
                snapshot_id: "snap-5".into(),
                image_id: None
            })
        );
        let image = br#"<DescribeImportImageTasksResponse><importImageTaskSet><item>
            <importTaskId>import-ami-1</importTaskId><status>deleted</status>
            <statusMessage>ClientError: bad disk</statusMessage></item></importImageTaskSet>
            </DescribeImportImageTasksResponse>"#;
        assert_eq!(
            parse_import_status(image, "import-ami-1", true),
            Ok(ImportStatus::Failed("ClientError: bad disk".into()))
        );
        let active = br#"<R><importImageTaskSet><item><importTaskId>t</importTaskId>
            <status>active</status><statusMessage>converting</statusMessage></item></importImageTaskSet></R>"#;
        assert_eq!(
            parse_import_status(active, "t", true),
            Ok(ImportStatus::Running("active: converting".into()))
        );
        assert!(parse_import_status(active, "other", true).is_err());
        assert_eq!(
            parse_import_task_id(b"<ImportSnapshotResponse><importTaskId>import-snap-9</importTaskId></ImportSnapshotResponse>"),
            Ok("import-snap-9".into())
        );
        assert_eq!(
            parse_snapshot_size(
                b"<R><snapshotSet><item><volumeSize>8</volumeSize></item></snapshotSet></R>"
            ),
            Ok(8)
        );
    }

    #[test]
    fn forms_and_tag_specifications_are_encoded() {
        let tags = BTreeMap::from([("a b".to_string(), "c&d".to_string())]);
        let params = tag_specification(1, "image", &tags);
        assert_eq!(
            form("RegisterImage", &params),
            "Action=RegisterImage&Version=2016-11-15&TagSpecification.1.ResourceType=image&\
             TagSpecification.1.Tag.1.Key=a%20b&TagSpecification.1.Tag.1.Value=c%26d"
        );
    }
}
