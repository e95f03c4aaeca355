"""``blockdev-create`` for vhdx: a dynamic or fixed image laid out as QEMU 7.2 lays it out.

File identifier, two headers (sequence numbers n and n+1, an empty 1 MiB
log after the header section), two region tables, the BAT from 1 MiB past
the log, the metadata region after it, and data from 5 MiB past the BAT.
A fixed image has every block present, in order; a dynamic one none, its
entries ``ZERO`` with ``block-state-zero`` (QEMU's default) and
``NOT_PRESENT`` otherwise.
"""

from __future__ import annotations

import array
import random
import sys
import uuid
from typing import Any

from blockd.block.graph import BlockGraph
from blockd.block.node import Perm
from blockd.drivers.create_target import creation_file
from blockd.drivers.vhdx import layout as L
from blockd.errors import QMPError

CREATOR = "QEMU v7.2.22"


def default_block_size(size: int) -> int:
    """QEMU's block size when none is given: larger blocks for larger disks."""
    if size > 32 << 40:
        return 64 * L.MiB
    if size > 100 << 30:
        return 32 * L.MiB
    if size > 1 << 30:
        return 16 * L.MiB
    return 8 * L.MiB


def _round_mib(n: int) -> int:
    return -(-n // L.MiB) * L.MiB


def check_options(options: dict[str, Any]) -> tuple[int, int, int, bool, bool]:
    """(size, log size, block size, fixed, zero blocks), refused with QEMU's messages."""
    size = options["size"]
    if size > L.MAX_IMAGE_SIZE:
        raise QMPError("Image size too large; max of 64TB")
    log_size = options.get("log-size", L.DEFAULT_LOG_SIZE)
    if log_size > 0xFFFFFFFF:
        raise QMPError("Log size must be smaller than 4 GB")
    if log_size < L.MiB or log_size % L.MiB:
        raise QMPError("Log size must be a multiple of 1 MB")
    zero = options.get("block-state-zero", True)
    fixed = options.get("subformat", "dynamic") == "fixed"
    block_size = options.get("block-size", default_block_size(size))
    if block_size < L.MiB or block_size % L.MiB:
        raise QMPError("Block size must be a multiple of 1 MB")
    if block_size & (block_size - 1):
        raise QMPError("Block size must be a power of two")
    if block_size > L.BLOCK_SIZE_MAX:
        raise QMPError(f"Block size must not exceed {L.BLOCK_SIZE_MAX}")
    return size, log_size, block_size, fixed, zero


async def _write_bat(file: Any, bat: L.Region, size: int, block_size: int, ratio: int,
                     data_start: int, state: int) -> None:
    """The whole BAT region, a run of entries (one sector bitmap block's worth) at a
    time: payload entries in ``state``, present ones pointing at their blocks in order,
    bitmap entries zero."""
    blocks = -(-size // block_size)
    written = 0
    for first in range(0, blocks, ratio):
        n = min(ratio, blocks - first)
        if state == L.FULLY_PRESENT:
            start = data_start + first * block_size + state
            run = array.array("Q", range(start, start + n * block_size, block_size))
        else:
            run = array.array("Q", [state]) * n
        if first + n < blocks:
            run.append(0)
        if sys.byteorder != "little":
            run.byteswap()
        await file.write(bat.offset + written, run.tobytes())
        written += len(run) * 8
    while written < bat.length:  # the rest is written too, as QEMU does
        n = min(bat.length - written, 8 * L.MiB)
        await file.write(bat.offset + written, bytes(n))
        written += n


async def create(graph: BlockGraph, options: dict[str, Any]) -> None:
    size, log_size, block_size, fixed, zero = check_options(options)
    async with creation_file(graph, options["file"], Perm.WRITE | Perm.RESIZE) as file:
        sector = 512
        ratio = L.chunk_ratio(block_size, sector)
        entries = L.bat_entries(size, block_size, sector)
        bat = L.Region(_round_mib(L.HEADER_SECTION_END + log_size), _round_mib(entries * 8))
        meta = L.Region(_round_mib(bat.offset + bat.length), L.MiB)
        data_start = bat.offset + bat.length + 5 * L.MiB
        try:
            await file.write(0, L.SIGNATURE + CREATOR.encode("utf-16-le"))
        except OSError as exc:
            raise QMPError(f"Failed to write file signature: {exc.strerror}") from None
        h = L.Header(random.getrandbits(32), uuid.uuid4().bytes, uuid.uuid4().bytes,
                     L.ZERO_GUID, 0, 1, log_size, L.HEADER_SECTION_END)
        try:
            for off in L.HEADER_OFFSETS:
                await file.write(off, L.header_slot(h, bytes(L.HEADER_SIZE)))
                await file.flush()
                h.sequence += 1
        except OSError as exc:
            raise QMPError(f"Failed to write image headers: {exc.strerror}") from None
        await file.truncate(data_start + (size if fixed else 0))
        if fixed or zero or not file.child.has_zero_init():
            if bat.length > L.MAX_REQUEST:  # a 0-byte image with 256 MiB blocks
                raise QMPError("Failed to write the BAT: Input/output error")
            state = L.ZERO if zero else L.FULLY_PRESENT if fixed else L.NOT_PRESENT
            try:
                await _write_bat(file, bat, size, block_size, ratio, data_start, state)
            except OSError as exc:
                raise QMPError(f"Failed to write the BAT: {exc.strerror}") from None
        regions = L.build_region_table(bat, meta)
        for off, which in zip(L.REGION_TABLE_OFFSETS, ("first", "second")):
            try:
                await file.write(off, regions)
            except OSError as exc:
                raise QMPError(f"Failed to write {which} region table: {exc.strerror}") from None
        table_bytes, items = L.build_metadata(size, block_size, sector, fixed, uuid.uuid4().bytes)
        try:
            await file.write(meta.offset, table_bytes)
            await file.write(meta.offset + L.METADATA_TABLE_SIZE, items)
            await file.flush()
        except OSError as exc:
            raise QMPError(f"Failed to initialize metadata: {exc.strerror}") from None
