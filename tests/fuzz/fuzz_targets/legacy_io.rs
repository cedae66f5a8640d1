//! Fuzz target `legacy_io`: see `tests::fuzz::legacy` for what it drives and
//! the properties it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz::legacy::run(data));
