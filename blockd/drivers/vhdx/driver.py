"""The ``vhdx`` node: guest I/O on dynamic and fixed VHDX images, as QEMU 7.2 does it.

Opening reads the headers, replays an active log (refused on a read-only
node, as QEMU does), then the region table, the metadata and the BAT.
Guest I/O goes block by block through the BAT.  A write to a block that
is not present puts a new block at the end of the file (1 MiB aligned) and
records it in the BAT through the log: the entry is written and flushed,
then replayed and the log emptied, as QEMU does it, so that a crash leaves
either the old BAT or a log any VHDX reader replays.  The first write of a
session updates both headers with a new data write GUID.

Images with a parent (differencing disks) are refused, as in QEMU.  Unlike
QEMU 7.2, which refuses any logical sector size but 512, an image with
4096-byte logical sectors (as Hyper-V makes them) opens: guest I/O here is
in bytes, so only the BAT's interleaving depends on the sector size.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import errno
import struct
import sys
import uuid
from typing import Any, Callable

from blockd.block.graph import OpenContext
from blockd.block.node import MAX_LENGTH, BlockNode, ChildLink, Extent, Status, WriteFlags
from blockd.drivers.vhdx import layout as L
from blockd.drivers.vhdx import log
from blockd.errors import QMPError

_FREE_STATES = (L.NOT_PRESENT, L.UNDEFINED, L.ZERO, L.UNMAPPED, L.UNMAPPED_V095)


def _prog(default: str) -> str:
    """The image tool's name when it runs (blockd-img, or qemu-img under that name)."""
    return getattr(sys.modules.get("blockd.img.common"), "PROG", default)


def _report(message: str) -> None:
    """An ``error_report`` line: QEMU prints these before the error that fails the open."""
    print(f"{_prog('blockd')}: {message}", file=sys.stderr, flush=True)


async def _read(file: ChildLink, offset: int, length: int) -> bytes:
    """Bytes of the file, zeroes past its end (as QEMU reads them)."""
    end = file.length()
    if offset >= end:
        return bytes(length)
    return bytes(await file.read(offset, min(length, end - offset))).ljust(length, b"\0")


@dataclasses.dataclass
class _Geometry:
    size: int
    block_size: int
    sector_size: int
    ratio: int
    entries: int


class VhdxNode(BlockNode):
    driver = "vhdx"
    is_format = True

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.headers: list[L.Header] = []
        self.current = 0
        self.session_guid = uuid.uuid4().bytes
        #: Where the log is and how far it has come (set by open).
        self.log: log.Position
        self.log_replayed = False
        self.geo: _Geometry  # set by open, from the metadata region
        self.bat_offset = 0
        self.bat = array.array("Q")
        self.regions: list[tuple[int, int]] = []
        self._first_write = True
        self._lock = asyncio.Lock()

    # ---- open ---------------------------------------------------------------

    async def open(self, ctx: OpenContext) -> None:
        await ctx.open_child(self.options["file"], "file")
        file = self.file_child
        try:
            await self._load(file)
        except OSError as exc:
            raise QMPError(f"Could not open '{file.child.filename()}': "
                           f"{exc.strerror or 'Input/output error'}") from None

    async def _load(self, file: ChildLink) -> None:
        if await _read(file, 0, 8) != L.SIGNATURE:
            raise OSError(errno.EINVAL, "Invalid argument")
        slots = [await _read(file, off, L.HEADER_SIZE) for off in L.HEADER_OFFSETS]
        parsed = [L.parse_header(s) for s in slots]
        self.current = L.pick_header(*parsed)
        cur = parsed[self.current]
        assert cur is not None  # pick_header chose a valid one
        # A slot that held no valid header is rewritten from the current one.
        self.headers = [h if h is not None else dataclasses.replace(cur) for h in parsed]
        self.regions = [(cur.log_offset, cur.log_offset + cur.log_length)]
        await self._open_log(file, cur)
        table = await _read(file, L.REGION_TABLE_OFFSETS[0], L.REGION_TABLE_SIZE)
        bat, meta = L.parse_region_table(table, self._register)
        self.geo = await self._metadata(file, meta)
        if self.geo.entries > bat.length // 8:
            raise OSError(errno.EINVAL, "Invalid argument")
        if bat.length > L.MAX_REQUEST:  # QEMU reads the whole region at once
            raise OSError(errno.EIO, "Input/output error")
        self.bat_offset = bat.offset
        # Only the entries in use, and only those the file holds (past its end they
        # read as zero, see _state): a hostile BAT length costs no memory.
        want = self.geo.entries * 8
        have = max(0, min(want, file.length() - bat.offset))
        self.bat = array.array("Q", await _read(file, bat.offset, have - have % 8))
        if sys.byteorder != "little":
            self.bat.byteswap()
        if not self.options.get("x-check"):
            if self._check_bat(None):
                raise OSError(errno.EINVAL, "Invalid argument")

    async def _open_log(self, file: ChildLink, cur: L.Header) -> None:
        if cur.log_offset < L.MiB or cur.log_offset % L.MiB or cur.log_version != 0:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.log = log.Position(cur.log_offset, cur.log_length)
        if cur.log_guid == L.ZERO_GUID or cur.log_length == 0:
            return
        if cur.log_length % L.MiB:
            raise OSError(errno.EINVAL, "Invalid argument")
        seq = await log.search(file, cur.log_offset, cur.log_length, cur.log_guid)
        if seq is None:
            return
        self.log.sequence = seq.first_sequence + 1
        if self.read_only:
            name = file.child.filename()
            raise QMPError(f"VHDX image file '{name}' opened read-only, but contains a log "
                           "that needs to be replayed",
                           hint=f"To replay the log, run:\n{_prog('blockd-img')} check -r all "
                                f"'{name}'")
        await self._visible_write()
        await log.replay(file, seq, cur.log_guid, file.flush)
        await file.flush()
        self.log.read = self.log.write = 0
        await self._update_headers(False, L.ZERO_GUID)
        self.log_replayed = True

    async def _metadata(self, file: ChildLink, meta: L.Region) -> _Geometry:
        items = L.parse_metadata_table(await _read(file, meta.offset, L.METADATA_TABLE_SIZE))

        async def item(guid: bytes, fmt: str) -> tuple:
            raw = await _read(file, meta.offset + items[guid], struct.calcsize(fmt))
            return struct.unpack(fmt, raw)

        block_size, bits = await item(L.FILE_PARAMETERS, "<II")
        if bits & L.HAS_PARENT:
            if L.PARENT_LOCATOR in items:
                raise OSError(errno.ENOTSUP, "Operation not supported")
            raise OSError(errno.EINVAL, "Invalid argument")
        (size,) = await item(L.VIRTUAL_DISK_SIZE, "<Q")
        (sector,) = await item(L.LOGICAL_SECTOR_SIZE, "<I")
        if not L.BLOCK_SIZE_MIN <= block_size <= L.BLOCK_SIZE_MAX \
                or block_size & (block_size - 1):
            raise OSError(errno.EINVAL, "Invalid argument")
        # QEMU 7.2 refuses 4096 as well (its arithmetic assumes 512); blockd reads it.
        if sector not in (512, 4096):
            raise OSError(errno.ENOTSUP, "Operation not supported")
        size -= size % sector
        if size > MAX_LENGTH:
            # QEMU's 32-bit block count wraps here and it gets as far as its block layer's
            # refusal; a count that wraps below that limit is refused below (QEMU would
            # read past the end of its BAT).
            raise QMPError("Could not refresh total sector count: File too large")
        return _Geometry(size, block_size, sector, L.chunk_ratio(block_size, sector),
                         L.bat_entries(size, block_size, sector))

    def _check_bat(self, res: Any) -> bool:
        """QEMU's BAT check: present blocks inside the file and outside the metadata.

        At open the first problem fails it; a check (``res``) counts them all.
        """
        g = self.geo
        flen = self.file_child.length()
        payload = g.ratio
        bad = False
        for i, entry in enumerate(self.bat):
            if entry & L.STATE_MASK != L.FULLY_PRESENT:
                continue
            offset = entry & L.OFFSET_MASK
            length = min(g.block_size, g.size - i * g.block_size) & 0xFFFFFFFF
            problems = []
            if offset > (1 << 63) - 1 - g.block_size:
                problems.append(f"VHDX BAT entry {i} offset overflow.")
            if offset >= flen:
                problems.append(f"VHDX BAT entry {i} start offset {offset} points after end "
                                f"of file ({flen}). Image has probably been truncated.")
            elif offset + length > flen:
                problems.append(f"VHDX BAT entry {i} end offset {offset + length - 1} points "
                                f"after end of file ({flen}). Image has probably been "
                                "truncated.")
            for message in problems:
                bad = True
                _report(message)
                if res is None:
                    return True
                res.corruptions += 1
            # QEMU counts only present entries here, so a present bitmap entry is
            # checked as a payload block when earlier ones were not present.
            if payload:
                payload -= 1
                if self._overlap(offset, offset + g.block_size):
                    bad = True
                    if res is None:
                        return True
                    res.corruptions += 1
            else:
                payload = g.ratio
        return bad

    def _register(self, start: int, end: int) -> bool:
        """Add a region of the file; whether it overlaps one added before."""
        if self._overlap(start, end):
            return True
        self.regions.append((start, end))
        return False

    def _overlap(self, start: int, end: int) -> bool:
        """Whether [start, end) overlaps a known region (the log, the region table's):
        reported against the latest one registered, as QEMU reports it."""
        for rs, re in reversed(self.regions):
            if not (start >= re or end <= rs):
                _report(f"VHDX region {start}-{end} overlaps with region {rs}-{re}")
                return True
        return False

    # ---- headers ------------------------------------------------------------

    async def _update_header(self, new_data_guid: bool, log_guid: bytes | None) -> None:
        """Write the non-current header as the next one, as the VHDX spec orders it."""
        idx = 1 - self.current
        h = self.headers[idx]
        h.sequence = (self.headers[self.current].sequence + 1) & 0xFFFFFFFFFFFFFFFF
        h.file_write_guid = self.session_guid
        if new_data_guid:
            h.data_write_guid = uuid.uuid4().bytes
        if log_guid is not None:
            h.log_guid = log_guid
        off = L.HEADER_OFFSETS[idx]
        slot = await _read(self.file_child, off, L.HEADER_SIZE)
        await self.file_child.write(off, L.header_slot(h, slot))
        await self.file_child.flush()
        self.current = idx

    async def _update_headers(self, new_data_guid: bool, log_guid: bytes | None = None) -> None:
        """Both headers, so that either one is valid and current."""
        await self._update_header(new_data_guid, log_guid)
        await self._update_header(new_data_guid, log_guid)

    async def _visible_write(self) -> None:
        if self._first_write:
            self._first_write = False
            await self._update_headers(True)

    # ---- data path ----------------------------------------------------------

    def length(self) -> int:
        return self.geo.size

    def _state(self, idx: int) -> int:
        """BAT entry ``idx``; one past the end of the file reads as zero (not present)."""
        return self.bat[idx] if idx < len(self.bat) else 0

    def _entry(self, offset: int) -> tuple[int, int]:
        """(BAT index, offset within the block) of guest ``offset``."""
        g = self.geo
        return L.bat_index(offset // g.block_size, g.ratio), offset % g.block_size

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        bs = self.geo.block_size
        if offset % bs + length <= bs:  # one block: its bytes as the file returns them
            host = self._host(offset)
            return bytes(length) if host is None else await self.file_child.read(host, length)
        out = bytearray(length)  # zeroed: blocks not present are left as they are
        pos = 0
        while pos < length:
            n = min(length - pos, bs - (offset + pos) % bs)
            host = self._host(offset + pos)
            if host is not None:
                out[pos:pos + n] = await self.file_child.read(host, n)
            pos += n
        return out

    def _host(self, offset: int) -> int | None:
        """Where guest ``offset`` is stored, None where it reads as zeroes."""
        idx, within = self._entry(offset)
        entry = self._state(idx)
        state = entry & L.STATE_MASK
        if state in _FREE_STATES:
            return None
        if state == L.FULLY_PRESENT and entry & L.OFFSET_MASK >= L.HEADER_SECTION_END:
            return (entry & L.OFFSET_MASK) + within
        # Partially present blocks belong to differencing disks (QEMU fails these reads
        # too); a block inside the header section is corrupt (QEMU reads the file's own
        # header there).
        raise OSError(errno.EIO, "Input/output error")

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        bs = self.geo.block_size
        view = memoryview(data)
        async with self._lock:
            await self._visible_write()
            pos = 0
            while pos < len(view):
                n = min(len(view) - pos, bs - (offset + pos) % bs)
                idx, within = self._entry(offset + pos)
                state = self._state(idx) & L.STATE_MASK
                if idx >= len(self.bat):
                    # The BAT itself would have to grow past the end of the file: only
                    # a truncated or hostile image gets here.
                    raise OSError(errno.EIO, "Input/output error")
                if state in _FREE_STATES:
                    await self._allocate(idx, within, view[pos:pos + n], flags)
                elif state == L.FULLY_PRESENT:
                    host = self.bat[idx] & L.OFFSET_MASK
                    if host < L.HEADER_SECTION_END:
                        raise OSError(errno.EFAULT, "Bad address")
                    await self.file_child.write(host + within, view[pos:pos + n], flags)
                else:
                    raise OSError(errno.EIO, "Input/output error")
                pos += n

    async def _allocate(self, idx: int, within: int, data: memoryview, flags: WriteFlags) -> None:
        """A new block at the end of the file (which grows to hold it, reading as zeroes),
        the data in it, then its BAT entry through the log."""
        new = -(-self.file_child.length() // L.MiB) * L.MiB
        await self.file_child.truncate(new + self.geo.block_size)
        old = self.bat[idx]
        self.bat[idx] = new | L.FULLY_PRESENT
        try:
            await self.file_child.write(new + within, data, flags)
        except BaseException:
            self.bat[idx] = old
            raise
        await self._log_bat_entry(idx)

    async def _log_bat_entry(self, idx: int) -> None:
        """Write the BAT sector holding entry ``idx`` through the log, then replay it."""
        pos = self.log
        if pos.length < 8:
            raise OSError(errno.EINVAL, "Invalid argument")
        if self.headers[self.current].log_guid != L.ZERO_GUID:
            # A log entry whose replay failed is still pending: QEMU writes no more.
            raise OSError(errno.ENOTSUP, "Operation not supported")
        await self.file_child.flush()
        await self._update_headers(False, uuid.uuid4().bytes)
        guid = self.headers[self.current].log_guid
        if pos.sequence == 0:
            pos.sequence = 1
        where = self.bat_offset + idx * 8
        sector_at = where - where % log.SECTOR
        # The rest of the sector comes from the file; as QEMU reads it (only what
        # follows an entry at the start of a sector), so the same requests reach it.
        if where == sector_at:
            sector = struct.pack("<Q", self.bat[idx]) + await _read(self.file_child, where + 8,
                                                                    log.SECTOR - 8)
        else:
            buf = bytearray(await _read(self.file_child, sector_at, log.SECTOR))
            struct.pack_into("<Q", buf, where - sector_at, self.bat[idx])
            sector = bytes(buf)
        entry = log.build_entry(pos, guid, sector_at, sector, self.file_child.length())
        start = pos.write
        write = start
        for k in range(0, len(entry), log.SECTOR):
            nxt = pos.next(write)
            if nxt == pos.read:
                raise OSError(errno.EINVAL, "Invalid argument")
            await self.file_child.write(pos.offset + write, entry[k:k + log.SECTOR])
            write = nxt
        pos.write = write
        pos.sequence += 1
        pos.tail = write
        await self.file_child.flush()
        seq = log.Sequence(dataclasses.replace(pos, read=start), 1, pos.sequence - 1)
        await log.replay(self.file_child, seq, guid, self.file_child.flush)
        await self.file_child.flush()
        pos.read = pos.write
        await self._update_headers(False, L.ZERO_GUID)

    async def block_status(self, offset: int, length: int) -> Extent:
        # QEMU 7.2's vhdx driver reports no block status: everything is data.
        return Extent(length, Status.DATA | Status.ALLOCATED)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        raise QMPError("Image format driver does not support resize")

    # ---- queries ------------------------------------------------------------

    def has_zero_init(self) -> bool:
        """A fixed image (first block present) reads as its file; a dynamic one as zeroes."""
        if self.bat and self.bat[0] & L.STATE_MASK == L.FULLY_PRESENT:
            return self.file_child.child.has_zero_init()
        return True

    def cluster_size(self) -> int | None:
        return self.geo.block_size

    async def check(self, fix: int = 0, sink: Callable[[str], None] | None = None) -> Any:
        from blockd.drivers.qcow2.check import CheckResult

        res = CheckResult(sink=sink)
        if self.log_replayed:
            res.corruptions_fixed += 1
        self._check_bat(res)
        return res
