//! Every znode path nodepool 11 uses for images, as pure functions (wire spec §2.2).
//!
//! Only this module knows the tree layout. Names follow nodepool's path helpers in snake_case.
//! All paths are relative to the configured chroot.

/// Root of all image data.
pub const IMAGE_ROOT: &str = "/nodepool/images";
/// Root of component registrations.
pub const COMPONENT_ROOT: &str = "/nodepool/components";
/// Component kinds whose roots every nodepool process ensures exist.
pub const COMPONENT_KINDS: [&str; 3] = ["pool", "launcher", "builder"];

/// `/nodepool/images/<image>`
pub fn image_path(image: &str) -> String {
    format!("{IMAGE_ROOT}/{image}")
}

/// `/nodepool/images/<image>/pause`: exists while builds of the image are paused.
pub fn image_pause_path(image: &str) -> String {
    format!("{IMAGE_ROOT}/{image}/pause")
}

/// `/nodepool/images/<image>/request-build`: exists while a manual build is requested.
pub fn image_build_request_path(image: &str) -> String {
    format!("{IMAGE_ROOT}/{image}/request-build")
}

/// `/nodepool/images/<image>/builds`
pub fn image_builds_path(image: &str) -> String {
    format!("{IMAGE_ROOT}/{image}/builds")
}

/// `/nodepool/images/<image>/builds/lock`: the image build lock.
pub fn image_build_lock_path(image: &str) -> String {
    format!("{IMAGE_ROOT}/{image}/builds/lock")
}

/// `/nodepool/images/<image>/builds/<build_id>`: an ImageBuild record.
pub fn image_build_path(image: &str, build_id: &str) -> String {
    format!("{IMAGE_ROOT}/{image}/builds/{build_id}")
}

/// `/nodepool/images/<image>/builds/<build_id>/lock`: the build-id lock (cleanup only).
pub fn image_build_number_lock_path(image: &str, build_id: &str) -> String {
    format!("{IMAGE_ROOT}/{image}/builds/{build_id}/lock")
}

/// `/nodepool/images/<image>/builds/<build_id>/providers`
pub fn image_providers_path(image: &str, build_id: &str) -> String {
    format!("{IMAGE_ROOT}/{image}/builds/{build_id}/providers")
}

/// `/nodepool/images/<image>/builds/<build_id>/providers/<provider>`
pub fn image_provider_path(image: &str, build_id: &str, provider: &str) -> String {
    format!("{IMAGE_ROOT}/{image}/builds/{build_id}/providers/{provider}")
}

/// `…/providers/<provider>/images`: the parent whose sequence counter numbers uploads.
pub fn image_uploads_path(image: &str, build_id: &str, provider: &str) -> String {
    format!("{IMAGE_ROOT}/{image}/builds/{build_id}/providers/{provider}/images")
}

/// `…/providers/<provider>/images/lock`: the upload lock.
pub fn image_upload_lock_path(image: &str, build_id: &str, provider: &str) -> String {
    format!("{IMAGE_ROOT}/{image}/builds/{build_id}/providers/{provider}/images/lock")
}

/// `…/providers/<provider>/images/<upload_id>`: an ImageUpload record.
pub fn image_upload_path(image: &str, build_id: &str, provider: &str, upload_id: &str) -> String {
    format!("{IMAGE_ROOT}/{image}/builds/{build_id}/providers/{provider}/images/{upload_id}")
}

/// `…/providers/<provider>/images/<upload_id>/lock`: the upload-number lock (cleanup only).
pub fn image_upload_number_lock_path(
    image: &str,
    build_id: &str,
    provider: &str,
    upload_id: &str,
) -> String {
    format!("{IMAGE_ROOT}/{image}/builds/{build_id}/providers/{provider}/images/{upload_id}/lock")
}

/// `/nodepool/components/<kind>`
pub fn component_kind_path(kind: &str) -> String {
    format!("{COMPONENT_ROOT}/{kind}")
}

/// `/nodepool/components/builder/<hostname>`: the prefix ZooKeeper appends a sequence to.
pub fn builder_component_prefix(hostname: &str) -> String {
    format!("{COMPONENT_ROOT}/builder/{hostname}")
}

/// What a path under `/nodepool/images` denotes, parsed positionally as the launcher does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImagePath {
    Image {
        image: String,
    },
    Pause {
        image: String,
    },
    Build {
        image: String,
        build_id: String,
    },
    Upload {
        image: String,
        build_id: String,
        provider: String,
        upload_id: String,
    },
    Other,
}

/// Parses a path positionally after `/nodepool/images` (wire spec §2.2): 1 component → image,
/// 2 with `pause` → pause flag, 3 (`<image>/builds/<id>`) → build unless `lock`, 7
/// (`…/providers/<p>/images/<u>`) → upload unless `lock`; anything else is `Other`.
pub fn parse_image_path(path: &str) -> ImagePath {
    let Some(rest) = path
        .strip_prefix(IMAGE_ROOT)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return ImagePath::Other;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return ImagePath::Other;
    }
    match parts.as_slice() {
        [image] => ImagePath::Image {
            image: image.to_string(),
        },
        [image, "pause"] => ImagePath::Pause {
            image: image.to_string(),
        },
        [image, "builds", id] if *id != "lock" => ImagePath::Build {
            image: image.to_string(),
            build_id: id.to_string(),
        },
        [image, "builds", id, "providers", provider, "images", upload] if *upload != "lock" => {
            ImagePath::Upload {
                image: image.to_string(),
                build_id: id.to_string(),
                provider: provider.to_string(),
                upload_id: upload.to_string(),
            }
        }
        _ => ImagePath::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_nodepool_exactly() {
        let b = "4d71e1096b2248c3899a5665643b5044";
        assert_eq!(image_path("test-image-2"), "/nodepool/images/test-image-2");
        assert_eq!(image_pause_path("i"), "/nodepool/images/i/pause");
        assert_eq!(
            image_build_request_path("i"),
            "/nodepool/images/i/request-build"
        );
        assert_eq!(image_builds_path("i"), "/nodepool/images/i/builds");
        assert_eq!(image_build_lock_path("i"), "/nodepool/images/i/builds/lock");
        assert_eq!(
            image_build_path("test-image-2", b),
            format!("/nodepool/images/test-image-2/builds/{b}")
        );
        assert_eq!(
            image_build_number_lock_path("i", b),
            format!("/nodepool/images/i/builds/{b}/lock")
        );
        assert_eq!(
            image_providers_path("i", b),
            format!("/nodepool/images/i/builds/{b}/providers")
        );
        assert_eq!(
            image_provider_path("i", b, "fake-provider-1"),
            format!("/nodepool/images/i/builds/{b}/providers/fake-provider-1")
        );
        assert_eq!(
            image_uploads_path("i", b, "p"),
            format!("/nodepool/images/i/builds/{b}/providers/p/images")
        );
        assert_eq!(
            image_upload_lock_path("i", b, "p"),
            format!("/nodepool/images/i/builds/{b}/providers/p/images/lock")
        );
        assert_eq!(
            image_upload_path("test-image-2", b, "fake-provider-1", "0000000001"),
            "/nodepool/images/test-image-2/builds/4d71e1096b2248c3899a5665643b5044/providers/fake-provider-1/images/0000000001"
        );
        assert_eq!(
            image_upload_number_lock_path("i", b, "p", "0000000001"),
            format!("/nodepool/images/i/builds/{b}/providers/p/images/0000000001/lock")
        );
        assert_eq!(
            component_kind_path("builder"),
            "/nodepool/components/builder"
        );
        assert_eq!(
            builder_component_prefix("vm"),
            "/nodepool/components/builder/vm"
        );
    }

    #[test]
    fn positional_parsing_follows_the_launcher() {
        assert_eq!(
            parse_image_path("/nodepool/images/a"),
            ImagePath::Image { image: "a".into() }
        );
        assert_eq!(
            parse_image_path("/nodepool/images/a/pause"),
            ImagePath::Pause { image: "a".into() }
        );
        assert_eq!(
            parse_image_path("/nodepool/images/a/builds/00ff"),
            ImagePath::Build {
                image: "a".into(),
                build_id: "00ff".into()
            }
        );
        assert_eq!(
            parse_image_path("/nodepool/images/a/builds/lock"),
            ImagePath::Other
        );
        assert_eq!(
            parse_image_path("/nodepool/images/a/builds"),
            ImagePath::Other
        );
        assert_eq!(
            parse_image_path("/nodepool/images/a/request-build"),
            ImagePath::Other
        );
        assert_eq!(
            parse_image_path("/nodepool/images/a/builds/b/providers/p/images/0000000001"),
            ImagePath::Upload {
                image: "a".into(),
                build_id: "b".into(),
                provider: "p".into(),
                upload_id: "0000000001".into()
            }
        );
        assert_eq!(
            parse_image_path("/nodepool/images/a/builds/b/providers/p/images/lock"),
            ImagePath::Other
        );
        assert_eq!(
            parse_image_path("/nodepool/images/a/builds/b/providers/p/images/1/lock"),
            ImagePath::Other
        );
        assert_eq!(parse_image_path("/nodepool/nodes/1"), ImagePath::Other);
        assert_eq!(parse_image_path("/nodepool/images"), ImagePath::Other);
    }
}
