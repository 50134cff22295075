//! `export-image-data` and `import-image-data` (wire spec §2.10): a JSON object mapping each
//! pause flag, build and upload znode path to its data as a string. Locks and build requests
//! are not part of it.
//!
//! The export is written as Python's `json.dump` writes it (`", "` and `": "`, non-ASCII as
//! `\uXXXX`), so a file from either implementation imports into the other. Everything is read
//! before the file is opened, so a failed export leaves an older file untouched.
//!
//! Import is meant for a quiescent system. Upload ids are ZooKeeper sequence numbers taken
//! from the parent's counter, so before writing the records the import creates (and deletes
//! again) sequential children under every upload parent until the counter has passed the
//! highest imported id: the next upload a builder makes gets a fresh id instead of colliding.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde_json::Value;

use super::{OpsError, READ_RETRY};
use crate::zk::paths::{self, ImagePath};
use crate::zk::schema::py_json_string;
use crate::zk::{Mode, Result, Zk, ZkError, tree};

/// `export-image-data PATH`.
pub fn export(zk: &Zk, path: &Path) -> std::result::Result<(), OpsError> {
    let entries = zk
        .retry(READ_RETRY, collect)
        .map_err(OpsError::zk("reading /nodepool/images"))?;
    let mut text = String::from("{");
    for (i, (znode, data)) in entries.iter().enumerate() {
        let Ok(data) = std::str::from_utf8(data) else {
            return Err(OpsError::Zk {
                doing: format!("exporting {znode}"),
                source: ZkError::Other("the data is not UTF-8".into()),
            });
        };
        if i > 0 {
            text.push_str(", ");
        }
        text.push_str(&py_json_string(znode));
        text.push_str(": ");
        text.push_str(&py_json_string(data));
    }
    text.push('}');
    let io = |doing| {
        move |source| OpsError::Io {
            doing,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("cannot open"))?;
    file.write_all(text.as_bytes())
        .map_err(io("cannot write"))?;
    file.sync_all().map_err(io("cannot write"))
}

/// Every pause flag, build and upload as (path, data), images and providers by name, builds
/// and uploads by id.
fn collect(zk: &Zk) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for image in tree::image_names(zk)? {
        let pause = paths::image_pause_path(&image);
        if zk.exists(&pause)?.is_some() {
            out.push((pause, Vec::new()));
        }
        let mut builds = tree::build_ids(zk, &image)?;
        builds.sort();
        for build in builds {
            let build_path = paths::image_build_path(&image, &build);
            let Some((data, _)) = zk.get_data(&build_path)? else {
                continue;
            };
            out.push((build_path, data));
            let mut providers = tree::build_providers(zk, &image, &build)?;
            providers.sort();
            for provider in providers {
                let mut uploads = tree::upload_ids(zk, &image, &build, &provider)?;
                uploads.sort();
                for upload in uploads {
                    let upload_path = paths::image_upload_path(&image, &build, &provider, &upload);
                    if let Some((data, _)) = zk.get_data(&upload_path)? {
                        out.push((upload_path, data));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// `import-image-data PATH`.
pub fn import(zk: &Zk, path: &Path) -> std::result::Result<(), OpsError> {
    let text = std::fs::read(path).map_err(|source| OpsError::Io {
        doing: "cannot read",
        path: path.to_path_buf(),
        source,
    })?;
    let entries = parse_import(&text).map_err(|why| OpsError::BadImport {
        path: path.to_path_buf(),
        why,
    })?;

    // The highest numeric upload id under every upload parent.
    let mut highest: BTreeMap<String, i64> = BTreeMap::new();
    for znode in entries.keys() {
        if let ImagePath::Upload {
            image,
            build_id,
            provider,
            upload_id,
        } = paths::parse_image_path(znode)
            && let Some(n) = sequence_number(&upload_id)
        {
            let parent = paths::image_uploads_path(&image, &build_id, &provider);
            let max = highest.entry(parent).or_insert(n);
            *max = (*max).max(n);
        }
    }
    let wanted: BTreeSet<&str> = entries.keys().map(String::as_str).collect();
    for (parent, max) in &highest {
        advance_counter(zk, parent, *max, &wanted).map_err(OpsError::zk(format!(
            "advancing the upload counter of {parent}"
        )))?;
    }

    // Sorted paths: a build comes before its uploads.
    for (znode, data) in &entries {
        let written = match zk.create_with_parents(znode, data.as_bytes(), Mode::Persistent) {
            Err(ZkError::NodeExists) => zk.set_data(znode, data.as_bytes(), None).map(|_| ()),
            other => other.map(|_| ()),
        };
        written.map_err(OpsError::zk(format!("writing {znode}")))?;
    }
    Ok(())
}

/// The import file as sorted (path, data), refusing anything but pause flags, builds and
/// uploads with string data.
fn parse_import(text: &[u8]) -> std::result::Result<BTreeMap<String, String>, String> {
    let value: Value = serde_json::from_slice(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(map) = value else {
        return Err("the JSON is not an object".into());
    };
    let mut out = BTreeMap::new();
    for (znode, data) in map {
        match paths::parse_image_path(&znode) {
            ImagePath::Pause { .. } | ImagePath::Build { .. } | ImagePath::Upload { .. } => {}
            _ => {
                return Err(format!(
                    "{znode:?} is not a pause flag, build or upload path"
                ));
            }
        }
        let Value::String(data) = data else {
            return Err(format!("the value of {znode:?} is not a string"));
        };
        out.insert(znode, data);
    }
    Ok(out)
}

/// The number of a ZooKeeper sequence name (`0000000007` → 7); `None` for other names.
fn sequence_number(id: &str) -> Option<i64> {
    let digits = id.strip_prefix('-').unwrap_or(id);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse::<i32>().ok().map(i64::from)
}

/// Creates sequential children of `parent` until ZooKeeper hands out a number of at least
/// `max`, deleting each one that is not in the import.
fn advance_counter(zk: &Zk, parent: &str, max: i64, wanted: &BTreeSet<&str>) -> Result<()> {
    let prefix = format!("{parent}/");
    // The counter starts at 0 and moves by at least one per create: `max + 1` creates suffice.
    for _ in 0..=max {
        let node = zk.create_with_parents(&prefix, b"", Mode::PersistentSequential)?;
        if !wanted.contains(node.as_str()) {
            zk.delete(&node, None)?;
        }
        match sequence_number(&node[prefix.len()..]) {
            Some(n) if n < max => continue,
            _ => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_accepts_only_image_data() {
        let ok = br#"{"/nodepool/images/a/pause": "", "/nodepool/images/a/builds/00ff": "{}", "/nodepool/images/a/builds/00ff/providers/p/images/0000000003": "{}"}"#;
        assert_eq!(parse_import(ok).unwrap().len(), 3);
        assert!(
            parse_import(br#"{"/nodepool/nodes/1": ""}"#)
                .unwrap_err()
                .contains("/nodepool/nodes/1")
        );
        assert!(parse_import(br#"{"/nodepool/images/a/builds/lock": ""}"#).is_err());
        assert!(
            parse_import(br#"{"/nodepool/images/a/pause": 1}"#)
                .unwrap_err()
                .contains("not a string")
        );
        assert!(parse_import(b"[]").is_err());
        assert!(parse_import(b"{").unwrap_err().starts_with("invalid JSON"));
    }

    #[test]
    fn sequence_numbers() {
        assert_eq!(sequence_number("0000000007"), Some(7));
        assert_eq!(sequence_number("-000000001"), Some(-1));
        assert_eq!(sequence_number("abc"), None);
        assert_eq!(sequence_number(""), None);
        assert_eq!(sequence_number("99999999999"), None);
    }
}
