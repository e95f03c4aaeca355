"""``qemu-img check`` for vdi: the block map against itself and the header, as QEMU checks it.

Every allocated entry must point inside the image and at a data block no
other entry uses, and their count must be the header's; nothing can be
repaired (``-r`` is refused as unsupported, like QEMU).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Callable

from blockd.drivers.qcow2.check import CheckResult
from blockd.drivers.vdi import header as hdr

if TYPE_CHECKING:
    from blockd.drivers.vdi.driver import VdiNode


def check(node: "VdiNode", fix: int, sink: Callable[[str], None] | None) -> CheckResult:
    if fix:
        raise OSError(errno.ENOTSUP, "Operation not supported")
    res = CheckResult(sink=sink)
    blocks = node.header.blocks_in_image
    used: set[int] = set()
    allocated = 0
    for index, entry in enumerate(node.bmap):
        if entry >= hdr.DISCARDED:
            continue
        if entry >= blocks:
            res.say(f"ERROR: block index {index} too large, is {entry}")
            res.corruptions += 1
            continue
        allocated += 1
        if entry in used:
            # QEMU's message names the data block twice, not the two users.
            res.say(f"ERROR: block index {entry} also used by {entry}")
            res.corruptions += 1
        else:
            used.add(entry)
    if allocated != node.header.blocks_allocated:
        res.say(f"ERROR: allocated blocks mismatch, is {allocated}, should be "
                            f"{node.header.blocks_allocated}")
        res.corruptions += 1
    return res
