//! The image gate: every file a build wrote is checked before the build may be recorded
//! `ready`, so that a truncated or mislabelled image never reaches the launcher.
//!
//! # Why
//!
//! The most expensive failure of an image pipeline is a broken image that is published: the
//! launcher boots thousands of nodes from it, they all fail, and someone deletes it by hand.
//! nodepool 11 records a build `ready` as soon as diskimage-builder exits 0 and every format's
//! file exists; it never looks inside the files. This gate is our addition (a deliberate
//! difference from nodepool 11; `image-gate = false` turns it off).
//!
//! # What is checked
//!
//! For every format of the build, in the order of the build's formats:
//!
//! 1. `qemu-img info --output=json <file>`, with the format probed, not given: the probed
//!    format must be the one the DIB format name stands for ([`qemu_format`]: `qcow2`,
//!    `raw`, `vhd` → `vpc`, `vhdx`, `vmdk`, `vdi`, `qed`). Raw bytes in a `.qcow2` file are
//!    probed as `raw` and fail ([`GateFailure::WrongFormat`]). The virtual size must be
//!    greater than 0 and a whole number of 512-byte sectors ([`GateFailure::BadVirtualSize`]):
//!    the file size of a container format says nothing reliable about its disk (qcow2 is
//!    sparse, vmdk streamOptimized compressed), so the gate does not compare them; truncation
//!    is `qemu-img check`'s business. An image with a backing file refers to a file on this
//!    host that no cloud has, and fails too ([`GateFailure::BackingFile`]).
//! 2. `qemu-img check --output=json <file>` for the formats whose driver implements a check
//!    (`qcow2`, `qed`, `vdi`, `vhdx`, `vmdk`; [`supports_check`]); `raw` and `vpc` get the
//!    info step only. Exit 2 (corruptions: a truncated qcow2 has clusters past the end of
//!    the file) or 1 (the check could not complete) fail the build ([`GateFailure::Corrupt`]);
//!    exit 3 (leaked clusters: space lost, data intact) passes with an INFO line; 63 (no
//!    check for this format) passes.
//!
//! Formats `qemu-img` cannot read (`tar`, `tgz`, `squashfs`, `docker`, `aci`, ...) are
//! skipped with a DEBUG line: there is nothing to probe, and their consumers check them.
//!
//! 3. Then, if the diskimage sets `validate-command`, that argv template runs once per
//!    checked format with `{file}`, `{format}` (the DIB format name), `{image_name}` and
//!    `{build_id}` replaced, under `validate-timeout` seconds (default 600). Exit 0 passes;
//!    any other end fails the build with the command's (bounded) output
//!    ([`GateFailure::ValidateExited`], [`GateFailure::ValidateTimedOut`]); a timeout stops
//!    its whole process group. Typical uses: boot the image in qemu and wait for a marker on
//!    the serial console, or `virt-customize --dry-run`.
//!
//! Every command runs through `command` (the one process runner: own process group,
//! timeout, output captured and bounded), and a stop of the daemon cancels it
//! ([`GateFailure::Cancelled`], treated like a DIB run stopped by shutdown).
//!
//! # What a failure does
//!
//! `build` turns a [`GateFailure`] into a `failed` build record, exactly as a failed DIB run:
//! an ERROR line `image=<name> build=<id>: image gate failed: <reason>` with the tool's output
//! (also appended to the build log), the build's local files removed at once, no upload, the
//! statsd `rc` gauge 1, and the scheduler's back-off for failed builds.
//!
//! The decisions (format names, JSON verdicts, placeholder expansion) are pure functions,
//! unit-tested below; [`check_build`] is the part that runs processes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::Receiver;
use log::{debug, info};

use crate::command::{self, Outcome, Output, Spec};
use crate::local;

/// The placeholders of `validate-command`.
pub const VALIDATE_PLACEHOLDERS: [&str; 4] = ["file", "format", "image_name", "build_id"];

/// How long one `qemu-img info` or `check` may take (a check reads every table of the
/// image; about a second per GiB on a busy disk, so this is generous).
pub const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(1800);

/// Output kept of a gate command, per stream, for the log.
pub const OUTPUT_LIMIT: usize = 8 * 1024;

/// The `qemu-img` format name of a DIB output format; `None` for formats `qemu-img` cannot
/// read (archives, container images).
pub fn qemu_format(dib_format: &str) -> Option<&'static str> {
    Some(match dib_format {
        "qcow2" => "qcow2",
        "raw" => "raw",
        "vhd" => "vpc",
        "vhdx" => "vhdx",
        "vmdk" => "vmdk",
        "vdi" => "vdi",
        "qed" => "qed",
        _ => return None,
    })
}

/// Whether `qemu-img check` can check this `qemu-img` format.
pub fn supports_check(qemu_format: &str) -> bool {
    matches!(qemu_format, "qcow2" | "qed" | "vdi" | "vhdx" | "vmdk")
}

/// What the gate needs to know about one build.
#[derive(Debug, Clone)]
pub struct GateSpec<'a> {
    pub image: &'a str,
    pub build_id: &'a str,
    /// `(DIB format, file)` for every format of the build.
    pub files: Vec<(String, PathBuf)>,
    /// Whether the `qemu-img` checks run.
    pub qemu_img: bool,
    /// The `validate-command` template, if any.
    pub validate_command: Option<&'a [String]>,
    pub validate_timeout: Duration,
}

/// Why the gate refused a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateFailure {
    /// `qemu-img` could not be run (not installed, not executable).
    QemuImgMissing(String),
    /// `qemu-img info` could not open or parse the file.
    Unreadable { file: String, output: String },
    /// The file is not the format its name says.
    WrongFormat {
        file: String,
        expected: String,
        found: String,
    },
    /// The disk the image describes is empty or not a whole number of sectors.
    BadVirtualSize { file: String, virtual_size: u64 },
    /// The image refers to a backing file.
    BackingFile { file: String, backing: String },
    /// `qemu-img check` found corruptions (or could not complete).
    Corrupt { file: String, output: String },
    /// `validate-command` did not exit 0.
    ValidateExited {
        file: String,
        outcome: String,
        output: String,
    },
    /// `validate-command` ran past `validate-timeout`; its process group was stopped.
    ValidateTimedOut {
        file: String,
        timeout: u64,
        output: String,
    },
    /// `validate-command` could not be started.
    ValidateSpawnFailed(String),
    /// The daemon is stopping; the running check was stopped.
    Cancelled,
}

impl fmt::Display for GateFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GateFailure::QemuImgMissing(e) => write!(
                f,
                "cannot run qemu-img: {e} (install qemu-utils, or set image-gate = false)"
            ),
            GateFailure::Unreadable { file, output } => {
                write!(f, "qemu-img info cannot read {file}{}", block(output))
            }
            GateFailure::WrongFormat {
                file,
                expected,
                found,
            } => write!(f, "{file} is {found}, expected {expected}"),
            GateFailure::BadVirtualSize { file, virtual_size } => write!(
                f,
                "{file} has virtual size {virtual_size} bytes (must be > 0 and a multiple of 512)"
            ),
            GateFailure::BackingFile { file, backing } => {
                write!(f, "{file} has a backing file ({backing})")
            }
            GateFailure::Corrupt { file, output } => {
                write!(f, "qemu-img check found {file} corrupt{}", block(output))
            }
            GateFailure::ValidateExited {
                file,
                outcome,
                output,
            } => write!(
                f,
                "validate-command failed on {file} ({outcome}){}",
                block(output)
            ),
            GateFailure::ValidateTimedOut {
                file,
                timeout,
                output,
            } => write!(
                f,
                "validate-command on {file} timed out after {timeout}s{}",
                block(output)
            ),
            GateFailure::ValidateSpawnFailed(e) => write!(f, "validate-command: {e}"),
            GateFailure::Cancelled => f.write_str("stopped by shutdown"),
        }
    }
}

/// Output shown after a reason, on its own lines.
fn block(output: &str) -> String {
    let output = output.trim_end();
    if output.is_empty() {
        String::new()
    } else {
        format!(":\n{output}")
    }
}

/// Judges `qemu-img info --output=json` of `file`, expected in `expected` (a qemu-img
/// format name).
pub fn judge_info(file: &str, expected: &str, json: &str) -> Result<(), GateFailure> {
    let unreadable = |why: &str| GateFailure::Unreadable {
        file: file.to_string(),
        output: format!("{why}: {}", json.trim()),
    };
    let info: serde_json::Value =
        serde_json::from_str(json).map_err(|e| unreadable(&format!("not JSON ({e})")))?;
    let found = info
        .get("format")
        .and_then(|v| v.as_str())
        .ok_or_else(|| unreadable("no format"))?;
    if found != expected {
        return Err(GateFailure::WrongFormat {
            file: file.to_string(),
            expected: expected.to_string(),
            found: found.to_string(),
        });
    }
    if let Some(backing) = info.get("backing-filename").and_then(|v| v.as_str()) {
        return Err(GateFailure::BackingFile {
            file: file.to_string(),
            backing: backing.to_string(),
        });
    }
    let virtual_size = info
        .get("virtual-size")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| unreadable("no virtual-size"))?;
    if virtual_size == 0 || virtual_size % 512 != 0 {
        return Err(GateFailure::BadVirtualSize {
            file: file.to_string(),
            virtual_size,
        });
    }
    Ok(())
}

/// What `qemu-img check` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckVerdict {
    Clean,
    /// Leaked clusters: space wasted, data intact.
    Leaks,
    /// The format has no check.
    Unsupported,
    /// Corruptions, or the check could not complete.
    Corrupt,
}

/// Reads `qemu-img check`'s exit status (0 clean, 1 not completed, 2 corrupt, 3 leaks, 63
/// no check for this format).
pub fn judge_check(exit: i32) -> CheckVerdict {
    match exit {
        0 => CheckVerdict::Clean,
        3 => CheckVerdict::Leaks,
        63 => CheckVerdict::Unsupported,
        _ => CheckVerdict::Corrupt,
    }
}

/// The `validate-command` argv for one file (each element stays one argument; values are
/// not rescanned for placeholders).
pub fn validate_argv(
    template: &[String],
    file: &str,
    format: &str,
    image_name: &str,
    build_id: &str,
) -> Vec<String> {
    let values: std::collections::BTreeMap<&str, &str> = [
        ("file", file),
        ("format", format),
        ("image_name", image_name),
        ("build_id", build_id),
    ]
    .into_iter()
    .collect();
    template
        .iter()
        .map(|arg| crate::provider::command::substitute(arg, &values))
        .collect()
}

/// The placeholders of a `validate-command` template that the gate does not know.
pub fn unknown_placeholders(template: &[String]) -> Vec<String> {
    template
        .iter()
        .flat_map(|arg| crate::provider::command::placeholders(arg))
        .filter(|name| !VALIDATE_PLACEHOLDERS.contains(name))
        .map(String::from)
        .collect()
}

/// Runs the gate over every file of a build (see the module docs). `cancel` is the build's
/// stop channel. Returns the first failure.
pub fn check_build(spec: &GateSpec<'_>, cancel: &Receiver<()>) -> Result<(), GateFailure> {
    for (format, path) in &spec.files {
        let file = path.display().to_string();
        let Some(qemu) = qemu_format(format) else {
            debug!(
                "image={} build={}: image gate: qemu-img cannot read format {format}; not checking {file}",
                spec.image, spec.build_id
            );
            continue;
        };
        if spec.qemu_img {
            check_file(spec, &file, qemu, cancel)?;
        }
        if let Some(template) = spec.validate_command {
            validate(spec, template, &file, format, cancel)?;
        }
    }
    Ok(())
}

fn check_file(
    spec: &GateSpec<'_>,
    file: &str,
    qemu: &str,
    cancel: &Receiver<()>,
) -> Result<(), GateFailure> {
    let info = qemu_img(&["info", "--output=json", file], cancel)?;
    match info.outcome {
        Outcome::Exited(0) => judge_info(file, qemu, &info.stdout)?,
        _ => {
            return Err(GateFailure::Unreadable {
                file: file.to_string(),
                output: info.text(),
            });
        }
    }
    if !supports_check(qemu) {
        return Ok(());
    }
    let check = qemu_img(&["check", "--output=json", "-f", qemu, file], cancel)?;
    let exit = match check.outcome {
        Outcome::Exited(code) => code,
        _ => 1,
    };
    match judge_check(exit) {
        CheckVerdict::Clean | CheckVerdict::Unsupported => Ok(()),
        CheckVerdict::Leaks => {
            info!(
                "image={} build={}: image gate: {file} has leaked clusters (harmless)",
                spec.image, spec.build_id
            );
            Ok(())
        }
        CheckVerdict::Corrupt => Err(GateFailure::Corrupt {
            file: file.to_string(),
            output: check.text(),
        }),
    }
}

fn validate(
    spec: &GateSpec<'_>,
    template: &[String],
    file: &str,
    format: &str,
    cancel: &Receiver<()>,
) -> Result<(), GateFailure> {
    let argv = validate_argv(template, file, format, spec.image, spec.build_id);
    let Some((program, args)) = argv.split_first() else {
        return Err(GateFailure::ValidateSpawnFailed("empty command".into()));
    };
    let mut cmd = Spec::new(program.clone(), args.to_vec());
    cmd.output = Output::Capture {
        stdout: OUTPUT_LIMIT,
        stderr: OUTPUT_LIMIT,
    };
    cmd.timeout = Some(spec.validate_timeout);
    info!(
        "image={} build={}: image gate: running {}",
        spec.image,
        spec.build_id,
        cmd.command_line()
    );
    let run = run(cmd, cancel).map_err(GateFailure::ValidateSpawnFailed)?;
    match run.outcome {
        Outcome::Exited(0) => Ok(()),
        Outcome::TimedOut => Err(GateFailure::ValidateTimedOut {
            file: file.to_string(),
            timeout: spec.validate_timeout.as_secs(),
            output: run.text(),
        }),
        Outcome::Cancelled => Err(GateFailure::Cancelled),
        other => Err(GateFailure::ValidateExited {
            file: file.to_string(),
            outcome: other.to_string(),
            output: run.text(),
        }),
    }
}

/// A finished gate command.
struct Ran {
    outcome: Outcome,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// Both streams for the log, stderr first (where tools explain themselves).
    fn text(&self) -> String {
        let mut out = self.stderr.trim_end().to_string();
        if !self.stdout.trim().is_empty() {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(self.stdout.trim_end());
        }
        out
    }
}

fn qemu_img(args: &[&str], cancel: &Receiver<()>) -> Result<Ran, GateFailure> {
    let mut cmd = Spec::new("qemu-img", args.iter().map(|a| a.to_string()).collect());
    cmd.output = Output::Capture {
        stdout: 4 * OUTPUT_LIMIT,
        stderr: OUTPUT_LIMIT,
    };
    cmd.timeout = Some(QEMU_IMG_TIMEOUT);
    let ran = run(cmd, cancel).map_err(GateFailure::QemuImgMissing)?;
    if ran.outcome == Outcome::Cancelled {
        return Err(GateFailure::Cancelled);
    }
    Ok(ran)
}

fn run(cmd: Spec, cancel: &Receiver<()>) -> Result<Ran, String> {
    let running = command::spawn(cmd).map_err(|e| e.to_string())?;
    let done = running
        .wait_captured(cancel)
        .map_err(|e| format!("waiting: {e}"))?;
    let text = |t: &command::Tail| {
        let s = String::from_utf8_lossy(&t.bytes).into_owned();
        if t.truncated {
            format!("[...]\n{s}")
        } else {
            s
        }
    };
    Ok(Ran {
        outcome: done.outcome,
        stdout: text(&done.stdout),
        stderr: text(&done.stderr),
    })
}

/// The files of a build: `<images_dir>/<image>-<id>.<format>` for every format.
pub fn build_files(
    images_dir: &Path,
    image: &str,
    build_id: &str,
    formats: &[String],
) -> Vec<(String, PathBuf)> {
    formats
        .iter()
        .map(|f| (f.clone(), local::image_file(images_dir, image, build_id, f)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const QCOW2_INFO: &str = r#"{"virtual-size": 1048576, "filename": "a.qcow2",
        "cluster-size": 65536, "format": "qcow2", "actual-size": 503808}"#;

    #[test]
    fn dib_formats_map_to_qemu_img_formats_and_archives_are_skipped() {
        assert_eq!(qemu_format("qcow2"), Some("qcow2"));
        assert_eq!(qemu_format("vhd"), Some("vpc"));
        assert_eq!(qemu_format("raw"), Some("raw"));
        for skipped in ["tar", "tgz", "squashfs", "docker", "aci"] {
            assert_eq!(qemu_format(skipped), None, "{skipped}");
        }
        assert!(supports_check("qcow2") && supports_check("vmdk"));
        assert!(!supports_check("raw") && !supports_check("vpc"));
    }

    #[test]
    fn info_passes_a_good_qcow2_and_names_a_wrong_format() {
        assert_eq!(judge_info("a.qcow2", "qcow2", QCOW2_INFO), Ok(()));
        let raw = QCOW2_INFO.replace("\"qcow2\"", "\"raw\"");
        let err = judge_info("a.qcow2", "qcow2", &raw).unwrap_err();
        assert_eq!(err.to_string(), "a.qcow2 is raw, expected qcow2");
    }

    #[test]
    fn info_refuses_an_empty_or_odd_virtual_size_a_backing_file_and_garbage() {
        for size in ["0", "1000"] {
            let json = QCOW2_INFO.replace("1048576", size);
            assert!(
                matches!(
                    judge_info("a", "qcow2", &json),
                    Err(GateFailure::BadVirtualSize { .. })
                ),
                "{size}"
            );
        }
        let backed = QCOW2_INFO.replace("\"filename\"", "\"backing-filename\": \"/b\", \"x\"");
        assert!(matches!(
            judge_info("a", "qcow2", &backed),
            Err(GateFailure::BackingFile { .. })
        ));
        assert!(matches!(
            judge_info("a", "qcow2", "qemu-img: oops"),
            Err(GateFailure::Unreadable { .. })
        ));
    }

    #[test]
    fn check_exit_codes_pass_leaks_and_fail_corruption() {
        assert_eq!(judge_check(0), CheckVerdict::Clean);
        assert_eq!(judge_check(3), CheckVerdict::Leaks);
        assert_eq!(judge_check(63), CheckVerdict::Unsupported);
        assert_eq!(judge_check(2), CheckVerdict::Corrupt);
        assert_eq!(judge_check(1), CheckVerdict::Corrupt);
    }

    #[test]
    fn validate_placeholders_expand_once_and_unknown_ones_are_named() {
        let t: Vec<String> = [
            "check",
            "--file={file}",
            "{format}",
            "{image_name}-{build_id}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            validate_argv(&t, "/i/{format}.qcow2", "qcow2", "fedora", "abc"),
            ["check", "--file=/i/{format}.qcow2", "qcow2", "fedora-abc"]
        );
        assert!(unknown_placeholders(&t).is_empty());
        let bad = vec!["x".to_string(), "{provider}".to_string()];
        assert_eq!(unknown_placeholders(&bad), ["provider"]);
    }

    #[test]
    fn a_failure_reads_with_its_output_on_following_lines() {
        let f = GateFailure::ValidateExited {
            file: "f.qcow2".into(),
            outcome: "exit code 1".into(),
            output: "no marker\n".into(),
        };
        assert_eq!(
            f.to_string(),
            "validate-command failed on f.qcow2 (exit code 1):\nno marker"
        );
    }
}
