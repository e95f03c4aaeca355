"""The fixed structures of a VHDX file, as the VHDX 1.0 specification lays them out.

The first MiB holds the file identifier (``vhdxfile`` and a UTF-16 creator),
two 4 KiB headers (the valid one with the higher sequence number is
current), and two copies of the 64 KiB region table that locates the BAT
and the metadata region.  Everything is little-endian; GUIDs are stored in
Microsoft's mixed-endian form; checksums are CRC-32C over the whole
structure with the checksum field zeroed.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
from typing import Callable

from blockd.errors import QMPError

KiB, MiB = 1 << 10, 1 << 20
SIGNATURE = b"vhdxfile"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
HEADER_SECTION_END = 1 * MiB
METADATA_TABLE_SIZE = 64 * KiB
BLOCK_SIZE_MIN, BLOCK_SIZE_MAX = 1 * MiB, 256 * MiB
MAX_IMAGE_SIZE = 64 << 40
#: Sectors a sector bitmap block covers: the chunk ratio is this many logical sectors a block.
MAX_SECTORS_PER_BLOCK = 1 << 23
DEFAULT_LOG_SIZE = 1 * MiB
#: QEMU's largest single request: the BAT is read and written in one.
MAX_REQUEST = (1 << 31) - 512

# BAT entry states (the low three bits); the file offset is in the bits from 20 up.
NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, UNMAPPED_V095 = 0, 1, 2, 3, 5
FULLY_PRESENT, PARTIALLY_PRESENT = 6, 7
STATE_MASK = 0x7
OFFSET_MASK = 0xFFFFFFFFFFF00000

# File parameter bits.
LEAVE_BLOCKS_ALLOCATED, HAS_PARENT = 0x1, 0x2
# Metadata entry bits.
META_IS_USER, META_IS_VIRTUAL_DISK, META_IS_REQUIRED = 0x1, 0x2, 0x4
REGION_REQUIRED = 0x1


def guid(text: str) -> bytes:
    """A GUID as stored on disk (first three fields little-endian)."""
    return uuid.UUID(text).bytes_le


BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83 = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
ZERO_GUID = bytes(16)


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc_register(reg: int, data: bytes | bytearray | memoryview) -> int:
    """The CRC-32C register after ``data`` (no inversions): table-driven in Python, as
    the structures it covers are a few KiB to 64 KiB."""
    table = _TABLE
    for b in bytes(data):
        reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli), as VHDX checksums use it."""
    return crc_register(0xFFFFFFFF, data) ^ 0xFFFFFFFF


class SectorCrc:
    """CRC-32C over runs of 4 KiB sectors from each sector's own register value.

    The register is linear: after a sector S it is ``shift(before) ^ reg(0, S)``,
    where ``shift`` advances it through 4 KiB of zeroes.  So a log entry's
    checksum costs one pass over each sector however many candidate entries
    share it, and a sector of zeroes costs nothing: a hostile log cannot make
    the search slow.
    """

    SIZE = 4096

    def __init__(self) -> None:
        basis = [crc_register(1 << bit, bytes(self.SIZE)) for bit in range(32)]
        self._tables = []
        for k in range(4):
            table = []
            for b in range(256):
                v = 0
                for bit in range(8):
                    if b >> bit & 1:
                        v ^= basis[8 * k + bit]
                table.append(v)
            self._tables.append(table)
        self.zero = crc_register(0, bytes(self.SIZE))

    def shift(self, reg: int) -> int:
        t = self._tables
        return (t[0][reg & 0xFF] ^ t[1][reg >> 8 & 0xFF] ^ t[2][reg >> 16 & 0xFF]
                ^ t[3][reg >> 24])

    def combine(self, sector_regs: list[int]) -> int:
        """The CRC-32C of the sectors whose ``reg(0, sector)`` values are given."""
        reg = 0xFFFFFFFF
        for value in sector_regs:
            reg = self.shift(reg) ^ value
        return reg ^ 0xFFFFFFFF


def checksum_ok(buf: bytes | bytearray, offset: int = 4) -> bool:
    stored = struct.unpack_from("<I", buf, offset)[0]
    work = bytearray(buf)
    work[offset:offset + 4] = bytes(4)
    return crc32c(work) == stored


def set_checksum(buf: bytearray, offset: int = 4) -> None:
    buf[offset:offset + 4] = bytes(4)
    struct.pack_into("<I", buf, offset, crc32c(buf))


# ---- headers ----------------------------------------------------------------

# signature, checksum, sequence, file_write_guid, data_write_guid, log_guid,
# log_version, version, log_length, log_offset
_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")


@dataclasses.dataclass
class Header:
    sequence: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int

    def packed(self) -> bytes:
        return _HEADER.pack(b"head", 0, self.sequence, self.file_write_guid,
                            self.data_write_guid, self.log_guid, self.log_version, self.version,
                            self.log_length, self.log_offset)


def parse_header(buf: bytes) -> Header | None:
    """The header in a 4 KiB slot, None unless its checksum, signature and version are valid."""
    if not checksum_ok(buf):
        return None
    sig, _, seq, fwg, dwg, lg, lver, ver, llen, loff = _HEADER.unpack_from(buf)
    if sig != b"head" or ver != 1:
        return None
    return Header(seq, fwg, dwg, lg, lver, ver, llen, loff)


def header_slot(header: Header, slot: bytes) -> bytes:
    """The header's bytes as they go into a slot holding ``slot``: the checksum covers the
    whole 4 KiB, whose reserved part is kept as found."""
    buf = bytearray(slot)
    buf[:_HEADER.size] = header.packed()
    set_checksum(buf)
    return bytes(buf[:_HEADER.size])


def pick_header(h1: Header | None, h2: Header | None) -> int:
    """Index of the current header: the valid one, or the higher sequence number."""
    if h1 is None and h2 is None:
        raise QMPError("No valid VHDX header found")
    if h2 is None:
        return 0
    if h1 is None:
        return 1
    if h1.sequence != h2.sequence:
        return 0 if h1.sequence > h2.sequence else 1
    # Two identical headers (Disk2VHD writes them) are fine; two different ones are not.
    if h1 == h2:
        return 0
    raise QMPError("No valid VHDX header found")


# ---- region table -----------------------------------------------------------

@dataclasses.dataclass
class Region:
    offset: int
    length: int


def parse_region_table(buf: bytes,
                       register: Callable[[int, int], bool]) -> tuple[Region, Region]:
    """(BAT, metadata); an unusable table raises EINVAL (ENOTSUP for a required region we
    do not know), as QEMU refuses it.  Each region goes to ``register`` as (start, end)
    first, which says whether it overlaps one known before."""
    if not checksum_ok(buf):
        raise OSError(22, "Invalid argument")
    sig, _, count, _ = struct.unpack_from("<4sIII", buf)
    if sig != b"regi" or count > 2047:
        raise OSError(22, "Invalid argument")
    bat = meta = None
    for i in range(count):
        gid, off, length, bits = struct.unpack_from("<16sQII", buf, 16 + 32 * i)
        if register(off, off + length):
            raise OSError(22, "Invalid argument")
        if gid == BAT_GUID:
            if bat is not None:
                raise OSError(22, "Invalid argument")
            bat = Region(off, length)
        elif gid == METADATA_GUID:
            if meta is not None:
                raise OSError(22, "Invalid argument")
            meta = Region(off, length)
        elif bits & REGION_REQUIRED:
            raise OSError(95, "Operation not supported")
    if bat is None or meta is None:
        raise OSError(22, "Invalid argument")
    return bat, meta


def build_region_table(bat: Region, meta: Region) -> bytes:
    buf = bytearray(REGION_TABLE_SIZE)
    struct.pack_into("<4sIII", buf, 0, b"regi", 0, 2, 0)
    struct.pack_into("<16sQII", buf, 16, BAT_GUID, bat.offset, bat.length, 0)
    struct.pack_into("<16sQII", buf, 48, METADATA_GUID, meta.offset, meta.length, 0)
    set_checksum(buf)
    return bytes(buf)


# ---- metadata ----------------------------------------------------------------

_KNOWN_ITEMS = (FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE83, LOGICAL_SECTOR_SIZE,
                PHYSICAL_SECTOR_SIZE, PARENT_LOCATOR)
_REQUIRED_ITEMS = _KNOWN_ITEMS[:5]


def parse_metadata_table(buf: bytes) -> dict[bytes, int]:
    """Offsets (within the region) of the metadata items, checked as QEMU checks them."""
    sig, _, count = struct.unpack_from("<8sHH", buf)
    if sig != b"metadata" or 32 + count * 32 > METADATA_TABLE_SIZE:
        raise OSError(22, "Invalid argument")
    items: dict[bytes, int] = {}
    for i in range(count):
        item, off, _, bits = struct.unpack_from("<16sIII", buf, 32 + 32 * i)
        if item in _KNOWN_ITEMS:
            if item in items:
                raise OSError(22, "Invalid argument")
            items[item] = off
        elif bits & META_IS_REQUIRED:
            raise OSError(95, "Operation not supported")
    if any(item not in items for item in _REQUIRED_ITEMS):
        raise OSError(95, "Operation not supported")
    return items


def build_metadata(size: int, block_size: int, sector_size: int, fixed: bool,
                   page83: bytes) -> tuple[bytes, bytes]:
    """(table, items) of a new image: five items packed from 64 KiB into the region."""
    items = struct.pack("<II", block_size, LEAVE_BLOCKS_ALLOCATED if fixed else 0)
    items += struct.pack("<Q", size) + page83 + struct.pack("<II", sector_size, sector_size)
    table = bytearray(METADATA_TABLE_SIZE)
    struct.pack_into("<8sHH", table, 0, b"metadata", 0, 5)
    layout = ((FILE_PARAMETERS, 8, META_IS_REQUIRED),
              (VIRTUAL_DISK_SIZE, 8, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
              (PAGE83, 16, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
              (LOGICAL_SECTOR_SIZE, 4, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
              (PHYSICAL_SECTOR_SIZE, 4, META_IS_REQUIRED | META_IS_VIRTUAL_DISK))
    off = METADATA_TABLE_SIZE
    for i, (item, length, bits) in enumerate(layout):
        struct.pack_into("<16sIII", table, 32 + 32 * i, item, off, length, bits)
        off += length
    return bytes(table), items


# ---- the BAT -----------------------------------------------------------------

def chunk_ratio(block_size: int, sector_size: int) -> int:
    """Payload blocks per sector bitmap block: BAT entries come in runs of this many,
    each run followed by one sector bitmap entry."""
    return MAX_SECTORS_PER_BLOCK * sector_size // block_size


def bat_entries(size: int, block_size: int, sector_size: int) -> int:
    """Entries of a BAT for a disk without parent: its payload entries and the sector
    bitmap entries between their runs (none after the last)."""
    blocks = -(-size // block_size)
    # QEMU counts in 32 bits: an empty disk's "blocks - 1" wraps, and its BAT is large.
    return blocks + ((blocks - 1) & 0xFFFFFFFF) // chunk_ratio(block_size, sector_size)


def bat_index(block: int, ratio: int) -> int:
    """The BAT entry of payload block ``block``, past the interleaved bitmap entries."""
    return block + block // ratio
