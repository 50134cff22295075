//! Cross-entry checks, parent merging and the secure file: raw structs in, [`Config`] out.
//!
//! # Parent and abstract diskimages
//!
//! This follows wire spec §3.5 with deliberate differences, all in the operator's favour:
//!
//! * `abstract = true` entries are templates only: they are not built, are not in
//!   [`Config::diskimages`], cannot be listed by a provider and cannot receive secure
//!   `env-vars`. `abstract` itself is not inherited.
//! * A `parent` may name any diskimage, abstract or not, defined anywhere in the file (also
//!   further down); unknown parents and cycles (including a diskimage naming itself) are
//!   errors.
//! * The chain is merged root-first, then the entry's own keys:
//!   `elements` append (parent first); `env-vars` and `metadata` are dict-updated (child
//!   wins); every other key is overridden when it is *present* in the child.
//! * Upstream overrides a key only when the child's value is truthy, so a child cannot set
//!   `pause = false`, `formats = []` or `release = ""` to cancel its parent's value. TOML
//!   tells an absent key from a false one, so here a child can; that is deliberate.
//! * Upstream replaces `metadata` at every level, so a child without `metadata` loses its
//!   parent's (quirk Q9). Here `metadata` is inherited like `env-vars`; that is a fix.
//!
//! # Secure file
//!
//! The secure file's `zookeeper-servers` replaces the main file's list, its
//! `zookeeper-tls` and `zookeeper-auth` replace the main file's tables, and each of its
//! `[[diskimages]]` entries merges `env-vars` over the named (non-abstract) diskimage's
//! merged `env-vars`. Its messages never contain values from it.

use std::collections::{BTreeMap, HashMap};

use super::raw::{DiskImageKeys, RawDiskImage, RawMain, RawProvider, RawSecure, Sink};
use super::{Config, DiskImage, Provider, ProviderDiskImage, defaults};

/// Checks the raw documents against each other and builds the configuration.
///
/// The result is only meaningful when `sink` is still empty afterwards.
pub(crate) fn build(main: RawMain, secure: Option<RawSecure>, sink: &mut Sink) -> Config {
    let (servers, tls, auth, secure_diskimages) = match secure {
        Some(secure) => (
            secure.zookeeper_servers.or(main.zookeeper_servers),
            secure.zookeeper_tls.or(main.zookeeper_tls),
            secure.zookeeper_auth.or(main.zookeeper_auth),
            secure.diskimages,
        ),
        None => (
            main.zookeeper_servers,
            main.zookeeper_tls,
            main.zookeeper_auth,
            Vec::new(),
        ),
    };
    let zookeeper_servers = servers.unwrap_or_else(|| {
        sink.error(
            main.start,
            "missing required key `zookeeper-servers` in the top level (neither the main nor the secure file sets it)",
        );
        Vec::new()
    });

    let mut diskimages = merge_diskimages(&main.diskimages, sink);
    for entry in &secure_diskimages {
        let Some(name) = &entry.name else { continue };
        match diskimages.iter_mut().find(|d| d.name == name.value) {
            Some(image) => image
                .env_vars
                .extend(entry.env_vars.iter().map(|(k, v)| (k.clone(), v.clone()))),
            // A concrete diskimage missing from the merged list had errors of its own.
            None if is_concrete(&main.diskimages, &name.value) => {}
            None => sink.error(name.pos, format!("unknown diskimage {}", name.value)),
        }
    }
    let providers = check_providers(&main.diskimages, main.providers, sink);

    Config {
        images_dir: main.images_dir.unwrap_or_default(),
        elements_dir: main.elements_dir,
        build_log_dir: main
            .build_log_dir
            .unwrap_or_else(|| defaults::BUILD_LOG_DIR.into()),
        build_log_retention: main
            .build_log_retention
            .unwrap_or(defaults::BUILD_LOG_RETENTION),
        zookeeper_timeout: main
            .zookeeper_timeout
            .unwrap_or(defaults::ZOOKEEPER_TIMEOUT),
        images_dir_required_free: main
            .images_dir_required_free
            .unwrap_or(defaults::IMAGES_DIR_REQUIRED_FREE),
        image_gate: main.image_gate.unwrap_or(defaults::IMAGE_GATE),
        zookeeper_servers,
        zookeeper_tls: tls,
        zookeeper_auth: auth,
        cleanup_interval: main.cleanup_interval.unwrap_or(defaults::CLEANUP_INTERVAL),
        resync_interval: main.resync_interval.unwrap_or(defaults::RESYNC_INTERVAL),
        progress_interval: main
            .progress_interval
            .unwrap_or(defaults::PROGRESS_INTERVAL),
        retry_backoff_initial: main
            .retry_backoff_initial
            .unwrap_or(defaults::RETRY_BACKOFF_INITIAL),
        retry_backoff_max: main
            .retry_backoff_max
            .unwrap_or(defaults::RETRY_BACKOFF_MAX),
        builder_webapp: main.builder_webapp,
        diskimages,
        providers,
        left_providers: main.left_providers,
    }
}

/// Whether the main file defines a non-abstract diskimage of this name.
fn is_concrete(raw: &[RawDiskImage], name: &str) -> bool {
    raw.iter()
        .any(|d| !d.is_abstract && d.name.as_ref().is_some_and(|n| n.value == name))
}

/// Checks names and parents, and returns the merged non-abstract diskimages in file order.
fn merge_diskimages(raw: &[RawDiskImage], sink: &mut Sink) -> Vec<DiskImage> {
    // The first entry of each name; later ones are reported and ignored.
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for (index, entry) in raw.iter().enumerate() {
        let Some(name) = &entry.name else { continue };
        if let Some(&first) = by_name.get(name.value.as_str()) {
            let first_line = raw[first].name.as_ref().map_or(0, |n| n.pos.line);
            sink.error(
                name.pos,
                format!(
                    "diskimage {} already defined (first at line {first_line})",
                    name.value
                ),
            );
        } else {
            by_name.insert(&name.value, index);
        }
    }

    // Resolve each entry's chain of ancestors, nearest first, or `None` if it is broken.
    let mut chains: Vec<Option<Vec<usize>>> = Vec::with_capacity(raw.len());
    let mut reported_cycles: Vec<Vec<usize>> = Vec::new();
    for (index, entry) in raw.iter().enumerate() {
        let Some(name) = &entry.name else {
            chains.push(None);
            continue;
        };
        if by_name.get(name.value.as_str()) != Some(&index) {
            // A duplicate; already reported.
            chains.push(None);
            continue;
        }
        chains.push(ancestors(raw, &by_name, index, &mut reported_cycles, sink));
    }

    let mut merged = Vec::new();
    for (index, entry) in raw.iter().enumerate() {
        if entry.is_abstract {
            continue;
        }
        let (Some(name), Some(chain)) = (&entry.name, &chains[index]) else {
            continue;
        };
        let keys = chain
            .iter()
            .rev()
            .fold(DiskImageKeys::default(), |acc, &ancestor| {
                overlay(acc, &raw[ancestor].keys)
            });
        let keys = overlay(keys, &entry.keys);
        merged.push(finish_diskimage(name.value.clone(), keys));
    }
    merged
}

/// Walks the `parent` links of `raw[index]`; reports an unknown parent at the entry that names
/// it and each cycle once, at the `parent` key of its first member in file order.
fn ancestors(
    raw: &[RawDiskImage],
    by_name: &HashMap<&str, usize>,
    index: usize,
    reported_cycles: &mut Vec<Vec<usize>>,
    sink: &mut Sink,
) -> Option<Vec<usize>> {
    let mut path = vec![index];
    let mut current = index;
    loop {
        let Some(parent) = &raw[current].parent else {
            return Some(path[1..].to_vec());
        };
        let Some(&next) = by_name.get(parent.value.as_str()) else {
            if current == index {
                let name = raw[index].name.as_ref().map_or("", |n| n.value.as_str());
                sink.error(
                    parent.pos,
                    format!("parent {} of diskimage {name} is not defined", parent.value),
                );
            }
            // An unknown parent further up is reported at the entry that names it.
            return None;
        };
        if let Some(start) = path.iter().position(|&p| p == next) {
            let mut members = path[start..].to_vec();
            members.sort_unstable();
            if !reported_cycles.contains(&members) {
                let first = members[0];
                // Describe the cycle starting from its first member in file order.
                let at = path.iter().position(|&p| p == first).unwrap_or(start);
                let cycle: Vec<usize> =
                    path[at..].iter().chain(&path[start..at]).copied().collect();
                let names: Vec<&str> = cycle
                    .iter()
                    .chain(std::iter::once(&cycle[0]))
                    .map(|&i| raw[i].name.as_ref().map_or("", |n| n.value.as_str()))
                    .collect();
                if let Some(parent) = &raw[first].parent {
                    sink.error(parent.pos, format!("parent cycle: {}", names.join(" -> ")));
                }
                reported_cycles.push(members);
            }
            return None;
        }
        path.push(next);
        current = next;
    }
}

/// Lays `child` over `base` with the merge rules described at the top of this module.
fn overlay(base: DiskImageKeys, child: &DiskImageKeys) -> DiskImageKeys {
    fn append<T: Clone>(base: Option<Vec<T>>, child: &Option<Vec<T>>) -> Option<Vec<T>> {
        match (base, child) {
            (Some(mut base), Some(child)) => {
                base.extend(child.iter().cloned());
                Some(base)
            }
            (base, child) => base.or_else(|| child.clone()),
        }
    }
    fn update(
        base: Option<BTreeMap<String, String>>,
        child: &Option<BTreeMap<String, String>>,
    ) -> Option<BTreeMap<String, String>> {
        match (base, child) {
            (Some(mut base), Some(child)) => {
                base.extend(child.iter().map(|(k, v)| (k.clone(), v.clone())));
                Some(base)
            }
            (base, child) => base.or_else(|| child.clone()),
        }
    }
    DiskImageKeys {
        dib_cmd: child.dib_cmd.clone().or(base.dib_cmd),
        elements: append(base.elements, &child.elements),
        env_vars: update(base.env_vars, &child.env_vars),
        formats: child.formats.clone().or(base.formats),
        delete_after_upload: child.delete_after_upload.or(base.delete_after_upload),
        keep_formats: child.keep_formats.clone().or(base.keep_formats),
        pause: child.pause.or(base.pause),
        rebuild_age: child.rebuild_age.or(base.rebuild_age),
        build_timeout: child.build_timeout.or(base.build_timeout),
        release: child.release.clone().or(base.release),
        username: child.username.clone().or(base.username),
        python_path: child.python_path.clone().or(base.python_path),
        shell_type: child.shell_type.clone().or(base.shell_type),
        metadata: update(base.metadata, &child.metadata),
        images_dir_required_free: child
            .images_dir_required_free
            .or(base.images_dir_required_free),
        image_gate: child.image_gate.or(base.image_gate),
        validate_command: child.validate_command.clone().or(base.validate_command),
        validate_timeout: child.validate_timeout.or(base.validate_timeout),
    }
}

/// Fills in nodepool's defaults for keys no level of the chain set.
fn finish_diskimage(name: String, keys: DiskImageKeys) -> DiskImage {
    DiskImage {
        name,
        dib_cmd: keys.dib_cmd.unwrap_or_else(|| defaults::DIB_CMD.to_owned()),
        elements: keys.elements.unwrap_or_default(),
        env_vars: keys.env_vars.unwrap_or_default(),
        formats: keys.formats.unwrap_or_default(),
        delete_after_upload: keys.delete_after_upload.unwrap_or(false),
        keep_formats: keys.keep_formats.unwrap_or_default(),
        pause: keys.pause.unwrap_or(false),
        rebuild_age: keys.rebuild_age.unwrap_or(defaults::REBUILD_AGE),
        build_timeout: keys.build_timeout.unwrap_or(defaults::BUILD_TIMEOUT),
        release: keys.release.unwrap_or_default(),
        username: keys
            .username
            .unwrap_or_else(|| defaults::USERNAME.to_owned()),
        python_path: keys
            .python_path
            .unwrap_or_else(|| defaults::PYTHON_PATH.to_owned()),
        shell_type: keys.shell_type,
        metadata: keys.metadata.unwrap_or_default(),
        images_dir_required_free: keys.images_dir_required_free,
        image_gate: keys.image_gate,
        validate_command: keys.validate_command,
        validate_timeout: keys.validate_timeout.unwrap_or(defaults::VALIDATE_TIMEOUT),
    }
}

/// Checks provider names and each provider's diskimage references.
fn check_providers(
    diskimages: &[RawDiskImage],
    raw: Vec<RawProvider>,
    sink: &mut Sink,
) -> Vec<Provider> {
    let mut abstract_by_name: HashMap<&str, bool> = HashMap::new();
    for entry in diskimages {
        if let Some(name) = &entry.name {
            abstract_by_name
                .entry(&name.value)
                .or_insert(entry.is_abstract);
        }
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut providers = Vec::new();
    for provider in raw {
        let provider_name = provider.name.as_ref().map_or("", |n| n.value.as_str());
        if let Some(name) = &provider.name {
            match seen.get(&name.value) {
                Some(line) => sink.error(
                    name.pos,
                    format!(
                        "provider {} already defined (first at line {line})",
                        name.value
                    ),
                ),
                None => {
                    seen.insert(name.value.clone(), name.pos.line);
                }
            }
        }
        let mut listed: HashMap<&str, usize> = HashMap::new();
        let mut images = Vec::new();
        for image in &provider.diskimages {
            let Some(name) = &image.name else { continue };
            match abstract_by_name.get(name.value.as_str()) {
                None => sink.error(
                    name.pos,
                    format!(
                        "diskimage {} in provider {provider_name} is not defined in the main diskimages list",
                        name.value
                    ),
                ),
                Some(true) => sink.error(
                    name.pos,
                    format!(
                        "diskimage {} in provider {provider_name} is abstract; only concrete diskimages can be uploaded",
                        name.value
                    ),
                ),
                Some(false) => {}
            }
            if let Some(line) = listed.get(name.value.as_str()) {
                sink.error(
                    name.pos,
                    format!(
                        "diskimage {} is listed twice in provider {provider_name} (first at line {line})",
                        name.value
                    ),
                );
                continue;
            }
            listed.insert(&name.value, name.pos.line);
            images.push(ProviderDiskImage {
                name: name.value.clone(),
                pause: image.pause.unwrap_or(false),
                meta: image.meta.clone().unwrap_or_default(),
                aws: image.aws.clone(),
            });
        }
        let Some(driver) = provider.driver else {
            continue;
        };
        providers.push(Provider {
            name: provider_name.to_owned(),
            driver,
            rate: provider.rate.unwrap_or(defaults::RATE),
            image_name_format: provider
                .image_name_format
                .unwrap_or_else(|| defaults::IMAGE_NAME_FORMAT.to_owned()),
            image_upload_timeout: provider
                .image_upload_timeout
                .unwrap_or(defaults::IMAGE_UPLOAD_TIMEOUT),
            post_upload_hook: provider.post_upload_hook,
            diskimages: images,
        });
    }
    providers
}
