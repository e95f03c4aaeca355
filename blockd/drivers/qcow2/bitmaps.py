"""Persistent dirty bitmaps in qcow2: the bitmaps extension, directory, tables and data.

The header extension points to a directory of entries (name,
granularity, flags, bitmap table).  Each table entry covers one
cluster's worth of bits: a data cluster offset, or 0 for all-zero (bit 0
set: all ones).  While an image is open read-write its bitmaps carry the
``in-use`` flag on disk; a bitmap found in use at open was not saved
cleanly and is marked inconsistent.  Bitmaps are written back on close.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from typing import TYPE_CHECKING, AbstractSet, Any

from blockd.block.dirty_bitmap import DirtyBitmap
from blockd.drivers.qcow2 import header as hdr
from blockd.drivers.qcow2 import overlap
from blockd.drivers.qcow2.cluster import OFFSET_MASK
from blockd.errors import QMPError

if TYPE_CHECKING:
    from blockd.drivers.qcow2.image import Image

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
TYPE_DIRTY_TRACKING = 1
MAX_BITMAPS = hdr.MAX_BITMAPS
_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")


@dataclasses.dataclass
class DirEntry:
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    name: str
    extra: bytes = b""

    def encode(self) -> bytes:
        name = self.name.encode()
        raw = _ENTRY.pack(self.table_offset, self.table_size, self.flags, TYPE_DIRTY_TRACKING,
                          self.granularity_bits, len(name), len(self.extra)) + self.extra + name
        return raw + bytes(-len(raw) % 8)


def directory_location(image: "Image") -> tuple[int, int]:
    """(offset, size) of the bitmap directory; (0, 0) without valid bitmaps.

    An extension whose autoclear bit an older program cleared is stale and ignored.
    """
    h = image.header
    ext = h.extension(hdr.EXT_BITMAPS)
    if ext is None or not h.autoclear_features & hdr.AUTOCLEAR_BITMAPS or len(ext.data) < 24:
        return 0, 0
    nb, _, size, offset = _EXT.unpack_from(ext.data)
    if nb and not size:
        raise QMPError("Requested bitmap directory size is zero")
    return offset, size if nb else 0


#: Directory entry limits, as QEMU's (the physical size bounds the bitmap's memory).
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
MAX_NAME_SIZE = 1023
_RESERVED_FLAGS = 0xFFFFFFFC
_TABLE_RESERVED = 0xFF000000000001FE
_TABLE_OFFSET = 0x00FFFFFFFFFFFE00


def _entry_ok(image: "Image", e: DirEntry, etype: int) -> bool:
    """QEMU's constraints on one directory entry, checked before its table is read."""
    cs = image.cluster_size
    if (not e.table_size or not e.table_offset or e.table_offset % cs
            or e.table_size > MAX_TABLE_SIZE
            or not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS
            or e.flags & _RESERVED_FLAGS or len(e.name.encode()) > MAX_NAME_SIZE
            or etype != TYPE_DIRTY_TRACKING):
        return False
    phys = e.table_size * cs
    if phys > MAX_PHYS_SIZE:
        return False
    covered = (phys * 8) << e.granularity_bits
    if not e.flags & FLAG_IN_USE and image.header.size > covered:
        return False
    # Stricter than QEMU for bitmaps in use: their memory must be bounded too.
    return _bitmap_bytes(image.header.size, e.granularity_bits) <= MAX_PHYS_SIZE


def _bitmap_bytes(size: int, granularity_bits: int) -> int:
    """Bytes of a serialized bitmap, in whole 64-bit words as QEMU stores them."""
    bits = -(-size >> granularity_bits)
    return -(-bits // 64) * 8


async def load_directory(image: "Image") -> list[DirEntry]:
    """The directory, checked entry by entry as QEMU checks it on open."""
    offset, size = directory_location(image)
    if not size:
        return []
    ext = image.header.extension(hdr.EXT_BITMAPS)
    assert ext is not None  # it gave the directory's location
    nb = _EXT.unpack_from(ext.data)[0]
    try:
        raw = bytes(await image.file.read(offset, size)).ljust(size, b"\0")
    except OSError as exc:
        raise QMPError(f"Failed to read bitmap directory: {_strerror(exc)}") from None
    entries: list[DirEntry] = []
    pos = 0
    while pos < size:
        if pos + _ENTRY.size > size:
            raise QMPError("Broken bitmap directory")
        if len(entries) >= nb:
            raise QMPError("More bitmaps found than specified in header extension")
        t_off, t_size, flags, etype, gbits, nlen, xlen = _ENTRY.unpack_from(raw, pos)
        length = _ENTRY.size + xlen + nlen
        length += -length % 8
        if pos + length > size:
            raise QMPError("Broken bitmap directory")
        if xlen:
            raise QMPError("Bitmap extra data is not supported")
        start = pos + _ENTRY.size
        name = raw[start:start + nlen].decode(errors="replace")
        e = DirEntry(t_off, t_size, flags, gbits, name)
        if not _entry_ok(image, e, etype):
            raise QMPError(f"Bitmap '{name}' doesn't satisfy the constraints")
        entries.append(e)
        pos += length
    if len(entries) != nb:
        raise QMPError("Less bitmaps found than specified in header extension")
    return entries


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno or errno.EIO)


async def _load_table(image: "Image", e: DirEntry) -> list[int]:
    why = f"Could not read bitmap_table table from image for bitmap '{e.name}'"
    try:
        raw = bytes(await image.file.read(e.table_offset, e.table_size * 8))
    except OSError as exc:
        raise QMPError(f"{why}: {_strerror(exc)}") from None
    table = [x for (x,) in struct.iter_unpack(">Q", raw.ljust(e.table_size * 8, b"\0"))]
    for entry in table:
        if (entry & _TABLE_RESERVED or entry & _TABLE_OFFSET
                and (entry & 1 or (entry & _TABLE_OFFSET) % image.cluster_size)):
            raise QMPError(f"{why}: Invalid argument")
    return table


async def load(image: "Image", size: int, writable: bool) -> dict[str, DirtyBitmap]:
    """The image's bitmaps (newest last on disk, newest first in the result)."""
    cs = image.cluster_size
    out: dict[str, DirtyBitmap] = {}
    entries = await load_directory(image)
    for e in entries:
        bm = DirtyBitmap(e.name, size, 1 << e.granularity_bits, persistent=True,
                         enabled=bool(e.flags & FLAG_AUTO))
        if e.flags & FLAG_IN_USE:
            bm.inconsistent = True
        else:
            table = await _load_table(image, e)
            if -(-_bitmap_bytes(size, e.granularity_bits) // cs) != e.table_size:
                raise QMPError(f"Could not read bitmap '{e.name}' from image: Invalid argument")
            for i, entry in enumerate(table):
                start = i * cs
                if start >= len(bm.bits):
                    break
                n = min(cs, len(bm.bits) - start)
                if entry & OFFSET_MASK:
                    try:
                        data = await image.file.read(entry & OFFSET_MASK, n)
                    except OSError as exc:
                        raise QMPError(f"Could not read bitmap '{e.name}' from image: "
                                       f"{_strerror(exc)}") from None
                    bm.bits[start:start + n] = bytes(data).ljust(n, b"\0")
                elif entry & 1:
                    bm.bits[start:start + n] = b"\xff" * n
        bm.readonly = not writable
        out = {bm.name: bm, **out}
    if writable and entries:
        for e in entries:
            e.flags |= FLAG_IN_USE
        await _write_directory_in_place(image, entries)
    return out


async def _write_directory_in_place(image: "Image", entries: list[DirEntry]) -> None:
    offset, _ = directory_location(image)
    await image.write_meta(offset, b"".join(e.encode() for e in entries),
                           overlap.BITMAP_DIRECTORY)
    await image.file.flush()


async def _free_all(image: "Image", entries: list[DirEntry],
                    directory: tuple[int, int] = (0, 0)) -> None:
    """Drop the clusters of ``entries`` and of the directory at ``(offset, size)``."""
    cs = image.cluster_size
    offset, size = directory
    for e in entries:
        table = await image.file.read(e.table_offset, e.table_size * 8)
        for (entry,) in struct.iter_unpack(">Q", table):
            if entry & OFFSET_MASK:
                await image.refcounts.free(entry & OFFSET_MASK)
        await image.refcounts.free(e.table_offset, -(-(e.table_size * 8) // cs))
    if size:
        await image.refcounts.free(offset, -(-size // cs))


async def store(image: "Image", bitmaps: list[DirtyBitmap], in_use: bool,
                keep: AbstractSet[str] = frozenset()) -> list[DirEntry]:
    """Replace what is on disk with ``bitmaps`` (newest first); returns the new directory.

    ``in_use`` stays set while the image remains open read-write.  Entries
    named in ``keep`` (inconsistent bitmaps nobody removed) stay as they are.
    As in QEMU, bitmaps already in the directory keep their place there and
    new ones follow, newest first (their data is written in the given order).
    """
    cs = image.cluster_size
    h = image.header
    try:
        old = await load_directory(image)
    except QMPError as exc:
        # Valid at open, so something overwrote it since: an I/O failure of this store.
        raise OSError(errno.EIO, exc.desc) from None
    # The old clusters are freed only once the header points at the new
    # directory: a crash in between leaks them instead of leaving a header
    # that points at clusters already reused.
    old_directory = directory_location(image)
    written: dict[str, DirEntry] = {}
    for bm in bitmaps:
        data = bytes(bm.bits)
        table = []
        for start in range(0, len(data), cs):
            chunk = data[start:start + cs]
            if chunk.count(0) == len(chunk):
                table.append(0)
                continue
            off = await image.refcounts.alloc(1)
            await image.write_meta(off, chunk.ljust(cs, b"\0"), 0)
            table.append(off)
        raw = struct.pack(f">{len(table)}Q", *table)
        t_off = await image.refcounts.alloc(-(-len(raw) // cs))
        await image.write_meta(t_off, raw, 0)
        flags = (FLAG_AUTO if bm.enabled else 0) | (FLAG_IN_USE if in_use else 0)
        written[bm.name] = DirEntry(t_off, len(table), flags, bm.shift, bm.name)
    entries = [e if e.name in keep else written.pop(e.name) for e in old
               if e.name in keep or e.name in written]
    entries += written.values()
    if entries:
        directory = b"".join(e.encode() for e in entries)
        d_off = await image.refcounts.alloc(-(-len(directory) // cs))
        await image.write_meta(d_off, directory, 0)
        h.set_extension(hdr.EXT_BITMAPS, _EXT.pack(len(entries), 0, len(directory), d_off))
        h.autoclear_features |= hdr.AUTOCLEAR_BITMAPS
    else:
        h.set_extension(hdr.EXT_BITMAPS, None)
        h.autoclear_features &= ~hdr.AUTOCLEAR_BITMAPS
    await image.file.flush()
    await image.write_header()
    await _free_all(image, [e for e in old if e.name not in keep], old_directory)
    return entries


def info(entries: list[DirEntry]) -> list[dict[str, Any]]:
    """``Qcow2BitmapInfo`` for format-specific data."""
    out = []
    for e in entries:
        flags = []
        if e.flags & FLAG_IN_USE:
            flags.append("in-use")
        if e.flags & FLAG_AUTO:
            flags.append("auto")
        out.append({"name": e.name, "granularity": 1 << e.granularity_bits, "flags": flags})
    return out


def check_storable(image: "Image", name: str, granularity: int, count: int) -> None:
    if image.header.version < 3:
        raise QMPError("Cannot store dirty bitmaps in qcow2 v2 files")
    if granularity > (1 << 31):
        raise QMPError("Granularity exceeds maximum (2147483648 bytes)")
    if count >= MAX_BITMAPS:
        raise QMPError("Too many persistent bitmaps")
