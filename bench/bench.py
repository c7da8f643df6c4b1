#!/usr/bin/env python3
"""strata benchmarks for issue 2 (store and pull), peers measured in the same run.

  bash bench/run.sh            # builds release, builds fixtures, runs this

Measures (median of N runs, fresh state per run):
  1. pull of debian:base from a local registry (127.0.0.1):
     strata pull  vs  skopeo copy + umoci unpack  vs  ctr image pull (containerd, overlayfs)
  2. import throughput (MB/s of uncompressed layer, from an OCI layout, no network)
     vs ostree commit of the same tree and vs the single-core limit
     min(SHA-256, decompression) measured here (examples/limits.rs)
  3. derived pull (debian:python after debian:base): bytes downloaded vs the
     new layer's compressed size
  4. store size for base + python vs the two unpacked trees
Prints a markdown report on stdout; raw numbers to bench/results.json.
"""
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.environ.get("STRATA_FIXTURES", os.path.join(REPO, ".cache/fixtures"))
STRATA = os.environ.get("STRATA_BIN", os.path.join(REPO, "target/release/strata"))
LIMITS = os.environ.get("LIMITS_BIN", os.path.join(REPO, "target/release/examples/limits"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
DEBIAN = os.path.join(FIX, "debian")


def sh(*args, quiet=True, **kw):
    r = subprocess.run(args, check=True, stdout=subprocess.PIPE if quiet else None,
                       stderr=subprocess.PIPE if quiet else None, **kw)
    return r.stdout.decode() if quiet else ""


def timed(setup, run, cleanup=None, runs=RUNS):
    times = []
    for _ in range(runs):
        if setup:
            setup()
        subprocess.run(["sync"], check=True)
        time.sleep(2)  # let writeback of the previous run settle
        t = time.monotonic()
        run()
        times.append(time.monotonic() - t)
        if cleanup:
            cleanup()
    return statistics.median(times), times


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def du(path):
    return int(sh("du", "-sb", path).split()[0])


class Registry:
    def __init__(self, tmp):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        cfg = os.path.join(tmp, "registry.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                    f"storage:\n  filesystem:\n    rootdirectory: {tmp}/registry\n"
                    f"http:\n  addr: {self.addr}\n")
        self.p = subprocess.Popen(["docker-registry", "serve", cfg],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("docker-registry did not start")

    def stop(self):
        self.p.terminate()
        self.p.wait()


class Containerd:
    def __init__(self, tmp):
        self.dir = tempfile.mkdtemp(prefix="ctrd-", dir=tmp)
        self.sock = os.path.join(self.dir, "containerd.sock")
        cfg = os.path.join(self.dir, "config.toml")
        with open(cfg, "w") as f:
            f.write(f'version = 2\nroot = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
                    f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                    f'[grpc]\n  address = "{self.sock}"\n')
        self.p = subprocess.Popen(["containerd", "--config", cfg],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(self.sock):
                return
            time.sleep(0.05)
        raise SystemExit("containerd did not start")

    def stop(self):
        self.p.terminate()
        self.p.wait()
        # unmount anything left and remove
        subprocess.run(["umount", "-R", self.dir], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)


def layer_blobs(layout, tag):
    idx = json.load(open(os.path.join(layout, "index.json")))
    m = next(m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    man = json.load(open(os.path.join(layout, "blobs/sha256", m["digest"][7:])))
    return [(l["digest"], l["size"]) for l in man["layers"]]


def main():
    for tool in ["docker-registry", "skopeo", "umoci", "containerd", "ctr", "ostree"]:
        if not shutil.which(tool):
            raise SystemExit(f"missing {tool}: run scripts/install-deps.sh")
    tmp = tempfile.mkdtemp(prefix="strata-bench-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    res = {"runs": RUNS, "machine": {"nproc": os.cpu_count(), "kernel": os.uname().release}}
    reg = Registry(tmp)
    try:
        for tag in ["base", "python"]:
            sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
               f"oci:{DEBIAN}:{tag}", f"docker://{reg.addr}/debian:{tag}")
        base_ref = f"docker://{reg.addr}/debian:base"
        store = os.path.join(tmp, "store")

        # 1. pull from the registry
        def clean_store():
            shutil.rmtree(store, ignore_errors=True)
        t_strata, all_strata = timed(clean_store, lambda: sh(STRATA, "--root", store, "--quiet", "pull", "--plain-http", base_ref))
        oci = os.path.join(tmp, "oci")
        bundle = os.path.join(tmp, "bundle")

        def clean_oci():
            shutil.rmtree(oci, ignore_errors=True)
            shutil.rmtree(bundle, ignore_errors=True)

        def skopeo_umoci():
            sh("skopeo", "copy", "--quiet", "--src-tls-verify=false", base_ref, f"oci:{oci}:base")
            sh("umoci", "unpack", "--image", f"{oci}:base", bundle)
        t_skopeo, all_skopeo = timed(clean_oci, skopeo_umoci, clean_oci)
        ctr_times = []
        for _ in range(RUNS):
            c = Containerd(tmp)
            try:
                subprocess.run(["sync"], check=True)
                t = time.monotonic()
                sh("ctr", "--address", c.sock, "-n", "bench", "images", "pull", "--plain-http",
                   f"{reg.addr}/debian:base")
                ctr_times.append(time.monotonic() - t)
                snaps = sh("ctr", "--address", c.sock, "-n", "bench", "snapshots", "ls")
                assert len(snaps.strip().splitlines()) >= 2, f"ctr did not unpack: {snaps}"
            finally:
                c.stop()
        t_ctr = statistics.median(ctr_times)
        res["pull_base"] = {"strata_s": t_strata, "strata_all": all_strata,
                            "skopeo_umoci_s": t_skopeo, "skopeo_umoci_all": all_skopeo,
                            "ctr_s": t_ctr, "ctr_all": ctr_times}

        # 2. import throughput from a layout (no network)
        (blob_digest, blob_size), = layer_blobs(DEBIAN, "base")
        blob = os.path.join(DEBIAN, "blobs/sha256", blob_digest[7:])
        limits = json.loads(sh(LIMITS, blob))
        mb = limits["uncompressed_bytes"] / 1e6
        t_import, all_import = timed(clean_store, lambda: sh(STRATA, "--root", store, "--quiet", "pull", f"oci:{DEBIAN}:base"))
        # the same on tmpfs: the CPU path without the disk's file-creation cost
        shm = "/dev/shm/strata-bench-store"

        def clean_shm():
            shutil.rmtree(shm, ignore_errors=True)
        t_shm, all_shm = timed(clean_shm, lambda: sh(STRATA, "--root", shm, "--quiet", "pull", f"oci:{DEBIAN}:base"), clean_shm)
        # ostree commit of the same tree (umoci's unpack, /dev skipped)
        clean_oci()
        sh("umoci", "unpack", "--image", f"{DEBIAN}:base", bundle)
        rootfs = os.path.join(bundle, "rootfs")
        shutil.rmtree(os.path.join(rootfs, "dev"), ignore_errors=True)
        os.makedirs(os.path.join(rootfs, "dev"))
        repo = os.path.join(tmp, "ostree")

        def ostree_init():
            shutil.rmtree(repo, ignore_errors=True)
            sh("ostree", f"--repo={repo}", "init", "--mode=bare")
        t_ostree, all_ostree = timed(ostree_init, lambda: sh("ostree", f"--repo={repo}", "commit", "--branch=bench", f"--tree=dir={rootfs}"))
        res["import"] = {"uncompressed_mb": mb, "strata_s": t_import, "strata_all": all_import,
                         "strata_mb_s": mb / t_import, "ostree_s": t_ostree, "ostree_all": all_ostree,
                         "ostree_mb_s": mb / t_ostree, "limits": limits,
                         "ratio_to_limit": (mb / t_import) / limits["limit_mb_s"],
                         "tmpfs_s": t_shm, "tmpfs_all": all_shm, "tmpfs_mb_s": mb / t_shm,
                         "tmpfs_ratio_to_limit": (mb / t_shm) / limits["limit_mb_s"]}

        # 3. derived pull after base
        clean_store()
        sh(STRATA, "--root", store, "--quiet", "pull", "--plain-http", base_ref)
        out = json.loads(sh(STRATA, "--root", store, "--json", "pull", "--plain-http", f"docker://{reg.addr}/debian:python"))
        py_layers = layer_blobs(DEBIAN, "python")
        res["derived"] = {"bytes_downloaded": out["bytes_downloaded"], "new_layer_compressed": py_layers[-1][1],
                          "layers_reused": out["layers_reused"], "layers_fetched": out["layers_fetched"]}

        # 4. store size vs two unpacked trees
        b2 = os.path.join(tmp, "bundle-py")
        shutil.rmtree(b2, ignore_errors=True)
        sh("umoci", "unpack", "--image", f"{DEBIAN}:python", b2)
        clean_oci()
        sh("umoci", "unpack", "--image", f"{DEBIAN}:base", bundle)
        res["store_size"] = {"store_bytes": du(store), "two_trees_bytes": du(os.path.join(bundle, "rootfs")) + du(os.path.join(b2, "rootfs"))}
    finally:
        reg.stop()
        subprocess.run(["umount", "-R", tmp], stderr=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)

    with open(os.path.join(REPO, "bench", "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    p, i, d, s = res["pull_base"], res["import"], res["derived"], res["store_size"]
    print(f"""## Issue 2: store and pull (median of {RUNS} runs; {res['machine']['nproc']} vCPU, kernel {res['machine']['kernel']})

| benchmark | strata | peer | ratio |
| --- | --- | --- | --- |
| pull debian:base from local registry | {p['strata_s']:.2f} s | skopeo copy + umoci unpack {p['skopeo_umoci_s']:.2f} s | {p['skopeo_umoci_s']/p['strata_s']:.1f}x faster |
| pull debian:base from local registry | {p['strata_s']:.2f} s | ctr image pull (overlayfs) {p['ctr_s']:.2f} s | {p['ctr_s']/p['strata_s']:.1f}x faster |
| import throughput (oci layout, {i['uncompressed_mb']:.0f} MB tar) | {i['strata_mb_s']:.0f} MB/s | ostree commit {i['ostree_mb_s']:.0f} MB/s | {i['strata_mb_s']/i['ostree_mb_s']:.1f}x |
| import vs single-core limit, store on disk | {i['strata_mb_s']:.0f} MB/s | min(SHA-256 {i['limits']['sha256_mb_s']:.0f}, gunzip {i['limits']['decompress_mb_s']:.0f}) = {i['limits']['limit_mb_s']:.0f} MB/s | {100*i['ratio_to_limit']:.0f}% of limit |
| import vs single-core limit, store on tmpfs | {i['tmpfs_mb_s']:.0f} MB/s (best run {i['uncompressed_mb']/min(i['tmpfs_all']):.0f}) | {i['limits']['limit_mb_s']:.0f} MB/s (best of 3) | {100*i['tmpfs_ratio_to_limit']:.0f}% of limit (best run {100*i['uncompressed_mb']/min(i['tmpfs_all'])/i['limits']['limit_mb_s']:.0f}%) |
| derived pull (python after base) | {d['bytes_downloaded']} bytes downloaded | new layer compressed {d['new_layer_compressed']} bytes | {'equal' if d['bytes_downloaded']==d['new_layer_compressed'] else 'DIFFERENT'} |
| store size base + python | {s['store_bytes']/1e6:.1f} MB | two unpacked trees {s['two_trees_bytes']/1e6:.1f} MB | {s['store_bytes']/s['two_trees_bytes']:.2f}x |

Raw: strata pull {', '.join(f'{x:.2f}' for x in p['strata_all'])}; skopeo+umoci {', '.join(f'{x:.2f}' for x in p['skopeo_umoci_all'])}; ctr {', '.join(f'{x:.2f}' for x in p['ctr_all'])}; import {', '.join(f'{x:.2f}' for x in i['strata_all'])}; import on tmpfs {', '.join(f'{x:.2f}' for x in i['tmpfs_all'])}; ostree {', '.join(f'{x:.2f}' for x in i['ostree_all'])}.
""")


if __name__ == "__main__":
    main()
