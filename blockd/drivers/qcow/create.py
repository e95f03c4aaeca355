"""``blockdev-create`` for qcow: header, backing file name, then a zeroed L1 table.

The L1 table is written a sector at a time, as QEMU writes it (the file
ends with the table's last whole sector).  Encryption is legacy AES
(``encrypt.format`` ``qcow`` in QAPI, ``aes`` on qemu-img's command line);
its secret must exist, though nothing derived from it is stored.
"""

from __future__ import annotations

from typing import Any

from blockd.block.graph import BlockGraph
from blockd.block.node import Perm
from blockd.drivers.create_target import creation_file
from blockd.drivers.qcow import header as hdr
from blockd.errors import QMPError

SECTOR = 512


async def create(graph: BlockGraph, options: dict[str, Any]) -> None:
    encrypt = options.get("encrypt")
    if encrypt is not None and encrypt["format"] != "qcow":
        raise QMPError("Unsupported encryption format")
    size = options["size"]
    if size == 0:
        raise QMPError("Image size is too small, cannot be zero length")
    backing = options.get("backing-file")
    if backing == "fat:":  # QEMU's vvfat special case: no backing file is recorded
        backing = None
    async with creation_file(graph, options["file"], Perm.WRITE | Perm.RESIZE) as file:
        head, l1_bytes = hdr.build(size, backing, encrypt is not None)
        if encrypt is not None:
            from blockd.drivers.luks import secret_password

            secret_password(graph.secrets, encrypt.get("key-secret"), "encrypt.")
        l1_offset = (len(head) + 7) & ~7
        try:
            await file.truncate(0, exact=True)
            await file.write(0, head)
            sectors = -(-l1_bytes // SECTOR)
            step = 2048  # sectors a write: QEMU writes them one by one, to the same effect
            for first in range(0, sectors, step):
                count = min(step, sectors - first)
                await file.write(l1_offset + first * SECTOR, bytes(count * SECTOR))
            await file.flush()
        except OSError as exc:
            raise QMPError(f"Could not write image: {exc.strerror}") from None
