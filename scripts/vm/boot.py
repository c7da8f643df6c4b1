#!/usr/bin/env python3
"""Boot an ext4 disk image in a throw-away QEMU VM and run one command in it.

    scripts/vm/boot.py DISK [--cmd 'CMD'] [--rw] [--format raw|qcow2]
                       [--mem MB] [--timeout S] [--accel auto|kvm|tcg]
                       [--machine q35|microvm] [--smp N] [--json] [-v]

The kernel and initramfs come from scripts/vm/setup.sh (DIR: $STRATA_VM_DIR or
<repo>/.cache/vm). The guest mounts the disk (read-only unless --rw) and runs
CMD with /bin/sh -c in a chroot; its output goes to stdout and its exit status
becomes ours. 124: timeout (QEMU killed); 125: the VM could not run the
command (no ext4 on the disk, QEMU failed, ...); 2: usage. Python stdlib only.
"""

import argparse
import base64
import ctypes
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE_TIMEOUT = 15  # seconds a KVM boot gets to show the markers
GRACE = 30  # seconds the guest gets after END/ERROR to sync, unmount and power off
MAX_CMDLINE = 1800  # x86 COMMAND_LINE_SIZE is 2048; longer commands go via fw_cfg
BEGIN = re.compile(rb"STRATA-VM-BEGIN\r?\n")
END = re.compile(rb"\r?\nSTRATA-VM-END rc=(\d+)\r?\n")
ERROR = re.compile(rb"STRATA-VM-ERROR ([^\r\n]*)")
DOWN = re.compile(rb"STRATA-VM-DOWN\r?\n")


def log(msg):
    print(f"vm: {msg}", file=sys.stderr, flush=True)


def vm_dir():
    d = os.environ.get("STRATA_VM_DIR")
    return Path(d) if d else Path(__file__).resolve().parents[2] / ".cache" / "vm"


def die_with_parent():
    # QEMU must not outlive us, even if we are SIGKILLed.
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:
        pass


def qemu_argv(d, machine, accel, mem, smp, append, disk=None, fmt="raw", rw=False, fw_file=None):
    argv = ["qemu-system-x86_64", "-M", machine, "-accel", accel,
            "-cpu", "host" if accel == "kvm" else "max", "-m", str(mem), "-smp", str(smp),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-nic", "none", "-no-reboot",
            "-kernel", str(d / "vmlinuz"), "-initrd", str(d / "initramfs.cpio.gz"),
            "-append", append]
    if disk is not None:
        # cache=writeback needs no O_DIRECT (which a FUSE-served file may refuse);
        # guest flushes still reach the file (fdatasync). aio=threads: plain pread/pwrite.
        opts = [f"file={str(disk).replace(',', ',,')}", f"format={fmt}", "if=none", "id=d0",
                "cache=writeback", "aio=threads"]
        if not rw:
            opts.append("readonly=on")
        dev = "virtio-blk-device" if machine == "microvm" else "virtio-blk-pci"
        argv += ["-drive", ",".join(opts), "-device", f"{dev},drive=d0"]
    if fw_file is not None:
        argv += ["-fw_cfg", f"name=opt/strata/cmd,file={str(fw_file).replace(',', ',,')}"]
    return argv


class Run:
    """One QEMU run: console bytes, markers found, timings."""

    def __init__(self):
        self.console = bytearray()
        self.stderr = bytearray()
        self.begin = None  # offset just after the BEGIN marker
        self.emitted = None  # offset up to which the output was streamed
        self.end = None  # (offset of the END marker, rc)
        self.error = None
        self.down = False
        self.t_begin = None
        self.t_total = None
        self.timed_out = False
        self.qemu_rc = None

    def output(self):
        if self.begin is None:
            return b""
        return bytes(self.console[self.begin:self.end[0] if self.end else len(self.console)])

    def tail(self, n=20):
        lines = self.console.decode("utf-8", "replace").replace("\r", "").splitlines()
        return "\n".join("  | " + l for l in lines[-n:]) or "  (no console output)"


def run_qemu(argv, timeout, stream=None, verbose=False):
    """Run QEMU until it exits, or the timeout. stream: binary file for live output."""
    r = Run()
    t0 = time.monotonic()
    deadline = t0 + timeout
    grace = None  # after END/ERROR: the guest gets this long to sync and power off
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, preexec_fn=die_with_parent)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ, "out")
    sel.register(p.stderr, selectors.EVENT_READ, "err")
    try:
        while sel.get_map():
            now = time.monotonic()
            # --timeout bounds the wait for END/ERROR; then the guest gets `grace`
            limit = grace or deadline
            if now >= limit:
                r.timed_out = grace is None
                break
            for key, _ in sel.select(timeout=min(0.5, limit - now)):
                data = os.read(key.fileobj.fileno(), 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                if key.data == "err":
                    r.stderr += data
                    continue
                r.console += data
                if verbose:
                    sys.stderr.buffer.write(data)
                    sys.stderr.buffer.flush()
                scan(r, time.monotonic() - t0, stream)
                if (r.end or r.error) and grace is None:
                    # wait for DOWN (synced) and power-off, which normally follow at once
                    grace = time.monotonic() + GRACE
                if r.down and grace:
                    grace = min(grace, time.monotonic() + 3)
    finally:
        if p.poll() is None:
            p.kill()
        try:
            r.qemu_rc = p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        p.stdout.close()
        p.stderr.close()
        sel.close()
    r.t_total = time.monotonic() - t0
    if stream is not None and r.begin is not None and r.end is None:
        stream.write(bytes(r.console[r.emitted:]))  # cut off: the held tail too
        stream.flush()
    return r


def scan(r, t, stream):
    c = r.console
    if r.begin is None:
        m = BEGIN.search(c)
        if m is None:
            m = ERROR.search(c)
            if m and c.find(b"\n", m.end()) >= 0:
                r.error = m.group(1).decode("utf-8", "replace")
            r.down = r.down or bool(DOWN.search(c))
            return
        r.begin = r.emitted = m.end()
        r.t_begin = t
    if r.end is None:
        # nothing before emitted - 1 (a held "\r\n" at most) can start the marker
        m = END.search(c, max(r.begin, r.emitted - 1))
        if m:
            r.end = (m.start(), int(m.group(1)))
            stop = r.end[0]
        else:
            # everything before the last "\n" cannot be part of the END marker
            stop = max(c.rfind(b"\n", r.emitted), r.emitted)
        if stream is not None and stop > r.emitted:
            stream.write(bytes(c[r.emitted:stop]))
            stream.flush()
        r.emitted = max(r.emitted, stop)
    if r.end is not None and not r.down:
        r.down = bool(DOWN.search(c, r.end[0]))


def choose_accel(d, want, machine, mem):
    """-> (accel, why). auto: KVM if a short probe boot works (cached in DIR/accel)."""
    if want != "auto":
        return want, "requested"
    cache = d / "accel"
    try:
        accel, _, why = cache.read_text().strip().partition(" ")
        if accel in ("kvm", "tcg"):
            return accel, why + "; cached"
    except OSError:
        pass
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        accel, why = "tcg", "no usable /dev/kvm"
    else:
        r = run_qemu(qemu_argv(d, machine, "kvm", mem, 1,
                               "console=ttyS0 panic=-1 quiet strata.probe=1"), PROBE_TIMEOUT)
        if r.end is not None:
            accel, why = "kvm", f"kvm probe: booted in {r.t_total:.1f} s"
        elif r.timed_out and not r.console:
            accel, why = "tcg", f"kvm probe: no output in {PROBE_TIMEOUT} s"
        elif r.timed_out:
            accel, why = "tcg", f"kvm probe: no marker in {PROBE_TIMEOUT} s"
        else:
            err = [l.removeprefix("qemu-system-x86_64: ")
                   for l in r.stderr.decode("utf-8", "replace").strip().splitlines()]
            err = [l for l in err if "error" in l] or err or [f"rc {r.qemu_rc}"]
            accel, why = "tcg", "kvm probe: qemu failed: " + err[0]
    try:
        tmp = cache.with_name(f"accel.{os.getpid()}")
        tmp.write_text(f"{accel} {why}\n")
        tmp.replace(cache)
    except OSError:
        pass  # not cached: probe again next time
    return accel, why


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("disk", type=Path)
    ap.add_argument("--cmd", default="true", help="shell command run in the guest (default: true)")
    ap.add_argument("--rw", action="store_true", help="mount the disk read-write")
    ap.add_argument("--format", choices=["raw", "qcow2"], help="default: from the disk's header")
    ap.add_argument("--mem", type=int, default=256, help="MiB (default 256)")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120, help="seconds (default 120)")
    ap.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    ap.add_argument("--machine", choices=["q35", "microvm"], default="q35")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("-v", "--verbose", action="store_true", help="console to stderr, timings")
    a = ap.parse_args()

    d = vm_dir()
    for f in ("vmlinuz", "initramfs.cpio.gz"):
        if not (d / f).exists():
            log(f"{d / f} missing: run scripts/vm/setup.sh first")
            return 2
    try:
        with open(a.disk, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        log(f"cannot read {a.disk}: {e.strerror}")
        return 2
    fmt = a.format or ("qcow2" if magic == b"QFI\xfb" else "raw")

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)  # unwinds through run_qemu: QEMU is killed

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    accel, why = choose_accel(d, a.accel, a.machine, a.mem)
    log(f"accel={accel} ({why}) machine={a.machine}")

    append = "console=ttyS0 panic=-1 quiet"
    if a.rw:
        append += " strata.rw=1"
    fw_file = None
    b64 = base64.b64encode(a.cmd.encode()).decode()
    if len(append) + len(b64) + 12 <= MAX_CMDLINE:
        append += f" strata.cmd={b64}"
    else:
        fd, fw_file = tempfile.mkstemp(prefix="strata-vm-cmd.")
        os.write(fd, a.cmd.encode())
        os.close(fd)
        append += " strata.cmdfw=1"
    try:
        argv = qemu_argv(d, a.machine, accel, a.mem, a.smp, append, a.disk, fmt, a.rw, fw_file)
        r = run_qemu(argv, a.timeout, None if a.json else sys.stdout.buffer, a.verbose)
    finally:
        if fw_file:
            os.unlink(fw_file)

    err = None
    if r.end is not None:
        rc = r.end[1]
        if not r.down:
            log("warning: the guest did not report a clean unmount" + (" (rw!)" if a.rw else ""))
    elif r.timed_out:
        rc = 124
        what = "no STRATA-VM-BEGIN" if r.begin is None else "the command did not finish"
        err = f"timeout after {a.timeout:g} s ({what}); QEMU killed"
    elif r.error is not None:
        rc, err = 125, f"guest: {r.error}"
    else:
        rc = 125
        qerr = r.stderr.decode("utf-8", "replace").strip()
        err = f"QEMU exited (rc {r.qemu_rc}) before the command finished" + (
            f": {qerr}" if qerr else "")
    if err:
        log(err)
        if r.begin is None or r.error is not None:
            log("console tail:\n" + r.tail())
    if a.verbose:
        tb = f"{r.t_begin:.2f} s" if r.t_begin is not None else "-"
        log(f"rc={rc} begin after {tb}, total {r.t_total:.2f} s")
    if a.json:
        obj = {"accel": accel, "machine": a.machine,
               "seconds_to_begin": None if r.t_begin is None else round(r.t_begin, 3),
               "seconds_total": round(r.t_total, 3), "rc": rc,
               "output": r.output().decode("utf-8", "replace")}
        if err:
            obj["error"] = err
        print(json.dumps(obj))
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)  # QEMU was killed on the way out
