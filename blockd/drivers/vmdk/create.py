"""``blockdev-create`` for vmdk, and the extent files ``qemu-img create`` names.

A sparse extent gets QEMU's layout: header, descriptor room (20 sectors),
the grain directory and every grain table, then the same again as the
redundant copy, grains from the next 64 KiB boundary.  The descriptor is
QEMU's template with a random CID.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
from typing import Any

from blockd.block.graph import BlockGraph
from blockd.block.node import ChildLink, Perm
from blockd.drivers.create_target import creation_file
from blockd.drivers.vmdk import MAGIC_KDMV, probe
from blockd.drivers.vmdk import descriptor as desc
from blockd.drivers.vmdk.extent import (COMPRESSION_DEFLATE, FLAG_COMPRESS, FLAG_MARKER,
                                        FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN, HEADER4, SECTOR)
from blockd.errors import QMPError

#: Extents of the split subformats hold at most this much.
SPLIT_SIZE = 0x80000000
GRANULARITY = 128  # sectors: 64 KiB grains
GT_ENTRIES = 512


def sparse_header(size: int, compress: bool, zeroed_grain: bool) -> tuple[bytes, int, int, int]:
    """(header sector, redundant GD sector, GD sector, grain offset in sectors) of a new extent."""
    capacity = size // SECTOR
    grains = -(-capacity // GRANULARITY)
    gt_size = -(-GT_ENTRIES * 4 // SECTOR)
    gt_count = -(-grains // GT_ENTRIES)
    gd_sectors = -(-gt_count * 4 // SECTOR)
    rgd = 1 + 20
    gd = rgd + gd_sectors + gt_size * gt_count
    grain_offset = -(-(gd + gd_sectors + gt_size * gt_count) // GRANULARITY) * GRANULARITY
    version = 3 if compress else 2 if zeroed_grain else 1
    flags = FLAG_RGD | FLAG_NL_DETECT
    if compress:
        flags |= FLAG_COMPRESS | FLAG_MARKER
    if zeroed_grain:
        flags |= FLAG_ZERO_GRAIN
    head = MAGIC_KDMV + HEADER4.pack(version, flags, capacity, GRANULARITY, 1, 20, GT_ENTRIES,
                                     rgd, gd, grain_offset, b"\0", b"\n \r\n",
                                     COMPRESSION_DEFLATE if compress else 0)
    return head, rgd, gd, grain_offset


async def init_extent(file: ChildLink, size: int, flat: bool, compress: bool,
                      zeroed_grain: bool) -> None:
    """Make ``file`` an empty extent of ``size`` bytes."""
    if flat:
        await file.truncate(size, exact=True)
        return
    head, rgd, gd, grain_offset = sparse_header(size, compress, zeroed_grain)
    gt_count = -(-(-(-size // SECTOR) // GRANULARITY) // GT_ENTRIES)
    gd_sectors = -(-gt_count * 4 // SECTOR)
    gt_size = GT_ENTRIES * 4 // SECTOR
    if file.length() < len(head):
        await file.truncate(len(head), exact=True)
    await file.write(0, head)
    await file.truncate(grain_offset * SECTOR, exact=True)
    for where in (rgd, gd):
        first = where + gd_sectors
        table = struct.pack(f"<{gt_count}I", *(first + i * gt_size for i in range(gt_count)))
        await file.write(where * SECTOR, table.ljust(gd_sectors * SECTOR, b"\0"))


async def _open(opened: contextlib.AsyncExitStack, graph: BlockGraph,
                ref: str | dict[str, Any]) -> ChildLink:
    """The main file or an extent, held until the creation ends (all in reverse order)."""
    return await opened.enter_async_context(
        creation_file(graph, ref, Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE))


async def _parent_cid(graph: BlockGraph, image: ChildLink, backing: str) -> int:
    """The CID of the backing file, which must be a vmdk (read as QEMU opens it)."""
    name = image.child.exact_filename() or ""
    path = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(name), backing)
    try:
        with open(path, "rb") as f:
            head = f.read(2048)
    except OSError as exc:
        raise QMPError(f"Could not open '{path}': {exc.strerror}") from None
    if not probe(head, path):
        fmt = "qcow2" if head[:4] == b"QFI\xfb" else "raw"
        raise QMPError(f"Invalid backing file format: {fmt}. Must be vmdk")
    node = await graph.open_node({"driver": "vmdk", "read-only": True, "backing": None,
                                  "file": {"driver": "file", "filename": path}}, implicit=True)
    from blockd.drivers.vmdk.driver import VmdkNode

    assert isinstance(node, VmdkNode)  # opened with driver vmdk just above
    try:
        return node.cid
    finally:
        await graph.delete_node(node)


async def create(graph: BlockGraph, options: dict[str, Any]) -> None:
    size = options["size"]
    if size % SECTOR:
        raise QMPError("Image size must be a multiple of 512 bytes")
    sub = options.get("subformat", "monolithicSparse")
    adapter = options.get("adapter-type", "ide")
    hw = options.get("hwversion", "4")
    tools = options.get("toolsversion", "2147483647")
    zeroed = options.get("zeroed-grain", False)
    backing = options.get("backing-file")
    heads = 16 if adapter == "ide" else 255
    split = sub in ("twoGbMaxExtentFlat", "twoGbMaxExtentSparse")
    flat = sub in ("monolithicFlat", "twoGbMaxExtentFlat")
    compress = sub == "streamOptimized"
    if flat and backing:
        raise QMPError("Flat image can't have backing file")
    if flat and zeroed:
        raise QMPError("Flat image can't enable zeroed grain")
    extent_size = SPLIT_SIZE if split else size
    created = extent_size if not split and not flat else 0
    refs = list(options.get("extents") or [])
    async with contextlib.AsyncExitStack() as opened:
        main = await _open(opened, graph, options["file"])
        await init_extent(main, created, flat, compress, zeroed)
        lines = ""
        fmt = 'RW {} FLAT "{}" 0\n' if flat else 'RW {} SPARSE "{}"\n'
        if not split and not flat:
            lines += fmt.format(-(-created // SECTOR), os.path.basename(main.child.filename()))
        parent_cid, parent_line = 0xFFFFFFFF, ""
        if backing:
            try:
                parent_cid = await _parent_cid(graph, main, backing)
            except QMPError as exc:
                raise QMPError(exc.desc) from None
            parent_line = f'parentFileNameHint="{backing}"'
        idx = 1
        while created < size:
            cur = min(size - created, extent_size)
            if idx > len(refs):
                raise QMPError(f"Extent [{idx - 1}] not specified")
            ext = await _open(opened, graph, refs[idx - 1])
            await init_extent(ext, cur, flat, compress, zeroed)
            lines += fmt.format(-(-cur // SECTOR), os.path.basename(ext.child.filename()))
            created += cur
            idx += 1
        if idx <= len(refs):
            raise QMPError("List of extents contains unused extents")
        text = desc.template(random.getrandbits(32), parent_cid, sub, parent_line, lines, hw,
                             size, heads, adapter, tools).encode()
        offset = 0x200 if not split and not flat else 0
        if main.length() < offset + len(text):
            await main.truncate(offset + len(text), exact=True)
        await main.write(offset, text)
        if offset == 0:
            await main.truncate(len(text), exact=True)
        await main.flush()


def extent_filenames(filename: str, subformat: str, size: int) -> list[str]:
    """The extent files ``qemu-img create`` makes next to ``filename``: ``<name>-flat.vmdk``
    or ``<name>-s001.vmdk``/``<name>-f001.vmdk``..., named from its prefix and extension."""
    path, base = os.path.split(filename)
    path = path + "/" if path else ""
    stem, dot, ext = base.rpartition(".")
    prefix, postfix = (stem, dot + ext) if dot else (base, "")
    if subformat == "monolithicFlat":
        return [f"{path}{prefix}-flat{postfix}"]
    if subformat in ("twoGbMaxExtentFlat", "twoGbMaxExtentSparse"):
        letter = "f" if subformat == "twoGbMaxExtentFlat" else "s"
        count = -(-size // SPLIT_SIZE)
        return [f"{path}{prefix}-{letter}{i:03d}{postfix}" for i in range(1, count + 1)]
    return []
