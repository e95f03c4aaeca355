#!/usr/bin/env python3
"""fio over NBD: blockd against qemu-storage-daemon on the same image files.

Usage: python3 bench/nbd_fio.py [--runtime SECONDS] [--jobs NAME,...] [--json OUT]

The luks-qcow2-* jobs export a LUKS-encrypted qcow2 image (aes-256-xts,
made by qemu-img), so they measure the cipher path of both daemons.

Each job runs against both daemons, alternating which goes first, on image
files in /dev/shm (tmpfs) so the disk does not decide the result.  Prints a
table of IOPS and bandwidth with the ratio blockd/qsd and the geometric mean
of the ratios.
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
from harness import Daemon  # noqa: E402


@dataclasses.dataclass
class Job:
    name: str
    fmt: str  # image format of the exported node
    rw: str
    bs: str
    iodepth: int
    prepare: str  # "full" (allocated), "empty"
    size: str = "1G"
    extra: tuple[str, ...] = ()
    encrypt: bool = False  # qcow2 with LUKS encryption


JOBS = [
    Job("raw-4k-randread-qd32", "raw", "randread", "4k", 32, "full"),
    Job("raw-4k-randwrite-qd32", "raw", "randwrite", "4k", 32, "full"),
    Job("raw-1M-seqread", "raw", "read", "1M", 4, "full"),
    Job("qcow2-4k-randread-qd32", "qcow2", "randread", "4k", 32, "full"),
    Job("qcow2-4k-randwrite-qd32", "qcow2", "randwrite", "4k", 32, "full"),
    Job("qcow2-64k-alloc-write", "qcow2", "write", "64k", 16, "empty"),
    Job("qcow2-1M-seqread", "qcow2", "read", "1M", 4, "full"),
    Job("luks-qcow2-4k-randread-qd32", "qcow2", "randread", "4k", 32, "full", "256M",
        encrypt=True),
    Job("luks-qcow2-1M-seqread", "qcow2", "read", "1M", 4, "full", "256M", encrypt=True),
    Job("luks-qcow2-1M-seqwrite", "qcow2", "write", "1M", 4, "full", "256M", encrypt=True),
]

_SECRET = "secret,id=sec0,data=bench-password"


def _image(workdir: str, job: Job) -> str:
    path = os.path.join(workdir, f"{job.name}.{job.fmt}")
    if job.fmt == "raw":
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", path, job.size], check=True)
        if job.prepare == "full":
            subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", "count=1024",
                            "conv=notrunc", "status=none"], check=True)
    else:
        opts = ["-o", "preallocation=full"] if job.prepare == "full" else []
        if job.encrypt:
            opts += ["--object", _SECRET, "-o",
                     "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100"]
        for attempt in range(10):  # QEMU 7.2's PBKDF2 calibration flakes on a busy machine
            done = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, path,
                                   job.size], capture_output=True, text=True)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(done.stderr)
    return path


def _run_fio(uri: str, job: Job, runtime: int) -> dict[str, float]:
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={job.rw}",
           f"--bs={job.bs}", f"--iodepth={job.iodepth}", f"--runtime={runtime}",
           "--time_based" if job.prepare == "full" else "--size=1G",
           "--output-format=json", *job.extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    data = json.loads(out.stdout[out.stdout.index("{"):])
    result = data["jobs"][0]
    side = result["write"] if "write" in job.rw else result["read"]
    return {"iops": side["iops"], "bw_mib": side["bw_bytes"] / (1 << 20)}


def _serve(qsd: bool, workdir: str, image: str, job: Job) -> tuple[Daemon, str]:
    sock = os.path.join(workdir, f"qmp-{'qsd' if qsd else 'blockd'}.sock")
    nbd = os.path.join(workdir, f"nbd-{'qsd' if qsd else 'blockd'}.sock")
    options = {"driver": job.fmt, "node-name": "disk0",
               "file": {"driver": "file", "filename": image}}
    extra = []
    if job.encrypt:
        options["encrypt"] = {"format": "luks", "key-secret": "sec0"}
        extra = ["--object", _SECRET]
    daemon = Daemon(sock, *extra, "--blockdev", json.dumps(options),
                    "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                    "--export", "type=nbd,id=exp0,node-name=disk0,writable=on", qsd=qsd)
    deadline = time.monotonic() + 10
    while not os.path.exists(nbd) and time.monotonic() < deadline:
        time.sleep(0.02)
    return daemon, f"nbd+unix:///disk0?socket={nbd}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--jobs", default=",".join(j.name for j in JOBS))
    parser.add_argument("--json", help="write results here")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
