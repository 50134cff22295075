//! The positional znode path parser: any text as a path under /nodepool/images.
//! The properties are in `tests/fuzz/checks.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = checks::znode_path(data);
});
