#!/usr/bin/env python3
"""strata benchmarks for issue 4, part 1: zstd:chunked conversion.

  bash bench/run.sh chunked

Part 1: converts debian:base and debian:python (layers already in the store, so no
download) with `strata convert`, against `skopeo copy --dest-compress-format
zstd:chunked` of the same OCI layout (Debian's skopeo 1.9.3), median of N
runs each, fresh destination per run. Also records blob sizes: source gzip,
strata zstd:chunked, skopeo zstd:chunked.

Part 2: partial pull on loopback. A registry (127.0.0.1) serves the
`apps:base-updated` fixture (debian's base layer re-made with three files
changed and one added) converted to zstd:chunked. Full pull into an empty
store vs partial pull into a store holding debian:base (copied fresh before
each run); bytes downloaded vs the compressed frames of the files the store
lacks plus the TOC and tar-split.
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


def free_port():
    import socket
    so = socket.socket()
    so.bind(("127.0.0.1", 0))
    p = so.getsockname()[1]
    so.close()
    return p


def partial_bench(tmp, out):
    apps = os.path.join(FIX, "apps")
    port = free_port()
    cfg = os.path.join(tmp, "reg.yml")
    with open(cfg, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {tmp}/registry\nhttp:\n  addr: 127.0.0.1:{port}\n")
    reg = subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        maker = dict(os.environ, STRATA_ROOT=os.path.join(tmp, "maker"))
        lay = os.path.join(tmp, "upd")
        run(STRATA, "convert", f"oci:{apps}:base-updated", f"oci:{lay}:upd", env=maker)
        run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
            f"oci:{lay}:upd", f"docker://127.0.0.1:{port}/upd:1")
        ref = f"docker://127.0.0.1:{port}/upd:1"
        seed = os.path.join(tmp, "seed")
        run(STRATA, "pull", "-q", f"oci:{DEBIAN}:base", env=dict(os.environ, STRATA_ROOT=seed))
        st = os.path.join(tmp, "st")
        summaries = {}

        def fresh(copy_seed):
            def prep():
                shutil.rmtree(st, ignore_errors=True)
                if copy_seed:
                    shutil.copytree(seed, st, symlinks=True)
            return prep

        def pull(kind):
            summaries[kind] = json.loads(run(STRATA, "--json", "pull", "--plain-http", ref,
                                             env=dict(os.environ, STRATA_ROOT=st)))
        full, full_all = timed(lambda: pull("full"), fresh(False))
        part, part_all = timed(lambda: pull("partial"), fresh(True))
        # what the partial pull had to fetch at least
        idx = json.load(open(os.path.join(lay, "index.json")))
        man = json.load(open(os.path.join(lay, "blobs/sha256", idx["manifests"][0]["digest"][7:])))
        layer = man["layers"][0]
        blob = open(os.path.join(lay, "blobs/sha256", layer["digest"][7:]), "rb").read()
        pos = [int(x) for x in layer["annotations"]["io.github.containers.zstd-chunked.manifest-position"].split(":")]
        tsp = [int(x) for x in layer["annotations"]["io.github.containers.zstd-chunked.tarsplit-position"].split(":")]
        toc = json.loads(subprocess.run(["zstd", "-dc"], input=blob[pos[0]:pos[0] + pos[1]],
                                        stdout=subprocess.PIPE, check=True).stdout)
        have = set()
        for root, _, names in os.walk(os.path.join(seed, "objects")):
            for n in names:
                have.add("sha256:" + os.path.basename(root) + n)
        new_bytes = sum(e["endOffset"] - e["offset"] for e in toc["entries"]
                        if e["type"] == "reg" and e.get("digest") and e["digest"] not in have)
        meta = pos[1] + tsp[1]
        got = summaries["partial"]["bytes_downloaded"]
        res = {"full_s": full_all, "partial_s": part_all, "partial_bytes": got,
               "full_bytes": summaries["full"]["bytes_downloaded"], "new_file_frames": new_bytes,
               "metadata": meta, "layer": layer["size"]}
        out.append("")
        out.append("| pull of base-updated (loopback) | time | bytes downloaded |")
        out.append("| --- | --- | --- |")
        out.append(f"| full (empty store) | {full:.2f} s | {summaries['full']['bytes_downloaded']:,} |")
        out.append(f"| partial (store has debian:base) | {part:.2f} s | {got:,} |")
        out.append(f"| lower bound: new files' frames + TOC + tar-split | | {new_bytes:,} + {meta:,} = {new_bytes + meta:,} |")
        out.append(f"\npartial vs full: {full / part:.1f}x faster, {summaries['full']['bytes_downloaded'] / got:.0f}x fewer bytes; "
                   f"overhead over the lower bound: {got - new_bytes - meta:,} bytes "
                   f"({(got - new_bytes - meta) / layer['size'] * 100:.2f}% of the layer).")
        return res
    finally:
        reg.kill()
        reg.wait()


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
        res["partial"] = partial_bench(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(REPO, "bench/results-chunked.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("\n".join(out))


if __name__ == "__main__":
    main()
