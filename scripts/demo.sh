#!/usr/bin/env bash
# README's first command: build strata and run the main job on the sample
# image that ships with the repository, in a local store. No daemon, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release -p strata-cli
S=target/release/strata
export STRATA_ROOT="${STRATA_ROOT:-$PWD/.cache/demo-store}"
OUT="$PWD/.cache/demo-export"
rm -rf "$OUT" "$OUT.tar"
set -x
$S pull oci:samples/hello:latest
$S images
$S inspect oci:samples/hello:latest | head -n 40
$S export oci:samples/hello:latest "$OUT"
find "$OUT" | sort
"$OUT/usr/bin/hello" 2>/dev/null || sh "$OUT/usr/bin/hello"
$S export oci:samples/hello:latest --tar "$OUT.tar"
tar tvf "$OUT.tar"
$S pull oci:samples/hello:latest   # second pull: nothing downloaded or written
$S fsck
