#!/usr/bin/env python3
"""strata benchmarks for issue 17: `strata serve`, the conversion service.

  bash bench/run.sh serve
  python3 bench/serve.py               # the same, without the build

Loopback, two docker-registry instances on 127.0.0.1: a source registry
holding app-0..app-9 of the apps fixture (Debian's base layer, gzip, plus a
small app layer each; pushed with skopeo as they are), and a destination
registry, fresh for every run, that the results go to. Two registries,
because skopeo copying within one registry mounts the gzip blob it
already has there and converts nothing (checked below, `peer pitfall`).
Everything (registries, stores) lives on a fresh journaled ext4
(`lazy.JournaledTmp`); `sync` and a 2 s pause before every run.

  cold       one image (app-0): a fresh `strata serve` (workers=1, fresh
             store) converts it to zstd:chunked, pulled, converted, pushed,
             verified from the registry and tagged; against `skopeo copy
             --dest-compress-format zstd:chunked --dest-compress` of it.
  throughput all 10 submitted at once to a fresh service with a fresh
             store, workers=1 and then workers=2, until every job has
             succeeded; against skopeo copying the 10 one after another.
             The service's store keeps the Debian base layer after the
             first pull, so jobs 2..10 pull only their app layer (every
             job still converts and verifies both layers; the converted
             base is the same blob every time, so from the second job on
             the push finds it in the registry and skips its upload):
             that is how the service behaves, and why it is faster per
             image than its cold number.
  latency    GET /v1/conversions/{id} from 100 Python threads at once, each
             on its own keep-alive connection doing SERVE_GETS (50) GETs
             over the 10 finished jobs (client-side times, so they include
             the Python client's own scheduling: 100 threads share one
             GIL, switched every 5 ms); one client alone first, then
             SERVE_GET_ROUNDS (3) rounds, the one with the median p99
             reported.
  memory     VmHWM of each service process after its throughput run.
  verify     strata_serve_phase_seconds_total from /metrics: verifying /
             converting (goal: at most 30%); `converting` includes pushing,
             the converter pushes each blob as it is written.

Every job must end `succeeded` with `verification.ok`, converted now (not a
registry cache hit); every skopeo result must have zstd layers with the
zstd:chunked TOC annotations. Anything else stops the bench.

Environment: `STRATA_BIN` (default target/release/strata), `SERVE_IMAGES`
(10), `SERVE_CLIENTS` (100), `SERVE_GETS` (50 per client), `SERVE_GET_ROUNDS` (3), `BENCH_ROOT_FS=1`
(scratch on the root filesystem instead of the journaled image). Raw
numbers in bench/results-serve.json.
"""
import concurrent.futures as cf
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lazy as L  # noqa: E402

IMAGES = int(os.environ.get("SERVE_IMAGES", "10"))
CLIENTS = int(os.environ.get("SERVE_CLIENTS", "100"))
GETS = int(os.environ.get("SERVE_GETS", "50"))
ROUNDS = int(os.environ.get("SERVE_GET_ROUNDS", "3"))
TOKEN = "bench-serve-token"
FORMAT = "zstd:chunked"
VERIFY_GOAL = 0.30
TOC_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"


# the binary every service runs: copied at the start (a build in this tree
# during the bench must not change what is measured half way)
BIN = L.STRATA


class Watch:
    """Samples, every 2 s, the load average and whether a build or test run
    (rustc, cargo, nextest, cc) ran beside the bench: on 2 cores such a
    neighbour changes the numbers, and the record should say so."""

    NAMES = ("rustc", "cargo", "cargo-nextest", "cc1", "ld", "collect2")

    def __init__(self):
        self.samples = []
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stop.wait(2):
            seen = 0
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        with open(f"/proc/{pid}/comm") as f:
                            seen += f.read().strip() in self.NAMES
                    except OSError:
                        pass
            self.samples.append((time.time(), os.getloadavg()[0], seen))

    def summary(self):
        self.stop.set()
        s = self.samples or [(0, 0, 0)]
        return {"samples": len(s), "max_load1": round(max(x[1] for x in s), 2),
                "samples_with_builds_beside": sum(1 for x in s if x[2])}


def settle():
    subprocess.run(["sync"], check=True)
    time.sleep(2)


class Service:
    """One `strata serve` process on a free port, with its own store."""

    def __init__(self, dir, workers, hosts):
        os.makedirs(dir)
        self.dir = dir
        tokens = os.path.join(dir, "tokens")
        with open(tokens, "w") as f:
            f.write(f"{TOKEN}\n")
        cfg = os.path.join(dir, "serve.toml")
        hl = ", ".join(f'"{h}"' for h in hosts)
        with open(cfg, "w") as f:
            f.write(f'tokens_file = "{tokens}"\nworkers = {workers}\n'
                    f"[registries]\nallow = [{hl}]\ninsecure = [{hl}]\n")
        self.port = L.free_port()
        self.log = os.path.join(dir, "serve.log")
        self.p = subprocess.Popen(
            [BIN, "--root", os.path.join(dir, "store"), "serve",
             "--listen", f"127.0.0.1:{self.port}", "--config", cfg],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "a"),
            env=dict(os.environ, STRATA_LOG="info"))
        t = time.monotonic()
        while True:
            try:
                if self.request("GET", "/healthz", auth=False)[0] == 200:
                    break
            except OSError:
                pass
            if self.p.poll() is not None or time.monotonic() - t > 20:
                self.fail(f"strata serve did not come up (exit {self.p.poll()})")
            time.sleep(0.05)

    def fail(self, msg):
        with open(self.log, errors="replace") as f:
            tail = f.read()[-4000:]
        self.stop()
        sys.exit(f"bench: {msg}\n--- {self.log} (tail) ---\n{tail}")

    def request(self, method, path, body=None, auth=True, conn=None):
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        headers = {}
        if auth:
            headers["Authorization"] = f"Bearer {TOKEN}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        raw = r.read()
        if conn is None:
            c.close()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw.decode(errors="replace")

    def submit(self, source, target):
        st, job = self.request("POST", "/v1/conversions",
                               {"source": source, "format": FORMAT, "target": target})
        if st != 202:
            self.fail(f"POST {source} -> {target}: {st} {job} (expected 202: a new job)")
        return job["id"]

    def wait_all(self, ids, timeout=1800):
        """Poll every job until it is over; {id: (job, seconds when seen over)}."""
        t0 = time.monotonic()
        done = {}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        while len(done) < len(ids):
            for i in ids:
                if i in done:
                    continue
                st, job = self.request("GET", f"/v1/conversions/{i}", conn=conn)
                if st != 200:
                    self.fail(f"GET {i}: {st} {job}")
                if job["state"] in ("succeeded", "failed", "cancelled"):
                    done[i] = (job, time.monotonic())
            if time.monotonic() - t0 > timeout:
                self.fail(f"jobs not over after {timeout} s")
            time.sleep(0.1)
        conn.close()
        return done

    def metrics(self):
        st, text = self.request("GET", "/metrics")
        if st != 200:
            self.fail(f"GET /metrics: {st}")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                out[k] = float(v)
        return out

    def status_kb(self, key):
        with open(f"/proc/{self.p.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return None

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def check_job(svc, job):
    v = job.get("verification") or {}
    bad = [c for c in v.get("checks", []) if not c.get("ok")]
    if job["state"] != "succeeded" or v.get("ok") is not True or bad:
        svc.fail(f"job {job['id']} ended {job['state']}, verification.ok="
                 f"{v.get('ok')}, failed checks {bad}, error {job.get('error')}")
    if (job.get("result") or {}).get("cache") != "none":
        svc.fail(f"job {job['id']} was not converted now: {job.get('result')}")


def phases(m):
    p = {}
    for k, v in m.items():
        if k.startswith('strata_serve_phase_seconds_total{phase="'):
            p[k.split('"')[1]] = v
    return p


def convert_all(tmp, name, workers, src, dst, tags, keep=False):
    """A fresh service converting `tags` (all submitted at once)."""
    settle()
    svc = Service(os.path.join(tmp, name), workers, [src.addr, dst.addr])
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(len(tags)) as ex:
        ids = list(ex.map(lambda t: svc.submit(f"{src.addr}/src/app:{t}",
                                               f"{dst.addr}/strata/app:{t}"), tags))
    t_submit = time.monotonic() - t0
    done = svc.wait_all(ids)
    wall = max(t for _, t in done.values()) - t0
    for job, _ in done.values():
        check_job(svc, job)
    m = svc.metrics()
    res = {
        "images": len(tags), "workers": workers, "seconds": round(wall, 2),
        "seconds_to_admit_all": round(t_submit, 2),
        "per_minute": round(len(tags) * 60 / wall, 2),
        "phase_seconds": phases(m),
        "conversions_started": m.get("strata_serve_conversions_started_total"),
        "converted_bytes": m.get("strata_serve_converted_bytes_total"),
        "verify_seconds_in_jobs": [round(j["verification"].get("seconds", 0), 3)
                                   for j, _ in done.values()],
        "VmHWM_kB": svc.status_kb("VmHWM"), "VmRSS_kB": svc.status_kb("VmRSS"),
        # the same base converts to the same blob: pushed by the first job,
        # found present (HEAD) by the others
        "distinct_base_blobs": len({j["result"]["layers"][0]["digest"] for j, _ in done.values()}),
    }
    if res["conversions_started"] != len(tags):
        svc.fail(f"{res['conversions_started']} conversions started for {len(tags)} images")
    ph = res["phase_seconds"]
    res["verify_share"] = round(ph.get("verifying", 0) / ph["converting"], 3)
    print(f"  strata serve workers={workers}, {len(tags)} image(s): {wall:.2f} s, "
          f"{res['per_minute']:.1f}/min; phases {json.dumps({k: round(v, 2) for k, v in ph.items()})}; "
          f"VmHWM {res['VmHWM_kB'] / 1024:.1f} MB", flush=True)
    if keep:
        return res, svc, ids
    svc.stop()
    return res, None, None


def skopeo_convert(src, dst, tag):
    L.run("skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
          "--dest-compress-format", FORMAT, "--dest-compress",
          f"docker://{src.addr}/src/app:{tag}", f"docker://{dst.addr}/skopeo/app:{tag}")


def raw_manifest(ref):
    return json.loads(L.run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"))


def skopeo_all(src, dst, tags):
    settle()
    t0 = time.monotonic()
    per = []
    for t in tags:
        t1 = time.monotonic()
        skopeo_convert(src, dst, t)
        per.append(round(time.monotonic() - t1, 2))
    wall = time.monotonic() - t0
    for t in tags:
        m = raw_manifest(f"{dst.addr}/skopeo/app:{t}")
        for layer in m["layers"]:
            if not layer["mediaType"].endswith("+zstd") or TOC_ANNOTATION not in layer.get("annotations", {}):
                sys.exit(f"bench: skopeo's app:{t} is not zstd:chunked: {layer}")
    res = {"images": len(tags), "seconds": round(wall, 2), "per_image_seconds": per,
           "per_minute": round(len(tags) * 60 / wall, 2)}
    print(f"  skopeo sequential, {len(tags)} image(s): {wall:.2f} s, {res['per_minute']:.1f}/min "
          f"(each: {per})", flush=True)
    return res


def peer_pitfall(src):
    """skopeo copy --dest-compress-format zstd:chunked within one registry:
    what media type the result's base layer has."""
    t0 = time.monotonic()
    skopeo_convert(src, src, "app-0")
    dt = time.monotonic() - t0
    m = raw_manifest(f"{src.addr}/skopeo/app:app-0")
    types = [layer["mediaType"] for layer in m["layers"]]
    print(f"  peer pitfall: skopeo zstd:chunked copy within one registry: {dt:.2f} s, "
          f"layers {types}", flush=True)
    return {"seconds": round(dt, 2), "layer_media_types": types}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def get_latency(svc, ids, clients, gets):
    """Every client: its own keep-alive connection, `gets` GETs over `ids`,
    all clients released at once. Times in ms, client side."""
    barrier = threading.Barrier(clients)
    lat = [[] for _ in range(clients)]
    errors = []

    def client(n):
        c = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=60)
        c.connect()
        h = {"Authorization": f"Bearer {TOKEN}"}
        barrier.wait()
        for k in range(gets):
            i = ids[(n + k) % len(ids)]
            t = time.perf_counter()
            c.request("GET", f"/v1/conversions/{i}", headers=h)
            r = c.getresponse()
            body = r.read()
            lat[n].append((time.perf_counter() - t) * 1000)
            if r.status != 200 or b'"succeeded"' not in body:
                errors.append((r.status, body[:200]))
        c.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    if errors:
        svc.fail(f"{len(errors)} GETs went wrong, e.g. {errors[0]}")
    xs = [x for one in lat for x in one]
    return {"clients": clients, "gets_per_client": gets, "requests": len(xs),
            "p50_ms": round(pct(xs, 0.5), 3), "p99_ms": round(pct(xs, 0.99), 3),
            "max_ms": round(max(xs), 3), "seconds": round(wall, 2),
            "requests_per_second": round(len(xs) / wall, 1)}


def main():
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing (bash scripts/install-deps.sh)")
    if not os.access(L.STRATA, os.X_OK):
        sys.exit(f"bench: {L.STRATA} is missing (cargo build --release -p strata-cli --bin strata)")
    tags = [f"app-{i}" for i in range(IMAGES)]
    res = {"machine": f"{os.cpu_count()} vCPU", "strata": L.STRATA, "format": FORMAT,
           "skopeo": L.run("skopeo", "--version").strip(),
           "loadavg_at_start": os.getloadavg()}
    global BIN
    watch = Watch()
    with L.JournaledTmp("strata-bench-serve-") as tmp:
        BIN = os.path.join(tmp, "strata")
        shutil.copy2(L.STRATA, BIN)
        res["strata_sha256"] = L.run("sha256sum", BIN).split()[0]
        res["strata_mtime"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(os.path.getmtime(L.STRATA)))
        os.makedirs(os.path.join(tmp, "src-reg"))
        src = L.Registry(os.path.join(tmp, "src-reg"), False)
        src.addr = f"127.0.0.1:{src.port}"
        dsts = []

        def fresh_dst(name):
            settle()
            os.makedirs(os.path.join(tmp, name))
            d = L.Registry(os.path.join(tmp, name), False)
            d.addr = f"127.0.0.1:{d.port}"
            dsts.append(d)
            return d

        try:
            for t in tags:
                L.run("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                      f"oci:{L.FIX}/apps:{t}", f"docker://{src.addr}/src/app:{t}")
            print(f"== {IMAGES} images (apps fixture: Debian base + an app layer, gzip) "
                  f"in a docker-registry on {src.addr}", flush=True)

            print("== cold: one image, fresh store, fresh destination", flush=True)
            r, _, _ = convert_all(tmp, "svc-cold", 1, src, fresh_dst("dst-cold"), tags[:1])
            res["cold_strata"] = r
            res["cold_skopeo"] = skopeo_all(src, fresh_dst("dst-cold-skopeo"), tags[:1])

            print(f"== throughput: {IMAGES} images submitted at once", flush=True)
            r, _, _ = convert_all(tmp, "svc-w1", 1, src, fresh_dst("dst-w1"), tags)
            res["strata_workers_1"] = r
            r, svc, ids = convert_all(tmp, "svc-w2", 2, src, fresh_dst("dst-w2"), tags, keep=True)
            res["strata_workers_2"] = r
            try:
                print(f"== GET /v1/conversions/{{id}} on the workers=2 service "
                      f"({len(ids)} finished jobs)", flush=True)
                one = get_latency(svc, ids, 1, 500)
                rounds = [get_latency(svc, ids, CLIENTS, GETS) for _ in range(ROUNDS)]
                # the round with the median p99 stands for the rest
                many = sorted(rounds, key=lambda x: x["p99_ms"])[len(rounds) // 2]
                res["get_latency"] = {"one_client": one, "concurrent": many, "rounds": rounds}
                for what, x in [("1 client", one)] + [(f"{CLIENTS} clients, round {n + 1}", x)
                                                      for n, x in enumerate(rounds)]:
                    print(f"  {what}: p50 {x['p50_ms']} ms, p99 {x['p99_ms']} ms, "
                          f"max {x['max_ms']} ms, {x['requests_per_second']} req/s", flush=True)
                res["strata_workers_2"]["VmHWM_kB_after_gets"] = svc.status_kb("VmHWM")
                res["strata_workers_2"]["VmRSS_kB_after_gets"] = svc.status_kb("VmRSS")
            finally:
                svc.stop()
            res["skopeo"] = skopeo_all(src, fresh_dst("dst-skopeo"), tags)
            print("== peer pitfall: skopeo within the source registry", flush=True)
            res["peer_pitfall_same_registry"] = peer_pitfall(src)
        finally:
            for d in dsts:
                d.stop()
            src.stop()

    # verification share over both throughput runs
    ph = [res[k]["phase_seconds"] for k in ("strata_workers_1", "strata_workers_2")]
    ver, conv = sum(p.get("verifying", 0) for p in ph), sum(p["converting"] for p in ph)
    res["verify_share"] = {"verifying_s": round(ver, 2), "converting_s": round(conv, 2),
                           "share": round(ver / conv, 3), "goal": VERIFY_GOAL,
                           "met": ver / conv <= VERIFY_GOAL}
    sk = res["skopeo"]["per_minute"]
    for k in ("strata_workers_1", "strata_workers_2"):
        res[k]["vs_skopeo"] = round(res[k]["per_minute"] / sk, 2)
    res["cold_strata"]["vs_skopeo"] = round(res["cold_skopeo"]["seconds"] / res["cold_strata"]["seconds"], 2)

    mb = lambda kb: f"{kb / 1024:.1f} MB"  # noqa: E731
    w1, w2, s = res["strata_workers_1"], res["strata_workers_2"], res["skopeo"]
    c, cs = res["cold_strata"], res["cold_skopeo"]
    g = res["get_latency"]
    v = res["verify_share"]
    print()
    print("| what | strata serve | skopeo copy | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| cold, 1 image (fresh store) | {c['seconds']:.2f} s | {cs['seconds']:.2f} s | "
          f"**{c['vs_skopeo']:.1f}x faster** |")
    print(f"| {IMAGES} images, workers=1 | {w1['seconds']:.2f} s, {w1['per_minute']:.1f}/min | "
          f"{s['seconds']:.2f} s, {s['per_minute']:.1f}/min (sequential) | **{w1['vs_skopeo']:.1f}x** |")
    print(f"| {IMAGES} images, workers=2 | {w2['seconds']:.2f} s, {w2['per_minute']:.1f}/min | "
          f"(same) | **{w2['vs_skopeo']:.1f}x** |")
    print(f"| GET /v1/conversions/{{id}}, 1 client | p50 {g['one_client']['p50_ms']} ms, "
          f"p99 {g['one_client']['p99_ms']} ms | | |")
    print(f"| GET /v1/conversions/{{id}}, {CLIENTS} keep-alive clients x {GETS} (median of {ROUNDS} rounds) | "
          f"p50 {g['concurrent']['p50_ms']} ms, p99 {g['concurrent']['p99_ms']} ms, "
          f"{g['concurrent']['requests_per_second']} req/s | | |")
    print(f"| service VmHWM after throughput run | workers=1 {mb(w1['VmHWM_kB'])}, "
          f"workers=2 {mb(w2['VmHWM_kB'])} | | |")
    for k, n in (("strata_workers_1", 1), ("strata_workers_2", 2)):
        p = res[k]["phase_seconds"]
        print(f"| verifying / converting, workers={n} | {p.get('verifying', 0):.2f} s / "
              f"{p['converting']:.2f} s = {res[k]['verify_share'] * 100:.1f}% | | |")
    print(f"| verifying / converting (both runs) | {v['verifying_s']} s / {v['converting_s']} s "
          f"= {v['share'] * 100:.1f}% (goal <= 30%: {'met' if v['met'] else 'NOT met'}) | | |")
    res["loadavg_at_end"] = os.getloadavg()
    res["neighbours"] = watch.summary()
    print(f"load average at start {res['loadavg_at_start']}, at end {res['loadavg_at_end']}; "
          f"beside the bench: {res['neighbours']}")
    path = os.path.join(L.REPO, "bench/results-serve.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
