"""Compressed grains (streamOptimized): a marker with the grain's sector and size, then
a zlib stream; always (de)compressed in a worker thread.

QEMU refuses a grain whose stream is bad or too long with ``EINVAL``, and
so does this module; nothing here trusts the sizes an image stores.
"""

from __future__ import annotations

import asyncio
import errno
import struct
import zlib

from blockd.block.node import ChildLink

#: Grain marker: guest sector (lba) and the compressed size that follows.
GRAIN_MARKER = struct.Struct("<QI")
#: Metadata marker types (size field 0): end of stream, grain table, directory, footer.
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3


def _einval() -> OSError:
    return OSError(errno.EINVAL, "Invalid argument")


def _inflate(data: bytes, grain: int) -> bytes:
    """The grain's bytes; at most ``grain`` of them, and the stream must end."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, grain)
    except zlib.error:
        raise _einval() from None
    if not d.eof:
        raise _einval()
    return out


def _deflate(data: bytes | bytearray | memoryview) -> bytes:
    return zlib.compress(bytes(data))


async def read_padded(file: ChildLink, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset``; past the end of the file they read as zeroes."""
    end = file.length()
    n = max(0, min(length, end - offset))
    data = bytes(await file.read(offset, n)) if n else b""
    return data + bytes(length - n)


async def read_grain(file: ChildLink, host: int, grain: int, has_marker: bool) -> bytes:
    """The decompressed grain stored at ``host`` (at most ``grain`` bytes)."""
    buf = await read_padded(file, host, 2 * grain)
    if has_marker:
        size = GRAIN_MARKER.unpack_from(buf)[1]
        data = buf[GRAIN_MARKER.size:GRAIN_MARKER.size + size]
    else:
        size, data = grain, buf[:grain]
    if not size or size > 2 * grain:
        raise _einval()
    return await asyncio.to_thread(_inflate, data, grain)


async def compress_grain(data: bytes | bytearray | memoryview) -> bytes:
    """The zlib stream of one grain (what follows its marker)."""
    return await asyncio.to_thread(_deflate, data)


def footer_header(raw: bytes) -> bytes | None:
    """The header copy inside a stream's footer (1536 bytes: footer marker, header,
    end-of-stream marker), or None when they are not what they must be."""
    val, size, kind = struct.unpack_from("<QII", raw, 0)
    eos_val, eos_size, eos_kind = struct.unpack_from("<QII", raw, 1024)
    if raw[512:516] != b"KDMV" or size != 0 or kind != MARKER_FOOTER \
            or eos_val != 0 or eos_size != 0 or eos_kind != MARKER_EOS:
        return None
    return raw[512:1024]
