//! The command driver (our addition): uploads and deletions run operator-supplied programs.
//!
//! # Contract with the commands
//!
//! `upload-command` and `delete-command` are argv templates run **without a shell**: each
//! element becomes exactly one argument after its placeholders are replaced, so file names
//! with spaces or quotes need no escaping. Placeholders:
//!
//! | placeholder | upload | delete | environment variable |
//! |---|---|---|---|
//! | `{file}` | the image file | | `NODEPOOL_FILE` |
//! | `{format}` | its format (`qcow2`, ...) | | `NODEPOOL_FORMAT` |
//! | `{image_name}` | the diskimage name | | `NODEPOOL_IMAGE_NAME` |
//! | `{build_id}` | | | `NODEPOOL_BUILD_ID` |
//! | `{upload_id}` | | | `NODEPOOL_UPLOAD_ID` |
//! | `{external_name}` | the name from `image-name-format` | | `NODEPOOL_EXTERNAL_NAME` |
//! | `{provider}` | the provider name | the provider name | `NODEPOOL_PROVIDER` |
//! | `{external_id}` | | the id to delete | `NODEPOOL_EXTERNAL_ID` |
//!
//! (`{build_id}` and `{upload_id}` are upload placeholders too.) Every image property is
//! also exported as `NODEPOOL_META_<KEY>`, the key upper-cased with every character other
//! than an ASCII letter or digit replaced by `_`. An unknown `{name}` in a template is a
//! configuration error, found when the driver is created; other braces pass through.
//!
//! The upload command prints the cloud's id for the image on its **last non-empty line of
//! stdout**, surrounding whitespace ignored. The id must be one token of printable ASCII
//! (no spaces or control characters) of at most 255 bytes ([`external_id`]): it is stored as
//! the upload's `external_id`, handed to the delete command and compared with listings, so
//! a progress line or a message printed last must not become one. A non-zero exit, a
//! signal, no id or an invalid one is a failure whose message has the exit status and the
//! last lines of stderr (and, for an invalid id, of stdout). A delete command should exit 0
//! when the image is already gone.
//!
//! The optional `list-command` (placeholder `{provider}`, variable `NODEPOOL_PROVIDER`) lets
//! the janitor find cloud images that have no upload record, such as the one a cloud
//! accepted in the instant before a builder was killed. It prints one line per image it
//! knows this provider uploaded for nodepool, `ID BUILD_ID UPLOAD_ID` (the build and upload
//! ids the upload command was given), optionally followed by a name for the logs; empty
//! lines are ignored. Any other line fails the whole listing, and a failed listing deletes
//! nothing. Without a list command the driver lists nothing and such an image stays.
//!
//! # How commands run
//!
//! Through the daemon's one subprocess runner (`crate::command`), the same as
//! diskimage-builder, so every child of the daemon has one policy: stdin is `/dev/null`;
//! the command leads a process group of its own and starts with default signal
//! dispositions and an empty signal mask; stdout and stderr are captured apart (their last
//! [`KEEP_OUTPUT`] bytes kept, [`LIST_OUTPUT_LIMIT`] of a listing's stdout). When the
//! deadline passes (the request's `timeout` for uploads, `image-upload-timeout` for
//! deletions and listings) the whole group gets SIGTERM, then SIGKILL after
//! [`COMMAND_GRACE`]; when the command exits, whatever it left running in its group is
//! killed. Nothing the command started in its group outlives it, also when the calling
//! thread unwinds while it runs.
//!
//! One difference from DIB: the command gets SIGKILL from the kernel when the builder
//! itself dies (`PR_SET_PDEATHSIG`), because an upload that runs on after its builder
//! creates a cloud image nobody records. DIB is left to finish (its exit traps unmount and
//! detach loop devices; the restarted builder removes its files). nodepool 11 has no
//! command driver.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::{CloudImage, ErrorKind, ProviderDriver, ProviderError, UploadRequest, Uploaded};
use crate::command::{self, Completed, Outcome, Output, Spec, Tail};
use crate::config;

/// Bytes of stdout and of stderr kept per command (the tail).
pub const KEEP_OUTPUT: usize = 64 * 1024;
/// How long a command's process group has between SIGTERM and SIGKILL after its deadline.
pub const COMMAND_GRACE: Duration = Duration::from_secs(5);
/// The longest image id an upload command may print, in bytes.
pub const MAX_EXTERNAL_ID_LEN: usize = 255;
/// Lines of stdout or stderr quoted in an error message.
const LINES_IN_ERRORS: usize = 5;

const UPLOAD_PLACEHOLDERS: [&str; 7] = [
    "file",
    "format",
    "image_name",
    "build_id",
    "upload_id",
    "external_name",
    "provider",
];
const DELETE_PLACEHOLDERS: [&str; 2] = ["external_id", "provider"];
const LIST_PLACEHOLDERS: [&str; 1] = ["provider"];
/// Most bytes of stdout a list command may print (about 200,000 images).
const LIST_OUTPUT_LIMIT: usize = 16 << 20;

/// A provider whose uploads and deletions are commands.
pub struct CommandDriver {
    name: String,
    image_format: String,
    upload_command: Vec<String>,
    delete_command: Vec<String>,
    list_command: Option<Vec<String>>,
    delete_timeout: Duration,
}

impl CommandDriver {
    /// Checks both templates (non-empty, known placeholders only).
    pub fn new(provider: &config::Provider) -> Result<CommandDriver, ProviderError> {
        let config::Driver::Command {
            upload_command,
            delete_command,
            list_command,
            image_format,
        } = &provider.driver
        else {
            return Err(ProviderError::new(
                ErrorKind::Config,
                format!("provider {}: not a command provider", provider.name),
            ));
        };
        let check = |key: &str, template: &[String], known: &[&str]| -> Result<(), ProviderError> {
            let error = |msg: String| {
                ProviderError::new(
                    ErrorKind::Config,
                    format!("provider {}: {key}: {msg}", provider.name),
                )
            };
            if template.first().is_none_or(|p| p.is_empty()) {
                return Err(error("the program (first element) is empty".into()));
            }
            for arg in template {
                for name in placeholders(arg) {
                    if !known.contains(&name) {
                        let known: Vec<String> = known.iter().map(|k| format!("{{{k}}}")).collect();
                        return Err(error(format!(
                            "unknown placeholder {{{name}}} (known: {})",
                            known.join(", ")
                        )));
                    }
                }
            }
            Ok(())
        };
        check("upload-command", upload_command, &UPLOAD_PLACEHOLDERS)?;
        check("delete-command", delete_command, &DELETE_PLACEHOLDERS)?;
        if let Some(list_command) = list_command {
            check("list-command", list_command, &LIST_PLACEHOLDERS)?;
        }
        Ok(CommandDriver {
            name: provider.name.clone(),
            image_format: image_format.clone(),
            upload_command: upload_command.clone(),
            delete_command: delete_command.clone(),
            list_command: list_command.clone(),
            delete_timeout: Duration::from_secs(provider.image_upload_timeout.max(1)),
        })
    }
}

impl ProviderDriver for CommandDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn image_format(&self) -> &str {
        &self.image_format
    }

    fn upload(&self, req: &UploadRequest) -> Result<Uploaded, ProviderError> {
        let file = req.file.to_string_lossy().into_owned();
        let values = BTreeMap::from([
            ("file", file.as_str()),
            ("format", req.format.as_str()),
            ("image_name", req.image_name.as_str()),
            ("build_id", req.build_id.as_str()),
            ("upload_id", req.upload_id.as_str()),
            ("external_name", req.external_name.as_str()),
            ("provider", self.name.as_str()),
        ]);
        let mut env = environment(&values);
        for (key, value) in &req.properties {
            env.push((format!("NODEPOOL_META_{}", env_key(key)), value.clone()));
        }
        let context = format!(
            "upload command for image {} ({})",
            req.external_name, req.image_name
        );
        let output = self.run(
            &self.upload_command,
            &values,
            env,
            req.timeout,
            KEEP_OUTPUT,
            &context,
        )?;
        let problem = match external_id(&output.stdout) {
            Ok(id) => {
                return Ok(Uploaded {
                    external_id: id.to_string(),
                });
            }
            Err(ExternalIdError::Missing) => "printed no image id on stdout".to_string(),
            Err(ExternalIdError::Invalid(line)) => format!(
                "printed an invalid image id {line:?} (expected one token of printable ASCII, \
                 at most {MAX_EXTERNAL_ID_LEN} bytes){}",
                output_note("stdout", &output.stdout)
            ),
        };
        Err(ProviderError::new(
            ErrorKind::Command,
            format!(
                "provider {}: {context}: `{}` {problem}{}",
                self.name,
                self.upload_command[0],
                output_note("stderr", &output.stderr)
            ),
        ))
    }

    fn delete(&self, external_id: &str) -> Result<(), ProviderError> {
        let values = BTreeMap::from([
            ("external_id", external_id),
            ("provider", self.name.as_str()),
        ]);
        let env = environment(&values);
        let context = format!("delete command for image {external_id}");
        self.run(
            &self.delete_command,
            &values,
            env,
            self.delete_timeout,
            KEEP_OUTPUT,
            &context,
        )
        .map(|_| ())
    }

    fn list_images(&self) -> Result<Vec<CloudImage>, ProviderError> {
        let Some(list_command) = &self.list_command else {
            return Ok(Vec::new());
        };
        let values = BTreeMap::from([("provider", self.name.as_str())]);
        let env = environment(&values);
        let context = "list command";
        let output = self.run(
            list_command,
            &values,
            env,
            self.delete_timeout,
            LIST_OUTPUT_LIMIT,
            context,
        )?;
        let error = |msg: String| {
            ProviderError::new(
                ErrorKind::Command,
                format!("provider {}: {context}: {msg}", self.name),
            )
        };
        if output.stdout_truncated {
            return Err(error(format!(
                "`{}` printed more than {LIST_OUTPUT_LIMIT} bytes",
                list_command[0]
            )));
        }
        parse_listing(&self.name, &output.stdout).map_err(error)
    }
}

/// Why an upload command's stdout holds no usable image id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExternalIdError {
    /// Nothing but whitespace.
    Missing,
    /// The last non-empty line, trimmed, is not one printable token of at most
    /// [`MAX_EXTERNAL_ID_LEN`] bytes; it is quoted here (invalid UTF-8 replaced).
    Invalid(String),
}

/// The image id an upload command printed: its last non-empty line of stdout, without
/// surrounding whitespace, which must be 1 to [`MAX_EXTERNAL_ID_LEN`] bytes of printable ASCII
/// other than space.
pub fn external_id(stdout: &[u8]) -> Result<&str, ExternalIdError> {
    let last = stdout
        .split(|&b| b == b'\n')
        .map(|line| line.trim_ascii())
        .rfind(|line| !line.is_empty())
        .ok_or(ExternalIdError::Missing)?;
    if last.len() <= MAX_EXTERNAL_ID_LEN && last.iter().all(|b| b.is_ascii_graphic()) {
        // Printable ASCII is UTF-8.
        Ok(std::str::from_utf8(last).expect("ASCII"))
    } else {
        Err(ExternalIdError::Invalid(
            String::from_utf8_lossy(last).into_owned(),
        ))
    }
}

/// The images a list command printed (see the module docs), tagged as this provider's.
fn parse_listing(provider: &str, stdout: &[u8]) -> Result<Vec<CloudImage>, String> {
    let text = std::str::from_utf8(stdout).map_err(|_| "the output is not UTF-8".to_string())?;
    let mut images = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        let Some(id) = fields.next() else { continue };
        let (Some(build_id), Some(upload_id)) = (fields.next(), fields.next()) else {
            return Err(format!(
                "line {}: expected `ID BUILD_ID UPLOAD_ID [NAME]`, got {line:?}",
                n + 1
            ));
        };
        if !crate::model::is_build_id(build_id) || !is_upload_id(upload_id) {
            return Err(format!(
                "line {}: {build_id:?} {upload_id:?} are not a nodepool build id (lowercase hex) and upload id (10 digits)",
                n + 1
            ));
        }
        images.push(CloudImage {
            id: id.to_string(),
            name: fields.collect::<Vec<_>>().join(" "),
            properties: BTreeMap::from([
                ("nodepool_build_id".to_string(), build_id.to_string()),
                ("nodepool_upload_id".to_string(), upload_id.to_string()),
                ("nodepool_provider_name".to_string(), provider.to_string()),
            ]),
        });
    }
    Ok(images)
}

fn is_upload_id(s: &str) -> bool {
    s.len() == 10 && s.bytes().all(|b| b.is_ascii_digit())
}

/// What a command printed.
struct CommandOutput {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// More than the kept tail of stdout was printed.
    stdout_truncated: bool,
}

impl CommandDriver {
    /// Runs `template` with `values` substituted through the daemon's runner; success means
    /// exit status 0. Only the last `keep_stdout` bytes of stdout are kept.
    fn run(
        &self,
        template: &[String],
        values: &BTreeMap<&str, &str>,
        env: Vec<(String, String)>,
        timeout: Duration,
        keep_stdout: usize,
        context: &str,
    ) -> Result<CommandOutput, ProviderError> {
        let argv: Vec<String> = template.iter().map(|arg| substitute(arg, values)).collect();
        let program = &argv[0];
        let error = |kind: ErrorKind, msg: String| {
            ProviderError::new(kind, format!("provider {}: {context}: {msg}", self.name))
        };
        log::debug!("provider {}: running {argv:?}", self.name);
        let spec = Spec {
            program: program.clone(),
            args: argv[1..].to_vec(),
            env,
            cwd: None,
            output: Output::Capture {
                stdout: keep_stdout,
                stderr: KEEP_OUTPUT,
            },
            timeout: Some(timeout),
            grace: COMMAND_GRACE,
            parent_death_signal: Some(Signal::SIGKILL),
        };
        let started = Instant::now();
        let running = command::spawn(spec)
            .map_err(|e| error(ErrorKind::Command, format!("cannot run `{program}`: {e}")))?;
        let Completed {
            outcome,
            stdout,
            stderr,
        } = running
            .wait_captured(&crossbeam_channel::never())
            .map_err(|e| error(ErrorKind::Io, format!("`{program}`: {e}")))?;
        log::debug!(
            "provider {}: `{program}` ended ({outcome}) after {:.1?}",
            self.name,
            started.elapsed()
        );
        let Tail {
            bytes: stdout,
            truncated: stdout_truncated,
        } = stdout;
        let stderr = stderr.bytes;
        match outcome {
            Outcome::Exited(0) => Ok(CommandOutput {
                stdout,
                stderr,
                stdout_truncated,
            }),
            Outcome::TimedOut => Err(error(
                ErrorKind::Timeout,
                format!(
                    "`{program}` did not finish within {timeout:?}; stopped its process group \
                     (SIGTERM, SIGKILL after {COMMAND_GRACE:?}){}",
                    output_note("stderr", &stderr)
                ),
            )),
            Outcome::Exited(_) | Outcome::Signaled(_) | Outcome::Cancelled => Err(error(
                ErrorKind::Command,
                format!(
                    "`{program}` failed ({}){}",
                    describe_end(outcome),
                    output_note("stderr", &stderr)
                ),
            )),
        }
    }
}

/// How a failed command ended, in the words this driver's messages have always used
/// ("exit status 3", like Python's subprocess; the runner itself says "exit code" for DIB).
fn describe_end(outcome: Outcome) -> String {
    match outcome {
        Outcome::Exited(code) => format!("exit status {code}"),
        other => other.to_string(),
    }
}

/// The `{name}` placeholders in `arg` (names of lowercase letters and `_`).
pub(crate) fn placeholders(arg: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) if is_placeholder_name(&after[..close]) => {
                out.push(&after[..close]);
                rest = &after[close + 1..];
            }
            _ => rest = after,
        }
    }
    out
}

fn is_placeholder_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// `arg` with every known placeholder replaced (in one pass: values are not rescanned).
pub(crate) fn substitute(arg: &str, values: &BTreeMap<&str, &str>) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}').map(|close| (close, &after[..close])) {
            Some((close, name)) if values.contains_key(name) => {
                out.push_str(values[name]);
                rest = &after[close + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `NODEPOOL_<NAME>` for every placeholder value.
fn environment(values: &BTreeMap<&str, &str>) -> Vec<(String, String)> {
    values
        .iter()
        .map(|(name, value)| (format!("NODEPOOL_{}", env_key(name)), value.to_string()))
        .collect()
}

/// Upper-cased, every character other than an ASCII letter or digit replaced by `_`.
pub fn env_key(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// `; <label>: <last lines>` or nothing.
fn output_note(label: &str, output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(LINES_IN_ERRORS)..];
    format!("; {label}: {}", tail.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_found_and_substituted() {
        assert_eq!(
            placeholders("--name={external_name}.{format}"),
            ["external_name", "format"]
        );
        assert_eq!(placeholders("{\"json\": 1} {x1} {}"), Vec::<&str>::new());
        let values = BTreeMap::from([("file", "/a b/{format}"), ("format", "raw")]);
        assert_eq!(
            substitute("{file}:{format}:{other}:{", &values),
            "/a b/{format}:raw:{other}:{"
        );
    }

    #[test]
    fn the_external_id_is_one_printable_token_on_the_last_non_empty_line() {
        assert_eq!(
            external_id(b"copying...\n  ami-0123  \r\n\n"),
            Ok("ami-0123")
        );
        assert_eq!(external_id(b"\x21~{}/:"), Ok("\x21~{}/:"));
        let longest = "x".repeat(MAX_EXTERNAL_ID_LEN);
        assert_eq!(external_id(longest.as_bytes()), Ok(longest.as_str()));
        assert_eq!(external_id(b""), Err(ExternalIdError::Missing));
        assert_eq!(external_id(b" \n\t\n"), Err(ExternalIdError::Missing));
        let invalid = |s: &str| Err(ExternalIdError::Invalid(s.to_string()));
        assert_eq!(
            external_id(b"image 42 (pending)\n"),
            invalid("image 42 (pending)")
        );
        assert_eq!(external_id(b"id\x07bell"), invalid("id\x07bell"));
        assert_eq!(external_id(b"tab\tinside"), invalid("tab\tinside"));
        assert_eq!(external_id("caf\u{e9}".as_bytes()), invalid("caf\u{e9}"));
        assert_eq!(external_id(b"bad\xffutf8"), invalid("bad\u{fffd}utf8"));
        let too_long = "x".repeat(MAX_EXTERNAL_ID_LEN + 1);
        assert_eq!(external_id(too_long.as_bytes()), invalid(&too_long));
    }

    #[test]
    fn environment_keys() {
        assert_eq!(env_key("nodepool_build_id"), "NODEPOOL_BUILD_ID");
        assert_eq!(env_key("os.distro-name"), "OS_DISTRO_NAME");
    }
}
