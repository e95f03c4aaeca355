"""The ``bochs`` format driver: Bochs growing ("redolog") images, read-only as in QEMU.

A 512-byte little-endian header, a catalog of one 32-bit entry per extent
(``0xFFFFFFFF``: not allocated), then the extents, each a sector bitmap
followed by its sectors.  A sector is read from its extent only where the
bitmap has its bit; everything else reads as zeroes.  The checks and the
limits (a catalog of at most 2^20 entries, extents of 512 B to 8 MiB, a
power of two) are QEMU 7.2's.
"""

from __future__ import annotations

import array
import struct
import sys

from blockd.block.node import ChildLink
from blockd.block.probe import signature_score
from blockd.drivers.readonly_format import ReadOnlyFormatNode
from blockd.errors import QMPError

HEADER_SIZE = 512
VERSION_1 = 0x00010000
UNALLOCATED = 0xFFFFFFFF
MAX_CATALOG = 0x100000
MAX_EXTENT = 0x800000

# version, header size, catalog entries, bitmap size, extent size
_FIELDS = struct.Struct("<5I")
_U32 = 0xFFFFFFFF


def _blocks(size: int) -> int:
    """Sectors that ``size`` bytes take, in QEMU's 32-bit arithmetic (0 bytes wraps)."""
    return (1 + ((size - 1) & _U32) // 512) & _U32


class BochsNode(ReadOnlyFormatNode):
    driver = "bochs"

    async def load(self, file: ChildLink) -> None:
        head = bytes(await file.read(0, HEADER_SIZE))
        if signature_score("bochs", head) != 100:
            raise QMPError("Image not in Bochs format")
        version, header, catalog, bitmap, extent = _FIELDS.unpack_from(head, 64)
        disk = struct.unpack_from("<Q", head, 84 if version == VERSION_1 else 88)[0]
        sectors = disk // 512
        if catalog > MAX_CATALOG:
            raise QMPError("Catalog size is too large")
        raw = bytes(await file.read(header, catalog * 4))
        self.catalog = array.array("I", raw)
        if sys.byteorder != "little":
            self.catalog.byteswap()
        if extent < 512:
            raise QMPError("Extent size must be at least 512")
        if extent & (extent - 1):
            raise QMPError(f"Extent size {extent} is not a power of two")
        if extent > MAX_EXTENT:
            raise QMPError(f"Extent size {extent} is too large")
        if catalog < -(-sectors // (extent // 512)):
            raise QMPError("Catalog size is too small for this disk size")
        self.data_offset = (header + catalog * 4) & _U32
        self.bitmap_blocks = _blocks(bitmap)
        self.stride = 512 * ((_blocks(extent) + self.bitmap_blocks) & _U32)
        self.extent = extent
        self.size = sectors * 512

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        out = bytearray(length)
        pos = 0
        while pos < length:
            index, within = divmod(offset + pos, self.extent)
            n = min(length - pos, self.extent - within)
            entry = self.catalog[index]
            if entry != UNALLOCATED:
                await self._read_extent(entry, within, memoryview(out)[pos:pos + n])
            pos += n
        return out

    async def _read_extent(self, entry: int, within: int, out: memoryview) -> None:
        """Sectors of the extent stored at catalog ``entry`` whose bitmap bits are set."""
        bitmap_at = self.data_offset + entry * self.stride
        first = within // 512
        count = len(out) // 512
        bits = bytes(await self.file_child.read(bitmap_at + first // 8,
                                          (first + count - 1) // 8 - first // 8 + 1))
        data_at = bitmap_at + 512 * self.bitmap_blocks
        i = 0
        while i < count:
            sector = first + i
            if not bits[sector // 8 - first // 8] >> (sector % 8) & 1:
                i += 1
                continue
            j = i + 1
            while j < count and bits[(first + j) // 8 - first // 8] >> ((first + j) % 8) & 1:
                j += 1
            out[i * 512:j * 512] = await self.file_child.read(data_at + sector * 512, (j - i) * 512)
            i = j
