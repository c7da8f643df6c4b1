#!/usr/bin/env python3
"""strata benchmarks for issue 16: the snapshotter as a daemon.

  bash bench/run.sh snapshotter-ops

On loopback, one containerd 1.6 + `strata snapshotter`, the Debian +
python fixture (gzip) in a local docker-registry:
  latency   8 namespaces pull the image the ordinary way at once (`ctr
            images pull --snapshotter strata`: Prepare, apply, Commit per
            layer), then 8 containers start at once on it and 8 on the same
            image through `strata rpull`; the snapshotter's own timing of
            every call (its debug log: `op=... elapsed_us=...`, the time
            inside strata, not gRPC) as p50/p99 per call, and its peak RSS.
  gc        20 cycles of rpull + run + `ctr images rm --sync` + strata gc:
            the sizes of strata's root (store, snapshots) and containerd's
            root after each cycle against the sizes before the first.
"""

import concurrent.futures as cf
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lazy as L  # noqa: E402
import snapshotter as S  # noqa: E402

PARALLEL = 8
CYCLES = int(os.environ.get("BENCH_GC_CYCLES", "20"))


def snapshotter_logged(tmp):
    root = os.path.join(tmp, "snap")
    sock = os.path.join(tmp, "strata.sock")
    logp = os.path.join(tmp, "snap.log")
    env = dict(os.environ, STRATA_LOG="info,strata_snapshotter=debug")
    p = subprocess.Popen([L.STRATA, "--root", root, "snapshotter", "--socket", sock,
                          "--config", "/dev/null"], stdout=subprocess.DEVNULL,
                         stderr=open(logp, "a"), env=env)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    return p, root, sock, logp


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def ops_in(logp, start):
    """{op: [ms]} from the log lines after byte offset `start`."""
    out = {}
    with open(logp, "rb") as f:
        f.seek(start)
        for line in f.read().decode(errors="replace").splitlines():
            line = re.sub(r"\x1b\[[0-9;]*m", "", line)
            m = re.search(r'op="(\w+)" elapsed_us=(\d+)', line)
            if m:
                out.setdefault(m.group(1), []).append(int(m.group(2)) / 1000)
    return out


def summarize(ops):
    return {op: {"n": len(xs), "p50_ms": round(pct(xs, 0.5), 3), "p99_ms": round(pct(xs, 0.99), 3),
                 "max_ms": round(max(xs), 3)} for op, xs in sorted(ops.items())}


def rss_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def du(path):
    # -x: not the image mounts under ROOT/mnt (they are the store's
    # objects, counted under ROOT/store)
    r = subprocess.run(["du", "-sbx", path], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 else 0


def latency(tmp, addr):
    p, root, sock, logp = snapshotter_logged(tmp)
    c = S.containerd_with(tmp, sock)
    res = {}
    try:
        image = f"{addr}/gz:1"
        # 8 ordinary pulls at once (overlay contract: Prepare/Commit)
        off = os.path.getsize(logp)
        t = time.monotonic()
        with cf.ThreadPoolExecutor(PARALLEL) as ex:
            list(ex.map(lambda i: c.ctr("-n", f"ns{i}", "images", "pull", "--plain-http",
                                        "--snapshotter", "strata", image), range(PARALLEL)))
        res["8 ordinary pulls at once"] = {"seconds": round(time.monotonic() - t, 2),
                                           "calls": summarize(ops_in(logp, off))}
        res["ingest question"] = ingest_cost(root, PARALLEL)
        # 8 container starts at once on the ordinary layers
        off = os.path.getsize(logp)
        t = time.monotonic()

        def run(i, ns, name):
            out = c.ctr("-n", ns, "run", "--rm", "--snapshotter", "strata", image,
                        f"{name}-{os.getpid()}-{i}", "/usr/bin/python3", "-c", L.PY).strip()
            assert out == "1", out
        with cf.ThreadPoolExecutor(PARALLEL) as ex:
            list(ex.map(lambda i: run(i, f"ns{i}", "ord"), range(PARALLEL)))
        res["8 container starts at once (ordinary layers)"] = {
            "seconds": round(time.monotonic() - t, 2), "calls": summarize(ops_in(logp, off))}
        # rpull, then 8 starts at once on the composefs mount
        L.run(L.STRATA, "--quiet", "rpull", "--plain-http", "--address", c.sock, image)
        off = os.path.getsize(logp)
        t = time.monotonic()
        with cf.ThreadPoolExecutor(PARALLEL) as ex:
            list(ex.map(lambda i: run(i, "default", "rp"), range(PARALLEL)))
        res["8 container starts at once (rpull: one composefs mount)"] = {
            "seconds": round(time.monotonic() - t, 2), "calls": summarize(ops_in(logp, off))}
        # the same image rpulled into the 8 namespaces: one copy in the store
        for i in range(PARALLEL):
            L.run(L.STRATA, "--quiet", "rpull", "--plain-http", "-n", f"ns{i}", "--address",
                  c.sock, image)
        res["ingest question"]["rpull into the 8 namespaces too: store bytes"] = du(
            os.path.join(root, "store"))
        res["snapshotter RSS"] = {"VmRSS_kB": rss_kb(p.pid, "VmRSS"),
                                  "VmHWM_kB": rss_kb(p.pid, "VmHWM")}
    finally:
        c.stop()
        p.kill()
        p.wait()
        S.cleanup_root(root)
    return res


def ingest_cost(root, copies):
    """What ingesting ordinary layers into the store would cost and save:
    the snapshot dirs' size (`copies` namespaces each unpacked the same
    image), and the time to read and SHA-256 every regular file of one
    copy (the least an ingest does before linking objects)."""
    import hashlib
    snaps = os.path.join(root, "snapshots")
    total = du(snaps)
    dirs = sorted(os.listdir(snaps), key=int)
    one = dirs[: max(1, len(dirs) // copies)]
    t = time.monotonic()
    files = nbytes = 0
    for d in one:
        for base, _, names in os.walk(os.path.join(snaps, d, "fs")):
            for n in names:
                fp = os.path.join(base, n)
                if os.path.islink(fp) or not os.path.isfile(fp):
                    continue
                h = hashlib.sha256()
                with open(fp, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                        nbytes += len(chunk)
                files += 1
    return {"snapshot_dirs_bytes": total, "copies": copies, "one_copy_files": files,
            "one_copy_bytes": nbytes, "hash_one_copy_seconds": round(time.monotonic() - t, 2)}


def gc_cycles(tmp, addr):
    p, root, sock, logp = snapshotter_logged(tmp)
    c = S.containerd_with(tmp, sock)
    image = f"{addr}/gz:1"
    croot = os.path.join(c.dir, "root")
    sizes = []
    try:
        def measure():
            return {"strata": du(root), "containerd": du(croot)}
        before = measure()
        for n in range(CYCLES):
            L.run(L.STRATA, "--quiet", "rpull", "--plain-http", "--address", c.sock, image)
            out = c.ctr("run", "--rm", "--snapshotter", "strata", image,
                        f"gc-{os.getpid()}-{n}", "/usr/bin/python3", "-c", L.PY).strip()
            assert out == "1", out
            c.ctr("images", "rm", "--sync", image)
            # containerd's gc calls Cleanup on its own schedule: the image
            # mount goes then, and strata's name for the image
            mnt = os.path.join(root, "mnt")
            t = time.monotonic()
            while os.listdir(mnt) and time.monotonic() - t < 30:
                time.sleep(0.2)
            assert not os.listdir(mnt), "Cleanup did not come in 30 s"
            L.run(L.STRATA, "--quiet", "--root", os.path.join(root, "store"), "gc")
            sizes.append(measure())
        rss = rss_kb(p.pid, "VmRSS")
    finally:
        c.stop()
        p.kill()
        p.wait()
        S.cleanup_root(root)
    return {"cycles": CYCLES, "before": before, "after_first": sizes[0], "after_last": sizes[-1],
            "max": {k: max(s[k] for s in sizes) for k in before},
            "snapshotter_VmRSS_kB_at_end": rss}


def main():
    for tool in ("docker-registry", "skopeo", "containerd", "ctr", "runc"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing (bash scripts/install-deps.sh)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="strata-bench-snapops-") as tmp:
        rtmp = tempfile.mkdtemp(dir=tmp)
        reg = L.Registry(rtmp, False)
        try:
            link = L.Link(reg, False)
            L.run("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                  f"oci:{L.FIX}/debian:python", f"docker://{link.addr}/gz:1")
            results["latency"] = latency(tempfile.mkdtemp(dir=tmp), link.addr)
            print(json.dumps(results["latency"], indent=1), flush=True)
            results["gc"] = gc_cycles(tempfile.mkdtemp(dir=tmp), link.addr)
            print(json.dumps(results["gc"], indent=1), flush=True)
        finally:
            reg.stop()
    path = os.path.join(L.REPO, "bench/results-snapshotter-ops.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
