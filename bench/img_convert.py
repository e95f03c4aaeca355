#!/usr/bin/env python3
"""blockd-img convert against qemu-img convert on the same input, in /dev/shm.

Usage: python3 bench/img_convert.py [--size-mib N] [--runs N]

The input is a raw image of compressible text-like data with a third of
it zeroes.  Each case runs both tools ``--runs`` times and keeps the
best wall-clock time (start-up included, since users pay it too).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

CASES = [
    ("compressed qcow2 (-c -W)", ["-c", "-W", "-O", "qcow2"]),
    ("compressed qcow2 (-c)", ["-c", "-O", "qcow2"]),
    ("raw -> qcow2", ["-O", "qcow2"]),
    ("raw -> raw", ["-O", "raw"]),
]


def _input(path: str, size_mib: int) -> None:
    rnd = random.Random(1)
    block = bytes(rnd.choice(b"abcdefghij      ") for _ in range(4096))
    with open(path, "wb") as f:
        for i in range(size_mib * 4):
            f.write(bytes(1 << 18) if i % 3 == 0 else block * 64)


def _best(cmd: list[str], out: str, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        if os.path.exists(out):
            os.unlink(out)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="blockd-bench-", dir="/dev/shm")
    try:
        src = os.path.join(work, "src.raw")
        _input(src, args.size_mib)
        for name, flags in CASES:
            q = _best(["qemu-img", "convert", "-f", "raw", *flags, src, os.path.join(work, "q")],
                      os.path.join(work, "q"), args.runs)
            b = _best([sys.executable, "-m", "blockd.img.cli", "convert", "-f", "raw", *flags, src,
                       os.path.join(work, "b")], os.path.join(work, "b"), args.runs)
            print(f"{name:28s} qemu-img {q:7.3f} s  blockd-img {b:7.3f} s  speed ratio {q / b:5.2f}",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
