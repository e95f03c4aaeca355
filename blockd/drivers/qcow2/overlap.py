"""Overlap checks: no write may land on live metadata.

A write that would overwrite the header, an L1 or L2 table, the refcount
table or a block, the snapshot table or the bitmap directory can only
come from corrupt metadata (an L2 entry pointing at a table, a refcount
of zero on a used cluster).  Checking before every write turns such a
corruption into a refused write and a corrupt-marked image instead of
silent damage.

The fixed structures are single ranges taken from the header.  L2
tables and refcount blocks are one cluster each, so they live in a map
from cluster index to structure bits, updated when an L1 or refcount
table entry changes: checking a write then costs one dictionary look-up
per cluster written, whatever the image size.  The refcount table's
last used index bounds the walk that fills the map at open.

Which structures are checked follows QEMU's ``overlap-check`` option: a
mode (``none``, ``constant``, ``cached``, ``all``) or a template mode
with per-structure booleans.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from blockd.drivers.qcow2 import header as hdr

if TYPE_CHECKING:
    from blockd.drivers.qcow2.image import Image

MAIN_HEADER = 1 << 0
ACTIVE_L1 = 1 << 1
ACTIVE_L2 = 1 << 2
REFCOUNT_TABLE = 1 << 3
REFCOUNT_BLOCK = 1 << 4
SNAPSHOT_TABLE = 1 << 5
INACTIVE_L1 = 1 << 6
INACTIVE_L2 = 1 << 7
BITMAP_DIRECTORY = 1 << 8

#: How QEMU names each structure in its corruption messages, by bit number.
NAMES = ("qcow2_header", "active L1 table", "active L2 table", "refcount table",
         "refcount block", "snapshot table", "inactive L1 table", "inactive L2 table",
         "bitmap directory")
#: The ``overlap-check`` member for each bit.
OPTION_KEYS = ("main-header", "active-l1", "active-l2", "refcount-table", "refcount-block",
               "snapshot-table", "inactive-l1", "inactive-l2", "bitmap-directory")

#: Checks that need no per-cluster state.
CONSTANT = MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY
#: Checks that need only what is in memory anyway.
CACHED = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1
#: Everything, inactive (snapshot) L2 tables included: they are read at open.
ALL = CACHED | INACTIVE_L2
MODES = {"none": 0, "constant": CONSTANT, "cached": CACHED, "all": ALL}


def parse_option(value: str | dict[str, Any] | None) -> int:
    """The structure mask an ``overlap-check`` value asks for (default ``cached``)."""
    if value is None:
        return CACHED
    if isinstance(value, str):
        return MODES[value]
    mask = MODES[value.get("template", "cached")]
    for bit, key in enumerate(OPTION_KEYS):
        if key in value:
            mask = mask | (1 << bit) if value[key] else mask & ~(1 << bit)
    return mask


def lowest_name(mask: int) -> str:
    """The structure QEMU names when a write overlaps several: the lowest bit."""
    return NAMES[(mask & -mask).bit_length() - 1]


class MetadataMap:
    """Where the image's metadata lives, kept in step with allocation and free."""

    def __init__(self, image: "Image", mask: int) -> None:
        self.image = image
        self.mask = mask
        self.cs = image.cluster_size
        #: Cluster index -> structure bits of the single-cluster tables there.
        self.clusters: dict[int, int] = {}
        self.snapshot_table = (0, 0)
        self.inactive_l1: list[tuple[int, int]] = []
        self._bitmaps_seen: object = None
        self._bitmaps_at = (0, 0)

    def add(self, offset: int, bit: int) -> None:
        if offset:
            c = offset // self.cs
            self.clusters[c] = self.clusters.get(c, 0) | bit

    def remove(self, offset: int, bit: int) -> None:
        if not offset:
            return
        c = offset // self.cs
        left = self.clusters.get(c, 0) & ~bit
        if left:
            self.clusters[c] = left
        else:
            self.clusters.pop(c, None)

    def track_active_l2(self, l1: list[int]) -> None:
        """Note the L2 tables ``l1`` names as the active ones (at open, after a revert)."""
        for c in [c for c, bits in self.clusters.items() if bits & ACTIVE_L2]:
            self.remove(c * self.cs, ACTIVE_L2)
        for entry in l1:
            self.add(entry & 0x00FFFFFFFFFFFE00, ACTIVE_L2)

    async def load_snapshots(self) -> None:
        """Note the snapshot table and the snapshots' tables (at open, after snapshot changes)."""
        for c in [c for c, bits in self.clusters.items() if bits & INACTIVE_L2]:
            self.remove(c * self.cs, INACTIVE_L2)
        self.inactive_l1 = []
        image = self.image
        h = image.header
        self.snapshot_table = (h.snapshots_offset, image.snapshot_table_size) \
            if h.nb_snapshots else (0, 0)
        for sn in image.snapshots:
            self.inactive_l1.append((sn.l1_table_offset, sn.l1_size * 8))
            if self.mask & INACTIVE_L2 and sn.l1_size:
                raw = bytes(await image.file.read(sn.l1_table_offset, sn.l1_size * 8))
                for entry in struct.unpack(f">{sn.l1_size}Q", raw):
                    self.add(entry & 0x00FFFFFFFFFFFE00, INACTIVE_L2)

    def _bitmap_directory(self) -> tuple[int, int]:
        """(offset, size) of the bitmap directory; remembered per header extension object."""
        h = self.image.header
        if not h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
            return 0, 0
        ext = h.extension(hdr.EXT_BITMAPS)
        if ext is None or len(ext.data) < 24:
            return 0, 0
        if self._bitmaps_seen is not ext:
            _, _, size, off = struct.unpack_from(">IIQQ", ext.data)
            self._bitmaps_seen, self._bitmaps_at = ext, (off, size)
        return self._bitmaps_at

    def check(self, offset: int, size: int, ign: int = 0) -> int:
        """Bits of every checked structure that the write ``[offset, offset+size)`` touches.

        Like QEMU, the write is widened to whole clusters first: metadata
        is cluster aligned, and a partial-cluster hit is as wrong as a full one.
        """
        chk = self.mask & ~ign
        if not chk or size <= 0:
            return 0
        cs = self.cs
        first = offset // cs
        last = (offset + size - 1) // cs
        hit = MAIN_HEADER if chk & MAIN_HEADER and first == 0 else 0
        start, end = first * cs, (last + 1) * cs
        h = self.image.header
        # Inline range tests: this runs before every data write.
        if chk & ACTIVE_L1 and h.l1_size and h.l1_table_offset < end \
                and start < h.l1_table_offset + h.l1_size * 8:
            hit |= ACTIVE_L1
        if chk & REFCOUNT_TABLE and h.refcount_table_offset < end \
                and start < h.refcount_table_offset + h.refcount_table_clusters * cs:
            hit |= REFCOUNT_TABLE
        if chk & SNAPSHOT_TABLE and self.snapshot_table[1]:
            off, n = self.snapshot_table
            if off < end and start < off + n:
                hit |= SNAPSHOT_TABLE
        if chk & INACTIVE_L1:
            for off, n in self.inactive_l1:
                if n and off < end and start < off + n:
                    hit |= INACTIVE_L1
        if chk & BITMAP_DIRECTORY:
            off, n = self._bitmap_directory()
            if n and off < end and start < off + n:
                hit |= BITMAP_DIRECTORY
        per_cluster = chk & (ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L2)
        if per_cluster and self.clusters:
            get = self.clusters.get
            for c in range(first, last + 1):
                hit |= get(c, 0) & per_cluster
        return hit
