#!/usr/bin/env python3
"""strata benchmarks for issue 16: containerd with the strata snapshotter.

  bash bench/run.sh snapshotter

Cold start through containerd 1.6 (+ runc): from the pull command to the
output of `python3 -c 'import json, sqlite3; print(1)'` in a container,
fresh containerd (and strata state) each run, registry behind the same
links as bench/lazy.py (loopback; 100 Mbit/s with 20 ms RTT):
  containerd               ctr image pull + ctr run (overlayfs snapshotter)
  strata rpull (gzip)      strata rpull + ctr run --snapshotter strata; the
                           image pulled into strata's store, one composefs
                           mount as the container's lower
  strata rpull (chunked)   the same image as zstd:chunked: a lazy mount,
                           files on first read; the snapshotter's prefetch
                           `all` (the default) and `none`
  strata rpull (placed)    zstd:chunked with the files python reads
                           (recorded once with `strata mount --lazy --record`)
                           placed first (`strata convert --prefetch-list`),
                           snapshotter prefetch `list`
Bytes: what the link carried before the first output.
The link limit: curl of the gzip image's layer blobs, all at once, through
the same link; `strata rpull` of the gzip image is compared with it.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lazy as L  # noqa: E402  (the registry, link, containerd helpers)


def strata_snapshotter(tmp, prefetch="all"):
    root = os.path.join(tmp, "snap")
    sock = os.path.join(tmp, "strata.sock")
    log = open(os.path.join(tmp, "snap.log"), "a")
    cfg = os.path.join(tmp, "snap-config.toml")
    with open(cfg, "w") as f:
        f.write(f'[snapshotter]\nprefetch = "{prefetch}"\n')
        # containerd's root as containerd_with and snapshotter_cri set it:
        # manifests and configs come from its content store
        f.write(f'containerd_root = "{os.path.join(tmp, "containerd", "root")}"\n')
        # BENCH_SPARE_MIB=0: no lazy mount daemon started ahead (A/B)
        if os.environ.get("BENCH_SPARE_MIB"):
            f.write(f'spare_mib = {int(os.environ["BENCH_SPARE_MIB"])}\n')
    p = subprocess.Popen([L.STRATA, "--root", root, "snapshotter", "--socket", sock,
                          "--config", cfg], stdout=subprocess.DEVNULL, stderr=log)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    return p, root, sock


def containerd_with(tmp, sock):
    d = os.path.join(tmp, "containerd")
    os.makedirs(d, exist_ok=True)
    c = L.Containerd.__new__(L.Containerd)
    c.dir = d
    c.sock = os.path.join(d, "c.sock")
    cfg = os.path.join(d, "config.toml")
    with open(cfg, "w") as f:
        f.write(f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n'
                f'[grpc]\n  address = "{c.sock}"\n'
                f'[plugins."io.containerd.grpc.v1.cri"]\n  disable_tcp_service = true\n'
                f'[proxy_plugins]\n  [proxy_plugins.strata]\n    type = "snapshot"\n'
                f'    address = "{sock}"\n')
    c.p = subprocess.Popen(["containerd", "--config", cfg],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        if subprocess.run(["ctr", "--address", c.sock, "version"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
            break
        time.sleep(0.1)
    return c


# seconds of the last strata_rpull_run's `strata rpull` alone
LAST_RPULL = [0.0]


def link_download(link, repo_tag):
    """The link limit: seconds to download the image's layer blobs
    through `link` with curl, all at once (as pulls fetch them), and the
    bytes."""
    repo, tag = repo_tag.split(":")
    m = json.loads(subprocess.run(
        ["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json,"
         "application/vnd.docker.distribution.manifest.v2+json",
         f"http://{link.addr}/v2/{repo}/manifests/{tag}"],
        check=True, capture_output=True).stdout)
    b0 = link.bytes()
    t = time.monotonic()
    ps = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null",
                            f"http://{link.addr}/v2/{repo}/blobs/{layer['digest']}"])
          for layer in m["layers"]]
    for p in ps:
        if p.wait() != 0:
            sys.exit("bench: curl of a layer failed")
    return time.monotonic() - t, link.bytes() - b0


def strata_rpull_run(tmp, image, link, n, prefetch="all"):
    t0 = time.monotonic()
    p, root, sock = strata_snapshotter(tmp, prefetch)
    c = containerd_with(tmp, sock)
    try:
        b0 = link.bytes()
        t = time.monotonic()
        L.run(L.STRATA, "--quiet", "rpull", "--plain-http", "--address", c.sock, image)
        LAST_RPULL[0] = time.monotonic() - t
        out = c.ctr("run", "--rm", "--snapshotter", "strata", image, f"sbench-{os.getpid()}-{n}",
                    "/usr/bin/python3", "-c", L.PY).strip()
        dt = time.monotonic() - t
        if out != "1":
            sys.exit(f"bench: ctr run printed {out!r}")
        return dt, link.bytes() - b0
    finally:
        c.stop()
        p.kill()
        p.wait()
        cleanup_root(root)
        _ = t0


def cleanup_root(root):
    """Unmount the image mounts (and their lazy daemons) under a
    snapshotter's root, then remove it."""
    mnt = os.path.join(root, "mnt")
    for m in os.listdir(mnt) if os.path.isdir(mnt) else []:
        subprocess.run([L.STRATA, "--root", os.path.join(root, "store"), "umount",
                        os.path.join(mnt, m)], stderr=subprocess.DEVNULL)
    subprocess.run(["umount", "-R", root], stderr=subprocess.DEVNULL)
    shutil.rmtree(root, ignore_errors=True)


def converted_images(tmp):
    """The debian+python fixture as zstd:chunked (OCI dir, tag python), and
    again with the files python reads placed first: (conv, placed)."""
    conv = os.path.join(tmp, "s-conv")
    src = f"oci:{L.FIX}/debian:python"
    L.strata(conv, "pull", "-q", src)
    out = os.path.join(tmp, "conv")
    L.strata(conv, "convert", src, f"oci:{out}:python")
    # what python reads, recorded once on a lazy mount of the conversion,
    # then placed first in another conversion
    lst = os.path.join(tmp, "prefetch.list")
    mnt = os.path.join(tmp, "mnt-record")
    os.makedirs(mnt)
    L.strata(conv, "mount", "--lazy", "--prefetch", "none", "--record", lst,
             f"oci:{out}:python", mnt)
    L.wait_output(["chroot", mnt, "/usr/bin/python3", "-c", L.PY])
    L.strata(conv, "umount", mnt)
    placed = os.path.join(tmp, "placed")
    L.strata(conv, "convert", src, f"oci:{placed}:python", "--prefetch-list", lst)
    shutil.rmtree(conv)
    return out, placed


def main():
    for tool in ("docker-registry", "skopeo", "containerd", "ctr", "runc", "tc", "ip"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing (bash scripts/install-deps.sh)")
    results = {"runs": L.RUNS}
    with L.JournaledTmp("strata-bench-snap-") as tmp:
        out, placed = converted_images(tmp)
        for shaped in (False, True):
            label = "shaped (100 Mbit/s, 20 ms RTT)" if shaped else "loopback"
            print(f"== {label}", flush=True)
            if shaped:
                L.netns_up()
            rtmp = tempfile.mkdtemp(dir=tmp)
            reg = L.Registry(rtmp, shaped)
            try:
                link = L.Link(reg, shaped)
                L.run("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                      f"oci:{L.FIX}/debian:python", f"docker://{link.addr}/gz:1")
                L.run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
                      f"oci:{out}:python", f"docker://{link.addr}/zc:1")
                L.run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
                      f"oci:{placed}:python", f"docker://{link.addr}/zp:1")
                cases = {
                    "link limit (curl of the gzip layers)": lambda n: link_download(link, "gz:1"),
                    "containerd pull + run": lambda n: L.containerd_run(
                        tmp, f"docker://{link.addr}/gz:1", link, n),
                    "strata rpull + run (gzip)": lambda n: strata_rpull_run(
                        tmp, f"{link.addr}/gz:1", link, n),
                    "strata rpull + run (zstd:chunked, lazy)": lambda n: strata_rpull_run(
                        tmp, f"{link.addr}/zc:1", link, n),
                    "strata rpull + run (zstd:chunked, lazy, prefetch none)":
                        lambda n: strata_rpull_run(tmp, f"{link.addr}/zc:1", link, n, "none"),
                    "strata rpull + run (zstd:chunked, list placed first, prefetch list)":
                        lambda n: strata_rpull_run(tmp, f"{link.addr}/zp:1", link, n, "list"),
                }
                key = "shaped" if shaped else "loopback"
                results[key] = {}
                for name, f in cases.items():
                    xs, bs, rp = [], [], []
                    for n in range(L.RUNS):
                        L.drop_caches()
                        dt, b = f(n)
                        xs.append(dt)
                        bs.append(b)
                        rp.append(LAST_RPULL[0])
                    results[key][name] = {"seconds": L.med(xs), "all": xs, "bytes": L.med(bs)}
                    if name.startswith("strata"):
                        results[key][name]["rpull_seconds"] = L.med(rp)
                    print(f"  {name}: {L.med(xs):.2f} s, {L.med(bs)/1e6:.1f} MB"
                          + (f" (rpull {L.med(rp):.2f} s)" if name.startswith("strata") else ""),
                          flush=True)
                limit = results[key]["link limit (curl of the gzip layers)"]["seconds"]
                gz = results[key]["strata rpull + run (gzip)"]["rpull_seconds"]
                results[key]["strata rpull (gzip) / link limit"] = gz / limit
                print(f"  strata rpull (gzip) / link limit: {gz / limit:.2f}", flush=True)
                base = results[key]["containerd pull + run"]["seconds"]
                for name in list(cases)[2:]:
                    r = base / results[key][name]["seconds"]
                    results[key][f"containerd / {name}"] = r
                    print(f"  containerd / {name}: {r:.2f}x", flush=True)
            finally:
                reg.stop()
                if shaped:
                    L.netns_down()
    path = os.path.join(L.REPO, "bench/results-snapshotter.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
