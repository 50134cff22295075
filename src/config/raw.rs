//! Reading the document tree into raw structs, collecting every error on the way.
//!
//! serde's derive stops at the first error, and an operator fixing a config one error per
//! daemon start would rightly be annoyed.
//! So the files become a `doc::Node` tree, which keeps a position for every key and value
//! whether it came from TOML or YAML, and are walked by hand with [`Reader`]: each typed
//! getter records a type error and carries on, `require` records a missing key at the
//! table's header, and `finish` reports every key nobody asked for as unknown (and, in YAML,
//! every key written twice), except the launcher-only keys a YAML reader is told to ignore.
//!
//! Checks that need only one value (ranges, name syntax, required keys) happen here.
//! Checks that relate entries to each other (duplicate names, parents, provider references,
//! the secure file's diskimages) happen in `validate`, which is why names and parents keep
//! their position in [`At`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::doc::{Format, Node, Table, Value};
use super::source::{Pos, Source};
use super::{AwsImage, AwsImportMethod, Driver, ZkAuth, ZkServer, ZkTls, defaults};

/// A value and where it was written.
#[derive(Clone, Debug)]
pub(crate) struct At<T> {
    pub value: T,
    pub pos: Pos,
}

/// Every error found so far, with its position.
#[derive(Default)]
pub(crate) struct Sink {
    pub errors: Vec<(Pos, String)>,
}

impl Sink {
    pub fn error(&mut self, pos: Pos, message: impl Into<String>) {
        let mut message = message.into();
        // One error, one line: control characters that a quoted key or a value brought into
        // the message are escaped.
        if message.contains(char::is_control) {
            message = message
                .chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect();
        }
        self.errors.push((pos, message));
    }
}

/// The main file's top level.
pub(crate) struct RawMain {
    pub start: Pos,
    pub images_dir: Option<PathBuf>,
    pub elements_dir: Option<PathBuf>,
    pub build_log_dir: Option<PathBuf>,
    pub build_log_retention: Option<i64>,
    pub zookeeper_timeout: Option<f64>,
    pub images_dir_required_free: Option<u64>,
    pub image_gate: Option<bool>,
    pub cleanup_interval: Option<f64>,
    pub resync_interval: Option<f64>,
    pub progress_interval: Option<f64>,
    pub retry_backoff_initial: Option<f64>,
    pub retry_backoff_max: Option<f64>,
    /// `[builder-webapp]`: where the HTTP endpoint listens.
    pub builder_webapp: Option<std::net::SocketAddr>,
    /// `Some` whenever the key is present, even if its entries had errors.
    pub zookeeper_servers: Option<Vec<ZkServer>>,
    pub zookeeper_tls: Option<ZkTls>,
    pub zookeeper_auth: Option<ZkAuth>,
    pub diskimages: Vec<RawDiskImage>,
    pub providers: Vec<RawProvider>,
    /// Providers named by `--leave-provider`, in file order.
    pub left_providers: Vec<String>,
}

/// The secure file's top level.
pub(crate) struct RawSecure {
    pub zookeeper_servers: Option<Vec<ZkServer>>,
    pub zookeeper_tls: Option<ZkTls>,
    pub zookeeper_auth: Option<ZkAuth>,
    pub diskimages: Vec<RawSecureDiskImage>,
}

/// One `[[diskimages]]` entry of the main file, before parents are merged.
pub(crate) struct RawDiskImage {
    pub name: Option<At<String>>,
    pub is_abstract: bool,
    pub parent: Option<At<String>>,
    pub keys: DiskImageKeys,
}

/// The keys a diskimage inherits from its parent; `None` means absent from this entry.
#[derive(Clone, Debug, Default)]
pub(crate) struct DiskImageKeys {
    pub dib_cmd: Option<String>,
    pub elements: Option<Vec<String>>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub formats: Option<Vec<String>>,
    pub delete_after_upload: Option<bool>,
    pub keep_formats: Option<Vec<String>>,
    pub pause: Option<bool>,
    pub rebuild_age: Option<u64>,
    pub build_timeout: Option<u64>,
    pub release: Option<String>,
    pub username: Option<String>,
    pub python_path: Option<String>,
    pub shell_type: Option<String>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub images_dir_required_free: Option<u64>,
    pub image_gate: Option<bool>,
    pub validate_command: Option<Vec<String>>,
    pub validate_timeout: Option<u64>,
}

/// One `[[diskimages]]` entry of the secure file.
pub(crate) struct RawSecureDiskImage {
    pub name: Option<At<String>>,
    pub env_vars: BTreeMap<String, String>,
}

/// One `[[providers]]` entry.
pub(crate) struct RawProvider {
    pub name: Option<At<String>>,
    /// `None` when the driver was unknown or its required keys were missing.
    pub driver: Option<Driver>,
    pub rate: Option<f64>,
    pub image_name_format: Option<String>,
    pub image_upload_timeout: Option<u64>,
    pub post_upload_hook: Option<PathBuf>,
    pub diskimages: Vec<RawProviderDiskImage>,
}

/// One `[[providers.diskimages]]` entry.
pub(crate) struct RawProviderDiskImage {
    pub name: Option<At<String>>,
    pub pause: Option<bool>,
    pub meta: Option<BTreeMap<String, String>>,
    /// Read for an aws provider only.
    pub aws: Option<AwsImage>,
}

/// Keys of the main file's top level, named when the secure file tries to set one.
const MAIN_ONLY_KEYS: &[&str] = &[
    "images-dir",
    "elements-dir",
    "build-log-dir",
    "build-log-retention",
    "zookeeper-timeout",
    "images-dir-required-free",
    "image-gate",
    "cleanup-interval",
    "resync-interval",
    "progress-interval",
    "retry-backoff-initial",
    "retry-backoff-max",
    "builder-webapp",
    "providers",
];

/// Diskimage keys other than `name` and `env-vars`, which the secure file may not set.
const DISKIMAGE_MAIN_ONLY_KEYS: &[&str] = &[
    "abstract",
    "parent",
    "dib-cmd",
    "elements",
    "formats",
    "delete-after-upload",
    "keep-formats",
    "pause",
    "rebuild-age",
    "build-timeout",
    "release",
    "username",
    "python-path",
    "shell-type",
    "metadata",
    "images-dir-required-free",
    "image-gate",
    "validate-command",
    "validate-timeout",
];

/// Top-level keys of nodepool.yaml that only the launcher reads.
const TOP_LEVEL_LAUNCHER_KEYS: &[&str] =
    &["webapp", "labels", "max-hold-age", "tenant-resource-limits"];

/// Keys of a nodepool.yaml provider that only the launcher reads (nodepool 11's common
/// provider schema and its openstack driver's).
const PROVIDER_LAUNCHER_KEYS: &[&str] = &[
    "max-concurrency",
    "priority",
    "boot-timeout",
    "launch-timeout",
    "launch-retries",
    "nodepool-id",
    "clean-floating-ips",
    "port-cleanup-interval",
    "hostname-format",
    "pools",
    "cloud-images",
];

/// Keys of a nodepool.yaml aws provider that only the launcher reads (nodepool 11's aws
/// schema less the image-upload keys).
const AWS_PROVIDER_LAUNCHER_KEYS: &[&str] = &[
    "max-concurrency",
    "priority",
    "boot-timeout",
    "launch-timeout",
    "launch-retries",
    "pools",
    "cloud-images",
    "max-servers",
    "max-cores",
    "max-ram",
    "max-resources",
    "use-internal-ip",
    "host-key-checking",
    "public-ipv4",
    "public-ipv6",
];

/// Keys of a nodepool.yaml provider's diskimage entry that only the launcher reads.
const PROVIDER_DISKIMAGE_LAUNCHER_KEYS: &[&str] =
    &["config-drive", "connection-type", "connection-port"];

/// The same for an aws provider's diskimage entry.
const AWS_DISKIMAGE_LAUNCHER_KEYS: &[&str] = &[
    "connection-type",
    "connection-port",
    "username",
    "python-path",
    "shell-type",
];

/// Keys of an aws provider's diskimage entry (besides `name`, `pause`, `tags`).
const AWS_DISKIMAGE_KEYS: [&str; 8] = [
    "import-method",
    "architecture",
    "ena-support",
    "volume-size",
    "volume-type",
    "iops",
    "throughput",
    "imds-support",
];

/// What this builder does with a nodepool.yaml provider of a given driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DriverClass {
    /// `openstack`, `aws` and our `command`: this builder uploads to it.
    Supported,
    /// nodepool 11 drivers whose `manage_images` is true but which we cannot upload to.
    ForeignImages,
    /// nodepool 11 drivers without image uploads (`manage_images` false): nothing to do.
    NoImages,
    Unknown,
}

/// Classifies a driver name as nodepool 11's drivers declare `manage_images`.
pub(crate) fn classify_driver(driver: &str) -> DriverClass {
    match driver {
        "openstack" | "command" | "aws" => DriverClass::Supported,
        "azure" | "ibmvpc" | "fake" => DriverClass::ForeignImages,
        "gce" | "kubernetes" | "openshift" | "openshiftpods" | "static" | "metastatic"
        | "example" | "test" => DriverClass::NoImages,
        _ => DriverClass::Unknown,
    }
}

/// Reads the main file's document; providers named in `leave` are skipped.
pub(crate) fn read_main(
    src: &Source,
    base: &Path,
    root: &Table,
    leave: &[String],
    sink: &mut Sink,
) -> RawMain {
    let mut r = Reader::new(src, root, src.start(), "the top level");
    if src.format == Format::Yaml {
        r.ignore(TOP_LEVEL_LAUNCHER_KEYS);
    }
    let images_dir = r.path(sink, base, "images-dir");
    r.require(sink, "images-dir");
    let elements_dir = r.path(sink, base, "elements-dir");
    let build_log_dir = r.path(sink, base, "build-log-dir");
    let build_log_retention = r.integer(sink, "build-log-retention").and_then(|v| {
        check(
            sink,
            &v,
            v.value >= -1,
            "`build-log-retention` must be -1 (keep every log) or greater",
        )
    });
    let zookeeper_timeout = r
        .number(sink, "zookeeper-timeout")
        .and_then(|v| positive_f64(sink, "zookeeper-timeout", v))
        .and_then(|v| seconds(sink, "zookeeper-timeout", v));
    let images_dir_required_free = r
        .integer(sink, "images-dir-required-free")
        .and_then(|v| non_negative(sink, "images-dir-required-free", v));
    let image_gate = r.boolean(sink, "image-gate").map(|v| v.value);
    let cleanup_interval = r.number(sink, "cleanup-interval").and_then(|v| {
        check(
            sink,
            &v,
            v.value >= 0.0,
            "`cleanup-interval` must not be negative (0 disables cleanup)",
        )
        .and_then(|v| seconds(sink, "cleanup-interval", v))
    });
    let resync_interval = r
        .number(sink, "resync-interval")
        .and_then(|v| positive_f64(sink, "resync-interval", v))
        .and_then(|v| seconds(sink, "resync-interval", v));
    let progress_interval = r.number(sink, "progress-interval").and_then(|v| {
        check(
            sink,
            &v,
            v.value >= 0.0,
            "`progress-interval` must not be negative (0 turns progress lines off)",
        )
        .and_then(|v| seconds(sink, "progress-interval", v))
    });
    let backoff_initial = r
        .number(sink, "retry-backoff-initial")
        .and_then(|v| positive_f64(sink, "retry-backoff-initial", v))
        .and_then(|v| seconds(sink, "retry-backoff-initial", v));
    let backoff_max = r
        .number(sink, "retry-backoff-max")
        .and_then(|v| seconds(sink, "retry-backoff-max", v));
    // Compare with the defaults standing in for absent keys, but not when a present key was
    // already rejected.
    if (backoff_initial.is_some() || !r.has("retry-backoff-initial"))
        && (backoff_max.is_some() || !r.has("retry-backoff-max"))
    {
        let initial = backoff_initial
            .as_ref()
            .map_or(defaults::RETRY_BACKOFF_INITIAL, |v| v.value);
        let max = backoff_max
            .as_ref()
            .map_or(defaults::RETRY_BACKOFF_MAX, |v| v.value);
        if max < initial {
            match (&backoff_max, &backoff_initial) {
                (Some(max), _) => sink.error(
                    max.pos,
                    "`retry-backoff-max` must not be less than `retry-backoff-initial`",
                ),
                (None, Some(initial)) => sink.error(
                    initial.pos,
                    "`retry-backoff-initial` must not exceed `retry-backoff-max` (default 600)",
                ),
                (None, None) => {}
            }
        }
    }
    let builder_webapp = read_webapp(src, &mut r, sink);
    let zookeeper_servers = read_servers(src, &mut r, sink);
    let zookeeper_tls = read_tls(src, base, &mut r, sink);
    let zookeeper_auth = read_auth(src, &mut r, sink);
    let diskimages = r
        .tables(sink, "diskimages")
        .into_iter()
        .map(|(table, pos)| read_diskimage(src, table, pos, sink))
        .collect();
    let mut left_providers = Vec::new();
    let providers = r
        .tables(sink, "providers")
        .into_iter()
        .filter_map(|(table, pos)| {
            read_provider(src, base, table, pos, leave, &mut left_providers, sink)
        })
        .collect();
    r.finish(sink);
    RawMain {
        start: src.start(),
        images_dir,
        elements_dir,
        build_log_dir,
        build_log_retention: build_log_retention.map(|v| v.value),
        zookeeper_timeout: zookeeper_timeout.map(|v| v.value),
        images_dir_required_free,
        image_gate,
        cleanup_interval: cleanup_interval.map(|v| v.value),
        resync_interval: resync_interval.map(|v| v.value),
        progress_interval: progress_interval.map(|v| v.value),
        retry_backoff_initial: backoff_initial.map(|v| v.value),
        retry_backoff_max: backoff_max.map(|v| v.value),
        builder_webapp,
        zookeeper_servers,
        zookeeper_tls,
        zookeeper_auth,
        diskimages,
        providers,
        left_providers,
    }
}

/// Reads the secure file's document.
///
/// CAUTION: this file holds credentials, so no message written here may contain a value from
/// it; messages name keys and positions only (diskimage names are not secret).
pub(crate) fn read_secure(src: &Source, base: &Path, root: &Table, sink: &mut Sink) -> RawSecure {
    let mut r = Reader::new(src, root, src.start(), "the top level of the secure file");
    r.not_allowed(MAIN_ONLY_KEYS, "the secure file");
    let zookeeper_servers = read_servers(src, &mut r, sink);
    let zookeeper_tls = read_tls(src, base, &mut r, sink);
    let zookeeper_auth = read_auth(src, &mut r, sink);
    let diskimages = r
        .tables(sink, "diskimages")
        .into_iter()
        .map(|(table, pos)| {
            let mut d = Reader::new(src, table, pos, "a [[diskimages]] entry of the secure file");
            d.not_allowed(
                DISKIMAGE_MAIN_ONLY_KEYS,
                "a [[diskimages]] entry of the secure file (only name and env-vars)",
            );
            let name = d.string(sink, "name");
            d.require(sink, "name");
            let env_vars = d.string_map(sink, "env-vars");
            d.finish(sink);
            RawSecureDiskImage {
                name,
                env_vars: env_vars.unwrap_or_default(),
            }
        })
        .collect();
    r.finish(sink);
    RawSecure {
        zookeeper_servers,
        zookeeper_tls,
        zookeeper_auth,
        diskimages,
    }
}

fn read_servers(src: &Source, r: &mut Reader<'_>, sink: &mut Sink) -> Option<Vec<ZkServer>> {
    let value = r.raw("zookeeper-servers")?;
    if matches!(&value.value, Value::Array(a) if a.is_empty()) {
        sink.error(
            value.pos,
            "`zookeeper-servers` must list at least one server",
        );
    }
    let tables = r.tables(sink, "zookeeper-servers");
    let mut servers = Vec::new();
    let mut first_chroot: Option<At<Option<String>>> = None;
    for (table, header) in tables {
        let mut s = Reader::new(src, table, header, "a [[zookeeper-servers]] entry");
        let host = s.string(sink, "host");
        s.require(sink, "host");
        if let Some(host) = &host
            && host.value.trim().is_empty()
        {
            sink.error(host.pos, "`host` must not be empty");
        }
        let port = s.integer(sink, "port").and_then(|v| {
            check(
                sink,
                &v,
                (1..=65535).contains(&v.value),
                "`port` must be between 1 and 65535",
            )
        });
        let chroot = s.string(sink, "chroot");
        if let Some(chroot) = &chroot {
            check_chroot(sink, chroot);
        }
        s.finish(sink);
        let chroot_value = chroot.as_ref().map(|c| c.value.clone());
        match &first_chroot {
            None => {
                first_chroot = Some(At {
                    value: chroot_value.clone(),
                    pos: header,
                })
            }
            Some(first) if first.value != chroot_value => {
                let at = chroot.as_ref().map_or(header, |c| c.pos);
                sink.error(
                    at,
                    "every [[zookeeper-servers]] entry must have the same `chroot`",
                );
            }
            Some(_) => {}
        }
        servers.push(ZkServer {
            host: host.map(|h| h.value).unwrap_or_default(),
            port: port.map_or(defaults::ZOOKEEPER_PORT, |p| p.value as u16),
            chroot: chroot_value,
        });
    }
    Some(servers)
}

fn check_chroot(sink: &mut Sink, chroot: &At<String>) {
    let value = &chroot.value;
    if !value.starts_with('/') {
        sink.error(chroot.pos, "`chroot` must start with '/'");
    } else if value.ends_with('/') {
        sink.error(
            chroot.pos,
            "`chroot` must not end with '/' (leave it out to use the root)",
        );
    } else if value.contains("//") {
        sink.error(
            chroot.pos,
            "`chroot` must not contain empty path components",
        );
    }
}

fn read_tls(src: &Source, base: &Path, r: &mut Reader<'_>, sink: &mut Sink) -> Option<ZkTls> {
    let (table, pos) = r.table(sink, "zookeeper-tls")?;
    let mut t = Reader::new(src, table, pos, "[zookeeper-tls]");
    let cert = t.path(sink, base, "cert");
    let key = t.path(sink, base, "key");
    let ca = t.path(sink, base, "ca");
    let verify_hostname = t.boolean(sink, "verify-hostname");
    for required in ["cert", "key", "ca"] {
        t.require(sink, required);
    }
    t.finish(sink);
    Some(ZkTls {
        cert: cert.unwrap_or_default(),
        key: key.unwrap_or_default(),
        ca: ca.unwrap_or_default(),
        verify_hostname: verify_hostname.is_some_and(|v| v.value),
    })
}

/// `[builder-webapp]`: `port` (required) and `listen-address` (an IP address, default
/// `0.0.0.0` as the launcher's `webapp`).
fn read_webapp(src: &Source, r: &mut Reader<'_>, sink: &mut Sink) -> Option<std::net::SocketAddr> {
    let (table, pos) = r.table(sink, "builder-webapp")?;
    let mut w = Reader::new(src, table, pos, "[builder-webapp]");
    let address = w.string(sink, "listen-address");
    let port = w.integer(sink, "port").and_then(|p| {
        check(
            sink,
            &p,
            (1..=65535).contains(&p.value),
            "`port` must be between 1 and 65535",
        )
    });
    w.require(sink, "port");
    w.finish(sink);
    let ip = match address {
        None => std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        Some(a) => match a.value.parse::<std::net::IpAddr>() {
            Ok(ip) => ip,
            Err(_) => {
                sink.error(
                    a.pos,
                    format!(
                        "`listen-address` must be an IP address (such as 127.0.0.1 or ::), not {:?}",
                        a.value
                    ),
                );
                return None;
            }
        },
    };
    Some(std::net::SocketAddr::new(
        ip,
        u16::try_from(port?.value).ok()?,
    ))
}

fn read_auth(src: &Source, r: &mut Reader<'_>, sink: &mut Sink) -> Option<ZkAuth> {
    let (table, pos) = r.table(sink, "zookeeper-auth")?;
    let mut a = Reader::new(src, table, pos, "[zookeeper-auth]");
    let scheme = a.string(sink, "scheme");
    let credentials = a.string(sink, "credentials");
    a.require(sink, "credentials");
    a.finish(sink);
    let scheme = scheme.map_or_else(|| defaults::ZOOKEEPER_AUTH_SCHEME.to_owned(), |s| s.value);
    if let Some(credentials) = &credentials
        && scheme == "digest"
        && !credentials.value.contains(':')
    {
        // The value is a password: name the key, never echo it.
        sink.error(
            credentials.pos,
            "`credentials` must have the form user:password for scheme digest",
        );
    }
    Some(ZkAuth {
        scheme,
        credentials: credentials.map(|c| c.value).unwrap_or_default(),
    })
}

fn read_diskimage(src: &Source, table: &Table, pos: Pos, sink: &mut Sink) -> RawDiskImage {
    let mut d = Reader::new(src, table, pos, "a [[diskimages]] entry");
    let name = d.string(sink, "name");
    d.require(sink, "name");
    if let Some(name) = &name {
        check_znode_name(sink, "diskimage", name);
    }
    let is_abstract = d.boolean(sink, "abstract").is_some_and(|v| v.value);
    let parent = d.string(sink, "parent");
    let keys = DiskImageKeys {
        dib_cmd: d.string(sink, "dib-cmd").map(|v| v.value),
        elements: d.strings(sink, "elements"),
        env_vars: d.string_map(sink, "env-vars"),
        formats: d.strings(sink, "formats"),
        delete_after_upload: d.boolean(sink, "delete-after-upload").map(|v| v.value),
        keep_formats: d.strings(sink, "keep-formats"),
        pause: d.boolean(sink, "pause").map(|v| v.value),
        rebuild_age: d
            .integer(sink, "rebuild-age")
            .and_then(|v| whole_seconds(sink, "rebuild-age", v))
            .and_then(|v| positive(sink, "rebuild-age", v)),
        build_timeout: d
            .integer(sink, "build-timeout")
            .and_then(|v| whole_seconds(sink, "build-timeout", v))
            .and_then(|v| positive(sink, "build-timeout", v)),
        release: d.release(sink),
        username: d.string(sink, "username").map(|v| v.value),
        python_path: d.string(sink, "python-path").map(|v| v.value),
        shell_type: d.string(sink, "shell-type").map(|v| v.value),
        metadata: d.string_map(sink, "metadata"),
        images_dir_required_free: d
            .integer(sink, "images-dir-required-free")
            .and_then(|v| non_negative(sink, "images-dir-required-free", v)),
        image_gate: d.boolean(sink, "image-gate").map(|v| v.value),
        validate_command: d.command(sink, "validate-command"),
        validate_timeout: d
            .integer(sink, "validate-timeout")
            .and_then(|v| whole_seconds(sink, "validate-timeout", v))
            .and_then(|v| positive(sink, "validate-timeout", v)),
    };
    if let Some(template) = &keys.validate_command {
        let unknown = crate::gate::unknown_placeholders(template);
        if let Some(name) = unknown.first() {
            let known: Vec<String> = crate::gate::VALIDATE_PLACEHOLDERS
                .iter()
                .map(|k| format!("{{{k}}}"))
                .collect();
            sink.error(
                d.value_pos("validate-command"),
                format!(
                    "`validate-command` has an unknown placeholder {{{name}}} (known: {})",
                    known.join(", ")
                ),
            );
        }
    }
    d.finish(sink);
    RawDiskImage {
        name,
        is_abstract,
        parent,
        keys,
    }
}

/// Reads one provider; `None` when this builder has nothing to do with it: it is left to
/// another builder (`leave`, then recorded in `left`), its driver has no images, or its
/// driver manages images we cannot upload (an error unless it is left).
fn read_provider(
    src: &Source,
    base: &Path,
    table: &Table,
    pos: Pos,
    leave: &[String],
    left: &mut Vec<String>,
    sink: &mut Sink,
) -> Option<RawProvider> {
    let mut p = Reader::new(src, table, pos, "a [[providers]] entry");
    let name = p.string(sink, "name");
    p.require(sink, "name");
    if let Some(name) = &name {
        if leave.contains(&name.value) {
            // Its keys are the other builder's business.
            left.push(name.value.clone());
            return None;
        }
        check_znode_name(sink, "provider", name);
    }
    let driver_name = p.string(sink, "driver");
    if src.format == Format::Yaml {
        let driver = driver_name
            .as_ref()
            .map_or("openstack", |d| d.value.as_str());
        match classify_driver(driver) {
            DriverClass::Supported | DriverClass::Unknown => {}
            DriverClass::NoImages => return None,
            DriverClass::ForeignImages => {
                let at = driver_name.as_ref().map_or(p.pos, |d| d.pos);
                let provider = name.as_ref().map_or("", |n| n.value.as_str());
                sink.error(
                    at,
                    format!(
                        "provider {provider}: driver `{driver}` manages images, but this builder cannot upload to it; run it on nodepool's builder and pass --leave-provider {provider} here"
                    ),
                );
                return None;
            }
        }
        p.ignore(if driver == "aws" {
            AWS_PROVIDER_LAUNCHER_KEYS
        } else {
            PROVIDER_LAUNCHER_KEYS
        });
    }
    let is_aws = driver_name.as_ref().is_some_and(|d| d.value == "aws");
    let cloud = p.string(sink, "cloud");
    let region_name = p.string(sink, "region-name");
    let image_format = p.string(sink, "image-format");
    if let Some(format) = &image_format
        && format.value.is_empty()
    {
        sink.error(format.pos, "`image-format` must not be empty");
    }
    let upload_command = p.command(sink, "upload-command");
    let delete_command = p.command(sink, "delete-command");
    let list_command = p.command(sink, "list-command");
    let rate = p
        .number(sink, "rate")
        .and_then(|v| check(sink, &v, v.value >= 0.0, "`rate` must not be negative"))
        .and_then(|v| seconds(sink, "rate", v));
    let image_name_format = p.string(sink, "image-name-format");
    if let Some(format) = &image_name_format {
        check_image_name_format(sink, format);
    }
    let image_upload_timeout = p
        .integer(sink, "image-upload-timeout")
        .and_then(|v| whole_seconds(sink, "image-upload-timeout", v))
        .and_then(|v| positive(sink, "image-upload-timeout", v));
    let post_upload_hook = p.path(sink, base, "post-upload-hook");
    let mut rate = rate.map(|v| v.value);
    // The aws driver's keys (an error below for other drivers).
    let profile_name = p.string(sink, "profile-name").map(|v| v.value);
    let bucket_name = p.table(sink, "object-storage").and_then(|(table, pos)| {
        let mut o = Reader::new(src, table, pos, "an [object-storage] table");
        let bucket = o.string(sink, "bucket-name");
        o.require(sink, "bucket-name");
        o.finish(sink);
        bucket.map(|b| b.value)
    });
    let has_bucket = bucket_name.is_some();
    let image_import_timeout = p
        .integer(sink, "image-import-timeout")
        .and_then(|v| whole_seconds(sink, "image-import-timeout", v))
        .and_then(|v| positive(sink, "image-import-timeout", v));
    let mut image_upload_timeout = image_upload_timeout;

    let driver = match driver_name
        .as_ref()
        .map_or("openstack", |d| d.value.as_str())
    {
        "openstack" => {
            p.require(sink, "cloud");
            for key in ["upload-command", "delete-command", "list-command"] {
                p.only_for(sink, key, "command");
            }
            for key in AWS_PROVIDER_KEYS {
                p.only_for(sink, key, "aws");
            }
            cloud.map(|cloud| Driver::OpenStack {
                cloud: cloud.value,
                region_name: region_name.map(|r| r.value),
                image_format: image_format.map(|f| f.value),
            })
        }
        "command" => {
            p.require(sink, "upload-command");
            p.require(sink, "delete-command");
            for key in ["cloud", "region-name"] {
                p.only_for(sink, key, "openstack");
            }
            for key in AWS_PROVIDER_KEYS {
                p.only_for(sink, key, "aws");
            }
            match (upload_command, delete_command) {
                (Some(upload_command), Some(delete_command)) => Some(Driver::Command {
                    upload_command,
                    delete_command,
                    list_command,
                    image_format: image_format
                        .map_or_else(|| defaults::COMMAND_IMAGE_FORMAT.to_owned(), |f| f.value),
                }),
                _ => None,
            }
        }
        "aws" => {
            p.require(sink, "region-name");
            p.only_for(sink, "cloud", "openstack");
            for key in ["upload-command", "delete-command", "list-command"] {
                p.only_for(sink, key, "command");
            }
            // nodepool 11's aws `rate` is calls per second; ours is seconds between calls.
            let per_second = rate.unwrap_or(defaults::AWS_RATE_PER_SECOND);
            rate = Some(if per_second > 0.0 {
                1.0 / per_second
            } else {
                0.0
            });
            if image_import_timeout.is_some() {
                image_upload_timeout = image_import_timeout;
            }
            if let Some(format) = &image_format
                && !defaults::AWS_IMAGE_FORMATS.contains(&format.value.as_str())
            {
                sink.error(
                    format.pos,
                    format!(
                        "`image-format` of an aws provider must be one of {} (nodepool 11's)",
                        defaults::AWS_IMAGE_FORMATS.join(", ")
                    ),
                );
            }
            region_name.map(|region| Driver::Aws {
                region_name: region.value,
                profile_name,
                bucket_name,
                image_format: image_format
                    .map_or_else(|| defaults::AWS_IMAGE_FORMAT.to_owned(), |f| f.value),
            })
        }
        other => {
            let at = driver_name.as_ref().map_or(p.pos, |d| d.pos);
            sink.error(
                at,
                format!(
                    "unknown driver `{other}` (expected \"openstack\", \"aws\" or \"command\")"
                ),
            );
            None
        }
    };

    let diskimages = p
        .tables(sink, "diskimages")
        .into_iter()
        .map(|(table, pos)| {
            let mut d = Reader::new(src, table, pos, "a [[providers.diskimages]] entry");
            if src.format == Format::Yaml {
                d.ignore(if is_aws {
                    AWS_DISKIMAGE_LAUNCHER_KEYS
                } else {
                    PROVIDER_DISKIMAGE_LAUNCHER_KEYS
                });
            }
            let name = d.string(sink, "name");
            d.require(sink, "name");
            let pause = d.boolean(sink, "pause").map(|v| v.value);
            let (meta, aws) = if is_aws {
                d.raw("meta");
                if d.has("meta") {
                    sink.error(
                        d.key_pos("meta"),
                        "`meta` is not a key of an aws provider's diskimage: its image tags are `tags`",
                    );
                }
                let image = read_aws_image(&mut d, sink);
                // nodepool 11 loads such a config and fails every upload with a TypeError.
                if image.import_method != AwsImportMethod::EbsDirect && !has_bucket {
                    let named = d.has("import-method");
                    sink.error(
                        if named { d.key_pos("import-method") } else { pos },
                        format!(
                            "import-method \"{}\"{} stages the image in S3: it needs the \
                             provider's `object-storage.bucket-name` (or import-method \
                             \"ebs-direct\", which needs no bucket)",
                            image.import_method.as_str(),
                            if named { "" } else { " (the default)" }
                        ),
                    );
                }
                (d.string_map(sink, "tags"), Some(image))
            } else {
                for key in AWS_DISKIMAGE_KEYS.iter().chain(&["tags"]) {
                    d.raw(key);
                    d.only_for(sink, key, "aws");
                }
                (d.string_map(sink, "meta"), None)
            };
            d.finish(sink);
            RawProviderDiskImage {
                name,
                pause,
                meta,
                aws,
            }
        })
        .collect();
    p.finish(sink);
    Some(RawProvider {
        name,
        driver,
        rate,
        image_name_format: image_name_format.map(|v| v.value),
        image_upload_timeout,
        post_upload_hook,
        diskimages,
    })
}

/// Keys of an aws provider other than the common ones and `region-name`.
const AWS_PROVIDER_KEYS: [&str; 3] = ["profile-name", "object-storage", "image-import-timeout"];

/// The aws keys of a provider's diskimage entry, with nodepool 11's defaults and checks.
fn read_aws_image(d: &mut Reader, sink: &mut Sink) -> AwsImage {
    let import_method = match d.string(sink, "import-method") {
        None => AwsImportMethod::Snapshot,
        Some(m) => match m.value.as_str() {
            "snapshot" => AwsImportMethod::Snapshot,
            "image" => AwsImportMethod::Image,
            "ebs-direct" => AwsImportMethod::EbsDirect,
            other => {
                sink.error(
                    m.pos,
                    format!(
                        "`import-method` must be \"snapshot\", \"image\" or \"ebs-direct\", found {other:?}"
                    ),
                );
                AwsImportMethod::Snapshot
            }
        },
    };
    let architecture = d.string(sink, "architecture");
    let ena_support = d.boolean(sink, "ena-support").map(|v| v.value);
    let mut count = |key: &'static str| d.integer(sink, key).and_then(|v| positive(sink, key, v));
    let volume_size = count("volume-size");
    let iops = count("iops");
    let throughput = count("throughput");
    let volume_type = d.string(sink, "volume-type");
    let imds_v2 = match d.string(sink, "imds-support") {
        None => false,
        Some(v) if v.value == "v2.0" => {
            if import_method == AwsImportMethod::Image {
                sink.error(
                    v.pos,
                    "`imds-support: v2.0` needs `import-method` \"snapshot\" or \"ebs-direct\" (EC2's image import cannot set it)",
                );
            }
            true
        }
        Some(v) => {
            sink.error(
                v.pos,
                format!(
                    "`imds-support` must be \"v2.0\" (or absent), found {:?}",
                    v.value
                ),
            );
            false
        }
    };
    AwsImage {
        import_method,
        architecture: architecture
            .map_or_else(|| defaults::AWS_ARCHITECTURE.to_owned(), |v| v.value),
        ena_support: ena_support.unwrap_or(true),
        volume_size,
        volume_type: volume_type.map_or_else(|| defaults::AWS_VOLUME_TYPE.to_owned(), |v| v.value),
        iops,
        throughput,
        imds_v2,
    }
}

/// Diskimage and provider names become znode path components.
fn check_znode_name(sink: &mut Sink, what: &str, name: &At<String>) {
    let value = name.value.as_str();
    let problem = if value.is_empty() {
        Some("must not be empty")
    } else if value.contains('/') {
        Some("must not contain '/'")
    } else if matches!(value, "." | ".." | "lock") {
        Some("must not be \".\", \"..\" or \"lock\"")
    } else if value.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    };
    if let Some(problem) = problem {
        sink.error(
            name.pos,
            format!("{what} name {problem}: it is used as a ZooKeeper path component"),
        );
    }
}

/// `image-name-format` is expanded with `{image_name}`, `{upload_id}` and `{timestamp}` only
/// (wire spec §1.5), Python `str.format` style (`{{` and `}}` are literal braces).
fn check_image_name_format(sink: &mut Sink, format: &At<String>) {
    let mut rest = format.value.as_str();
    while let Some(open) = rest.find(['{', '}']) {
        let brace = &rest[open..];
        if brace.starts_with("{{") || brace.starts_with("}}") {
            rest = &brace[2..];
            continue;
        }
        if brace.starts_with('}') {
            sink.error(
                format.pos,
                "`image-name-format` has an unmatched '}' (write '}}' for a literal brace)",
            );
            return;
        }
        let Some(close) = brace.find('}') else {
            sink.error(
                format.pos,
                "`image-name-format` has an unmatched '{' (write '{{' for a literal brace)",
            );
            return;
        };
        let field = &brace[1..close];
        if !matches!(field, "image_name" | "upload_id" | "timestamp") {
            sink.error(
                format.pos,
                format!(
                    "`image-name-format` uses unknown field {{{field}}} (known: {{image_name}}, {{upload_id}}, {{timestamp}})"
                ),
            );
        }
        rest = &brace[close + 1..];
    }
}

fn check<T>(sink: &mut Sink, v: &At<T>, ok: bool, message: &str) -> Option<At<T>>
where
    T: Clone,
{
    if ok {
        Some(v.clone())
    } else {
        sink.error(v.pos, message);
        None
    }
}

fn positive(sink: &mut Sink, key: &str, v: At<i64>) -> Option<u64> {
    if v.value > 0 {
        Some(v.value as u64)
    } else {
        sink.error(v.pos, format!("`{key}` must be greater than 0"));
        None
    }
}

fn non_negative(sink: &mut Sink, key: &str, v: At<i64>) -> Option<u64> {
    if v.value >= 0 {
        Some(v.value as u64)
    } else {
        sink.error(v.pos, format!("`{key}` must not be negative"));
        None
    }
}

/// The longest time a key may give, in seconds (100 years): more is surely a mistake, and
/// would overflow the deadlines the daemon computes from it (`Instant` + `Duration`).
pub(crate) const MAX_SECONDS: i64 = 3_155_760_000;

/// Rejects a number of seconds above [`MAX_SECONDS`].
fn seconds(sink: &mut Sink, key: &str, v: At<f64>) -> Option<At<f64>> {
    let ok = v.value <= MAX_SECONDS as f64;
    check(sink, &v, ok, &too_long(key))
}

/// Rejects a whole number of seconds above [`MAX_SECONDS`].
fn whole_seconds(sink: &mut Sink, key: &str, v: At<i64>) -> Option<At<i64>> {
    let ok = v.value <= MAX_SECONDS;
    check(sink, &v, ok, &too_long(key))
}

fn too_long(key: &str) -> String {
    format!("`{key}` must be at most {MAX_SECONDS} seconds (100 years)")
}

fn positive_f64(sink: &mut Sink, key: &str, v: At<f64>) -> Option<At<f64>> {
    if v.value > 0.0 {
        Some(v)
    } else {
        sink.error(v.pos, format!("`{key}` must be greater than 0"));
        None
    }
}

/// Typed access to one table that records every problem and remembers which keys were read.
///
/// Every getter is called for every key the table may hold, present or not, so after the
/// getters ran, the keys asked for are exactly the known keys and anything else is unknown.
/// In YAML a key whose value is null (`key:` with nothing after it, or `~`) counts as absent,
/// as upstream's `dict.get` makes it.
pub(crate) struct Reader<'a> {
    format: Format,
    table: &'a Table,
    /// Position of the table's header (`[[diskimages]]`, `{`, `- ` or the file start).
    pos: Pos,
    /// "a [[diskimages]] entry", in the file's format's words.
    context: String,
    known: Vec<&'static str>,
    /// Keys of nodepool.yaml that only the launcher reads: accepted and not looked at.
    ignored: &'static [&'static str],
    /// Keys that are known elsewhere but not allowed here, and where "here" is.
    not_allowed: (&'static [&'static str], String),
}

/// A table's TOML name in YAML words: `a [[diskimages]] entry` is `a diskimages entry`.
fn yaml_words(toml: &str) -> String {
    toml.replace("[[providers.diskimages]]", "provider's diskimages")
        .replace(['[', ']'], "")
}

impl<'a> Reader<'a> {
    pub fn new(src: &Source, table: &'a Table, pos: Pos, context: &'static str) -> Self {
        let context = match src.format {
            Format::Toml => context.to_owned(),
            Format::Yaml => yaml_words(context),
        };
        Reader {
            format: src.format,
            table,
            pos,
            context,
            known: Vec::new(),
            ignored: &[],
            not_allowed: (&[], String::new()),
        }
    }

    /// Keys known elsewhere that are errors here, and where "here" is (TOML words).
    fn not_allowed(&mut self, keys: &'static [&'static str], where_: &str) {
        let where_ = match self.format {
            Format::Toml => where_.to_owned(),
            Format::Yaml => yaml_words(where_),
        };
        self.not_allowed = (keys, where_);
    }

    fn get(&self, key: &str) -> Option<&'a Node> {
        self.table
            .get(key)
            .filter(|node| !matches!(node.value, Value::Null))
    }

    fn raw(&mut self, key: &'static str) -> Option<&'a Node> {
        if !self.known.contains(&key) {
            self.known.push(key);
        }
        self.get(key)
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn value_pos(&self, key: &str) -> Pos {
        self.get(key).map_or(self.pos, |v| v.pos)
    }

    fn key_pos(&self, key: &str) -> Pos {
        self.table
            .get_key_value(key)
            .map_or(self.pos, |(k, _)| k.pos)
    }

    fn at<T>(&self, value: T, node: &Node) -> At<T> {
        At {
            value,
            pos: node.pos,
        }
    }

    fn type_error(&self, sink: &mut Sink, key: &str, node: &Node, expected: &str) {
        sink.error(
            node.pos,
            format!(
                "`{key}` must be {expected}, found {}",
                node.value.type_name(self.format)
            ),
        );
    }

    /// Records "missing required key" at the table header when `key` is absent.
    pub fn require(&mut self, sink: &mut Sink, key: &'static str) {
        if !self.has(key) {
            sink.error(
                self.pos,
                format!("missing required key `{key}` in {}", self.context),
            );
        }
    }

    /// Records an error at `key` when it is present but belongs to another driver.
    fn only_for(&mut self, sink: &mut Sink, key: &str, driver: &str) {
        if self.has(key) {
            sink.error(
                self.key_pos(key),
                format!("`{key}` is only valid for driver \"{driver}\""),
            );
        }
    }

    pub fn string(&mut self, sink: &mut Sink, key: &'static str) -> Option<At<String>> {
        let node = self.raw(key)?;
        match &node.value {
            Value::String(s) => Some(self.at(s.clone(), node)),
            _ => {
                self.type_error(sink, key, node, "a string");
                None
            }
        }
    }

    pub fn path(&mut self, sink: &mut Sink, base: &Path, key: &'static str) -> Option<PathBuf> {
        let value = self.string(sink, key)?;
        if value.value.is_empty() {
            sink.error(value.pos, format!("`{key}` must not be empty"));
            return None;
        }
        Some(base.join(value.value))
    }

    pub fn boolean(&mut self, sink: &mut Sink, key: &'static str) -> Option<At<bool>> {
        let node = self.raw(key)?;
        match node.value {
            Value::Boolean(b) => Some(self.at(b, node)),
            _ => {
                self.type_error(sink, key, node, "a boolean");
                None
            }
        }
    }

    pub fn integer(&mut self, sink: &mut Sink, key: &'static str) -> Option<At<i64>> {
        let node = self.raw(key)?;
        match node.value {
            Value::Integer(Some(n)) => Some(self.at(n, node)),
            Value::Integer(None) => {
                sink.error(node.pos, format!("`{key}` is out of range"));
                None
            }
            _ => {
                self.type_error(sink, key, node, "an integer");
                None
            }
        }
    }

    /// A float; an integer is accepted too (`zookeeper-timeout = 20` means 20.0).
    pub fn number(&mut self, sink: &mut Sink, key: &'static str) -> Option<At<f64>> {
        let node = self.raw(key)?;
        let number = match node.value {
            Value::Integer(n) => n.map_or(f64::NAN, |n| n as f64),
            Value::Float(f) => f,
            _ => {
                self.type_error(sink, key, node, "a number");
                return None;
            }
        };
        if number.is_finite() {
            Some(self.at(number, node))
        } else {
            sink.error(node.pos, format!("`{key}` must be a finite number"));
            None
        }
    }

    /// `release` is a string or an integer; integers are stringified like upstream does.
    fn release(&mut self, sink: &mut Sink) -> Option<String> {
        let node = self.raw("release")?;
        match &node.value {
            Value::String(s) => Some(s.clone()),
            Value::Integer(Some(n)) => Some(n.to_string()),
            Value::Integer(None) => {
                sink.error(node.pos, "`release` is out of range");
                None
            }
            _ => {
                self.type_error(sink, "release", node, "a string or an integer");
                None
            }
        }
    }

    /// An array of strings; every element that is not a string is reported.
    pub fn strings(&mut self, sink: &mut Sink, key: &'static str) -> Option<Vec<String>> {
        let node = self.raw(key)?;
        let Value::Array(items) = &node.value else {
            let expected = self.words("an array of strings", "a list of strings");
            self.type_error(sink, key, node, expected);
            return None;
        };
        let mut out = Vec::new();
        for item in items {
            match &item.value {
                Value::String(s) => out.push(s.clone()),
                other => sink.error(
                    item.pos,
                    format!(
                        "`{key}` entries must be strings, found {}",
                        other.type_name(self.format)
                    ),
                ),
            }
        }
        Some(out)
    }

    /// A command's argv template: a non-empty array of strings.
    fn command(&mut self, sink: &mut Sink, key: &'static str) -> Option<Vec<String>> {
        let argv = self.strings(sink, key)?;
        if argv.is_empty() {
            sink.error(self.value_pos(key), format!("`{key}` must not be empty"));
        }
        Some(argv)
    }

    /// A table whose values are all strings (environment variables, image properties).
    pub fn string_map(
        &mut self,
        sink: &mut Sink,
        key: &'static str,
    ) -> Option<BTreeMap<String, String>> {
        let node = self.raw(key)?;
        let Value::Table(table) = &node.value else {
            let expected = self.words("a table of strings", "a mapping of strings");
            self.type_error(sink, key, node, expected);
            return None;
        };
        let mut out = BTreeMap::new();
        for (name, item) in &table.entries {
            let name = name.name.clone();
            if key == "env-vars" && (name.is_empty() || name.contains(['=', '\0'])) {
                sink.error(
                    item.pos,
                    "`env-vars` names must be non-empty and must not contain '=' or NUL",
                );
                continue;
            }
            match &item.value {
                Value::String(s) => {
                    out.insert(name, s.clone());
                }
                other => sink.error(
                    item.pos,
                    format!(
                        "values of `{key}` must be strings, found {} for `{name}`",
                        other.type_name(self.format)
                    ),
                ),
            }
        }
        Some(out)
    }

    /// A sub-table, with the position of its header.
    pub fn table(&mut self, sink: &mut Sink, key: &'static str) -> Option<(&'a Table, Pos)> {
        let node = self.raw(key)?;
        match &node.value {
            // A YAML mapping has no header of its own: its key stands for it.
            Value::Table(table) => Some((
                table,
                match self.format {
                    Format::Toml => node.pos,
                    Format::Yaml => self.key_pos(key),
                },
            )),
            _ => {
                let expected = self.words("a table", "a mapping");
                self.type_error(sink, key, node, expected);
                None
            }
        }
    }

    /// An array of tables (`[[key]]` sections or an inline array of inline tables; in YAML
    /// a list of mappings).
    pub fn tables(&mut self, sink: &mut Sink, key: &'static str) -> Vec<(&'a Table, Pos)> {
        let Some(node) = self.raw(key) else {
            return Vec::new();
        };
        let Value::Array(items) = &node.value else {
            let expected = self.words("an array of tables", "a list of mappings");
            self.type_error(sink, key, node, expected);
            return Vec::new();
        };
        let mut out = Vec::new();
        let entries = self.words("tables", "mappings");
        for item in items {
            match &item.value {
                Value::Table(table) => out.push((table, item.pos)),
                other => sink.error(
                    item.pos,
                    format!(
                        "`{key}` entries must be {entries}, found {}",
                        other.type_name(self.format)
                    ),
                ),
            }
        }
        out
    }

    /// Accepts these keys without reading them (launcher-only keys of nodepool.yaml).
    pub fn ignore(&mut self, keys: &'static [&'static str]) {
        self.ignored = keys;
    }

    /// Reports every key that no getter asked for, and every key written twice.
    pub fn finish(self, sink: &mut Sink) {
        for (index, (key, _)) in self.table.entries.iter().enumerate() {
            let name = key.name.as_str();
            if let Some((first, _)) = self.table.entries[..index]
                .iter()
                .find(|(k, _)| k.name == name)
            {
                sink.error(
                    key.pos,
                    format!(
                        "duplicate key `{name}` in {} (first at line {})",
                        self.context, first.pos.line
                    ),
                );
                continue;
            }
            if self.known.contains(&name) || self.ignored.contains(&name) {
                continue;
            }
            let (not_allowed, where_) = &self.not_allowed;
            if not_allowed.contains(&name) {
                sink.error(key.pos, format!("`{name}` is not allowed in {where_}"));
                continue;
            }
            let mut message = format!("unknown key `{name}` in {}", self.context);
            if let Some(similar) = self
                .known
                .iter()
                .find(|known| edit_distance(known, name) <= 2)
            {
                message.push_str(&format!("; did you mean `{similar}`?"));
            }
            sink.error(key.pos, message);
        }
    }

    /// The TOML or the YAML wording of a type.
    fn words(&self, toml: &'static str, yaml: &'static str) -> &'static str {
        match self.format {
            Format::Toml => toml,
            Format::Yaml => yaml,
        }
    }
}

/// Levenshtein distance, for "did you mean" hints on unknown keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::edit_distance;

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("images-dir", "imags-dir"), 1);
        assert_eq!(edit_distance("port", "prot"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
