"""The VHDX metadata log: finding and replaying an active sequence, writing entries.

The log is a circular buffer of 4 KiB sectors.  An entry is a header
sector (64-byte header, then 32-byte descriptors), more descriptor sectors
if needed, then one data sector per data descriptor; a CRC-32C covers the
whole entry.  A data descriptor carries the first 8 and last 4 bytes of
its 4 KiB, the data sector the 4084 between.  The active sequence is the
longest chain of valid entries with consecutive sequence numbers whose
log GUID is the current header's; it is found and replayed as QEMU 7.2
does (including its quirks: the second entry of a chain is taken whatever
its sequence number), so that blockd replays exactly what qemu-img would.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Awaitable, Callable

from blockd.block.node import BlockNode
from blockd.drivers.vhdx.layout import MiB, crc32c, set_checksum

SECTOR = 4096
# signature, checksum, entry_length, tail, sequence, descriptor_count, reserved,
# log_guid, flushed_file_offset, last_file_offset
_ENTRY = struct.Struct("<4sIIIQII16sQQ")
# signature, trailing/reserved, leading/zero_length, file_offset, sequence
_DESC = struct.Struct("<4sIQQQ")

_EINVAL = OSError(22, "Invalid argument")


@dataclasses.dataclass
class Position:
    """Where the log is and where its readers and writers are, in bytes from its start."""

    offset: int
    length: int
    read: int = 0
    write: int = 0
    sequence: int = 0
    tail: int = 0

    def next(self, idx: int) -> int:
        idx += SECTOR
        return 0 if idx >= self.length else idx


@dataclasses.dataclass
class Sequence:
    """An active run of entries: where it starts and ends, and how many there are."""

    pos: Position
    count: int
    first_sequence: int


def desc_sectors(count: int) -> int:
    """Sectors holding the header and ``count`` descriptors (126 in the first, 128 after)."""
    return -(-(count + 2) // 128)


class LogReader:
    """Reads log sectors from the file; sectors past its end read as zeroes."""

    def __init__(self, file: BlockNode) -> None:
        self.file = file

    async def sector(self, pos: Position, idx: int) -> bytes:
        off = pos.offset + idx
        end = self.file.length()
        if off >= end:
            return bytes(SECTOR)
        data = bytes(await self.file.read(off, min(SECTOR, end - off)))
        return data.ljust(SECTOR, b"\0")

    async def sectors(self, pos: Position, count: int) -> tuple[list[bytes], bool]:
        """``count`` sectors from ``pos.read`` on, advancing it; whether all were there
        (reading stops where the writer is)."""
        out = []
        while count:
            if pos.read == pos.write:
                return out, False
            out.append(await self.sector(pos, pos.read))
            pos.read = pos.next(pos.read)
            count -= 1
        return out, True


def _header_ok(pos: Position, raw: bytes, log_guid: bytes) -> tuple | None:
    hdr = _ENTRY.unpack_from(raw)
    sig, _, length, _, seq, count, _, guid, _, _ = hdr
    if sig != b"loge" or pos.length < length or length % SECTOR or seq == 0:
        return None
    if guid != log_guid or count * _DESC.size > length:
        return None
    return hdr


async def _read_descriptors(reader: LogReader, pos: Position,
                            log_guid: bytes) -> tuple[tuple, bytes]:
    """The entry header and its descriptor sectors at ``pos.read`` (advanced past them).

    An entry whose header is valid but whose descriptors are not makes the
    whole log unusable (EINVAL), as in QEMU.
    """
    raw = await _peek(reader, pos)
    hdr = _header_ok(pos, raw, log_guid)
    if hdr is None:
        raise _EINVAL
    n = desc_sectors(hdr[5])
    secs, complete = await reader.sectors(pos, n)
    if not complete:
        raise _EINVAL
    buf = b"".join(secs)
    for i in range(hdr[5]):
        sig, _, zero_length, file_offset, seq = _DESC.unpack_from(buf, 64 + 32 * i)
        if seq != hdr[4] or file_offset % SECTOR:
            raise _EINVAL
        if not (sig == b"desc" or (sig == b"zero" and zero_length % SECTOR == 0)):
            raise _EINVAL
    return hdr, buf


async def _peek(reader: LogReader, pos: Position) -> bytes:
    if pos.read == pos.write:
        raise _EINVAL
    return await reader.sector(pos, pos.read)


async def _validate(reader: LogReader, pos: Position, want: int,
                    log_guid: bytes) -> tuple | None:
    """The header of a valid entry at ``pos.read`` (advanced past it), else None
    (advanced one sector if the header is bad, past the entry if its checksum is)."""
    raw = await _peek(reader, pos)
    hdr = _header_ok(pos, raw, log_guid)
    if hdr is None or (want and hdr[4] != want + 1):
        pos.read = pos.next(pos.read)
        return None
    _, buf = await _read_descriptors(reader, pos, log_guid)
    rest = hdr[2] // SECTOR - desc_sectors(hdr[5])
    data, complete = await reader.sectors(pos, max(rest, 0))
    if not complete:
        return None
    body = bytearray(buf)
    body[4:8] = bytes(4)
    if crc32c(bytes(body) + b"".join(data)) != hdr[1]:
        return None
    return hdr


async def search(file: BlockNode, offset: int, length: int, log_guid: bytes) -> Sequence | None:
    """The active sequence of the log, None if there is none."""
    reader = LogReader(file)
    scan = Position(offset, length, read=0, write=length)
    best: Sequence | None = None
    # Every pass moves on at least a sector and the scan ends once it wraps;
    # the bound only guards against a log crafted to go round forever.
    for _ in range(4 * (length // SECTOR) + 4):
        tail = scan.read
        hdr = await _validate(reader, scan, 0, log_guid)
        if hdr is not None:
            cur = Sequence(dataclasses.replace(scan, read=tail, write=scan.read), 1, hdr[4])
            seq = 0
            for _ in range(length // SECTOR + 1):
                nxt = await _validate(reader, scan, seq, log_guid)
                if nxt is None:
                    break
                cur.pos.write = scan.read
                cur.count += 1
                seq = nxt[4]
            if best is None or cur.first_sequence > best.first_sequence:
                best = cur
        if scan.read < tail:
            return best
    raise _EINVAL


async def replay(file: BlockNode, seq: Sequence, log_guid: bytes,
                 sync: Callable[[], Awaitable[None]]) -> None:
    """Write what the entries of ``seq`` describe to their places in the file."""
    reader = LogReader(file)
    pos = seq.pos
    for _ in range(seq.count):
        raw = await _peek(reader, pos)
        if _ENTRY.unpack_from(raw)[8] > file.length():
            # The file is shorter than when the entry was written: truncated.
            raise _EINVAL
        hdr, buf = await _read_descriptors(reader, pos, log_guid)
        for i in range(hdr[5]):
            sig, trailing, leading, file_offset, dseq = _DESC.unpack_from(buf, 64 + 32 * i)
            if sig == b"desc":
                secs, complete = await reader.sectors(pos, 1)
                if not complete:
                    raise _EINVAL
                data = secs[0]
                high, low = struct.unpack_from("<I", data, 4)[0], struct.unpack_from(
                    "<I", data, 4092)[0]
                if (high << 32 | low) != dseq:
                    raise _EINVAL
                sector = struct.pack("<Q", leading) + data[8:4092] + struct.pack("<I", trailing)
                await file.write(file_offset, sector)
                await sync()
            else:
                for k in range(leading // SECTOR):
                    await file.write(file_offset + k * SECTOR, bytes(SECTOR))
                    await sync()
        last = hdr[9]
        if file.length() < last and last % MiB:
            await file.truncate(-(-last // MiB) * MiB)


def build_entry(pos: Position, log_guid: bytes, file_offset: int, sector: bytes,
                file_length: int) -> bytes:
    """A log entry writing one 4 KiB ``sector`` at ``file_offset``: QEMU's shape for a
    BAT update (header and one data descriptor in the first sector, the data after)."""
    seq = pos.sequence
    buf = bytearray(2 * SECTOR)
    _ENTRY.pack_into(buf, 0, b"loge", 0, 2 * SECTOR, pos.tail, seq, 1, 0, log_guid,
                     file_length, file_length)
    leading = struct.unpack_from("<Q", sector)[0]
    trailing = struct.unpack_from("<I", sector, 4092)[0]
    _DESC.pack_into(buf, 64, b"desc", trailing, leading, file_offset, seq)
    struct.pack_into("<4sI", buf, SECTOR, b"data", seq >> 32)
    buf[SECTOR + 8:SECTOR + 4092] = sector[8:4092]
    struct.pack_into("<I", buf, 2 * SECTOR - 4, seq & 0xFFFFFFFF)
    set_checksum(buf)
    return bytes(buf)
