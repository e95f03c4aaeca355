"""The ``vpc`` node: guest I/O on fixed and dynamic VHD images, as QEMU 7.2 does it.

A fixed disk is the guest's bytes followed by the footer.  A dynamic disk
maps each ``block_size`` piece of the guest through the BAT; like QEMU,
reads ignore the sector bitmaps (an allocated block is read as it is
stored) and writes mark every sector of a block present.  A new block goes
where the footer was: bitmap, then the footer moved past the block, then
the BAT entry, each flushed before the next so the BAT never points past
what the file holds.
"""

from __future__ import annotations

import array
import asyncio
import errno
import struct
import sys
from typing import Any

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, ChildLink, Extent, Status, WriteFlags
from blockd.drivers.vpc import dynamic, footer
from blockd.errors import QMPError


class VpcNode(BlockNode):
    driver = "vpc"
    is_format = True

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.footer: footer.Footer  # set by open
        self.sectors = 0
        #: The dynamic disk header; a fixed disk has none.
        self.header: dynamic.Header | None = None
        self.bat = array.array("I")
        self.free_offset = 0
        #: Bitmaps known to be all ones (QEMU sets them before writing to a block).
        self._full_bitmaps: set[int] = set()
        self._lock = asyncio.Lock()

    # ---- open ---------------------------------------------------------------

    async def open(self, ctx: OpenContext) -> None:
        file = await ctx.open_child(self.options["file"], "file")
        try:
            await self._load(self.file_child)
        except OSError as exc:
            raise QMPError(f"Could not open '{file.filename()}': "
                           f"{exc.strerror or 'Input/output error'}") from None

    async def _load(self, file: ChildLink) -> None:
        flen = file.length()
        head = bytes(await file.read(0, footer.SIZE))
        fixed = head[:8] != footer.COOKIE
        kind = footer.TYPE_FIXED if fixed else footer.TYPE_DYNAMIC
        if fixed:
            if flen < footer.SIZE:
                raise QMPError("File too small for a VHD header")
            head = bytes(await file.read(flen - footer.SIZE, footer.SIZE))
            if head[:8] != footer.COOKIE:
                raise QMPError("invalid VPC image")
        self.footer = f = footer.parse(head)
        if fixed:
            self._check_type(kind)
        self.sectors = f.guest_sectors()
        if self.sectors > footer.MAX_SECTORS:
            raise OSError(errno.EFBIG, "File too large")
        if fixed:
            return
        try:
            raw = bytes(await file.read(f.data_offset, dynamic.HEADER_SIZE))
        except OSError:
            raise QMPError("Error reading dynamic VHD header") from None
        self.header = h = dynamic.parse(raw, self.sectors)
        self._check_type(kind)
        table_bytes = h.max_table_entries * 4
        # QEMU reads the whole table before it sees that the file is too short for
        # it; checking first keeps a hostile entry count from costing memory.
        truncated = QMPError("block-vpc: free_data_block_offset points after the end of "
                             "file. The image has been truncated.")
        if h.table_offset + table_bytes > flen:
            if h.table_offset + table_bytes > (1 << 63) - 1:
                raise QMPError("Error reading pagetable")
            raise truncated
        self.bat = array.array("I", bytes(await file.read(h.table_offset, table_bytes)))
        if sys.byteorder == "little":
            self.bat.byteswap()
        free = -(-(h.table_offset + table_bytes) // 512) * 512
        last = max((e for e in self.bat if e != dynamic.UNALLOCATED), default=None)
        if last is not None:
            free = max(free, last * 512 + h.bitmap_size + h.block_size)
        if free > flen:
            raise truncated
        self.free_offset = free

    def _check_type(self, kind: int) -> None:
        """Refuse a footer whose disk type is not what its place says.

        QEMU opens these too: a differencing disk as if it had no parent, and
        the others with the I/O path of their type field, not of their layout.
        Either would read wrong.
        """
        if self.footer.disk_type != kind:
            raise QMPError(f"Unsupported VHD disk type {self.footer.disk_type} for a footer at "
                           f"the {'end' if kind == footer.TYPE_FIXED else 'start'} of the file "
                           "(differencing images are not supported)")

    # ---- data path ----------------------------------------------------------

    def length(self) -> int:
        return self.sectors * 512

    def _host(self, offset: int) -> int | None:
        """Where guest ``offset`` is stored, None if its block is not allocated."""
        h = self.header
        assert h is not None, "dynamic disks only"
        index = offset // h.block_size
        if index >= len(self.bat) or self.bat[index] == dynamic.UNALLOCATED:
            return None
        return self.bat[index] * 512 + h.bitmap_size + offset % h.block_size

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self.header is None:
            return await self.file_child.read(offset, length)
        bs = self.header.block_size
        out = bytearray()
        end = offset + length
        while offset < end:
            n = min(end - offset, bs - offset % bs)
            host = self._host(offset)
            out += bytes(n) if host is None else await self.file_child.read(host, n)
            offset += n
        return out

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        if self.header is None:
            await self.file_child.write(offset, data, flags)
            return
        bs = self.header.block_size
        view = memoryview(data)
        async with self._lock:
            pos = 0
            while pos < len(view):
                n = min(len(view) - pos, bs - (offset + pos) % bs)
                host = await self._host_for_write(offset + pos)
                await self.file_child.write(host, view[pos:pos + n], flags)
                pos += n

    async def _host_for_write(self, offset: int) -> int:
        """The host offset for a write at guest ``offset``, allocating its block if needed.

        An allocated block whose bitmap we have not set yet gets all its bits set
        first, as QEMU does before writing to it.
        """
        h = self.header
        assert h is not None, "dynamic disks only"
        index = offset // h.block_size
        if self.bat[index] == dynamic.UNALLOCATED:
            await self._allocate(index)
        bitmap = self.bat[index] * 512
        if bitmap not in self._full_bitmaps:
            await self.file_child.write(bitmap, b"\xff" * h.bitmap_size)
            await self.file_child.flush()
            self._full_bitmaps.add(bitmap)
        return bitmap + h.bitmap_size + offset % h.block_size

    async def _allocate(self, index: int) -> None:
        h = self.header
        assert h is not None, "dynamic disks only"
        bitmap = self.free_offset
        try:
            await self.file_child.write(bitmap, b"\xff" * h.bitmap_size)
            await self.file_child.flush()
            self._full_bitmaps.add(bitmap)
            await self.file_child.write(bitmap + h.bitmap_size + h.block_size, self.footer.raw)
            await self.file_child.flush()
            await self.file_child.write(h.table_offset + 4 * index, struct.pack(">I", bitmap // 512))
            await self.file_child.flush()
        except BaseException:
            self._full_bitmaps.discard(bitmap)
            raise
        self.bat[index] = bitmap // 512
        self.free_offset = bitmap + h.bitmap_size + h.block_size

    async def block_status(self, offset: int, length: int) -> Extent:
        if self.header is None:
            return await self._fixed_status(offset, length)
        bs = self.header.block_size
        host = self._host(offset)
        if host is not None:
            return Extent(min(length, bs - offset % bs), Status.DATA | Status.ALLOCATED, host,
                          self.file_node)
        # Unallocated blocks read as zeroes; a run of them is one extent.
        n = 0
        while n < length and self._host(offset + n) is None:
            n += bs - (offset + n) % bs
        return Extent(min(n, length), Status.ZERO | Status.ALLOCATED)

    async def _fixed_status(self, offset: int, length: int) -> Extent:
        """Data at the same offset in the file; the file's holes read as zeroes there too."""
        status = Status.DATA | Status.ALLOCATED
        flen = self.file_node.length()
        if offset >= flen:
            return Extent(length, status | Status.ZERO, offset, self.file_node)
        ext = await self.file_child.block_status(offset, min(length, flen - offset))
        if ext.status & Status.ZERO:
            status |= Status.ZERO
        return Extent(ext.length, status, offset, self.file_node)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        raise QMPError("Image format driver does not support resize")

    # ---- queries ------------------------------------------------------------

    def has_zero_init(self) -> bool:
        """A new dynamic disk reads as zeroes (no block allocated); a fixed one reads
        its file, as QEMU decides."""
        return self.header is not None or self.file_node.has_zero_init()

    def cluster_size(self) -> int | None:
        return self.header.block_size if self.header is not None else None
