"""Builders of bochs, cloop and dmg images, which qemu-img cannot create.

Each writes the format's bytes from its documented layout (little-endian
bochs header and catalog; cloop preamble, big-endian offsets and zlib
blocks; dmg data fork, ``mish`` blocks in an XML property list or a
resource fork, and the ``koly`` trailer), so the tests can read them with
qemu-img and with blockd and compare.
"""

from __future__ import annotations

import base64
import bz2
import struct
import zlib
from pathlib import Path

CLOOP_MAGIC = (b"#!/bin/sh\n#V2.0 Format\n"
               b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")


def pattern(size: int, seed: int = 1) -> bytes:
    """Guest bytes with runs of zeroes and of data that compresses and that does not."""
    out = bytearray(size)
    pos = 0
    step = 0
    while pos < size:
        n = min(size - pos, 3000 + (step * 7919) % 70000)
        kind = (step + seed) % 3
        if kind == 1:
            out[pos:pos + n] = bytes([(seed * 31 + step) & 0xFF]) * n
        elif kind == 2:
            out[pos:pos + n] = bytes((i * 2654435761 + seed + step) >> 13 & 0xFF
                                     for i in range(n))
        pos += n
        step += 1
    return bytes(out)


# ---- bochs ---------------------------------------------------------------------------------

def bochs_image(guest: bytes, extent: int = 8192, version: int = 0x00020000,
                bitmap: int = 512, catalog: int | None = None) -> bytes:
    """A growing redolog: extents that are all zero stay unallocated; in the others only
    the sectors holding data get their bitmap bit (the rest must read as zeroes)."""
    assert len(guest) % 512 == 0
    n = -(-len(guest) // extent)
    catalog = n if catalog is None else catalog
    head = bytearray(512)
    head[0:22] = b"Bochs Virtual HD Image"
    head[32:39] = b"Redolog"
    head[48:55] = b"Growing"
    struct.pack_into("<5I", head, 64, version, 512, catalog, bitmap, extent)
    struct.pack_into("<Q", head, 84 if version == 0x00010000 else 88, len(guest))
    entries = [0xFFFFFFFF] * catalog
    bitmap_bytes = -(-bitmap // 512) * 512
    body = bytearray()
    stored = 0
    for i in range(n):
        piece = guest[i * extent:(i + 1) * extent].ljust(extent, b"\0")
        if not any(piece):
            continue
        entries[i] = stored
        stored += 1
        bits = bytearray(bitmap_bytes)
        data = bytearray(extent)
        for s in range(extent // 512):
            sector = piece[s * 512:(s + 1) * 512]
            if any(sector):
                bits[s // 8] |= 1 << (s % 8)
                data[s * 512:(s + 1) * 512] = sector
            else:  # unmarked sectors hold garbage that must not be read
                data[s * 512:(s + 1) * 512] = b"\xee" * 512
        body += bits + data
    return bytes(head) + struct.pack(f"<{catalog}I", *entries) + bytes(body)


# ---- cloop ---------------------------------------------------------------------------------

def cloop_image(guest: bytes, block_size: int = 65536) -> bytes:
    assert len(guest) % block_size == 0
    n = len(guest) // block_size
    blocks = [zlib.compress(guest[i * block_size:(i + 1) * block_size], 6) for i in range(n)]
    head = CLOOP_MAGIC.ljust(128, b"\0") + struct.pack(">II", block_size, n)
    pos = len(head) + 8 * (n + 1)
    offsets = [pos]
    for b in blocks:
        pos += len(b)
        offsets.append(pos)
    return head + struct.pack(f">{n + 1}Q", *offsets) + b"".join(blocks)


# ---- dmg -----------------------------------------------------------------------------------

COPY, ZERO, ZLIB, BZIP2, LZFSE, COMMENT, END = (1, 2, 0x80000005, 0x80000006, 0x80000007,
                                                0x7FFFFFFE, 0xFFFFFFFF)


def _compress(kind: int, data: bytes) -> bytes:
    if kind == ZLIB:
        return zlib.compress(data)
    if kind == BZIP2:
        return bz2.compress(data)
    if kind == COPY:
        return data
    return b""


def mish_block(first_sector: int, chunks: list[tuple[int, int, int, int]],
               data_offset: int = 0) -> bytes:
    """A ``mish`` block: (type, sector, sector count, offset, length) relative chunks."""
    total = max((s + c for _, s, c, _, _ in chunks), default=0)
    head = bytearray(204)
    struct.pack_into(">IIQQQII", head, 0, 0x6D697368, 1, first_sector, total, data_offset,
                     0, len(chunks))
    struct.pack_into(">I", head, 200, len(chunks))
    body = b"".join(struct.pack(">II4Q", kind, 0, s, c, o, ln) for kind, s, c, o, ln in chunks)
    return bytes(head) + body


def dmg_image(guest: bytes, kinds: list[int], chunk_sectors: int = 128,
              resource_fork: bool = False, extra_chunks: list[tuple] = ()) -> bytes:
    """Guest bytes cut into chunks of ``chunk_sectors``, the i-th stored as ``kinds[i %
    len(kinds)]`` (an all-zero chunk always as a zero chunk), in two ``mish`` blocks,
    then a comment and an end chunk as Apple's tools write them."""
    assert len(guest) % 512 == 0
    sectors = len(guest) // 512
    fork = bytearray(b"DATAFORK" * 8)  # the data fork need not start at 0: offsets are
    base = len(fork)                   # relative to DataForkOffset
    blocks = []
    half = (sectors // chunk_sectors // 2) * chunk_sectors or sectors
    for first, last in ((0, half), (half, sectors)):
        if first >= last:
            continue
        chunks = []
        start = len(fork) - base
        for i, s in enumerate(range(first, last, chunk_sectors)):
            n = min(chunk_sectors, last - s)
            data = guest[s * 512:(s + n) * 512]
            kind = ZERO if not any(data) else kinds[(s // chunk_sectors) % len(kinds)]
            packed = _compress(kind, data)
            chunks.append((kind, s - first, n, len(fork) - base - start, len(packed)))
            fork += packed
        chunks.append((COMMENT, last - first, 0, 0, 0))
        chunks += list(extra_chunks)
        chunks.append((END, last - first, 0, len(fork) - base - start, 0))
        blocks.append(mish_block(first, chunks, start))
    koly = bytearray(512)
    struct.pack_into(">4sII", koly, 0, b"koly", 4, 512)
    struct.pack_into(">Q", koly, 0x18, 0)
    struct.pack_into(">Q", koly, 0x20, len(fork))
    struct.pack_into(">Q", koly, 0x1EC, sectors)
    out = bytearray(fork)
    # DataForkOffset is 0 and the chunk offsets count from the fork's start.
    fixed = []
    for b in blocks:
        b = bytearray(b)
        struct.pack_into(">Q", b, 0x18, struct.unpack_from(">Q", b, 0x18)[0] + base)
        fixed.append(bytes(b))
    if resource_fork:
        data = b"".join(struct.pack(">I", len(b)) + b for b in fixed)
        rsrc = struct.pack(">IIII", 256, 256 + len(data), len(data), 0).ljust(256, b"\0") + data
        struct.pack_into(">QQ", koly, 0x28, len(out), len(rsrc))
        out += rsrc
    else:
        items = "".join(f"\t\t\t<dict>\n\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n"
                        f"{_wrapped(b)}\t\t\t\t</data>\n\t\t\t</dict>\n" for b in fixed)
        xml = ('<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0">\n<dict>\n'
               "\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n"
               f"{items}\t\t</array>\n\t</dict>\n</dict>\n</plist>\n").encode()
        struct.pack_into(">QQ", koly, 0xD8, len(out), len(xml))
        out += xml
    return bytes(out + koly)


def _wrapped(block: bytes) -> str:
    text = base64.b64encode(block).decode()
    return "".join(f"\t\t\t\t{text[i:i + 52]}\n" for i in range(0, len(text), 52))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
