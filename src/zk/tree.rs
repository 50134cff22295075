//! Readers of the image tree: every build of an image with every upload of every build.
//!
//! These read without watches (the `zk-watch` thread has its own arming variant). They skip
//! the `lock` children, empty znodes (left by lock acquisitions racing a delete) and
//! unparsable records, each unparsable record with one warning; they never fail on odd data,
//! only on ZooKeeper errors.
//!
//! The janitor, the watcher and the workers all read the tree, the janitor on every pass, so
//! an unreadable record is warned about only the first time its data is seen (and again if it
//! changes to other bad data, or becomes readable and then bad again); later reads of the same
//! bad data log at debug.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Mutex, PoisonError};

use log::{debug, warn};

use super::schema::{ImageBuild, ImageUpload, SchemaError};
use super::{Result, Zk, paths};
use crate::model::{BuildState, UploadState};

/// One build record and its uploads.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildInfo {
    pub id: String,
    pub build: ImageBuild,
    pub uploads: Vec<UploadInfo>,
}

/// One upload record.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadInfo {
    pub provider: String,
    pub id: String,
    pub upload: ImageUpload,
}

impl BuildInfo {
    /// Uploads of this build to `provider`.
    pub fn uploads_to<'a>(
        &'a self,
        provider: &'a str,
    ) -> impl Iterator<Item = &'a UploadInfo> + 'a {
        self.uploads.iter().filter(move |u| u.provider == provider)
    }

    /// Whether a `ready` upload to `provider` exists.
    pub fn has_ready_upload(&self, provider: &str) -> bool {
        self.uploads_to(provider)
            .any(|u| u.upload.state == UploadState::Ready)
    }
}

/// The newest `ready` build (by `state_time`).
pub fn newest_ready(builds: &[BuildInfo]) -> Option<&BuildInfo> {
    builds
        .iter()
        .filter(|b| b.build.state == BuildState::Ready)
        .max_by(|a, b| a.build.state_time.total_cmp(&b.build.state_time))
}

/// Unreadable records already warned about: znode path to a hash of the data.
static WARNED: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Forgetting everything beyond this many unreadable records keeps the memory bounded; the
/// price is one more warning for each.
const MAX_WARNED: usize = 10_000;

/// Whether `data` at `path` is unreadable news (the first time it is seen), remembering it.
fn first_time_unreadable(path: String, data: &[u8]) -> bool {
    let mut hasher = DefaultHasher::new();
    data.hash(&mut hasher);
    let hash = hasher.finish();
    let mut warned = WARNED.lock().unwrap_or_else(PoisonError::into_inner);
    if warned.len() >= MAX_WARNED && !warned.contains_key(&path) {
        warned.clear();
    }
    warned.insert(path, hash) != Some(hash)
}

/// A record at `path` read fine: if it is bad again later, that is news again.
fn readable(path: impl FnOnce() -> String) {
    let mut warned = WARNED.lock().unwrap_or_else(PoisonError::into_inner);
    if !warned.is_empty() {
        warned.remove(&path());
    }
}

/// Parses a build record, logging what is skipped.
pub fn parse_build(image: &str, id: &str, data: &[u8]) -> Option<ImageBuild> {
    let path = || paths::image_build_path(image, id);
    match ImageBuild::from_json(data) {
        Ok(b) => {
            readable(path);
            Some(b)
        }
        Err(SchemaError::Empty) => {
            debug!("image={image} build={id}: empty build znode skipped");
            None
        }
        Err(e) if first_time_unreadable(path(), data) => {
            warn!("image={image} build={id}: skipping unreadable build record: {e}");
            None
        }
        Err(e) => {
            debug!("image={image} build={id}: still skipping unreadable build record: {e}");
            None
        }
    }
}

/// Parses an upload record, logging what is skipped.
pub fn parse_upload(
    image: &str,
    build: &str,
    provider: &str,
    id: &str,
    data: &[u8],
) -> Option<ImageUpload> {
    let path = || paths::image_upload_path(image, build, provider, id);
    match ImageUpload::from_json(data) {
        Ok(u) => {
            readable(path);
            Some(u)
        }
        Err(SchemaError::Empty) => {
            debug!(
                "image={image} build={build} provider={provider} upload={id}: empty upload znode skipped"
            );
            None
        }
        Err(e) if first_time_unreadable(path(), data) => {
            warn!(
                "image={image} build={build} provider={provider} upload={id}: skipping unreadable upload record: {e}"
            );
            None
        }
        Err(e) => {
            debug!(
                "image={image} build={build} provider={provider} upload={id}: still skipping unreadable upload record: {e}"
            );
            None
        }
    }
}

/// Image names under `/nodepool/images`.
pub fn image_names(zk: &Zk) -> Result<Vec<String>> {
    let mut names = zk.get_children(paths::IMAGE_ROOT)?.unwrap_or_default();
    names.sort();
    Ok(names)
}

/// Build ids of an image (without `lock`).
pub fn build_ids(zk: &Zk, image: &str) -> Result<Vec<String>> {
    Ok(zk
        .get_children(&paths::image_builds_path(image))?
        .unwrap_or_default()
        .into_iter()
        .filter(|id| id != "lock")
        .collect())
}

/// One build record, `None` when missing, empty or unreadable.
pub fn read_build(zk: &Zk, image: &str, id: &str) -> Result<Option<ImageBuild>> {
    Ok(zk
        .get_data(&paths::image_build_path(image, id))?
        .and_then(|(d, _)| parse_build(image, id, &d)))
}

/// Every readable build of an image, with its uploads.
pub fn read_image(zk: &Zk, image: &str) -> Result<Vec<BuildInfo>> {
    let mut out = Vec::new();
    for id in build_ids(zk, image)? {
        if let Some(build) = read_build(zk, image, &id)? {
            let uploads = read_uploads(zk, image, &id)?;
            out.push(BuildInfo { id, build, uploads });
        }
    }
    Ok(out)
}

/// Upload ids of a (build, provider), without `lock`.
pub fn upload_ids(zk: &Zk, image: &str, build: &str, provider: &str) -> Result<Vec<String>> {
    Ok(zk
        .get_children(&paths::image_uploads_path(image, build, provider))?
        .unwrap_or_default()
        .into_iter()
        .filter(|id| id != "lock")
        .collect())
}

/// Providers that have a directory under a build.
pub fn build_providers(zk: &Zk, image: &str, build: &str) -> Result<Vec<String>> {
    Ok(zk
        .get_children(&paths::image_providers_path(image, build))?
        .unwrap_or_default())
}

/// One upload record, `None` when missing, empty or unreadable.
pub fn read_upload(
    zk: &Zk,
    image: &str,
    build: &str,
    provider: &str,
    id: &str,
) -> Result<Option<ImageUpload>> {
    Ok(zk
        .get_data(&paths::image_upload_path(image, build, provider, id))?
        .and_then(|(d, _)| parse_upload(image, build, provider, id, &d)))
}

/// Every readable upload of a build, all providers.
pub fn read_uploads(zk: &Zk, image: &str, build: &str) -> Result<Vec<UploadInfo>> {
    let mut out = Vec::new();
    for provider in build_providers(zk, image, build)? {
        for id in upload_ids(zk, image, build, &provider)? {
            if let Some(upload) = read_upload(zk, image, build, &provider, &id)? {
                out.push(UploadInfo {
                    provider: provider.clone(),
                    id,
                    upload,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_record_is_news_once_per_bad_data() {
        // Paths of their own: other tests of this binary parse records too.
        let path = || "/nodepool/images/tree-unit-test/builds/b1".to_string();
        assert!(first_time_unreadable(path(), b"{"));
        assert!(!first_time_unreadable(path(), b"{"), "same bad data again");
        assert!(first_time_unreadable(path(), b"[1"), "other bad data");
        assert!(!first_time_unreadable(path(), b"[1"));
        readable(path);
        assert!(
            first_time_unreadable(path(), b"[1"),
            "bad again after a good read"
        );
        let other = "/nodepool/images/tree-unit-test/builds/b2".to_string();
        assert!(first_time_unreadable(other, b"[1"), "each znode on its own");
    }

    #[test]
    fn parse_build_and_upload_skip_what_they_cannot_read() {
        let image = "tree-unit-test-parse";
        assert_eq!(parse_build(image, "b", b""), None);
        assert_eq!(parse_build(image, "b", b"{\"state\": 1}"), None);
        assert_eq!(parse_build(image, "b", b"{\"state\": 1}"), None);
        let ok = parse_build(image, "b", br#"{"state": "ready"}"#).unwrap();
        assert_eq!(ok.state, BuildState::Ready);
        assert_eq!(parse_upload(image, "b", "p", "0000000001", b"nope"), None);
        let ok = parse_upload(image, "b", "p", "0000000001", br#"{"state": "failed"}"#);
        assert_eq!(ok.unwrap().state, UploadState::Failed);
    }
}
