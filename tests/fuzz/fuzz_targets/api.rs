//! Fuzz target `api`: see `tests::fuzz::api` for what it drives and the
//! properties it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz::api::run(data));
