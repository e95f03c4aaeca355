#!/usr/bin/env python3
"""blockd-img check against qemu-img check on the same large qcow2 image, in /dev/shm.

Usage: python3 bench/img_check.py [--size-gib N] [--runs N]

The image has every cluster mapped (``preallocation=metadata``), so the
check walks a full L1/L2 tree and a refcount for each cluster; the file
is sparse, so a big virtual size costs no memory.  The best wall-clock
time of ``--runs`` is kept, start-up included.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import subprocess
import sys
import tempfile
import time


def _best(cmd: list[str], runs: int) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(runs):
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        best = min(best, time.perf_counter() - t)
        out = res.stdout
    return best, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    # Time blockd-img as installed (pip compiles bytecode), not recompiling every module
    # on each run as it would under PYTHONDONTWRITEBYTECODE.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "blockd"), quiet=1)
    work = tempfile.mkdtemp(prefix="blockd-bench-", dir="/dev/shm")
    try:
        img = os.path.join(work, "c.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        "preallocation=metadata", img, f"{args.size_gib}G"], check=True)
        q, q_out = _best(["qemu-img", "check", img], args.runs)
        b, b_out = _best([sys.executable, "-m", "blockd.img.cli", "check", img], args.runs)
        assert q_out == b_out, (q_out, b_out)
        clusters = args.size_gib << 14
        print(f"check, {clusters} clusters mapped   qemu-img {q:7.3f} s  blockd-img {b:7.3f} s  "
              f"speed ratio {q / b:5.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
