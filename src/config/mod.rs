//! The builder's configuration: our TOML file, or nodepool's own nodepool.yaml.
//!
//! # Format
//!
//! The main file (`-c`) uses nodepool.yaml's key names, kebab-case, with nodepool's defaults (wire
//! spec §4); `etc/nodepool-builder.toml` lists every key with its default. A few keys are our
//! additions: `images-dir-required-free` (from the unmerged upstream proposal, GiB, also per
//! diskimage), `image-gate` (also per diskimage), the diskimage's `validate-command` and
//! `validate-timeout` (see `gate`), `zookeeper-auth`, `cleanup-interval`, `resync-interval`,
//! `progress-interval`, `retry-backoff-initial`, `retry-backoff-max`, `builder-webapp` (the HTTP
//! endpoint: `listen-address`, `port`; nodepool.yaml's `webapp` is the launcher's, whose port the
//! builder must not take on a host running both), the provider driver `command` and the openstack
//! provider's `image-format`.
//!
//! The same keys may be written as YAML, so that a site's existing nodepool.yaml (and its
//! secure file) can be given to `-c` (and `-s`) unchanged. A file is YAML when its name
//! ends in `.yaml` or `.yml`, TOML when it ends in `.toml`, and otherwise (nodepool's
//! secure file is often `secure.conf`) its first line that is neither blank nor a comment
//! decides: `---`, `%YAML` or `key:` means YAML, anything else TOML. In YAML:
//!
//! * keys only the launcher reads are accepted and ignored: at the top level `labels`,
//!   `webapp`, `max-hold-age`, `tenant-resource-limits`; in a provider `pools`,
//!   `cloud-images`, `max-concurrency`, `priority`, `boot-timeout`, `launch-timeout`,
//!   `launch-retries`, `nodepool-id`, `clean-floating-ips`, `port-cleanup-interval`,
//!   `hostname-format`; in a provider's diskimage `config-drive`, `connection-type`,
//!   `connection-port`. Any other key the builder does not know is an error, as in TOML;
//! * a provider's driver decides what happens to it (`raw::classify_driver`): `openstack`
//!   (the default) and `command` are read; drivers without image uploads in nodepool 11
//!   (`static`, `kubernetes`, `openshift`, `openshiftpods`, `metastatic`, `gce`, ...) are
//!   ignored with all their keys; drivers that upload images we cannot (`aws`, `azure`,
//!   `ibmvpc`, `fake`) are an error naming the provider, unless `--leave-provider` names it;
//! * a key set to null (`key:` with nothing after it) counts as absent, as for upstream;
//! * our additions are accepted too; nodepool's `config-validate` would reject them;
//! * `zookeeper-timeout` may be an integer (upstream's validator insists on a float);
//! * deliberately unlike nodepool, a provider whose name starts with `fake` is not switched
//!   to nodepool's test driver, and a mapping key written twice is an error (PyYAML keeps
//!   the last) in the mappings the builder reads.
//!
//! `--leave-provider NAME` (any format) leaves a provider to another builder: it is not
//! read, not uploaded to and not cleaned up (upstream's disjoint builders, wire spec §3.9).
//! The names found are in [`Config::left_providers`].
//!
//! Our TOML file is ours alone, so its unknown keys, including every launcher key, are
//! errors: an operator's typo fails loudly.
//!
//! Relative paths (`images-dir`, `elements-dir`, `build-log-dir`, the `zookeeper-tls` files,
//! `post-upload-hook`) are resolved against the directory of the file they are written in,
//! made absolute when the file is loaded, so a daemon that later changes directory still
//! finds them.
//!
//! Before parsing, every `%(NAME)` whose `NAME` starts with `NODEPOOL_` is replaced by that
//! environment variable's value, as upstream does; see `source` for how positions in error
//! messages stay right.
//!
//! The optional secure file (`-s`) may set `zookeeper-servers` (replacing the main file's
//! list), `zookeeper-tls`, `zookeeper-auth`, and `diskimages` entries holding only `name`
//! and `env-vars`, which are merged over the named diskimage's `env-vars`. It holds
//! credentials, so its error messages never echo its lines or values.
//!
//! # Errors
//!
//! A bad configuration must never start a half-configured daemon, and an operator should
//! not have to fix it one error per attempt. [`load`] therefore reports every problem at
//! once, each as `file:line:col: message` pointing at the offending key or value, or at the
//! header of a table that lacks a required key (in YAML: the key holding the mapping, or
//! the first key of a list entry).
//!
//! # Layers
//!
//! * `source`: `%(NODEPOOL_*)` substitution and byte offset to `line:col`.
//! * `doc`: the positioned document tree both formats become; TOML's spanned document
//!   (`toml::de::DeTable`) is converted there, YAML is built by `yaml` from libyaml's events.
//!   One tree means one set of checks: nothing below knows which format it reads, except
//!   for the launcher keys and drivers above and the words of messages.
//! * `raw`: walks the tree into raw structs, checking types, ranges, required and unknown
//!   keys.
//! * `validate`: duplicate names, parents and abstract diskimages, provider references, the
//!   secure file; builds [`Config`].

mod doc;
mod raw;
mod source;
mod validate;
mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use doc::Format;
use source::{FileId, Source};

/// nodepool's defaults, and ours for the keys we added.
pub mod defaults {
    /// `build-log-dir`.
    pub const BUILD_LOG_DIR: &str = "/var/log/nodepool/builds";
    /// `build-log-retention`: logs kept per image.
    pub const BUILD_LOG_RETENTION: i64 = 7;
    /// `zookeeper-timeout`, seconds.
    pub const ZOOKEEPER_TIMEOUT: f64 = 10.0;
    /// `images-dir-required-free`, GiB; 0 turns the check off.
    pub const IMAGES_DIR_REQUIRED_FREE: u64 = 0;
    /// `port` of a `[[zookeeper-servers]]` entry (nodepool's code; its docs say 2181).
    pub const ZOOKEEPER_PORT: u16 = 2281;
    /// `scheme` of `[zookeeper-auth]`.
    pub const ZOOKEEPER_AUTH_SCHEME: &str = "digest";
    /// `cleanup-interval`, seconds (upstream's fixed janitor interval).
    pub const CLEANUP_INTERVAL: f64 = 60.0;
    /// `resync-interval`, seconds.
    pub const RESYNC_INTERVAL: f64 = 300.0;
    /// `progress-interval`, seconds.
    pub const PROGRESS_INTERVAL: f64 = 30.0;
    /// `retry-backoff-initial`, seconds.
    pub const RETRY_BACKOFF_INITIAL: f64 = 5.0;
    /// `retry-backoff-max`, seconds.
    pub const RETRY_BACKOFF_MAX: f64 = 600.0;
    /// `dib-cmd` of a diskimage.
    pub const DIB_CMD: &str = "disk-image-create";
    /// `rebuild-age` of a diskimage, seconds.
    pub const REBUILD_AGE: u64 = 86400;
    /// `build-timeout` of a diskimage, seconds.
    pub const BUILD_TIMEOUT: u64 = 28800;
    /// `username` of a diskimage.
    pub const USERNAME: &str = "zuul";
    /// `python-path` of a diskimage.
    pub const PYTHON_PATH: &str = "auto";
    /// `rate` of a provider, seconds between API calls.
    pub const RATE: f64 = 1.0;
    /// `image-name-format` of a provider.
    pub const IMAGE_NAME_FORMAT: &str = "{image_name}-{timestamp}";
    /// `image-upload-timeout` of a provider, seconds.
    pub const IMAGE_UPLOAD_TIMEOUT: u64 = 3600;
    /// `image-gate` (top level and per diskimage): the `qemu-img` checks run.
    pub const IMAGE_GATE: bool = true;
    /// `validate-timeout` of a diskimage, seconds.
    pub const VALIDATE_TIMEOUT: u64 = 600;
    /// `image-format` of a command provider.
    pub const COMMAND_IMAGE_FORMAT: &str = "qcow2";
    /// `image-format` of an aws provider (nodepool 11's).
    pub const AWS_IMAGE_FORMAT: &str = "raw";
    /// The formats an aws provider's `image-format` may name (nodepool 11's schema).
    pub const AWS_IMAGE_FORMATS: [&str; 5] = ["ova", "vhd", "vhdx", "vmdk", "raw"];
    /// `rate` of an aws provider: API calls per second (nodepool 11's aws meaning and default).
    pub const AWS_RATE_PER_SECOND: f64 = 2.0;
    /// `architecture` of an aws provider's diskimage.
    pub const AWS_ARCHITECTURE: &str = "x86_64";
    /// `volume-type` of an aws provider's diskimage.
    pub const AWS_VOLUME_TYPE: &str = "gp3";
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where builds are written; required.
    pub images_dir: PathBuf,
    /// Exported to DIB as `ELEMENTS_PATH`.
    pub elements_dir: Option<PathBuf>,
    /// Per-build logs.
    pub build_log_dir: PathBuf,
    /// Build logs kept per image; -1 keeps all.
    pub build_log_retention: i64,
    /// ZooKeeper session timeout, seconds.
    pub zookeeper_timeout: f64,
    /// GiB that must be free in `images_dir` before a build starts; 0 turns the check off.
    pub images_dir_required_free: u64,
    /// `image-gate`: whether built files are checked with `qemu-img` before `ready`
    /// (a diskimage's own `image-gate` overrides it).
    pub image_gate: bool,
    /// The servers to connect to; there is at least one.
    pub zookeeper_servers: Vec<ZkServer>,
    pub zookeeper_tls: Option<ZkTls>,
    pub zookeeper_auth: Option<ZkAuth>,
    /// Seconds between janitor passes; 0 disables cleanup.
    pub cleanup_interval: f64,
    /// Seconds between slow safety rescans of everything.
    pub resync_interval: f64,
    /// Seconds between progress lines of running builds and uploads; 0 turns them off.
    pub progress_interval: f64,
    /// First retry delay after a failure, seconds.
    pub retry_backoff_initial: f64,
    /// Longest retry delay, seconds.
    pub retry_backoff_max: f64,
    /// Where the HTTP endpoint (`webapp`) listens; `None` (the default): no endpoint.
    pub builder_webapp: Option<std::net::SocketAddr>,
    /// Non-abstract diskimages with their parents merged, in file order.
    pub diskimages: Vec<DiskImage>,
    /// Providers in file order.
    pub providers: Vec<Provider>,
    /// Providers of the file that `--leave-provider` leaves to another builder, in file
    /// order; this builder neither uploads to them nor cleans them up.
    pub left_providers: Vec<String>,
}

/// One `[[zookeeper-servers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZkServer {
    pub host: String,
    pub port: u16,
    /// The chroot starts with '/', never ends with '/' and is the same for every server.
    pub chroot: Option<String>,
}

/// `[zookeeper-tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZkTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// Host name verification is off by default, like kazoo's.
    pub verify_hostname: bool,
}

/// `[zookeeper-auth]`: ZooKeeper authentication (our addition).
#[derive(Clone, PartialEq, Eq)]
pub struct ZkAuth {
    pub scheme: String,
    /// `user:password` for the digest scheme.
    pub credentials: String,
}

impl fmt::Debug for ZkAuth {
    /// Keeps the credentials out of logs and panic messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkAuth")
            .field("scheme", &self.scheme)
            .field("credentials", &"<redacted>")
            .finish()
    }
}

/// One diskimage, parents merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskImage {
    pub name: String,
    pub dib_cmd: String,
    pub elements: Vec<String>,
    pub env_vars: BTreeMap<String, String>,
    pub formats: Vec<String>,
    pub delete_after_upload: bool,
    pub keep_formats: Vec<String>,
    pub pause: bool,
    /// The image is rebuilt when its newest build is older than this many seconds.
    pub rebuild_age: u64,
    /// A build running longer than this many seconds is killed.
    pub build_timeout: u64,
    /// Exported as `DIB_RELEASE`; an integer in the file is stringified.
    pub release: String,
    pub username: String,
    pub python_path: String,
    pub shell_type: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Overrides the top-level `images_dir_required_free`, GiB.
    pub images_dir_required_free: Option<u64>,
    /// Overrides the top-level `image_gate`.
    pub image_gate: Option<bool>,
    /// `validate-command`: an argv template run on every built file before `ready`.
    pub validate_command: Option<Vec<String>>,
    /// `validate-timeout`, seconds.
    pub validate_timeout: u64,
}

/// One `[[providers]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    pub name: String,
    pub driver: Driver,
    /// Seconds between API calls; 0 means no limit.
    pub rate: f64,
    pub image_name_format: String,
    /// An upload taking longer than this many seconds fails.
    pub image_upload_timeout: u64,
    pub post_upload_hook: Option<PathBuf>,
    pub diskimages: Vec<ProviderDiskImage>,
}

/// A provider's driver and the keys only that driver has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Driver {
    OpenStack {
        /// The `clouds.yaml` entry.
        cloud: String,
        region_name: Option<String>,
        /// The provider's `image-format`; `None` means the cloud's `image_format` from
        /// `clouds.yaml`, else qcow2 (resolved by the provider).
        image_format: Option<String>,
    },
    Command {
        /// The argv template of the upload command.
        upload_command: Vec<String>,
        /// The argv template of the delete command.
        delete_command: Vec<String>,
        /// The argv template of the optional list command (leak detection).
        list_command: Option<Vec<String>>,
        image_format: String,
    },
    /// Amazon EC2 (nodepool 11's `aws` driver, its image-upload keys).
    Aws {
        region_name: String,
        /// The shared config/credentials profile; `None` means `AWS_PROFILE`, else `default`.
        profile_name: Option<String>,
        /// `object-storage.bucket-name`: where `snapshot` and `image` imports stage the file.
        bucket_name: Option<String>,
        /// `raw` unless set: `ova`, `vhd`, `vhdx`, `vmdk` or `raw`.
        image_format: String,
    },
}

/// How an aws provider turns the image file into an AMI (`import-method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwsImportMethod {
    /// Through S3 and `ImportSnapshot`, then `RegisterImage` (nodepool's default).
    Snapshot,
    /// Through S3 and `ImportImage`.
    Image,
    /// The EBS direct API: snapshot blocks written straight from the file, no S3.
    EbsDirect,
}

impl AwsImportMethod {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AwsImportMethod::Snapshot => "snapshot",
            AwsImportMethod::Image => "image",
            AwsImportMethod::EbsDirect => "ebs-direct",
        }
    }
}

/// The keys of an aws provider's diskimage entry (nodepool 11's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsImage {
    pub import_method: AwsImportMethod,
    /// `architecture`, `x86_64` unless set.
    pub architecture: String,
    /// `ena-support`, true unless set.
    pub ena_support: bool,
    /// `volume-size` in GiB; `None` means the file's size rounded up to whole GiB.
    pub volume_size: Option<u64>,
    /// `volume-type`, `gp3` unless set.
    pub volume_type: String,
    pub iops: Option<u64>,
    pub throughput: Option<u64>,
    /// `imds-support: v2.0`: instances from this AMI require IMDSv2.
    pub imds_v2: bool,
}

/// One `[[providers.diskimages]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderDiskImage {
    pub name: String,
    /// Pauses uploads of this image to this provider.
    pub pause: bool,
    /// These image properties are set on upload (an aws provider's `tags`).
    pub meta: BTreeMap<String, String>,
    /// The aws driver's per-image keys; `Some` exactly for an aws provider's diskimages.
    pub aws: Option<AwsImage>,
}

impl Config {
    /// The (non-abstract) diskimage called `name`.
    pub fn diskimage(&self, name: &str) -> Option<&DiskImage> {
        self.diskimages.iter().find(|d| d.name == name)
    }

    /// The provider called `name`.
    pub fn provider(&self, name: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.name == name)
    }
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem concerns the whole file (it cannot be read).
    pub line: usize,
    /// 1-based, in characters; 0 together with `line`.
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.col,
                self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found while loading, in file and position order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// What the command line adds to the files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// `--leave-provider`: providers this builder leaves to another builder.
    pub leave_providers: Vec<String>,
}

/// Reads and validates the main file and, if given, the secure file.
pub fn load(path: &Path, secure: Option<&Path>) -> Result<Config, ConfigErrors> {
    load_with(path, secure, &LoadOptions::default())
}

/// [`load`] with the command line's options.
pub fn load_with(
    path: &Path,
    secure: Option<&Path>,
    options: &LoadOptions,
) -> Result<Config, ConfigErrors> {
    let read = |path: &Path| {
        std::fs::read(path)
            .map_err(|e| format!("cannot read config file: {e}"))
            .and_then(|bytes| {
                String::from_utf8(bytes).map_err(|_| "config file is not valid UTF-8".to_owned())
            })
            .map_err(|message| ConfigError {
                file: path.to_owned(),
                line: 0,
                col: 0,
                message,
            })
    };
    let main = read(path);
    let secure = secure.map(|p| read(p).map(|text| (p, text)));
    match (main, secure) {
        (Ok(main), None) => load_str_with(path, &main, None, options),
        (Ok(main), Some(Ok((secure_path, secure)))) => {
            load_str_with(path, &main, Some((secure_path, &secure)), options)
        }
        (main, secure) => Err(ConfigErrors(
            main.err()
                .into_iter()
                .chain(secure.and_then(Result::err))
                .collect(),
        )),
    }
}

/// Validates configuration text; `main_name` and the secure path name the files in errors and
/// anchor relative paths. [`load`] reads the files and calls this.
pub fn load_str(
    main_name: &Path,
    main_src: &str,
    secure: Option<(&Path, &str)>,
) -> Result<Config, ConfigErrors> {
    load_str_with(main_name, main_src, secure, &LoadOptions::default())
}

/// [`load_str`] with the command line's options.
pub fn load_str_with(
    main_name: &Path,
    main_src: &str,
    secure: Option<(&Path, &str)>,
    options: &LoadOptions,
) -> Result<Config, ConfigErrors> {
    let env = |name: &str| std::env::var(name).ok();
    let main_format = detect_format(main_name, main_src);
    let main = Source::new(FileId::Main, main_format, main_src, &env);
    let secure_src = secure.map(|(path, text)| {
        let format = detect_format(path, text);
        (path, Source::new(FileId::Secure, format, text, &env))
    });
    let mut sink = raw::Sink::default();

    let main_doc = parse(&main, &mut sink);
    let secure_doc = secure_src.as_ref().map(|(_, src)| parse(src, &mut sink));
    // A document recovered from syntax errors would only produce misleading follow-up errors.
    if !sink.errors.is_empty() {
        return Err(into_errors(sink, main_name, secure.map(|(p, _)| p)));
    }

    let main_table = main_doc
        .as_ref()
        .and_then(|doc| top_level(&main, doc, &mut sink));
    let secure_table = match (&secure_src, &secure_doc) {
        (Some((path, src)), Some(Some(doc))) => {
            top_level(src, doc, &mut sink).map(|table| (*path, src, table))
        }
        _ => None,
    };
    let Some(main_table) = main_table.filter(|_| sink.errors.is_empty()) else {
        return Err(into_errors(sink, main_name, secure.map(|(p, _)| p)));
    };

    let raw_main = raw::read_main(
        &main,
        &base_dir(main_name),
        main_table,
        &options.leave_providers,
        &mut sink,
    );
    let raw_secure = secure_table
        .map(|(path, src, table)| raw::read_secure(src, &base_dir(path), table, &mut sink));
    let config = validate::build(raw_main, raw_secure, &mut sink);
    if sink.errors.is_empty() {
        Ok(config)
    } else {
        Err(into_errors(sink, main_name, secure.map(|(p, _)| p)))
    }
}

/// Which syntax a file is in: `.yaml`/`.yml` is YAML and `.toml` TOML, whatever the content;
/// otherwise the first line that is not blank or a comment decides: `%YAML`, `---` or a
/// line `key:` / `key: value` (a key without `=` before the colon) is YAML; anything else
/// (`key = value`, `[table]`, an empty file) is TOML.
fn detect_format(path: &Path, text: &str) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => return Format::Yaml,
        Some("toml") => return Format::Toml,
        _ => {}
    }
    let first = text
        .lines()
        .map(|line| line.trim_start_matches('\u{feff}').trim())
        .find(|line| !line.is_empty() && !line.starts_with('#'));
    let Some(line) = first else {
        return Format::Toml;
    };
    if line.starts_with("%YAML") || line.starts_with("---") {
        return Format::Yaml;
    }
    match line.find(':') {
        Some(colon) => {
            let key = &line[..colon];
            let after = &line[colon + 1..];
            let yaml_key = !key.is_empty() && !key.contains('=') && !key.starts_with('[');
            if yaml_key && (after.is_empty() || after.starts_with([' ', '\t'])) {
                Format::Yaml
            } else {
                Format::Toml
            }
        }
        None => Format::Toml,
    }
}

/// Parses one file into the document tree; `None` after recording its syntax errors.
fn parse(src: &Source, sink: &mut raw::Sink) -> Option<doc::Node> {
    match src.format {
        Format::Toml => {
            let (doc, errors) = toml::de::DeTable::parse_recoverable(&src.text);
            let failed = !errors.is_empty();
            report_syntax(src, errors, sink);
            (!failed).then(|| doc::from_toml(src, doc.get_ref()))
        }
        Format::Yaml => yaml::parse(src, sink),
    }
}

/// The top level, which must be a table (a YAML file could hold a list or a string).
fn top_level<'a>(src: &Source, doc: &'a doc::Node, sink: &mut raw::Sink) -> Option<&'a doc::Table> {
    match &doc.value {
        doc::Value::Table(table) => Some(table),
        other => {
            sink.error(
                doc.pos,
                format!(
                    "the top level must be a mapping, found {}",
                    other.type_name(src.format)
                ),
            );
            None
        }
    }
}

/// Records TOML syntax errors; only the parser's description and position are kept, never
/// the source line it would quote.
fn report_syntax(src: &Source, errors: Vec<toml::de::Error>, sink: &mut raw::Sink) {
    for error in errors {
        let offset = error.span().map_or(0, |span| span.start);
        let message = error.message().trim().replace('\n', "; ");
        sink.error(src.pos(offset), format!("invalid TOML: {message}"));
    }
}

/// The absolute directory that relative paths in the file `path` are resolved against.
fn base_dir(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new(""));
    if dir.as_os_str().is_empty() {
        std::env::current_dir().unwrap_or_default()
    } else {
        std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned())
    }
}

fn into_errors(sink: raw::Sink, main: &Path, secure: Option<&Path>) -> ConfigErrors {
    let mut errors = sink.errors;
    errors.sort();
    errors.dedup();
    ConfigErrors(
        errors
            .into_iter()
            .map(|(pos, message)| ConfigError {
                file: match pos.file {
                    FileId::Main => main.to_owned(),
                    FileId::Secure => secure.unwrap_or(main).to_owned(),
                },
                line: pos.line,
                col: pos.col,
                message,
            })
            .collect(),
    )
}
