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
//! stdout**. A non-zero exit, a signal, or no id is a failure whose message has the exit
//! status and the last lines of stderr. A delete command should exit 0 when the image is
//! already gone.
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
//! stdin is `/dev/null`; stdout and stderr are pipes read on the calling thread with
//! `poll(2)` (only their last [`KEEP_OUTPUT`] bytes are kept); the child leads a process
//! group of its own. When the deadline passes (the request's `timeout` for uploads,
//! `image-upload-timeout` for deletions) the whole group gets SIGKILL and the child is
//! reaped, so nothing the command started outlives it. The same happens if the calling
//! thread unwinds while the command runs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{CloudImage, ErrorKind, ProviderDriver, ProviderError, UploadRequest, Uploaded};
use crate::config;

/// Bytes of stdout and of stderr kept per command (the tail).
pub const KEEP_OUTPUT: usize = 64 * 1024;
/// Most bytes read from one pipe before looking at the child and the clock again.
const MAX_READ_PER_DRAIN: usize = 1 << 20;
/// Lines of stderr quoted in an error message.
const STDERR_LINES_IN_ERRORS: usize = 5;
/// Longest single `poll(2)` wait, so that the child's exit is noticed even while a
/// grandchild keeps the pipes open.
const POLL_SLICE: Duration = Duration::from_millis(100);

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
        let stdout = String::from_utf8_lossy(&output.stdout);
        match stdout.lines().map(str::trim).rfind(|l| !l.is_empty()) {
            Some(id) => Ok(Uploaded {
                external_id: id.to_string(),
            }),
            None => Err(ProviderError::new(
                ErrorKind::Command,
                format!(
                    "provider {}: {context}: `{}` printed no image id on stdout{}",
                    self.name,
                    self.upload_command[0],
                    stderr_note(&output.stderr)
                ),
            )),
        }
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
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// More than the kept tail of stdout was printed.
    stdout_truncated: bool,
}

impl CommandDriver {
    /// Runs `template` with `values` substituted; success means exit status 0. Only the
    /// last `keep_stdout` bytes of stdout are kept.
    fn run(
        &self,
        template: &[String],
        values: &BTreeMap<&str, &str>,
        env: Vec<(String, String)>,
        timeout: Duration,
        keep_stdout: usize,
        context: &str,
    ) -> Result<Output, ProviderError> {
        let argv: Vec<String> = template.iter().map(|arg| substitute(arg, values)).collect();
        let program = &argv[0];
        let error = |kind: ErrorKind, msg: String| {
            ProviderError::new(kind, format!("provider {}: {context}: {msg}", self.name))
        };
        log::debug!("provider {}: running {argv:?}", self.name);
        let mut command = Command::new(program);
        command
            .args(&argv[1..])
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // CAUTION: between fork and exec only async-signal-safe calls. The command dies with
        // the builder (PR_SET_PDEATHSIG fires when the spawning upload thread ends, which is
        // when the process ends: the thread waits for the child), so a stopped builder never
        // leaves an upload running on that would create a cloud image nobody records. The
        // signal mask is emptied, as for DIB.
        // SAFETY: prctl, sigprocmask and getppid are async-signal-safe; nothing allocates.
        unsafe {
            command.pre_exec(|| {
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() == 1 {
                    return Err(std::io::Error::other("the builder exited"));
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| error(ErrorKind::Command, format!("cannot run `{program}`: {e}")))?;
        let mut running = Running {
            child,
            reaped: false,
        };
        let started = Instant::now();
        match running.collect(started + timeout, keep_stdout) {
            Ok((status, output)) => {
                log::debug!(
                    "provider {}: `{program}` ended ({status}) after {:.1?}",
                    self.name,
                    started.elapsed()
                );
                if status.success() {
                    Ok(output)
                } else {
                    Err(error(
                        ErrorKind::Command,
                        format!(
                            "`{program}` failed ({}){}",
                            describe_exit(status),
                            stderr_note(&output.stderr)
                        ),
                    ))
                }
            }
            Err(Collect::TimedOut(output)) => Err(error(
                ErrorKind::Timeout,
                format!(
                    "`{program}` did not finish within {timeout:?}; killed its process group{}",
                    stderr_note(&output.stderr)
                ),
            )),
            Err(Collect::Io(e)) => Err(error(ErrorKind::Io, format!("`{program}`: {e}"))),
        }
    }
}

/// A running child in its own process group. Dropping it before the child was reaped kills
/// the group and reaps the child.
struct Running {
    child: Child,
    reaped: bool,
}

enum Collect {
    TimedOut(Output),
    Io(io::Error),
}

impl Running {
    /// Reads stdout and stderr until the child exits, or kills the group at `deadline`.
    fn collect(
        &mut self,
        deadline: Instant,
        keep_stdout: usize,
    ) -> Result<(ExitStatus, Output), Collect> {
        let mut stdout = Pipe::new(
            self.child
                .stdout
                .take()
                .map(|p| File::from(OwnedFd::from(p))),
            keep_stdout,
        );
        let mut stderr = Pipe::new(
            self.child
                .stderr
                .take()
                .map(|p| File::from(OwnedFd::from(p))),
            KEEP_OUTPUT,
        );
        loop {
            if let Some(status) = self.child.try_wait().map_err(Collect::Io)? {
                self.reaped = true;
                // Whatever is still buffered in the pipes; a grandchild holding them open
                // does not keep us here.
                stdout.drain_ready();
                stderr.drain_ready();
                return Ok((status, Output::of(stdout, stderr)));
            }
            let now = Instant::now();
            if now >= deadline {
                self.kill_group();
                stdout.drain_ready();
                stderr.drain_ready();
                return Err(Collect::TimedOut(Output::of(stdout, stderr)));
            }
            let slice = (deadline - now).min(POLL_SLICE);
            wait_readable(&mut [&mut stdout, &mut stderr], slice).map_err(Collect::Io)?;
        }
    }

    fn kill_group(&mut self) {
        if self.reaped {
            return;
        }
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        // The group may already be empty; the child itself is reaped below either way.
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill_group();
    }
}

impl Output {
    fn of(stdout: Pipe, stderr: Pipe) -> Output {
        Output {
            stdout_truncated: stdout.truncated,
            stdout: stdout.data,
            stderr: stderr.data,
        }
    }
}

/// One output pipe and the tail of what came through it.
struct Pipe {
    reader: Option<File>,
    data: Vec<u8>,
    /// How many bytes of the tail are kept.
    keep: usize,
    /// Whether bytes before the kept tail were dropped.
    truncated: bool,
}

impl Pipe {
    fn new(reader: Option<File>, keep: usize) -> Pipe {
        if let Some(r) = &reader {
            set_nonblocking(r.as_raw_fd());
        }
        Pipe {
            reader,
            data: Vec::new(),
            keep,
            truncated: false,
        }
    }

    /// Drops all but the last `keep` bytes of `data` once it holds more than `limit`.
    fn trim(data: &mut Vec<u8>, truncated: &mut bool, keep: usize, limit: usize) {
        if data.len() > limit {
            data.drain(..data.len() - keep);
            *truncated = true;
        }
    }

    /// Reads what is available now; drops the reader at end of file.
    /// At most [`MAX_READ_PER_DRAIN`] bytes per call, so that a command that never stops
    /// writing cannot keep the caller from checking the deadline.
    fn drain_ready(&mut self) {
        let Some(reader) = &mut self.reader else {
            return;
        };
        let mut buf = [0u8; 16 * 1024];
        let mut read = 0;
        while read < MAX_READ_PER_DRAIN {
            match reader.read(&mut buf) {
                Ok(0) => {
                    self.reader = None;
                    return;
                }
                Ok(n) => {
                    read += n;
                    self.data.extend_from_slice(&buf[..n]);
                    Pipe::trim(
                        &mut self.data,
                        &mut self.truncated,
                        self.keep,
                        2 * self.keep,
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock: nothing more for now. Anything else: treat as closed.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.reader = None;
                    break;
                }
            }
        }
        Pipe::trim(&mut self.data, &mut self.truncated, self.keep, self.keep);
    }
}

/// Sleeps until one of the open pipes is readable (or closed) or `timeout` passes, then reads
/// what is there.
fn wait_readable(pipes: &mut [&mut Pipe], timeout: Duration) -> io::Result<()> {
    let mut fds: Vec<libc::pollfd> = pipes
        .iter()
        .filter_map(|p| p.reader.as_ref())
        .map(|r| libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    if fds.is_empty() {
        std::thread::sleep(timeout);
        return Ok(());
    }
    let millis = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd structs.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    for pipe in pipes.iter_mut() {
        pipe.drain_ready();
    }
    Ok(())
}

fn set_nonblocking(fd: std::os::fd::RawFd) {
    // SAFETY: fcntl on a file descriptor we own; failure leaves it blocking, which only
    // makes reads wait (poll said they would not).
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// The `{name}` placeholders in `arg` (names of lowercase letters and `_`).
fn placeholders(arg: &str) -> Vec<&str> {
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
fn substitute(arg: &str, values: &BTreeMap<&str, &str>) -> String {
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

fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// `; stderr: <last lines>` or nothing.
fn stderr_note(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(STDERR_LINES_IN_ERRORS)..];
    format!("; stderr: {}", tail.join(" | "))
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
    fn environment_keys() {
        assert_eq!(env_key("nodepool_build_id"), "NODEPOOL_BUILD_ID");
        assert_eq!(env_key("os.distro-name"), "OS_DISTRO_NAME");
    }
}
