"""The VHD footer and the size rules QEMU 7.2 applies to it.

Every VHD ends with a 512-byte big-endian footer; a dynamic disk also
starts with a copy of it.  The guest size is either the CHS geometry's
cylinders x heads x sectors (what Virtual PC shows) or the footer's
``current_size`` (what Hyper-V and most other tools use): QEMU decides by
the creator application and by a geometry at its maximum, and so do we.
(QEMU's runtime ``force_size`` option, which only ``-drive`` and qemu-img's
``--image-opts`` reach, is not offered: ``blockdev-add`` has no such member.)
"""

from __future__ import annotations

import dataclasses
import struct

from blockd.errors import QMPError

SIZE = 512
COOKIE = b"conectix"
TYPE_FIXED = 2
TYPE_DYNAMIC = 3
#: Seconds from the Unix epoch to 2000-01-01, the VHD timestamps' origin.
TIMESTAMP_BASE = 946684800
CHS_MAX_C, CHS_MAX_H, CHS_MAX_S = 65535, 16, 255
MAX_GEOMETRY = CHS_MAX_C * CHS_MAX_H * CHS_MAX_S
#: QEMU's limit on the guest size, in sectors (2040 GiB).
MAX_SECTORS = 0xFF000000
#: Creator applications whose images are sized by ``current_size``, not by CHS.
CURRENT_SIZE_APPS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")

# cookie, features, version, data_offset, timestamp, creator_app, major, minor,
# creator_os, orig_size, current_size, cyls, heads, secs, type, checksum, uuid
_LAYOUT = struct.Struct(">8sIIQI4sHH4sQQHBBII16s")


def checksum(buf: bytes | bytearray) -> int:
    """One's complement of the byte sum (the checksum field itself must read zero)."""
    return ~sum(buf) & 0xFFFFFFFF


@dataclasses.dataclass
class Footer:
    """The fields the driver uses, and the footer's bytes as read (rewritten verbatim)."""

    raw: bytes
    data_offset: int
    creator_app: bytes
    current_size: int
    cyls: int
    heads: int
    secs: int
    disk_type: int

    def guest_sectors(self) -> int:
        """The virtual size in sectors, chosen as QEMU chooses it."""
        chs = self.cyls * self.heads * self.secs
        if self.creator_app in CURRENT_SIZE_APPS or chs == MAX_GEOMETRY:
            return self.current_size // 512
        return chs


def parse(buf: bytes) -> Footer:
    """A footer whose cookie was found; a wrong checksum is refused, as QEMU 7.2 does."""
    (_, _, _, data_offset, _, app, _, _, _, _, current, cyls, heads, secs, disk_type,
     stored, _) = _LAYOUT.unpack_from(buf)
    zeroed = bytearray(buf[:SIZE])
    zeroed[64:68] = bytes(4)
    if checksum(zeroed) != stored:
        raise QMPError("Incorrect header checksum")
    return Footer(bytes(buf[:SIZE]), data_offset, app, current, cyls, heads, secs, disk_type)


def geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a sector count: the VHD specification's
    algorithm, which may round the count down."""
    total_sectors = min(total_sectors, MAX_GEOMETRY)
    if total_sectors >= 65535 * 16 * 63:
        secs, heads = 255, 16
        cyls_times_heads = total_sectors // secs
    else:
        secs = 17
        cyls_times_heads = total_sectors // secs
        heads = max(4, -(-cyls_times_heads // 1024))
        if cyls_times_heads >= heads * 1024 or heads > 16:
            secs, heads = 31, 16
            cyls_times_heads = total_sectors // secs
        if cyls_times_heads >= heads * 1024:
            secs, heads = 63, 16
            cyls_times_heads = total_sectors // secs
    return cyls_times_heads // heads, heads, secs


def rounded_geometry(size: int, force_size: bool) -> tuple[int, tuple[int, int, int]]:
    """(sector count, geometry) of a new image of ``size`` bytes.

    Without ``force_size`` the count grows until a geometry covers it, so an
    image is never smaller than asked; sizes beyond what CHS can describe (and
    ``force_size``) get the maximum geometry and the exact size.
    """
    if force_size:
        chs = (CHS_MAX_C, CHS_MAX_H, CHS_MAX_S)
    else:
        want = min(MAX_GEOMETRY, size // 512)
        chs, i = (0, 0, 0), 0
        while want > chs[0] * chs[1] * chs[2]:
            chs = geometry(want + i)
            i += 1
    if chs[0] * chs[1] * chs[2] == MAX_GEOMETRY:
        sectors = size // 512
        if sectors > MAX_SECTORS:
            raise QMPError("Disk size is too large, max size is 2040 GiB")
        return sectors, chs
    return chs[0] * chs[1] * chs[2], chs


def build(size: int, disk_type: int, chs: tuple[int, int, int], force_size: bool,
          timestamp: int, uuid: bytes) -> bytes:
    """A new footer, as QEMU writes it (Virtual PC 2007's version, creator ``qemu``/``qem2``)."""
    data_offset = SIZE if disk_type == TYPE_DYNAMIC else 0xFFFFFFFFFFFFFFFF
    fields = [COOKIE, 2, 0x00010000, data_offset, timestamp & 0xFFFFFFFF,
              b"qem2" if force_size else b"qemu", 5, 3, b"Wi2k", size, size,
              chs[0], chs[1], chs[2], disk_type, 0, uuid]
    buf = bytearray(_LAYOUT.pack(*fields).ljust(SIZE, b"\0"))
    buf[64:68] = struct.pack(">I", checksum(buf))
    return bytes(buf)
