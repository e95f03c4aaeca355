"""``qemu-img check`` for parallels: the BAT against the file, and the unclean-close flag.

As QEMU 7.2 checks: an image not closed cleanly is one corruption
(repaired by closing it cleanly), a BAT entry past the end of the file
another (repaired by dropping the cluster), and file space past the last
cluster is leaked (repaired by cutting the file there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from blockd.drivers.qcow2.check import FIX_ERRORS, FIX_LEAKS, CheckResult

if TYPE_CHECKING:
    from blockd.drivers.parallels.driver import ParallelsNode


async def check(node: "ParallelsNode", fix: int, sink: Callable[[str], None] | None
                ) -> CheckResult:
    res = CheckResult(sink=sink)
    size = node.file_child.length()
    cs = node.header.cluster_size
    repair, repair_leaks = fix & FIX_ERRORS, fix & FIX_LEAKS
    async with node.lock:
        if node.unclean:
            res.say(f"{'Repairing' if repair else 'ERROR'} image was not closed correctly")
            res.corruptions += 1
            if repair:
                res.corruptions_fixed += 1
                node.unclean = False
        res.total_clusters = len(node.bat)
        high = prev = 0
        flush = False
        for index in range(len(node.bat)):
            off = node.sector_of(index) * 512
            if off == 0:
                prev = 0
                continue
            if off > size:
                res.say(f"{'Repairing' if repair else 'ERROR'} cluster {index} is outside image")
                res.corruptions += 1
                if repair:
                    prev = 0
                    node.set_entry(index, 0)
                    res.corruptions_fixed += 1
                    flush = True
                    continue
            res.allocated_clusters += 1
            high = max(high, off)
            if prev and prev + cs != off:
                res.fragmented_clusters += 1
            prev = off
        if flush:
            try:
                await node.write_bat()
            except OSError:
                res.check_errors += 1
                return res
        res.image_end_offset = high + cs
        if size > res.image_end_offset:
            count = -(-(size - res.image_end_offset) // cs)
            res.say(f"{'Repairing' if repair_leaks else 'ERROR'} space leaked at the end of "
                    f"the image {size - res.image_end_offset}")
            res.leaks += count
            if repair_leaks:
                try:
                    await node.file_child.truncate(res.image_end_offset, exact=True)
                except OSError:
                    res.check_errors += 1
                    return res
                res.leaks_fixed += count
    return res
