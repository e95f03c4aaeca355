"""The QED header: 64 little-endian bytes at the start of the first cluster.

Layout: magic ``QED\\0``, cluster size, table size (clusters per L1 or L2
table), header size (clusters), feature bits (backing file, need check,
raw backing file), compatible and auto-clear feature bits, L1 table
offset, guest size, and the backing file name's offset and length in the
header cluster(s).  The checks and their messages are QEMU 7.2's.
"""

from __future__ import annotations

import dataclasses
import struct

from blockd.errors import QMPError

MAGIC = 0x00444551  # "QED\0"
F_BACKING_FILE = 0x01
F_NEED_CHECK = 0x02
F_BACKING_FORMAT_NO_PROBE = 0x04
FEATURE_MASK = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE
MIN_CLUSTER_SIZE = 4 * 1024
MAX_CLUSTER_SIZE = 64 * 1024 * 1024
DEFAULT_CLUSTER_SIZE = 64 * 1024
MIN_TABLE_SIZE = 1
MAX_TABLE_SIZE = 16
DEFAULT_TABLE_SIZE = 4
#: An L2 entry of 1 is a cluster that reads as zeroes (0 is unallocated).
ZERO_CLUSTER = 1
#: QEMU reads a backing file name into a buffer of this size, NUL included.
MAX_BACKING_NAME = 4096

_LAYOUT = struct.Struct("<4I3Q2Q2I")
SIZE = _LAYOUT.size


@dataclasses.dataclass
class Header:
    magic: int
    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int
    backing_filename_size: int

    def encode(self) -> bytes:
        return _LAYOUT.pack(*dataclasses.astuple(self))

    @property
    def table_bytes(self) -> int:
        return self.cluster_size * self.table_size

    @property
    def table_entries(self) -> int:
        return self.table_bytes // 8


def parse(buf: bytes) -> Header:
    return Header(*_LAYOUT.unpack_from(buf.ljust(SIZE, b"\0")))


def max_image_size(cluster_size: int, table_size: int) -> int:
    """QEMU's limit, computed in its integer widths: it wraps to 0 for the largest tables
    (64 MiB clusters, 16 a table), so no image of that shape can be made or opened."""
    entries = (table_size * cluster_size & 0xFFFFFFFF) // 8
    return entries * cluster_size * entries & 0xFFFFFFFFFFFFFFFF


def cluster_size_valid(cluster_size: int) -> bool:
    return MIN_CLUSTER_SIZE <= cluster_size <= MAX_CLUSTER_SIZE and \
        not cluster_size & (cluster_size - 1)


def table_size_valid(table_size: int) -> bool:
    return MIN_TABLE_SIZE <= table_size <= MAX_TABLE_SIZE and not table_size & (table_size - 1)


def image_size_valid(size: int, cluster_size: int, table_size: int) -> bool:
    return size % 512 == 0 and size <= max_image_size(cluster_size, table_size)


class Layout:
    """Where things may be in an image of a given header and file length (QEMU's
    ``qed_check_cluster_offset`` and ``qed_check_table_offset``)."""

    def __init__(self, h: Header, file_size: int) -> None:
        self.h = h
        #: The file's length rounded down to whole clusters; new clusters go here.
        self.file_size = file_size

    def cluster_ok(self, offset: int) -> bool:
        cs = self.h.cluster_size
        return not offset & (cs - 1) and self.h.header_size * cs <= offset < self.file_size

    def table_ok(self, offset: int) -> bool:
        # QEMU's overflow test also refuses every table of one cluster.
        end = offset + (self.h.table_size - 1) * self.h.cluster_size
        if end <= offset or end >= 1 << 64:
            return False
        return self.cluster_ok(offset) and self.cluster_ok(end)


def check_open(h: Header, file_length: int) -> Layout:
    """QEMU's checks at open, in its order and with its messages."""
    if h.magic != MAGIC:
        raise QMPError("Image not in QED format")
    if h.features & ~FEATURE_MASK:
        raise QMPError(f"Unsupported QED features: {h.features & ~FEATURE_MASK:x}")
    if not cluster_size_valid(h.cluster_size):
        raise QMPError("QED cluster size is invalid")
    layout = Layout(h, file_length & ~(h.cluster_size - 1))
    if not table_size_valid(h.table_size):
        raise QMPError("QED table size is invalid")
    if not image_size_valid(h.image_size, h.cluster_size, h.table_size):
        raise QMPError("QED image size is invalid")
    if not layout.table_ok(h.l1_table_offset):
        raise QMPError("QED table offset is invalid")
    if h.header_size > 0xFFFFFFFF // h.cluster_size:
        raise QMPError("QED header size is too large")
    if h.features & F_BACKING_FILE:
        if h.backing_filename_offset + h.backing_filename_size > \
                h.cluster_size * h.header_size:
            raise QMPError("QED backing filename offset is invalid")
        if h.backing_filename_size >= MAX_BACKING_NAME:
            raise QMPError("Failed to read backing filename")
    return layout


def build(cluster_size: int, table_size: int, size: int, backing: str | None,
          backing_raw: bool) -> bytes:
    """A new header as QEMU writes it, the backing file name right after it."""
    features = 0
    name = (backing or "").encode()
    if backing is not None:
        features |= F_BACKING_FILE
        if backing_raw:
            features |= F_BACKING_FORMAT_NO_PROBE
    h = Header(MAGIC, cluster_size, table_size, 1, features, 0, 0, cluster_size, size,
               SIZE if backing is not None else 0, len(name))
    return h.encode() + name
