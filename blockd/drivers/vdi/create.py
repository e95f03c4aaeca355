"""``blockdev-create`` for vdi: header, block map, and for a static image the data area.

``preallocation=metadata`` makes a static image (every block allocated,
in order, the file grown to hold them sparsely); ``off`` a dynamic one.
QEMU refuses the other modes for vdi, and so do we.
"""

from __future__ import annotations

import array
import sys
import uuid
from typing import Any

from blockd.block.graph import BlockGraph
from blockd.block.node import Perm
from blockd.drivers.create_target import creation_file
from blockd.drivers.vdi import header as hdr
from blockd.errors import QMPError


async def create(graph: BlockGraph, options: dict[str, Any]) -> None:
    size = options["size"]
    prealloc = options.get("preallocation", "off")
    if prealloc not in ("off", "metadata"):
        raise QMPError("Preallocation mode not supported for vdi")
    static = prealloc == "metadata"
    if size > hdr.MAX_DISK_SIZE:
        raise QMPError(f"Unsupported VDI image size (size is 0x{size:x}, max supported is "
                       f"0x{hdr.MAX_DISK_SIZE:x})")
    async with creation_file(graph, options["file"], Perm.WRITE | Perm.RESIZE) as file:
        head = hdr.build(size, static, uuid.uuid4().bytes, uuid.uuid4().bytes)
        blocks = -(-size // hdr.BLOCK_SIZE)
        entries = array.array("I", range(blocks)) if static \
            else array.array("I", [hdr.UNALLOCATED]) * blocks
        if sys.byteorder != "little":
            entries.byteswap()
        bmap = entries.tobytes()
        bmap += bytes(-len(bmap) % 512)
        try:
            await file.write(0, head)
        except OSError:
            raise QMPError("Error writing header") from None
        try:
            if bmap:
                await file.write(hdr.SIZE, bmap)
        except OSError:
            raise QMPError("Error writing bmap") from None
        if static:
            try:
                await file.truncate(hdr.SIZE + len(bmap) + blocks * hdr.BLOCK_SIZE)
            except OSError as exc:
                raise QMPError("Failed to statically allocate fileCould not resize file: "
                               f"{exc.strerror}") from None  # QEMU joins them so
        await file.flush()
