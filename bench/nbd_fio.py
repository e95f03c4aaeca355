#!/usr/bin/env python3
"""fio over NBD: blockd against qemu-storage-daemon on the same image files.

Usage: python3 bench/nbd_fio.py [--runtime SECONDS] [--jobs NAME,...] [--json OUT] [--plot PNG]
       [--dir DIR ...] [--make-xfs] [--cache writeback,direct] [--rounds N] [--base CHECKOUT]

The luks-qcow2-* jobs export a LUKS-encrypted qcow2 image (aes-256-xts,
made by qemu-img), so they measure the cipher path of both daemons.

Each job runs against every peer in turn, rotating which goes first from
round to round, on image files in ``--dir`` (default /dev/shm, tmpfs, so the
disk does not decide the result; give a directory on ext4 or, with
``--make-xfs``, a loop-mounted xfs to see the file system's part).  The peers
are qsd, blockd, blockd from another checkout (``--base``, for before/after
figures in one run) and, for the plain raw jobs, nbdkit's file plugin.
``--cache direct`` opens the images with cache.direct=on (nbdkit:
cache=none, which is not O_DIRECT but drops pages after writing them).
Prints one table per directory and cache mode with the median IOPS of
``--rounds`` rounds, the ratios to qsd and their geometric mean, and draws
blockd/qsd as a bar chart (``--plot``, needs matplotlib:
``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

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


def _image(workdir: str, job: Job, direct: bool, random_src: str) -> str:
    path = os.path.join(workdir, f"{job.name}.{job.fmt}")
    if job.fmt == "raw":
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", path, job.size], check=True)
        if job.prepare == "full":
            subprocess.run(["dd", f"if={random_src}", f"of={path}", "bs=1M",
                            "conv=notrunc,fsync", "status=none"], check=True)
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


def _wait_for(path: str) -> None:
    deadline = time.monotonic() + 10
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


class _Nbdkit:
    """nbdkit's file plugin serving one image, stopped like a Daemon."""

    def __init__(self, sock: str, image: str, direct: bool) -> None:
        cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", sock, "file", f"file={image}"]
        if direct:
            cmd.append("cache=none")
        self.proc = subprocess.Popen(cmd)
        _wait_for(sock)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _serve(peer: str, workdir: str, image: str, job: Job, direct: bool,
           base: str | None) -> tuple[Any, str]:
    sock = os.path.join(workdir, f"qmp-{peer}.sock")
    nbd = os.path.join(workdir, f"nbd-{peer}.sock")
    for stale in (sock, nbd):  # nbdkit leaves its socket behind
        if os.path.exists(stale):
            os.unlink(stale)
    if peer == "nbdkit":
        return _Nbdkit(nbd, image, direct), f"nbd+unix:///?socket={nbd}"
    node: dict = {"driver": job.fmt, "node-name": "disk0",
                  "file": {"driver": "file", "filename": image,
                           "cache": {"direct": direct}}}
    extra: list[str] = []
    if job.luks:
        node["encrypt"] = {"format": "luks", "key-secret": "sec0"}
        extra = ["--object", SECRET]
    export = "type=nbd,id=exp0,node-name=disk0,writable=on"
    if job.writethrough:
        export += ",writethrough=on"
    kwargs: dict[str, Any] = {"qsd": peer == "qsd"}
    if peer == "base":
        kwargs["root"] = base
    daemon = Daemon(sock, *extra, "--blockdev", json.dumps(node),
                    "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                    "--export", export, **kwargs)
    _wait_for(nbd)
    return daemon, f"nbd+unix:///disk0?socket={nbd}"


def _peers(job: Job, base: str | None) -> list[str]:
    peers = ["qsd", "blockd"]
    if base:
        peers.append("base")
    if job.fmt == "raw" and not job.writethrough:
        peers.append("nbdkit")
    return peers


def _measure(job: Job, workdir: str, args: argparse.Namespace, direct: bool,
             random_src: str) -> dict[str, dict[str, float]]:
    """Median IOPS and bandwidth per peer over the rounds, rotating the order."""
    peers = _peers(job, args.base)
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in peers}
    image = None
    try:
        for r in range(args.rounds):
            order = peers[r % len(peers):] + peers[:r % len(peers)]
            for peer in order:
                if image is None:
                    image = _image(workdir, job, direct, random_src)
                server, uri = _serve(peer, workdir, image, job, direct, args.base)
                try:
                    runs[peer].append(_run_fio(uri, job, args.runtime))
                finally:
                    server.stop()
                if job.prepare == "empty":  # allocating jobs start from an empty image
                    os.unlink(image)
                    image = None
    finally:
        if image is not None:
            os.unlink(image)
    return {p: {k: statistics.median(x[k] for x in rs) for k in ("iops", "bw_mib")}
            for p, rs in runs.items()}


def _make_xfs(scratch: str) -> tuple[str, str]:
    """A loop-mounted xfs in a file under ``scratch``: (mount point, backing file)."""
    backing = os.path.join(scratch, "xfs.img")
    mnt = os.path.join(scratch, "xfs")
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["truncate", "-s", "8G", backing], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-f", backing], check=True)
    subprocess.run(["mount", "-o", "loop", backing, mnt], check=True)
    return mnt, backing


def _fs_type(path: str) -> str:
    out = subprocess.run(["df", "--output=fstype", path], capture_output=True, text=True)
    return out.stdout.split()[-1] if out.returncode == 0 else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--jobs", default=",".join(j.name for j in JOBS))
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--plot", default="bench/nbd_fio.png", help="bar chart of the ratios")
    parser.add_argument("--dir", action="append", help="where the images go (repeatable; "
                        "default /dev/shm unless --make-xfs)")
    parser.add_argument("--make-xfs", metavar="SCRATCH", help="also measure on an xfs "
                        "loop-mounted from a file in SCRATCH (needs root and mkfs.xfs)")
    parser.add_argument("--cache", default="writeback",
                        help="writeback, direct or both comma-separated (cache.direct=off/on)")
    parser.add_argument("--rounds", type=int, default=1, help="report the median of N rounds")
    parser.add_argument("--base", help="also run blockd from this checkout (before/after)")
    args = parser.parse_args()
    wanted = args.jobs.split(",")
    dirs = list(args.dir or ([] if args.make_xfs else ["/dev/shm"]))
    # A stopped run still unmounts its xfs and removes its images.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    xfs = None
    if args.make_xfs:
        xfs = _make_xfs(args.make_xfs)
        dirs.append(xfs[0])
    tables = []
    try:
        for where in dirs:
            for cache in args.cache.split(","):
                workdir = tempfile.mkdtemp(prefix="blockd-bench-", dir=where)
                random_src = os.path.join(workdir, "random.src")
                subprocess.run(["dd", "if=/dev/urandom", f"of={random_src}", "bs=1M",
                                "count=1024", "status=none"], check=True)
                title = f"{where} ({_fs_type(where)}), cache.direct={'on' if cache == 'direct' else 'off'}"
                print(f"\n## {title}: median of {args.rounds} round(s), {args.runtime} s each",
                      flush=True)
                rows = []
                try:
                    for job in (j for j in JOBS if j.name in wanted):
                        res = _measure(job, workdir, args, cache == "direct", random_src)
                        q = res["qsd"]["iops"]
                        row = {"job": job.name, **res,
                               "ratio": res["blockd"]["iops"] / q}
                        line = f"{job.name:28s} qsd {q:9.0f}"
                        for peer in res:
                            if peer != "qsd":
                                line += f"  {peer} {res[peer]['iops']:9.0f} ({res[peer]['iops'] / q:4.2f})"
                        print(line, flush=True)
                        rows.append(row)
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
                if rows:
                    gmean = math.exp(sum(math.log(r["ratio"]) for r in rows) / len(rows))
                    print(f"{'geometric mean blockd/qsd':28s} {gmean:5.2f}")
                    tables.append({"where": title, "rows": rows, "geometric_mean": gmean})
    finally:
        if xfs is not None:
            subprocess.run(["umount", xfs[0]], check=False)
            os.unlink(xfs[1])
    if tables:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(tables, f, indent=2)
        if args.plot:
            _plot(tables[0]["rows"], tables[0]["geometric_mean"], args.plot)
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
