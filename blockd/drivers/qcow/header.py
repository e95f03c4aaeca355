"""The qcow (version 1) header: 48 big-endian bytes, checked as QEMU 7.2 checks them.

magic ``QFI\\xfb``, version 1, backing file name offset and length,
mtime, guest size, cluster bits, L2 bits (entries per L2 table, as a
power of two), crypt method (0 none, 1 legacy AES) and the L1 table's
offset.  An L1 entry is an L2 table's offset (0: none); an L2 entry is a
data cluster's offset (0: unallocated), or, with bit 63 set, a compressed
cluster: its length in the bits below 63 and above ``63 - cluster_bits``,
its offset in the rest.
"""

from __future__ import annotations

import dataclasses
import struct

from blockd.errors import QMPError

MAGIC = b"QFI\xfb"
VERSION = 1
CRYPT_NONE = 0
CRYPT_AES = 1
COMPRESSED = 1 << 63
#: QEMU keeps the backing file name in a buffer of 1024 bytes.
MAX_BACKING_NAME = 1023

_LAYOUT = struct.Struct(">4sIQIIQBBHIQ")
SIZE = _LAYOUT.size


@dataclasses.dataclass
class Header:
    magic: bytes
    version: int
    backing_file_offset: int
    backing_file_size: int
    mtime: int
    size: int
    cluster_bits: int
    l2_bits: int
    padding: int
    crypt_method: int
    l1_table_offset: int

    def encode(self) -> bytes:
        return _LAYOUT.pack(*dataclasses.astuple(self))

    @property
    def l1_size(self) -> int:
        shift = self.cluster_bits + self.l2_bits
        return (self.size + (1 << shift) - 1) >> shift


def parse(buf: bytes) -> Header:
    return Header(*_LAYOUT.unpack_from(buf.ljust(SIZE, b"\0")))


def check(h: Header) -> None:
    """QEMU's checks before the encryption is set up, in its order."""
    if h.magic != MAGIC:
        raise QMPError("Image not in qcow format")
    if h.version != VERSION:
        hint = "Try the 'qcow2' driver instead." if h.version in (2, 3) else ""
        raise QMPError(f"qcow (v1) does not support qcow version {h.version}", hint=hint)
    if h.size <= 1:
        raise QMPError("Image size is too small (must be at least 2 bytes)")
    if not 9 <= h.cluster_bits <= 16:
        raise QMPError("Cluster size must be between 512 and 64k")
    if not 9 - 3 <= h.l2_bits <= 16 - 3:
        raise QMPError("L2 table size must be between 512 and 64k")


def check_size(h: Header) -> None:
    """QEMU's limits on the L1 table, checked after the encryption."""
    shift = h.cluster_bits + h.l2_bits
    if h.size > (1 << 64) - 1 - (1 << shift) or h.l1_size > 0x7FFFFFFF // 8:
        raise QMPError("Image too large")


def build(size: int, backing: str | None, encrypted: bool) -> tuple[bytes, int]:
    """A new header and backing file name as QEMU writes them, and the L1 table's length.

    Without a backing file clusters are 4 KiB with 512-entry L2 tables; with
    one, 512-byte clusters (so a partial write copies nothing) and 4096-entry
    tables.  The L1 table follows the name, 8-byte aligned.
    """
    name = (backing or "").encode()
    if backing is not None:
        cluster_bits, l2_bits = 9, 12
    else:
        cluster_bits, l2_bits = 12, 9
    end = SIZE + len(name)
    l1_offset = (end + 7) & ~7
    h = Header(MAGIC, VERSION, SIZE if backing is not None else 0, len(name), 0, size,
               cluster_bits, l2_bits, 0, CRYPT_AES if encrypted else CRYPT_NONE, l1_offset)
    return h.encode() + name, h.l1_size * 8
