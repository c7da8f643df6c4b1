#!/usr/bin/env python3
"""strata benchmarks for issue 16: the Kubernetes (CRI) path.

  bash bench/run.sh snapshotter-cri

Cold start through containerd 1.6's CRI, as kubelet drives it: PullImage,
RunPodSandbox (host network), CreateContainer, StartContainer, until the
container printed `python3 -c 'import json, sqlite3; print(1)'` and exited
(the `run_total` of crates/strata-cli/tests/cri/cri_client.py, a grpcio
client of the CRI API). Fresh containerd (and strata state) each run; the
sandbox image is pulled before, untimed, as kubelet has it before a pod's
image: by default one like registry.k8s.io/pause (a static binary calling
pause(), built here, sharing no layer with the pod's image); with
BENCH_PAUSE=debian, debian's base running sleep (sharing the python image's
base layer, so only python's layer is left to pull). Links as in bench/lazy.py:
  containerd            CRI with its own overlayfs snapshotter, gzip image
  strata (gzip)         CRI with snapshotter = "strata" and snapshot
                        annotations on: strata pulls the layers into its
                        store, one composefs mount
  strata (zstd:chunked) the same image converted: a lazy mount, prefetch
                        `all` (the default)
  strata (placed)       zstd:chunked with the files python reads placed
                        first, prefetch `list`
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lazy as L  # noqa: E402
import snapshotter as S  # noqa: E402

CLIENT = os.path.join(L.REPO, "crates/strata-cli/tests/cri/cri_client.py")


def containerd_cri(tmp, addr, strata_sock=None):
    d = os.path.join(tmp, "containerd")
    os.makedirs(d, exist_ok=True)
    c = L.Containerd.__new__(L.Containerd)
    c.dir = d
    c.sock = os.path.join(d, "c.sock")
    snap = "strata" if strata_sock else "overlayfs"
    cfg = os.path.join(d, "config.toml")
    with open(cfg, "w") as f:
        f.write(f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n'
                f'[grpc]\n  address = "{c.sock}"\n'
                f'[plugins."io.containerd.grpc.v1.cri"]\n  disable_tcp_service = true\n'
                f'  restrict_oom_score_adj = true\n'
                f'  sandbox_image = "{addr}/strata/pause:sleep"\n'
                f'[plugins."io.containerd.grpc.v1.cri".cni]\n'
                f'  conf_dir = "{d}/cni/conf"\n  bin_dir = "{d}/cni/bin"\n'
                f'[plugins."io.containerd.grpc.v1.cri".containerd]\n'
                f'  snapshotter = "{snap}"\n  disable_snapshot_annotations = false\n'
                f'  default_runtime_name = "runc"\n'
                f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
                f'  runtime_type = "io.containerd.runc.v2"\n'
                f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n'
                f'  Root = "{d}/runc"\n'
                f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{addr}"]\n'
                f'  endpoint = ["http://{addr}"]\n')
        if strata_sock:
            f.write(f'[proxy_plugins]\n  [proxy_plugins.strata]\n    type = "snapshot"\n'
                    f'    address = "{strata_sock}"\n')
    c.p = subprocess.Popen(["containerd", "--config", cfg],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        if subprocess.run(["ctr", "--address", c.sock, "version"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
            break
        time.sleep(0.1)
    return c


def cri(c, *args):
    p = subprocess.run(["python3", CLIENT, "--socket", c.sock, *args],
                       capture_output=True, text=True)
    timings = {}
    for line in p.stderr.splitlines():
        if line.startswith("timings: "):
            timings = json.loads(line[len("timings: "):])
    if p.returncode != 0:
        sys.exit(f"bench: cri_client {args[0]} failed: {p.stderr}")
    return p.stdout.strip(), timings


# the phases of the last cri_run (seconds): PullImage, RunPodSandbox,
# CreateContainer + StartContainer, until the container exited
LAST_PHASES = [{}]


def cri_run(tmp, addr, image, link, n, prefetch=None):
    """One cold start; prefetch None: containerd's own snapshotter."""
    snap = None
    if prefetch is not None:
        # CRI's labels cannot say plain HTTP: the store's registries.json does
        store = os.path.join(tmp, "snap", "store")
        os.makedirs(store, exist_ok=True)
        with open(os.path.join(store, "registries.json"), "w") as f:
            json.dump({"insecure": [addr]}, f)
        snap = S.strata_snapshotter(tmp, prefetch)
    c = containerd_cri(tmp, addr, snap[2] if snap else None)
    try:
        cri(c, "pull", "--image", f"{addr}/strata/pause:sleep")
        L.drop_caches()
        b0 = link.bytes()
        out, t = cri(c, "run", "--image", image, "--sandbox-name", f"bench-{os.getpid()}-{n}",
                     "--log-dir", tempfile.mkdtemp(dir=tmp), "--timeout", "300",
                     "--", "python3", "-c", L.PY)
        if out != "1":
            sys.exit(f"bench: the pod printed {out!r}")
        LAST_PHASES[0] = {k: t[k] for k in ("pull", "sandbox", "create_start", "until_exit") if k in t}
        return t["run_total"], link.bytes() - b0
    finally:
        c.stop()
        if snap:
            snap[0].kill()
            snap[0].wait()
            S.cleanup_root(snap[1])


def main():
    for tool in ("docker-registry", "skopeo", "umoci", "gcc", "containerd", "ctr", "runc", "tc",
                 "ip"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing (bash scripts/install-deps.sh)")
    results = {"runs": L.RUNS}
    with L.JournaledTmp("strata-bench-cri-") as tmp:
        out, placed = S.converted_images(tmp)
        pause = os.path.join(tmp, "pause")
        if os.environ.get("BENCH_PAUSE", "own") == "debian":
            # a sandbox image sharing the python image's base layer: only
            # python's layer is left to pull
            L.run("skopeo", "copy", "--quiet", f"oci:{L.FIX}/debian:base", f"oci:{pause}:base")
            L.run("umoci", "config", "--image", f"{pause}:base", "--tag", "pause",
                  "--config.cmd", "/bin/sleep", "--config.cmd", "infinity")
        else:
            # as registry.k8s.io/pause: one static binary calling pause(),
            # sharing nothing with the pod's image
            c_src = os.path.join(tmp, "pause.c")
            with open(c_src, "w") as f:
                f.write("#include <unistd.h>\nint main(void){for(;;)pause();}\n")
            bundle = os.path.join(tmp, "pause-bundle")
            L.run("umoci", "init", "--layout", pause)
            L.run("umoci", "new", "--image", f"{pause}:pause")
            L.run("umoci", "unpack", "--image", f"{pause}:pause", bundle)
            L.run("gcc", "-static", "-O2", "-o", os.path.join(bundle, "rootfs", "pause"), c_src)
            L.run("umoci", "repack", "--image", f"{pause}:pause", bundle)
            L.run("umoci", "config", "--image", f"{pause}:pause", "--config.entrypoint", "/pause")
        for shaped in (False, True):
            label = "shaped (100 Mbit/s, 20 ms RTT)" if shaped else "loopback"
            print(f"== {label}", flush=True)
            if shaped:
                L.netns_up()
            rtmp = tempfile.mkdtemp(dir=tmp)
            reg = L.Registry(rtmp, shaped)
            try:
                link = L.Link(reg, shaped)
                a = link.addr
                for ref, dest, keep in ((f"oci:{L.FIX}/debian:python", "gz:1", False),
                                        (f"oci:{out}:python", "zc:1", True),
                                        (f"oci:{placed}:python", "zp:1", True),
                                        (f"oci:{pause}:pause", "strata/pause:sleep", False)):
                    L.run("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                          *(["--preserve-digests"] if keep else []), ref, f"docker://{a}/{dest}")
                cases = {
                    "containerd CRI (overlayfs)":
                        lambda n: cri_run(tmp, a, f"{a}/gz:1", link, n),
                    "strata CRI (gzip)":
                        lambda n: cri_run(tmp, a, f"{a}/gz:1", link, n, "all"),
                    "strata CRI (zstd:chunked, lazy)":
                        lambda n: cri_run(tmp, a, f"{a}/zc:1", link, n, "all"),
                    "strata CRI (zstd:chunked, list placed first, prefetch list)":
                        lambda n: cri_run(tmp, a, f"{a}/zp:1", link, n, "list"),
                }
                key = "shaped" if shaped else "loopback"
                results[key] = {}
                for name, f in cases.items():
                    xs, bs, phases = [], [], []
                    for n in range(L.RUNS):
                        dt, b = f(n)
                        xs.append(dt)
                        bs.append(b)
                        phases.append(LAST_PHASES[0])
                    results[key][name] = {"seconds": L.med(xs), "all": xs, "bytes": L.med(bs),
                                          "phases": phases}
                    # the phases of the median run
                    ph = phases[xs.index(L.med(xs))] if L.med(xs) in xs else phases[0]
                    print(f"  {name}: {L.med(xs):.2f} s, {L.med(bs)/1e6:.1f} MB "
                          f"({', '.join(f'{k} {v:.2f}' for k, v in ph.items())})", flush=True)
                base = results[key]["containerd CRI (overlayfs)"]["seconds"]
                for name in list(cases)[1:]:
                    r = base / results[key][name]["seconds"]
                    results[key][f"containerd / {name}"] = r
                    print(f"  containerd / {name}: {r:.2f}x", flush=True)
            finally:
                reg.stop()
                if shaped:
                    L.netns_down()
    suffix = "-debian-pause" if os.environ.get("BENCH_PAUSE") == "debian" else ""
    path = os.path.join(L.REPO, f"bench/results-snapshotter-cri{suffix}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
