#!/usr/bin/env python3
"""fio over NBD: blockd against qemu-storage-daemon on the same image files.

Usage: python3 bench/nbd_fio.py [--runtime SECONDS] [--jobs NAME,...] [--json OUT] [--plot PNG]

The luks-qcow2-* jobs export a LUKS-encrypted qcow2 image (aes-256-xts,
made by qemu-img), so they measure the cipher path of both daemons.

Each job runs against both daemons, alternating which goes first, on image
files in /dev/shm (tmpfs) so the disk does not decide the result.  Prints a
table of IOPS and bandwidth with the ratio blockd/qsd and the geometric mean
of the ratios, and draws the ratios as a bar chart (``--plot``, needs
matplotlib: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from harness import Daemon, qemu_tool  # noqa: E402


@dataclasses.dataclass
class Job:
    name: str
    fmt: str  # image format of the exported node
    rw: str
    bs: str
    iodepth: int
    prepare: str  # "full" (allocated), "empty", "sparse-l2" (one cluster per L2 table)
    size: str = "1G"
    extra: tuple[str, ...] = ()
    #: ``qemu-img create -o`` options beyond the defaults.
    create: tuple[str, ...] = ()
    luks: bool = False  # LUKS-encrypted qcow2, key in secret ``sec0``
    writethrough: bool = False  # the export flushes after every write
    clients: int = 1  # separate NBD connections, IOPS summed


JOBS = [
    Job("raw-4k-randread-qd32", "raw", "randread", "4k", 32, "full"),
    Job("raw-4k-randwrite-qd32", "raw", "randwrite", "4k", 32, "full"),
    Job("raw-1M-seqread", "raw", "read", "1M", 4, "full"),
    Job("qcow2-4k-randread-qd32", "qcow2", "randread", "4k", 32, "full"),
    Job("qcow2-4k-randwrite-qd32", "qcow2", "randwrite", "4k", 32, "full"),
    Job("qcow2-64k-alloc-write", "qcow2", "write", "64k", 16, "empty"),
    Job("qcow2-1M-seqread", "qcow2", "read", "1M", 4, "full"),
    Job("luks-qcow2-4k-randread-qd32", "qcow2", "randread", "4k", 32, "full", luks=True),
    Job("luks-qcow2-1M-seqread", "qcow2", "read", "1M", 4, "full", luks=True),
    Job("luks-qcow2-1M-seqwrite", "qcow2", "write", "1M", 4, "full", luks=True),
    Job("qcow2-4k-randwrite-writethrough-lazy", "qcow2", "randwrite", "4k", 8, "empty",
        create=("lazy_refcounts=on",), writethrough=True),
    Job("qcow2-1T-sparse-4k-randread", "qcow2", "randread", "4k", 32, "sparse-l2", size="1T"),
    Job("qcow2-4k-randread-4-clients", "qcow2", "randread", "4k", 8, "full", clients=4),
]

SECRET = "secret,id=sec0,data=benchpass"


def _image(workdir: str, job: Job) -> str:
    path = os.path.join(workdir, f"{job.name}.{job.fmt}")
    if job.fmt == "raw":
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", path, job.size], check=True)
        if job.prepare == "full":
            subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", "count=1024",
                            "conv=notrunc", "status=none"], check=True)
        return path
    opts = list(job.create)
    if job.prepare == "full":
        opts.append("preallocation=full")
    secret: list[str] = []
    if job.luks:
        opts += ["encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=10"]
        secret = ["--object", SECRET]
    create = ["qemu-img", "create", "-q", "-f", "qcow2", *secret, path, job.size]
    if opts:
        create[5:5] = ["-o", ",".join(opts)]
    done = qemu_tool(*create)  # retries QEMU 7.2's flaky PBKDF2 calibration
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    if job.prepare == "sparse-l2":
        # One cluster in every L2 table's range, so random reads across the
        # disk need every L2 table: more than the default cache holds.
        l2_span = 512 << 20  # 64 KiB clusters: 8192 entries per table
        script = "".join(f"write -q {off} 4k\n" for off in range(0, _bytes(job.size), l2_span))
        subprocess.run(["qemu-io", "-f", "qcow2", path], input=script, text=True, check=True,
                       capture_output=True)
    return path


def _bytes(size: str) -> int:
    return int(size[:-1]) << {"G": 30, "T": 40}[size[-1]]


def _run_fio(uri: str, job: Job, runtime: int) -> dict[str, float]:
    sized = job.prepare == "empty"
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={job.rw}",
           f"--bs={job.bs}", f"--iodepth={job.iodepth}", f"--runtime={runtime}",
           "--size=1G" if sized else "--time_based", f"--numjobs={job.clients}",
           "--group_reporting", "--output-format=json", *job.extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    data = json.loads(out.stdout[out.stdout.index("{"):])
    result = data["jobs"][0]
    side = result["write"] if "write" in job.rw else result["read"]
    return {"iops": side["iops"], "bw_mib": side["bw_bytes"] / (1 << 20)}


def _serve(qsd: bool, workdir: str, image: str, job: Job) -> tuple[Daemon, str]:
    sock = os.path.join(workdir, f"qmp-{'qsd' if qsd else 'blockd'}.sock")
    nbd = os.path.join(workdir, f"nbd-{'qsd' if qsd else 'blockd'}.sock")
    node: dict = {"driver": job.fmt, "node-name": "disk0",
                  "file": {"driver": "file", "filename": image}}
    extra: list[str] = []
    if job.luks:
        node["encrypt"] = {"format": "luks", "key-secret": "sec0"}
        extra = ["--object", SECRET]
    export = "type=nbd,id=exp0,node-name=disk0,writable=on"
    if job.writethrough:
        export += ",writethrough=on"
    daemon = Daemon(sock, *extra, "--blockdev", json.dumps(node),
                    "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                    "--export", export, qsd=qsd)
    deadline = time.monotonic() + 10
    while not os.path.exists(nbd) and time.monotonic() < deadline:
        time.sleep(0.02)
    return daemon, f"nbd+unix:///disk0?socket={nbd}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--jobs", default=",".join(j.name for j in JOBS))
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--plot", default="bench/nbd_fio.png", help="bar chart of the ratios")
    args = parser.parse_args()
    wanted = args.jobs.split(",")
    workdir = tempfile.mkdtemp(prefix="blockd-bench-", dir="/dev/shm")
    rows = []
    try:
        for i, job in enumerate(j for j in JOBS if j.name in wanted):
            results: dict[str, dict[str, float]] = {}
            order = (True, False) if i % 2 == 0 else (False, True)
            for qsd in order:
                image = _image(workdir, job)
                daemon, uri = _serve(qsd, workdir, image, job)
                try:
                    results["qsd" if qsd else "blockd"] = _run_fio(uri, job, args.runtime)
                finally:
                    daemon.stop()
                    os.unlink(image)
            ratio = results["blockd"]["iops"] / results["qsd"]["iops"]
            rows.append({"job": job.name, "qsd": results["qsd"], "blockd": results["blockd"],
                         "ratio": ratio})
            print(f"{job.name:28s} qsd {results['qsd']['iops']:10.0f} IOPS  "
                  f"blockd {results['blockd']['iops']:10.0f} IOPS  ratio {ratio:5.2f}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if rows:
        gmean = math.exp(sum(math.log(r["ratio"]) for r in rows) / len(rows))
        print(f"{'geometric mean':28s} {'':36s} ratio {gmean:5.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "geometric_mean": gmean}, f, indent=2)
        if args.plot:
            _plot(rows, gmean, args.plot)
    return 0


def _plot(rows: list[dict], gmean: float, path: str) -> None:
    """One bar per job: blockd's IOPS over qemu-storage-daemon's (1.0 = equal)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [r["job"] for r in rows]
    ratios = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    colours = ["#3a7d44" if r >= 1.0 else "#c0392b" if r < 0.7 else "#d4a017" for r in ratios]
    ax.barh(names, ratios, color=colours)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.axvline(gmean, color="#2c3e50", linestyle="--", linewidth=1)
    for y, r in enumerate(ratios):
        ax.text(r + 0.02, y, f"{r:.2f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("blockd IOPS / qemu-storage-daemon IOPS")
    ax.set_xlim(0, max(1.2, max(ratios) * 1.15))
    ax.set_title(f"fio over NBD, {os.cpu_count()} cores; geometric mean {gmean:.2f} (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
