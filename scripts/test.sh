#!/usr/bin/env bash
# README's test command: everything CI checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export STRATA_FIXTURES="${STRATA_FIXTURES:-$PWD/.cache/fixtures}"
bash scripts/fixtures.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
