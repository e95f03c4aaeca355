#!/usr/bin/env python3
"""Lazy refcounts: the dirty bit while writing, a crash, and the repair on the next open.

With ``lazy-refcounts`` allocating writes leave the refcounts in memory
and the image is marked dirty.  After a SIGKILL the image says so;
opening it read-only works and changes nothing, opening it read-write
rebuilds the refcounts first.  A clean close clears the bit.
"""

import re
import signal

import iotests
from iotests import log, qemu_img, qemu_io

img = iotests.scratch("t.qcow2")
nbd = iotests.scratch("nbd.sock")
log(qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M"))


def node(name, **opts):
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": img}, **opts}


def flags(c):
    return [(n["node-name"], n["image"]["dirty-flag"])
            for n in c.cmd("query-named-block-nodes", flat=True)["return"] if n["drv"] == "qcow2"]


daemon = iotests.Daemon()
try:
    c = daemon.client()
    log(c.cmd("blockdev-add", **node("q0")))
    log(flags(c))
    log(c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}}))
    log(c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, writable=True))
    log(qemu_io("-f", "raw", "-c", "write -P 0x5a 0 3M", "-c", "write -P 0xa5 8M 64k",
                "-c", "flush", f"nbd+unix:///q0?socket={nbd}"))
    log(flags(c))
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
finally:
    daemon.stop()

log(re.sub(r"Image end offset: \d+", "Image end offset: N", qemu_img("check", img)))

daemon = iotests.Daemon()
try:
    c = daemon.client()
    log(c.cmd("blockdev-add", **node("r0", **{"read-only": True})))
    log(flags(c))
    log(c.cmd("blockdev-del", **{"node-name": "r0"}))
    log(c.cmd("blockdev-add", **node("q0")))
    log(flags(c))
    log(c.cmd("blockdev-del", **{"node-name": "q0"}))
finally:
    daemon.stop()

log(re.sub(r"Image end offset: \d+", "Image end offset: N", qemu_img("check", img)))
log(qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x5a 0 3M", "-c", "read -P 0xa5 8M 64k", img))
iotests.cleanup()
