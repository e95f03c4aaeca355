"""``qemu-img check`` for qed, and the repair QEMU runs when it opens a dirty image.

Every L1 entry must point at a whole table inside the file and every L2
entry at a cluster inside it (past the header); no cluster may be used
twice; clusters no table reaches are leaks (reported, never reclaimed).
Repairing clears entries that point outside the file; a clean result
clears the need-check flag.  The counts follow QEMU's, including its
rounding of the file's cluster count (``qed_bytes_to_clusters`` divides
by one less than the cluster size).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Callable

from blockd.drivers.qcow2.check import CheckResult
from blockd.drivers.qed import header as hdr

if TYPE_CHECKING:
    from blockd.drivers.qed.driver import QedNode


class _Used:
    """Clusters referenced so far (a bytearray bitmap is QEMU's uint32 array's equal)."""

    def __init__(self, clusters: int, res: CheckResult, cluster_size: int) -> None:
        self.bits = bytearray(-(-clusters // 8) + 8)
        self.res = res
        self.shift = cluster_size.bit_length() - 1

    def mark(self, offset: int, n: int) -> bool:
        cluster = offset >> self.shift
        dup = 0
        for c in range(cluster, cluster + n):
            byte, bit = c >> 3, 1 << (c & 7)
            if byte >= len(self.bits):
                continue
            if self.bits[byte] & bit:
                dup += 1
            self.bits[byte] |= bit
        self.res.corruptions += dup
        return dup == 0

    def is_set(self, c: int) -> bool:
        return bool(self.bits[c >> 3] & (1 << (c & 7)))


async def check(node: "QedNode", fix: bool, sink: Callable[[str], None] | None) -> CheckResult:
    h = node.header
    t = node.tables
    layout = t.layout
    cs = h.cluster_size
    res = CheckResult(sink=sink)
    # QEMU's qed_bytes_to_clusters: rounded up, then divided by cluster_size - 1.
    nclusters = -(-layout.file_size // cs) * cs // (cs - 1)
    used = _Used(nclusters, res, cs)
    res.total_clusters = -(-h.image_size // cs)
    used.mark(h.l1_table_offset, h.table_size)
    invalid_l1 = 0
    error = 0
    for i in range(t.nelems):
        l2_offset = t.l1[i]
        if l2_offset == 0:
            continue
        if not layout.table_ok(l2_offset):
            if fix:
                t.l1[i] = 0
                res.corruptions_fixed += 1
            else:
                res.corruptions += 1
            invalid_l1 += 1
            continue
        if not used.mark(l2_offset, h.table_size):
            continue
        try:
            table = await t.l2(l2_offset)
        except OSError as exc:
            res.check_errors += 1
            error = exc.errno or errno.EIO
            continue
        invalid = 0
        last = 0
        for j in range(t.nelems):
            entry = table[j]
            if entry in (0, hdr.ZERO_CLUSTER):
                continue
            res.allocated_clusters += 1
            if last and last + cs != entry:
                res.fragmented_clusters += 1
            last = entry
            if not layout.cluster_ok(entry):
                if fix:
                    table[j] = 0
                    res.corruptions_fixed += 1
                else:
                    res.corruptions += 1
                invalid += 1
                continue
            used.mark(entry, 1)
        if invalid and fix:
            try:
                await t.write_entries(l2_offset, table, 0, t.nelems)
                await node.file_child.flush()
            except OSError as exc:
                res.check_errors += 1
                error = exc.errno or errno.EIO
    if invalid_l1 and fix:
        try:
            await t.write_entries(h.l1_table_offset, t.l1, 0, t.nelems)
        except OSError as exc:
            res.check_errors += 1
            error = exc.errno or errno.EIO
    if error:
        res.error = error
        return res
    for c in range(h.header_size, nclusters):
        if c >= len(used.bits) * 8 or not used.is_set(c):
            res.leaks += 1
    if fix and not res.corruptions and not res.check_errors and \
            h.features & hdr.F_NEED_CHECK:
        await node.file_child.flush()
        h.features &= ~hdr.F_NEED_CHECK
        await node.file_child.write(0, h.encode())
    return res
