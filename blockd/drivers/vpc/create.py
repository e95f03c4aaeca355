"""``blockdev-create`` for vpc: a fixed or dynamic VHD on a file node, laid out as QEMU does.

Dynamic: footer copy, header, a BAT of unallocated entries, footer.  Fixed:
the file grown to the guest size (sparse) and the footer after it.  The
size must be one the CHS geometry describes exactly unless ``force-size``
is set; ``qemu-img create`` rounds it up first (see :func:`chs_size`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from blockd.block.graph import BlockGraph
from blockd.block.node import Perm
from blockd.drivers.create_target import creation_file
from blockd.drivers.vpc import dynamic, footer
from blockd.errors import QMPError


def chs_size(size: int, force_size: bool) -> int:
    """The size ``qemu-img create`` asks for: whole sectors, rounded up to the geometry."""
    size = -(-size // 512) * 512
    sectors = footer.rounded_geometry(size, force_size)[0]
    return size if force_size else sectors * 512


async def create(graph: BlockGraph, options: dict[str, Any]) -> None:
    size = options["size"]
    force = options.get("force-size", False)
    disk_type = footer.TYPE_FIXED if options.get("subformat") == "fixed" \
        else footer.TYPE_DYNAMIC
    async with creation_file(graph, options["file"], Perm.WRITE | Perm.RESIZE) as file:
        # QEMU yields while it sets up its writer, so a size it refuses ends the job
        # only after blockdev-create has replied.
        await asyncio.sleep(0)
        sectors, chs = footer.rounded_geometry(size, force)
        if size != sectors * 512:
            raise QMPError("The requested image size cannot be represented in CHS geometry",
                           hint=f"Try size={sectors * 512} or force-size=on (the latter makes "
                                "the image incompatible with Virtual PC)")
        foot = footer.build(size, disk_type, chs, force, int(time.time()) - footer.TIMESTAMP_BASE,
                            uuid.uuid4().bytes)
        try:
            if disk_type == footer.TYPE_FIXED:
                await file.truncate(size + footer.SIZE, exact=False)
                await file.write(size, foot)
            else:
                entries = dynamic.entries_for(sectors)
                table = -(-entries * 4 // 512) * 512
                await file.write(0, foot)
                await file.write(dynamic.BAT_OFFSET + table, foot)
                await file.write(dynamic.BAT_OFFSET, b"\xff" * table)
                await file.write(footer.SIZE, dynamic.build(entries))
            await file.flush()
        except OSError as exc:
            if disk_type == footer.TYPE_FIXED:
                raise QMPError(f"Unable to write VHD header: {exc.strerror}") from None
            raise QMPError("Unable to create or write VHD header") from None
