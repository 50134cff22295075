//! The upload record reader: any bytes as the data of an upload znode.
//! The properties are in `tests/fuzz/checks.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = checks::upload_record(data);
});
