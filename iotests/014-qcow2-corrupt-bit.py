#!/usr/bin/env python3
"""The corrupt bit: a write that would overwrite metadata is refused and marks the image.

An L2 entry planted to point at the refcount table makes the next write
to that cluster an overlap: the client gets EIO, BLOCK_IMAGE_CORRUPTED is
sent, the node stops serving, and the image can be opened read-only only
until ``qemu-img check -r all`` repairs it.
"""

import re
import struct

import iotests
from iotests import log, qemu_img, qemu_io

img = iotests.scratch("t.qcow2")
nbd = iotests.scratch("nbd.sock")
log(qemu_img("create", "-f", "qcow2", img, "8M"))
log(qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 64k", img))
with open(img, "r+b") as f:
    head = f.read(64)
    l1_offset, rt_offset = struct.unpack(">QQ", head[40:56])
    f.seek(l1_offset)
    l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    f.seek(l2_offset)
    f.write(struct.pack(">Q", (1 << 63) | rt_offset))


def node(name, **opts):
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": img, "locking": "off"}, **opts}


def export_q0(c):
    """Node q0 on the image, exported writable over NBD."""
    log(c.cmd("blockdev-add", **node("q0")))
    log(c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}}))
    log(c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, writable=True))


daemon = iotests.Daemon()
try:
    c = daemon.client()
    export_q0(c)
    uri = f"nbd+unix:///q0?socket={nbd}"
    log(qemu_io("-f", "raw", "-c", "write -P 0x33 0 4k", uri))
    for event in c.events(0.5):
        log(event)
    log(qemu_io("-f", "raw", "-c", "read -P 0x22 1M 4k", uri))
    log(c.cmd("query-named-block-nodes"))
    log(c.cmd("blockdev-add", **node("q1")))
    log(c.cmd("blockdev-add", **node("q2", **{"read-only": True})))
    log(c.cmd("block-export-del", id="e0"))
    c.events(0.5)
    log(c.cmd("blockdev-del", **{"node-name": "q0"}))
    info = c.cmd("query-named-block-nodes", flat=True)["return"]
    log([(n["node-name"], n["image"]["format-specific"]["data"]["corrupt"])
         for n in info if n["drv"] == "qcow2"])
    log(c.cmd("blockdev-del", **{"node-name": "q2"}))
finally:
    daemon.stop()

log(qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x22 1M 4k", img))
log(qemu_img("check", "-r", "all", img))

daemon = iotests.Daemon()
try:
    c = daemon.client()
    export_q0(c)
    log(qemu_io("-f", "raw", "-c", "write -P 0x44 2M 64k", "-c", "read -P 0x44 2M 64k",
                "-c", "read -P 0x22 1M 64k", f"nbd+unix:///q0?socket={nbd}"))
finally:
    daemon.stop()
log(re.sub(r"Image end offset: \d+", "Image end offset: N", qemu_img("check", img)))
iotests.cleanup()
