#!/usr/bin/env bash
# Run the fuzz targets in fuzz/ (cargo-fuzz, libFuzzer).
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# Each target first re-runs every input kept under fuzz/regressions/TARGET
# (inputs that once crashed, hung or blew memory: they must pass now), then
# fuzzes for SECONDS (default 30) from fuzz/corpus/TARGET, two targets at a
# time. New corpus entries go to a scratch dir (the committed corpus stays
# small); a crash leaves its input under fuzz/artifacts/TARGET and fails the
# run. Rule: errors are fine; panics, hangs (> 10 s per input) and more than
# 2 GiB of memory are bugs.
#
# Campaigns: STRATA_FUZZ_RUNS=N stops a target after N executions (whichever
# of time and runs comes first), STRATA_FUZZ_JOBS=N runs N targets at a time
# (default 2), STRATA_FUZZ_WORK=DIR keeps the grown corpora in DIR/TARGET
# (default: a scratch dir, dropped). Targets with a dictionary in dicts/
# get it (-dict).
#
# cargo-fuzz needs nightly rustc flags: the nightly toolchain when rustup
# has it, else the stable one with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-30}"
shift || true
if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz.sh: cargo-fuzz is missing (cargo install cargo-fuzz --locked)" >&2
  exit 1
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  tc=(+nightly)
else
  tc=()
  export RUSTC_BOOTSTRAP=1
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo "${tc[@]}" fuzz list)
fi
# -O with debug assertions: overflow checks on, as a panic is what we look for
cargo "${tc[@]}" fuzz build -O -a
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
run_one() {
  local t="$1" log="$scratch/$1.log"
  local bin="target/x86_64-unknown-linux-gnu/release/$t"
  local flags=(-rss_limit_mb=2048 -timeout=10 -malloc_limit_mb=2048)
  local dict=""
  case "$t" in
    chunked_*|tar_split) dict=dicts/chunked.dict ;;
    registry_answers) dict=dicts/registry.dict ;;
    oci_*) dict=dicts/oci.dict ;;
  esac
  if [ -d "regressions/$t" ] && [ -n "$(ls -A "regressions/$t")" ]; then
    if ! "$bin" "${flags[@]}" -runs=0 regressions/"$t"/* >"$log" 2>&1; then
      echo "fuzz $t: a regression input fails again:" >&2
      tail -30 "$log" >&2
      return 1
    fi
  fi
  local work="$scratch/corpus-$t"
  [ -n "${STRATA_FUZZ_WORK:-}" ] && work="$STRATA_FUZZ_WORK/$t"
  mkdir -p "$work" "artifacts/$t"
  local more=()
  [ -n "$dict" ] && more+=(-dict="$dict")
  [ -n "${STRATA_FUZZ_RUNS:-}" ] && more+=(-runs="$STRATA_FUZZ_RUNS")
  local t0=$SECONDS
  if "$bin" "${flags[@]}" "${more[@]}" -max_total_time="$secs" -print_final_stats=1 \
      -artifact_prefix="artifacts/$t/" "$work" "corpus/$t" >"$log" 2>&1; then
    local execs edges
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    edges=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo '?')
    echo "fuzz $t: ok, $execs executions in $((SECONDS - t0))s, $edges edges"
  else
    echo "fuzz $t: FAILED (input under fuzz/artifacts/$t):" >&2
    grep -v '^#' "$log" | tail -40 >&2
    return 1
  fi
}
fail=0
pids=()
for t in "${targets[@]}"; do
  run_one "$t" &
  pids+=($!)
  if [ ${#pids[@]} -ge "${STRATA_FUZZ_JOBS:-2}" ]; then
    wait "${pids[0]}" || fail=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p" || fail=1; done
exit $fail
