"""Extents: flat ranges of a file, or sparse files with a grain directory and tables.

A sparse extent maps a guest sector through the grain directory (GD, one
32-bit sector offset per grain table) and a grain table (GT, one 32-bit
sector offset per grain).  QEMU allocates every grain table when it
creates an image, so the directories are only read; new grains go at the
end of the file and their entry is written in the table and in the
redundant table the backup directory points to.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import errno
import os
import struct
from typing import Any

from blockd.block.node import ChildLink
from blockd.drivers.vmdk import MAGIC_COWD, MAGIC_KDMV
from blockd.drivers.vmdk.stream import footer_header, read_padded
from blockd.errors import QMPError

SECTOR = 512
#: Header flags (VMDK4).
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF
#: A grain table entry meaning "reads as zeroes" (with FLAG_ZERO_GRAIN).
GTE_ZEROED = 1
#: Grains must start below this sector: table entries are 32 bits.
MAX_SECTORS = 1 << 32
#: VMDK4 header after the magic.
HEADER4 = struct.Struct("<IIQQQQIQQQc4sH")
#: VMDK3 (COWD) header after the magic.
HEADER3 = struct.Struct("<10I")
#: Grain tables cached per extent.
CACHE_TABLES = 64


class Grain(enum.Enum):
    UNALLOCATED = 0
    ZEROED = 1
    ALLOCATED = 2


@dataclasses.dataclass
class Lookup:
    """Where a guest offset lives in a sparse extent, and where its table entry is."""

    state: Grain
    host: int = 0  # byte offset of the grain in the extent file
    l1_index: int = 0
    l2_index: int = 0
    l2_offset: int = 0  # sector of the grain table; 0: no table


def _eio() -> OSError:
    return OSError(errno.EIO, "Input/output error")


@dataclasses.dataclass(eq=False)
class Extent:
    """One extent: ``sectors`` of the guest from ``start`` (bytes), stored in ``file``."""

    file: ChildLink
    sectors: int
    #: The type word of its descriptor line (``FLAT``, ``SPARSE``...); "" for a
    #: sparse file opened directly.
    type: str = ""
    start: int = 0

    flat: bool = False
    flat_offset: int = 0  # bytes

    @property
    def end(self) -> int:
        return self.start + self.sectors * SECTOR

    @property
    def grain(self) -> int:
        """Bytes one lookup covers: the grain, or the whole extent when flat."""
        return self.sectors * SECTOR

    def info(self) -> dict[str, Any]:
        """``VmdkExtentInfo``."""
        return {"filename": self.file.child.filename(), "format": self.type,
                "virtual-size": self.sectors * SECTOR}


@dataclasses.dataclass(eq=False)
class SparseExtent(Extent):
    grain_sectors: int = 128
    gt_entries: int = 512
    l1_size: int = 0
    gd_offset: int = 0  # bytes
    rgd_offset: int = 0  # bytes; 0: no redundant directory
    gd: memoryview | None = None
    rgd: memoryview | None = None
    compressed: bool = False
    has_marker: bool = False
    zero_grain: bool = False
    version: int = 1
    #: Where the next grain goes (sectors).
    next_sector: int = 0
    cache: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)

    @property
    def grain(self) -> int:
        return self.grain_sectors * SECTOR

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"filename": self.file.child.filename(), "format": self.type,
                               "virtual-size": self.sectors * SECTOR}
        out["cluster-size"] = self.grain
        if self.compressed:
            out["compressed"] = True
        return out

    @staticmethod
    def _entry(table: memoryview | None, index: int) -> int:
        """Directory entries past what the file holds read as zero (not allocated)."""
        if table is None or index >= len(table):
            return 0
        return table[index]

    async def _table(self, l2_offset: int) -> memoryview:
        table = self.cache.get(l2_offset)
        if table is not None:
            self.cache.move_to_end(l2_offset)
            return table
        self.file.debug_event("l2_load")
        try:
            raw = await read_padded(self.file, l2_offset * SECTOR, self.gt_entries * 4)
        except OSError:
            raise _eio() from None
        table = memoryview(bytearray(raw)).cast("I")
        self.cache[l2_offset] = table
        if len(self.cache) > CACHE_TABLES:
            self.cache.popitem(last=False)
        return table

    async def lookup(self, offset: int) -> Lookup:
        """The grain holding guest byte ``offset`` (inside this extent)."""
        sector = (offset - self.start) // SECTOR
        l1_index = sector // (self.gt_entries * self.grain_sectors)
        if l1_index >= self.l1_size:
            raise _eio()
        l2_offset = self._entry(self.gd, l1_index)
        if not l2_offset:
            return Lookup(Grain.UNALLOCATED, l1_index=l1_index)
        table = await self._table(l2_offset)
        l2_index = (sector // self.grain_sectors) % self.gt_entries
        value = table[l2_index]
        return Lookup(self._state(value), value * SECTOR, l1_index, l2_index, l2_offset)

    def _state(self, value: int) -> Grain:
        if self.zero_grain and value == GTE_ZEROED:
            return Grain.ZEROED
        return Grain.ALLOCATED if value else Grain.UNALLOCATED

    async def run(self, offset: int, first: Lookup, length: int) -> int:
        """Bytes from ``offset`` (at most ``length``) whose grains read like ``first``'s:
        the same state and, for data, the following bytes of the file.

        Only the grain table ``first`` came from is looked at; compressed data
        is one grain at a time.
        """
        within = (offset - self.start) % self.grain
        n = min(length, self.grain - within, self.end - offset)
        if not first.l2_offset:  # no table: everything it would map is unallocated
            table_end = self.start + (first.l1_index + 1) * self.gt_entries * self.grain
            return max(n, min(length, table_end - offset, self.end - offset))
        if first.state == Grain.ALLOCATED and self.compressed:
            return n
        table = await self._table(first.l2_offset)
        index, expect = first.l2_index + 1, first.host + self.grain
        while n < length and offset + n < self.end and index < self.gt_entries:
            value = table[index]
            if self._state(value) != first.state or \
                    first.state == Grain.ALLOCATED and value * SECTOR != expect:
                break
            n = min(length, n + self.grain, self.end - offset)
            index, expect = index + 1, expect + self.grain
        return n

    async def set_entry(self, where: Lookup, value: int) -> None:
        """Point a grain table entry (and its copy in the redundant table) at ``value``."""
        self.file.debug_event("l2_update")
        raw = struct.pack("<I", value)
        await self.file.write(where.l2_offset * SECTOR + where.l2_index * 4, raw)
        if self.rgd_offset:
            backup = self._entry(self.rgd, where.l1_index)
            await self.file.write(backup * SECTOR + where.l2_index * 4, raw)
        await self.file.flush()
        table = self.cache.get(where.l2_offset)
        if table is not None:
            table[where.l2_index] = value


def _roundup(n: int, m: int) -> int:
    return -(-n // m) * m


async def _directory(file: ChildLink, offset: int, entries: int, what: str) -> memoryview:
    """A grain directory: only the part inside the file is read and kept.

    The entries past the end of the file read as zero, as QEMU reads
    them; a hostile size costs no memory.
    """
    n = max(0, min(entries * 4, file.length() - offset)) // 4 * 4
    try:
        if offset + entries * 4 > (1 << 63) - 1:
            raise _eio()
        raw = bytes(await file.read(offset, n)) if n else b""
    except OSError as exc:
        raise QMPError(f"Could not read {what} from extent '{file.child.filename()}': "
                       f"{os.strerror(exc.errno or errno.EIO)}") from None
    return memoryview(bytearray(raw)).cast("I")


def _check_sizes(file: ChildLink, grain_sectors: int, l1_size: int) -> None:
    if grain_sectors > 0x200000:
        raise QMPError("Invalid granularity, image may be corrupt")
    if l1_size > 32 * 1024 * 1024:
        raise QMPError("L1 size too big")


def _file_sectors(file: ChildLink) -> int:
    return -(-file.length() // SECTOR)


async def open_cowd(file: ChildLink, head: bytes, kind: str) -> SparseExtent:
    """A VMware 3 sparse extent (``COWD``): grain tables of 4096 entries."""
    (_, _, disk_sectors, granularity, gd_sector, gd_size,
     *_rest) = HEADER3.unpack_from(head.ljust(4 + HEADER3.size, b"\0"), 4)
    _check_sizes(file, granularity, gd_size)
    if granularity == 0:
        # QEMU divides by it on the first access; refused here at once.
        raise QMPError("Invalid granularity, image may be corrupt")
    ext = SparseExtent(file, disk_sectors, kind, grain_sectors=granularity, gt_entries=4096,
                       l1_size=gd_size, gd_offset=gd_sector * SECTOR)
    ext.next_sector = _roundup(_file_sectors(file), granularity)
    ext.gd = await _directory(file, ext.gd_offset, gd_size, "l1 table")
    return ext


@dataclasses.dataclass
class Header4:
    version: int
    flags: int
    capacity: int
    granularity: int
    desc_offset: int
    desc_size: int
    num_gtes: int
    rgd_offset: int
    gd_offset: int
    grain_offset: int
    compress: int

    @classmethod
    def parse(cls, raw: bytes) -> "Header4":
        (version, flags, capacity, granularity, desc_offset, desc_size, num_gtes, rgd_offset,
         gd_offset, grain_offset, _, _, compress) = HEADER4.unpack_from(
            raw.ljust(4 + HEADER4.size, b"\0"), 4)
        return cls(version, flags, capacity, granularity, desc_offset, desc_size, num_gtes,
                   rgd_offset, gd_offset, grain_offset, compress)


async def open_kdmv(file: ChildLink, head: bytes, kind: str, writable: bool) -> SparseExtent:
    """A VMware 4 sparse extent (``KDMV``), its header possibly in a stream's footer."""
    h = Header4.parse(head)
    if h.gd_offset == GD_AT_END:
        pos = _file_sectors(file) * SECTOR - 1536
        try:
            if pos < 0:
                raise _eio()
            raw = await read_padded(file, pos, 1536)
        except OSError as exc:
            raise QMPError(f"Failed to read footer: {os.strerror(exc.errno or errno.EIO)}") \
                from None
        inner = footer_header(raw)
        if inner is None:
            raise QMPError("Invalid footer")
        h = Header4.parse(inner)
    compressed = h.compress == COMPRESSION_DEFLATE
    if h.version > 3:
        raise QMPError(f"Unsupported VMDK version {h.version}")
    if h.version == 3 and writable and not compressed:
        raise QMPError("VMDK version 3 must be read only")
    if h.num_gtes > 512:
        raise QMPError("L2 table size too big")
    l1_entry_sectors = (h.num_gtes * h.granularity) & 0xFFFFFFFF
    if l1_entry_sectors == 0:
        raise QMPError("L1 entry size is invalid")
    l1_size = ((h.capacity + l1_entry_sectors - 1) & 0xFFFFFFFFFFFFFFFF) \
        // l1_entry_sectors & 0xFFFFFFFF
    if _file_sectors(file) < h.grain_offset:
        raise QMPError(f"File truncated, expecting at least {h.grain_offset * SECTOR} bytes")
    _check_sizes(file, h.granularity, l1_size)
    ext = SparseExtent(file, h.capacity, kind, grain_sectors=h.granularity,
                       gt_entries=h.num_gtes, l1_size=l1_size,
                       gd_offset=(h.gd_offset << 9) & 0xFFFFFFFFFFFFFFFF,
                       compressed=compressed, has_marker=bool(h.flags & FLAG_MARKER),
                       zero_grain=bool(h.flags & FLAG_ZERO_GRAIN), version=h.version)
    if h.flags & FLAG_RGD:
        ext.rgd_offset = (h.rgd_offset << 9) & 0xFFFFFFFFFFFFFFFF
    ext.next_sector = _roundup(_file_sectors(file), h.granularity)
    ext.gd = await _directory(file, ext.gd_offset, l1_size, "l1 table")
    if ext.rgd_offset:
        ext.rgd = await _directory(file, ext.rgd_offset, l1_size, "l1 backup table")
    return ext


def embedded_descriptor(head: bytes) -> int | None:
    """A ``KDMV`` header with no capacity that points at a descriptor: its byte offset."""
    if head[:4] != MAGIC_KDMV:
        return None
    h = Header4.parse(head)
    if h.capacity == 0 and h.desc_offset:
        return h.desc_offset * SECTOR
    return None


async def open_sparse(file: ChildLink, head: bytes, kind: str, writable: bool) -> SparseExtent:
    if head[:4] == MAGIC_COWD:
        return await open_cowd(file, head, kind)
    if head[:4] == MAGIC_KDMV:
        return await open_kdmv(file, head, kind, writable)
    raise QMPError("Image not in VMDK format")
