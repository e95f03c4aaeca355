"""The ``dmg`` format driver: Apple disk images (UDIF), read-only as in QEMU.

A 512-byte ``koly`` trailer at the end of the file points at a binary
resource fork or an XML property list; either holds ``mish`` blocks whose
40-byte chunk entries map runs of guest sectors to pieces of the data fork:
stored as they are, zeroes, or compressed with zlib, bzip2 or (when the
``lzfse`` Python package is installed) lzfse.  Chunk types QEMU does not
know are skipped with its warning (their sectors then fail to read), and
chunks are found by a binary search in the order the image lists them, as
in QEMU.  (Debian's QEMU is built without its bzip2 and lzfse modules and
fails to read those chunks; blockd reads bzip2 with Python's ``bz2``.)  The
checks and limits (chunks of at most 64 MiB, a property list of at most
16 MiB) are QEMU 7.2's; where QEMU fails without a message of its own, so
does this driver (``Invalid argument``), and where it prints one before
failing so, the message is the error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bz2
import errno
import functools
import logging
import re
import struct
from dataclasses import dataclass, field

from blockd.block.node import ChildLink
from blockd.drivers.cloop import inflate_exactly
from blockd.drivers.readonly_format import ReadOnlyFormatNode
from blockd.errors import QMPError

ZEROES = 0x00000000
COPY = 0x00000001
IGNORE = 0x00000002  # reads as zeroes too
ZLIB = 0x80000005
BZIP2 = 0x80000006
LZFSE = 0x80000007
COMMENT = 0x7FFFFFFE
LAST = 0xFFFFFFFF
LENGTHS_MAX = 64 << 20
SECTORCOUNTS_MAX = LENGTHS_MAX // 512
PLIST_MAX = 16 << 20
_MISH = 0x6D697368
_CHUNK = struct.Struct(">II4Q")  # type, comment, sector, count, offset, length
_THREAD_MIN = 256 << 10
log = logging.getLogger(__name__)


@functools.cache
def _lzfse():
    """The ``lzfse`` module when installed (QEMU needs its lzfse module built too)."""
    try:
        import lzfse  # type: ignore[import-not-found]
    except ImportError:
        return None
    return lzfse


def _invalid() -> OSError:
    """QEMU's failures without a message: "Could not open '<file>': Invalid argument"."""
    return OSError(errno.EINVAL, "Invalid argument")


@dataclass
class Chunks:
    """The chunk table, in the image's order."""

    types: list[int] = field(default_factory=list)
    sectors: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def find(self, sector: int) -> int | None:
        """A binary search, as QEMU's (which assumes chunks in sector order)."""
        lo, hi = 0, len(self.types) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.sectors[mid] > sector:
                hi = mid - 1
            elif self.sectors[mid] + self.counts[mid] > sector:
                return mid
            else:
                lo = mid + 1
        return None


def _known(kind: int) -> bool:
    """Whether chunks of ``kind`` can be read; the others are left out (their sectors
    fail to read), with QEMU's warning, once, for what is not a comment or an end."""
    if kind in (ZEROES, COPY, IGNORE, ZLIB, BZIP2) or kind == LZFSE and _lzfse() is not None:
        return True
    if kind == LZFSE:
        _warn_once("lzfse", "warning: dmg: lzfse-compressed chunks need the Python package "
                            "'lzfse', accessing them will result in I/O errors")
    elif kind not in (COMMENT, LAST):
        _warn_once("unknown", f"warning: Image contains chunks of unknown type {kind:x}, "
                              "accessing them will result in I/O errors")
    return False


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", message)


def read_mish(chunks: Chunks, data_fork: int, block: bytes) -> None:
    """Add the chunks of one ``mish`` block; anything else is skipped, as in QEMU."""
    if len(block) < 244 or struct.unpack_from(">I", block)[0] != _MISH:
        return
    out_offset, = struct.unpack_from(">Q", block, 8)
    in_offset = data_fork + struct.unpack_from(">Q", block, 0x18)[0]
    for pos in range(204, 204 + (len(block) - 204) // 40 * 40, 40):
        kind, _, sector, count, offset, length = _CHUNK.unpack_from(block, pos)
        if not _known(kind):
            continue
        i = len(chunks.types)
        if kind not in (ZEROES, IGNORE) and count > SECTORCOUNTS_MAX:
            raise QMPError(f"sector count {count} for chunk {i} is larger than max "
                           f"({SECTORCOUNTS_MAX})")
        if length > LENGTHS_MAX:
            raise QMPError(f"length {length} for chunk {i} is larger than max ({LENGTHS_MAX})")
        chunks.types.append(kind)
        chunks.sectors.append((sector + out_offset) & (1 << 64) - 1)
        chunks.counts.append(count)
        chunks.offsets.append((offset + in_offset) & (1 << 64) - 1)
        chunks.lengths.append(length)


def glib_base64(text: bytes) -> bytes:
    """Base64 as GLib decodes it: characters outside the alphabet are skipped."""
    clean = re.sub(rb"[^A-Za-z0-9+/]", b"", text.split(b"=", 1)[0])
    clean = clean[:len(clean) - len(clean) % 4 if len(clean) % 4 == 1 else len(clean)]
    try:
        return base64.b64decode(clean + b"=" * (-len(clean) % 4))
    except binascii.Error:
        return b""


def _decompress(kind: int, packed: bytes, size: int) -> bytes:
    if kind == ZLIB:
        return inflate_exactly(packed, size)
    try:
        if kind == BZIP2:
            d = bz2.BZ2Decompressor()
            out = d.decompress(packed, size)
            ok = d.eof
        else:
            out = _lzfse().decompress(packed)
            ok = True
    except (OSError, ValueError, EOFError, RuntimeError):
        raise OSError(errno.EIO, "Input/output error") from None
    if not ok or len(out) != size:
        raise OSError(errno.EIO, "Input/output error")
    return out


class DmgNode(ReadOnlyFormatNode):
    driver = "dmg"

    async def load(self, file: ChildLink) -> None:
        koly = await self._find_koly(file)

        async def u64(at: int) -> int:
            return struct.unpack(">Q", bytes(await file.read(at, 8)))[0]

        data_fork = await u64(koly + 0x18)
        if data_fork > koly:
            raise _invalid()
        rsrc, rsrc_len = await u64(koly + 0x28), await u64(koly + 0x30)
        if rsrc >= koly or rsrc_len > koly - rsrc:
            raise _invalid()
        xml, xml_len = await u64(koly + 0xD8), await u64(koly + 0xE0)
        if xml >= koly or xml_len > koly - xml:
            raise _invalid()
        sectors = await u64(koly + 0x1EC)
        if sectors >= 1 << 63:
            raise _invalid()
        self.chunks = Chunks()
        if rsrc_len:
            await self._resource_fork(file, data_fork, rsrc, rsrc_len)
        elif xml_len:
            await self._plist(file, data_fork, xml, xml_len)
        else:
            raise _invalid()
        self.size = sectors * 512
        self._cached: tuple[int, bytes] | None = None

    @staticmethod
    async def _find_koly(file: ChildLink) -> int:
        """The trailer's offset: its magic in the last 515 bytes of the sector-rounded
        file (a dmg may have any size)."""
        length = file.length()
        if length < 512:
            raise QMPError("dmg file must be at least 512 bytes long")
        start = length - 511 - 512 if length > 511 + 512 else 0
        buf = bytes(await file.read(start, min(length, 515)))
        at = buf.find(b"koly")
        if at < 0:
            raise QMPError("Could not locate UDIF trailer in dmg file")
        return start + at

    async def _resource_fork(self, file: ChildLink, data_fork: int, begin: int,
                             length: int) -> None:
        data_at, = struct.unpack(">I", bytes(await file.read(begin, 4)))
        if data_at > length:
            raise _invalid()
        count, = struct.unpack(">I", bytes(await file.read(begin + 8, 4)))
        if count == 0 or data_at + count > length:
            raise _invalid()
        offset = begin + data_at
        end = offset + count
        while offset < end:
            size, = struct.unpack(">I", bytes(await file.read(offset, 4)))
            if size == 0 or size > end - offset:
                raise _invalid()
            offset += 4
            read_mish(self.chunks, data_fork, bytes(await file.read(offset, size)))
            offset += size

    async def _plist(self, file: ChildLink, data_fork: int, begin: int, length: int) -> None:
        if length == 0 or length > PLIST_MAX:
            raise _invalid()
        text = bytes(await file.read(begin, length))
        text = text.split(b"\0", 1)[0]  # QEMU searches it as a C string
        pos = 0
        while True:
            start = text.find(b"<data>", pos)
            if start < 0:
                return
            start += 6
            end = text.find(b"</data>", start)
            if end < 0:
                raise _invalid()
            read_mish(self.chunks, data_fork, glib_base64(text[start:end]))
            pos = end + 1

    async def _chunk(self, index: int) -> bytes:
        """The decoded bytes of a (non-zero) chunk; the last one is kept, as in QEMU."""
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        c = self.chunks
        kind, length, size = c.types[index], c.lengths[index], c.counts[index] * 512
        packed = bytes(await self.file_child.read(c.offsets[index], length))
        if kind == COPY:
            if length < size:
                # QEMU would serve stale buffer bytes past the stored ones.
                raise OSError(errno.EIO, "Input/output error")
            data = packed
        elif length + size >= _THREAD_MIN:
            data = await asyncio.to_thread(_decompress, kind, packed, size)
        else:
            data = _decompress(kind, packed, size)
        self._cached = (index, data)
        return data

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        out = bytearray()
        end = offset + length
        c = self.chunks
        while offset < end:
            sector = offset // 512
            index = c.find(sector)
            if index is None:
                raise OSError(errno.EIO, "Input/output error")
            within = (sector - c.sectors[index]) * 512
            n = min(end - offset, c.counts[index] * 512 - within)
            if c.types[index] in (ZEROES, IGNORE):
                out += bytes(n)
            else:
                out += (await self._chunk(index))[within:within + n]
            offset += n
        return out

