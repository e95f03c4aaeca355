"""Dirty bitmap commands, and their actions (with the internal snapshot's) in ``transaction``."""

from __future__ import annotations

from typing import Any, Protocol

from blockd.block.dirty_bitmap import MAX_NAME, DirtyBitmap
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.commands import snapshots
from blockd.commands.transaction import Commit, Transaction, Undo, action, nothing
from blockd.errors import QMPError
from blockd.qmp.registry import command

DEFAULT_GRANULARITY = 65536


class GraphOwner(Protocol):
    """What the bitmap commands use of the daemon: its graph (``blockd-img bitmap`` and
    ``convert --bitmaps`` run them on their own)."""

    graph: BlockGraph


def _node(daemon: GraphOwner, name: str) -> BlockNode:
    node = daemon.graph.nodes.get(name)
    if node is None:
        raise QMPError(f"Cannot find device='{name}' nor node-name='{name}'")
    return node


def _find(daemon: GraphOwner, node_name: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    return daemon.graph.dirty_bitmap(node_name, name)


def default_granularity(node: BlockNode) -> int:
    """The node's cluster size clamped to 4 KiB..64 KiB, else 64 KiB: QEMU's choice."""
    cluster = node.cluster_size()
    if cluster:
        return min(DEFAULT_GRANULARITY, max(4096, cluster))
    return DEFAULT_GRANULARITY


def _prepare_add(daemon: GraphOwner, args: dict[str, Any]) -> tuple[BlockNode, DirtyBitmap]:
    """Check an add in QEMU's order (the first failing check decides the error)."""
    name = args["name"]
    if not name:
        raise QMPError("Bitmap name cannot be empty")
    node = _node(daemon, args["node"])
    granularity = args.get("granularity")
    if granularity is None:
        granularity = default_granularity(node)
    elif granularity < 512 or granularity & (granularity - 1):
        raise QMPError("Granularity must be power of 2 and at least 512")
    persistent = args.get("persistent", False)
    if persistent:
        node.check_bitmap_storable(name, granularity)
    if name in node.bitmaps:
        raise QMPError(f"Bitmap already exists: {name}")
    if len(name.encode()) > MAX_NAME:
        raise QMPError(f"Bitmap name too long: {name}")
    bitmap = DirtyBitmap(name, node.length(), granularity, persistent=persistent,
                         enabled=not args.get("disabled", False))
    return node, bitmap


def _add_to(node: BlockNode, bitmap: DirtyBitmap) -> None:
    # Newest first, as QEMU lists them.
    node.bitmaps = {bitmap.name: bitmap, **node.bitmaps}


@command("block-dirty-bitmap-add")
async def bitmap_add(daemon: GraphOwner, args: dict[str, Any]) -> dict:
    _add_to(*_prepare_add(daemon, args))
    return {}


@command("block-dirty-bitmap-remove")
async def bitmap_remove(daemon: GraphOwner, args: dict[str, Any]) -> dict:
    node, bitmap = _find(daemon, args["node"], args["name"])
    bitmap.check_usable(inconsistent=False)
    await _release(node, bitmap)
    return {}


async def _release(node: BlockNode, bitmap: DirtyBitmap) -> None:
    """Drop a bitmap, and its stored copy if persistent; on failure keep it as it was."""
    await _unstore(node, bitmap)
    del node.bitmaps[bitmap.name]


async def _unstore(node: BlockNode, bitmap: DirtyBitmap) -> None:
    """Remove a persistent bitmap's stored copy; the bitmap itself stays in memory.

    The format rewrites its bitmap directory from ``node.bitmaps``, so the
    bitmap is left out of the dict while the format works.
    """
    if not bitmap.persistent:
        return
    before = dict(node.bitmaps)
    del node.bitmaps[bitmap.name]
    try:
        await node.remove_stored_bitmap(bitmap.name)
    except OSError as exc:
        raise QMPError(f"Failed to remove bitmap '{bitmap.name}' from the image: "
                       f"{exc.strerror}") from None
    finally:
        node.bitmaps = before


@command("block-dirty-bitmap-clear")
async def bitmap_clear(daemon: GraphOwner, args: dict[str, Any]) -> dict:
    _, bitmap = _find(daemon, args["node"], args["name"])
    bitmap.check_usable()
    bitmap.clear()
    return {}


@command("block-dirty-bitmap-enable")
async def bitmap_enable(daemon: GraphOwner, args: dict[str, Any]) -> dict:
    _, bitmap = _find(daemon, args["node"], args["name"])
    bitmap.check_usable(readonly=False)
    bitmap.enabled = True
    return {}


@command("block-dirty-bitmap-disable")
async def bitmap_disable(daemon: GraphOwner, args: dict[str, Any]) -> dict:
    _, bitmap = _find(daemon, args["node"], args["name"])
    bitmap.check_usable(readonly=False)
    bitmap.enabled = False
    return {}


def _merge_sources(daemon: GraphOwner,
                   args: dict[str, Any]) -> tuple[DirtyBitmap, list[DirtyBitmap]]:
    """Resolve and check a merge's target and sources; nothing changes yet."""
    node, target = _find(daemon, args["node"], args["target"])
    target.check_usable()
    sources = []
    for src in args["bitmaps"]:
        if isinstance(src, str):
            bitmap = node.bitmaps.get(src)
            if bitmap is None:
                raise QMPError(f"Dirty bitmap '{src}' not found")
        else:
            _, bitmap = _find(daemon, src["node"], src["name"])
        bitmap.check_usable(readonly=False)
        if bitmap.size != target.size:
            raise QMPError(f"Bitmaps are of different sizes (destination size is {target.size}, "
                           f"source size is {bitmap.size}) and can't be merged")
        sources.append(bitmap)
    return target, sources


@command("block-dirty-bitmap-merge")
async def bitmap_merge(daemon: GraphOwner, args: dict[str, Any]) -> dict:
    target, sources = _merge_sources(daemon, args)
    for src in sources:
        target.merge_from(src)
    return {}


@command("x-debug-block-dirty-bitmap-sha256")
async def bitmap_sha256(daemon: GraphOwner, args: dict[str, Any]) -> dict:
    _, bitmap = _find(daemon, args["node"], args["name"])
    return {"sha256": bitmap.sha256()}


# ---- transaction actions --------------------------------------------------------------


def _restore_bits(bitmap: DirtyBitmap) -> Undo:
    saved = bytes(bitmap.bits)
    return lambda: bitmap.bits.__setitem__(slice(None), saved)


@action("blockdev-snapshot-internal-sync")
async def _tx_snapshot(txn: Transaction, data: dict[str, Any]) -> tuple[Undo, Commit]:
    return await snapshots.take(txn.daemon, data), nothing


@action("block-dirty-bitmap-add")
async def _tx_add(txn: Transaction, data: dict[str, Any]) -> tuple[Undo, Commit]:
    node, bitmap = _prepare_add(txn.daemon, data)
    _add_to(node, bitmap)
    return (lambda: node.bitmaps.pop(bitmap.name, None)), nothing


@action("block-dirty-bitmap-merge")
async def _tx_merge(txn: Transaction, data: dict[str, Any]) -> tuple[Undo, Commit]:
    target, sources = _merge_sources(txn.daemon, data)
    undo = _restore_bits(target)
    for src in sources:
        target.merge_from(src)
    return undo, nothing


@action("block-dirty-bitmap-remove")
async def _tx_remove(txn: Transaction, data: dict[str, Any]) -> tuple[Undo, Commit]:
    """Drops the stored copy at once (QEMU does, and does not restore it on abort: the
    bitmap is stored again on close) but keeps the bitmap, busy, until the commit."""
    node, bitmap = _find(txn.daemon, data["node"], data["name"])
    bitmap.check_usable(inconsistent=False)
    await _unstore(node, bitmap)
    bitmap.busy = True

    async def remove() -> None:
        bitmap.busy = False
        node.bitmaps.pop(bitmap.name, None)
    return (lambda: setattr(bitmap, "busy", False)), remove


@action("block-dirty-bitmap-clear")
async def _tx_clear(txn: Transaction, data: dict[str, Any]) -> tuple[Undo, Commit]:
    _, bitmap = _find(txn.daemon, data["node"], data["name"])
    bitmap.check_usable()
    undo = _restore_bits(bitmap)
    bitmap.clear()
    return undo, nothing


async def _tx_set_enabled(txn: Transaction, data: dict[str, Any],
                          enabled: bool) -> tuple[Undo, Commit]:
    _, bitmap = _find(txn.daemon, data["node"], data["name"])
    bitmap.check_usable(readonly=False)
    was = bitmap.enabled
    bitmap.enabled = enabled
    return (lambda: setattr(bitmap, "enabled", was)), nothing


@action("block-dirty-bitmap-enable")
async def _tx_enable(txn: Transaction, data: dict[str, Any]) -> tuple[Undo, Commit]:
    return await _tx_set_enabled(txn, data, True)


@action("block-dirty-bitmap-disable")
async def _tx_disable(txn: Transaction, data: dict[str, Any]) -> tuple[Undo, Commit]:
    return await _tx_set_enabled(txn, data, False)

