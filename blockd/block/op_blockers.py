"""Operation blockers: a node in use by a job refuses what would pull it from under the job.

QEMU keeps, per node and per operation type, the reasons that operation is
blocked; the first reason found makes the command fail with
"Node 'X' is busy: <reason>".  A block job blocks every operation on the
nodes it owns, less those it lets through.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from blockd.errors import QMPError

if TYPE_CHECKING:
    from blockd.block.node import BlockNode

#: QEMU's BlockOpType names.
OPS = ("backup-source", "backup-target", "change", "commit-source", "commit-target",
       "dataplane", "drive-del", "eject", "external-snapshot", "internal-snapshot",
       "internal-snapshot-delete", "mirror-source", "mirror-target", "resize", "stream",
       "replace")


class Blocker:
    """One reason to refuse operations (a job holds one for all its nodes)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


_blocked: "weakref.WeakKeyDictionary[BlockNode, dict[str, list[Blocker]]]" = \
    weakref.WeakKeyDictionary()


def block(node: "BlockNode", op: str, blocker: Blocker) -> None:
    assert op in OPS
    _blocked.setdefault(node, {}).setdefault(op, []).insert(0, blocker)


def unblock(node: "BlockNode", op: str, blocker: Blocker) -> None:
    reasons = _blocked.get(node, {}).get(op, [])
    if blocker in reasons:
        reasons.remove(blocker)


def block_all(node: "BlockNode", blocker: Blocker) -> None:
    for op in OPS:
        block(node, op, blocker)


def unblock_all(node: "BlockNode", blocker: Blocker) -> None:
    for op in OPS:
        unblock(node, op, blocker)


def blocker_of(node: "BlockNode", op: str) -> Blocker | None:
    """The newest reason ``op`` is refused on ``node``, or None if it is allowed."""
    reasons = _blocked.get(node, {}).get(op)
    return reasons[0] if reasons else None


def check(node: "BlockNode", op: str) -> None:
    """Refuse ``op`` on a busy node with QEMU's message."""
    blocker = blocker_of(node, op)
    if blocker is not None:
        raise QMPError(f"Node '{node.node_name}' is busy: {blocker.reason}")
