//! Fuzz target `layout`: see `tests::fuzz::layout` for what it drives and the
//! properties it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz::layout::run(data));
