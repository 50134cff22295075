//! The configuration loader: a main and a secure file, separated by one NUL byte.
//! The properties are in `tests/fuzz/checks.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = checks::config_secure(data);
});
