#!/usr/bin/env python3
"""What an allocating write costs in metadata writes and syncs: lazy against eager refcounts.

Usage: python3 bench/lazy_refcounts.py [--writes N] [--daemons blockd,qsd] [--json OUT]

Each daemon exports a fresh 1 GiB qcow2 image (64 KiB clusters) over NBD;
once it is serving, ``strace -f`` attaches to it and records every ``pwrite*``,
``fdatasync`` and ``fsync`` it makes.  qemu-io sends N 4 KiB writes, each
to a cluster not allocated yet, in two durable modes:

* ``writethrough``: the export has ``writethrough=on`` (QEMU's
  ``cache.writeback=off``): the server flushes after every write;
* ``direct+flush``: ``cache.direct=on`` and the client flushes after
  every write.

A write is metadata when it lands in the image's metadata clusters (the
header, refcount table and block, L1 and the one L2 table all sit in the
first five clusters of these images); the rest is guest data.  A run
with no writes is subtracted, so opening and closing the image do not
count, except what closing must store because of the writes (lazy
refcounts write their blocks then): that cost is spread over the N writes.
The time column is the client's wall time per write (strace slows every
traced call, so compare rows, not absolute values).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = 64 << 10
#: Header, refcount table, refcount block, L1 table, first L2 table.
METADATA_END = 5 * CLUSTER

_CALL = re.compile(r"^(\d+)\s+(pwrite64|pwritev2?|fdatasync|fsync)\((.*)$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>.*\)\s+=\s+(-?\d+)")
_RESULT = re.compile(r"\)\s+=\s+(-?\d+)")


def _offset(name: str, args: str) -> int:
    """The file offset argument of a write call as strace prints it (buffers elided)."""
    if name == "pwrite64":
        return int(args.split(",")[3].split(")")[0])
    rest = args[args.rindex("]") + 1:]
    return int(rest.split(",")[2].split(")")[0])


def count(log: str) -> dict[str, int]:
    """Successful metadata writes, data writes and syncs in an ``strace -f`` log."""
    pending: dict[str, tuple[str, int]] = {}
    out = {"meta": 0, "data": 0, "sync": 0}

    def done(name: str, offset: int, result: int) -> None:
        if result < 0:
            return  # e.g. RWF_NOWAIT refused: the write is retried and counted then
        if name in ("fdatasync", "fsync"):
            out["sync"] += 1
        else:
            out["meta" if offset < METADATA_END else "data"] += 1

    with open(log) as f:
        for line in f:
            m = _RESUMED.match(line)
            if m:
                pid, name, result = m.group(1), m.group(2), int(m.group(3))
                if pid in pending:
                    done(*pending.pop(pid), result)
                continue
            m = _CALL.match(line)
            if not m:
                continue
            pid, name, args = m.groups()
            offset = 0 if name in ("fdatasync", "fsync") else _offset(name, args)
            if "<unfinished" in args:
                pending[pid] = (name, offset)
                continue
            r = _RESULT.search(args)
            if r:
                done(name, offset, int(r.group(1)))
    return out


def run(daemon: str, lazy: bool, mode: str, writes: int, workdir: str) -> dict[str, int]:
    img = os.path.join(workdir, "b.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size=64k,lazy_refcounts={'on' if lazy else 'off'}", img, "1G"],
                   check=True)
    nbd = os.path.join(workdir, "nbd.sock")
    log = os.path.join(workdir, "strace.log")
    for path in (nbd, log):
        if os.path.exists(path):
            os.unlink(path)
    direct = "on" if mode == "direct+flush" else "off"
    writethrough = "on" if mode == "writethrough" else "off"
    args = ["--blockdev", f"driver=qcow2,node-name=q,file.driver=file,file.filename={img},"
                          f"file.cache.direct={direct},file.aio=threads",
            "--nbd-server", f"addr.type=unix,addr.path={nbd}",
            "--export", f"type=nbd,id=e,node-name=q,writable=on,writethrough={writethrough}"]
    prog = ["qemu-storage-daemon"] if daemon == "qsd" else [sys.executable, "-m", "blockd.cli"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([*prog, *args], cwd=ROOT, env=env)
    tracer = None
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(nbd):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{daemon} did not start")
            time.sleep(0.05)
        # Attached once the image is open: startup does not count.  -f takes every thread.
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-s", "0", "-o", log, "-p",
                                   str(proc.pid), "-e",
                                   "trace=pwrite64,pwritev,pwritev2,fdatasync,fsync"])
        time.sleep(0.5)
        cmds: list[str] = []
        for i in range(writes):
            cmds += ["-c", f"write -P 1 {i * CLUSTER} 4k"]
            if mode == "direct+flush":
                cmds += ["-c", "flush"]
        started = time.perf_counter()
        if cmds:
            subprocess.run(["qemu-io", "-f", "raw", *cmds, f"nbd+unix:///q?socket={nbd}"],
                           check=True, capture_output=True)
        elapsed = time.perf_counter() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if tracer is not None:
            tracer.wait(60)
    check = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
    if check.returncode:
        raise RuntimeError(f"{daemon} left an inconsistent image:\n{check.stdout}")
    return {**count(log), "ms": elapsed * 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=200)
    ap.add_argument("--daemons", default="blockd,qsd")
    ap.add_argument("--json")
    opts = ap.parse_args()
    if shutil.which("strace") is None:
        sys.exit("strace is needed (apt-get install strace)")
    results = []
    # O_DIRECT needs a disk file system: not /dev/shm.
    with tempfile.TemporaryDirectory(dir="/var/tmp") as workdir:
        for daemon in opts.daemons.split(","):
            for mode in ("writethrough", "direct+flush"):
                for lazy in (False, True):
                    base = run(daemon, lazy, mode, 0, workdir)
                    full = run(daemon, lazy, mode, opts.writes, workdir)
                    per = {k: (full[k] - base[k]) / opts.writes for k in full}
                    results.append({"daemon": daemon, "mode": mode,
                                    "refcounts": "lazy" if lazy else "eager", **per})
    print(f"{'daemon':8} {'mode':14} {'refcounts':9} {'metadata writes':>16} "
          f"{'data writes':>12} {'syncs':>6} {'ms':>6}   (per allocating 4k write)")
    for r in results:
        print(f"{r['daemon']:8} {r['mode']:14} {r['refcounts']:9} {r['meta']:16.2f} "
              f"{r['data']:12.2f} {r['sync']:6.2f} {r['ms']:6.2f}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
