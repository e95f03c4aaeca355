"""The VDI header: 512 little-endian bytes, checked as QEMU 7.2 checks them.

The guest is cut into blocks of 1 MiB; the block map (one 32-bit entry a
block, at ``offset_bmap``) gives each block's index among the data blocks
at ``offset_data``, or ``0xFFFFFFFF`` (never written) / ``0xFFFFFFFE``
(discarded), both reading as zeroes.  Only version 1.1 images without
parent or link (no differencing images) and with QEMU's block and sector
sizes open, as in QEMU.
"""

from __future__ import annotations

import dataclasses
import struct

from blockd.errors import QMPError

SIZE = 512
SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
TYPE_DYNAMIC = 1
TYPE_STATIC = 2
BLOCK_SIZE = 1 << 20
#: Entries at or above this are not allocated (0xFFFFFFFE discarded, 0xFFFFFFFF never written).
DISCARDED = 0xFFFFFFFE
UNALLOCATED = 0xFFFFFFFF
#: QEMU's limit: the block map, rounded to whole sectors, must fit in an int.
MAX_BLOCKS = ((1 << 31) - 512) // 4
MAX_DISK_SIZE = MAX_BLOCKS * BLOCK_SIZE
TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"
HEADER_SIZE_FIELD = 0x180

_OFF_SIGNATURE = 64
_OFF_BMAP = 340
_OFF_DISK_SIZE = 368
_OFF_BLOCKS = 384
_OFF_ALLOCATED = 388
_OFF_UUID_LINK = 424


@dataclasses.dataclass
class Header:
    """The fields the driver uses, and the header's bytes, which QEMU writes back whole."""

    raw: bytearray
    image_type: int
    offset_bmap: int
    offset_data: int
    disk_size: int
    blocks_in_image: int
    blocks_allocated: int

    def encode(self) -> bytes:
        """The header as QEMU rewrites it after allocating: its own bytes with the current
        count of allocated blocks and the (sector-rounded) disk size."""
        struct.pack_into("<Q", self.raw, _OFF_DISK_SIZE, self.disk_size)
        struct.pack_into("<I", self.raw, _OFF_ALLOCATED, self.blocks_allocated)
        return bytes(self.raw)


def parse(buf: bytes) -> Header:
    (signature, version, _, image_type, _) = struct.unpack_from("<5I", buf, _OFF_SIGNATURE)
    (offset_bmap, offset_data, _, _, _, sector_size, _, disk_size, block_size, _,
     blocks, allocated) = struct.unpack_from("<7IQ4I", buf, _OFF_BMAP)
    link, parent = buf[_OFF_UUID_LINK:_OFF_UUID_LINK + 16], buf[_OFF_UUID_LINK + 16:456]
    if disk_size > MAX_DISK_SIZE:
        raise QMPError(f"Unsupported VDI image size (size is 0x{disk_size:x}, max supported is "
                       f"0x{MAX_DISK_SIZE:x})")
    # VBoxManage convertfromraw makes images of any size; QEMU rounds up to a sector.
    disk_size = -(-disk_size // 512) * 512
    if signature != SIGNATURE:
        raise QMPError(f"Image not in VDI format (bad signature {signature:08x})")
    if version != VERSION_1_1:
        raise QMPError(f"unsupported VDI image (version {version >> 16}.{version & 0xFFFF})")
    if offset_bmap % 512:
        raise QMPError(f"unsupported VDI image (unaligned block map offset 0x{offset_bmap:x})")
    if offset_data % 512:
        raise QMPError(f"unsupported VDI image (unaligned data offset 0x{offset_data:x})")
    if sector_size != 512:
        raise QMPError(f"unsupported VDI image (sector size {sector_size} is not 512)")
    if block_size != BLOCK_SIZE:
        raise QMPError(f"unsupported VDI image (block size {block_size} is not {BLOCK_SIZE})")
    if disk_size > blocks * block_size:
        raise QMPError(f"unsupported VDI image (disk size {disk_size}, image bitmap has room "
                       f"for {blocks * block_size})")
    if any(link):
        raise QMPError("unsupported VDI image (non-NULL link UUID)")
    if any(parent):
        raise QMPError("unsupported VDI image (non-NULL parent UUID)")
    if blocks > MAX_BLOCKS:
        raise QMPError(f"unsupported VDI image (too many blocks {blocks}, max is {MAX_BLOCKS})")
    return Header(bytearray(buf[:SIZE]), image_type, offset_bmap, offset_data, disk_size,
                  blocks, allocated)


def build(size: int, static: bool, uuid_image: bytes, uuid_snap: bytes) -> bytes:
    """A new header as QEMU writes it: block map right after the header, data after the map.

    The UUIDs are stored as VirtualBox does, first three fields little-endian.
    """
    blocks = -(-size // BLOCK_SIZE)
    bmap_size = -(-blocks * 4 // 512) * 512
    buf = bytearray(SIZE)
    buf[:len(TEXT)] = TEXT
    struct.pack_into("<5I", buf, _OFF_SIGNATURE, SIGNATURE, VERSION_1_1, HEADER_SIZE_FIELD,
                     TYPE_STATIC if static else TYPE_DYNAMIC, 0)
    struct.pack_into("<7IQ4I", buf, _OFF_BMAP, 512, 512 + bmap_size, 0, 0, 0, 512, 0, size,
                     BLOCK_SIZE, 0, blocks, blocks if static else 0)
    buf[392:408] = _vbox_uuid(uuid_image)
    buf[408:424] = _vbox_uuid(uuid_snap)
    return bytes(buf)


def _vbox_uuid(uuid: bytes) -> bytes:
    return uuid[3::-1] + uuid[5:3:-1] + uuid[7:5:-1] + uuid[8:]
