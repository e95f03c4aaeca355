"""Write thresholds: one event when writes first reach past an offset of a node.

Thin-provisioning managers set a threshold below the end of the storage
they have given a node, and grow the storage when ``BLOCK_WRITE_THRESHOLD``
says the guest has written past it.  The threshold then clears itself, so a
busy guest cannot flood the monitor; the manager sets a new one.
"""

from __future__ import annotations

from typing import Any, Callable

from blockd.block.node import BlockNode

Emit = Callable[[str, dict[str, Any]], None]


class WriteThreshold:
    """The threshold of one node, checked by a before-write hook while it is set."""

    def __init__(self, node: BlockNode, emit: Emit | None) -> None:
        self.node = node
        self.emit = emit
        self.offset = 0

    def set(self, offset: int) -> None:
        """Arm (or with 0, disarm) the threshold at ``offset``."""
        if offset and not self.offset:
            self.node.add_before_write(self._check)
        elif not offset and self.offset:
            self.node.remove_before_write(self._check)
        self.offset = offset

    async def _check(self, node: BlockNode, offset: int, length: int) -> None:
        end = offset + length
        threshold = self.offset
        if threshold and end > threshold:
            self.set(0)
            if self.emit is not None:
                self.emit("BLOCK_WRITE_THRESHOLD", {"node-name": node.node_name,
                                                    "amount-exceeded": end - threshold,
                                                    "write-threshold": threshold})


def threshold_of(node: BlockNode, emit: Emit | None = None) -> WriteThreshold:
    """The node's threshold object, made the first time it is asked for."""
    current = node.write_threshold
    if current is None:
        current = node.write_threshold = WriteThreshold(node, emit)
    return current
