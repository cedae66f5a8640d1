#!/usr/bin/env bash
# ThreadSanitizer over the concurrent tests (nightly only, -Zbuild-std;
# never part of the stable build or CI's tests).
#
#   tools/tsan.sh [--rule R] [--json FILE] [binary...]
#
# Builds the test binaries below with -Zsanitizer=thread (std rebuilt with
# it, so std's own synchronisation is seen too) into target/tsan, one
# cargo call per package, and runs each, two test threads at a time, 15
# minutes at most. Prints per binary:
# its exit status, the tests passed and failed, the ThreadSanitizer
# reports and the seconds it took; with --json, writes them as one JSON
# object to FILE. Logs go to target/tsan/logs/<binary>.log. Exits
# non-zero on any report or failing test.
#
# With --rule R the binaries are built with the test-only `mutation`
# feature (into target/tsan-mutation) and run with GMM_BREAK_RULE=R: a
# run to see what ThreadSanitizer reports when that rule is broken (the
# exit status is then 0 whatever the binaries did).
#
# Binaries: <package>:<test target> (lib: the package's unit tests). Left
# out: the tests that boot a Linux guest, spawn `vmm` or measure (under
# ThreadSanitizer's 5-15x slowdown they run past their timeouts), the
# balloon fuzzer (minutes per seed) and `teardown` (its RSS checks count
# ThreadSanitizer's shadow memory, which stays resident).
# Installs the nightly toolchain's rust-src if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ALL=(
  guest-mm:lib guest-mm:racing guest-mm:fault_race guest-mm:register_unblocked
  guest-mm:basic guest-mm:walk_cache guest-mm:view guest-mm:fallback
  guest-mm:failinj guest-mm:oracle guest-mm:stress
  vmm:lib
  tests:balloon_bad_input tests:release tests:stage2 tests:balloon_notify
  tests:vcpu_standby tests:boot tests:balloon
)
RULE=""
JSON=""
BINS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rule) RULE=$2; shift 2 ;;
    --json) JSON=$2; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) BINS+=("$1"); shift ;;
  esac
done
[ ${#BINS[@]} -eq 0 ] && BINS=("${ALL[@]}")

if ! rustup +nightly component list --installed 2>/dev/null | grep -q '^rust-src'; then
  rustup component add rust-src --toolchain nightly
fi
TRIPLE=x86_64-unknown-linux-gnu
TARGET_DIR=$PWD/target/tsan
FEATURES=()
if [ -n "$RULE" ]; then
  TARGET_DIR=$PWD/target/tsan-mutation
  FEATURES=(--features mutation)
fi
LOGS=$TARGET_DIR/logs
mkdir -p "$LOGS"
export RUSTFLAGS="-Zsanitizer=thread" CARGO_TARGET_DIR=$TARGET_DIR

# Builds one binary and prints its path.
# Builds the binaries of each package named in BINS with one cargo call
# (one dependency check and link step per package, not per binary) and
# prints "<package>:<target> <executable>" per test binary built.
build_all() {
  local pkgs pkg b t sel
  pkgs=$(printf '%s\n' "${BINS[@]}" | cut -d: -f1 | sort -u)
  for pkg in $pkgs; do
    sel=()
    for b in "${BINS[@]}"; do
      [ "${b%%:*}" = "$pkg" ] || continue
      t=${b#*:}
      if [ "$t" = lib ]; then sel+=(--lib); else sel+=(--test "$t"); fi
    done
    cargo +nightly test -Zbuild-std --target "$TRIPLE" -p "$pkg" "${sel[@]}" \
      "${FEATURES[@]}" --no-run --message-format=json 2>>"$LOGS/build.log" |
      PKG=$pkg python3 -c 'import json, os, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        kind = m["target"]["kind"]
        name = "lib" if "lib" in kind or "rlib" in kind else m["target"]["name"]
        print(os.environ["PKG"] + ":" + name, m["executable"])' || true
  done
}

: >"$LOGS/build.log"
EXES=$(build_all)
fail=0
rows=()
printf '%-30s %4s %7s %7s %8s %8s\n' binary rc passed failed reports seconds >&2
for b in "${BINS[@]}"; do
  exe=$(printf '%s\n' "$EXES" | awk -v b="$b" '$1 == b { print $2 }' | tail -1)
  name=${b/:/-}
  if [ -z "$exe" ]; then
    echo "$b: build failed (see $LOGS/build.log)" >&2
    fail=1
    continue
  fi
  s=$(date +%s)
  set +e
  GMM_BREAK_RULE=$RULE TSAN_OPTIONS="report_signal_unsafe=0 ${TSAN_OPTIONS:-}" \
    timeout 900 "$exe" --test-threads=2 >"$LOGS/$name.log" 2>&1
  rc=$?
  set -e
  secs=$(($(date +%s) - s))
  reports=$(grep -c 'WARNING: ThreadSanitizer' "$LOGS/$name.log" || true)
  passed=$(grep -o '[0-9]* passed' "$LOGS/$name.log" | awk '{p+=$1} END {print p+0}')
  failed=$(grep -o '[0-9]* failed' "$LOGS/$name.log" | awk '{p+=$1} END {print p+0}')
  printf '%-30s %4s %7s %7s %8s %8s\n' "$b" "$rc" "$passed" "$failed" "$reports" "$secs" >&2
  if [ "$rc" != 0 ] || [ "$reports" != 0 ]; then fail=1; fi
  rows+=("\"$b\": {\"rc\": $rc, \"passed\": $passed, \"failed\": $failed, \"reports\": $reports, \"seconds\": $secs}")
done

if [ -n "$JSON" ]; then
  {
    printf '{"tool": "ThreadSanitizer (rustc %s, -Zbuild-std)", "commit": "%s", "rule": %s, "binaries": {' \
      "$(rustc +nightly --version | cut -d' ' -f2-)" "$(git rev-parse --short HEAD)" \
      "$([ -n "$RULE" ] && echo "\"$RULE\"" || echo null)"
    (IFS=,; printf '%s' "${rows[*]}")
    printf '}}\n'
  } >"$JSON"
fi
if [ -n "$RULE" ]; then exit 0; fi
exit $fail
