"""The ``vdi`` node: guest I/O on static and dynamic VDI images, as QEMU 7.2 does it.

A write to a block that is not allocated takes the next data block (the
count of allocated blocks is the next index, as in QEMU) and writes it
whole, zero-padded around the guest's bytes; once the request is done the
header and the changed sectors of the block map are written back.
"""

from __future__ import annotations

import array
import asyncio
import sys
from typing import Any, Callable

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, Extent, Status, WriteFlags
from blockd.drivers.vdi import header as hdr
from blockd.errors import QMPError


class VdiNode(BlockNode):
    driver = "vdi"
    is_format = True

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.header: hdr.Header  # set by open
        self.bmap = array.array("I")
        #: What the map's last sector holds after the entries (rewritten as read, as QEMU does).
        self._map_tail = b""
        self._lock = asyncio.Lock()

    async def open(self, ctx: OpenContext) -> None:
        file = await ctx.open_child(self.options["file"], "file")
        try:
            h = hdr.parse(bytes(await self.file_child.read(0, hdr.SIZE)))
            n = h.blocks_in_image * 4
            # QEMU would read a map past the end of the file as zeroes: every block
            # then maps to data block 0.  Refused rather than read so.
            if h.offset_bmap + n > file.length():
                raise QMPError(f"unsupported VDI image (block map of {h.blocks_in_image} "
                               f"entries at 0x{h.offset_bmap:x} extends past the end of the "
                               "file)")
            raw = bytes(await self.file_child.read(h.offset_bmap, -(-n // 512) * 512))
            self.bmap = array.array("I", raw[:n])
            self._map_tail = raw[n:]
        except OSError as exc:
            raise QMPError(f"Could not open '{file.filename()}': "
                           f"{exc.strerror or 'Input/output error'}") from None
        if sys.byteorder != "little":
            self.bmap.byteswap()
        self.header = h

    # ---- data path ----------------------------------------------------------

    def length(self) -> int:
        return self.header.disk_size

    def _host(self, offset: int) -> int | None:
        entry = self.bmap[offset // hdr.BLOCK_SIZE]
        if entry >= hdr.DISCARDED:
            return None
        return self.header.offset_data + entry * hdr.BLOCK_SIZE + offset % hdr.BLOCK_SIZE

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        out = bytearray()
        end = offset + length
        while offset < end:
            n = min(end - offset, hdr.BLOCK_SIZE - offset % hdr.BLOCK_SIZE)
            host = self._host(offset)
            out += bytes(n) if host is None else await self.file_child.read(host, n)
            offset += n
        return out

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        view = memoryview(data)
        first: int | None = None
        last = 0
        async with self._lock:
            pos = 0
            while pos < len(view):
                guest = offset + pos
                within = guest % hdr.BLOCK_SIZE
                n = min(len(view) - pos, hdr.BLOCK_SIZE - within)
                host = self._host(guest)
                if host is not None:
                    await self.file_child.write(host, view[pos:pos + n], flags)
                else:
                    index = guest // hdr.BLOCK_SIZE
                    await self._allocate(index, within, view[pos:pos + n], flags)
                    first = index if first is None else first
                    last = index
                pos += n
            if first is not None:
                await self._write_metadata(first, last)

    async def _allocate(self, index: int, within: int, data: memoryview,
                        flags: WriteFlags) -> None:
        """Give block ``index`` the next data block and write it whole."""
        h = self.header
        entry = h.blocks_allocated
        self.bmap[index] = entry
        h.blocks_allocated += 1
        if len(data) == hdr.BLOCK_SIZE:
            block: bytes | bytearray | memoryview = data
        else:
            block = bytearray(hdr.BLOCK_SIZE)
            block[within:within + len(data)] = data
        await self.file_child.write(h.offset_data + entry * hdr.BLOCK_SIZE, block, flags)

    async def _write_metadata(self, first: int, last: int) -> None:
        """The header, then the block map sectors holding entries ``first`` to ``last``."""
        await self.file_child.write(0, self.header.encode())
        per = 512 // 4
        lo, hi = first // per * per, (last // per + 1) * per
        chunk = self.bmap[lo:min(hi, len(self.bmap))]
        if sys.byteorder != "little":
            chunk.byteswap()
        raw = chunk.tobytes()
        if hi > len(self.bmap):
            raw += self._map_tail
        await self.file_child.write(self.header.offset_bmap + lo * 4, raw)

    async def block_status(self, offset: int, length: int) -> Extent:
        bs = hdr.BLOCK_SIZE
        host = self._host(offset)
        if host is None:
            n = 0
            while n < length and self._host(offset + n) is None:
                n += bs - (offset + n) % bs
            return Extent(min(n, length), Status.ZERO | Status.ALLOCATED)
        n = min(length, bs - offset % bs)
        status = Status.DATA | Status.ALLOCATED
        if self.header.image_type == hdr.TYPE_STATIC:
            # Static images are preallocated: where the file has a hole, the data is zero.
            flen = self.file_node.length()
            if host >= flen:
                return Extent(n, status | Status.ZERO, host, self.file_node)
            ext = await self.file_child.block_status(host, min(n, flen - host))
            n = ext.length
            if ext.status & Status.ZERO:
                status |= Status.ZERO
        return Extent(n, status, host, self.file_node)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        raise QMPError("Image format driver does not support resize")

    # ---- queries ------------------------------------------------------------

    def has_zero_init(self) -> bool:
        """A new dynamic image reads as zeroes; a static one reads its file, as QEMU
        decides."""
        return self.header.image_type != hdr.TYPE_STATIC or self.file_node.has_zero_init()

    def cluster_size(self) -> int | None:
        return hdr.BLOCK_SIZE

    async def check(self, fix: int = 0, sink: Callable[[str], None] | None = None) -> Any:
        from blockd.drivers.vdi.check import check

        return check(self, fix, sink)
