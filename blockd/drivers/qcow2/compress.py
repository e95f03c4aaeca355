"""Compressed clusters: raw deflate (zlib) or zstd, always in a worker thread.

Compression and decompression release the GIL, so threads let several
clusters be (de)compressed at once while the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import zlib

from blockd.drivers.qcow2.header import COMPRESSION_ZSTD


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise OSError(95, "zstd compression is not available (install the 'zstandard' package)") \
            from None
    return zstandard


def _inflate(data: bytes, out_size: int, kind: int) -> bytes:
    """One cluster from its compressed bytes; never more than ``out_size`` is produced.

    Whatever an image holds here, a bad stream is an I/O error of the
    read, as in QEMU, and never an exception of the decompressor's own.
    """
    try:
        if kind == COMPRESSION_ZSTD:
            reader = _zstd().ZstdDecompressor().stream_reader(data, read_across_frames=True)
            out = reader.read(out_size)
        else:
            out = zlib.decompressobj(-12).decompress(data, out_size)
    except OSError:
        raise
    except Exception:
        raise OSError(5, "Compressed cluster is corrupt") from None
    if len(out) != out_size:
        raise OSError(5, "Compressed cluster is corrupt")
    return out


def _deflate(data: bytes, kind: int) -> bytes:
    if kind == COMPRESSION_ZSTD:
        return _zstd().ZstdCompressor().compress(data)
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
    return c.compress(data) + c.flush()


async def decompress(data: bytes, out_size: int, kind: int) -> bytes:
    return await asyncio.to_thread(_inflate, data, out_size, kind)


async def compress(data: bytes, kind: int) -> bytes:
    return await asyncio.to_thread(_deflate, data, kind)
