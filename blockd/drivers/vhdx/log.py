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

from blockd.block.node import ChildLink
from blockd.drivers.vhdx.layout import MiB, SectorCrc, crc_register, set_checksum

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
    """Reads log sectors from the file (past its end they read as zeroes), and their
    CRC registers, each computed once."""

    def __init__(self, file: ChildLink) -> None:
        self.file = file
        self._regs: dict[int, int] = {}

    async def sector(self, pos: Position, idx: int) -> bytes:
        off = pos.offset + idx
        end = self.file.length()
        if off >= end:
            return bytes(SECTOR)
        data = bytes(await self.file.read(off, min(SECTOR, end - off)))
        return data.ljust(SECTOR, b"\0")

    async def register(self, pos: Position, idx: int) -> int:
        reg = self._regs.get(idx)
        if reg is None:
            if pos.offset + idx >= self.file.length():
                reg = _crc().zero
            else:
                reg = crc_register(0, await self.sector(pos, idx))
            self._regs[idx] = reg
        return reg

    def advance(self, pos: Position) -> bool:
        """Move ``pos.read`` on a sector; False (not moved) where the writer is."""
        if pos.read == pos.write:
            return False
        pos.read = pos.next(pos.read)
        return True


_CRC: list[SectorCrc] = []


def _crc() -> SectorCrc:
    if not _CRC:
        _CRC.append(SectorCrc())
    return _CRC[0]


def _header_ok(pos: Position, raw: bytes, log_guid: bytes) -> tuple | None:
    hdr = _ENTRY.unpack_from(raw)
    sig, _, length, _, seq, count, _, guid, _, _ = hdr
    if sig != b"loge" or pos.length < length or length % SECTOR or seq == 0:
        return None
    if guid != log_guid or count * _DESC.size > length:
        return None
    return hdr


async def _peek(reader: LogReader, pos: Position) -> bytes:
    if pos.read == pos.write:
        raise _EINVAL
    return await reader.sector(pos, pos.read)


async def _read_descriptors(reader: LogReader, pos: Position,
                            log_guid: bytes) -> tuple[tuple, list[tuple], list[int]]:
    """The entry header at ``pos.read``, its descriptors and the CRC registers of its
    descriptor sectors (checksum field zeroed); ``pos.read`` moves past them.

    An entry whose header is valid but whose descriptors are not makes the
    whole log unusable (EINVAL), as in QEMU.
    """
    raw = await _peek(reader, pos)
    hdr = _header_ok(pos, raw, log_guid)
    if hdr is None:
        raise _EINVAL
    count = hdr[5]
    descs: list[tuple] = []
    regs: list[int] = []
    for k in range(desc_sectors(count)):
        sector = await _peek(reader, pos)
        if k == 0:
            sector = sector[:4] + bytes(4) + sector[8:]
            regs.append(crc_register(0, sector))
        else:
            regs.append(await reader.register(pos, pos.read))
        reader.advance(pos)
        first = 2 if k == 0 else 0
        for i in range(first, min(128, count + 2 - 128 * k)):
            desc = _DESC.unpack_from(sector, 32 * i)
            sig, _, zero_length, file_offset, seq = desc
            if seq != hdr[4] or file_offset % SECTOR:
                raise _EINVAL
            if not (sig == b"desc" or (sig == b"zero" and zero_length % SECTOR == 0)):
                raise _EINVAL
            descs.append(desc)
    return hdr, descs, regs


async def _validate(reader: LogReader, pos: Position, want: int,
                    log_guid: bytes) -> tuple | None:
    """The header of a valid entry at ``pos.read`` (advanced past it), else None
    (advanced one sector if the header is bad, past the entry if its checksum is)."""
    raw = await _peek(reader, pos)
    hdr = _header_ok(pos, raw, log_guid)
    if hdr is None or (want and hdr[4] != want + 1):
        pos.read = pos.next(pos.read)
        return None
    _, _, regs = await _read_descriptors(reader, pos, log_guid)
    for _ in range(hdr[2] // SECTOR - len(regs)):
        if pos.read == pos.write:
            return None
        regs.append(await reader.register(pos, pos.read))
        reader.advance(pos)
    if _crc().combine(regs) != hdr[1]:
        return None
    return hdr


async def search(file: ChildLink, offset: int, length: int, log_guid: bytes) -> Sequence | None:
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


async def replay(file: ChildLink, seq: Sequence, log_guid: bytes,
                 sync: Callable[[], Awaitable[None]]) -> None:
    """Write what the entries of ``seq`` describe to their places in the file.

    A descriptor aimed past the end of the file (and of the file as the entry
    saw it) is refused: logs only rewrite metadata the file holds, and QEMU
    would write zeroes there for as long as a hostile length says.
    """
    reader = LogReader(file)
    pos = seq.pos
    for _ in range(seq.count):
        raw = await _peek(reader, pos)
        if _ENTRY.unpack_from(raw)[8] > file.length():
            # The file is shorter than when the entry was written: truncated.
            raise _EINVAL
        hdr, descs, _ = await _read_descriptors(reader, pos, log_guid)
        limit = max(file.length(), -(-hdr[9] // MiB) * MiB)
        for sig, trailing, leading, file_offset, dseq in descs:
            if sig == b"desc":
                data = await _peek(reader, pos)
                reader.advance(pos)
                high = struct.unpack_from("<I", data, 4)[0]
                low = struct.unpack_from("<I", data, 4092)[0]
                if (high << 32 | low) != dseq:
                    raise _EINVAL
                if file_offset + SECTOR > limit:
                    raise _EINVAL
                sector = struct.pack("<Q", leading) + data[8:4092] + struct.pack("<I", trailing)
                await file.write(file_offset, sector)
                await sync()
            else:
                if file_offset + leading > limit:
                    raise _EINVAL
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
