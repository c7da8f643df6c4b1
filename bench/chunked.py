#!/usr/bin/env python3
"""strata benchmarks for issue 4, part 1: zstd:chunked conversion.

  bash bench/run.sh chunked

Converts debian:base and debian:python (layers already in the store, so no
download) with `strata convert`, against `skopeo copy --dest-compress-format
zstd:chunked` of the same OCI layout (Debian's skopeo 1.9.3), median of N
runs each, fresh destination per run. Also records blob sizes: source gzip,
strata zstd:chunked, skopeo zstd:chunked.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.environ.get("STRATA_FIXTURES", os.path.join(REPO, ".cache/fixtures"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
STRATA = os.environ.get("STRATA_BIN", os.path.join(TARGET, "release/strata"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
DEBIAN = os.path.join(FIX, "debian")


def run(*args, env=None):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    if r.returncode != 0:
        sys.exit(f"bench: {' '.join(args)} failed: {r.stderr.decode()}")
    return r.stdout.decode()


def layers_size(layout, tag):
    idx = json.load(open(os.path.join(layout, "index.json")))
    m = next(x for x in idx["manifests"] if x["annotations"]["org.opencontainers.image.ref.name"] == tag)
    man = json.load(open(os.path.join(layout, "blobs/sha256", m["digest"][7:])))
    return sum(l["size"] for l in man["layers"])


def timed(fn, prep):
    ts = []
    for _ in range(RUNS):
        prep()
        subprocess.run(["sync"], check=True)
        time.sleep(1)
        t = time.monotonic()
        fn()
        ts.append(time.monotonic() - t)
    return statistics.median(ts), ts


def main():
    if not shutil.which("skopeo"):
        sys.exit("bench: skopeo missing (bash scripts/install-deps.sh)")
    tmp = tempfile.mkdtemp(prefix="strata-bench-chunked-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    res = {"runs": RUNS}
    out = ["| image (tar MB) | strata convert | skopeo copy zstd:chunked | ratio | blob bytes: gzip source / strata / skopeo |",
           "| --- | --- | --- | --- | --- |"]
    try:
        env = dict(os.environ, STRATA_ROOT=os.path.join(tmp, "store"))
        for tag in ("base", "python"):
            src = f"oci:{DEBIAN}:{tag}"
            run(STRATA, "pull", "-q", src, env=env)
            d1, d2 = os.path.join(tmp, "s"), os.path.join(tmp, "k")

            def clean():
                shutil.rmtree(d1, ignore_errors=True)
                shutil.rmtree(d2, ignore_errors=True)
            s, s_all = timed(lambda: run(STRATA, "convert", src, f"oci:{d1}:{tag}", env=env), clean)
            k, k_all = timed(lambda: run("skopeo", "copy", "--dest-compress-format", "zstd:chunked",
                                         src, f"oci:{d2}:{tag}"), clean)
            run(STRATA, "convert", src, f"oci:{d1}:{tag}", env=env)
            run("skopeo", "copy", "--dest-compress-format", "zstd:chunked", src, f"oci:{d2}:{tag}")
            info = json.loads(run(STRATA, "--json", "inspect", src, env=env))
            tar_mb = sum(l["uncompressed_size"] for l in info["layers"]) / 1e6
            sizes = (layers_size(DEBIAN, tag), layers_size(d1, tag), layers_size(d2, tag))
            res[tag] = {"strata_s": s_all, "skopeo_s": k_all, "sizes": sizes, "tar_mb": tar_mb}
            out.append(f"| debian:{tag} ({tar_mb:.0f}) | {s:.2f} s | {k:.2f} s | **{k/s:.1f}x faster** | "
                       f"{sizes[0]:,} / {sizes[1]:,} / {sizes[2]:,} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(REPO, "bench/results-chunked.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("\n".join(out))


if __name__ == "__main__":
    main()
