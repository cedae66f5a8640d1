//! `gmm mutation`: every detector run against the bug it exists for.
//!
//! guest-mm's test-only feature `mutation` lets `GMM_BREAK_RULE=<rule>` break
//! one invariant in a process (`guest_mm::mutation::Rule`). This command
//! builds the detectors with that feature (test binaries, the loom models in
//! their own target directory, and `gmm` itself for `stress-vm`), then:
//!
//! 1. runs every detector once with **no** rule broken: each must pass, or
//!    its failures under a broken rule would mean nothing (exit status 1);
//! 2. breaks each rule in turn and runs every detector that claims it
//!    ([`MATRIX`]); a run *catches* the rule when the detector fails (a
//!    non-zero exit or a signal; a run that hits the timeout does not count).
//!
//! A rule is *undetected* when any detector that claims it caught it in none
//! of its runs; the command exits 1 then. `--quick` runs only the detectors
//! marked fast, once each (what CI runs); the full run repeats the
//! stochastic detectors (`--runs`). Each run's output is kept in
//! `target/mutation/logs/` for reading why a detector fired.
//!
//! The runner itself is an ordinary build: only what it runs carries the
//! feature, so the switches never exist in a normal binary.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_mm::mutation::Rule;
use serde::Serialize;

/// Options of `gmm mutation`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only the detectors marked fast, one run each (the CI version).
    #[arg(long)]
    pub quick: bool,
    /// Runs of each stochastic detector (stress, stress-vm, fuzzer) per rule
    /// in the full version.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,
    /// Only these rules (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    pub rules: Vec<String>,
    /// Kill a detector run after this many seconds (it then does not count
    /// as a catch).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// The workspace to build (default: found from the current directory).
    #[arg(long)]
    pub workspace: Option<PathBuf>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// How a detector is run.
#[derive(Debug, Clone, Copy)]
enum Run {
    /// An integration-test binary of a package (`tests/<target>.rs`), with a
    /// name filter (empty: all its tests).
    Test {
        package: &'static str,
        target: &'static str,
        filter: &'static str,
    },
    /// A package's unit tests, with a name filter.
    Lib {
        package: &'static str,
        filter: &'static str,
    },
    /// A loom model of guest-mm (`tests/loom.rs`), by exact test name.
    Loom { test: &'static str },
    /// `gmm` built with the feature, with these arguments.
    Gmm { args: &'static [&'static str] },
}

/// One detector: a name for the table and how to run it.
#[derive(Debug, Clone, Copy)]
struct Detector {
    name: &'static str,
    run: Run,
    /// Random or timing-dependent: repeated in the full version.
    stochastic: bool,
}

const GM_STRESS: Detector = Detector {
    name: "guest-mm stress",
    run: Run::Test {
        package: "guest-mm",
        target: "stress",
        filter: "",
    },
    stochastic: true,
};
const GM_ORACLE: Detector = Detector {
    name: "guest-mm oracle",
    run: Run::Test {
        package: "guest-mm",
        target: "oracle",
        filter: "",
    },
    stochastic: false,
};
const GM_RACING: Detector = Detector {
    name: "guest-mm racing",
    run: Run::Test {
        package: "guest-mm",
        target: "racing",
        filter: "",
    },
    stochastic: false,
};
const GM_BASIC: Detector = Detector {
    name: "guest-mm basic",
    run: Run::Test {
        package: "guest-mm",
        target: "basic",
        filter: "",
    },
    stochastic: false,
};
const LOOM_WALKER: Detector = Detector {
    name: "loom walker_vs_unmap_vs_deferred_free",
    run: Run::Loom {
        test: "walker_vs_unmap_vs_deferred_free",
    },
    stochastic: false,
};
const LOOM_ARENA: Detector = Detector {
    name: "loom arena_walk_vs_remove_and_remap",
    run: Run::Loom {
        test: "arena_walk_vs_remove_and_remap",
    },
    stochastic: false,
};
const LOOM_RACING: Detector = Detector {
    name: "loom racing_unmappers_complete_only_after_release",
    run: Run::Loom {
        test: "racing_unmappers_complete_only_after_release",
    },
    stochastic: false,
};
const LOOM_SHOOTDOWN: Detector = Detector {
    name: "loom cache_shootdown_vs_release",
    run: Run::Loom {
        test: "cache_shootdown_vs_release",
    },
    stochastic: false,
};
const GM_FAULT_RACE: Detector = Detector {
    name: "guest-mm fault_race",
    run: Run::Test {
        package: "guest-mm",
        target: "fault_race",
        filter: "",
    },
    stochastic: true,
};
const LOOM_FAULT_UNMAP: Detector = Detector {
    name: "loom fault_commit_vs_unmap",
    run: Run::Loom {
        test: "fault_commit_vs_unmap",
    },
    stochastic: false,
};
const LOOM_FAULT_REDISCARD: Detector = Detector {
    name: "loom fault_commit_vs_rediscard",
    run: Run::Loom {
        test: "fault_commit_vs_rediscard",
    },
    stochastic: false,
};
const LOOM_FAULT_SPLIT: Detector = Detector {
    name: "loom fault_commit_vs_split",
    run: Run::Loom {
        test: "fault_commit_vs_split",
    },
    stochastic: false,
};
const LOOM_LEAF_CACHE: Detector = Detector {
    name: "loom leaf_cache_vs_unlink_and_free",
    run: Run::Loom {
        test: "leaf_cache_vs_unlink_and_free",
    },
    stochastic: false,
};
const GM_REGISTER: Detector = Detector {
    name: "guest-mm register_unblocked",
    run: Run::Test {
        package: "guest-mm",
        target: "register_unblocked",
        filter: "",
    },
    stochastic: false,
};
const GM_FAILINJ: Detector = Detector {
    name: "guest-mm failinj",
    run: Run::Test {
        package: "guest-mm",
        target: "failinj",
        filter: "",
    },
    stochastic: false,
};

const GM_FALLBACK: Detector = Detector {
    name: "guest-mm fallback",
    run: Run::Test {
        package: "guest-mm",
        target: "fallback",
        filter: "",
    },
    stochastic: false,
};
const GM_WALK_CACHE: Detector = Detector {
    name: "guest-mm walk_cache",
    run: Run::Test {
        package: "guest-mm",
        target: "walk_cache",
        filter: "",
    },
    stochastic: false,
};
/// A test run killed outright: the `vmm` its test started must die too.
const KILLED_TEST_RUN: Detector = Detector {
    name: "tests service a_killed_test_run",
    run: Run::Test {
        package: "tests",
        target: "service",
        filter: "a_killed_test_run_leaves_no_vmm_running",
    },
    stochastic: false,
};
/// `gmm bench service` killed outright: its `vmm` must die too.
const KILLED_BENCH: Detector = Detector {
    name: "tools gmm_cli a_killed_bench",
    run: Run::Test {
        package: "tools",
        target: "gmm_cli",
        filter: "a_killed_bench_leaves_no_vm_running",
    },
    stochastic: false,
};
/// `gmm stress-vm`'s arguments as a detector: a short run, with `extra`
/// before `--json`.
macro_rules! stress_vm_args {
    ($($extra:literal),*) => {
        &["stress-vm", "--seconds", "3", "--mem", "64M", "--vcpus", "2", $($extra,)* "--json"]
    };
}
const STRESS_VM: Detector = Detector {
    name: "stress-vm",
    run: Run::Gmm {
        args: stress_vm_args!(),
    },
    stochastic: true,
};
/// `stress-vm` at 2 MiB leaves: the device threads' translation caches
/// hold pages (2 MiB leaves, and 4 KiB pages of split ones found by walks),
/// which at 4 KiB leaves they never do (the leaf arena's one load answers
/// every present page live).
const STRESS_VM_2M: Detector = Detector {
    name: "stress-vm 2M",
    run: Run::Gmm {
        args: stress_vm_args!("--page-size", "2M"),
    },
    stochastic: true,
};
const BALLOON_FUZZ: Detector = Detector {
    name: "balloon fuzzer",
    run: Run::Test {
        package: "tests",
        target: "balloon_fuzz",
        filter: "",
    },
    stochastic: true,
};
const BAD_INPUT: Detector = Detector {
    name: "balloon bad-input",
    run: Run::Test {
        package: "tests",
        target: "balloon_bad_input",
        filter: "",
    },
    stochastic: false,
};
const FUZZ_PROPS: Detector = Detector {
    name: "balloon_mmio fuzz property",
    run: Run::Test {
        package: "tests",
        target: "fuzz_props",
        filter: "balloon_mmio_properties",
    },
    stochastic: false,
};
const LEGACY_FUZZ_PROPS: Detector = Detector {
    name: "legacy_io fuzz property",
    run: Run::Test {
        package: "tests",
        target: "fuzz_props",
        filter: "legacy_io_properties",
    },
    stochastic: false,
};
const LEGACY_UNIT: Detector = Detector {
    name: "vmm legacy device unit tests",
    run: Run::Lib {
        package: "vmm",
        filter: "devices::legacy",
    },
    stochastic: false,
};
const VIRTIO_UNIT: Detector = Detector {
    name: "vmm virtio unit tests",
    run: Run::Lib {
        package: "vmm",
        filter: "devices::virtio",
    },
    stochastic: false,
};

/// A detector that claims a rule; `fast` ones run in `--quick` (CI).
#[derive(Debug, Clone, Copy)]
struct Claim {
    detector: Detector,
    fast: bool,
}

const fn fast(detector: Detector) -> Claim {
    Claim {
        detector,
        fast: true,
    }
}
const fn full(detector: Detector) -> Claim {
    Claim {
        detector,
        fast: false,
    }
}

/// Which detectors claim which rule. Every rule has at least one fast one.
const MATRIX: &[(Rule, &[Claim])] = &[
    (
        Rule::GracePeriod,
        &[
            fast(LOOM_WALKER),
            fast(LOOM_ARENA),
            fast(GM_STRESS),
            fast(GM_ORACLE),
            fast(STRESS_VM),
        ],
    ),
    (
        Rule::CacheShootdown,
        &[
            fast(LOOM_SHOOTDOWN),
            fast(GM_BASIC),
            fast(GM_STRESS),
            fast(STRESS_VM_2M),
        ],
    ),
    (
        Rule::LeafCacheUnlink,
        &[fast(GM_WALK_CACHE), fast(LOOM_LEAF_CACHE)],
    ),
    (Rule::PendingWait, &[fast(LOOM_RACING), fast(GM_RACING)]),
    (
        Rule::UnhookOrder,
        &[
            fast(GM_ORACLE),
            fast(GM_STRESS),
            full(LOOM_WALKER),
            full(LOOM_ARENA),
            full(GM_BASIC),
        ],
    ),
    (
        Rule::DeferredFree,
        &[
            fast(LOOM_WALKER),
            fast(GM_STRESS),
            // Not `dir_cache_vs_leaf_unlink_and_free` any more: it unlinks a
            // leaf table, and leaf pages live in the leaf arena, never freed.
            full(LOOM_FAULT_UNMAP),
        ],
    ),
    (
        Rule::BalloonBounds,
        // Not the balloon_mmio fuzz property: a PFN past RAM that the
        // broken check lets through is refused further down (the table
        // does not map it), so its safety oracle sees nothing.
        &[fast(BAD_INPUT), fast(BALLOON_FUZZ), fast(VIRTIO_UNIT)],
    ),
    (
        Rule::BalloonReservedLow,
        &[
            fast(BAD_INPUT),
            fast(BALLOON_FUZZ),
            fast(VIRTIO_UNIT),
            fast(FUZZ_PROPS),
        ],
    ),
    (
        Rule::DescLength,
        &[fast(VIRTIO_UNIT), fast(BAD_INPUT), fast(BALLOON_FUZZ)],
    ),
    (
        Rule::DescAddress,
        &[fast(VIRTIO_UNIT), fast(BAD_INPUT), fast(BALLOON_FUZZ)],
    ),
    (
        Rule::FaultCas,
        &[
            fast(LOOM_FAULT_UNMAP),
            fast(LOOM_FAULT_SPLIT),
            fast(GM_FAULT_RACE),
        ],
    ),
    (Rule::RegisterUnblocked, &[fast(GM_REGISTER)]),
    (Rule::UnreleasedRecord, &[fast(GM_FAILINJ)]),
    (
        Rule::FaultSeq,
        &[fast(GM_BASIC), fast(LOOM_FAULT_REDISCARD)],
    ),
    (
        Rule::LeafClear,
        &[
            fast(GM_STRESS),
            fast(GM_WALK_CACHE),
            fast(GM_ORACLE),
            full(LOOM_ARENA),
        ],
    ),
    (Rule::LeafNotes, &[fast(GM_FALLBACK), fast(GM_ORACLE)]),
    (Rule::ArenaReadable, &[fast(GM_WALK_CACHE)]),
    // With the old one-load test (LARGE too), both pass with the rule
    // broken: the poisoned entry went to the slow walk.
    (Rule::LeafKept, &[fast(GM_WALK_CACHE), fast(GM_ORACLE)]),
    (
        Rule::ChildDiesWithParent,
        &[fast(KILLED_TEST_RUN), fast(KILLED_BENCH)],
    ),
    (
        Rule::KbdBufferBound,
        &[fast(LEGACY_FUZZ_PROPS), fast(LEGACY_UNIT)],
    ),
    (
        Rule::PortSplit,
        &[fast(LEGACY_FUZZ_PROPS), fast(LEGACY_UNIT)],
    ),
];

/// One (rule, detector) row of the JSON.
#[derive(Serialize, Debug)]
struct RowJson {
    rule: &'static str,
    detector: &'static str,
    runs: u32,
    caught: u32,
    timeouts: u32,
    seconds: f64,
}

/// The no-rule run of one detector.
#[derive(Serialize, Debug)]
struct BaselineJson {
    detector: &'static str,
    runs: u32,
    passed: bool,
    seconds: f64,
}

/// The JSON line of `gmm mutation`.
#[derive(Serialize, Debug)]
struct MutationJson {
    tool: &'static str,
    quick: bool,
    rules: usize,
    undetected: usize,
    undetected_rules: Vec<&'static str>,
    baseline_failures: usize,
    baseline: Vec<BaselineJson>,
    results: Vec<RowJson>,
    seconds: f64,
}

/// Built executables: test binaries by (package, target), loom, gmm.
#[derive(Default)]
struct Built {
    tests: BTreeMap<(String, String), PathBuf>,
    libs: BTreeMap<String, PathBuf>,
    loom: Option<PathBuf>,
    gmm: Option<PathBuf>,
}

/// What one run of a detector did.
enum Outcome {
    Passed,
    Failed,
    TimedOut,
}

pub fn cmd(a: &Args) -> Result<()> {
    let t0 = Instant::now();
    let ws = match &a.workspace {
        Some(w) => w.clone(),
        None => find_workspace()?,
    };
    let rules = selected_rules(&a.rules)?;
    let plan: Vec<(Rule, Vec<Claim>)> = MATRIX
        .iter()
        .filter(|(r, _)| rules.contains(r))
        .map(|(r, claims)| {
            let c = claims
                .iter()
                .copied()
                .filter(|c| c.fast || !a.quick)
                .collect();
            (*r, c)
        })
        .collect();
    let mut detectors: Vec<Detector> = Vec::new();
    for (_, claims) in &plan {
        for c in claims {
            if !detectors.iter().any(|d| d.name == c.detector.name) {
                detectors.push(c.detector);
            }
        }
    }

    eprintln!(
        "gmm mutation: building {} detector(s) with the test-only `mutation` feature",
        detectors.len()
    );
    let built = build(&ws, &detectors)?;
    let logs = ws.join("target/mutation/logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let timeout = Duration::from_secs(a.timeout);

    // 1. Every detector passes with nothing broken.
    let mut baseline = Vec::new();
    for d in &detectors {
        let runs = if d.stochastic && !a.quick { a.runs } else { 1 };
        let t = Instant::now();
        let mut passed = true;
        for i in 0..runs {
            let log = logs.join(format!("none--{}--{i}.log", slug(d.name)));
            passed &= matches!(run_once(&built, d, None, &log, timeout)?, Outcome::Passed);
        }
        let seconds = t.elapsed().as_secs_f64();
        eprintln!(
            "  {:<22} {:<52} {}  ({seconds:.1} s)",
            "(nothing broken)",
            d.name,
            if passed {
                format!("passes {runs}/{runs}")
            } else {
                "FAILS with no rule broken".to_string()
            }
        );
        baseline.push(BaselineJson {
            detector: d.name,
            runs,
            passed,
            seconds,
        });
    }

    // 2. Each rule broken in turn.
    let mut results = Vec::new();
    let mut undetected_rules = Vec::new();
    for (rule, claims) in &plan {
        let mut missed = false;
        for c in claims {
            let d = c.detector;
            let runs = if d.stochastic && !a.quick { a.runs } else { 1 };
            let (mut caught, mut timeouts) = (0, 0);
            let t = Instant::now();
            for i in 0..runs {
                let log = logs.join(format!("{}--{}--{i}.log", rule.name(), slug(d.name)));
                match run_once(&built, &d, Some(*rule), &log, timeout)? {
                    Outcome::Failed => caught += 1,
                    Outcome::TimedOut => timeouts += 1,
                    Outcome::Passed => {}
                }
            }
            let seconds = t.elapsed().as_secs_f64();
            missed |= caught == 0;
            eprintln!(
                "  {:<22} {:<52} caught {caught}/{runs}{}  ({seconds:.1} s)",
                rule.name(),
                d.name,
                if timeouts > 0 {
                    format!(", {timeouts} timed out")
                } else {
                    String::new()
                }
            );
            results.push(RowJson {
                rule: rule.name(),
                detector: d.name,
                runs,
                caught,
                timeouts,
                seconds,
            });
        }
        if missed {
            undetected_rules.push(rule.name());
        }
    }

    let baseline_failures = baseline.iter().filter(|b| !b.passed).count();
    let report = MutationJson {
        tool: "mutation",
        quick: a.quick,
        rules: plan.len(),
        undetected: undetected_rules.len(),
        undetected_rules,
        baseline_failures,
        baseline,
        results,
        seconds: t0.elapsed().as_secs_f64(),
    };
    print_table(&report);
    crate::emit_json(a.json, &report)?;
    if report.baseline_failures > 0 {
        bail!(
            "{} detector(s) fail with no rule broken: fix them first (logs in {})",
            report.baseline_failures,
            logs.display()
        );
    }
    if report.undetected > 0 {
        bail!(
            "rule(s) not caught by every detector that claims them: {:?} (logs in {})",
            report.undetected_rules,
            logs.display()
        );
    }
    Ok(())
}

fn selected_rules(names: &[String]) -> Result<Vec<Rule>> {
    if names.is_empty() {
        return Ok(Rule::ALL.to_vec());
    }
    names
        .iter()
        .map(|n| {
            Rule::from_name(n).with_context(|| {
                let all: Vec<_> = Rule::ALL.iter().map(|r| r.name()).collect();
                format!("unknown rule {n:?}; rules: {}", all.join(", "))
            })
        })
        .collect()
}

/// The workspace root: the nearest ancestor of the current directory whose
/// Cargo.toml has a `[workspace]` table.
fn find_workspace() -> Result<PathBuf> {
    let mut dir = std::env::current_dir()?;
    loop {
        let toml = dir.join("Cargo.toml");
        if std::fs::read_to_string(&toml).is_ok_and(|s| s.contains("[workspace]")) {
            return Ok(dir);
        }
        if !dir.pop() {
            bail!("no cargo workspace above the current directory: run from the repository or pass --workspace");
        }
    }
}

fn slug(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// Every package's `mutation` feature. The detectors' builds select the
/// whole workspace with all of them, so that cargo resolves the
/// dependencies' features exactly as for the README's `cargo test
/// --workspace --release` and only the workspace's own crates differ.
const FEATURES: &str = "guest-mm/mutation,vmm/mutation,tests/mutation,tools/mutation";

/// Build what `detectors` need, with the feature, into `target/mutation`
/// (loom: `target/loom`, beside the loom models CI and the README build
/// there: a test binary is not copied out of `deps/`, so the two builds
/// share every dependency without overwriting each other), and find the
/// executables.
///
/// `target/mutation` cannot be the normal target directory: a feature
/// build of `vmm` or `gmm` would replace the binaries there that the
/// normal tests run. Instead it starts from a copy of the normal build's
/// dependencies ([`seed`]): with the same feature resolution they are
/// fresh, and only the workspace's crates compile (on 2 cores: about 60 s
/// against 160 s from nothing).
fn build(ws: &Path, detectors: &[Detector]) -> Result<Built> {
    let mut built = Built::default();
    let mut tests: Vec<&str> = Vec::new();
    let (mut lib, mut loom, mut gmm) = (false, false, false);
    for d in detectors {
        match d.run {
            Run::Test { target, .. } => {
                if !tests.contains(&target) {
                    tests.push(target);
                }
            }
            Run::Lib { .. } => lib = true,
            Run::Loom { .. } => loom = true,
            Run::Gmm { .. } => gmm = true,
        }
    }
    let target = ws.join("target/mutation");
    seed(ws, &target);
    let mut found = Vec::new();
    if gmm || !tests.is_empty() {
        // Integration tests and `gmm` in one build: with test targets in it
        // cargo resolves dev-dependencies as `cargo test` does.
        let mut args = vec!["build", "--release", "--workspace", "--features", FEATURES];
        if gmm {
            args.extend(["--bin", "gmm"]);
        }
        if !tests.is_empty() {
            // End-to-end tests start the `vmm` binary beside them.
            args.extend(["--bin", "vmm"]);
        }
        for t in &tests {
            args.extend(["--test", t]);
        }
        found.extend(cargo(ws, &target, &args, &[])?);
    }
    if lib {
        let args = [
            "test",
            "--release",
            "--no-run",
            "--workspace",
            "--features",
            FEATURES,
            "--lib",
        ];
        found.extend(cargo(ws, &target, &args, &[])?);
    }
    for a in found {
        if !a.test {
            if a.target == "gmm" && a.kinds.iter().any(|k| k == "bin") {
                built.gmm = Some(a.executable);
            }
            continue;
        }
        if a.kinds.iter().any(|k| k == "lib") {
            built.libs.insert(a.package.clone(), a.executable.clone());
        }
        if a.kinds.iter().any(|k| k == "test") {
            built.tests.insert((a.package, a.target), a.executable);
        }
    }
    if loom {
        let args = [
            "test",
            "--release",
            "--no-run",
            "-p",
            "guest-mm",
            "--test",
            "loom",
            "--features",
            "guest-mm/mutation",
        ];
        let env = [("RUSTFLAGS", "--cfg loom")];
        built.loom = cargo(ws, &ws.join("target/loom"), &args, &env)?
            .into_iter()
            .find(|a| a.target == "loom" && a.test)
            .map(|a| a.executable);
    }
    Ok(built)
}

/// Copies the normal release build's dependencies (`deps/`, `build/`,
/// `.fingerprint/`; not its top-level binaries) into `target`, keeping
/// whatever is newer there (`cp -a -u`: an artifact's name carries the hash
/// of its features, so the feature build's own files are never
/// overwritten). Only a speed-up: without it (no normal build yet, no
/// `cp`) everything is compiled, as it was before.
fn seed(ws: &Path, target: &Path) {
    let normal = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| ws.join("target"), |d| ws.join(d))
        .join("release");
    let dirs: Vec<PathBuf> = ["deps", "build", ".fingerprint"]
        .iter()
        .map(|d| normal.join(d))
        .filter(|d| d.is_dir())
        .collect();
    let into = target.join("release");
    if dirs.len() < 3 || normal == into || std::fs::create_dir_all(&into).is_err() {
        return;
    }
    let t0 = Instant::now();
    let ok = Command::new("cp")
        .args(["-a", "-u"])
        .args(&dirs)
        .arg(&into)
        .status()
        .is_ok_and(|s| s.success());
    eprintln!(
        "gmm mutation: {} the normal build's dependencies from {} ({:.1} s)",
        if ok { "copied" } else { "could not copy" },
        normal.display(),
        t0.elapsed().as_secs_f64()
    );
}

/// One executable cargo reported.
struct Artifact {
    package: String,
    target: String,
    kinds: Vec<String>,
    test: bool,
    executable: PathBuf,
}

/// Run cargo with `--message-format=json` and collect the executables it built.
fn cargo(ws: &Path, target: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Vec<Artifact>> {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(ws)
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .env("CARGO_TARGET_DIR", target)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .spawn()
        .with_context(|| format!("starting cargo {}", args.join(" ")))?;
    let mut out = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["reason"] != "compiler-artifact" {
                continue;
            }
            let Some(exe) = v["executable"].as_str() else {
                continue;
            };
            let package = Path::new(v["manifest_path"].as_str().unwrap_or_default())
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let t = &v["target"];
            out.push(Artifact {
                package,
                target: t["name"].as_str().unwrap_or_default().to_string(),
                kinds: t["kind"]
                    .as_array()
                    .map(|k| {
                        k.iter()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
                test: v["profile"]["test"].as_bool().unwrap_or(false),
                executable: PathBuf::from(exe),
            });
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(out)
}

/// Run `d` once, with `rule` broken (or none), its output into `log`.
fn run_once(
    built: &Built,
    d: &Detector,
    rule: Option<Rule>,
    log: &Path,
    timeout: Duration,
) -> Result<Outcome> {
    let missing = || anyhow::anyhow!("detector {:?} was not built", d.name);
    let mut c = match d.run {
        Run::Test {
            package,
            target,
            filter,
        } => {
            let exe = built
                .tests
                .get(&(package.to_string(), target.to_string()))
                .ok_or_else(missing)?;
            let mut c = Command::new(exe);
            if !filter.is_empty() {
                c.arg(filter);
            }
            c
        }
        Run::Lib { package, filter } => {
            let mut c = Command::new(built.libs.get(package).ok_or_else(missing)?);
            c.arg(filter);
            c
        }
        Run::Loom { test } => {
            let mut c = Command::new(built.loom.as_ref().ok_or_else(missing)?);
            c.args([test, "--exact"]).env("LOOM_MAX_PREEMPTIONS", "3");
            c
        }
        Run::Gmm { args } => {
            let mut c = Command::new(built.gmm.as_ref().ok_or_else(missing)?);
            c.args(args);
            c
        }
    };
    match rule {
        Some(r) => c.env(guest_mm::mutation::ENV, r.name()),
        None => c.env_remove(guest_mm::mutation::ENV),
    };
    let f = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    c.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
    vmm::child::die_with_parent(&mut c);
    let mut child = c.spawn().with_context(|| format!("starting {}", d.name))?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(if status.success() {
                Outcome::Passed
            } else {
                Outcome::Failed
            });
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Outcome::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn print_table(r: &MutationJson) {
    let mut s = String::new();
    s.push_str(&format!(
        "\n{:<22} {:<52} {:>6} {:>6} {:>8}\n",
        "rule", "detector", "runs", "caught", "seconds"
    ));
    for row in &r.results {
        s.push_str(&format!(
            "{:<22} {:<52} {:>6} {:>6} {:>8.1}{}\n",
            row.rule,
            row.detector,
            row.runs,
            row.caught,
            row.seconds,
            if row.caught == 0 { "  <- MISSED" } else { "" }
        ));
    }
    s.push_str(&format!(
        "\n{} rule(s), {} undetected, {} detector(s) failing with no rule broken, {:.0} s\n",
        r.rules, r.undetected, r.baseline_failures, r.seconds
    ));
    eprint!("{s}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_has_a_fast_detector_and_the_matrix_covers_all_rules() {
        for rule in Rule::ALL {
            let claims = MATRIX
                .iter()
                .find(|(r, _)| *r == rule)
                .map(|(_, c)| *c)
                .unwrap_or_else(|| panic!("rule {} has no detector", rule.name()));
            assert!(
                claims.iter().any(|c| c.fast),
                "rule {} has no fast detector for CI",
                rule.name()
            );
        }
        assert_eq!(MATRIX.len(), Rule::ALL.len());
    }

    #[test]
    fn stress_vm_claims_the_stale_translation_rules() {
        for rule in [Rule::GracePeriod, Rule::CacheShootdown] {
            let (_, claims) = MATRIX.iter().find(|(r, _)| *r == rule).unwrap();
            assert!(claims
                .iter()
                .any(|c| c.detector.name.starts_with("stress-vm")));
        }
    }

    #[test]
    fn unknown_rules_are_refused_with_the_list() {
        let e = selected_rules(&["nope".into()]).unwrap_err().to_string();
        assert!(e.contains("grace_period"), "{e}");
        assert_eq!(
            selected_rules(&["desc_length".into()]).unwrap(),
            vec![Rule::DescLength]
        );
    }
}
