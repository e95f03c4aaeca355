#!/usr/bin/env python3
"""Incremental backup with a dirty bitmap: only what changed is copied.

Usage: python3 examples/incremental_backup.py WORKDIR

Starts blockd, makes a disk and a full backup of it, tracks writes in a
bitmap, then copies just the dirty extents (read over NBD through the
``qemu:dirty-bitmap`` context) into the backup.  Tools used: the
``qemu.qmp`` client, ``nbdinfo``, ``qemu-img`` and ``qemu-io``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

from qemu.qmp import QMPClient


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


async def main(work: str) -> None:
    disk, backup = os.path.join(work, "disk.qcow2"), os.path.join(work, "backup.raw")
    qmp_sock, nbd_sock = os.path.join(work, "qmp.sock"), os.path.join(work, "nbd.sock")
    sh("qemu-img", "create", "-q", "-f", "qcow2", disk, "64M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", disk)
    sh("qemu-img", "convert", "-O", "raw", disk, backup)               # the full backup

    daemon = subprocess.Popen([sys.executable, "-m", "blockd", "--qmp", f"unix:{qmp_sock}"])
    while not os.path.exists(qmp_sock):
        time.sleep(0.05)
    qmp = QMPClient("backup")
    await qmp.connect(qmp_sock)
    await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk",
                                       "file": {"driver": "file", "filename": disk}})
    # 1. Track changes from now on.
    await qmp.execute("block-dirty-bitmap-add", {"node": "disk", "name": "inc"})
    await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_sock}}})
    await qmp.execute("block-export-add", {"type": "nbd", "id": "live", "node-name": "disk",
                                           "writable": True})
    # 2. The guest writes (here: qemu-io over NBD).
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x22 1M 64k", "-c", "write -P 0x33 40M 200k",
       f"nbd+unix:///disk?socket={nbd_sock}")
    # 3. Freeze the bitmap: new writes go to a fresh one, atomically.
    await qmp.execute("transaction", {"actions": [
        {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "inc"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "inc2"}}]})
    await qmp.execute("block-export-add", {"type": "nbd", "id": "ro", "node-name": "disk",
                                           "name": "snap", "bitmaps": ["inc"]})
    uri = f"nbd+unix:///snap?socket={nbd_sock}"
    # 4. Read the dirty extents and copy just those.
    extents = json.loads(sh("nbdinfo", "--map=qemu:dirty-bitmap:inc", "--json", uri))
    copied = 0
    for e in extents:
        if e["type"] & 1:  # dirty
            chunk = os.path.join(work, "chunk")
            bs = 512
            # qemu-img dd's count ends at that block, counted from the start.
            sh("qemu-img", "dd", "-f", "raw", "-O", "raw", f"bs={bs}", f"skip={e['offset'] // bs}",
               f"count={(e['offset'] + e['length']) // bs}", f"if={uri}", f"of={chunk}")
            sh("qemu-io", "-f", "raw", "-c", f"write -s {chunk} {e['offset']} {e['length']}", backup)
            copied += e["length"]
    print(f"copied {copied} dirty bytes of {64 << 20}")
    await qmp.execute("block-export-del", {"id": "ro"})
    await qmp.execute("block-dirty-bitmap-remove", {"node": "disk", "name": "inc"})
    await qmp.execute("block-export-del", {"id": "live", "mode": "hard"})
    await qmp.disconnect()
    daemon.terminate()  # SIGTERM: a clean shutdown that flushes and closes the image
    daemon.wait()
    print(sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", disk, backup), end="")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
