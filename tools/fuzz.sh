#!/usr/bin/env bash
# Coverage-guided fuzzing of every guest- and user-controlled input
# (cargo-fuzz, libFuzzer, AddressSanitizer; nightly only, never part of the
# stable build or CI's tests).
#
#   tools/fuzz.sh [--minutes N] [--jobs J] [--json FILE] [--cmin] [target...]
#
# Targets (tests/fuzz/fuzz_targets/, properties in tests/src/fuzz/):
# balloon_mmio, api, loader, layout, legacy_io; all of them by default. Each runs
# N minutes (default 10) as
#   cargo +nightly fuzz run --fuzz-dir tests/fuzz <t> tests/fuzz/corpus/<t> \
#       tests/fuzz/seeds/<t> -- -max_total_time=... -timeout=...
# J at a time (default 2). New corpus entries go to tests/fuzz/corpus/<t>,
# crash and hang reproducers to tests/fuzz/artifacts/<t>/, logs to
# target/fuzz-logs/<t>.log. Prints per target: executions, exec/s, corpus
# entries, coverage (libFuzzer's cov/ft), crashes and hangs; with --json,
# writes them as one JSON object to FILE. With --cmin, minimizes each
# corpus afterwards (cargo fuzz cmin). Exits non-zero on any crash or hang.
# Installs cargo-fuzz if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ALL=(balloon_mmio api loader layout legacy_io)
MINUTES=10
JOBS=2
JSON=""
CMIN=0
TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --json) JSON=$2; shift 2 ;;
    --cmin) CMIN=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=("${ALL[@]}")
for t in "${TARGETS[@]}"; do
  [ -f "tests/fuzz/fuzz_targets/$t.rs" ] || { echo "no fuzz target $t (have: ${ALL[*]})" >&2; exit 2; }
done

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz
fi

# Per-target libFuzzer options: input size bound, dictionary.
opts() {
  case "$1" in
    api) echo "-max_len=16384 -dict=$ROOT/tests/fuzz/api.dict" ;;
    loader) echo "-max_len=32768" ;;
    *) echo "-max_len=4096" ;;
  esac
}

SECS=$(awk "BEGIN { printf \"%d\", $MINUTES * 60 }")
LOGS=${CARGO_TARGET_DIR:-$ROOT/target}/fuzz-logs
mkdir -p "$LOGS"
STAMP=$LOGS/.start
echo "building ${TARGETS[*]} (release, debug assertions, AddressSanitizer)" >&2
cargo +nightly fuzz build --fuzz-dir tests/fuzz -O --debug-assertions >&2

run_one() {
  local t=$1
  mkdir -p "tests/fuzz/corpus/$t" "tests/fuzz/artifacts/$t" "tests/fuzz/seeds/$t"
  # -timeout: one input taking longer is a hang. rss limit: ASan's shadow
  # plus up to 64 MiB of guest memory per case.
  # shellcheck disable=SC2046
  cargo +nightly fuzz run --fuzz-dir tests/fuzz -O --debug-assertions "$t" \
    "tests/fuzz/corpus/$t" "tests/fuzz/seeds/$t" -- \
    -max_total_time="$SECS" -timeout=10 -rss_limit_mb=4096 \
    -artifact_prefix="$ROOT/tests/fuzz/artifacts/$t/" \
    -print_final_stats=1 $(opts "$t") >"$LOGS/$t.log" 2>&1
  echo $? >"$LOGS/$t.rc"
}

touch "$STAMP"
pids=()
for t in "${TARGETS[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  echo "fuzzing $t for $MINUTES min" >&2
  run_one "$t" &
  pids+=($!)
done
wait

fail=0
# Corpus entries at the end of each run, before any minimization.
declare -A grown minimized
for t in "${TARGETS[@]}"; do grown[$t]=$(find "tests/fuzz/corpus/$t" -type f | wc -l); done
if [ "$CMIN" = 1 ]; then
  for t in "${TARGETS[@]}"; do
    echo "minimizing the corpus of $t" >&2
    cargo +nightly fuzz cmin --fuzz-dir tests/fuzz -O --debug-assertions "$t" \
      "tests/fuzz/corpus/$t" -- $(opts "$t") -rss_limit_mb=4096 >"$LOGS/$t.cmin.log" 2>&1 \
      || { echo "cmin of $t failed (see $LOGS/$t.cmin.log)" >&2; fail=1; }
    echo "  $t: $(find "tests/fuzz/corpus/$t" -type f | wc -l) entries" >&2
    minimized[$t]=$(find "tests/fuzz/corpus/$t" -type f | wc -l)
  done
fi

rows=()
printf '%-14s %10s %8s %8s %8s %8s %8s %6s\n' target execs exec/s corpus cov ft crashes hangs >&2
for t in "${TARGETS[@]}"; do
  log=$LOGS/$t.log
  rc=$(cat "$LOGS/$t.rc" 2>/dev/null || echo 1)
  # (A log without these lines, e.g. after an early crash, gives "?".)
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(echo "$last" | grep -o 'cov: [0-9]*' | grep -o '[0-9]*' || true)
  ft=$(echo "$last" | grep -o 'ft: [0-9]*' | grep -o '[0-9]*' || true)
  corpus=${grown[$t]}
  mini=${minimized[$t]:-$corpus}
  crashes=$(find "tests/fuzz/artifacts/$t" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'leak-*' \) -newer "$STAMP" 2>/dev/null | wc -l)
  hangs=$(find "tests/fuzz/artifacts/$t" -type f \( -name 'timeout-*' -o -name 'slow-unit-*' \) -newer "$STAMP" 2>/dev/null | wc -l)
  if [ "$rc" != 0 ] && [ "$crashes" = 0 ] && [ "$hangs" = 0 ]; then
    crashes=1 # died without an artifact (e.g. a signal outside an input)
  fi
  if [ "$crashes" != 0 ] || [ "$hangs" != 0 ]; then fail=1; fi
  printf '%-14s %10s %8s %8s %8s %8s %8s %6s\n' "$t" "${execs:-?}" "${rate:-?}" "$corpus" \
    "${cov:-?}" "${ft:-?}" "$crashes" "$hangs" >&2
  rows+=("\"$t\": {\"minutes\": $MINUTES, \"execs\": ${execs:-0}, \"exec_per_sec\": ${rate:-0}, \"corpus_entries\": $corpus, \"corpus_minimized\": $mini, \"cov\": ${cov:-0}, \"ft\": ${ft:-0}, \"crashes\": $crashes, \"hangs\": $hangs}")
done

if [ -n "$JSON" ]; then
  {
    printf '{"tool": "cargo-fuzz (libFuzzer, AddressSanitizer)", "commit": "%s", "targets": {' \
      "$(git rev-parse --short HEAD)"
    (IFS=,; printf '%s' "${rows[*]}")
    printf '}}\n'
  } >"$JSON"
fi
exit $fail
