"""The Parallels header: 64 little-endian bytes, then the BAT, checked as QEMU 7.2 checks them.

The guest is cut into clusters of ``tracks`` sectors; BAT entry ``i``
(one 32-bit word a cluster, right after the header) says where cluster
``i`` is stored, 0 meaning not allocated (it reads as zeroes).  An image
with the old signature ``WithoutFreeSpace`` counts entries in sectors and
its size in 32 bits; ``WithouFreSpacExt`` counts entries in clusters and
its size in 64 bits.  ``inuse`` holds a magic while a writer has the image
open: an image left so was not closed cleanly.
"""

from __future__ import annotations

import dataclasses
import struct

from blockd.errors import QMPError

SIZE = 64
MAGIC = b"WithoutFreeSpace"
MAGIC_EXT = b"WithouFreSpacExt"
VERSION = 2
INUSE_MAGIC = 0x746F6E59
HEADS = 16
SECTORS_PER_CYLINDER = 32
DEFAULT_CLUSTER_SIZE = 1 << 20
#: QEMU's bound on a new image: at most 2^32 clusters.
MAX_IMAGE_FACTOR = 1 << 32
#: QEMU's limits on an image it opens.
MAX_TRACKS = 0x7FFFFFFF // 513
MAX_BAT_ENTRIES = 0x7FFFFFFF // 4

# magic, version, heads, cylinders, tracks, bat_entries, nb_sectors, inuse, data_off,
# flags, ext_off
_LAYOUT = struct.Struct("<16s5IQ3IQ")
_OFF_INUSE = 44


@dataclasses.dataclass
class Header:
    """The fields the driver uses (the header's bytes stay with the BAT, in the driver)."""

    tracks: int
    bat_entries: int
    total_sectors: int
    off_multiplier: int
    data_off: int
    inuse: bool
    ext_off: int

    @property
    def cluster_size(self) -> int:
        return self.tracks * 512


def bat_offset(index: int) -> int:
    """Where BAT entry ``index`` is in the file."""
    return SIZE + 4 * index


def _u32(value: int) -> int:
    return value & 0xFFFFFFFF


def parse(buf: bytes) -> Header:
    """The header's fields, checked in QEMU's order and refused with its messages."""
    buf = buf[:SIZE].ljust(SIZE, b"\0")  # QEMU reads past the end of the file as zeroes
    (magic, version, _, _, tracks, entries, sectors, inuse, data_off, _,
     ext_off) = _LAYOUT.unpack(buf)
    if version != VERSION or magic not in (MAGIC, MAGIC_EXT):
        raise QMPError("Image not in Parallels format")
    if magic == MAGIC:
        multiplier, sectors = 1, sectors & 0xFFFFFFFF
    else:
        multiplier = tracks
    if tracks == 0:
        raise QMPError("Invalid image: Zero sectors per track")
    if tracks > MAX_TRACKS:
        raise QMPError("Invalid image: Too big cluster")
    if entries > MAX_BAT_ENTRIES:
        raise QMPError("Catalog too large")
    return Header(tracks, entries, sectors, multiplier, data_off, inuse == INUSE_MAGIC,
                  ext_off)


def set_inuse(head: bytearray, inuse: bool) -> None:
    """Mark the header bytes ``head`` (header and BAT as kept in memory) in use or not."""
    struct.pack_into("<I", head, _OFF_INUSE, INUSE_MAGIC if inuse else 0)


def build(size: int, cluster_size: int) -> tuple[bytes, int]:
    """A new header as QEMU writes it, and the sectors that header and BAT take (whole
    clusters: the data starts on a cluster boundary).  QEMU's 32-bit fields and sums
    wrap as they do there."""
    entries = _u32(-(-size // cluster_size))
    bat_end = _u32(bat_offset(entries))
    meta_sectors = _u32(-(-bat_end // cluster_size) * cluster_size // 512)
    cylinders = size // 512 // HEADS // SECTORS_PER_CYLINDER & 0xFFFFFFFF
    head = _LAYOUT.pack(MAGIC_EXT, VERSION, HEADS, cylinders,
                        cluster_size // 512, entries, -(-size // 512), 0, meta_sectors, 0, 0)
    return head, meta_sectors
