"""Dirty bitmaps: which parts of a node were written since a point in time.

One bit covers ``granularity`` bytes.  Bits are kept least significant
bit first in a bytearray, which is also the layout of QEMU's serialised
bitmaps and of the qcow2 bitmap data clusters, so hashing and storing
need no conversion.  Marking a 4 KiB write touches one byte; counting
and hashing walk the whole array, which only queries do.
"""

from __future__ import annotations

import hashlib
from typing import Any

from blockd.errors import QMPError

MAX_NAME = 1023


class DirtyBitmap:
    def __init__(self, name: str, size: int, granularity: int, *, persistent: bool = False,
                 enabled: bool = True) -> None:
        self.name = name
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.persistent = persistent
        self.enabled = enabled
        #: Held by an export or a job: may not be changed or removed meanwhile.
        self.busy = False
        #: Loaded from an image that was not closed cleanly: unusable until removed.
        self.inconsistent = False
        self.readonly = False
        self.nbits = max(1, -(-size // granularity))
        self.bits = bytearray(-(-self.nbits // 8))

    # ---- bits ---------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Record a write (only while recording)."""
        if self.enabled and length > 0:
            self.set_range(offset >> self.shift, ((offset + length - 1) >> self.shift) + 1)

    def set_range(self, first: int, end: int) -> None:
        end = min(end, self.nbits)
        bits = self.bits
        while first < end and first % 8:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1
        full_end = end - end % 8
        if first < full_end:
            bits[first >> 3:full_end >> 3] = b"\xff" * ((full_end - first) >> 3)
            first = full_end
        while first < end:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1

    def get(self, index: int) -> bool:
        return bool(self.bits[index >> 3] >> (index & 7) & 1)

    def clear(self) -> None:
        self.bits[:] = bytes(len(self.bits))

    def merge_from(self, other: "DirtyBitmap") -> None:
        """OR another bitmap in; granularities may differ (bits are mapped by offset)."""
        if other.granularity == self.granularity and other.nbits == self.nbits:
            merged = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
            self.bits[:] = merged.to_bytes(len(self.bits), "little")
            return
        for i in range(other.nbits):
            if other.get(i):
                self.set_range(((i << other.shift)) >> self.shift,
                               (((i + 1) << other.shift) - 1 >> self.shift) + 1)

    def count(self) -> int:
        """Dirty bytes, as QEMU counts them (whole granules)."""
        return int.from_bytes(self.bits, "little").bit_count() << self.shift

    def sha256(self) -> str:
        """QEMU's debug hash: over the bits as 64-bit little-endian words."""
        words = -(-self.nbits // 64)
        return hashlib.sha256(bytes(self.bits).ljust(words * 8, b"\0")).hexdigest()

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Runs of (length, dirty) covering ``[offset, offset + length)``."""
        out: list[tuple[int, bool]] = []
        end = offset + length
        pos = offset
        while pos < end:
            i = pos >> self.shift
            dirty = self.get(i) if i < self.nbits else False
            j = i + 1
            while (j << self.shift) < end and j < self.nbits and self.get(j) == dirty:
                j += 1
            n = min(end, j << self.shift) - pos
            out.append((n, dirty))
            pos += n
        return out

    # ---- QMP --------------------------------------------------------------------

    def check_usable(self, allow_readonly: bool = False, busy_only: bool = False) -> None:
        """QEMU's checks before changing a bitmap; removal only cares whether it is busy."""
        if self.busy:
            raise QMPError(f"Bitmap '{self.name}' is currently in use by another operation "
                           "and cannot be used")
        if busy_only:
            return
        if self.readonly and not allow_readonly:
            raise QMPError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if self.inconsistent:
            raise QMPError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    def info(self) -> dict[str, Any]:
        """``BlockDirtyInfo``."""
        out: dict[str, Any] = {"name": self.name, "count": self.count(),
                               "granularity": self.granularity, "recording": self.enabled,
                               "busy": self.busy, "persistent": self.persistent}
        if self.inconsistent:
            out["inconsistent"] = True
        return out
