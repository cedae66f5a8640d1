//! Helpers shared by the `gmm` end-to-end tests.

// Each test file uses its own subset.
#![allow(dead_code)]

use std::io::Write as _;
use std::process::{Command, Output};

use serde_json::Value;

/// Whether `/dev/kvm` can be opened; if not, says loudly that `test` is
/// skipped (it then returns without checking anything). The line goes to
/// the real stderr, past the harness's output capture (`eprintln!` would
/// be captured and shown only for failing tests), as in the `tests` crate.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            loud(&format!(
                "SKIPPED: {test}: /dev/kvm not available ({e}); this test needs real KVM"
            ));
            false
        }
    }
}

/// Prints `msg` framed on the real stderr, past the harness's capture (a
/// skip that only `eprintln!`s is shown for failing tests alone).
pub fn loud(msg: &str) {
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n**********\n{msg}\n**********\n"
    );
}

/// Runs the `gmm` binary built with these tests.
pub fn gmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gmm"))
        .args(args)
        .output()
        .expect("the gmm binary runs")
}

/// The JSON object on the last stdout line.
pub fn last_json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "last stdout line is not JSON ({e}): {line:?}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A numeric field of `v`.
pub fn num(v: &Value, k: &str) -> f64 {
    v.get(k)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("field {k} missing or not a number in {v}"))
}

/// The host's free page reporting in a bench result: where this host's
/// kernel counts what it reported (`reported_kib`), `total` carries the
/// run's MiB and `row` one non-negative window per timed repetition
/// (`reps`); where it does not, neither carries anything.
pub fn assert_host_reported(total: &Value, row: &Value, reps: usize) {
    let counted =
        std::path::Path::new("/sys/module/page_reporting/parameters/reported_kib").exists();
    let mib = row["host_reported_mib_all"]
        .as_array()
        .expect("host_reported_mib_all");
    assert_eq!(mib.len(), if counted { reps } else { 0 }, "{row}");
    assert!(
        mib.iter().all(|m| m.as_f64().is_some_and(|m| m >= 0.0)),
        "{row}"
    );
    assert_eq!(total["host_reported_mib"].is_f64(), counted, "{total}");
}
