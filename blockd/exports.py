"""Block exports: a named, permissioned view of a node that clients reach over NBD.

An export holds a :class:`~blockd.block.backend.Backend` on its node for
its whole life, so the node cannot be deleted or reopened read-only
under a writable export (QEMU's rules), and counts connections so that
``block-export-del`` in ``safe`` mode can refuse while clients are on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockd.block.backend import Backend
from blockd.block.node import BlockNode, Perm
from blockd.errors import QMPError

if TYPE_CHECKING:
    from blockd.daemon import Daemon

#: Users of an export's node are anonymous in QEMU's permission errors.
EXPORT_USER = "an unnamed block device"


def find_bitmap(node: BlockNode, name: str) -> Any:
    """A dirty bitmap of ``node`` or of the nodes it reads through (backing, file)."""
    cur: BlockNode | None = node
    while cur is not None:
        bitmap = cur.bitmaps.get(name)
        if bitmap is not None:
            return bitmap
        cur = cur.backing or (cur.file if cur.is_filter or not cur.is_format else None)
    return None


class Export:
    """One ``block-export-add``: the node, its NBD name and the options."""

    def __init__(self, daemon: "Daemon", options: dict[str, Any]) -> None:
        self.daemon = daemon
        self.id: str = options["id"]
        node = daemon.graph.lookup_node(options["node-name"])
        self.name: str = options.get("name", options["node-name"])
        self.description: str | None = options.get("description")
        self.writable: bool = options.get("writable", False)
        self.writethrough: bool = options.get("writethrough", False)
        self.allocation_depth: bool = options.get("allocation-depth", False)
        self.bitmaps: dict[str, Any] = {}
        if self.writable and node.read_only:
            raise QMPError("Cannot export read-only node as writable")
        for entry in options.get("bitmaps", []):
            bitmap = self._bitmap(node, entry)
            self.bitmaps[bitmap.name] = bitmap
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if self.writable else Perm(0))
        self.backend = Backend(daemon.graph, node, EXPORT_USER, perm,
                               Perm.all() & ~Perm.RESIZE)
        for bitmap in self.bitmaps.values():
            bitmap.busy = True
        self.connections: set[Any] = set()
        self.shutting_down = False

    @property
    def node(self) -> BlockNode:
        """The exported node: its backend's, which a graph change may move."""
        return self.backend.node

    def _bitmap(self, node: BlockNode, entry: str | dict[str, str]) -> Any:
        """One ``BlockDirtyBitmapOrStr``, checked as QEMU does.

        A plain name is looked up on the exported node and the nodes it reads
        through; ``{"node", "name"}`` names any node's bitmap, and QEMU then
        skips the check that a read-only export's bitmap is not recording.
        That check comes before the busy one, as in QEMU.
        """
        if isinstance(entry, dict):
            _, bitmap = self.daemon.graph.dirty_bitmap(entry["node"], entry["name"])
        else:
            bitmap = find_bitmap(node, entry)
            if bitmap is None:
                raise QMPError(f"Bitmap '{entry}' is not found")
            if not self.writable and not node.read_only and bitmap.enabled:
                raise QMPError(f"Enabled bitmap '{entry}' incompatible with readonly export")
        bitmap.check_usable(readonly=False)
        return bitmap

    def info(self) -> dict[str, Any]:
        """``BlockExportInfo`` for query-block-exports."""
        return {"id": self.id, "type": "nbd", "node-name": self.node.node_name,
                "shutting-down": self.shutting_down}

    async def delete(self, hard: bool = True) -> None:
        """Disconnect clients (hard) or refuse while any are connected (safe)."""
        if not hard and self.connections:
            raise QMPError(f"export '{self.id}' still in use")
        self.shutting_down = True
        for conn in list(self.connections):
            conn.abort()
        for bitmap in self.bitmaps.values():
            bitmap.busy = False
        self.backend.close()
        self.daemon.exports.pop(self.id, None)
        self.daemon.emit("BLOCK_EXPORT_DELETED", {"id": self.id})
