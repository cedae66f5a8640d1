//! The fuzz targets' properties under proptest, on the stable toolchain:
//! short runs with a fixed seed, so CI checks on every change what
//! `tools/fuzz.sh` checks for minutes under libFuzzer and AddressSanitizer.
//! Each property is the same function the fuzz target calls
//! (`tests::fuzz::{balloon,api,loader,layout,legacy}::run`), which panics when
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

/// Routes (method and path index in `tests::fuzz::api`'s lists) and the
/// fields their bodies take.
const ROUTES: &[(u8, u8, &[&str])] = &[
    (
        1,
        2,
        &[
            "vcpu_count",
            "mem_size_mib",
            "smt",
            "track_dirty_pages",
            "huge_pages",
            "cpu_template",
        ],
    ),
    (
        2,
        2,
        &[
            "vcpu_count",
            "mem_size_mib",
            "smt",
            "track_dirty_pages",
            "huge_pages",
            "cpu_template",
        ],
    ),
    (1, 3, &["kernel_image_path", "initrd_path", "boot_args"]),
    (
        1,
        4,
        &[
            "amount_mib",
            "deflate_on_oom",
            "stats_polling_interval_s",
            "free_page_hinting",
            "free_page_reporting",
        ],
    ),
    (2, 4, &["amount_mib"]),
    (2, 5, &["stats_polling_interval_s"]),
    (1, 6, &["action_type"]),
    (2, 7, &["state"]),
    (1, 9, &["metrics_path"]),
    (
        1,
        10,
        &[
            "log_path",
            "level",
            "show_level",
            "show_log_origin",
            "module",
        ],
    ),
    (0, 0, &[]),
    (0, 2, &[]),
    (0, 4, &[]),
    (0, 5, &[]),
    (0, 8, &[]),
    (0, 11, &[]),
];

fn field_value(name: &'static str) -> BoxedStrategy<serde_json::Value> {
    use serde_json::json;
    match name {
        "vcpu_count" => (0u64..40).prop_map(|v| json!(v)).boxed(),
        "mem_size_mib" | "amount_mib" => prop_oneof![
            (0u64..1024).prop_map(|v| json!(v)),
            (0u64..64).prop_map(|v| json!(v * 2)),
            any::<u64>().prop_map(|v| json!(v)),
        ]
        .boxed(),
        "stats_polling_interval_s" => (0u64..4).prop_map(|v| json!(v)).boxed(),
        "huge_pages" => prop::sample::select(vec!["None", "2M", "1G", ""])
            .prop_map(|v| json!(v))
            .boxed(),
        "cpu_template" => prop::sample::select(vec!["None", "T2"])
            .prop_map(|v| json!(v))
            .boxed(),
        "action_type" => prop::sample::select(vec![
            "InstanceStart",
            "SendCtrlAltDel",
            "FlushMetrics",
            "Reboot",
        ])
        .prop_map(|v| json!(v))
        .boxed(),
        "state" => prop::sample::select(vec!["Paused", "Resumed", "Stopped"])
            .prop_map(|v| json!(v))
            .boxed(),
        "level" => prop::sample::select(vec!["Info", "debug", "OFF", "loud"])
            .prop_map(|v| json!(v))
            .boxed(),
        "smt"
        | "track_dirty_pages"
        | "deflate_on_oom"
        | "free_page_hinting"
        | "free_page_reporting"
        | "show_level"
        | "show_log_origin" => any::<bool>().prop_map(|v| json!(v)).boxed(),
        _ => "[a-z/]{0,6}".prop_map(|v| json!(v)).boxed(),
    }
}

/// One call in the api target's calls mode: a route, a body of some of
/// its fields (sometimes a foreign one), encoded as the target reads it.
fn api_call() -> impl Strategy<Value = Vec<u8>> {
    (0..ROUTES.len(), any::<u64>(), any::<bool>())
        .prop_flat_map(|(r, pick, foreign)| {
            let (m, p, fields) = ROUTES[r];
            let mut chosen: Vec<&'static str> = fields
                .iter()
                .enumerate()
                .filter(|(i, _)| pick >> i & 1 == 1)
                .map(|(_, f)| *f)
                .collect();
            if foreign {
                chosen.push(["amount_mib", "vcpu_count", "state"][(pick >> 60) as usize % 3]);
            }
            let values: Vec<_> = chosen.iter().map(|f| field_value(f)).collect();
            (Just((m, p, chosen)), values)
        })
        .prop_map(|((m, p, names), values)| {
            let body: serde_json::Map<String, serde_json::Value> =
                names.into_iter().map(String::from).zip(values).collect();
            let body = if body.is_empty() && m == 0 {
                Vec::new()
            } else {
                serde_json::Value::Object(body).to_string().into_bytes()
            };
            let mut b = vec![m, p];
            b.extend_from_slice(&(body.len() as u16).to_le_bytes());
            b.extend_from_slice(&body);
            b
        })
}

#[test]
fn api_properties() {
    check("api", 256, 1024, tests::fuzz::api::run);
    // Calls mode with well-formed bodies of random field values.
    let mut runner = TestRunner::new(Config {
        cases: 256,
        rng_seed: RngSeed::Fixed(SEED),
        failure_persistence: None,
        ..Config::default()
    });
    let calls = prop::collection::vec(api_call(), 1..16).prop_map(|cs| {
        let mut b = vec![1u8];
        for c in cs {
            b.extend_from_slice(&c);
        }
        b
    });
    let result = runner.run(&calls, |data| {
        std::panic::catch_unwind(|| tests::fuzz::api::run(&data))
            .map_err(|e| TestCaseError::fail(panic_text(&e)))
    });
    if let Err(e) = result {
        panic!("api calls: property failed (seed {SEED:#x}): {e}");
    }
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

#[test]
fn legacy_io_properties() {
    check("legacy_io", 256, 256, tests::fuzz::legacy::run);
}

#[test]
fn legacy_io_corpus_replays() {
    replay("legacy_io", tests::fuzz::legacy::run);
}
