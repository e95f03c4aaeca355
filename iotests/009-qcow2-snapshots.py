#!/usr/bin/env python3
"""Internal snapshots over QMP, mixed with qemu-img's, with the guest writing through NBD.

Snapshots are taken by the daemon and by qemu-img, the guest overwrites
shared clusters between them, snapshots are deleted out of order from
both sides, and every snapshot is read back with ``qemu-img convert -l``.
The transcript is the same with qemu-storage-daemon (BLOCKD_IOTEST_QSD=1).
"""

import json
import re

import iotests
from iotests import log, qemu_img, qemu_io

img = iotests.scratch("t.qcow2")
nbd = iotests.scratch("nbd.sock")


def masked(obj):
    """Snapshot times change from run to run."""
    text = iotests.filter_text(obj if isinstance(obj, str) else json.dumps(obj))
    text = re.sub(r'"(date|vm-clock)-(sec|nsec)": \d+', r'"\1-\2": T', text)
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d *\d+:\d\d:\d\d\.\d{3}", "DATE CLOCK", text)
    return re.sub(r"Image end offset: \d+", "Image end offset: N", text)


def snapshots(c):
    nodes = c.cmd("query-named-block-nodes", flat=True)["return"]
    return [n["image"].get("snapshots") for n in nodes if n["node-name"] == "q0"][0]


def read_back(name, *patterns):
    out = iotests.scratch(f"{name}.raw")
    log(qemu_img("convert", "-l", name, "-O", "raw", img, out))
    log(qemu_io("-f", "raw", *sum((["-c", f"read -P {p}"] for p in patterns), []), out))


qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
log(qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -c -P 0x22 1M 64k", img))
log(qemu_img("snapshot", "-c", "from-qemu-img", img))

daemon = iotests.Daemon()
try:
    c = daemon.client()
    log(c.cmd("blockdev-add", driver="qcow2", **{"node-name": "q0"},
              file={"driver": "file", "filename": img}))
    log(masked(snapshots(c)))
    log(c.cmd("blockdev-snapshot-internal-sync", device="q0", name="first"))
    log(c.cmd("blockdev-snapshot-internal-sync", device="q0", name="first"))
    log(c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}}))
    log(c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, writable=True))
    uri = f"nbd+unix:///q0?socket={nbd}"
    log(qemu_io("-f", "raw", "-c", "write -P 0x33 2k 8k", "-c", "write -P 0x44 1028k 4k", uri))
    log(c.cmd("blockdev-snapshot-internal-sync", device="q0", name="second"))
    log(qemu_io("-f", "raw", "-c", "write -P 0x55 0 4k", uri))
    log(masked(snapshots(c)))
    log(masked(c.cmd("blockdev-snapshot-delete-internal-sync", device="q0", id="1")))
    log(masked(c.cmd("blockdev-snapshot-delete-internal-sync", device="q0", id="1")))
    log(masked(c.cmd("blockdev-snapshot-delete-internal-sync", device="q0")))
    log(c.cmd("block-export-del", id="e0"))
    c.events(0.5)
    log(c.cmd("blockdev-del", **{"node-name": "q0"}))
finally:
    daemon.stop()

log(masked(qemu_img("snapshot", "-l", img)))
log(masked(qemu_img("check", img)))
read_back("first", "0x11 0 64k", "0x22 1M 64k")
read_back("second", "0x11 0 2k", "0x33 2k 8k", "0x11 10k 54k", "0x22 1M 4k", "0x44 1028k 4k",
          "0x22 1032k 56k")
log(qemu_img("snapshot", "-d", "second", img))
log(masked(qemu_img("check", img)))
log(qemu_img("snapshot", "-a", "first", img))
log(qemu_io("-f", "qcow2", "-c", "read -P 0x11 0 64k", "-c", "read -P 0x22 1M 64k", img))
log(qemu_img("snapshot", "-d", "first", img))
log(masked(qemu_img("check", img)))
log(masked(qemu_img("snapshot", "-l", img)))
iotests.cleanup()
