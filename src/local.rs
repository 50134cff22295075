//! The images-dir and the build-log dir: the one owner of their file names, as `zk::paths`
//! owns the ZooKeeper tree.
//!
//! # Layout (as nodepool 11 writes it, wire spec §1.2, §1.4, §3.10)
//!
//! * `<images-dir>/builder_id.txt`: this builder's UUID (read and written by `identity`).
//! * `<images-dir>/<image>-<build_id>`: the base name DIB gets (`-o`, `DIB_IMAGE_FILENAME`).
//!   DIB appends `.<format>` for each image file, writes the checksum files
//!   `<image>-<build_id>.<format>.md5` and `.<format>.sha256` (`--checksum`), and a manifest
//!   directory `<image>-<build_id>.d`.
//! * `<build-log-dir>/<image>-<build_id>.log`: DIB's output, ending with `Exit code: N`.
//!
//! Build ids are lower-case hex (uuid4 without dashes), so a name splits at its *last* `-`
//! into image and build id, as upstream's scan regex `^(.*)-([abcdef\d]+)\.(\w+)$` does; an
//! image name may itself contain dashes.
//!
//! # Who uses what
//!
//! The build worker names DIB's output and log ([`dib_base`], [`build_log`]), checks the
//! image files ([`image_file`]) and free space ([`free_gib`]), and prunes old logs
//! ([`prune_build_logs`]). The scheduler and the upload worker find the file to upload
//! ([`image_file`]) and its checksums ([`read_checksum`]). The janitor scans for the builds
//! present ([`builds_present`]), deletes a build's files ([`delete_build`]) and prunes
//! uploaded formats ([`prune_formats`]); what to delete is its decision, how to find the
//! files is this module's.
//!
//! # Deliberate differences from nodepool 11
//!
//! * Q5: build logs are pruned by exact name (`<image>-<hex id>.log`), not by image-name
//!   prefix, so pruning `foo` never deletes the logs of `foo-bar`.
//! * Q7: a build's entries are found by their `<image>-<build_id>.` prefix, so a lone `.d`
//!   manifest directory goes with its build (upstream leaves it when no image file is left).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::model;

/// The builder's id file in images-dir.
pub const BUILDER_ID_FILE: &str = "builder_id.txt";

/// `<images_dir>/builder_id.txt`.
pub fn builder_id_file(images_dir: &Path) -> PathBuf {
    images_dir.join(BUILDER_ID_FILE)
}

/// `<image>-<build_id>`: the stem every file of a build starts with.
fn stem(image: &str, build_id: &str) -> String {
    format!("{image}-{build_id}")
}

/// `<images_dir>/<image>-<build_id>`: the output name DIB is given; it appends the rest.
pub fn dib_base(images_dir: &Path, image: &str, build_id: &str) -> PathBuf {
    images_dir.join(stem(image, build_id))
}

/// The image file name of one format: `<image>-<build_id>.<format>`.
pub fn image_file_name(image: &str, build_id: &str, format: &str) -> String {
    format!("{}.{format}", stem(image, build_id))
}

/// `<images_dir>/<image>-<build_id>.<format>`.
pub fn image_file(images_dir: &Path, image: &str, build_id: &str, format: &str) -> PathBuf {
    images_dir.join(image_file_name(image, build_id, format))
}

/// `<images_dir>/<image>-<build_id>.d`: DIB's manifest directory.
pub fn manifest_dir(images_dir: &Path, image: &str, build_id: &str) -> PathBuf {
    images_dir.join(format!("{}.d", stem(image, build_id)))
}

/// `<build_log_dir>/<image>-<build_id>.log`.
pub fn build_log(build_log_dir: &Path, image: &str, build_id: &str) -> PathBuf {
    build_log_dir.join(format!("{}.log", stem(image, build_id)))
}

/// The two checksum files DIB writes next to each image file (`--checksum`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Checksum {
    Md5,
    Sha256,
}

impl Checksum {
    /// The extension added to the image file's name.
    pub fn extension(self) -> &'static str {
        match self {
            Checksum::Md5 => "md5",
            Checksum::Sha256 => "sha256",
        }
    }

    /// How many hex digits the checksum has.
    pub fn hex_len(self) -> usize {
        match self {
            Checksum::Md5 => 32,
            Checksum::Sha256 => 64,
        }
    }
}

/// `<image_file>.md5` or `<image_file>.sha256`.
pub fn checksum_file(image_file: &Path, kind: Checksum) -> PathBuf {
    let mut name = image_file.as_os_str().to_owned();
    name.push(".");
    name.push(kind.extension());
    PathBuf::from(name)
}

/// The checksum of an image file from its checksum file: its first 32 (md5) or 64 (sha256)
/// characters, like upstream; `None` when the file is absent, short or not hex.
pub fn read_checksum(image_file: &Path, kind: Checksum) -> Option<String> {
    let text = std::fs::read_to_string(checksum_file(image_file, kind)).ok()?;
    let sum: String = text.chars().take(kind.hex_len()).collect();
    (sum.len() == kind.hex_len() && sum.bytes().all(|b| b.is_ascii_hexdigit())).then_some(sum)
}

/// What an entry of images-dir is to its build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// `<image>-<id>.<format>`.
    Image { format: String },
    /// `<image>-<id>.<format>.md5` / `.sha256`.
    Checksum { format: String, kind: Checksum },
    /// `<image>-<id>.d`.
    Manifest,
}

/// An images-dir entry name read back: whose build it belongs to and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalName {
    pub image: String,
    pub build_id: String,
    pub entry: Entry,
}

/// Reads an images-dir entry name as upstream's scan does (`<image>-<hex id>.<word>`, after
/// a checksum extension); `None` for anything else (`builder_id.txt`, stray files).
pub fn parse_name(name: &str) -> Option<LocalName> {
    let (base, checksum) = [Checksum::Md5, Checksum::Sha256]
        .into_iter()
        .find_map(|k| {
            name.strip_suffix(k.extension())
                .and_then(|b| b.strip_suffix('.'))
                .map(|b| (b, Some(k)))
        })
        .unwrap_or((name, None));
    let (stem, ext) = base.rsplit_once('.')?;
    if ext.is_empty() || !ext.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return None;
    }
    let (image, build_id) = stem.rsplit_once('-')?;
    if image.is_empty() || !model::is_build_id(build_id) {
        return None;
    }
    let entry = match (ext, checksum) {
        (format, Some(kind)) => Entry::Checksum {
            format: format.to_string(),
            kind,
        },
        ("d", None) => Entry::Manifest,
        (format, None) => Entry::Image {
            format: format.to_string(),
        },
    };
    Some(LocalName {
        image: image.to_string(),
        build_id: build_id.to_string(),
        entry,
    })
}

/// Distinct (image, build id) pairs of the builds with any entry in images-dir (image
/// files, checksum files, `.d` manifest directories).
pub fn builds_present(images_dir: &Path) -> std::io::Result<BTreeSet<(String, String)>> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(images_dir)? {
        if let Some(n) = parse_name(&e?.file_name().to_string_lossy()) {
            out.insert((n.image, n.build_id));
        }
    }
    Ok(out)
}

/// The entries of one build: every `<image>-<build_id>.<rest>` in images-dir, with `rest`
/// (what follows the stem's dot, never empty), in deletion order ([`deletion_rank`]).
/// Unreadable directories have none.
fn build_entries(images_dir: &Path, image: &str, build_id: &str) -> Vec<(String, PathBuf)> {
    let stem = stem(image, build_id);
    let Ok(entries) = std::fs::read_dir(images_dir) else {
        return Vec::new();
    };
    let mut entries: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(&stem)?.strip_prefix('.')?;
            (!rest.is_empty()).then(|| (rest.to_string(), e.path()))
        })
        .collect();
    entries.sort_by_key(|(rest, _)| deletion_rank(rest));
    entries
}

/// Where an entry (by what follows the build's stem) comes when a build's files are deleted:
/// checksum files first, then image files, the manifest directory last. So an image file that
/// is gone never leaves its checksums behind, not even for a moment (the directory's own
/// order would), and the manifest, which says the build was here, goes when nothing else is.
fn deletion_rank(rest: &str) -> u8 {
    if rest == "d" {
        2
    } else if rest.ends_with(".md5") || rest.ends_with(".sha256") {
        0
    } else {
        1
    }
}

/// Deletes every local entry of a build (image files, checksum files, the `.d` manifest
/// directory, even alone); returns how many went. Entries already gone are no error.
pub fn delete_build(images_dir: &Path, image: &str, build_id: &str) -> usize {
    let mut removed = 0;
    for (rest, path) in build_entries(images_dir, image, build_id) {
        let res = if rest == "d" && path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match res {
            Ok(()) => {
                info!("Removed DIB file {}", path.display());
                removed += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("cannot remove {}: {e}", path.display()),
        }
    }
    removed
}

/// `delete-after-upload`: deletes a build's image files (with their checksum files) of every
/// format not in `keep`, never its manifest directory; returns how many went.
pub fn prune_formats(
    images_dir: &Path,
    image: &str,
    build_id: &str,
    keep: &BTreeSet<String>,
) -> usize {
    let mut removed = 0;
    for (rest, path) in build_entries(images_dir, image, build_id) {
        let format = rest.trim_end_matches(".md5").trim_end_matches(".sha256");
        if format == "d" || format.contains('.') || keep.contains(format) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                info!("Removed DIB file {} (delete-after-upload)", path.display());
                removed += 1;
            }
            Err(err) => warn!("cannot remove {}: {err}", path.display()),
        }
    }
    removed
}

/// Keeps the newest `max(retention, 1)` logs of `image` (exact `<image>-<hex id>.log`
/// names, not a prefix match as upstream's quirk Q5); `retention < 0` keeps everything.
pub fn prune_build_logs(build_log_dir: &Path, image: &str, retention: i64) {
    if retention < 0 {
        return;
    }
    let keep = retention.max(1) as usize;
    let Ok(entries) = std::fs::read_dir(build_log_dir) else {
        return;
    };
    let mut logs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix(image)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|r| r.strip_suffix(".log"))
                .is_some_and(model::is_build_id)
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    logs.sort();
    let excess = logs.len().saturating_sub(keep);
    for (_, path) in logs.into_iter().take(excess) {
        info!("Deleting old build log {}", path.display());
        if let Err(e) = std::fs::remove_file(&path) {
            warn!("cannot delete {}: {e}", path.display());
        }
    }
}

/// Free space of the file system holding `dir`, GiB.
pub fn free_gib(dir: &Path) -> std::io::Result<f64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(st.blocks_available() as f64 * st.fragment_size() as f64 / (1024.0 * 1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary images-dir holding empty files of these names.
    fn dir_with(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for n in names {
            std::fs::write(dir.path().join(n), "").unwrap();
        }
        dir
    }

    fn entry_names(dir: &Path) -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn every_name_a_build_writes_reads_back_as_that_build() {
        let dir = Path::new("/opt/nodepool/images");
        let image = image_file(dir, "ubuntu-jammy", "0f3a", "qcow2");
        assert_eq!(image, dir.join("ubuntu-jammy-0f3a.qcow2"));
        assert_eq!(
            dib_base(dir, "ubuntu-jammy", "0f3a"),
            dir.join("ubuntu-jammy-0f3a")
        );
        let named = |p: &Path| parse_name(&p.file_name().unwrap().to_string_lossy());
        let of = |entry| {
            Some(LocalName {
                image: "ubuntu-jammy".into(),
                build_id: "0f3a".into(),
                entry,
            })
        };
        let qcow2 = || "qcow2".to_string();
        assert_eq!(named(&image), of(Entry::Image { format: qcow2() }));
        for kind in [Checksum::Md5, Checksum::Sha256] {
            let sum = checksum_file(&image, kind);
            assert_eq!(
                sum,
                dir.join(format!("ubuntu-jammy-0f3a.qcow2.{}", kind.extension()))
            );
            assert_eq!(
                named(&sum),
                of(Entry::Checksum {
                    format: qcow2(),
                    kind
                })
            );
        }
        let manifest = manifest_dir(dir, "ubuntu-jammy", "0f3a");
        assert_eq!(manifest, dir.join("ubuntu-jammy-0f3a.d"));
        assert_eq!(named(&manifest), of(Entry::Manifest));
        assert_eq!(
            build_log(
                Path::new("/var/log/nodepool/builds"),
                "ubuntu-jammy",
                "0f3a"
            ),
            Path::new("/var/log/nodepool/builds/ubuntu-jammy-0f3a.log")
        );
    }

    #[test]
    fn names_that_are_no_build_file_are_not_read_as_one() {
        for name in [
            BUILDER_ID_FILE,
            "fake-dib.fedora.done",
            "x-notHEX.qcow2",
            "-0123.qcow2",
            "fedora-0123.",
            "fedora-0123",
            "fedora-0123.qc-ow2",
        ] {
            assert_eq!(parse_name(name), None, "{name}");
        }
    }

    #[test]
    fn local_build_names_parse_like_upstreams_regex() {
        let dir = dir_with(&[
            "fedora-0123abcd.qcow2",
            "fedora-0123abcd.qcow2.md5",
            "fedora-0123abcd.qcow2.sha256",
            "fedora-0123abcd.d",
            "ubuntu-jammy-ff00.raw",
            "lone-aa.d",
            "builder_id.txt",
            "fake-dib.fedora.done",
            "x-notHEX.qcow2",
        ]);
        let got: Vec<(String, String)> = builds_present(dir.path()).unwrap().into_iter().collect();
        assert_eq!(
            got,
            vec![
                ("fedora".into(), "0123abcd".into()),
                ("lone".into(), "aa".into()),
                ("ubuntu-jammy".into(), "ff00".into())
            ]
        );
    }

    #[test]
    fn deleting_a_build_takes_all_its_entries_and_nothing_of_others() {
        let dir = dir_with(&[
            "fedora-aa.qcow2",
            "fedora-aa.qcow2.md5",
            "fedora-aa.raw",
            "fedora-aab.qcow2",
            "fedora-bb-aa.qcow2",
            BUILDER_ID_FILE,
        ]);
        let d = dir.path();
        std::fs::create_dir(manifest_dir(d, "fedora", "aa")).unwrap();
        std::fs::write(manifest_dir(d, "fedora", "aa").join("packages"), "").unwrap();
        assert_eq!(delete_build(d, "fedora", "aa"), 4);
        assert_eq!(
            entry_names(d),
            BTreeSet::from([
                "fedora-aab.qcow2".to_string(),
                "fedora-bb-aa.qcow2".to_string(),
                BUILDER_ID_FILE.to_string()
            ])
        );
        assert_eq!(delete_build(d, "fedora", "aa"), 0, "nothing left to delete");
    }

    /// A flake of `cleanup::delete_after_upload_prunes_uploaded_formats_but_keeps_keep_formats`:
    /// in directory order, an image file could go before its checksum files, which were
    /// still there when the test looked.
    #[test]
    fn a_builds_entries_come_checksums_first_and_the_manifest_last() {
        let dir = dir_with(&[
            "fedora-aa.raw",
            "fedora-aa.qcow2",
            "fedora-aa.raw.sha256",
            "fedora-aa.qcow2.md5",
            "fedora-aa.raw.md5",
        ]);
        std::fs::create_dir(manifest_dir(dir.path(), "fedora", "aa")).unwrap();
        let ranks: Vec<(u8, String)> = build_entries(dir.path(), "fedora", "aa")
            .into_iter()
            .map(|(rest, _)| (deletion_rank(&rest), rest))
            .collect();
        let mut sorted = ranks.clone();
        sorted.sort();
        assert_eq!(
            ranks.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            sorted.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            "{ranks:?}"
        );
        assert_eq!(
            sorted
                .iter()
                .map(|(_, rest)| rest.as_str())
                .collect::<Vec<_>>(),
            ["qcow2.md5", "raw.md5", "raw.sha256", "qcow2", "raw", "d"]
        );
    }

    #[test]
    fn pruning_formats_keeps_the_kept_ones_and_the_manifest() {
        let dir = dir_with(&[
            "fedora-aa.qcow2",
            "fedora-aa.qcow2.md5",
            "fedora-aa.raw",
            "fedora-aa.raw.md5",
            "fedora-aa.raw.sha256",
        ]);
        let d = dir.path();
        std::fs::create_dir(manifest_dir(d, "fedora", "aa")).unwrap();
        let keep = BTreeSet::from(["qcow2".to_string()]);
        assert_eq!(prune_formats(d, "fedora", "aa", &keep), 3);
        assert_eq!(
            entry_names(d),
            BTreeSet::from([
                "fedora-aa.d".to_string(),
                "fedora-aa.qcow2".to_string(),
                "fedora-aa.qcow2.md5".to_string()
            ])
        );
    }

    #[test]
    fn checksums_are_read_only_when_whole_and_hex() {
        let dir = tempfile::tempdir().unwrap();
        let image = image_file(dir.path(), "fedora", "aa", "qcow2");
        let md5 = "0123456789abcdef0123456789abcdef";
        std::fs::write(checksum_file(&image, Checksum::Md5), format!("{md5}  x\n")).unwrap();
        std::fs::write(checksum_file(&image, Checksum::Sha256), "abc\n").unwrap();
        assert_eq!(read_checksum(&image, Checksum::Md5), Some(md5.to_string()));
        assert_eq!(read_checksum(&image, Checksum::Sha256), None, "short");
        let other = image_file(dir.path(), "fedora", "bb", "qcow2");
        assert_eq!(read_checksum(&other, Checksum::Md5), None, "absent");
    }
}
