"""The ``cloop`` format driver: compressed loop images (Knoppix), read-only as in QEMU.

After a 128-byte shell-script preamble: block size and block count
(big-endian 32-bit), then ``count + 1`` big-endian 64-bit offsets; block
``i`` is the zlib stream between offsets ``i`` and ``i + 1`` and must
inflate to exactly one block.  QEMU 7.2's limits apply (blocks of at most
64 MiB, compressed at most 128 MiB, a table of at most 512 MiB); a table
the file cannot hold is refused before it is read, so a hostile count
costs no memory.
"""

from __future__ import annotations

import array
import asyncio
import errno
import struct
import sys
import zlib

from blockd.block.node import ChildLink
from blockd.drivers.readonly_format import ReadOnlyFormatNode
from blockd.errors import QMPError

MAX_BLOCK_SIZE = 64 << 20
_TABLE_AT = 128 + 8
#: Blocks this large are inflated in a worker thread, off the event loop.
_THREAD_MIN = 256 << 10


def inflate_exactly(data: bytes, size: int) -> bytes:
    """A whole zlib stream that must inflate to ``size`` bytes; EIO otherwise, as QEMU's
    ``inflate(Z_FINISH)`` with a buffer of that size."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, size)
    except zlib.error:
        raise OSError(errno.EIO, "Input/output error") from None
    if not d.eof or len(out) != size:
        raise OSError(errno.EIO, "Input/output error")
    return out


class CloopNode(ReadOnlyFormatNode):
    driver = "cloop"

    async def load(self, file: ChildLink) -> None:
        block_size, n_blocks = struct.unpack(">II", bytes(await file.read(128, 8)))
        if block_size % 512:
            raise QMPError(f"block_size {block_size} must be a multiple of 512")
        if block_size == 0:
            raise QMPError("block_size cannot be zero")
        if block_size > MAX_BLOCK_SIZE:
            raise QMPError(f"block_size {block_size} must be {MAX_BLOCK_SIZE >> 20} MB or less")
        limit = (0xFFFFFFFF - 1) // 8
        if n_blocks > limit:
            raise QMPError(f"n_blocks {n_blocks} must be {limit} or less")
        table = (n_blocks + 1) * 8
        if table > 512 << 20:
            raise QMPError("image requires too many offsets, try increasing block size")
        if _TABLE_AT + table > file.length():
            raise QMPError(f"offsets table of {n_blocks + 1} entries extends past the end of "
                           "the file")
        self.offsets = array.array("Q", bytes(await file.read(_TABLE_AT, table)))
        if sys.byteorder == "little":
            self.offsets.byteswap()
        for i in range(1, n_blocks + 1):
            if self.offsets[i] < self.offsets[i - 1]:
                raise QMPError(f"offsets not monotonically increasing at index {i}, image "
                               "file is corrupt")
            if self.offsets[i] - self.offsets[i - 1] > 2 * MAX_BLOCK_SIZE:
                raise QMPError(f"invalid compressed block size at index {i}, image file is "
                               "corrupt")
        self.block_size = block_size
        # QEMU multiplies in 32 bits.
        self.size = n_blocks * (block_size // 512) % (1 << 32) * 512
        self._cached: tuple[int, bytes] | None = None

    async def _block(self, index: int) -> bytes:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        start = self.offsets[index]
        packed = bytes(await self.file_child.read(start, self.offsets[index + 1] - start))
        if len(packed) + self.block_size >= _THREAD_MIN:
            data = await asyncio.to_thread(inflate_exactly, packed, self.block_size)
        else:
            data = inflate_exactly(packed, self.block_size)
        self._cached = (index, data)
        return data

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        out = bytearray()
        end = offset + length
        while offset < end:
            index, within = divmod(offset, self.block_size)
            n = min(end - offset, self.block_size - within)
            out += (await self._block(index))[within:within + n]
            offset += n
        return out
