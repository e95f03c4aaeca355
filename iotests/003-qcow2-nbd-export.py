#!/usr/bin/env python3
"""A qcow2 image created over QMP, exported over NBD, written by qemu-io, checked by qemu-img.

Also: the image lock keeps qemu-io out while the node is open, and a
writable export holds the node against deletion and read-only reopen.
"""

import re

import iotests
from iotests import log, qemu_img, qemu_io

img = iotests.scratch("t.qcow2")
nbd = iotests.scratch("nbd.sock")
open(img, "wb").close()

daemon = iotests.Daemon()
try:
    c = daemon.client()
    log(c.cmd("blockdev-add", driver="file", **{"node-name": "f0"}, filename=img))
    log(c.cmd("blockdev-create", **{"job-id": "create"},
              options={"driver": "qcow2", "file": "f0", "size": 64 << 20, "cluster-size": 65536}))
    for event in c.events_until(lambda e: e["data"].get("status") == "concluded"):
        log(event["data"])
    log(c.cmd("job-dismiss", id="create"))
    log(c.cmd("blockdev-add", driver="qcow2", **{"node-name": "q0"}, file="f0"))
    log(c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}}))
    log(c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, writable=True))
    uri = f"nbd+unix:///q0?socket={nbd}"
    log(qemu_io("-f", "raw", "-c", "write -P 0xa5 0 1M", "-c", "write -z 8M 2M",
                "-c", "read -P 0xa5 0 1M", "-c", "read -P 0 8M 2M", uri))
    log(qemu_io("-f", "qcow2", "-c", "read 0 4k", img))
    log(c.cmd("blockdev-del", **{"node-name": "q0"}))
    log(c.cmd("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "q0", "file": "f0",
                                           "read-only": True}]))
    log(c.cmd("block-export-del", id="e0"))
    for event in c.events(0.5):
        log(event["event"])
    log(c.cmd("blockdev-del", **{"node-name": "q0"}))
    log(c.cmd("blockdev-del", **{"node-name": "f0"}))
    log(c.cmd("query-named-block-nodes"))
finally:
    daemon.stop()

log(re.sub(r"Image end offset: \d+", "Image end offset: N", qemu_img("check", img)))
log(qemu_io("-f", "qcow2", "-c", "read -P 0xa5 0 1M", "-c", "read -P 0 1M 63M", img))
iotests.cleanup()
