#!/usr/bin/env python3
"""What opening an image costs: daemon start-up, ``blockdev-add`` time and memory.

Usage: python3 bench/open_cost.py [--bitmaps N] [--runs N]

For blockd and qemu-storage-daemon alike: the time from exec to a QMP
greeting, the time of a ``blockdev-add`` of a 1 TiB qcow2 whose L1 table
spans the whole disk (one L2 table per 512 MiB allocated) and that carries
N persistent dirty bitmaps, and the resident memory the open image adds, just opened and after a
read in every L2 table's range (the L2 cache at its limit).
Best of ``--runs``; images live in /dev/shm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from harness import Daemon  # noqa: E402


def _make_image(path: str, bitmaps: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "1T"], check=True)
    script = "".join(f"write -q {off} 4k\n" for off in range(0, 1 << 40, 512 << 20))
    subprocess.run(["qemu-io", "-f", "qcow2", path], input=script, text=True, check=True,
                   capture_output=True)
    for i in range(bitmaps):
        subprocess.run(["qemu-img", "bitmap", "--add", path, f"b{i}"], check=True)
    # Mark every bitmap the same way so that loading one reads real data.
    if bitmaps:
        script = "".join(f"write -q {off} 64k\n" for off in range(0, 1 << 40, 1 << 34))
        subprocess.run(["qemu-io", "-f", "qcow2", path], input=script, text=True, check=True,
                       capture_output=True)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _measure(qsd: bool, workdir: str, image: str) -> dict[str, float]:
    sock = os.path.join(workdir, "qmp.sock")
    start = time.perf_counter()
    daemon = Daemon(sock, qsd=qsd)
    try:
        client = daemon.client()
        ready = time.perf_counter() - start
        before = _rss_kib(daemon.proc.pid)
        t0 = time.perf_counter()
        reply = client.cmd("blockdev-add", driver="qcow2", **{"node-name": "disk0"},
                           file={"driver": "file", "filename": image})
        add = time.perf_counter() - t0
        assert reply == {"return": {}}, reply
        opened = _rss_kib(daemon.proc.pid)
        # Read once in every L2 table's range, as a guest scanning the disk
        # would: the L2 cache fills up to its limit.
        nbd = os.path.join(workdir, "nbd.sock")
        client.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
        client.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "disk0"})
        script = "".join(f"read -q {off} 4k\n" for off in range(0, 1 << 40, 512 << 20))
        subprocess.run(["qemu-io", "-r", "-f", "raw", f"nbd+unix:///disk0?socket={nbd}"], input=script,
                       text=True, check=True, capture_output=True)
        after = _rss_kib(daemon.proc.pid)
        return {"startup_s": ready, "blockdev_add_s": add,
                "rss_open_mib": (opened - before) / 1024, "rss_scanned_mib": (after - before) / 1024}
    finally:
        daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bitmaps", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="blockd-open-", dir="/dev/shm")
    try:
        image = os.path.join(workdir, "big.qcow2")
        _make_image(image, args.bitmaps)
        results = {}
        for name, qsd in (("qemu-storage-daemon", True), ("blockd", False)):
            runs = [_measure(qsd, workdir, image) for _ in range(args.runs)]
            results[name] = {k: min(r[k] for r in runs) for k in runs[0]}
        print(f"1 TiB qcow2, 2048 L2 tables, {args.bitmaps} persistent bitmaps; best of {args.runs}")
        print(f"{'':22s} {'start-up':>10s} {'blockdev-add':>13s} {'RSS opened':>11s}"
              f" {'RSS after a scan':>17s}")
        for name, r in results.items():
            print(f"{name:22s} {r['startup_s'] * 1000:8.0f} ms {r['blockdev_add_s'] * 1000:10.0f} ms"
                  f" {r['rss_open_mib']:7.1f} MiB {r['rss_scanned_mib']:13.1f} MiB")
        print(json.dumps(results))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
