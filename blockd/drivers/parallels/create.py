"""``blockdev-create`` for parallels: header and an empty BAT, laid out as QEMU 7.2 does.

Header and BAT take whole clusters, the first cluster of data follows.
QEMU computes the BAT's end in 32 bits, so a BAT of 4 GiB or more wraps
(and the image QEMU makes then cannot be opened); the same arithmetic
here gives the same file.
"""

from __future__ import annotations

from typing import Any

from blockd.block.graph import BlockGraph
from blockd.block.node import Perm
from blockd.drivers.create_target import creation_file
from blockd.drivers.parallels import header as hdr
from blockd.errors import QMPError

#: QEMU's bound on the cluster size: INT64_MAX / 2^32.
_MAX_CLUSTER = ((1 << 63) - 1) // hdr.MAX_IMAGE_FACTOR


async def create(graph: BlockGraph, options: dict[str, Any]) -> None:
    size = options["size"]
    cluster = options.get("cluster-size", hdr.DEFAULT_CLUSTER_SIZE)
    if cluster >= _MAX_CLUSTER:
        raise QMPError("Cluster size is too large")
    if size >= hdr.MAX_IMAGE_FACTOR * cluster:
        raise QMPError("Image size is too large for this cluster size")
    if size % 512:
        raise QMPError("Image size must be a multiple of 512 bytes")
    if cluster % 512:
        raise QMPError("Cluster size must be a multiple of 512 bytes")
    async with creation_file(graph, options["file"], Perm.WRITE | Perm.RESIZE) as file:
        head, meta_sectors = hdr.build(size, cluster)
        try:
            await file.truncate(0, exact=True)
            await file.write(0, head.ljust(512, b"\0"))
            if meta_sectors > 1:
                await file.truncate(meta_sectors * 512, exact=False, prealloc="falloc")
            await file.flush()
        except OSError as exc:
            raise QMPError(f"Failed to create Parallels image: {exc.strerror}") from None
