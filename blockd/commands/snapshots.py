"""Internal snapshot commands: take and delete qcow2 snapshots of a root node.

The checks run in QEMU's order, so the first one that fails decides the
error text, and a snapshot is stamped as qemu-storage-daemon stamps it.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from blockd.block import op_blockers
from blockd.block.node import BlockNode
from blockd.daemon import Daemon
from blockd.drivers.qcow2 import snapshot as qsnap
from blockd.drivers.qcow2.driver import Qcow2Node
from blockd.errors import QMPError
from blockd.qmp.registry import command


def root_node(daemon: Daemon, device: str) -> BlockNode:
    """The node named ``device``; it must not be another node's child (exports may use it)."""
    node = daemon.graph.nodes.get(device)
    if node is None:
        raise QMPError(f"Cannot find device='{device}' nor node-name='{device}'")
    if any(isinstance(link.parent, BlockNode) for link in node.parents):
        raise QMPError("Need a root block node")
    return node


@command("blockdev-snapshot-internal-sync")
async def snapshot_internal_sync(daemon: Daemon, args: dict[str, Any]) -> dict:
    await take(daemon, args)
    return {}


async def take(daemon: Daemon, args: dict[str, Any]) -> Callable[[], Awaitable[None]]:
    """Take the snapshot ``args`` asks for; returns what deletes it again (transactions)."""
    device, name = args["device"], args["name"]
    node = root_node(daemon, device)
    op_blockers.check(node, "internal-snapshot")
    if node.read_only:
        raise QMPError(f"Device '{device}' is read only")
    if not node.supports(BlockNode.snapshot_create):
        raise QMPError(f"Block format '{node.driver}' used by device '{device}' does not "
                       "support internal snapshots")
    if not name:
        raise QMPError("Name is empty")
    if any(sn["name"] == name for sn in node.snapshots()):
        raise QMPError(f"Snapshot with name '{name}' already exists on device '{device}'")
    try:
        sn = await node.snapshot_create(name, qsnap.now_qmp())
    except OSError as exc:
        raise QMPError(f"Failed to create snapshot '{name}' on device '{device}': "
                       f"{exc.strerror}") from None

    async def undo() -> None:
        await node.snapshot_delete(sn)
    return undo


@command("blockdev-snapshot-delete-internal-sync")
async def snapshot_delete_internal_sync(daemon: Daemon, args: dict[str, Any]) -> dict:
    device = args["device"]
    snap_id, name = args.get("id"), args.get("name")
    node = root_node(daemon, device)
    op_blockers.check(node, "internal-snapshot-delete")
    if snap_id is None and name is None:
        raise QMPError("Name or id must be provided")
    if not isinstance(node, Qcow2Node):
        raise QMPError("Failed to get a snapshot list: Operation not supported")
    sn = qsnap.find(node.image.snapshots, snap_id, name)
    if sn is None:
        raise QMPError(f"Snapshot with id '{'null' if snap_id is None else snap_id}' and name "
                       f"'{'null' if name is None else name}' does not exist on device "
                       f"'{device}'")
    if node.read_only:
        # QEMU drops the entry from its in-memory list before the write fails and
        # never puts it back: the snapshot stays on disk but is gone for this node.
        node.image.snapshots.remove(sn)
        raise QMPError("Failed to remove snapshot from snapshot list: Operation not permitted")
    try:
        await node.snapshot_delete(sn)
    except OSError as exc:
        raise QMPError(f"Failed to remove snapshot from snapshot list: {exc.strerror}") \
            from None
    return sn.info()
