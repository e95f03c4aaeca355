"""Dirty bitmaps: which parts of a node were written since a point in time.

One bit covers ``granularity`` bytes.  Bits are kept least significant
bit first in a bytearray, which is also the layout of QEMU's serialised
bitmaps and of the qcow2 bitmap data clusters, so hashing and storing
need no conversion.  Marking a 4 KiB write touches one byte; finding
runs scans whole bytes in C (a regular expression over the array), so
NBD block status and merges cost per run, not per granule; counting and
hashing walk the whole array, which only queries do.  Not an int as
the bit set: every OR would copy the whole int.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from blockd.errors import QMPError

#: Longest bitmap name in bytes, as QEMU and qcow2 allow.
MAX_NAME = 1023

_NOT_CLEAN = re.compile(rb"[^\x00]")
_NOT_FULL = re.compile(rb"[^\xff]")


class DirtyBitmap:
    """One named bitmap of a node, with the state flags QMP shows and checks."""

    def __init__(self, name: str, size: int, granularity: int, *, persistent: bool = False,
                 enabled: bool = True) -> None:
        self.name = name
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.persistent = persistent
        #: Recording: guest writes set bits.  Disabled bitmaps only change by QMP.
        self.enabled = enabled
        #: Held by an export or a job: may not be changed or removed meanwhile.
        self.busy = False
        self._inconsistent = False
        #: Loaded from a read-only image: its bits cannot change.
        self.readonly = False
        self.size = 0
        self.nbits = 0
        self.bits = bytearray()
        self.resize(size)

    @property
    def inconsistent(self) -> bool:
        """Loaded from an image that was not closed cleanly: unusable until removed."""
        return self._inconsistent

    @inconsistent.setter
    def inconsistent(self, value: bool) -> None:
        # Its bits mean nothing, so it stops recording too (QEMU shows it so).
        self._inconsistent = value
        if value:
            self.enabled = False

    # ---- bits ---------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Record a write of ``[offset, offset + length)`` (only while recording)."""
        if self.enabled and length > 0:
            self.set_range(offset >> self.shift, ((offset + length - 1) >> self.shift) + 1)

    def set_range(self, first: int, end: int) -> None:
        """Set bits ``[first, end)``, whole bytes at a time where possible."""
        end = min(end, self.nbits)
        bits = self.bits
        while first < end and first & 7:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1
        full_end = end & ~7
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

    def resize(self, size: int) -> None:
        """Follow a node resize: new granules are clean, cut-off ones are forgotten."""
        self.size = size
        self.nbits = max(1, -(-size // self.granularity))
        nbytes = -(-self.nbits // 8)
        if nbytes < len(self.bits):
            del self.bits[nbytes:]
        else:
            self.bits.extend(bytes(nbytes - len(self.bits)))
        if self.nbits & 7:
            # Bits past the end stay clear so counts and hashes only see the disk.
            self.bits[-1] &= (1 << (self.nbits & 7)) - 1

    def next_change(self, first: int, end: int, dirty: bool) -> int:
        """The first bit in ``[first, end)`` that is not ``dirty``, else ``end``."""
        bits = self.bits
        while first < end and first & 7:
            if self.get(first) != dirty:
                return first
            first += 1
        if first >= end:
            return end
        found = (_NOT_FULL if dirty else _NOT_CLEAN).search(bits, first >> 3, (end + 7) >> 3)
        if found is None:
            return end
        byte = bits[found.start()]
        differ = (~byte & 0xFF) if dirty else byte
        return min(end, (found.start() << 3) + (differ & -differ).bit_length() - 1)

    def runs(self, first: int, end: int) -> list[tuple[int, int, bool]]:
        """Maximal runs ``(start, stop, dirty)`` of equal bits covering ``[first, end)``."""
        end = min(end, self.nbits)
        out = []
        while first < end:
            dirty = self.get(first)
            stop = self.next_change(first + 1, end, dirty)
            out.append((first, stop, dirty))
            first = stop
        return out

    def merge_from(self, other: "DirtyBitmap") -> None:
        """OR another bitmap of the same size in; granularities may differ.

        A source granule dirties every target granule it overlaps, so a
        merge never loses a write.
        """
        if other.granularity == self.granularity:
            merged = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
            self.bits[:] = merged.to_bytes(len(self.bits), "little")
            return
        for start, stop, dirty in other.runs(0, other.nbits):
            if dirty:
                self.set_range((start << other.shift) >> self.shift,
                               (((stop << other.shift) - 1) >> self.shift) + 1)

    def count(self) -> int:
        """Dirty bytes as QEMU counts them: whole granules, even the partial last one."""
        return int.from_bytes(self.bits, "little").bit_count() << self.shift

    def sha256(self) -> str:
        """QEMU's debug hash: over the bits as whole 64-bit little-endian words."""
        words = -(-self.nbits // 64)
        return hashlib.sha256(bytes(self.bits).ljust(words * 8, b"\0")).hexdigest()

    def extents(self, offset: int, length: int,
                limit: int | None = None) -> list[tuple[int, bool]]:
        """Runs of ``(length, dirty)`` covering ``[offset, offset + length)`` in bytes.

        Past the bitmap's size the range reads clean, as QEMU reports it: an
        export may serve another node's bitmap, smaller than itself.
        ``limit`` caps the number of extents (NBD replies have a maximum).
        """
        end = min(offset + length, self.size)
        out: list[tuple[int, bool]] = []
        last = ((end - 1) >> self.shift) + 1
        pos = offset
        while pos < end and (limit is None or len(out) < limit):
            first = pos >> self.shift
            dirty = self.get(first)
            stop = self.next_change(first + 1, last, dirty)
            n = min(end, stop << self.shift) - pos
            out.append((n, dirty))
            pos += n
        if pos >= end and pos < offset + length:
            rest = offset + length - pos
            if out and not out[-1][1]:
                out[-1] = (out[-1][0] + rest, False)
            elif limit is None or len(out) < limit:
                out.append((rest, False))
        return out

    # ---- storage ------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The bits in qcow2's bitmap data layout (granule i is bit i % 8 of byte i // 8)."""
        return bytes(self.bits)

    def load_bytes(self, data: bytes | bytearray | memoryview, at: int = 0) -> None:
        """Fill bytes from ``at`` with stored bitmap data (a qcow2 cluster, say)."""
        n = max(0, min(len(data), len(self.bits) - at))
        self.bits[at:at + n] = data[:n]
        if self.nbits & 7 and at + n == len(self.bits):
            self.bits[-1] &= (1 << (self.nbits & 7)) - 1

    # ---- QMP --------------------------------------------------------------------

    def check_usable(self, *, readonly: bool = True, inconsistent: bool = True) -> None:
        """QEMU's checks before using a bitmap, in its order; busy is always checked.

        Enabling, disabling and merging from a bitmap skip the read-only
        check; removal skips the inconsistency check (it is the way out).
        """
        if self.busy:
            raise QMPError(f"Bitmap '{self.name}' is currently in use by another operation "
                           "and cannot be used")
        if readonly and self.readonly:
            raise QMPError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if inconsistent and self.inconsistent:
            raise QMPError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    def info(self) -> dict[str, Any]:
        """``BlockDirtyInfo``: ``inconsistent`` only appears when true, as in QEMU."""
        out: dict[str, Any] = {"name": self.name, "count": self.count(),
                               "granularity": self.granularity, "recording": self.enabled,
                               "busy": self.busy, "persistent": self.persistent}
        if self.inconsistent:
            out["inconsistent"] = True
        return out
