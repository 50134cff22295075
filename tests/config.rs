//! Configuration loading as an operator sees it: defaults, parent merging, the secure file,
//! `%(NODEPOOL_*)` substitution, and broken configs reporting every error at its
//! `file:line:col`.
//!
//! Broken configs live in `tests/fixtures/config/bad/NN-short-name.toml` (or `.yaml`, a
//! nodepool.yaml), optionally with a secure file `NN-short-name.secure.toml` (`.secure.yaml`), and a sidecar `NN-short-name.expected` listing
//! one expected error per line as `LINE:COL: substring of the message`; a line starting with
//! `secure:` expects the error in the secure file. Lines starting with `#` are comments.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nodepool_builder::config::{self, Config, ConfigErrors, Driver, ZkServer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config")
}

fn load_ok(main: &Path, secure: Option<&Path>) -> Config {
    match config::load(main, secure) {
        Ok(config) => config,
        Err(errors) => panic!("{} should load, but:\n{errors}", main.display()),
    }
}

fn load_err(main: &Path, secure: Option<&Path>) -> ConfigErrors {
    match config::load(main, secure) {
        Ok(config) => panic!("{} should not load, but gave {config:#?}", main.display()),
        Err(errors) => errors,
    }
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn minimal_config_gets_nodepool_defaults() {
    let config = load_ok(&fixtures().join("good/minimal.toml"), None);

    assert_eq!(config.images_dir, Path::new("/opt/nodepool/images"));
    assert_eq!(config.elements_dir, None);
    assert_eq!(config.build_log_dir, Path::new("/var/log/nodepool/builds"));
    assert_eq!(config.build_log_retention, 7);
    assert_eq!(config.zookeeper_timeout, 10.0);
    assert_eq!(config.images_dir_required_free, 0);
    assert_eq!(
        config.zookeeper_servers,
        vec![ZkServer {
            host: "zk1.example.com".into(),
            port: 2281,
            chroot: None
        }]
    );
    assert_eq!(config.zookeeper_tls, None);
    assert_eq!(config.zookeeper_auth, None);
    assert_eq!(config.cleanup_interval, 60.0);
    assert_eq!(config.resync_interval, 300.0);
    assert_eq!(config.progress_interval, 30.0);
    assert_eq!(config.retry_backoff_initial, 5.0);
    assert_eq!(config.retry_backoff_max, 600.0);
    assert!(config.diskimages.is_empty());
    assert!(config.providers.is_empty());
}

#[test]
fn full_config_merges_parents_secure_file_and_both_drivers() {
    let dir = fixtures().join("good");
    let config = load_ok(&dir.join("full.toml"), Some(&dir.join("full-secure.toml")));

    // Relative paths are resolved against the directory of the file they are written in.
    assert_eq!(config.images_dir, dir.join("images"));
    assert_eq!(
        config.elements_dir.as_deref(),
        Some(Path::new("/etc/nodepool/elements"))
    );
    assert_eq!(config.build_log_dir, Path::new("/srv/logs/builds"));
    assert_eq!(config.build_log_retention, -1);
    // An integer is accepted where a float is expected.
    assert_eq!(config.zookeeper_timeout, 30.0);
    assert_eq!(config.images_dir_required_free, 20);
    assert_eq!(config.cleanup_interval, 0.0);
    assert_eq!(config.resync_interval, 120.5);
    assert_eq!(config.progress_interval, 2.5);
    assert_eq!(config.retry_backoff_initial, 1.0);
    assert_eq!(config.retry_backoff_max, 60.0);

    // The secure file's server list replaces the main file's.
    assert_eq!(
        config.zookeeper_servers,
        vec![
            ZkServer {
                host: "zk1.internal".into(),
                port: 2282,
                chroot: Some("/nodepool".into())
            },
            ZkServer {
                host: "zk2.internal".into(),
                port: 2281,
                chroot: Some("/nodepool".into())
            },
        ]
    );
    let tls = config.zookeeper_tls.as_ref().expect("zookeeper-tls");
    assert_eq!(tls.cert, dir.join("tls/client.pem"));
    assert_eq!(tls.key, Path::new("/etc/nodepool/tls/client.key"));
    assert_eq!(tls.ca, dir.join("tls/ca.pem"));
    assert!(tls.verify_hostname);
    let auth = config.zookeeper_auth.as_ref().expect("zookeeper-auth");
    assert_eq!(auth.scheme, "digest");
    assert_eq!(auth.credentials, "builder:s3cret");
    assert!(
        !format!("{auth:?}").contains("s3cret"),
        "Debug of ZkAuth leaks the password"
    );

    // Abstract templates are not images.
    let names: Vec<&str> = config.diskimages.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["ubuntu-jammy", "debian-bookworm"]);
    assert!(config.diskimage("base").is_none());
    assert!(config.diskimage("ubuntu-base").is_none());

    let jammy = config.diskimage("ubuntu-jammy").unwrap();
    // Elements append root first.
    assert_eq!(
        jammy.elements,
        strings(&["vm", "simple-init", "ubuntu-minimal", "growroot"])
    );
    // env-vars: the nearer level wins, then the secure file wins over everything.
    assert_eq!(
        jammy.env_vars,
        map(&[
            ("DIB_CHECKSUM", "0"),
            ("REG_PASSWORD", "s3cret"),
            ("TMPDIR", "/var/tmp")
        ])
    );
    // A present `pause = false` overrides the root's `pause = true` (upstream cannot).
    assert!(!jammy.pause);
    // Integer release, stringified, inherited from the middle level.
    assert_eq!(jammy.release, "22");
    // metadata is inherited although the child does not set it (upstream quirk Q9 fixed).
    assert_eq!(jammy.metadata, map(&[("owner", "infra")]));
    assert_eq!(jammy.rebuild_age, 3600);
    assert_eq!(jammy.build_timeout, 7200);
    // The image gate: off at the top, back on for this image, with a validate command.
    assert!(!config.image_gate);
    assert_eq!(jammy.image_gate, Some(true));
    assert_eq!(
        jammy.validate_command,
        Some(strings(&[
            "/usr/local/bin/boot-test",
            "--format={format}",
            "{file}",
            "{image_name}-{build_id}"
        ]))
    );
    assert_eq!(jammy.validate_timeout, 300);
    let debian = config.diskimage("debian-bookworm").unwrap();
    assert_eq!(debian.image_gate, None, "the top-level image-gate decides");
    assert_eq!(debian.validate_command, None);
    assert_eq!(debian.validate_timeout, 600, "the default validate-timeout");
    assert_eq!(jammy.username, "base-user");
    assert_eq!(jammy.python_path, "/usr/bin/python3");
    assert_eq!(jammy.shell_type.as_deref(), Some("bash"));
    assert_eq!(jammy.formats, strings(&["qcow2", "raw"]));
    assert!(jammy.delete_after_upload);
    assert_eq!(jammy.keep_formats, strings(&["raw"]));
    assert_eq!(jammy.images_dir_required_free, Some(5));
    assert_eq!(jammy.dib_cmd, "disk-image-create");

    let debian = config.diskimage("debian-bookworm").unwrap();
    assert_eq!(debian.elements, strings(&["vm", "simple-init"]));
    assert_eq!(
        debian.env_vars,
        map(&[("DIB_CHECKSUM", "1"), ("TMPDIR", "/opt/dib_tmp")])
    );
    // The root's pause is inherited where the child says nothing.
    assert!(debian.pause);
    assert_eq!(debian.release, "bookworm");
    // Metadata is dict-updated: the parent's key survives next to the child's.
    assert_eq!(
        debian.metadata,
        map(&[("distro", "debian"), ("owner", "infra")])
    );
    assert_eq!(debian.dib_cmd, "%p/dib-wrapper");
    assert_eq!(debian.build_timeout, 28800);
    assert_eq!(debian.python_path, "auto");
    assert_eq!(debian.shell_type, None);
    assert_eq!(debian.images_dir_required_free, None);
    assert!(debian.formats.is_empty());
    assert!(!debian.delete_after_upload);

    let names: Vec<&str> = config.providers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["cloud-a", "archive", "aws-east"]);
    let cloud = config.provider("cloud-a").unwrap();
    assert_eq!(
        cloud.driver,
        Driver::OpenStack {
            cloud: "mycloud".into(),
            region_name: Some("RegionOne".into()),
            image_format: None
        }
    );
    assert_eq!(cloud.rate, 0.5);
    assert_eq!(cloud.image_name_format, "{image_name}-{timestamp}");
    assert_eq!(cloud.image_upload_timeout, 1800);
    assert_eq!(cloud.post_upload_hook, Some(dir.join("hooks/after-upload")));
    assert_eq!(cloud.diskimages.len(), 2);
    assert_eq!(cloud.diskimages[0].name, "ubuntu-jammy");
    assert!(!cloud.diskimages[0].pause);
    assert_eq!(cloud.diskimages[0].meta, map(&[("hw_disk_bus", "scsi")]));
    assert_eq!(cloud.diskimages[1].name, "debian-bookworm");
    assert!(cloud.diskimages[1].pause);

    let archive = config.provider("archive").unwrap();
    assert_eq!(
        archive.driver,
        Driver::Command {
            upload_command: strings(&["/usr/local/bin/upload", "{file}", "{image_name}"]),
            delete_command: strings(&["/usr/local/bin/delete", "{external_id}"]),
            list_command: Some(strings(&["/usr/local/bin/list", "--provider={provider}"])),
            image_format: "raw".into()
        }
    );
    assert_eq!(archive.rate, 1.0);
    assert_eq!(
        archive.image_name_format,
        "nodepool-{image_name}-{timestamp}"
    );
    assert_eq!(archive.image_upload_timeout, 3600);
    assert_eq!(archive.post_upload_hook, None);
    assert!(config.provider("nope").is_none());
}

#[test]
fn without_the_secure_file_the_main_servers_are_used() {
    let config = load_ok(&fixtures().join("good/full.toml"), None);
    assert_eq!(config.zookeeper_servers.len(), 1);
    assert_eq!(config.zookeeper_servers[0].host, "zk-from-main.example.com");
    assert_eq!(config.zookeeper_auth, None);
    let jammy = config.diskimage("ubuntu-jammy").unwrap();
    assert_eq!(
        jammy.env_vars.get("DIB_CHECKSUM").map(String::as_str),
        Some("1")
    );
    assert!(!jammy.env_vars.contains_key("REG_PASSWORD"));
}

#[test]
fn a_command_provider_defaults_to_qcow2() {
    let src = r#"
images-dir = "/images"
[[zookeeper-servers]]
host = "zk"
[[providers]]
name = "p"
driver = "command"
upload-command = ["up"]
delete-command = ["del"]
"#;
    let config = config::load_str(Path::new("/etc/nodepool/builder.toml"), src, None).unwrap();
    let Driver::Command { image_format, .. } = &config.providers[0].driver else {
        panic!(
            "expected the command driver: {:?}",
            config.providers[0].driver
        );
    };
    assert_eq!(image_format, "qcow2");
}

/// One expected error of a bad fixture.
#[derive(Debug)]
struct Expected {
    secure: bool,
    line: usize,
    col: usize,
    substring: String,
}

fn parse_expected(path: &Path) -> Vec<Expected> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (secure, rest) = match l.strip_prefix("secure:") {
                Some(rest) => (true, rest),
                None => (false, l),
            };
            let mut parts = rest.splitn(3, ':');
            let mut number = || {
                parts
                    .next()
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or_else(|| panic!("{}: bad line {l:?}", path.display()))
            };
            let (line, col) = (number(), number());
            let substring = parts.next().unwrap_or("").trim().to_owned();
            Expected {
                secure,
                line,
                col,
                substring,
            }
        })
        .collect()
}

#[test]
fn every_bad_fixture_reports_exactly_its_errors_at_their_positions() {
    let dir = fixtures().join("bad");
    let mut mains: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            (name.ends_with(".toml") || name.ends_with(".yaml")) && !name.contains(".secure.")
        })
        .collect();
    mains.sort();
    assert!(mains.len() >= 20, "only {} bad fixtures", mains.len());

    let mut failures = Vec::new();
    let mut several_at_once = false;
    for main in &mains {
        let extension = main.extension().unwrap().to_str().unwrap();
        let secure = main.with_extension(format!("secure.{extension}"));
        let secure = secure.exists().then_some(secure);
        let expected = parse_expected(&main.with_extension("expected"));
        assert!(!expected.is_empty(), "{} expects no error", main.display());
        let errors = match config::load(main, secure.as_deref()) {
            Ok(_) => {
                failures.push(format!("{}: loaded without errors", main.display()));
                continue;
            }
            Err(errors) => errors.0,
        };
        several_at_once |= errors.len() >= 3;
        let matches = errors.len() == expected.len()
            && errors.iter().zip(&expected).all(|(got, want)| {
                let file = if want.secure {
                    secure.as_deref().unwrap_or(main)
                } else {
                    main
                };
                got.file == file
                    && got.line == want.line
                    && got.col == want.col
                    && got.message.contains(&want.substring)
                    && got.to_string().starts_with(&format!("{}:", file.display()))
            });
        if !matches {
            let got: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            failures.push(format!(
                "{}:\n  expected:\n    {}\n  got:\n    {}",
                main.display(),
                expected
                    .iter()
                    .map(|e| format!(
                        "{}{}:{}: {}",
                        if e.secure { "secure:" } else { "" },
                        e.line,
                        e.col,
                        e.substring
                    ))
                    .collect::<Vec<_>>()
                    .join("\n    "),
                got.join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad fixtures did not report as expected:\n{}",
        failures.len(),
        mains.len(),
        failures.join("\n")
    );
    assert!(
        several_at_once,
        "no fixture proves that several errors are reported at once"
    );
}

#[test]
fn secure_file_errors_never_echo_secrets_or_lines() {
    let dir = fixtures().join("bad");
    for name in ["25-secure-typo", "26-secure-syntax"] {
        let main = dir.join(format!("{name}.toml"));
        let secure = dir.join(format!("{name}.secure.toml"));
        let errors = load_err(&main, Some(&secure));
        let text = errors.to_string();
        assert!(
            errors.0.iter().any(|e| e.file == secure),
            "{name}: expected an error in the secure file, got:\n{text}"
        );
        assert!(
            !text.contains("hunter2-secret"),
            "{name} leaks the secret:\n{text}"
        );
        assert!(!text.contains("20240101"), "{name} leaks a value:\n{text}");
        for line in std::fs::read_to_string(&secure).unwrap().lines() {
            if line.contains('=') {
                assert!(
                    !text.contains(line.trim()),
                    "{name} echoes {line:?}:\n{text}"
                );
            }
        }
    }
}

#[test]
fn secure_file_names_the_mistyped_key() {
    let dir = fixtures().join("bad");
    let errors = load_err(
        &dir.join("25-secure-typo.toml"),
        Some(&dir.join("25-secure-typo.secure.toml")),
    );
    assert!(
        errors.0.iter().any(|e| e.message.contains("`pasword`")),
        "{errors}"
    );
}

#[test]
fn environment_variables_starting_with_nodepool_are_substituted() {
    let name = format!("NODEPOOL_CONFIG_TEST_{}", std::process::id());
    let unset = format!("NODEPOOL_CONFIG_TEST_UNSET_{}", std::process::id());
    // SAFETY: the variable name is unique to this process and test; nothing else reads or
    // writes it, and the value is set before it is read.
    unsafe { std::env::set_var(&name, "/srv/from-env") };
    let src = format!(
        r#"images-dir = "%({name})/images"
elements-dir = "%({unset})"
build-log-dir = "%(PATH)"

[[zookeeper-servers]]
host = "zk"

[[diskimages]]
name = "ubuntu"
env-vars = {{ A = "%({name})", B = 1 }}
"#
    );
    let errors = config::load_str(Path::new("/etc/nodepool/builder.toml"), &src, None)
        .expect_err("B = 1 is not a string");
    // The error after the substitution points at the column as written in the file.
    let col = src.lines().nth(9).unwrap().find("1 }").unwrap() + 1;
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert_eq!((errors.0[0].line, errors.0[0].col), (10, col), "{errors}");

    let config = config::load_str(
        Path::new("/etc/nodepool/builder.toml"),
        &src.replace("B = 1", "B = \"1\""),
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.images_dir, Path::new("/srv/from-env/images"));
    // Unset variables and variables not starting with NODEPOOL_ are left as written.
    assert_eq!(
        config.elements_dir,
        Some(PathBuf::from(format!("/etc/nodepool/%({unset})")))
    );
    assert_eq!(config.build_log_dir, Path::new("/etc/nodepool/%(PATH)"));
    assert_eq!(
        config
            .diskimage("ubuntu")
            .unwrap()
            .env_vars
            .get("A")
            .map(String::as_str),
        Some("/srv/from-env")
    );
}

#[test]
fn an_unreadable_file_is_reported_with_its_path() {
    let missing = fixtures().join("does-not-exist.toml");
    let errors = load_err(&missing, None);
    assert_eq!(errors.0.len(), 1);
    let text = errors.to_string();
    assert!(
        text.starts_with(&format!("{}: cannot read config file", missing.display())),
        "{text}"
    );
}

#[test]
fn errors_are_displayed_one_per_line() {
    let main = fixtures().join("bad/27-many-errors.toml");
    let errors = load_err(&main, None);
    let text = errors.to_string();
    assert_eq!(text.lines().count(), errors.0.len());
    for line in text.lines() {
        assert!(line.starts_with(&format!("{}:", main.display())), "{line}");
    }
}

#[test]
fn the_example_config_loads_and_documents_the_real_defaults() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/nodepool-builder.toml");
    let config = load_ok(&example, None);
    let minimal = load_ok(&fixtures().join("good/minimal.toml"), None);

    // The example writes out every default; they must be the defaults the loader applies.
    assert_eq!(config.build_log_dir, minimal.build_log_dir);
    assert_eq!(config.build_log_retention, minimal.build_log_retention);
    assert_eq!(config.zookeeper_timeout, minimal.zookeeper_timeout);
    assert_eq!(
        config.images_dir_required_free,
        minimal.images_dir_required_free
    );
    assert_eq!(config.cleanup_interval, minimal.cleanup_interval);
    assert_eq!(config.resync_interval, minimal.resync_interval);
    assert_eq!(config.retry_backoff_initial, minimal.retry_backoff_initial);
    assert_eq!(config.retry_backoff_max, minimal.retry_backoff_max);
    assert_eq!(
        config.zookeeper_servers[0].port,
        minimal.zookeeper_servers[0].port
    );

    let defaults = config::load_str(
        Path::new("/x.toml"),
        "images-dir = \"/i\"\n[[zookeeper-servers]]\nhost = \"zk\"\n[[diskimages]]\nname = \"d\"\n[[providers]]\nname = \"p\"\ncloud = \"c\"\n",
        None,
    )
    .unwrap();
    let image = config
        .diskimage("ubuntu-noble")
        .expect("the example's diskimage");
    let default_image = &defaults.diskimages[0];
    assert_eq!(image.dib_cmd, default_image.dib_cmd);
    assert_eq!(image.rebuild_age, default_image.rebuild_age);
    assert_eq!(image.build_timeout, default_image.build_timeout);
    assert_eq!(image.username, default_image.username);
    assert_eq!(image.python_path, default_image.python_path);
    let provider = config
        .provider("cloud-a")
        .expect("the example's openstack provider");
    let default_provider = &defaults.providers[0];
    assert_eq!(provider.rate, default_provider.rate);
    assert_eq!(
        provider.image_name_format,
        default_provider.image_name_format
    );
    assert_eq!(
        provider.image_upload_timeout,
        default_provider.image_upload_timeout
    );
}

#[test]
fn toml_integer_and_float_notations_are_understood() {
    let src = r#"
images-dir = "/images"
zookeeper-timeout = 1_5.2_5
[[zookeeper-servers]]
host = "zk"
port = 0x8d9
[[diskimages]]
name = "d"
rebuild-age = 86_400
build-timeout = +7200
release = 0o20
"#;
    let config = config::load_str(Path::new("/etc/nodepool/builder.toml"), src, None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.zookeeper_timeout, 15.25);
    assert_eq!(config.zookeeper_servers[0].port, 2265);
    let image = &config.diskimages[0];
    assert_eq!(image.rebuild_age, 86400);
    assert_eq!(image.build_timeout, 7200);
    assert_eq!(image.release, "16");
}

#[test]
fn nodepool_yaml_loads_to_the_same_configuration_as_its_toml_twin() {
    let dir = fixtures().join("good");
    let toml = load_ok(&dir.join("full.toml"), Some(&dir.join("full-secure.toml")));
    let yaml = load_ok(&dir.join("full.yaml"), Some(&dir.join("full-secure.yaml")));
    // Launcher keys, drivers without images, anchors, a merge key and YAML 1.1 scalars
    // (`yes`, `on`, octal `024`) change nothing.
    assert_eq!(yaml, toml);
    assert_eq!(yaml.images_dir_required_free, 20);
    assert_eq!(yaml.zookeeper_timeout, 30.0);
}

#[test]
fn leave_provider_skips_any_provider_and_names_only_the_ones_found() {
    let dir = fixtures().join("good");
    let options = config::LoadOptions {
        leave_providers: strings(&["cloud-a", "static-rack", "not-there"]),
    };
    let config = config::load_with(&dir.join("full.yaml"), None, &options).unwrap();
    let names: Vec<&str> = config.providers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, vec!["archive", "aws-east"]);
    assert_eq!(config.left_providers, strings(&["cloud-a", "static-rack"]));
}

#[test]
fn nodepool_variables_are_substituted_in_yaml_and_errors_keep_their_columns() {
    let name = format!("NODEPOOL_YAML_TEST_{}", std::process::id());
    // SAFETY: the variable name is unique to this process and test; nothing else reads or
    // writes it, and the value is set before it is read.
    unsafe { std::env::set_var(&name, "/srv/a-much-longer-value-than-the-reference") };
    let src = format!(
        "images-dir: \"%({name})/images\"\nzookeeper-servers:\n  - host: zk\ndiskimages:\n  - {{name: ubuntu, env-vars: {{A: \"%({name})\", B: 1}}}}\n"
    );
    let path = Path::new("/etc/nodepool/nodepool.yaml");
    let errors = config::load_str(path, &src, None).expect_err("B: 1 is not a string");
    let col = src.lines().nth(4).unwrap().find("1}").unwrap() + 1;
    assert_eq!(
        errors.to_string(),
        format!(
            "/etc/nodepool/nodepool.yaml:5:{col}: values of `env-vars` must be strings, found integer for `B`"
        )
    );
    let config = config::load_str(path, &src.replace("B: 1", "B: '1'"), None).unwrap();
    assert_eq!(
        config.images_dir,
        Path::new("/srv/a-much-longer-value-than-the-reference/images")
    );
    assert_eq!(
        config.diskimages[0].env_vars["A"],
        "/srv/a-much-longer-value-than-the-reference"
    );
}

#[test]
fn yaml_is_recognised_by_content_when_the_name_does_not_say() {
    let yaml = "# nodepool's file under another name\n\n---\nimages-dir: /srv/images\nzookeeper-servers:\n  - host: zk\n";
    let toml = "# ours\nimages-dir = \"/srv/images\"\n[[zookeeper-servers]]\nhost = \"zk\"\n";
    for (name, text) in [
        ("/etc/nodepool/secure.conf", yaml),
        ("/etc/nodepool/builder", yaml.replace("---\n", "").as_str()),
        ("/etc/nodepool/builder.conf", toml),
    ] {
        let config =
            config::load_str(Path::new(name), text, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(config.images_dir, Path::new("/srv/images"), "{name}");
    }
    // The extension wins over the content: YAML in a .toml file is a TOML error.
    let errors = config::load_str(Path::new("/etc/nodepool/builder.toml"), yaml, None)
        .expect_err("YAML is not TOML");
    assert!(errors.to_string().contains("invalid TOML"), "{errors}");
}

#[test]
fn yaml_bombs_and_deep_nesting_are_refused_with_a_position() {
    let path = Path::new("/etc/nodepool/nodepool.yaml");
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..8 {
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n",
            p = i - 1
        ));
    }
    let errors = config::load_str(path, &bomb, None).expect_err("a billion laughs");
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert!(
        errors.0[0].message.contains("more than 100000 values"),
        "{errors}"
    );

    let deep = format!("images-dir: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    let errors = config::load_str(path, &deep, None).expect_err("too deep");
    assert_eq!(
        errors.to_string(),
        "/etc/nodepool/nodepool.yaml:1:76: invalid YAML: nested more than 64 levels deep"
    );
}
