#!/usr/bin/env bash
# Break each rule in turn and run the detectors that claim it.
#
#   tools/mutation/run.sh [--quick] [--json] [--rules grace_period,...] [--runs N]
#
# Builds `gmm` normally (with the workspace's binaries) and runs `gmm mutation`, which builds the detectors
# with the test-only `mutation` feature into target/mutation (seeded with a
# copy of the normal release build's dependencies; loom models into
# target/loom), checks that every detector passes with nothing
# broken, then breaks each rule (GMM_BREAK_RULE) and counts the detectors that
# fail. Prints a table on stderr and, with --json, one JSON line on stdout:
#   {"rules": N, "undetected": K, "results": [{"rule", "detector", "runs", "caught"}, ...], ...}
# Exits non-zero if any detector fails unbroken or any rule goes undetected.
set -euo pipefail
cd "$(dirname "$0")/../.."
# `--workspace --tests`: the features the README's `cargo test --workspace
# --release` resolves (dev-dependencies included), so after it (as in
# .ci/run) nothing is compiled again; `-p tools --bin gmm` (or `--bins`
# alone) resolves other features and rebuilt gmm and vmm (~1 min).
cargo build --release -q --workspace --bins --tests
exec target/release/gmm mutation --workspace "$PWD" "$@"
