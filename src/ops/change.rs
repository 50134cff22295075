//! The commands that change one znode: `image-build`, `dib-image-delete`, `image-delete`,
//! `image-pause`, `image-unpause`.
//!
//! Like upstream they take no lock: a build or upload set to `deleting` is removed by the
//! janitor of whichever builder gets to it, and a request or pause flag is acted on by the
//! builders' watches. Unlike upstream, a record is overwritten only at the version it was read
//! at; when a builder writes it in between, the command reads it again and re-decides (a
//! build that went back to `building` is then refused, as it would have been).

use super::OpsError;
use crate::config::Config;
use crate::model::{self, BuildState, UploadState};
use crate::zk::schema::{ImageBuild, ImageUpload};
use crate::zk::{Mode, Zk, ZkError, paths};

/// How often a delete re-reads a record that changed under it before giving up.
const WRITE_ATTEMPTS: usize = 5;

pub const BUILD_IN_PROGRESS: &str = "Cannot delete a build in progress";
pub const UPLOAD_NOT_FOUND: &str = "Image upload not found";
pub const UPLOAD_IN_PROGRESS: &str = "Cannot delete because image upload in progress";

/// `image-build IMAGE`: refuses an image that is not a configured diskimage or is paused in
/// the configuration (upstream's messages), else creates `request-build` with parents.
pub fn image_build(zk: &Zk, cfg: &Config, image: &str) -> Result<(), OpsError> {
    let Some(diskimage) = cfg.diskimage(image) else {
        return Err(OpsError::Refused(format!(
            "Trying to build a non disk-image-builder image: {image}"
        )));
    };
    if diskimage.pause {
        return Err(OpsError::Refused(format!(
            "Skipping build request for image {image}; paused"
        )));
    }
    let path = paths::image_build_request_path(image);
    zk.ensure_path(&path)
        .map_err(OpsError::zk(format!("creating {path}")))
}

/// `dib-image-delete <image>-<build id>`: sets the build to `deleting`. Returns the message
/// to print, if any.
pub fn dib_image_delete(zk: &Zk, id: &str) -> Result<Option<String>, OpsError> {
    // Image names may contain '-', build ids do not: split at the last one.
    let Some((image, build_id)) = id
        .rsplit_once('-')
        .filter(|(i, b)| !i.is_empty() && !b.is_empty())
    else {
        return Ok(Some(format!("Build {id} not found")));
    };
    let path = paths::image_build_path(image, build_id);
    for _ in 0..WRITE_ATTEMPTS {
        let read = zk
            .get_data(&path)
            .map_err(OpsError::zk(format!("reading {path}")))?;
        let Some((mut build, version)) = read
            .and_then(|(data, stat)| ImageBuild::from_json(&data).ok().map(|b| (b, stat.version)))
        else {
            return Ok(Some(format!("Build {id} not found")));
        };
        if build.state == BuildState::Building {
            return Ok(Some(BUILD_IN_PROGRESS.to_string()));
        }
        build.state = BuildState::Deleting;
        build.state_time = model::now_epoch();
        match zk.set_data(&path, &build.to_json(), Some(version)) {
            Ok(_) => return Ok(None),
            Err(ZkError::BadVersion) => continue,
            Err(ZkError::NoNode) => {
                return Ok(Some(format!("Build {id} not found")));
            }
            Err(e) => return Err(OpsError::zk(format!("writing {path}"))(e)),
        }
    }
    Err(changed_too_often(&path))
}

/// `image-delete`: sets one upload to `deleting`. Returns the message to print, if any.
pub fn image_delete(
    zk: &Zk,
    image: &str,
    build_id: &str,
    provider: &str,
    upload_id: &str,
) -> Result<Option<String>, OpsError> {
    let path = paths::image_upload_path(image, build_id, provider, upload_id);
    for _ in 0..WRITE_ATTEMPTS {
        let read = zk
            .get_data(&path)
            .map_err(OpsError::zk(format!("reading {path}")))?;
        let Some((mut upload, version)) = read.and_then(|(data, stat)| {
            ImageUpload::from_json(&data)
                .ok()
                .map(|u| (u, stat.version))
        }) else {
            return Ok(Some(UPLOAD_NOT_FOUND.to_string()));
        };
        if upload.state == UploadState::Uploading {
            return Ok(Some(UPLOAD_IN_PROGRESS.to_string()));
        }
        upload.state = UploadState::Deleting;
        upload.state_time = model::now_epoch();
        match zk.set_data(&path, &upload.to_json(), Some(version)) {
            Ok(_) => return Ok(None),
            Err(ZkError::BadVersion) => continue,
            Err(ZkError::NoNode) => return Ok(Some(UPLOAD_NOT_FOUND.to_string())),
            Err(e) => return Err(OpsError::zk(format!("writing {path}"))(e)),
        }
    }
    Err(changed_too_often(&path))
}

/// `image-pause` / `image-unpause`: creates (with parents) or deletes the `pause` znode; both
/// are no-ops when already in the wanted state.
pub fn set_paused(zk: &Zk, image: &str, paused: bool) -> Result<(), OpsError> {
    let path = paths::image_pause_path(image);
    let result = if paused {
        match zk.create_with_parents(&path, b"", Mode::Persistent) {
            Ok(_) | Err(ZkError::NodeExists) => Ok(()),
            Err(e) => Err(e),
        }
    } else {
        match zk.delete(&path, None) {
            Ok(()) | Err(ZkError::NoNode) => Ok(()),
            Err(e) => Err(e),
        }
    };
    let doing = if paused { "creating" } else { "deleting" };
    result.map_err(OpsError::zk(format!("{doing} {path}")))
}

fn changed_too_often(path: &str) -> OpsError {
    OpsError::Zk {
        doing: format!("writing {path}"),
        source: ZkError::Other(format!(
            "the record changed {WRITE_ATTEMPTS} times while we wrote it"
        )),
    }
}
