"""The dynamic disk header and the block allocation table (BAT).

A dynamic disk is footer copy, header (1024 bytes, big-endian, magic
``cxsparse``), BAT, then blocks: each a sector bitmap (rounded to whole
sectors) followed by ``block_size`` bytes of data, and the footer after the
last block.  A BAT entry is the sector where a block's bitmap starts,
``0xFFFFFFFF`` for a block not allocated (it reads as zeroes).
"""

from __future__ import annotations

import dataclasses
import struct

from blockd.drivers.vpc.footer import checksum
from blockd.errors import QMPError

HEADER_SIZE = 1024
MAGIC = b"cxsparse"
UNALLOCATED = 0xFFFFFFFF
DEFAULT_BLOCK_SIZE = 2 << 20
#: First block map sector of an image QEMU creates (after footer copy and header).
BAT_OFFSET = 3 * 512

# magic, data_offset, table_offset, version, max_table_entries, block_size, checksum
_LAYOUT = struct.Struct(">8sQQIIII")


@dataclasses.dataclass
class Header:
    table_offset: int
    max_table_entries: int
    block_size: int

    @property
    def bitmap_size(self) -> int:
        """Bytes of a block's sector bitmap: one bit a sector, whole sectors."""
        return -(-(self.block_size // (8 * 512)) // 512) * 512


def parse(buf: bytes, guest_sectors: int) -> Header:
    """The header's layout fields, checked as QEMU checks them and in its order."""
    magic, _, table_offset, _, entries, block_size, _ = _LAYOUT.unpack_from(buf)
    if magic != MAGIC:
        raise QMPError("Invalid header magic")
    if block_size < 512 or block_size & (block_size - 1):
        raise QMPError(f"Invalid block size {block_size}")
    if guest_sectors * 512 // block_size > 0xFFFFFFFF:
        raise QMPError("Too many blocks")
    signed = entries - (1 << 32) if entries & 0x80000000 else entries
    # QEMU keeps the count in an int: past 2^31 it is negative, and then huge as a size.
    if signed >= 0 and signed * block_size < guest_sectors * 512:
        raise QMPError("Page table too small")
    if signed < 0 or signed > 0x7FFFFFFF // 4:
        raise QMPError(f"Max Table Entries too large ({signed})")
    return Header(table_offset, entries, block_size)


def build(entries: int, block_size: int = DEFAULT_BLOCK_SIZE) -> bytes:
    """A new header as QEMU writes it: BAT after it, no parent, no next header."""
    buf = bytearray(_LAYOUT.pack(MAGIC, 0xFFFFFFFFFFFFFFFF, BAT_OFFSET, 0x00010000, entries,
                                 block_size, 0).ljust(HEADER_SIZE, b"\0"))
    buf[36:40] = struct.pack(">I", checksum(buf))
    return bytes(buf)


def entries_for(sectors: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """BAT entries a new image of ``sectors`` sectors gets."""
    return -(-sectors // (block_size // 512))

