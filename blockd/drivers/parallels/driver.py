"""The ``parallels`` node: guest I/O on Parallels images, as QEMU 7.2 does it.

Header and BAT are kept in memory as the bytes they are in the file.  A
write to clusters not allocated gives them the clusters at the end of the
data (``data_end``); when the file is too short for them it grows first by
the clusters and ``prealloc-size`` more, zeroed (``prealloc-mode=falloc``)
or by truncation (``truncate``), so new clusters read as zeroes.  The BAT
pieces that changed are written on flush and close, as QEMU does; an image
open for writing carries the in-use flag, cleared on close, when the file
is also cut back to the end of the data.
"""

from __future__ import annotations

import array
import asyncio
import errno
import re
import sys
from typing import Any, Callable

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, ChildLink, Extent, Status, WriteFlags
from blockd.drivers.parallels import header as hdr
from blockd.drivers.readonly_format import not_reopenable
from blockd.errors import QMPError

#: QEMU writes the header (and the start of the BAT) in pieces of its memory alignment.
_MEM_ALIGN = 4096
#: ...and changed parts of the BAT in pieces of four pages.
_DIRTY_BLOCK = 4 * 4096
PREALLOC_MODES = ("falloc", "truncate")
DEFAULT_PREALLOC_SIZE = 128 << 20
_SIZE_ERROR = ("Parameter 'prealloc-size' expects a non-negative number below 2^64\n"
               "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
               "and exabytes, respectively.")
_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
             "p": 1 << 50, "e": 1 << 60}


def _size_option(text: str) -> int:
    """A QemuOpts size (``128M``), refused with QEMU's message."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?)([bkmgtpeBKMGTPE]?)", text.strip())
    if m is None:
        raise QMPError(_SIZE_ERROR)
    return int(float(m.group(1)) * _SUFFIXES[m.group(2).lower()]) if "." in m.group(1) \
        else int(m.group(1)) * _SUFFIXES[m.group(2).lower()]


class ParallelsNode(BlockNode):
    driver = "parallels"
    is_format = True
    supports_backing = True
    #: QEMU's parallels driver takes whole sectors; the request path pads to them.
    request_alignment = 512

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        # Set by open().
        self.header: hdr.Header
        #: Header, BAT and what follows up to ``header_size``, as in the file.
        self.head = bytearray()
        self.bat = array.array("I")
        #: Bytes of ``head`` QEMU reads and writes back.
        self.header_size = 0
        #: End of the data, in sectors: where the next cluster goes.
        self.data_end = 0
        #: Whether the image was open for writing and not closed cleanly when opened.
        self.unclean = False
        self.prealloc_sectors = 0
        self.prealloc_mode = "falloc"
        self._dirty: set[int] = set()
        self._writing = False
        self.lock = asyncio.Lock()

    # ---- open and close -----------------------------------------------------

    async def open(self, ctx: OpenContext) -> None:
        await ctx.open_child(self.options["file"], "file")
        self._prealloc_options()
        try:
            await self._load(self.file_child)
            if not self.read_only:
                hdr.set_inuse(self.head, True)
                await self._write_header()
                self._writing = True
        except OSError as exc:
            raise QMPError(f"Could not open '{self.file_node.filename()}': "
                           f"{exc.strerror or 'Input/output error'}") from None

    def _prealloc_options(self) -> None:
        """``prealloc-size`` and ``prealloc-mode`` (option strings only: QEMU's
        ``blockdev-add`` has neither)."""
        size = self.options.get("prealloc-size", DEFAULT_PREALLOC_SIZE)
        if isinstance(size, str):
            size = _size_option(size)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 64:
            raise QMPError(_SIZE_ERROR)
        self._prealloc_bytes = size
        mode = self.options.get("prealloc-mode", "falloc")
        if mode not in PREALLOC_MODES:
            raise QMPError(f"invalid parameter value: {mode}")
        self.prealloc_mode = mode

    async def _load(self, file: ChildLink) -> None:
        flen = file.length()
        h = hdr.parse(bytes(await file.read(0, min(hdr.SIZE, flen))))
        if h.ext_off:
            raise QMPError("Parallels format extensions (persistent dirty bitmaps) are not "
                           "supported by blockd")
        size = hdr.bat_offset(h.bat_entries)
        # QEMU reads a BAT past the end of the file as zeroes; refused here, so a
        # hostile entry count cannot cost memory the file does not back.
        if size > max(flen, hdr.SIZE):
            raise QMPError(f"Invalid image: BAT of {h.bat_entries} entries extends past the "
                           "end of the file")
        self.header_size = -(-size // _MEM_ALIGN) * _MEM_ALIGN
        data_end = h.data_off or -(-size // 512) * 512
        if data_end < self.header_size:  # sectors against bytes, as QEMU compares them
            self.header_size = size
        got = bytes(await file.read(0, min(self.header_size, flen)))
        self.head = bytearray(got.ljust(self.header_size, b"\0"))
        self.bat = array.array("I", self.head[hdr.SIZE:size])
        if sys.byteorder != "little":
            self.bat.byteswap()
        last = max(self.bat, default=0) * h.off_multiplier
        if last >= data_end:
            data_end = last + h.tracks
        self.data_end = data_end
        self.unclean = h.inuse
        if h.inuse and not self.read_only and not self.options.get("x-check"):
            raise QMPError("parallels: Image was not closed correctly; cannot be opened "
                           "read/write")
        self.prealloc_sectors = max(h.tracks, self._prealloc_bytes >> 9)
        self.header = h

    async def _write_header(self) -> None:
        """The first piece of the header as QEMU rewrites it (its in-use flag), synced."""
        await self.file_child.write(0, self.head[:min(_MEM_ALIGN, self.header_size)])
        await self.file_child.flush()

    async def close(self) -> None:
        if not self._writing:
            return
        self._writing = False
        # Errors are ignored here, as in QEMU: the node goes away regardless.
        try:
            await self._flush_bat()
            hdr.set_inuse(self.head, False)
            await self._write_header()
            await self.file_child.truncate(self.data_end * 512, exact=True)
        except (OSError, QMPError):
            pass

    # ---- the BAT ------------------------------------------------------------

    def sector_of(self, index: int) -> int:
        """Host sector where cluster ``index`` starts, 0 when it is not allocated."""
        if index >= len(self.bat):
            return 0
        return self.bat[index] * self.header.off_multiplier

    def set_entry(self, index: int, value: int) -> None:
        self.bat[index] = value
        off = hdr.bat_offset(index)
        self.head[off:off + 4] = value.to_bytes(4, "little")
        self._dirty.add(off // _DIRTY_BLOCK)

    async def _flush_bat(self) -> None:
        """Write the pieces of header and BAT that changed (QEMU's ``flush_to_os``)."""
        for block in sorted(self._dirty):
            off = block * _DIRTY_BLOCK
            end = min(off + _DIRTY_BLOCK, self.header_size)
            await self.file_child.write(off, self.head[off:end])
        self._dirty.clear()

    async def write_bat(self) -> None:
        """The whole header and BAT, synced (a repair's)."""
        await self.file_child.write(0, self.head[:self.header_size])
        await self.file_child.flush()
        self._dirty.clear()

    # ---- data path ----------------------------------------------------------

    def length(self) -> int:
        return self.header.total_sectors * 512

    def _run(self, offset: int, length: int) -> tuple[int, int]:
        """(host offset or 0, bytes) of the run at ``offset`` that is either unallocated
        or contiguous in the file, at most ``length`` bytes."""
        cs = self.header.cluster_size
        index = offset // cs
        sector = self.sector_of(index)
        start = sector * 512 + offset % cs if sector else 0
        n = min(length, cs - offset % cs)
        expect = sector + self.header.tracks
        while n < length:
            index += 1
            if index >= len(self.bat) and not sector:
                return 0, length  # past the BAT nothing is allocated
            nxt = self.sector_of(index)
            if (nxt != 0) != (sector != 0) or (sector and nxt != expect):
                break
            expect += self.header.tracks
            n = min(length, n + cs)
        return start, n

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        out = bytearray()
        end = offset + length
        while offset < end:
            host, n = self._run(offset, end - offset)
            out += await self.file_child.read(host, n) if host else bytes(n)
            offset += n
        return out

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            async with self.lock:
                host, n = self._run(offset + pos, len(view) - pos)
                if not host:
                    host = await self._allocate(offset + pos, n)
            await self.file_child.write(host, view[pos:pos + n], flags)
            pos += n

    async def _allocate(self, offset: int, n: int) -> int:
        """Give the clusters of the unallocated run ``[offset, offset + n)`` the next host
        clusters, growing the file first if it is too short; the run's host offset."""
        h = self.header
        cs = h.cluster_size
        first = offset // cs
        count = -(-(offset + n) // cs) - first
        if first + count > len(self.bat):
            # An image larger than its BAT covers: QEMU fails an assertion here.
            raise OSError(errno.EIO, "Input/output error")
        space = count * h.tracks
        flen = self.file_child.length()
        if self.data_end + space > flen // 512:
            space += self.prealloc_sectors
            await self._grow(flen, (self.data_end + space) * 512)
        for i in range(count):
            entry = self.data_end // h.off_multiplier
            if entry > 0xFFFFFFFF:
                raise OSError(errno.EFBIG, "File too large")
            self.set_entry(first + i, entry)
            self.data_end += h.tracks
        return self.sector_of(first) * 512 + offset % cs

    async def _grow(self, flen: int, new_end: int) -> None:
        """The file up to ``new_end``, reading as zeroes from the end of the data on."""
        start = self.data_end * 512
        if self.prealloc_mode == "truncate":
            if new_end > flen:
                await self.file_child.truncate(new_end, exact=False)
            return
        # QEMU zeroes [start, new_end): what an image holds past its data is cleared, the
        # new room allocated, and a gap between the file's end and the data's left a hole.
        if start < flen:
            await self.file_child.write_zeroes(start, flen - start)
        elif start > flen:
            await self.file_child.truncate(start, exact=False)
        if new_end > max(flen, start):
            await self.file_child.truncate(new_end, exact=False, prealloc="falloc")

    async def flush(self) -> None:
        async with self.lock:
            await self._flush_bat()
        await super().flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        host, n = self._run(offset, length)
        if not host:
            return Extent(n, Status.ZERO)
        return Extent(n, Status.DATA | Status.ALLOCATED, host, self.file_node)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        raise QMPError("Image format driver does not support resize")

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        raise not_reopenable(self)

    # ---- queries ------------------------------------------------------------

    def has_info(self) -> bool:
        return False

    def has_zero_init(self) -> bool:
        return True

    async def check(self, fix: int = 0, sink: Callable[[str], None] | None = None) -> Any:
        from blockd.drivers.parallels.check import check

        return await check(self, fix, sink)
