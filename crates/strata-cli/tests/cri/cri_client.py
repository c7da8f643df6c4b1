#!/usr/bin/env python3
"""Minimal CRI (runtime.v1) test client for strata's integration tests.

Drives a containerd CRI plugin over its unix socket:

    python3 cri_client.py --socket SOCK run --image IMAGE --sandbox-name N \
        --log-dir DIR [--timeout 120] -- CMD ARGS...

PullImage -> RunPodSandbox (host network) -> CreateContainer -> StartContainer
-> poll ContainerStatus until EXITED -> print the container's stdout (read
from the CRI log file) and exit with the container's exit code. Container
stderr is forwarded to our stderr. The container and the sandbox are always
stopped and removed.

    python3 cri_client.py --socket SOCK pull --image IMAGE [--timeout 120]

pulls an image through CRI (e.g. to pre-pull the sandbox image) and prints
its image ref.

Exit codes: the container's exit code on success; 2 on a gRPC error (status
code and details on stderr) or when cleanup failed; 3 on a bad log file;
124 when the container did not exit within --timeout.
A line `timings: {json}` (seconds) is always printed to stderr at the end.

Needs grpcio and grpcio-tools; the .proto next to this file is compiled at
run time into a temporary directory.
"""

import argparse
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = "runtime_v1_subset.proto"

EXIT_GRPC = 2
EXIT_LOG = 3
EXIT_TIMEOUT = 124


class Timeout(Exception):
    pass


def eprint(*a):
    print(*a, file=sys.stderr, flush=True)


def load_stubs(tmp):
    """Compile the proto with grpc_tools into tmp and import the modules."""
    from grpc_tools import protoc

    rc = protoc.main([
        "grpc_tools.protoc",
        "-I" + HERE,
        "--python_out=" + tmp,
        "--grpc_python_out=" + tmp,
        os.path.join(HERE, PROTO),
    ])
    if rc != 0:
        raise RuntimeError("protoc failed with %d" % rc)
    sys.path.insert(0, tmp)
    base = PROTO[: -len(".proto")]
    pb2 = importlib.import_module(base + "_pb2")
    pb2_grpc = importlib.import_module(base + "_pb2_grpc")
    return pb2, pb2_grpc


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self, cap=None):
        left = self.end - time.monotonic()
        if left <= 0:
            raise Timeout()
        return left if cap is None else min(left, cap)


def parse_cri_log(path):
    """Parse a CRI log file into (stdout_text, stderr_text).

    Lines look like `<RFC3339Nano> <stdout|stderr> <F|P> <content>`; a `P`
    (partial) line continues in the next line of the same stream without a
    newline in between.
    """
    out = {"stdout": [], "stderr": []}
    with open(path, "rb") as f:
        data = f.read()
    for raw in data.split(b"\n"):
        if not raw:
            continue
        parts = raw.split(b" ", 3)
        if len(parts) < 3:
            raise ValueError("bad CRI log line: %r" % raw)
        stream = parts[1].decode()
        tag = parts[2]
        content = parts[3] if len(parts) == 4 else b""
        if stream not in out:
            raise ValueError("bad stream in CRI log line: %r" % raw)
        out[stream].append(content)
        if tag.split(b":")[0] != b"P":
            out[stream].append(b"\n")
    return b"".join(out["stdout"]), b"".join(out["stderr"])


def cmd_pull(args, pb2, pb2_grpc, channel, timings):
    images = pb2_grpc.ImageServiceStub(channel)
    dl = Deadline(args.timeout)
    t = time.monotonic()
    resp = images.PullImage(
        pb2.PullImageRequest(image=pb2.ImageSpec(image=args.image)), timeout=dl.left())
    timings["pull"] = round(time.monotonic() - t, 3)
    print(resp.image_ref, flush=True)
    return 0


def cmd_status(args, pb2, pb2_grpc, channel, timings):
    images = pb2_grpc.ImageServiceStub(channel)
    resp = images.ImageStatus(
        pb2.ImageStatusRequest(image=pb2.ImageSpec(image=args.image)), timeout=args.timeout)
    if not resp.image.id:
        eprint("cri_client: image %s not found" % args.image)
        return 1
    print(json.dumps({"id": resp.image.id, "repo_tags": list(resp.image.repo_tags),
                      "repo_digests": list(resp.image.repo_digests)}), flush=True)
    return 0


def cmd_run(args, pb2, pb2_grpc, channel, timings):
    runtime = pb2_grpc.RuntimeServiceStub(channel)
    images = pb2_grpc.ImageServiceStub(channel)
    dl = Deadline(args.timeout)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        eprint("cri_client: no command given (put it after --)")
        return EXIT_GRPC

    log_dir = os.path.abspath(args.log_dir)
    os.makedirs(log_dir, exist_ok=True)
    log_rel = args.container_name + ".log"
    log_file = os.path.join(log_dir, log_rel)

    host_net = pb2.NamespaceOption(network=pb2.NODE)
    sandbox_config = pb2.PodSandboxConfig(
        metadata=pb2.PodSandboxMetadata(
            name=args.sandbox_name,
            uid=str(uuid.uuid4()),
            namespace=args.namespace,
            attempt=0,
        ),
        log_directory=log_dir,
        linux=pb2.LinuxPodSandboxConfig(
            security_context=pb2.LinuxSandboxSecurityContext(namespace_options=host_net),
        ),
    )
    if args.hostname:
        sandbox_config.hostname = args.hostname

    sandbox_id = None
    container_id = None
    exited = False
    t_all = time.monotonic()
    try:
        t = time.monotonic()
        present = False
        image_ref = args.image
        if args.if_not_present:
            # kubelet's IfNotPresent: ImageStatus first, pull only if absent
            st = images.ImageStatus(
                pb2.ImageStatusRequest(image=pb2.ImageSpec(image=args.image)),
                timeout=dl.left())
            present = bool(st.image.id)
            image_ref = st.image.id or image_ref
        if present:
            timings["pulled"] = False
        else:
            pulled = images.PullImage(
                pb2.PullImageRequest(image=pb2.ImageSpec(image=args.image),
                                     sandbox_config=sandbox_config),
                timeout=dl.left())
            image_ref = pulled.image_ref or args.image
            timings["pulled"] = True
        timings["pull"] = round(time.monotonic() - t, 3)

        t = time.monotonic()
        sandbox_id = runtime.RunPodSandbox(
            pb2.RunPodSandboxRequest(config=sandbox_config), timeout=dl.left()
        ).pod_sandbox_id
        timings["sandbox"] = round(time.monotonic() - t, 3)

        t = time.monotonic()
        cconfig = pb2.ContainerConfig(
            metadata=pb2.ContainerMetadata(name=args.container_name, attempt=0),
            # Use the resolved image ref so that CreateContainer does not
            # depend on tag resolution again.
            image=pb2.ImageSpec(image=image_ref),
            command=command,
            log_path=log_rel,
            linux=pb2.LinuxContainerConfig(
                security_context=pb2.LinuxContainerSecurityContext(namespace_options=host_net),
            ),
        )
        if args.workdir:
            cconfig.working_dir = args.workdir
        for kv in args.env:
            k, _, v = kv.partition("=")
            cconfig.envs.add(key=k, value=v)
        container_id = runtime.CreateContainer(
            pb2.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=cconfig,
                                       sandbox_config=sandbox_config),
            timeout=dl.left()
        ).container_id
        runtime.StartContainer(pb2.StartContainerRequest(container_id=container_id),
                               timeout=dl.left())
        timings["create_start"] = round(time.monotonic() - t, 3)

        t = time.monotonic()
        # a fixed, short poll: the exit is seen within 10 ms of it (a
        # growing backoff added up to half a second to what was timed)
        while True:
            st = runtime.ContainerStatus(
                pb2.ContainerStatusRequest(container_id=container_id),
                timeout=dl.left(10)).status
            if st.state == pb2.CONTAINER_EXITED:
                exited = True
                break
            time.sleep(min(0.01, dl.left()))
        timings["until_exit"] = round(time.monotonic() - t, 3)
        timings["run_total"] = round(time.monotonic() - t_all, 3)

        path = st.log_path or log_file
        # containerd closes the log before reporting EXITED; allow a short
        # grace period anyway in case the file shows up late.
        for _ in range(50):
            if os.path.exists(path):
                break
            time.sleep(0.05)
        try:
            stdout, stderr = parse_cri_log(path)
        except (OSError, ValueError) as e:
            eprint("cri_client: cannot read container log %s: %s" % (path, e))
            return EXIT_LOG
        sys.stdout.buffer.write(stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(stderr)
        sys.stderr.flush()
        if st.reason and st.exit_code != 0:
            eprint("cri_client: container exited %d reason=%s %s"
                   % (st.exit_code, st.reason, st.message))
        code = st.exit_code
        return code if 0 <= code <= 255 else 255
    finally:
        t = time.monotonic()
        cleanup_errors = cleanup(runtime, pb2, sandbox_id, container_id, exited)
        timings["cleanup"] = round(time.monotonic() - t, 3)
        if cleanup_errors and sys.exc_info()[0] is None:
            # Fail an otherwise successful run (errors were printed); an
            # exception already in flight is left to propagate unchanged.
            raise CleanupFailed(cleanup_errors)


class CleanupFailed(Exception):
    pass


def cleanup(runtime, pb2, sandbox_id, container_id, exited):
    errors = []

    def attempt(what, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on
            errors.append("%s: %s" % (what, describe(e)))

    if container_id:
        if not exited:
            attempt("StopContainer", lambda: runtime.StopContainer(
                pb2.StopContainerRequest(container_id=container_id, timeout=0), timeout=30))
        attempt("RemoveContainer", lambda: runtime.RemoveContainer(
            pb2.RemoveContainerRequest(container_id=container_id), timeout=30))
    if sandbox_id:
        attempt("StopPodSandbox", lambda: runtime.StopPodSandbox(
            pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30))
        attempt("RemovePodSandbox", lambda: runtime.RemovePodSandbox(
            pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30))
    for e in errors:
        eprint("cri_client: cleanup failed: " + e)
    return errors


def describe(e):
    import grpc

    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        return "%s: %s" % (e.code().name, e.details())
    return repr(e)


def main(argv=None):
    p = argparse.ArgumentParser(description="minimal CRI runtime.v1 test client")
    p.add_argument("--socket", required=True, help="containerd socket path")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run one container in a fresh host-network sandbox")
    r.add_argument("--image", required=True)
    r.add_argument("--sandbox-name", required=True)
    r.add_argument("--log-dir", required=True)
    r.add_argument("--timeout", type=float, default=120.0,
                   help="overall seconds for pull..exit (default 120)")
    r.add_argument("--namespace", default="strata-test", help="pod namespace (metadata)")
    r.add_argument("--container-name", default="c")
    r.add_argument("--hostname", default="")
    r.add_argument("--workdir", default="")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--if-not-present", action="store_true",
                   help="pull only when ImageStatus does not find the image (kubelet's IfNotPresent)")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")

    st = sub.add_parser("status", help="ImageStatus as JSON (exit 1: not found)")
    st.add_argument("--image", required=True)
    st.add_argument("--timeout", type=float, default=30.0)

    pl = sub.add_parser("pull", help="pull an image via CRI and print its ref")
    pl.add_argument("--image", required=True)
    pl.add_argument("--timeout", type=float, default=120.0)

    args = p.parse_args(argv)

    # Make SIGTERM/SIGHUP unwind through the finally blocks (cleanup).
    def on_signal(signum, _frame):
        raise KeyboardInterrupt("signal %d" % signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    import grpc

    timings = {}
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="cri-client-")
    code = EXIT_GRPC
    try:
        pb2, pb2_grpc = load_stubs(tmp)
        timings["compile"] = round(time.monotonic() - t0, 3)
        channel = grpc.insecure_channel("unix://" + os.path.abspath(args.socket))
        try:
            fn = {"run": cmd_run, "pull": cmd_pull, "status": cmd_status}[args.cmd]
            code = fn(args, pb2, pb2_grpc, channel, timings)
        finally:
            channel.close()
    except CleanupFailed:
        code = EXIT_GRPC
    except grpc.RpcError as e:
        eprint("cri_client: gRPC error: %s" % describe(e))
        code = EXIT_GRPC
    except Timeout:
        eprint("cri_client: timed out after %ss" % args.timeout)
        code = EXIT_TIMEOUT
    except KeyboardInterrupt as e:
        eprint("cri_client: interrupted (%s)" % (e or "SIGINT"))
        code = 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        timings["total"] = round(time.monotonic() - t0, 3)
        eprint("timings: " + json.dumps(timings, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
