//! The configuration loader: any text as the main file.
//! The properties are in `tests/fuzz/checks.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = checks::config_main(data);
});
