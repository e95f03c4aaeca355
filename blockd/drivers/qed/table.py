"""QED's two-level tables: the L1 table, a cache of L2 tables, and the cluster lookup.

Tables are ``table_size`` clusters of little-endian 64-bit entries.  An
L1 entry is an L2 table's offset (0: none); an L2 entry is a data
cluster's offset, 0 (unallocated: the backing file shows through) or 1
(reads as zeroes).  A lookup answers for a run of clusters alike, inside
one L2 table, as QEMU's ``qed_find_cluster`` does.
"""

from __future__ import annotations

import array
import collections
import enum
import errno
import sys

from blockd.block.node import ChildLink
from blockd.drivers.qed import header as hdr

#: L2 tables kept in memory (QEMU keeps 50).
CACHE_TABLES = 50


class Kind(enum.Enum):
    FOUND = 0
    ZERO = 1
    L2 = 2  # the L2 entry is 0
    L1 = 3  # no L2 table


def _einval() -> OSError:
    return OSError(errno.EINVAL, "Invalid argument")


def decode(raw: bytes) -> array.array:
    table = array.array("Q", raw)
    if sys.byteorder != "little":
        table.byteswap()
    return table


def encode(table: array.array) -> bytes:
    if sys.byteorder != "little":
        table = array.array("Q", table)
        table.byteswap()
    return table.tobytes()


class Tables:
    """The L1 table and cached L2 tables of an open image, and its allocation pointer."""

    def __init__(self, file: ChildLink, layout: hdr.Layout, l1: array.array) -> None:
        self.file = file
        self.layout = layout
        self.h = layout.h
        self.l1 = l1
        self.nelems = self.h.table_entries
        self.l2_shift = self.h.cluster_size.bit_length() - 1
        self.l1_shift = self.l2_shift + self.nelems.bit_length() - 1
        self._cache: collections.OrderedDict[int, array.array] = collections.OrderedDict()

    async def l2(self, offset: int) -> array.array:
        table = self._cache.get(offset)
        if table is not None:
            self._cache.move_to_end(offset)
            return table
        raw = bytes(await self.file.read(offset, self.h.table_bytes))
        # A table another request loaded (and a writer may have changed) meanwhile wins.
        table = self._cache.get(offset)
        if table is None:
            table = decode(raw.ljust(self.h.table_bytes, b"\0"))
            self.remember(offset, table)
        return table

    def remember(self, offset: int, table: array.array) -> None:
        self._cache[offset] = table
        self._cache.move_to_end(offset)
        while len(self._cache) > CACHE_TABLES:
            self._cache.popitem(last=False)

    def forget(self) -> None:
        self._cache.clear()

    async def find(self, pos: int, length: int) -> tuple[Kind, int, int]:
        """(kind, host offset of the run's first cluster, bytes of the run from ``pos``)."""
        cs = self.h.cluster_size
        length = min(length, ((pos >> self.l1_shift) + 1 << self.l1_shift) - pos)
        l2_offset = self.l1[pos >> self.l1_shift]
        if l2_offset == 0:
            return Kind.L1, 0, length
        if not self.layout.table_ok(l2_offset):
            raise _einval()
        table = await self.l2(l2_offset)
        index = (pos >> self.l2_shift) & (self.nelems - 1)
        within = pos & (cs - 1)
        want = -(-(within + length) // cs)
        end = min(index + want, self.nelems)
        first = last = table[index]
        i = index + 1
        while i < end:
            entry = table[i]
            if first in (0, hdr.ZERO_CLUSTER):
                if entry != first:
                    break
            elif entry != last + cs:
                break
            else:
                last = entry
            i += 1
        length = min(length, (i - index) * cs - within)
        if first == 0:
            return Kind.L2, 0, length
        if first == hdr.ZERO_CLUSTER:
            return Kind.ZERO, 0, length
        if not self.layout.cluster_ok(first):
            raise _einval()
        return Kind.FOUND, first, length

    async def write_entries(self, table_offset: int, table: array.array, index: int,
                            n: int) -> None:
        """Entries ``index`` to ``index + n`` of a table, in whole sectors, as QEMU writes."""
        per = 512 // 8
        lo, hi = index // per * per, -(-(index + n) // per) * per
        await self.file.write(table_offset + lo * 8, encode(table[lo:hi]))
