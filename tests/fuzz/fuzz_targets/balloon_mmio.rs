//! Fuzz target `balloon_mmio`: see `tests::fuzz::balloon` for what it drives and the
//! properties it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz::balloon::run(data));
