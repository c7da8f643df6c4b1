#!/usr/bin/env bash
# Benchmarks (not part of CI): bash bench/run.sh > bench/report.md
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh >&2
bash scripts/fixtures.sh >&2
cargo build --release -p strata-cli --bin strata --example limits >&2
exec python3 bench/bench.py
