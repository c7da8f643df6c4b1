#!/usr/bin/env python3
"""strata benchmarks for issue 4, part 2: lazy mounts and cold starts.

  bash bench/run.sh lazy

The Debian+python fixture is converted to zstd:chunked by `strata convert`
and pushed (skopeo --preserve-digests) to a docker-registry that runs in
its own network namespace behind a veth pair shaped with `tc ... tbf` to
100 Mbit/s both ways; a small delaying TCP proxy in this script (127.0.0.1)
adds 10 ms each way (20 ms RTT). Every client talks to the proxy. The same
is repeated unshaped on loopback (registry on 127.0.0.1, no proxy).

Cold start: time from the command to the output of
`python3 -c 'import json, sqlite3; print(1)'`, fresh store each run:
  strata lazy        strata mount --lazy (prefetch none, then default) + chroot;
                     with the list python reads (recorded once with --record)
                     given to the mount, or placed first in the image by
                     `strata convert --prefetch-list` (no mount flag), or
                     placed first by `strata serve` ("prefetch": "optimize":
                     the service ran the same python command on a lazy mount
                     of the gzip source and recorded what it read; nobody
                     wrote a list; the mount reads it from the manifest)
  strata full        strata pull + strata mount + chroot
  containerd         ctr image pull + ctr run
  podman             podman pull + podman run
Bytes: what the proxy carried from the registry before the first output.

  python3 bench/lazy.py optimized     (bash bench/run.sh lazy-optimized)

only the shaped link and only the cases issue 17 compares (containerd,
prefetch none, recorded list, list placed first, optimized by serve); no
partial pull, no loopback, no warm reads. Results go to
bench/results-lazy-optimized.json (results-lazy.json is left as it is).

Partial pull (shaped): debian:base converted, then apps:base-updated
converted; full pull vs partial pull (store holding base).

Warm reads: a fully fetched lazy mount (composefs over [objects/, FUSE])
vs the composefs mount of the same image: read every file (cold page
cache, then warm), and first the files read while they arrived (still
bound to the FUSE data layer).
"""
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.environ.get("STRATA_FIXTURES", os.path.join(REPO, ".cache/fixtures"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
STRATA = os.environ.get("STRATA_BIN", os.path.join(TARGET, "release/strata"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
NS = "strata-bench"
HOST_IP, NS_IP = "10.213.7.1", "10.213.7.2"
PY = "import json, sqlite3; print(1)"


def run(*args, env=None, check=True, cwd=None):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    if check and r.returncode != 0:
        sys.exit(f"bench: {' '.join(map(str, args))} failed: {r.stderr.decode()}{r.stdout.decode()}")
    return r.stdout.decode()


def free_port():
    so = socket.socket()
    so.bind(("127.0.0.1", 0))
    p = so.getsockname()[1]
    so.close()
    return p


class JournaledTmp:
    """A scratch directory on a fresh journaled ext4 (a sparse image file,
    loop-mounted), for the daemons' state in cold-start benches.

    This machine's root is ext4 *without* a journal. There the kernel's
    inode allocator skips, one by one, every inode freed in the last 60 s
    (`recently_deleted` in fs/ext4/ialloc.c, used only without a journal):
    after one run deleted its ~10,000 files, the next run's file creations
    spent most of their time in that scan (`perf`: 60% of a pull). A
    node's /var/lib (ext4 with its default journal, xfs) does not do this.
    Every contender's state, and the registry's storage, goes here alike.
    Set BENCH_ROOT_FS=1 to measure on the root filesystem instead."""

    def __init__(self, prefix, size="24G"):
        self.prefix, self.size = prefix, size

    def __enter__(self):
        if os.environ.get("BENCH_ROOT_FS"):
            self.plain = tempfile.TemporaryDirectory(prefix=self.prefix)
            return self.plain.__enter__()
        self.plain = None
        self.img = tempfile.mktemp(prefix=self.prefix, suffix=".ext4", dir="/var/tmp")
        run("truncate", "-s", self.size, self.img)
        run("mkfs.ext4", "-q", "-F", self.img)
        self.dir = tempfile.mkdtemp(prefix=self.prefix)
        run("mount", "-o", "loop", self.img, self.dir)
        return self.dir

    def __exit__(self, *exc):
        if self.plain is not None:
            return self.plain.__exit__(*exc)
        # (the loop device goes with the mount: mount -o loop sets autoclear)
        # a daemon still exiting may hold it a moment: try again, then
        # detach it (a mount left behind keeps its image's blocks and a
        # loop device's writeback in every later run)
        for _ in range(20):
            if subprocess.run(["umount", "-R", self.dir], stderr=subprocess.DEVNULL).returncode == 0:
                break
            time.sleep(0.25)
        else:
            subprocess.run(["umount", "-R", "-l", self.dir], stderr=subprocess.DEVNULL)
        try:
            os.rmdir(self.dir)
        except OSError:
            pass
        os.unlink(self.img)
        return False


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# ---- network -----------------------------------------------------------

def netns_up():
    netns_down()
    run("ip", "netns", "add", NS)
    run("ip", "link", "add", "sb-host", "type", "veth", "peer", "name", "sb-reg")
    run("ip", "link", "set", "sb-reg", "netns", NS)
    run("ip", "addr", "add", f"{HOST_IP}/30", "dev", "sb-host")
    run("ip", "link", "set", "sb-host", "up")
    run("ip", "netns", "exec", NS, "ip", "addr", "add", f"{NS_IP}/30", "dev", "sb-reg")
    run("ip", "netns", "exec", NS, "ip", "link", "set", "sb-reg", "up")
    run("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
    for pre in ([], ["ip", "netns", "exec", NS]):
        dev = "sb-reg" if pre else "sb-host"
        run(*pre, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
            "rate", "100mbit", "burst", "64kb", "latency", "100ms")


def netns_down():
    subprocess.run(["ip", "link", "del", "sb-host"], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "netns", "del", NS], stderr=subprocess.DEVNULL)


class DelayProxy:
    """127.0.0.1:port -> upstream, each chunk held `delay` s per direction;
    counts bytes from upstream."""

    def __init__(self, upstream, delay):
        self.upstream = upstream
        self.delay = delay
        self.port = free_port()
        self.down = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._main, daemon=True).start()
        self.ready.wait()

    def _main(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self):
        server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.ready.set()
        async with server:
            await server.serve_forever()

    async def _pipe(self, r, w, count):
        q = asyncio.Queue()

        async def sender():
            while True:
                t, data = await q.get()
                if data is None:
                    break
                wait = t + self.delay - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                w.write(data)
                await w.drain()
            w.close()

        s = asyncio.ensure_future(sender())
        try:
            while True:
                data = await r.read(65536)
                if not data:
                    break
                if count:
                    self.down += len(data)
                await q.put((self.loop.time(), data))
        except Exception:
            pass
        await q.put((0, None))
        try:
            await s
        except Exception:
            pass

    async def _client(self, cr, cw):
        host, port = self.upstream
        try:
            ur, uw = await asyncio.open_connection(host, port)
        except Exception:
            cw.close()
            return
        await asyncio.gather(self._pipe(cr, uw, False), self._pipe(ur, cw, True))


class Registry:
    def __init__(self, tmp, netns):
        self.netns = netns
        host = NS_IP if netns else "127.0.0.1"
        self.port = 5000 if netns else free_port()
        self.storage = os.path.join(tmp, "registry")
        cfg = os.path.join(tmp, "reg.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                    f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
                    f"http:\n  addr: {host}:{self.port}\n")
        pre = ["ip", "netns", "exec", NS] if netns else []
        self.p = subprocess.Popen(pre + ["docker-registry", "serve", cfg],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.upstream = (host, self.port)
        for _ in range(200):
            try:
                socket.create_connection(self.upstream, timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)

    def stop(self):
        self.p.kill()
        self.p.wait()


class Link:
    """What clients talk to: the proxy (shaped) or the registry (loopback)."""

    def __init__(self, reg, shaped):
        self.proxy = DelayProxy(reg.upstream, 0.010) if shaped else DelayProxy(reg.upstream, 0.0)
        self.addr = f"127.0.0.1:{self.proxy.port}"

    def bytes(self):
        return self.proxy.down


# ---- contenders --------------------------------------------------------

def strata(root, *args, **kw):
    return run(STRATA, "--root", root, *args, **kw)


def wait_output(cmd, timeout=600):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    out = p.stdout.decode().strip()
    if out != "1":
        sys.exit(f"bench: {cmd} printed {out!r}: {p.stderr.decode()}")


def strata_lazy(tmp, ref, link, prefetch, extra=()):
    root = os.path.join(tmp, "s-lazy")
    mnt = os.path.join(tmp, "mnt-lazy")
    os.makedirs(mnt, exist_ok=True)
    b0 = link.bytes()
    t = time.monotonic()
    strata(root, "mount", "--lazy", "--plain-http", "--prefetch", prefetch, *extra, ref, mnt)
    t_mount = time.monotonic() - t
    wait_output(["chroot", mnt, "/usr/bin/python3", "-c", PY])
    dt = time.monotonic() - t
    print(f"    (mount {t_mount:.2f} s, python {dt - t_mount:.2f} s)", flush=True)
    b = link.bytes() - b0
    state = json.loads(strata(root, "--json", "mounts"))[0]
    strata(root, "umount", mnt)
    shutil.rmtree(root)
    return dt, b, state


def strata_full(tmp, ref, link):
    root = os.path.join(tmp, "s-full")
    mnt = os.path.join(tmp, "mnt-full")
    os.makedirs(mnt, exist_ok=True)
    b0 = link.bytes()
    t = time.monotonic()
    strata(root, "pull", "-q", "--plain-http", ref)
    strata(root, "mount", ref, mnt)
    wait_output(["chroot", mnt, "/usr/bin/python3", "-c", PY])
    dt = time.monotonic() - t
    b = link.bytes() - b0
    strata(root, "umount", mnt)
    shutil.rmtree(root)
    return dt, b


class Containerd:
    def __init__(self, tmp):
        self.dir = os.path.join(tmp, "containerd")
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "c.sock")
        cfg = os.path.join(self.dir, "config.toml")
        with open(cfg, "w") as f:
            f.write(f'version = 2\nroot = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
                    f'[grpc]\n  address = "{self.sock}"\n'
                    f'[plugins."io.containerd.grpc.v1.cri"]\n  disable_tcp_service = true\n')
        self.p = subprocess.Popen(["containerd", "--config", cfg],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            if subprocess.run(["ctr", "--address", self.sock, "version"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                break
            time.sleep(0.1)

    def ctr(self, *args, **kw):
        return run("ctr", "--address", self.sock, *args, **kw)

    def stop(self):
        self.p.kill()
        self.p.wait()
        subprocess.run(["umount", "-R", self.dir], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)


def containerd_run(tmp, ref, link, n):
    c = Containerd(tmp)
    try:
        image = ref.removeprefix("docker://")
        b0 = link.bytes()
        t = time.monotonic()
        c.ctr("image", "pull", "--plain-http", image)
        out = c.ctr("run", "--rm", image, f"bench-{n}", "/usr/bin/python3", "-c", PY).strip()
        dt = time.monotonic() - t
        if out != "1":
            sys.exit(f"bench: ctr run printed {out!r}")
        return dt, link.bytes() - b0
    finally:
        c.stop()


def podman_run(tmp, ref, link):
    root = os.path.join(tmp, "podman-root")
    runroot = os.path.join(tmp, "podman-run")
    base = ["podman", "--root", root, "--runroot", runroot, "--storage-driver", "overlay"]
    try:
        image = ref.removeprefix("docker://")
        b0 = link.bytes()
        t = time.monotonic()
        run(*base, "pull", "-q", "--tls-verify=false", image)
        out = run(*base, "run", "--rm", "--network", "none",
                  "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
                  image, "/usr/bin/python3", "-c", PY).strip()
        dt = time.monotonic() - t
        if out != "1":
            sys.exit(f"bench: podman run printed {out!r}")
        return dt, link.bytes() - b0
    finally:
        subprocess.run(base + ["system", "reset", "-f"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(runroot, ignore_errors=True)


def med(xs):
    return statistics.median(xs)


# the cases `lazy.py optimized` runs (issue 17: optimized images)
OPTIMIZED_CASES = (
    "strata lazy (prefetch none)",
    "strata lazy (recorded list)",
    "strata lazy (list placed first)",
    "strata lazy (placed first, then all)",
    "strata lazy (optimized by serve)",
    "strata lazy (optimized by serve, then all)",
    "containerd pull + run",
)


def optimize_by_serve(tmp, link):
    """The gzip Debian+python fixture pushed as it is, then converted by a
    fresh `strata serve` with "prefetch": "optimize" running the python
    command the cold starts run; returns the reference of the result and
    what the job said. The service is stopped before anything is timed."""
    import serve as S  # serve.py imports this module; import it only here

    src = f"{link.addr}/py:src"
    dst = f"{link.addr}/py:optimized"
    run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
        f"oci:{FIX}/debian:python", f"docker://{src}")
    svc = S.Service(tempfile.mkdtemp(dir=tmp, prefix="serve-") + "/svc", 1, [link.addr])
    try:
        cmd = ["/usr/bin/python3", "-c", PY]
        b0 = link.bytes()
        t = time.monotonic()
        st, job = svc.request("POST", "/v1/conversions", {
            "source": src, "format": "zstd:chunked", "target": dst,
            "prefetch": "optimize", "optimize": {"cmd": cmd, "timeout_s": 300}})
        if st != 202:
            svc.fail(f"POST optimize {src} -> {dst}: {st} {job}")
        job, t_end = svc.wait_all([job["id"]])[job["id"]]
        seconds = t_end - t
        link_bytes = link.bytes() - b0
        S.check_job(svc, job)
    finally:
        svc.stop()
    result = job.get("result") or {}
    recorded = result.get("recorded") or []
    if not recorded:
        sys.exit(f"bench: the optimize job recorded nothing: {job}")
    placed = sum(l.get("placed_first") or 0 for l in result.get("layers", []))
    man = json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{dst}"))
    ann = (man.get("annotations") or {}).get("dev.strata.lazy.prefetch")
    if ann != "\n".join(recorded):
        sys.exit(f"bench: {dst} lacks the recorded list in its annotation: {man}")
    info = {"job_seconds": seconds, "job_link_bytes": link_bytes,
            "recorded_files": len(recorded), "placed_first": placed,
            "recorded": recorded, "state": job["state"]}
    print(f"  strata serve optimize: {seconds:.1f} s (pull, convert, run, convert, push, verify), "
          f"{len(recorded)} files recorded, {placed} placed first", flush=True)
    return f"docker://{dst}", info


def cold_start(tmp, ref, link, image_bytes, optimized=None, only=None):
    """The cold-start cases; `optimized`: the reference of the image
    `strata serve` optimized (its cases are left out without it); `only`:
    the names of the cases to run (all when None)."""
    res = {}
    # what python reads, recorded once (`--record`), then prefetched first
    lst = os.path.join(tmp, "prefetch.list")
    strata_lazy(tmp, ref, link, "none", ("--record", lst))
    with_list = ("--prefetch-list", lst)
    # the same list placed first in the image (strata convert
    # --prefetch-list): the mount needs no flag, what leads comes in one
    # plain range per layer
    conv = os.path.join(tmp, "s-conv-placed")
    src = f"oci:{FIX}/debian:python"
    strata(conv, "pull", "-q", src)
    placed = os.path.join(tmp, "conv-placed")
    strata(conv, "convert", src, f"oci:{placed}:python", "--prefetch-list", lst)
    shutil.rmtree(conv)
    run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
        f"oci:{placed}:python", f"docker://{link.addr}/py:placed")
    ref_placed = f"docker://{link.addr}/py:placed"
    cases = [
        ("strata lazy (prefetch none)", lambda n: strata_lazy(tmp, ref, link, "none")[:2]),
        ("strata lazy (default prefetch)", lambda n: strata_lazy(tmp, ref, link, "all")[:2]),
        ("strata lazy (recorded list)", lambda n: strata_lazy(tmp, ref, link, "list", with_list)[:2]),
        ("strata lazy (list, then all)", lambda n: strata_lazy(tmp, ref, link, "all", with_list)[:2]),
        ("strata lazy (list placed first)", lambda n: strata_lazy(tmp, ref_placed, link, "list")[:2]),
        ("strata lazy (placed first, then all)",
         lambda n: strata_lazy(tmp, ref_placed, link, "all")[:2]),
        ("strata full pull + mount", lambda n: strata_full(tmp, ref, link)),
        ("containerd pull + run", lambda n: containerd_run(tmp, ref, link, n)),
        ("podman pull + run", lambda n: podman_run(tmp, ref, link)),
    ]
    if optimized is not None:
        # after the placed-first cases, before the full pulls: the same
        # mount, the list comes from the manifest the service wrote
        cases[6:6] = [
            ("strata lazy (optimized by serve)",
             lambda n: strata_lazy(tmp, optimized, link, "list")[:2]),
            ("strata lazy (optimized by serve, then all)",
             lambda n: strata_lazy(tmp, optimized, link, "all")[:2]),
        ]
    if only is not None:
        cases = [c for c in cases if c[0] in only]
    for name, fn in cases:
        ts, bs = [], []
        for n in range(RUNS):
            drop_caches()
            dt, b = fn(n)
            ts.append(dt)
            bs.append(b)
        res[name] = {"seconds": med(ts), "runs": ts, "bytes": med(bs),
                     "bytes_fraction": med(bs) / image_bytes}
        print(f"  {name:42s} {med(ts):7.2f} s  {med(bs)/1e6:7.1f} MB "
              f"({100*med(bs)/image_bytes:5.1f}% of the image)  runs {['%.2f' % x for x in ts]}",
              flush=True)
    return res


def largest(root, k=16):
    sizes = []
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p) and os.path.isfile(p):
                sizes.append((os.path.getsize(p), os.path.relpath(p, root)))
    return [p for _, p in sorted(sizes)[-k:]]


def read_file_raw(p):
    """open/read/close, as cat, tar, cp and the dynamic loader do."""
    n = 0
    fd = os.open(p, os.O_RDONLY)
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return n
            n += len(b)
    finally:
        os.close(fd)


def read_file_py(p):
    """Python's open(): it also asks isatty() (an ioctl; FUSE would forward it)."""
    n = 0
    with open(p, "rb") as fh:
        while True:
            b = fh.read(1 << 20)
            if not b:
                return n
            n += len(b)


def read_all(root, only=None, read=read_file_py):
    n = 0
    if only is not None:
        walk = [(root, None, only)]
    else:
        walk = ((d, None, fs) for d, _, fs in os.walk(root))
    for d, _, files in walk:
        for f in files:
            p = os.path.join(d, f)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            try:
                n += read(p)
            except OSError:
                pass
    return n


def warm_reads(tmp, ref):
    """Fully fetched lazy mount vs composefs mount of the same image."""
    root = os.path.join(tmp, "s-warm")
    lazy, cfs = os.path.join(tmp, "mnt-wl"), os.path.join(tmp, "mnt-wc")
    os.makedirs(lazy, exist_ok=True)
    os.makedirs(cfs, exist_ok=True)
    strata(root, "mount", "--lazy", "--plain-http", "--prefetch", "none", ref, lazy)
    read_all(lazy)  # fetch everything through the lazy mount
    # the daemon notices within a second that every file is local (opens
    # then stop reaching it); wait for that rather than measure the switch
    t = time.monotonic()
    while time.monotonic() - t < 30:
        ms = json.loads(strata(root, "--json", "mounts"))
        m = [m for m in ms if os.path.realpath(m["dir"]) == os.path.realpath(lazy)][0]
        if m["files_local"] == m["files_total"]:
            break
        time.sleep(0.2)
    else:
        raise SystemExit("the lazy mount never reported every file local")
    res = {}
    # the image is complete in objects/ now; pull records it (no download)
    strata(root, "pull", "-q", "--plain-http", ref)
    strata(root, "mount", ref, cfs)
    big = largest(cfs)
    # files read while they arrived stay bound to the FUSE data layer
    # until the kernel forgets their inodes (every "cold" run below drops
    # them): measure their re-reads first, page cache warm
    bound = {}
    for work, read in (("every file, open/read/close", read_file_raw),
                       ("every file, Python open()", read_file_py)):
        ts = []
        for _ in range(RUNS):
            t = time.monotonic()
            n = read_all(lazy, None, read)
            ts.append(time.monotonic() - t)
        bound[work] = {"seconds": med(ts), "bytes": n, "MBps": n / med(ts) / 1e6}
        print(f"  {work}: lazy, files bound to FUSE, warm {med(ts):7.3f} s  "
              f"{n/med(ts)/1e6:8.0f} MB/s", flush=True)
    works = (
        ("every file, open/read/close", None, read_file_raw),
        ("every file, Python open()", None, read_file_py),
        ("16 largest files", big, read_file_raw),
    )
    mounts = (("lazy mount", lazy), ("composefs", cfs))
    for work, only, read in works:
        for temp in ("cold", "warm"):
            # the two mounts alternate, so the VM's drift hits both alike
            ts = {name: [] for name, _ in mounts}
            for _ in range(RUNS):
                for name, d in mounts:
                    if temp == "cold":
                        drop_caches()
                    else:
                        read_all(d, only, read)
                    t = time.monotonic()
                    n = read_all(d, only, read)
                    ts[name].append(time.monotonic() - t)
            for name, _ in mounts:
                key = f"{work}: {name} {temp}"
                sec = med(ts[name])
                res[key] = {"seconds": sec, "bytes": n, "MBps": n / sec / 1e6}
                print(f"  {key:50s} {sec:7.3f} s  {n/sec/1e6:8.0f} MB/s", flush=True)
        for temp in ("cold", "warm"):
            r = (res[f"{work}: lazy mount {temp}"]["MBps"]
                 / res[f"{work}: composefs {temp}"]["MBps"])
            res[f"{work}: ratio {temp}"] = r
            print(f"  {work}: lazy/composefs throughput {temp}: {r:.2f}", flush=True)
        if work in bound:
            res[f"{work}: lazy mount warm, read while arriving"] = bound[work]
            r = bound[work]["MBps"] / res[f"{work}: composefs warm"]["MBps"]
            res[f"{work}: ratio warm, read while arriving"] = r
            print(f"  {work}: lazy (read while arriving)/composefs warm: {r:.2f}", flush=True)
    for d in (lazy, cfs):
        strata(root, "umount", d)
    shutil.rmtree(root)
    return res


def partial_shaped(tmp, link_addr, link):
    """debian:base then apps:base-updated, both converted; full vs partial pull."""
    res = {}
    conv = os.path.join(tmp, "s-conv2")
    apps = os.path.join(FIX, "apps")
    out = os.path.join(tmp, "conv-apps")
    for tag in ("base", "base-updated"):
        src = f"oci:{apps}:{tag}" if tag == "base-updated" else f"oci:{FIX}/debian:base"
        strata(conv, "pull", "-q", src)
        strata(conv, "convert", src, f"oci:{out}:{tag}")
        run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
            f"oci:{out}:{tag}", f"docker://{link_addr}/part:{tag}")
    shutil.rmtree(conv)
    base_ref = f"docker://{link_addr}/part:base"
    upd_ref = f"docker://{link_addr}/part:base-updated"
    for kind in ("full", "partial"):
        ts, bs = [], []
        for _ in range(RUNS):
            root = os.path.join(tmp, "s-part")
            if kind == "partial":
                strata(root, "pull", "-q", "--plain-http", base_ref)
            b0 = link.bytes()
            t = time.monotonic()
            strata(root, "pull", "-q", "--plain-http", upd_ref)
            ts.append(time.monotonic() - t)
            bs.append(link.bytes() - b0)
            shutil.rmtree(root)
        res[kind] = {"seconds": med(ts), "bytes": med(bs), "runs": ts}
        print(f"  {kind + ' pull of base-updated':34s} {med(ts):7.2f} s  {med(bs)/1e6:7.2f} MB", flush=True)
    return res


def convert_vs_ctr_remote():
    """strata convert vs ctr-remote (stargz-snapshotter) converting the same
    image inside containerd: eStargz and zstd:chunked."""
    res = {}
    with tempfile.TemporaryDirectory(prefix="strata-bench-conv-") as tmp:
        layout = os.path.join(FIX, "debian")
        root = os.path.join(tmp, "s")
        src = f"oci:{layout}:python"
        strata(root, "pull", "-q", src)
        ts = []
        for i in range(RUNS):
            out = os.path.join(tmp, f"out{i}")
            subprocess.run(["sync"], check=True)
            t = time.monotonic()
            strata(root, "convert", src, f"oci:{out}:python")
            ts.append(time.monotonic() - t)
            shutil.rmtree(out)
        res["strata convert zstd:chunked"] = med(ts)
        c = Containerd(tmp)
        try:
            archive = os.path.join(tmp, "layout.tar")
            run("tar", "-C", layout, "-cf", archive, ".")
            c.ctr("images", "import", "--base-name", "bench/debian", archive)
            names = c.ctr("images", "ls", "-q").split()
            srcname = next(n for n in names if n.endswith(":python"))
            for fmt, flag in (("eStargz", "--estargz"), ("zstd:chunked", "--zstdchunked")):
                ts = []
                for i in range(RUNS):
                    dst = f"bench/conv-{fmt.replace(':', '-')}:{i}"
                    t = time.monotonic()
                    run("ctr-remote", "--address", c.sock, "image", "convert", flag, "--oci",
                        srcname, dst)
                    ts.append(time.monotonic() - t)
                    c.ctr("images", "rm", dst)
                res[f"ctr-remote convert {fmt}"] = med(ts)
        finally:
            c.stop()
    for k, v in res.items():
        print(f"  {k:40s} {v:7.2f} s   ({v / res['strata convert zstd:chunked']:.1f}x strata)",
              flush=True)
    with open(os.path.join(REPO, "bench/results-convert.json"), "w") as f:
        json.dump(res, f, indent=2)


def ratios(res, cs, cases):
    for case in cases:
        if case in cs:
            r = cs["containerd pull + run"]["seconds"] / cs[case]["seconds"]
            res[f"containerd / {case}"] = r
            print(f"  containerd / {case}: {r:.1f}x", flush=True)


def optimized_only():
    """`lazy.py optimized`: issue 17's cases on the shaped link alone."""
    for tool in ("docker-registry", "skopeo", "containerd", "ctr", "runc", "tc", "ip"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing (bash scripts/install-deps.sh)")
    import serve as S
    watch = S.Watch()
    results = {"runs": RUNS, "strata_sha256": run("sha256sum", STRATA).split()[0],
               "cases": list(OPTIMIZED_CASES)}
    with tempfile.TemporaryDirectory(prefix="strata-bench-lazy-") as tmp:
        conv = os.path.join(tmp, "s-conv")
        src = f"oci:{FIX}/debian:python"
        strata(conv, "pull", "-q", src)
        out = os.path.join(tmp, "conv")
        strata(conv, "convert", src, f"oci:{out}:python")
        shutil.rmtree(conv)
        idx = json.load(open(os.path.join(out, "index.json")))
        man = json.load(open(os.path.join(out, "blobs/sha256", idx["manifests"][0]["digest"][7:])))
        image_bytes = sum(l["size"] for l in man["layers"])
        results["image_bytes"] = image_bytes
        print(f"image: debian:python as zstd:chunked, {image_bytes/1e6:.1f} MB compressed", flush=True)
        print("== shaped (100 Mbit/s, 20 ms RTT)", flush=True)
        netns_up()
        reg = Registry(tempfile.mkdtemp(dir=tmp), True)
        try:
            link = Link(reg, True)
            run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
                f"oci:{out}:python", f"docker://{link.addr}/py:1")
            ref = f"docker://{link.addr}/py:1"
            opt_ref, opt = optimize_by_serve(tmp, link)
            cs = cold_start(tmp, ref, link, image_bytes, opt_ref, OPTIMIZED_CASES)
            # the list recorded by hand (--record) vs the one serve recorded
            hand = [l.strip() for l in open(os.path.join(tmp, "prefetch.list")) if l.strip()]
            opt["hand_recorded_files"] = len(hand)
            opt["only_in_hand_list"] = sorted(set(hand) - set(opt["recorded"]))
            opt["only_in_serve_list"] = sorted(set(opt["recorded"]) - set(hand))
            print(f"  lists: --record {len(hand)} files, serve {len(opt['recorded'])}; "
                  f"{len(opt['only_in_hand_list'])} only in --record's, "
                  f"{len(opt['only_in_serve_list'])} only in serve's", flush=True)
            results["shaped"] = {"cold_start": cs, "optimize_job": opt}
            ratios(results["shaped"], cs, OPTIMIZED_CASES[:-1])
        finally:
            reg.stop()
            netns_down()
    results["watch"] = watch.summary()
    print(f"  beside the bench: {results['watch']}", flush=True)
    path = os.path.join(REPO, "bench/results-lazy-optimized.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


def main():
    if sys.argv[1:] == ["convert"]:
        return convert_vs_ctr_remote()
    if sys.argv[1:] == ["optimized"]:
        return optimized_only()
    if sys.argv[1:] == ["warm"]:
        with tempfile.TemporaryDirectory(prefix="strata-bench-warm-") as tmp:
            conv = os.path.join(tmp, "s-conv")
            src = f"oci:{FIX}/debian:python"
            strata(conv, "pull", "-q", src)
            out = os.path.join(tmp, "conv")
            strata(conv, "convert", src, f"oci:{out}:python")
            reg = Registry(tempfile.mkdtemp(dir=tmp), False)
            try:
                addr = f"127.0.0.1:{reg.port}"
                run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
                    f"oci:{out}:python", f"docker://{addr}/py:1")
                warm = warm_reads(tmp, f"docker://{addr}/py:1")
            finally:
                reg.stop()
        path = os.path.join(REPO, "bench/results-lazy.json")
        results = json.load(open(path)) if os.path.exists(path) else {}
        results["warm_reads"] = warm
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote warm_reads to {path}")
        return
    for tool in ("docker-registry", "skopeo", "containerd", "ctr", "runc", "podman", "tc", "ip"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing (bash scripts/install-deps.sh)")
    results = {"runs": RUNS}
    with tempfile.TemporaryDirectory(prefix="strata-bench-lazy-") as tmp:
        # the converted image, as a layout
        conv = os.path.join(tmp, "s-conv")
        src = f"oci:{FIX}/debian:python"
        strata(conv, "pull", "-q", src)
        out = os.path.join(tmp, "conv")
        strata(conv, "convert", src, f"oci:{out}:python")
        shutil.rmtree(conv)
        idx = json.load(open(os.path.join(out, "index.json")))
        man = json.load(open(os.path.join(out, "blobs/sha256", idx["manifests"][0]["digest"][7:])))
        image_bytes = sum(l["size"] for l in man["layers"])
        results["image_bytes"] = image_bytes
        print(f"image: debian:python as zstd:chunked, {image_bytes/1e6:.1f} MB compressed", flush=True)

        for shaped in (True, False):
            label = "shaped (100 Mbit/s, 20 ms RTT)" if shaped else "loopback"
            print(f"== {label}", flush=True)
            if shaped:
                netns_up()
            rtmp = tempfile.mkdtemp(dir=tmp)
            reg = Registry(rtmp, shaped)
            try:
                link = Link(reg, shaped)
                run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
                    f"oci:{out}:python", f"docker://{link.addr}/py:1")
                ref = f"docker://{link.addr}/py:1"
                key = "shaped" if shaped else "loopback"
                opt_ref, opt = optimize_by_serve(tmp, link)
                results[key] = {"cold_start": cold_start(tmp, ref, link, image_bytes, opt_ref),
                                "optimize_job": opt}
                results[key]["partial_pull"] = partial_shaped(tmp, link.addr, link)
                if not shaped:
                    print("== warm reads (loopback registry, fully fetched)", flush=True)
                    results["warm_reads"] = warm_reads(tmp, ref)
                ratios(results[key], results[key]["cold_start"],
                       ("strata lazy (prefetch none)", "strata lazy (recorded list)",
                        "strata lazy (list, then all)", "strata lazy (list placed first)",
                        "strata lazy (placed first, then all)",
                        "strata lazy (optimized by serve)",
                        "strata lazy (optimized by serve, then all)"))
            finally:
                reg.stop()
                if shaped:
                    netns_down()
    path = os.path.join(REPO, "bench/results-lazy.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
