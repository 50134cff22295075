//! The build record reader: any bytes as the data of a build znode.
//! The properties are in `tests/fuzz/checks.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = checks::build_record(data);
});
