#!/usr/bin/env bash
# README's test command: everything CI checks (.ci/run execs this).
# Needs root (mounts, device nodes); the first run needs network for the
# Debian packages and the debootstrap'd test image (cached in .cache/).
set -euo pipefail
trap 'echo "test.sh: FAILED (line $LINENO: $BASH_COMMAND)" >&2' ERR
cd "$(dirname "$0")/.."
step() { echo "==> $*" >&2; }
step install-deps
bash scripts/install-deps.sh
export STRATA_FIXTURES="${STRATA_FIXTURES:-$PWD/.cache/fixtures}"
step "fixtures in $STRATA_FIXTURES"
bash scripts/fixtures.sh
step "VM kernel, initramfs and QEMU (scripts/vm/setup.sh)"
bash scripts/vm/setup.sh
step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  step "cargo nextest run"
  cargo nextest run --workspace --no-fail-fast
else
  step "cargo test (cargo-nextest not found)"
  cargo test --workspace --no-fail-fast
fi
# Every fuzz target: its kept regression inputs, then 30 s from its corpus (campaigns: BENCHMARKS.md).
step "fuzz (scripts/fuzz.sh ${STRATA_FUZZ_SECONDS:-30})"
bash scripts/fuzz.sh "${STRATA_FUZZ_SECONDS:-30}"
