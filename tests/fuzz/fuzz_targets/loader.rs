//! Fuzz target `loader`: see `tests::fuzz::loader` for what it drives and the
//! properties it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz::loader::run(data));
