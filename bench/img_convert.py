#!/usr/bin/env python3
"""blockd-img convert against qemu-img convert on the same input, in /dev/shm.

Usage: python3 bench/img_convert.py [--size-mib N] [--runs N] [--only TEXT] [--settle S]

Each line reads best / median.

The input is a raw image of compressible text-like data with a third of
it zeroes.  Each case runs both tools ``--runs`` times, in turn, and reports
each one's best and median wall-clock time (start-up included, since users
pay it too) and CPU time (user + system).  Each output is deleted right
after its run.  ``--settle`` waits that many seconds after each run: on the
virtual machine this was measured on, memory freed by deleting a 2 GiB
output goes back to the host in the background, and runs back to back
(the default) meet that work; the README gives figures both ways.  Run it
with nothing else in ``/dev/shm``: with a few more GB of files there both
tools were slower and noisier (figures in the README).
"""

from __future__ import annotations

import argparse
import compileall
import os
import random
import resource
import shutil
import statistics
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


def _timed(cmd: list[str], out: str, settle: float) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds) of one run writing ``out``, then deleted, and
    ``settle`` seconds left for the machine to take back its memory."""
    c, t = _cpu(), time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    result = time.perf_counter() - t, _cpu() - c
    os.unlink(out)
    time.sleep(settle)
    return result


def _duel(qemu: list[str], ours: list[str], work: str, runs: int, settle: float
          ) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) of every run of each tool, the two run in turn (alternating which
    goes first) so that a slow phase of the machine hits both alike."""
    results: dict[str, list[tuple[float, float]]] = {"q": [], "b": []}
    for i in range(runs):
        order = [("q", qemu), ("b", ours)]
        for key, cmd in order if i % 2 == 0 else order[::-1]:
            results[key].append(_timed(cmd, os.path.join(work, key), settle))
    return results


def _summary(runs: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    """Best and median wall-clock time, best and median CPU time."""
    walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
    return min(walls), statistics.median(walls), min(cpus), statistics.median(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to wait after each run (default: back to back)")
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
            results = _duel(
                ["qemu-img", "convert", "-f", fmt, *flags, src, os.path.join(work, "q")],
                [sys.executable, "-m", "blockd.img.cli", "convert", "-f", fmt, *flags, src,
                 os.path.join(work, "b")], work, args.runs, args.settle)
            q, qm, qc, qcm = _summary(results["q"])
            b, bm, bc, bcm = _summary(results["b"])
            print(f"{name:26s} qemu-img {q:5.2f} s / {qm:5.2f} s ({qc:5.2f} / {qcm:5.2f} s CPU)"
                  f"  blockd-img {b:5.2f} s / {bm:5.2f} s ({bc:5.2f} / {bcm:5.2f} s CPU)"
                  f"  speed ratio {q / b:4.2f} / {qm / bm:4.2f} (CPU {qc / bc:4.2f} / "
                  f"{qcm / bcm:4.2f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
