//! The fuzz targets' properties under proptest, on the stable toolchain:
//! short runs with a fixed seed, so CI checks on every change what
//! `tools/fuzz.sh` checks for minutes under libFuzzer and AddressSanitizer.
//! Each property is the same function the fuzz target calls
//! (`tests::fuzz::{balloon,api,loader,layout}::run`), which panics when
//! the property fails; none needs `/dev/kvm`.
//!
//! Inputs are made the way a fuzzer makes them: a committed seed
//! (`tests/fuzz/seeds/<target>/`, well-formed inputs) with random bytes
//! overwritten, inserted and appended, or random bytes alone. A second test
//! per target replays every committed corpus entry and crash reproducer
//! (`tests/fuzz/corpus/<target>/`, `tests/fuzz/artifacts/<target>/`), so
//! each crash the fuzzer ever found stays a regression test here.
//!
//! `balloon_mmio` guards the rule `balloon_reserved_low`
//! (`guest-mm/src/mutation.rs`): it fails within a few cases with the rule
//! broken (`tools/src/mutation.rs` lists it as a detector).

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

/// The fixed seed of every run here.
const SEED: u64 = 0xf022_5eed;

fn dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target)
}

/// The files of `tests/fuzz/<kind>/<target>/`, sorted (none if absent).
fn files(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(dir(kind, target)) else {
        return Vec::new();
    };
    let mut v: Vec<(String, Vec<u8>)> = rd
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .map(|e| {
            let p = e.path();
            let b = std::fs::read(&p).expect("readable corpus file");
            (p.display().to_string(), b)
        })
        .collect();
    v.sort();
    v
}

/// A seed with random edits, or random bytes.
fn inputs(seeds: Vec<Vec<u8>>, max: usize) -> impl Strategy<Value = Vec<u8>> {
    assert!(!seeds.is_empty(), "no committed seeds");
    let n = seeds.len();
    let edited = (
        0..n,
        prop::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 0..12),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(move |(i, edits, tail)| {
            let mut b = seeds[i].clone();
            for (at, v, how) in edits {
                let at = usize::from(at) % (b.len() + 1);
                match how {
                    0 if at < b.len() => b[at] = v,
                    1 => b.insert(at, v),
                    _ if at < b.len() => {
                        b.remove(at);
                    }
                    _ => b.push(v),
                }
            }
            b.extend_from_slice(&tail);
            b
        });
    prop_oneof![
        4 => edited,
        1 => prop::collection::vec(any::<u8>(), 0..max),
    ]
}

/// Runs `property` on `cases` generated inputs of `target`.
fn check(target: &str, cases: u32, max: usize, property: fn(&[u8])) {
    let seeds: Vec<Vec<u8>> = files("seeds", target).into_iter().map(|(_, b)| b).collect();
    let mut runner = TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(SEED),
        failure_persistence: None,
        ..Config::default()
    });
    // Every seed as is, first.
    for s in &seeds {
        property(s);
    }
    let result = runner.run(&inputs(seeds, max), |data| {
        std::panic::catch_unwind(|| property(&data))
            .map_err(|e| TestCaseError::fail(panic_text(&e)))
    });
    if let Err(e) = result {
        panic!("{target}: property failed (seed {SEED:#x}): {e}");
    }
}

fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Replays the committed corpus and reproducers of `target`.
fn replay(target: &str, property: fn(&[u8])) {
    let mut n = 0;
    for kind in ["corpus", "artifacts"] {
        for (path, data) in files(kind, target) {
            if path.ends_with(".md") {
                continue;
            }
            if let Err(e) = std::panic::catch_unwind(|| property(&data)) {
                panic!("{target}: {path} fails: {}", panic_text(&e));
            }
            n += 1;
        }
    }
    tests::loud!("{target}: replayed {n} committed corpus entries and reproducers");
}

#[test]
fn balloon_mmio_properties() {
    check("balloon_mmio", 96, 512, tests::fuzz::balloon::run);
}

#[test]
fn balloon_mmio_corpus_replays() {
    replay("balloon_mmio", tests::fuzz::balloon::run);
}

#[test]
fn api_properties() {
    check("api", 256, 1024, tests::fuzz::api::run);
}

#[test]
fn api_corpus_replays() {
    replay("api", tests::fuzz::api::run);
}

#[test]
fn loader_properties() {
    check("loader", 128, 1024, tests::fuzz::loader::run);
}

#[test]
fn loader_corpus_replays() {
    replay("loader", tests::fuzz::loader::run);
}

#[test]
fn layout_properties() {
    check("layout", 256, 64, tests::fuzz::layout::run);
}

#[test]
fn layout_corpus_replays() {
    replay("layout", tests::fuzz::layout::run);
}
