#!/usr/bin/env python3
"""strata benchmarks for issue 18: VM templates booted in microVMs, and
chunk packs in a registry. Peers measured in the same run.

  bash bench/run.sh vmboot     # release build + fixtures + scripts/vm/setup.sh, runs this

Template: the Debian+python fixture (`oci:$STRATA_FIXTURES/debian:python`)
built at 2 GiB. VM: scripts/vm/boot.py (QEMU q35, Debian's cloud kernel,
busybox initramfs, 256 MiB; TCG here, as boot.py reports), command
`python3 -c 'print(1)'`. Every run starts from a fresh store, after `sync`
and `echo 3 > /proc/sys/vm/drop_caches`.

  1. Push: `strata rootfs push` of the 2 GiB template to a docker-registry
     on loopback: blobs, bytes, seconds.
  2. Boot to python's output over the shaped link (the registry in a
     network namespace behind veth with tbf 100 Mbit, plus a proxy adding
     10 ms each way: 20 ms RTT, as in the lazy benchmarks):
       lazy   `rootfs pull` (map + index) + `rootfs serve` + boot: chunks by
              range from the packs as the guest reads them, each fetch
              bringing the missing chunks after it up to 256 KiB in all
              (`--readahead`, default); also with 0 (a chunk per request)
              and 1 MiB
       full   `rootfs pull --all` (the packs whole) + `rootfs serve` + boot
       qcow2  the template as a qcow2 (`qemu-img convert -O qcow2`) fetched
              whole over the same link (one GET) + boot of the qcow2
     and, for scale, a boot of the local template (no network).
     Bytes fetched before the output: the served file's count and the
     proxy's byte count.
  3. Derived deltas: what a child costs in the registry with packs vs a
     qcow2 overlay (64K clusters) of the same change:
       add     `rootfs build --from-template --add DIR` (a few MB of
               files and configs, bench/rootfs.py's) then `rootfs push`
               vs `qemu-img rebase` of the derived raw onto the base
       sandbox a VM writes to a `rootfs serve --writable` disk, `rootfs
               commit`, `rootfs push` vs the same command in a VM booted
               on a qcow2 overlay of the base raw (its file size after)

Prints a markdown summary; raw numbers go to bench/results-vmboot.json.
"""
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lazy import NS_IP, Link, Registry, netns_down, netns_up  # noqa: E402
from rootfs import make_add_dir, qcow2  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.environ.get("STRATA_FIXTURES", os.path.join(REPO, ".cache/fixtures"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
STRATA = os.environ.get("STRATA_BIN", os.path.join(TARGET, "release/strata"))
BOOT = os.path.join(REPO, "scripts/vm/boot.py")
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
IMAGE = f"oci:{os.path.join(FIX, 'debian')}:python"
SIZE = "2GiB"
PY = "python3 -c 'print(1)'"
SANDBOX = ("mkdir -p /opt/sandbox && head -c 4194304 /dev/urandom > /opt/sandbox/blob "
           "&& echo 'sandbox=1' >> /etc/environment && python3 -c 'print(1)'")
MB = 1e6


def run(*args, check=True, timeout=900):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    if check and r.returncode != 0:
        sys.exit(f"bench: {' '.join(map(str, args))} failed: {r.stderr.decode()}{r.stdout.decode()}")
    return r.stdout.decode()


def strata(root, *args):
    return run(STRATA, "--root", root, *args)


def strata_json(root, *args):
    return json.loads(strata(root, "--json", *args))


def settle():
    subprocess.run(["sync"], check=True)
    time.sleep(1)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def med(xs):
    return statistics.median(xs)


def boot(disk, cmd=PY, rw=False, fmt=None):
    args = ["python3", BOOT, disk, "--cmd", cmd, "--json", "--timeout", "300"]
    if rw:
        args.append("--rw")
    if fmt:
        args += ["--format", fmt]
    out = json.loads(run(*args, check=False))
    if out.get("rc") != 0 or "1" not in out.get("output", ""):
        sys.exit(f"bench: booting {disk}: {out}")
    return out


def served_state(root, f):
    time.sleep(0.6)
    for m in strata_json(root, "mounts"):
        if m.get("kind") == "rootfs" and m.get("file") == f:
            return m
    sys.exit(f"bench: {f} is not served")


class Served:
    def __init__(self):
        self.files = []

    def serve(self, root, name, f, *extra):
        strata(root, "-q", "rootfs", "serve", name, f, *extra)
        self.files.append((root, f))

    def unserve(self, root, f):
        strata(root, "-q", "umount", f)
        self.files.remove((root, f))

    def all(self):
        for root, f in reversed(self.files):
            subprocess.run([STRATA, "--root", root, "-q", "umount", f],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.files.clear()


def upload_blob(host, repo, path):
    """Push a file as a blob (monolithic PUT), straight to the registry."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    digest = "sha256:" + h.hexdigest()
    req = urllib.request.Request(f"http://{host}/v2/{repo}/blobs/uploads/", method="POST")
    loc = urllib.request.urlopen(req).headers["Location"]
    if loc.startswith("/"):
        loc = f"http://{host}{loc}"
    sep = "&" if "?" in loc else "?"
    with open(path, "rb") as f:
        req = urllib.request.Request(f"{loc}{sep}digest={digest}", data=f, method="PUT",
                                     headers={"Content-Length": str(os.path.getsize(path)),
                                              "Content-Type": "application/octet-stream"})
        urllib.request.urlopen(req).read()
    return digest


def fetch_blob(addr, repo, digest, out):
    with urllib.request.urlopen(f"http://{addr}/v2/{repo}/blobs/{digest}") as r, \
            open(out, "wb") as f:
        while True:
            b = r.read(1 << 20)
            if not b:
                break
            f.write(b)


def main():
    if os.geteuid() != 0:
        sys.exit("bench: run as root (mounts, netns, drop_caches)")
    run("bash", os.path.join(REPO, "scripts/vm/setup.sh"))
    res = {"runs": RUNS, "size": SIZE, "strata": STRATA}
    tmp = tempfile.mkdtemp(prefix="strata-vmboot-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    sv = Served()
    regs = []
    try:
        base = os.path.join(tmp, "base")
        strata(base, "-q", "pull", IMAGE)
        strata(base, "-q", "rootfs", "build", "--from", IMAGE, "--size", SIZE, "--name", "t")
        raw = os.path.join(tmp, "t.raw")
        strata(base, "-q", "rootfs", "export", "t", raw)

        # 1. push, loopback
        reg0 = Registry(tempfile.mkdtemp(dir=tmp), False)
        regs.append(reg0)
        t = time.monotonic()
        p = strata_json(base, "rootfs", "push", "t", f"docker://127.0.0.1:{reg0.port}/vm/t:1",
                        "--plain-http")
        res["push"] = dict(p, wall=time.monotonic() - t)
        print(f"push: {p['packs']} packs + index + map, {p['bytes_uploaded'] / MB:.1f} MB in "
              f"{res['push']['wall']:.2f} s", flush=True)

        # local boot, for scale
        ts = []
        f = os.path.join(tmp, "local.img")
        for _ in range(RUNS):
            settle()
            t = time.monotonic()
            sv.serve(base, "t", f)
            out = boot(f)
            ts.append(time.monotonic() - t)
            sv.unserve(base, f)
        res["local"] = {"seconds": med(ts), "runs": ts, "vm": out}
        print(f"local serve + boot: {med(ts):.2f} s (accel {out['accel']})", flush=True)

        # 2. shaped link
        netns_up()
        reg = Registry(tempfile.mkdtemp(dir=tmp), True)
        regs.append(reg)
        link = Link(reg, True)
        direct = f"{NS_IP}:{reg.port}"
        strata(base, "-q", "rootfs", "push", "t", f"docker://{direct}/vm/t:1", "--plain-http")
        q = os.path.join(tmp, "t.qcow2")
        run("qemu-img", "convert", "-O", "qcow2", raw, q)
        qdigest = upload_blob(direct, "vm/qcow2", q)
        res["qcow2_bytes"] = os.path.getsize(q)
        ref = f"docker://{link.addr}/vm/t:1"
        readahead = {"lazy": "256KiB", "lazy-0": "0", "lazy-1M": "1MiB", "full": "256KiB"}
        for kind in ("lazy", "lazy-0", "lazy-1M", "full", "qcow2"):
            ts, wire, fetched, vm = [], [], [], []
            for k in range(RUNS):
                store = os.path.join(tmp, f"s-{kind}-{k}")
                f = os.path.join(tmp, f"{kind}-{k}.img")
                settle()
                b0 = link.bytes()
                t = time.monotonic()
                if kind == "qcow2":
                    fetch_blob(link.addr, "vm/qcow2", qdigest, f)
                    out = boot(f, fmt="qcow2")
                    n = os.path.getsize(f)
                else:
                    extra = ["--all"] if kind == "full" else []
                    strata(store, "-q", "rootfs", "pull", ref, "--plain-http", "--name", "t", *extra)
                    sv.serve(store, "t", f, "--readahead", readahead[kind])
                    out = boot(f)
                ts.append(time.monotonic() - t)
                wire.append(link.bytes() - b0)
                if kind != "qcow2":
                    st = served_state(store, f)
                    n = st["bytes_fetched"] if kind.startswith("lazy") else wire[-1]
                    sv.unserve(store, f)
                fetched.append(n)
                vm.append(out["seconds_total"])
            res[kind] = {"seconds": med(ts), "runs": ts, "wire_bytes": med(wire),
                         "bytes_fetched": med(fetched), "vm_seconds": med(vm)}
            print(f"{kind}: {med(ts):.2f} s to output (VM {med(vm):.2f} s), "
                  f"{med(fetched) / MB:.1f} MB fetched, {med(wire) / MB:.1f} MB on the wire, "
                  f"runs {[round(x, 2) for x in ts]}", flush=True)
        netns_down()

        # 3. derived deltas
        add = os.path.join(tmp, "add")
        make_add_dir(add)
        strata(base, "-q", "rootfs", "build", "--from-template", "t", "--add", add, "--name", "d")
        draw = os.path.join(tmp, "d.raw")
        strata(base, "-q", "rootfs", "export", "d", draw)
        pd = strata_json(base, "rootfs", "push", "d", f"docker://127.0.0.1:{reg0.port}/vm/t:d",
                         "--plain-http")
        qres, _ = qcow2(tmp, raw, draw)
        res["add"] = {"push": pd, "qcow2": qres}
        q64 = qres["rebase (64K clusters)"]["actual"]
        print(f"add: one new pack of {pd['bytes_uploaded'] / MB:.2f} MB ({pd['packs_uploaded']} "
              f"uploaded, {pd['packs_reused']} reused) vs qcow2 64K overlay {q64 / MB:.2f} MB",
              flush=True)

        f = os.path.join(tmp, "sandbox.img")
        sv.serve(base, "t", f, "--writable")
        boot(f, SANDBOX, rw=True)
        c = strata_json(base, "rootfs", "commit", f, "--name", "child")
        sv.unserve(base, f)
        pc = strata_json(base, "rootfs", "push", "child",
                         f"docker://127.0.0.1:{reg0.port}/vm/t:child", "--plain-http")
        ov = os.path.join(tmp, "sandbox.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
            "-b", raw, "-F", "raw", ov)
        boot(ov, SANDBOX, rw=True, fmt="qcow2")
        ov_bytes = os.stat(ov).st_blocks * 512
        res["sandbox"] = {"commit": c, "push": pc, "qcow2_overlay_bytes": ov_bytes}
        print(f"sandbox: commit {c['written_chunks']} chunks written, push: one new pack of "
              f"{pc['bytes_uploaded'] / MB:.2f} MB ({pc['packs_uploaded']} uploaded, "
              f"{pc['packs_reused']} reused) vs qcow2 64K overlay {ov_bytes / MB:.2f} MB",
              flush=True)
    finally:
        sv.all()
        for r in regs:
            r.stop()
        netns_down()
        subprocess.run(["rm", "-rf", tmp])
    with open(os.path.join(REPO, "bench/results-vmboot.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: res[k] for k in ("local", "lazy", "lazy-0", "lazy-1M", "full", "qcow2")},
                     indent=1))


if __name__ == "__main__":
    main()
