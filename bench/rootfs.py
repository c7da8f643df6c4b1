#!/usr/bin/env python3
"""strata benchmarks for issue 5: VM templates (`strata rootfs`), peers
measured in the same run.

  bash bench/run.sh rootfs     # release build + fixtures, runs this

Image: the Debian+python fixture (`oci:$STRATA_FIXTURES/debian:python`).
Every timed run is preceded by `sync`, a 2 s pause (writeback of the last
run settles) and `echo 3 > /proc/sys/vm/drop_caches`; "warm" runs then read
their inputs once (the OCI layout for umoci, the store for strata).
Outputs are durable when the clock stops: strata syncs its objects
(syncfs); the peers' image files are fsync'ed (`sync FILE`) inside the
timed region.

  1. Build a 2 GiB ext4 template from the image:
       strata   `strata pull oci:...` into a fresh store (untimed), then
                `strata rootfs build --from IMAGE --size 2GiB --no-cache`
       (a)      `umoci raw unpack` of the OCI layout + `mke2fs -t ext4 -d
                ROOTFS -b 4096 FILE 2G`
       (b)      `umoci raw unpack` + `mkfs.ext4` of a 2 GiB file + `mount -o
                loop` + `cp -a` + `umount`
     Peers are reported with and without the unpack (timed separately).
  2. Resize the template 2 GiB -> 8 GiB (`rootfs build --from-template T
     --size 8GiB --no-cache`): time, chunks new vs the parent, map size,
     store growth.
  3. A derived template with a few MB of provisioning files and replaced
     configs (`--add DIR`) vs the same change as a qcow2 overlay over the
     exported raw base (`qemu-img rebase` of an overlay of the derived raw
     onto the base raw, cluster sizes 64K/16K/4K; `qemu-img convert -B`
     for the record), every overlay checked with `qemu-img compare`.
  4. Chunk size: the exported raws (base, resized, derived) chunked at 4K,
     16K, 64K, 256K and 1M in Python (holes skipped with SEEK_DATA/
     SEEK_HOLE, zero chunks dropped, SHA-256): objects, stored bytes, map
     size (the map JSON built exactly as strata writes it; checked against
     the real 64K maps byte for byte) and the bytes each derived template
     adds.
  5. Serve: `strata rootfs serve` + `mount -o loop,ro` + `chroot MNT
     python3 -c 'print(1)'`, from the local store (chunks read) and from a
     registry (`rootfs push`, fresh store, `rootfs pull` of the map only,
     chunks fetched on demand through a byte-counting proxy), page cache
     dropped.

Prints a markdown summary; raw numbers go to bench/results-rootfs.json.
"""
import errno
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no bench/__pycache__ from the import below
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lazy import Link, Registry  # noqa: E402  docker-registry on 127.0.0.1 + counting proxy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.environ.get("STRATA_FIXTURES", os.path.join(REPO, ".cache/fixtures"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
STRATA = os.environ.get("STRATA_BIN", os.path.join(TARGET, "release/strata"))
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
PAUSE = float(os.environ.get("BENCH_PAUSE", "2"))
DEBIAN = os.path.join(FIX, "debian")
IMAGE = f"oci:{DEBIAN}:python"
SIZE, SIZE_BYTES = "2GiB", 2 << 30
BIG = "8GiB"
CHUNK_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
STRATA_CHUNK = 64 << 10
WINDOW = 1 << 20  # read unit of the chunk analysis (a multiple of every chunk size)
# per stored object on the store's ext4: one inode (256 B) + a directory
# entry (8 B + a 62-character name, 4-byte aligned): an estimate
OBJECT_OVERHEAD = 256 + 72
PY = "print(1)"
MB = 1e6


class BenchError(Exception):
    pass


def run(*args, env=None, check=True, timeout=600):
    r = subprocess.run([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(map(str, args))} failed ({r.returncode}): "
                         f"{r.stderr.decode().strip()}{r.stdout.decode().strip()}")
    return r.stdout.decode()


def strata(root, *args, **kw):
    return run(STRATA, "--root", root, *args, **kw)


def strata_json(root, *args):
    return json.loads(strata(root, "--json", *args))


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_tree(path):
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as fh:
                    while fh.read(1 << 20):
                        pass


def settle(cold, inputs=()):
    """Before a timed run: writeback done, page cache dropped; for a warm
    run the inputs are then read once. (Not simply "leave the cache as it
    is": this machine runs DAMON proactive reclaim (kdamond, pageout), and
    with a page cache left full of earlier runs' pages the peers' runs got
    up to 2x slower than cold ones, at random.)"""
    subprocess.run(["sync"], check=True)
    time.sleep(PAUSE)
    drop_caches()
    if not cold:
        for p in inputs:
            read_tree(p)


def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rm(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def med(xs):
    return statistics.median(xs)


def sizes_of(path):
    st = os.stat(path)
    return {"apparent": st.st_size, "actual": st.st_blocks * 512}


def tree_bytes(path):
    """(apparent, actual) bytes of every file under path."""
    ap = ac = 0
    for d, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(d, f))
            ap += st.st_size
            ac += st.st_blocks * 512
    return ap, ac


def store_bytes(root):
    """Bytes of objects/ + blocks/ (chunks and maps; image objects too)."""
    ap = ac = 0
    for sub in ("objects", "blocks"):
        a, b = tree_bytes(os.path.join(root, sub))
        ap += a
        ac += b
    return {"apparent": ap, "actual": ac}


def fmt_runs(xs):
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"


class Cleanup:
    """What must go whatever happens: mounts, served files, registries,
    loop devices backed by files under tmp."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.mounts = []
        self.served = []
        self.regs = []

    def mount(self, *args):
        run("mount", *args)
        self.mounts.append(args[-1])

    def umount(self, target):
        run("umount", target)
        self.mounts.remove(target)

    def serve(self, root, name, f, *extra):
        self.served.append((root, f))
        strata(root, "-q", "rootfs", "serve", name, f, *extra)

    def unserve(self, root, f):
        strata(root, "-q", "umount", f)
        self.served.remove((root, f))

    def all(self):
        for m in reversed(self.mounts):
            if subprocess.run(["umount", m], stderr=subprocess.DEVNULL).returncode != 0:
                subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)
        self.mounts.clear()
        for root, f in reversed(self.served):
            subprocess.run([STRATA, "--root", root, "-q", "umount", f],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.served.clear()
        for reg in self.regs:
            reg.stop()
        self.regs.clear()
        out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.decode()
        for line in out.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[1].strip().startswith(self.tmp + "/"):
                subprocess.run(["losetup", "-d", parts[0]], stderr=subprocess.DEVNULL)


# ---- 1. build -----------------------------------------------------------

def build_times(tmp, cl):
    """strata rootfs build vs umoci + mke2fs -d vs umoci + mkfs + loop + cp -a.
    Leaves the last strata store (with template `t`) in tmp/s-main."""
    layout = f"{DEBIAN}:python"
    rootfs = os.path.join(tmp, "rootfs")
    mnt = os.path.join(tmp, "mnt-cp")
    os.makedirs(mnt, exist_ok=True)
    root = os.path.join(tmp, "s-main")
    res = {}
    for temp in ("cold", "warm"):
        cold = temp == "cold"
        r = {k: [] for k in ("strata", "strata_internal", "a_unpack", "a_mke2fs", "a_total",
                             "b_unpack", "b_mkfs_cp", "b_total")}
        for i in range(RUNS):
            # strata: fresh store, image pulled (untimed), then the build
            rm(root)
            strata(root, "-q", "pull", IMAGE)
            settle(cold, [os.path.join(root, "objects"), os.path.join(root, "images")])
            t = time.monotonic()
            out = strata_json(root, "rootfs", "build", "--from", IMAGE, "--size", SIZE,
                              "--no-cache", "--name", "t")
            r["strata"].append(time.monotonic() - t)
            r["strata_internal"].append(out["seconds"])
            res["template"] = out
            # (a) umoci raw unpack + mke2fs -d
            img = os.path.join(tmp, "a.img")
            rm(rootfs)
            rm(img)
            settle(cold, [DEBIAN])
            t0 = time.monotonic()
            run("umoci", "raw", "unpack", "--image", layout, rootfs)
            t1 = time.monotonic()
            run("mke2fs", "-q", "-t", "ext4", "-d", rootfs, "-b", "4096", img, "2G")
            fsync_file(img)
            t2 = time.monotonic()
            r["a_unpack"].append(t1 - t0)
            r["a_mke2fs"].append(t2 - t1)
            r["a_total"].append(t2 - t0)
            if os.path.getsize(img) != SIZE_BYTES:
                raise BenchError(f"mke2fs made {os.path.getsize(img)} bytes, not 2 GiB")
            res["a_image"] = sizes_of(img)
            rm(img)
            # (b) umoci raw unpack + mkfs.ext4 + mount -o loop + cp -a + umount
            img = os.path.join(tmp, "b.img")
            rm(rootfs)
            settle(cold, [DEBIAN])
            t0 = time.monotonic()
            run("umoci", "raw", "unpack", "--image", layout, rootfs)
            t1 = time.monotonic()
            with open(img, "wb") as f:
                f.truncate(SIZE_BYTES)
            run("mkfs.ext4", "-q", "-b", "4096", img)
            cl.mount("-o", "loop", img, mnt)
            run("cp", "-a", rootfs + "/.", mnt + "/")
            cl.umount(mnt)
            fsync_file(img)
            t2 = time.monotonic()
            r["b_unpack"].append(t1 - t0)
            r["b_mkfs_cp"].append(t2 - t1)
            r["b_total"].append(t2 - t0)
            res["b_image"] = sizes_of(img)
            rm(img)
            print(f"  build {temp} run {i + 1}: strata {r['strata'][-1]:.2f} s, "
                  f"umoci+mke2fs {r['a_total'][-1]:.2f} s, "
                  f"umoci+mkfs+cp {r['b_total'][-1]:.2f} s", flush=True)
        meds = {k: med(v) for k, v in r.items()}
        res[temp] = {"median": meds, "runs": r,
                     "ratio_a_total": meds["a_total"] / meds["strata"],
                     "ratio_a_mke2fs": meds["a_mke2fs"] / meds["strata"],
                     "ratio_b_total": meds["b_total"] / meds["strata"],
                     "ratio_b_mkfs_cp": meds["b_mkfs_cp"] / meds["strata"]}
    rm(rootfs)
    return res, root


# ---- maps ---------------------------------------------------------------

def resolve(root, name):
    return strata_json(root, "rootfs", "inspect", name)["id"]


def map_path(root, tid):
    return os.path.join(root, "blocks/maps", tid.split(":", 1)[1])


def load_map(root, tid):
    with open(map_path(root, tid), "rb") as f:
        raw = f.read()
    return json.loads(raw), raw


def map_chunks(m):
    """{index: digest} of a map's non-zero chunks."""
    out = {}
    for e in m["extents"]:
        for k, d in enumerate(e["digests"]):
            out[e["chunk"] + k] = d
    return out


def chunk_len(size, cs, i):
    return min(cs, size - i * cs)


def new_vs_parent(root, child, parent):
    """Chunks (distinct contents) of `child` the parent does not have."""
    cm, craw = load_map(root, child)
    pm, _ = load_map(root, parent)
    pset = set(map_chunks(pm).values())
    seen = {}
    for i, d in map_chunks(cm).items():
        if d not in pset and d not in seen:
            seen[d] = chunk_len(cm["size"], cm["chunk_size"], i)
    on_disk = 0
    for d in seen:
        h = d.split(":", 1)[1]
        on_disk += os.stat(os.path.join(root, "objects", h[:2], h[2:])).st_blocks * 512
    return {"chunks": len(seen), "bytes": sum(seen.values()), "objects_on_disk": on_disk,
            "map_bytes": len(craw), "map_on_disk": os.stat(map_path(root, child)).st_blocks * 512}


# ---- 2./3. derived templates ------------------------------------------

def derived(root, name, args):
    """Build `name` from template t RUNS times cold and warm (--no-cache);
    store growth and stats from the first run."""
    res = {}
    before = store_bytes(root)
    first = None
    for temp in ("cold", "warm"):
        ts, internal = [], []
        for _ in range(RUNS):
            settle(temp == "cold", [os.path.join(root, "objects"), os.path.join(root, "blocks")])
            t = time.monotonic()
            out = strata_json(root, "rootfs", "build", "--from-template", "t", *args,
                              "--no-cache", "--name", name)
            ts.append(time.monotonic() - t)
            internal.append(out["seconds"])
            if first is None:
                first = out
                after = store_bytes(root)
                res["store_growth"] = {k: after[k] - before[k] for k in after}
                res["first_build"] = out
        res[temp] = {"seconds": med(ts), "runs": ts, "internal": med(internal)}
        print(f"  {name} {temp}: {med(ts):.2f} s  runs {fmt_runs(ts)}", flush=True)
    tid = resolve(root, name)
    res["id"] = tid
    res["inspect"] = strata_json(root, "rootfs", "inspect", name)
    res["new_vs_parent"] = new_vs_parent(root, tid, resolve(root, "t"))
    return res


def make_add_dir(path):
    """A few MB of provisioning files plus replaced configs, always the same bytes."""
    rnd = random.Random(5)
    files = {
        "opt/app/bin/app": rnd.randbytes(2 << 20),
        "opt/app/data/assets.bin": rnd.randbytes(1 << 20),
        "etc/hostname": b"vm-template\n",
        "etc/motd": b"strata VM template: provisioned by bench/rootfs.py\n",
        "etc/bash.bashrc": b"# provisioned\n" + b"".join(
            f"alias a{k}='echo {k}'\n".encode() for k in range(100)),
        "etc/app/config.toml": b"".join(
            f"[svc{k}]\nport = {8000 + k}\nenabled = true\n".encode() for k in range(200)),
    }
    words = ["def", "return", "import", "self", "value", "config", "server", "request", "=", "(", ")"]
    for k in range(40):
        lines = []
        while sum(len(x) for x in lines) < 24 << 10:
            lines.append(" ".join(rnd.choice(words) for _ in range(12)) + "\n")
        files[f"opt/app/lib/mod{k:02d}.py"] = "".join(lines).encode()
    for rel, data in files.items():
        p = os.path.join(path, rel)
        os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, 0o755 if "/bin/" in rel else 0o644)
    for d, dirs, _ in os.walk(path):
        os.chmod(d, 0o755)
    return sum(len(v) for v in files.values()), len(files)


# ---- 3. qcow2 -----------------------------------------------------------

def qcow2(tmp, base, new):
    """The change from base.raw to new.raw as a qcow2 overlay backed by base.raw."""
    res = {}

    def check(ov):
        r = subprocess.run(["qemu-img", "compare", "-q", ov, new])
        if r.returncode != 0:
            raise BenchError(f"qemu-img compare: {ov} differs from {new}")

    # convert -B: qemu-img writes every allocated cluster of a raw source
    ov = os.path.join(tmp, "convert-B.qcow2")
    t = time.monotonic()
    run("qemu-img", "convert", "-O", "qcow2", "-B", base, "-F", "raw", new, ov)
    res["convert -B (64K clusters)"] = dict(sizes_of(ov), seconds=time.monotonic() - t)
    check(ov)
    rm(ov)
    # rebase: overlay of new.raw, rebased (safe mode) onto base.raw: qemu-img
    # compares old and new backing and keeps only the clusters that differ
    for cs in (64 << 10, 16 << 10, 4 << 10):
        ov = os.path.join(tmp, f"rebase-{cs}.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}",
            "-b", new, "-F", "raw", ov)
        t = time.monotonic()
        run("qemu-img", "rebase", "-f", "qcow2", "-b", base, "-F", "raw", ov)
        res[f"rebase ({cs >> 10}K clusters)"] = dict(sizes_of(ov), seconds=time.monotonic() - t)
        check(ov)
        rm(ov)
    best = min(res, key=lambda k: res[k]["actual"])
    return res, best


# ---- 4. chunk size --------------------------------------------------------

def data_windows(fd, size):
    """Indices of the WINDOW-sized pieces that hold data (holes skipped)."""
    wins = []
    off = 0
    while off < size:
        try:
            d = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        h = os.lseek(fd, d, os.SEEK_HOLE)
        first = d // WINDOW
        if wins and wins[-1] >= first:
            first = wins[-1] + 1
        wins.extend(range(first, (h - 1) // WINDOW + 1))
        off = h
    return wins


def chunk_image(path):
    """({chunk size: {index: sha256 digest}} of the non-zero chunks, size)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out = {c: {} for c in CHUNK_SIZES}
        zero = bytes(WINDOW)
        for w in data_windows(fd, size):
            off = w * WINDOW
            buf = os.pread(fd, min(WINDOW, size - off), off)
            if buf == zero[:len(buf)]:
                continue
            for c in CHUNK_SIZES:
                m = out[c]
                first = off // c
                for k in range(0, len(buf), c):
                    piece = buf[k:k + c]
                    if piece != zero[:len(piece)]:
                        m[first + k // c] = hashlib.sha256(piece).digest()
        return out, size
    finally:
        os.close(fd)


def map_bytes(size, cs, parent, generation, build, chunks):
    """The map strata would write for these chunks (serde_json, canonical)."""
    extents = []
    for i in sorted(chunks):
        if extents and extents[-1]["chunk"] + len(extents[-1]["digests"]) == i:
            extents[-1]["digests"].append("sha256:" + chunks[i].hex())
        else:
            extents.append({"chunk": i, "digests": ["sha256:" + chunks[i].hex()]})
    doc = {"version": 1, "size": size, "chunk_size": cs, "parent": parent,
           "generation": generation, "build": build, "extents": extents}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def chunk_analysis(root, raws, changed_bytes):
    """raws: {"base": (path, name), "resize": ..., "add": ...}."""
    t0 = time.monotonic()
    chunked = {}
    for key, (path, name) in raws.items():
        tid = resolve(root, name)
        m, raw = load_map(root, tid)
        chunked[key] = {"maps": None, "size": None, "real_map": (m, raw, tid)}
        chunked[key]["maps"], chunked[key]["size"] = chunk_image(path)
    res = {"seconds": None, "sizes": {}}
    base_maps = chunked["base"]["maps"]
    for cs in CHUNK_SIZES:
        row = {}
        base_set = set(base_maps[cs].values())
        for key, c in chunked.items():
            m, raw, tid = c["real_map"]
            chunks = c["maps"][cs]
            mb = map_bytes(c["size"], cs, m["parent"], m["generation"], m["build"], chunks)
            distinct = {}
            for i, d in chunks.items():
                distinct.setdefault(d, chunk_len(c["size"], cs, i))
            entry = {"nonzero_chunks": len(chunks), "objects": len(distinct),
                     "stored_bytes": sum(distinct.values()), "map_bytes": len(mb)}
            if cs == STRATA_CHUNK:
                # the Python chunking must reproduce strata's own map exactly
                entry["map_matches_strata"] = mb == raw
                entry["map_digest_is_template_id"] = "sha256:" + hashlib.sha256(mb).hexdigest() == tid
            if key != "base":
                new = {d: n for d, n in distinct.items() if d not in base_set}
                changed = [i for i, d in chunks.items() if base_maps[cs].get(i) != d]
                changed += [i for i in base_maps[cs] if i not in chunks]
                entry.update({"new_objects": len(new), "new_bytes": sum(new.values()),
                              "changed_positions": len(changed),
                              "new_bytes_plus_map": sum(new.values()) + len(mb)})
                if key == "add" and changed_bytes:
                    entry["new_bytes_per_changed_byte"] = sum(new.values()) / changed_bytes
            entry["on_disk_estimate"] = (
                entry["objects"] * (-(-cs // 4096) * 4096 + OBJECT_OVERHEAD) + len(mb))
            row[key] = entry
        res["sizes"][str(cs)] = row
    res["seconds"] = time.monotonic() - t0
    return res


# ---- 5. serve -------------------------------------------------------------

def served_state(root, f, wait=True):
    """The `strata --json mounts` entry of served file f, once its counters
    stop moving (the daemon saves them every 250 ms)."""
    last = None
    deadline = time.monotonic() + 5
    while True:
        if wait:
            time.sleep(0.35)
        ms = strata_json(root, "mounts")
        st = [m for m in ms if m.get("kind") == "rootfs"
              and os.path.realpath(m["file"]) == os.path.realpath(f)]
        if not st:
            raise BenchError(f"strata mounts does not list {f}: {ms}")
        cur = st[0]
        key = (cur.get("chunks_read"), cur.get("chunks_fetched"), cur.get("bytes_fetched"))
        if not wait or key == last or time.monotonic() > deadline:
            return cur
        last = key


def boot_python(cl, f, mnt):
    cl.mount("-o", "loop,ro", f, mnt)
    out = run("chroot", mnt, "/usr/bin/python3", "-c", PY).strip()
    if out != "1":
        raise BenchError(f"python in the served template printed {out!r}")


def serve_local(tmp, root, cl):
    f = os.path.join(tmp, "t-local.img")
    mnt = os.path.join(tmp, "mnt-local")
    os.makedirs(mnt, exist_ok=True)
    ts, tserve, states = [], [], []
    for _ in range(RUNS):
        settle(True)
        t0 = time.monotonic()
        cl.serve(root, "t", f)
        t1 = time.monotonic()
        boot_python(cl, f, mnt)
        t2 = time.monotonic()
        st = served_state(root, f)
        cl.umount(mnt)
        cl.unserve(root, f)
        ts.append(t2 - t0)
        tserve.append(t1 - t0)
        states.append(st)
    st = states[len(states) // 2]
    res = {"seconds": med(ts), "runs": ts, "serve_seconds": med(tserve),
           "chunks_read": med([s["chunks_read"] for s in states]),
           "bytes_read": med([s["bytes_read"] for s in states]),
           "chunks_total": st["chunks_total"], "bytes_total": st["bytes_total"]}
    res["fraction"] = res["bytes_read"] / res["bytes_total"]
    print(f"  local serve: {res['seconds']:.2f} s to output, {res['bytes_read'] / MB:.1f} MB read "
          f"({100 * res['fraction']:.1f}% of {res['bytes_total'] / MB:.1f} MB), "
          f"runs {fmt_runs(ts)}", flush=True)
    return res


def serve_remote(tmp, root, cl):
    reg = Registry(tempfile.mkdtemp(dir=tmp), False)
    cl.regs.append(reg)
    link = Link(reg, False)
    push_ref = f"docker://127.0.0.1:{reg.port}/tmpl:1"
    ref = f"docker://{link.addr}/tmpl:1"
    res = {"reference": push_ref}
    try:
        t = time.monotonic()
        res["push"] = strata_json(root, "rootfs", "push", "t", push_ref, "--plain-http")
        res["push_seconds"] = time.monotonic() - t
    except BenchError as e:
        res["runnable"] = False
        res["error"] = str(e)
        print(f"  remote serve: not runnable: {e}", flush=True)
        return res
    f = os.path.join(tmp, "t-remote.img")
    mnt = os.path.join(tmp, "mnt-remote")
    os.makedirs(mnt, exist_ok=True)
    fresh = os.path.join(tmp, "s-remote")
    ts, tpull, tserve, wire, states = [], [], [], [], []
    try:
        for _ in range(RUNS):
            rm(fresh)
            settle(True)
            b0 = link.bytes()
            t0 = time.monotonic()
            res["pull"] = strata_json(fresh, "rootfs", "pull", ref, "--plain-http", "--name", "t")
            t1 = time.monotonic()
            cl.serve(fresh, "t", f, "--plain-http")
            t2 = time.monotonic()
            boot_python(cl, f, mnt)
            t3 = time.monotonic()
            wire.append(link.bytes() - b0)
            st = served_state(fresh, f)
            cl.umount(mnt)
            cl.unserve(fresh, f)
            ts.append(t3 - t0)
            tpull.append(t1 - t0)
            tserve.append(t2 - t1)
            states.append(st)
    except BenchError as e:
        res["runnable"] = False
        res["error"] = str(e)
        print(f"  remote serve: not runnable: {e}", flush=True)
        return res
    st = states[len(states) // 2]
    res.update({"runnable": True, "seconds": med(ts), "runs": ts, "pull_seconds": med(tpull),
                "serve_seconds": med(tserve), "wire_bytes": med(wire),
                "chunks_fetched": med([s["chunks_fetched"] for s in states]),
                "bytes_fetched": med([s["bytes_fetched"] for s in states]),
                "chunks_total": st["chunks_total"], "bytes_total": st["bytes_total"]})
    res["fraction"] = res["bytes_fetched"] / res["bytes_total"]
    print(f"  remote serve: {res['seconds']:.2f} s to output, {res['bytes_fetched'] / MB:.1f} MB "
          f"fetched ({100 * res['fraction']:.1f}% of {res['bytes_total'] / MB:.1f} MB), "
          f"{res['wire_bytes'] / MB:.1f} MB on the wire, runs {fmt_runs(ts)}", flush=True)
    return res


# ---- report -------------------------------------------------------------

def versions():
    def first_line(*cmd):
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return r.stdout.decode().strip().splitlines()[0] if r.stdout else "?"
    return {"mke2fs": first_line("mke2fs", "-V"), "umoci": first_line("umoci", "--version"),
            "qemu-img": first_line("qemu-img", "--version"),
            "kernel": os.uname().release, "cpus": os.cpu_count()}


def report(res):
    b = res["build"]
    out = []
    p = out.append
    p(f"\n## VM templates (`BENCH_RUNS={RUNS}`), debian:python\n")
    p("| 2 GiB ext4 from the image (median) | cold | ÷ strata | warm | ÷ strata |")
    p("| --- | --- | --- | --- | --- |")
    c, w = b["cold"]["median"], b["warm"]["median"]
    rows = (("strata", "strata rootfs build --no-cache"),
            ("a_total", "(a) umoci raw unpack + mke2fs -d"),
            ("a_mke2fs", "(a) mke2fs -d alone (tree already unpacked)"),
            ("b_total", "(b) umoci raw unpack + mkfs.ext4 + loop + cp -a + umount"),
            ("b_mkfs_cp", "(b) mkfs.ext4 + loop + cp -a + umount alone"),
            ("a_unpack", "umoci raw unpack alone"))
    for k, label in rows:
        p(f"| {label} | {c[k]:.2f} s | {c[k] / c['strata']:.2f}x | {w[k]:.2f} s | "
          f"{w[k] / w['strata']:.2f}x |")
    t = b["template"]["stats"]
    p(f"\nstrata's template: {t['chunks']} non-zero 64 KiB chunks, {t['new_bytes'] / MB:.1f} MB "
      f"stored; (a)'s file {b['a_image']['actual'] / MB:.1f} MB on disk, (b)'s "
      f"{b['b_image']['actual'] / MB:.1f} MB.")
    p("\n| derived template | cold | warm | new chunks vs parent | + map | store grew |")
    p("| --- | --- | --- | --- | --- | --- |")
    for key, label in (("resize", "resize 2 GiB -> 8 GiB"), ("add", "--add (provisioning)")):
        d = res[key]
        n = d["new_vs_parent"]
        p(f"| {label} | {d['cold']['seconds']:.2f} s | {d['warm']['seconds']:.2f} s | "
          f"{n['chunks']} ({n['bytes'] / MB:.2f} MB) | {n['map_bytes'] / 1e3:.0f} KB | "
          f"{d['store_growth']['actual'] / MB:.2f} MB |")
    q = res["qcow2"]
    p(f"\nSame change as qcow2 over the exported base (changed bytes by `cmp -l`: "
      f"{res['changed_bytes']:,}; files added {res['add_files_bytes'] / MB:.2f} MB):\n")
    p("| delta | apparent | on disk |")
    p("| --- | --- | --- |")
    n = res["add"]["new_vs_parent"]
    p(f"| strata new chunks + map | {(n['bytes'] + n['map_bytes']) / MB:.2f} MB | "
      f"{(n['objects_on_disk'] + n['map_on_disk']) / MB:.2f} MB |")
    for k, v in q["variants"].items():
        star = " (smallest)" if k == q["best"] else ""
        p(f"| qcow2 {k}{star} | {v['apparent'] / MB:.2f} MB | {v['actual'] / MB:.2f} MB |")
    p("\n| chunk size | base objects | base stored | base map | resize: new | resize map | "
      "add: new | add map | add new+map | est. on disk (base) |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for cs in CHUNK_SIZES:
        r = res["chunk_sizes"]["sizes"][str(cs)]
        ba, rz, ad = r["base"], r["resize"], r["add"]
        p(f"| {cs >> 10}K | {ba['objects']:,} | {ba['stored_bytes'] / MB:.1f} MB | "
          f"{ba['map_bytes'] / 1e3:.0f} KB | {rz['new_objects']:,} / {rz['new_bytes'] / MB:.2f} MB | "
          f"{rz['map_bytes'] / 1e3:.0f} KB | {ad['new_objects']:,} / {ad['new_bytes'] / MB:.2f} MB | "
          f"{ad['map_bytes'] / 1e3:.0f} KB | {ad['new_bytes_plus_map'] / MB:.2f} MB | "
          f"{ba['on_disk_estimate'] / MB:.1f} MB |")
    s = res["serve"]
    lo = s["local"]
    p("\n| python3 -c 'print(1)' from a served template (cold) | to output | bytes | of the template |")
    p("| --- | --- | --- | --- |")
    p(f"| local store (chunks read) | {lo['seconds']:.2f} s | {lo['bytes_read'] / MB:.1f} MB "
      f"({lo['chunks_read']:.0f} chunks) | {100 * lo['fraction']:.1f}% of {lo['bytes_total'] / MB:.1f} MB |")
    re_ = s["remote"]
    if re_.get("runnable"):
        p(f"| registry, fresh store (chunks fetched) | {re_['seconds']:.2f} s | "
          f"{re_['bytes_fetched'] / MB:.1f} MB ({re_['chunks_fetched']:.0f} chunks; "
          f"{re_['wire_bytes'] / MB:.1f} MB on the wire) | "
          f"{100 * re_['fraction']:.1f}% of {re_['bytes_total'] / MB:.1f} MB |")
    else:
        p(f"| registry, fresh store | not runnable yet: {re_.get('error', '?')[:160]} | | |")
    print("\n".join(out), flush=True)


def main():
    for tool in ("umoci", "mke2fs", "mkfs.ext4", "qemu-img", "cmp", "docker-registry",
                 "chroot", "losetup"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing (bash scripts/install-deps.sh; qemu-img: qemu-utils)")
    if not os.path.exists(STRATA):
        sys.exit(f"bench: no strata binary at {STRATA} (bash bench/run.sh rootfs builds it)")
    tmp = tempfile.mkdtemp(prefix="strata-bench-rootfs-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    cl = Cleanup(tmp)
    res = {"runs": RUNS, "image": IMAGE, "date": time.strftime("%Y-%m-%d"),
           "versions": versions(), "pause_s": PAUSE}
    t_start = time.monotonic()
    try:
        print("== 1. build a 2 GiB template (cold = page cache dropped)", flush=True)
        res["build"], root = build_times(tmp, cl)

        print("== 2. resize 2 GiB -> 8 GiB", flush=True)
        res["resize"] = derived(root, "t8", ["--size", BIG])

        print("== 3. derived with --add vs qcow2", flush=True)
        add = os.path.join(tmp, "add")
        res["add_files_bytes"], res["add_files"] = make_add_dir(add)
        res["add"] = derived(root, "ta", ["--add", add])
        raws = {"base": (os.path.join(tmp, "base.raw"), "t"),
                "resize": (os.path.join(tmp, "resize.raw"), "t8"),
                "add": (os.path.join(tmp, "add.raw"), "ta")}
        res["export_seconds"] = {}
        for key, (path, name) in raws.items():
            t = time.monotonic()
            strata(root, "-q", "rootfs", "export", name, path)
            res["export_seconds"][key] = time.monotonic() - t
        base_raw, add_raw = raws["base"][0], raws["add"][0]
        res["changed_bytes"] = int(subprocess.run(
            ["bash", "-c", f"cmp -l {base_raw} {add_raw} | wc -l"],
            stdout=subprocess.PIPE, check=True).stdout.decode().strip())
        variants, best = qcow2(tmp, base_raw, add_raw)
        res["qcow2"] = {"variants": variants, "best": best}
        n = res["add"]["new_vs_parent"]
        print(f"  changed bytes (cmp -l): {res['changed_bytes']:,}; strata new chunks "
              f"{n['bytes'] / MB:.2f} MB + map {n['map_bytes'] / 1e3:.0f} KB; qcow2 {best}: "
              f"{variants[best]['actual'] / MB:.2f} MB on disk", flush=True)

        print("== 4. chunk sizes", flush=True)
        res["chunk_sizes"] = chunk_analysis(root, raws, res["changed_bytes"])
        for cs in CHUNK_SIZES:
            r = res["chunk_sizes"]["sizes"][str(cs)]
            print(f"  {cs >> 10:5d}K: base {r['base']['objects']:6d} objects "
                  f"{r['base']['stored_bytes'] / MB:6.1f} MB map {r['base']['map_bytes'] / 1e3:5.0f} KB; "
                  f"resize +{r['resize']['new_bytes'] / MB:.2f} MB; add +{r['add']['new_bytes'] / MB:.2f} MB",
                  flush=True)
        m64 = res["chunk_sizes"]["sizes"][str(STRATA_CHUNK)]
        if not all(m64[k]["map_matches_strata"] for k in m64):
            print("  WARNING: the Python 64K maps differ from strata's", flush=True)
        for key in raws:
            rm(raws[key][0])

        print("== 5. serve + loop mount + python", flush=True)
        res["serve"] = {"local": serve_local(tmp, root, cl)}
        res["serve"]["remote"] = serve_remote(tmp, root, cl)
        res["total_seconds"] = time.monotonic() - t_start
        report(res)
    finally:
        cl.all()
        shutil.rmtree(tmp, ignore_errors=True)
    path = os.path.join(REPO, "bench/results-rootfs.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        sys.exit(f"bench: {e}")
