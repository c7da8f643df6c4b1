#!/usr/bin/env python3
"""strata benchmark for issue 14 item 9: what a lazy mount costs in memory.

  bash bench/run.sh lazy-rss
  python3 bench/lazy_rss.py            # the same, without the build

The Debian+python fixture (6.6k files) is converted to zstd:chunked by
`strata convert` twice (plainly, and with a few files placed first, so two
distinct manifests), and pushed under four tags to a docker-registry on
127.0.0.1. Then 20 lazy mounts (`strata mount --lazy --prefetch none`) are
started, cycling through the tags, each with its own fresh store (so every
daemon fetches what is read in it instead of finding it in a shared
objects/). In each mount the python3 binary and a few .py files are read
with cat. For each daemon, once after the mounts, again 2 s after the
reads, and once more `LAZY_RSS_QUIET` (8) s later, once the daemon has
seen its reads go quiet (it trims malloc then, and idle read workers end):

  VmRSS    /proc/PID/status  (resident; counts the binary's shared pages
                              in every process)
  Pss      /proc/PID/smaps_rollup (shared pages divided among sharers)
  Anon     Pss_Anon: the heap, stacks, buffers: what a mount really costs
  threads  /proc/PID/status Threads

Variants (`LAZY_RSS_VARIANTS`, comma separated; default
`default,MALLOC_ARENA_MAX=2`): `default` runs the daemons as they are;
`NAME=VALUE[+NAME=VALUE]` sets environment variables for `strata mount`
(the daemon inherits them), e.g. `MALLOC_ARENA_MAX=2` or
`MALLOC_MMAP_THRESHOLD_=131072` (glibc's mallopt knobs); a `+trim` part
makes gdb call `malloc_trim(0)` in every daemon before each sample: what
the daemon would do itself after the mount is ready and after a burst of
reads (an experiment: needs gdb, adds seconds per daemon). Every variant
starts from fresh stores.

Environment: `STRATA_BIN` (default target/release/strata),
`LAZY_RSS_MOUNTS` (20), `LAZY_RSS_LABEL` (key in
bench/results-lazy-rss.json, default `current`), `BENCH_TMP`,
`LAZY_RSS_SMAPS=1` (also keep each daemon's /proc/PID/smaps grouped by
mapping kind, for finding where the memory goes).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.environ.get("STRATA_FIXTURES", os.path.join(REPO, ".cache/fixtures"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
STRATA = os.environ.get("STRATA_BIN", os.path.join(TARGET, "release/strata"))
MOUNTS = int(os.environ.get("LAZY_RSS_MOUNTS", "20"))
LABEL = os.environ.get("LAZY_RSS_LABEL", "current")
VARIANTS = os.environ.get("LAZY_RSS_VARIANTS", "default,MALLOC_ARENA_MAX=2").split(",")
SMAPS = os.environ.get("LAZY_RSS_SMAPS") == "1"
QUIET = float(os.environ.get("LAZY_RSS_QUIET", "8"))
GOAL_KB = 16 * 1024

# what is read in every mount: python's binary and a few modules
READS = [
    "usr/bin/python3.11",
    "usr/lib/python3.11/os.py",
    "usr/lib/python3.11/json/__init__.py",
    "usr/lib/python3.11/json/decoder.py",
    "usr/lib/python3.11/sqlite3/__init__.py",
    "usr/lib/python3.11/collections/__init__.py",
    "usr/lib/python3.11/typing.py",
]
# placed first in the second conversion (another manifest, same tree)
PLACED = ["/usr/bin/python3.11", "/usr/lib/python3.11/os.py"]


def run(*args, env=None, check=True):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    if check and r.returncode != 0:
        sys.exit(f"bench: {' '.join(map(str, args))} failed: {r.stderr.decode()}{r.stdout.decode()}")
    return r.stdout.decode()


def strata(root, *args, env=None, check=True):
    return run(STRATA, "--root", root, *args, env=env, check=check)


def free_port():
    so = socket.socket()
    so.bind(("127.0.0.1", 0))
    p = so.getsockname()[1]
    so.close()
    return p


class Registry:
    def __init__(self, tmp):
        self.port = free_port()
        cfg = os.path.join(tmp, "reg.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                    f"storage:\n  filesystem:\n    rootdirectory: {tmp}/registry\n"
                    f"http:\n  addr: 127.0.0.1:{self.port}\n")
        self.p = subprocess.Popen(["docker-registry", "serve", cfg],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        self.addr = f"127.0.0.1:{self.port}"

    def stop(self):
        self.p.kill()
        self.p.wait()


def proc_kb(pid, path, keys):
    out = {}
    with open(f"/proc/{pid}/{path}") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


def smaps_by_kind(pid):
    """Rss and Pss (kB) of /proc/PID/smaps grouped: the binary, libraries,
    [heap], thread arenas and big anonymous maps, [stack], other."""
    exe = os.readlink(f"/proc/{pid}/exe")
    groups = {}
    kind = None
    size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                size = (hi - lo) // 1024
                name = head[5] if len(head) > 5 else ""
                if name == exe:
                    kind = "binary"
                elif name.startswith("/"):
                    kind = "libraries"
                elif name == "[heap]":
                    kind = "heap (main arena)"
                elif name.startswith("[stack"):
                    kind = "main stack"
                elif name:
                    kind = name
                elif size == 4:
                    kind = "guard/small anon"
                else:
                    kind = "anon (thread arenas, stacks, big buffers)"
                g = groups.setdefault(kind, {"maps": 0, "size_kb": 0, "rss_kb": 0, "pss_kb": 0})
                g["maps"] += 1
                g["size_kb"] += size
            elif head and head[0] in ("Rss:", "Pss:"):
                groups[kind]["rss_kb" if head[0] == "Rss:" else "pss_kb"] += int(head[1])
    return groups


def sample(pid):
    st = proc_kb(pid, "status", {"VmRSS", "Threads", "VmSize", "RssAnon", "RssFile"})
    # Threads is a count, not kB
    roll = proc_kb(pid, "smaps_rollup", {"Pss", "Pss_Anon", "Pss_File", "Rss"})
    s = {"rss_kb": st["VmRSS"], "rss_anon_kb": st["RssAnon"], "rss_file_kb": st["RssFile"],
         "pss_kb": roll["Pss"], "pss_anon_kb": roll["Pss_Anon"], "pss_file_kb": roll["Pss_File"],
         "threads": st["Threads"], "vsz_kb": st["VmSize"]}
    if SMAPS:
        s["smaps"] = smaps_by_kind(pid)
    return s


def malloc_trim(pid):
    """Have `pid` call glibc's malloc_trim(0) (the `trim` variant)."""
    run("gdb", "-nx", "-batch", "-iex", "set auto-load off", "-p", str(pid),
        "-ex", "call (int)malloc_trim(0)")


def totals(samples):
    keys = ("rss_kb", "pss_kb", "pss_anon_kb", "threads")
    t = {k: sum(s[k] for s in samples) for k in keys}
    t.update({f"max_{k}": max(s[k] for s in samples) for k in keys})
    t["mean_rss_kb"] = t["rss_kb"] / len(samples)
    t["mean_pss_kb"] = t["pss_kb"] / len(samples)
    return t


def daemons(roots, mnts):
    pids = []
    for root, mnt in zip(roots, mnts):
        ms = json.loads(strata(root, "--json", "mounts"))
        m = [m for m in ms if m.get("kind") == "lazy"
             and os.path.realpath(m["dir"]) == os.path.realpath(mnt)]
        if not m:
            sys.exit(f"bench: no lazy mount at {mnt}: {ms}")
        pids.append(m[0]["pid"])
    return pids


def one_variant(tmp, refs, variant):
    env = dict(os.environ)
    trim = False
    if variant != "default":
        for kv in variant.split("+"):
            if kv == "trim":
                trim = True
                continue
            k, _, v = kv.partition("=")
            env[k] = v
    measure = (lambda p: malloc_trim(p) or sample(p)) if trim else sample
    base = tempfile.mkdtemp(prefix="v-", dir=tmp)
    roots = [os.path.join(base, f"s{i}") for i in range(MOUNTS)]
    mnts = [os.path.join(base, f"m{i}") for i in range(MOUNTS)]
    mounted = []
    try:
        t = time.monotonic()
        for i, (root, mnt) in enumerate(zip(roots, mnts)):
            os.makedirs(mnt)
            strata(root, "mount", "--lazy", "--plain-http", "--prefetch", "none",
                   refs[i % len(refs)], mnt, env=env)
            mounted.append((root, mnt))
        t_mount = time.monotonic() - t
        pids = daemons(roots, mnts)
        time.sleep(2)
        idle = [measure(p) for p in pids]
        t = time.monotonic()
        for mnt in mnts:
            with open(os.devnull, "w") as null:
                subprocess.run(["cat"] + [os.path.join(mnt, r) for r in READS],
                               stdout=null, check=True)
        t_read = time.monotonic() - t
        time.sleep(2)
        read = [measure(p) for p in pids]
        # the daemon trims once fetching was quiet 5 s; idle read workers end after 5 s
        time.sleep(QUIET)
        quiet = [measure(p) for p in pids]
        return {
            "variant": variant, "mounts": MOUNTS, "refs": refs,
            "seconds_mount_all": t_mount, "seconds_read_all": t_read,
            "idle": {"per_mount": idle, "total": totals(idle)},
            "after_reads": {"per_mount": read, "total": totals(read)},
            "after_quiet": {"per_mount": quiet, "total": totals(quiet), "seconds": QUIET},
        }
    finally:
        for root, mnt in mounted:
            strata(root, "umount", mnt, check=False)
        shutil.rmtree(base, ignore_errors=True)


def mb(kb):
    return f"{kb / 1024:.1f}"


def table(res):
    print(f"\n### {res['variant']}: {res['mounts']} lazy mounts "
          f"(mounted in {res['seconds_mount_all']:.1f} s, read in {res['seconds_read_all']:.1f} s)")
    q = res.get("after_quiet")
    qs = f" (after quiet: {q['seconds']:.0f} s later)" if q else ""
    print(f"| mount | idle RSS MB | idle PSS MB | idle threads | after reads RSS MB | PSS MB | anon PSS MB | threads |"
          + (" quiet RSS MB | quiet PSS MB | quiet threads |" if q else "") + qs)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if q else ""))
    qp = q["per_mount"] if q else [None] * len(res["idle"]["per_mount"])
    for i, (a, b, c) in enumerate(zip(res["idle"]["per_mount"], res["after_reads"]["per_mount"], qp)):
        print(f"| {i} | {mb(a['rss_kb'])} | {mb(a['pss_kb'])} | {a['threads']} | "
              f"{mb(b['rss_kb'])} | {mb(b['pss_kb'])} | {mb(b['pss_anon_kb'])} | {b['threads']} |"
              + (f" {mb(c['rss_kb'])} | {mb(c['pss_kb'])} | {c['threads']} |" if c else ""))
    a, b = res["idle"]["total"], res["after_reads"]["total"]
    c = q["total"] if q else None
    print(f"| **total** | {mb(a['rss_kb'])} | {mb(a['pss_kb'])} | {a['threads']} | "
          f"{mb(b['rss_kb'])} | {mb(b['pss_kb'])} | {mb(b['pss_anon_kb'])} | {b['threads']} |"
          + (f" {mb(c['rss_kb'])} | {mb(c['pss_kb'])} | {c['threads']} |" if c else ""))
    print(f"| **max** | {mb(a['max_rss_kb'])} | {mb(a['max_pss_kb'])} | {a['max_threads']} | "
          f"{mb(b['max_rss_kb'])} | {mb(b['max_pss_kb'])} | {mb(b['max_pss_anon_kb'])} | "
          f"{b['max_threads']} |"
          + (f" {mb(c['max_rss_kb'])} | {mb(c['max_pss_kb'])} | {c['max_threads']} |" if c else ""))
    # PSS: RSS counts the binary's shared pages (~8-10 MB) in every daemon
    ok = b["max_pss_kb"] <= GOAL_KB
    print(f"goal (<= 16 MB PSS per mount with {res['mounts']} active): "
          f"{'met' if ok else 'not met'} (largest PSS after reads {mb(b['max_pss_kb'])} MB, "
          f"mean PSS {mb(b['mean_pss_kb'])} MB, total {mb(b['pss_kb'])} MB; "
          f"largest RSS {mb(b['max_rss_kb'])} MB)", flush=True)


def main():
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing (bash scripts/install-deps.sh)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="strata-bench-rss-", dir=os.environ.get("BENCH_TMP")) as tmp:
        conv = os.path.join(tmp, "s-conv")
        src = f"oci:{FIX}/debian:python"
        strata(conv, "pull", "-q", src)
        plain, placed = os.path.join(tmp, "conv"), os.path.join(tmp, "conv-placed")
        lst = os.path.join(tmp, "placed.list")
        with open(lst, "w") as f:
            f.write("\n".join(PLACED) + "\n")
        strata(conv, "convert", src, f"oci:{plain}:python")
        strata(conv, "convert", src, f"oci:{placed}:python", "--prefetch-list", lst)
        shutil.rmtree(conv)
        reg = Registry(tmp)
        try:
            refs = []
            for layout, tags in ((plain, ("a", "b")), (placed, ("c", "d"))):
                for tag in tags:
                    run("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        "--preserve-digests", f"oci:{layout}:python",
                        f"docker://{reg.addr}/py:{tag}")
                    refs.append(f"docker://{reg.addr}/py:{tag}")
            for v in VARIANTS:
                res = one_variant(tmp, refs, v)
                results[v] = res
                table(res)
        finally:
            reg.stop()
    path = os.path.join(REPO, "bench/results-lazy-rss.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    old[LABEL] = {"strata": STRATA, "machine": f"{os.cpu_count()} vCPU", "variants": results}
    with open(path, "w") as f:
        json.dump(old, f, indent=2)
    print(f"wrote {path} [{LABEL}]")


if __name__ == "__main__":
    main()
