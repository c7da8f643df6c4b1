#!/usr/bin/env bash
# Install what strata's tests, demo and benchmarks need. Idempotent; fast
# when everything is present.
set -euo pipefail
PKGS=(libssl-dev openssl pkg-config docker-registry skopeo umoci containerd runc erofs-utils e2fsprogs fuse3
      debootstrap libarchive-tools ostree fsverity attr python3 zstd hyperfine
      tar gzip util-linux binutils stargz-snapshotter podman man-db bash
      qemu-system-x86 busybox-static gcc make)
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The distribution's registry service is not wanted: tests start their own.
systemctl disable --now docker-registry >/dev/null 2>&1 || true
# rustfmt and clippy for scripts/test.sh (rustup is on every CI machine).
if command -v rustup >/dev/null 2>&1; then
  installed=$(rustup component list --installed 2>/dev/null || true)
  for c in rustfmt clippy; do
    if ! grep -q "^$c" <<<"$installed"; then
      echo "install-deps: rustup component add $c" >&2
      rustup component add "$c" >&2 || echo "install-deps: WARNING: could not add $c" >&2
    fi
  done
else
  echo "install-deps: WARNING: rustup not found; cargo fmt/clippy must come from elsewhere" >&2
fi
# cargo-fuzz for the fuzz targets (scripts/fuzz.sh, run by scripts/test.sh).
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "install-deps: cargo install cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --version 0.13.2 >&2
fi
# grpcio for the CRI test client (crates/strata-cli/tests/cri/cri_client.py)
if ! python3 -c "import grpc, grpc_tools" >/dev/null 2>&1; then
  echo "install-deps: pip install grpcio grpcio-tools" >&2
  python3 -m pip install --quiet "grpcio==1.85.3" "grpcio-tools==1.85.1" >&2
fi
# openapi-spec-validator for the conversion service's /openapi.json test
if ! python3 -c "import openapi_spec_validator" >/dev/null 2>&1; then
  echo "install-deps: pip install openapi-spec-validator" >&2
  python3 -m pip install --quiet "openapi-spec-validator==0.9.0" >&2
fi
