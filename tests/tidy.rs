//! House rules checked by reading the source: every file under `src/` opens with a `//!`
//! module essay, and only `src/thread.rs` starts threads (style.md §3 and §5; clippy's
//! `disallowed-methods` checks the second rule too, but only when clippy runs); the code map
//! in `src/lib.rs` and the helper map in `tests/util/mod.rs` list every file (and every
//! public test helper); `rust-version` is what the locked crates need.

use std::path::{Path, PathBuf};

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file below `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
                .path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn relative(path: &Path) -> String {
    path.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn every_src_file_starts_with_a_module_doc() {
    let files = rust_files(&src_dir());
    assert!(files.len() > 3, "found only {files:?}");
    let offenders = files
        .iter()
        .filter(|path| {
            let text = std::fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            !text.starts_with("//!")
        })
        .map(|path| relative(path))
        .collect::<Vec<_>>();
    assert!(
        offenders.is_empty(),
        "these files do not start with a `//!` module doc: {offenders:?}"
    );
}

/// Code (not comments) of a line, with string literals left in: good enough for a scan.
fn code_of(line: &str) -> &str {
    let trimmed = line.trim_start();
    if trimmed.starts_with("//") {
        return "";
    }
    match line.find("// ") {
        Some(index) => &line[..index],
        None => line,
    }
}

/// The ways of starting a thread that must appear only in `src/thread.rs`.
fn spawn_violations(text: &str) -> Vec<String> {
    const ALWAYS: [&str; 6] = [
        "std::thread::spawn",
        "std::thread::Builder",
        "thread::Builder",
        "std::thread::scope",
        "use std::thread::spawn",
        "use std::thread::{",
    ];
    // With `use std::thread;` a bare `thread::spawn(` is std's; with `use crate::thread` it
    // is ours, which is fine.
    let imports_std_thread = text.lines().map(code_of).any(|code| {
        let code = code.trim();
        code == "use std::thread;" || (code.starts_with("use std::{") && code.contains(" thread"))
    });
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let code = code_of(line);
        for pattern in ALWAYS {
            // `use std::thread::{...}` is fine unless it imports spawn, Builder or scope.
            if pattern == "use std::thread::{" {
                if code.contains(pattern)
                    && ["spawn", "Builder", "scope"]
                        .iter()
                        .any(|name| code.contains(name))
                {
                    found.push(format!("line {}: {}", number + 1, line.trim()));
                }
                continue;
            }
            if code.contains(pattern) {
                found.push(format!("line {}: {}", number + 1, line.trim()));
            }
        }
        if imports_std_thread
            && code.contains("thread::spawn(")
            && !code.contains("crate::thread::spawn(")
        {
            found.push(format!("line {}: {}", number + 1, line.trim()));
        }
    }
    found.dedup();
    found
}

#[test]
fn only_thread_rs_spawns_threads() {
    let thread_rs = src_dir().join("thread.rs");
    let mut offenders = Vec::new();
    for path in rust_files(&src_dir()) {
        if path == thread_rs {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for violation in spawn_violations(&text) {
            offenders.push(format!("{}: {violation}", relative(&path)));
        }
    }
    assert!(
        offenders.is_empty(),
        "threads must be started with crate::thread::spawn (src/thread.rs), found:\n{}",
        offenders.join("\n")
    );
    // The scan itself must see what it is meant to see.
    let std_text = std::fs::read_to_string(&thread_rs).unwrap();
    assert!(
        !spawn_violations(&std_text).is_empty(),
        "the scan no longer finds thread.rs's own spawn"
    );
}

#[test]
fn the_spawn_scan_tells_ours_from_std() {
    assert!(spawn_violations("fn f() { std::thread::spawn(|| ()); }").len() == 1);
    assert!(spawn_violations("use std::thread;\nfn f() { thread::spawn(|| ()); }").len() == 1);
    assert!(spawn_violations("use std::thread::{sleep, spawn};").len() == 1);
    assert!(spawn_violations("let b = std::thread::Builder::new();").len() == 1);
    assert!(
        spawn_violations(
            "use crate::thread::{self, ThreadKind};\nthread::spawn(ThreadKind::Other, \"x\", f);"
        )
        .is_empty()
    );
    assert!(spawn_violations("use std::thread;\ncrate::thread::spawn(ThreadKind::Other, \"x\", f);\nthread::sleep(d);").is_empty());
    assert!(spawn_violations("// std::thread::spawn is forbidden here").is_empty());
}

/// `rust-version` in Cargo.toml says what building really needs: the newest `rust-version`
/// of the locked crates (dev-dependencies included: `cargo test` builds them), and at least
/// 1.88 for the let-chains the code uses. A fresh machine's check (`scripts/quickstart.sh`)
/// reads it, so a stale value sends people off with a toolchain that cannot build us.
#[test]
fn rust_version_is_what_the_code_and_the_locked_crates_need() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    let mut ours = None;
    let mut needed = (parse("1.88"), "let-chains in our code".to_string());
    for p in meta["packages"].as_array().unwrap() {
        let Some(rv) = p["rust_version"].as_str() else {
            continue;
        };
        if p["name"] == env!("CARGO_PKG_NAME") {
            ours = Some(parse(rv));
        } else if parse(rv) > needed.0 {
            needed = (parse(rv), format!("{} {}", p["name"], p["version"]));
        }
    }
    let ours = ours.expect("Cargo.toml sets rust-version");
    let trim = |v: &[u32]| v.iter().rev().skip_while(|&&x| x == 0).count();
    assert_eq!(
        ours[..trim(&ours)],
        needed.0[..trim(&needed.0)],
        "rust-version should be what {} needs",
        needed.1
    );
}

/// The code map at the top of `src/lib.rs` has one line per entry of `src/` (a file's stem or
/// a directory's name), in the same order: a newcomer finds any concern's home in one step,
/// and a new module cannot be left out of the map.
#[test]
fn the_code_map_in_lib_rs_lists_every_entry_of_src() {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).unwrap();
    let start = lib.find("//! # Code map").expect("lib.rs has a code map");
    let end = start
        + lib[start..]
            .find("//! # Architecture")
            .expect("the map ends");
    let mapped: Vec<String> = lib[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("//! * `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(name, _)| name.trim_end_matches(".rs").to_string())
        .collect();
    let mut entries: Vec<String> = std::fs::read_dir(src_dir())
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.trim_end_matches(".rs").to_string()
        })
        .collect();
    entries.sort();
    assert_eq!(mapped, entries, "src/lib.rs's code map against `ls src`");
}

/// The names of the top-level `pub` items of a Rust file (functions, types, constants), in
/// file order. A scan of rustfmt-formatted text: items start at column 0.
fn public_items(text: &str) -> Vec<String> {
    const KINDS: [&str; 7] = [
        "fn ", "struct ", "enum ", "const ", "static ", "type ", "trait ",
    ];
    text.lines()
        .filter_map(|line| line.strip_prefix("pub "))
        .filter_map(|rest| KINDS.iter().find_map(|kind| rest.strip_prefix(kind)))
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// The helper map in `tests/util/mod.rs` has one line per file of `tests/util` (in `ls`
/// order, `mod.rs` first) and, below it, one line per public item of that file: a test
/// author finds every helper in one place, and a new one cannot be left out of the map.
#[test]
fn the_helper_map_in_util_lists_every_file_and_public_helper() {
    let util = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/util");
    let mod_rs = std::fs::read_to_string(util.join("mod.rs")).unwrap();
    let start = mod_rs
        .find("//! # Helper map")
        .expect("tests/util/mod.rs has a helper map");
    let mut mapped: Vec<(String, Vec<String>)> = Vec::new();
    for line in mod_rs[start..].lines().take_while(|l| l.starts_with("//!")) {
        if let Some(entry) = line.strip_prefix("//! * ") {
            let name = entry
                .trim_start_matches("[`")
                .trim_start_matches('`')
                .split('`')
                .next()
                .unwrap_or_default();
            mapped.push((name.trim_end_matches(".rs").to_string(), Vec::new()));
        } else if let Some(entry) = line.strip_prefix("//!   - [`") {
            let path = entry.split('`').next().unwrap_or_default();
            let (module, items) = mapped
                .last_mut()
                .unwrap_or_else(|| panic!("an item before any file in the map: {line}"));
            // mod.rs's own items are bare names, every other file's are `file::item`.
            let item = if module == "mod" {
                path.to_string()
            } else {
                path.strip_prefix(&format!("{module}::"))
                    .map_or_else(|| format!("{path} (not under {module}::)"), str::to_string)
            };
            items.push(item);
        }
    }
    let mut stems: Vec<String> = std::fs::read_dir(&util)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .filter(|stem| stem != "mod")
        .collect();
    stems.sort();
    stems.insert(0, "mod".to_string());
    let actual: Vec<(String, Vec<String>)> = stems
        .into_iter()
        .map(|stem| {
            let text = std::fs::read_to_string(util.join(format!("{stem}.rs"))).unwrap();
            let mut items = public_items(&text);
            items.sort();
            (stem, items)
        })
        .collect();
    for (_, items) in &mut mapped {
        items.sort();
    }
    let files = |map: &[(String, Vec<String>)]| map.iter().map(|(f, _)| f.clone()).collect();
    let (mapped_files, actual_files): (Vec<String>, Vec<String>) = (files(&mapped), files(&actual));
    assert_eq!(
        mapped_files, actual_files,
        "the files in tests/util/mod.rs's helper map against `ls tests/util`"
    );
    let mut wrong = Vec::new();
    for ((file, listed), (_, items)) in mapped.iter().zip(&actual) {
        for item in items.iter().filter(|i| !listed.contains(i)) {
            wrong.push(format!("{file}.rs: pub {item} is not in the map"));
        }
        for item in listed.iter().filter(|i| !items.contains(i)) {
            wrong.push(format!(
                "{file}.rs: the map lists {item}, the file has no such pub item"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "tests/util/mod.rs's helper map is out of date:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_public_item_scan_sees_functions_types_and_constants() {
    let text = "pub fn a() {}\npub struct B<'a>;\npub(crate) fn c() {}\n    pub fn d() {}\n\
                pub const E: u8 = 1;\npub enum F {}\npub mod g;\nfn h() {}\n";
    assert_eq!(public_items(text), ["a", "B", "E", "F"]);
}
