#!/usr/bin/env python3
"""blockd-img convert against qemu-img convert on the same input, in /dev/shm.

Usage: python3 bench/img_convert.py [--size-mib N] [--runs N] [--only TEXT]

The input is a raw image of compressible text-like data with a third of
it zeroes.  Each case runs both tools ``--runs`` times, in turn, and keeps each one's
best wall-clock time (start-up included, since users pay it too) and the
CPU time (user + system) of that run: on a shared machine the CPU time is
the steadier figure.
"""

from __future__ import annotations

import argparse
import compileall
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

#: (name, source format, options): the qcow2 source is qemu-img's conversion of the input.
CASES = [
    ("compressed qcow2 (-c -W)", "raw", ["-c", "-W", "-O", "qcow2"]),
    ("compressed qcow2 (-c)", "raw", ["-c", "-O", "qcow2"]),
    ("raw -> qcow2", "raw", ["-O", "qcow2"]),
    ("qcow2 -> raw", "qcow2", ["-O", "raw"]),
    ("raw -> raw", "raw", ["-O", "raw"]),
]


def _input(path: str, size_mib: int) -> None:
    rnd = random.Random(1)
    block = bytes(rnd.choice(b"abcdefghij      ") for _ in range(4096))
    with open(path, "wb") as f:
        for i in range(size_mib * 4):
            f.write(bytes(1 << 18) if i % 3 == 0 else block * 64)


def _cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def _timed(cmd: list[str], out: str) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds) of one run writing ``out``."""
    if os.path.exists(out):
        os.unlink(out)
    c, t = _cpu(), time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t, _cpu() - c


def _duel(qemu: list[str], ours: list[str], work: str, runs: int
          ) -> tuple[tuple[float, float], tuple[float, float]]:
    """Best (wall, CPU) of each tool, the two run in turn (alternating which goes
    first) so that a slow phase of the machine hits both alike."""
    best = {"q": (float("inf"), 0.0), "b": (float("inf"), 0.0)}
    for i in range(runs):
        order = [("q", qemu), ("b", ours)]
        for key, cmd in order if i % 2 == 0 else order[::-1]:
            result = _timed(cmd, os.path.join(work, key))
            best[key] = min(best[key], result)
    return best["q"], best["b"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    args = parser.parse_args()
    # Time blockd-img as installed (pip compiles bytecode), not recompiling every module
    # on each run as it would under PYTHONDONTWRITEBYTECODE.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "blockd"), quiet=1)
    work = tempfile.mkdtemp(prefix="blockd-bench-", dir="/dev/shm")
    try:
        sources = {"raw": os.path.join(work, "src.raw"), "qcow2": os.path.join(work, "src.qcow2")}
        _input(sources["raw"], args.size_mib)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", sources["raw"],
                        sources["qcow2"]], check=True)
        for name, fmt, flags in CASES:
            if args.only not in name:
                continue
            src = sources[fmt]
            (q, qc), (b, bc) = _duel(
                ["qemu-img", "convert", "-f", fmt, *flags, src, os.path.join(work, "q")],
                [sys.executable, "-m", "blockd.img.cli", "convert", "-f", fmt, *flags, src,
                 os.path.join(work, "b")], work, args.runs)
            print(f"{name:26s} qemu-img {q:6.2f} s ({qc:5.2f} s CPU)  blockd-img {b:6.2f} s "
                  f"({bc:5.2f} s CPU)  speed ratio {q / b:4.2f} (CPU {qc / bc:4.2f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
