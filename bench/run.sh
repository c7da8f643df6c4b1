#!/usr/bin/env bash
# Benchmarks (not part of CI):
#   bash bench/run.sh          # issue 2: store and pull   (bench/bench.py)
#   bash bench/run.sh erofs    # issue 3: EROFS and mounts (bench/erofs.py)
#   bash bench/run.sh chunked  # issue 4: zstd:chunked conversion (bench/chunked.py)
#   bash bench/run.sh lazy     # issue 4: lazy mounts, cold starts on a shaped link (bench/lazy.py)
#   bash bench/run.sh lazy-optimized # issue 17: cold start of an image `strata serve` optimized vs containerd, shaped link (bench/lazy.py optimized)
#   bash bench/run.sh lazy-rss # issue 14: memory and threads of 20 lazy mounts (bench/lazy_rss.py)
#   bash bench/run.sh snapshotter # issue 16: containerd cold starts through the strata snapshotter (bench/snapshotter.py)
#   bash bench/run.sh snapshotter-cri # issue 16: cold start through containerd's CRI (kubelet's calls), strata vs overlayfs (bench/snapshotter_cri.py)
#   bash bench/run.sh snapshotter-ops # issue 16: snapshotter call latency under 8 parallel starts, RSS, 20 gc cycles (bench/snapshotter_ops.py)
#   bash bench/run.sh serve    # issue 17: the conversion service: throughput vs skopeo, GET latency, RSS, verification share (bench/serve.py)
#   bash bench/run.sh vmboot   # issue 18: templates booted in QEMU: lazy from a registry (packs) vs full vs qcow2 on the shaped link; packs vs qcow2 deltas (bench/vmboot.py)
#   bash bench/run.sh rootfs   # issue 5: VM templates: build, resize, deltas vs qcow2, chunk size, serve (bench/rootfs.py)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh >&2
bash scripts/fixtures.sh >&2
cargo build --release -p strata-cli --bin strata --example limits >&2
case "${1:-pull}" in
  pull) exec python3 bench/bench.py ;;
  erofs)
    cargo build --release -p strata-store --example erofs_build >&2
    exec python3 bench/erofs.py ;;
  chunked) exec python3 bench/chunked.py ;;
  lazy) exec python3 bench/lazy.py ;;
  lazy-optimized) exec python3 bench/lazy.py optimized ;;
  lazy-rss) exec python3 bench/lazy_rss.py ;;
  rootfs) exec python3 bench/rootfs.py ;;
  snapshotter) exec python3 bench/snapshotter.py ;;
  snapshotter-ops) exec python3 bench/snapshotter_ops.py ;;
  snapshotter-cri) exec python3 bench/snapshotter_cri.py ;;
  serve) exec python3 bench/serve.py ;;
  vmboot) exec python3 bench/vmboot.py ;;
  *) echo "usage: bench/run.sh [pull|erofs|chunked|lazy|lazy-optimized|lazy-rss|rootfs|snapshotter|snapshotter-ops|snapshotter-cri|serve|vmboot]" >&2; exit 2 ;;
esac
