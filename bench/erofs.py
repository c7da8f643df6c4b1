#!/usr/bin/env python3
"""strata benchmarks for issue 3 (composefs EROFS images and mounts), peers
measured in the same run.

  bash bench/run.sh erofs      # builds release + fixtures, runs this

Measures:
  1. EROFS build time for debian:python: strata (by phase, in process) vs the
     composefs crate 0.9.4 on the same tree (and whether the bytes are equal)
     vs mkfs.erofs (erofs-utils) on the exported directory
  2. mount time: `strata mount` (whole command) and the umount
  3. cold and warm `find` + full read (`tar cf - | cat`) over the mount vs
     the same tree exported to the native filesystem
  4. page cache: read /usr through two mounted images that share it (base,
     python); the second read should add ~nothing to the page cache. Same on
     two native copies for contrast.
  5. seed case: 150 images = debian base + a small app layer each. Total
     EROFS bytes flattened vs hybrid vs the ideal (one base + 150 app layers
     alone); mount time of a flattened and a hybrid image.
Prints a markdown report; raw numbers to bench/results-erofs.json.
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
EROFS_BUILD = os.environ.get("EROFS_BUILD_BIN", os.path.join(TARGET, "release/examples/erofs_build"))
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
DEBIAN = os.path.join(FIX, "debian")
APPS = os.path.join(FIX, "apps")
N_APPS = 150


def sh(*args, env=None, cwd=None):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    if r.returncode != 0:
        sys.exit(f"bench: {' '.join(args)} failed ({r.returncode}): {r.stderr.decode()}")
    return r.stdout.decode()


def shell(cmd):
    subprocess.run(["bash", "-c", cmd], check=True, stdout=subprocess.DEVNULL)


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cached_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    raise RuntimeError("no Cached: in /proc/meminfo")


def median_time(fn, runs=RUNS, before=None):
    times = []
    for _ in range(runs):
        if before:
            before()
        t = time.monotonic()
        fn()
        times.append(time.monotonic() - t)
    return statistics.median(times), times


class Strata:
    def __init__(self, root):
        self.root = root
        self.env = dict(os.environ, STRATA_ROOT=root)

    def __call__(self, *args):
        return sh(STRATA, *args, env=self.env)


def du_files(paths):
    return sum(os.path.getsize(p) for p in paths if os.path.exists(p))


def store_erofs_bytes(root):
    """(flattened image.erofs, per-image upper.erofs, base parts) bytes."""
    flat = upper = base = 0
    images = os.path.join(root, "images")
    for d in os.listdir(images):
        flat += du_files([os.path.join(images, d, "image.erofs")])
        upper += du_files([os.path.join(images, d, "upper.erofs")])
    bases = os.path.join(root, "bases")
    if os.path.isdir(bases):
        for d in os.listdir(bases):
            base += du_files([os.path.join(bases, d, "image.erofs")])
    return flat, upper, base


def main():
    for tool in ("mkfs.erofs", "fincore", "tar", "find"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} missing (bash scripts/install-deps.sh)")
    tmp = tempfile.mkdtemp(prefix="strata-bench-erofs-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    res = {"runs": RUNS}
    out = []
    mounts = []

    def umount_all():
        for m in reversed(mounts):
            subprocess.run(["umount", m], stderr=subprocess.DEVNULL)
        mounts.clear()

    try:
        s = Strata(os.path.join(tmp, "store"))
        py = f"oci:{DEBIAN}:python"
        base = f"oci:{DEBIAN}:base"
        s("pull", "-q", base)
        s("pull", "-q", py)

        # 1. build time
        b = json.loads(sh(EROFS_BUILD, s.root, py, str(max(RUNS, 5)), env=s.env))
        res["build"] = b
        export = os.path.join(tmp, "export-python")
        s("export", py, export)
        img = os.path.join(tmp, "mkfs.img")
        mk, mk_all = median_time(lambda: sh("mkfs.erofs", img, export))
        res["mkfs_erofs_s"] = mk_all
        mk_meta = os.path.getsize(img)
        out.append("### EROFS build, debian:python (5107 + 3387 files)\n")
        out.append("| builder | time | image bytes |")
        out.append("| --- | --- | --- |")
        out.append(f"| strata: layer records -> tree -> EROFS bytes (in process) | {b['strata_total_ms']:.1f} ms "
                   f"(records {b['records_to_tree_ms']:.1f}, verity lookup {b['tree_to_erofs_input_ms']:.1f}, "
                   f"write {b['strata_write_ms']:.1f}) | {b['bytes']:,} |")
        out.append(f"| composefs crate 0.9.4 `mkfs_erofs_versioned(V1)`, same tree | write {b['composefs_write_ms']:.1f} ms "
                   f"(+ {b['composefs_convert_ms']:.1f} ms building its tree) | bytes identical to strata's: "
                   f"**{b['identical_bytes']}** |")
        out.append(f"| `mkfs.erofs` (erofs-utils 1.5) on the exported dir (data inside) | {mk*1000:.0f} ms | {mk_meta:,} |")
        out.append(f"\nstrata write vs composefs write: {b['composefs_write_ms']/b['strata_write_ms']:.2f}x; "
                   f"whole strata build vs mkfs.erofs: {mk*1000/b['strata_total_ms']:.1f}x faster.\n")

        # 2. mount time
        mnt = os.path.join(tmp, "mnt")
        os.makedirs(mnt)
        s("mount", py, mnt)  # warm: EROFS image exists, binaries cached
        s("umount", mnt)
        mount_times, umount_times = [], []
        for _ in range(max(RUNS, 10)):
            t = time.monotonic()
            s("mount", py, mnt)
            mount_times.append(time.monotonic() - t)
            t = time.monotonic()
            s("umount", mnt)
            umount_times.append(time.monotonic() - t)
        t = time.monotonic()
        sh("true")
        spawn = time.monotonic() - t
        res["mount_s"], res["umount_s"] = mount_times, umount_times
        out.append("### Mount\n")
        out.append("| step | median | all runs |")
        out.append("| --- | --- | --- |")
        out.append(f"| `strata mount debian:python DIR` (whole command, incl. process start) | "
                   f"{statistics.median(mount_times)*1000:.1f} ms | "
                   f"{', '.join(f'{x*1000:.1f}' for x in mount_times)} |")
        out.append(f"| `strata umount DIR` | {statistics.median(umount_times)*1000:.1f} ms | "
                   f"{', '.join(f'{x*1000:.1f}' for x in umount_times)} |")
        out.append(f"| (spawning `true` from the harness, for scale) | {spawn*1000:.1f} ms | |\n")

        # 3. find + read, cold and warm
        s("mount", py, mnt)
        mounts.append(mnt)
        walk = {}
        roots = (("native (ext4, exported tree)", export), ("strata mount", mnt))
        find = lambda root: shell(f"find {root} >/dev/null")
        read = lambda root: shell(f"tar -C {root} -cf - . | cat >/dev/null")
        for name, root in roots:
            fc, _ = median_time(lambda: find(root), runs=3, before=drop_caches)
            rc, _ = median_time(lambda: read(root), runs=3, before=drop_caches)
            walk[name] = {"find_cold": fc, "read_cold": rc, "find_warm": [], "read_warm": []}
        for name, root in roots:
            find(root)
            read(root)
        # warm runs interleaved so background noise hits both alike
        for _ in range(max(RUNS, 7)):
            for name, root in roots:
                t = time.monotonic()
                find(root)
                walk[name]["find_warm"].append(time.monotonic() - t)
                t = time.monotonic()
                read(root)
                walk[name]["read_warm"].append(time.monotonic() - t)
        for w in walk.values():
            w["find_warm"] = statistics.median(w["find_warm"])
            w["read_warm"] = statistics.median(w["read_warm"])
        res["walk"] = walk
        n, m = walk["native (ext4, exported tree)"], walk["strata mount"]
        out.append("### find + full read of debian:python (`find DIR`; `tar -C DIR -cf - . | cat >/dev/null`)\n")
        out.append("| tree | find cold | tar cold | find warm | tar warm |")
        out.append("| --- | --- | --- | --- | --- |")
        for name, w in walk.items():
            out.append(f"| {name} | {w['find_cold']*1000:.0f} ms | {w['read_cold']*1000:.0f} ms | "
                       f"{w['find_warm']*1000:.0f} ms | {w['read_warm']*1000:.0f} ms |")
        out.append(f"| mount / native | {m['find_cold']/n['find_cold']:.2f}x | {m['read_cold']/n['read_cold']:.2f}x | "
                   f"{m['find_warm']/n['find_warm']:.2f}x | {m['read_warm']/n['read_warm']:.2f}x |\n")
        umount_all()

        # 4. page cache sharing
        ma, mb = os.path.join(tmp, "mnt-base"), os.path.join(tmp, "mnt-python")
        os.makedirs(ma)
        os.makedirs(mb)
        s("mount", base, ma)
        mounts.append(ma)
        s("mount", py, mb)
        mounts.append(mb)
        export_base = os.path.join(tmp, "export-base")
        s("export", base, export_base)

        # The regular files under base's /usr that python has unchanged.
        listing = os.path.join(tmp, "shared-files")
        shell(f"cd {export_base} && find usr -type f > {listing}")

        def two_reads(a, b):
            drop_caches()
            c0 = cached_kib()
            shell(f"tar -C {a} -T {listing} -cf - | cat >/dev/null")
            c1 = cached_kib()
            shell(f"tar -C {b} -T {listing} -cf - | cat >/dev/null")
            c2 = cached_kib()
            return c1 - c0, c2 - c1

        pc = {"strata": two_reads(ma, mb), "native": two_reads(export_base, export)}
        libc = "usr/lib/x86_64-linux-gnu/libc.so.6"
        drop_caches()
        shell(f"cat {ma}/{libc} {mb}/{libc} >/dev/null")
        # the object backing libc in both images: same content -> same object
        obj = None
        libc_sha = sh("sha256sum", os.path.join(ma, libc)).split()[0]
        cand = os.path.join(s.root, "objects", libc_sha[:2], libc_sha[2:])
        if os.path.exists(cand):
            obj = cand
        fincore = sh("fincore", "--bytes", "--noheadings", "--output", "RES,SIZE,FILE", obj) if obj else "n/a"
        res["page_cache_kib"] = pc
        res["fincore_libc"] = fincore.strip()
        umount_all()
        out.append("### Page cache: read every file of base's /usr through debian:base, then the same paths through debian:python\n")
        out.append("| trees | Cached after 1st read | added by 2nd read |")
        out.append("| --- | --- | --- |")
        out.append(f"| two strata mounts | +{pc['strata'][0]/1024:.1f} MiB | +{pc['strata'][1]/1024:.1f} MiB |")
        out.append(f"| two native copies (exported dirs) | +{pc['native'][0]/1024:.1f} MiB | +{pc['native'][1]/1024:.1f} MiB |")
        out.append(f"\nAfter `cat` of libc.so.6 through both mounts, `fincore` of its one object: `{fincore.strip()}`\n")

        # 5. the seed case
        flat = Strata(os.path.join(tmp, "seed-flat"))
        hyb = Strata(os.path.join(tmp, "seed-hybrid"))
        ideal = Strata(os.path.join(tmp, "seed-ideal"))
        t = time.monotonic()
        for i in range(N_APPS):
            flat("pull", "-q", "--split-base", "never", f"oci:{APPS}:app-{i}")
        t_flat = time.monotonic() - t
        t = time.monotonic()
        for i in range(N_APPS):
            hyb("pull", "-q", f"oci:{APPS}:app-{i}")  # default: auto, threshold 3
        t_hyb = time.monotonic() - t
        for i in range(N_APPS):
            ideal("pull", "-q", "--split-base", "never", f"oci:{APPS}:layer-{i}")
        ideal("pull", "-q", "--split-base", "never", base)
        f_flat = store_erofs_bytes(flat.root)
        f_hyb = store_erofs_bytes(hyb.root)
        base_img = os.path.join(ideal.root, "images")
        base_digest = ideal("inspect", base)
        base_manifest = json.loads(base_digest)["manifest_digest"].split(":", 1)[1]
        one_base = du_files([os.path.join(base_img, base_manifest, "image.erofs")])
        parts = store_erofs_bytes(ideal.root)[0] - one_base
        ideal_total = one_base + parts
        hyb_total = sum(f_hyb)
        res["seed"] = {"flat": f_flat, "hybrid": f_hyb, "ideal_base": one_base, "ideal_parts": parts,
                       "pull_flat_s": t_flat, "pull_hybrid_s": t_hyb}
        mf, mh = os.path.join(tmp, "mnt-flat"), os.path.join(tmp, "mnt-hyb")
        os.makedirs(mf)
        os.makedirs(mh)
        times = {"flat": [], "hybrid": []}
        for _ in range(max(RUNS, 10)):
            for name, st, d in (("flat", flat, mf), ("hybrid", hyb, mh)):
                t = time.monotonic()
                st("mount", f"oci:{APPS}:app-7", d)
                times[name].append(time.monotonic() - t)
                st("umount", d)
        res["seed"]["mount_s"] = times
        out.append(f"### Seed case: {N_APPS} images = debian base + a small app layer each\n")
        out.append("| | EROFS bytes | vs ideal |")
        out.append("| --- | --- | --- |")
        out.append(f"| ideal: one base image + {N_APPS} app layers alone | {ideal_total:,} "
                   f"(base {one_base:,} + parts {parts:,}) | 1.00x |")
        out.append(f"| strata hybrid (`--split-base auto`, default threshold 3) | {hyb_total:,} "
                   f"(base {f_hyb[2]:,} + parts {f_hyb[1]:,} + flattened {f_hyb[0]:,}) | "
                   f"**{hyb_total/ideal_total:.3f}x** |")
        out.append(f"| strata flattened (`--split-base never`) | {sum(f_flat):,} | {sum(f_flat)/ideal_total:.1f}x |")
        out.append(f"\nPull of all {N_APPS} (no network, base layer shared): flattened {t_flat:.1f} s, hybrid {t_hyb:.1f} s. "
                   f"Mount of app-7 (whole command): flattened {statistics.median(times['flat'])*1000:.1f} ms, "
                   f"hybrid {statistics.median(times['hybrid'])*1000:.1f} ms.\n")
    finally:
        umount_all()
        for d in ("mnt", "mnt-base", "mnt-python", "mnt-flat", "mnt-hyb"):
            p = os.path.join(tmp, d)
            if os.path.ismount(p):
                subprocess.run(["umount", p])
        shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(REPO, "bench/results-erofs.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("\n".join(out))


if __name__ == "__main__":
    main()
