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
import struct
from typing import TYPE_CHECKING, Any

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
MAX_BITMAPS = 65535
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
    return offset, size if nb else 0


async def load_directory(image: "Image") -> list[DirEntry]:
    offset, size = directory_location(image)
    if not size:
        return []
    raw = bytes(await image.file.read(offset, size))
    entries, pos = [], 0
    while pos + _ENTRY.size <= len(raw):
        t_off, t_size, flags, _type, gbits, nlen, xlen = _ENTRY.unpack_from(raw, pos)
        start = pos + _ENTRY.size
        extra = raw[start:start + xlen]
        name = raw[start + xlen:start + xlen + nlen].decode(errors="replace")
        entries.append(DirEntry(t_off, t_size, flags, gbits, name, extra))
        length = _ENTRY.size + xlen + nlen
        pos += length + (-length % 8)
    return entries


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
            table = await image.file.read(e.table_offset, e.table_size * 8)
            for i, (entry,) in enumerate(struct.iter_unpack(">Q", table)):
                start = i * cs
                if start >= len(bm.bits):
                    break
                n = min(cs, len(bm.bits) - start)
                if entry & OFFSET_MASK:
                    bm.bits[start:start + n] = bytes(await image.file.read(entry & OFFSET_MASK, n))
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
                keep: set[str] = frozenset()) -> list[DirEntry]:
    """Replace what is on disk with ``bitmaps`` (newest first); returns the new directory.

    ``in_use`` stays set while the image remains open read-write.  Entries
    named in ``keep`` (inconsistent bitmaps nobody removed) stay as they are.
    """
    cs = image.cluster_size
    h = image.header
    old = await load_directory(image)
    kept = [e for e in old if e.name in keep]
    # The old clusters are freed only once the header points at the new
    # directory: a crash in between leaks them instead of leaving a header
    # that points at clusters already reused.
    old_directory = directory_location(image)
    entries = list(kept)
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
        entries.append(DirEntry(t_off, len(table), flags, bm.shift, bm.name))
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
