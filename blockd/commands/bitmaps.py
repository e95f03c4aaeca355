"""Dirty bitmap commands and the ``transaction`` that groups them."""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable, Protocol

from blockd.block.dirty_bitmap import MAX_NAME, DirtyBitmap
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.commands import snapshots
from blockd.daemon import Daemon
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


# ---- transaction ---------------------------------------------------------------------

#: Puts things back as they were before an action, when a later one fails.
Undo = Callable[[], Awaitable[None] | None]
#: Finishes an action once every action has succeeded.
Commit = Callable[[], Awaitable[None]]

async def _nothing() -> None:
    pass


def _restore_bits(bitmap: DirtyBitmap) -> Undo:
    saved = bytes(bitmap.bits)
    return lambda: bitmap.bits.__setitem__(slice(None), saved)


async def _tx_action(daemon: Daemon, kind: str, data: dict[str, Any],
                     grouped: bool) -> tuple[Undo, Commit]:
    """Do one action's visible part now (raise to fail the transaction).

    Like QEMU, every action takes effect at once and is undone if a later
    one fails.  A removal drops the stored copy at once (QEMU does, and
    does not restore it on abort: the bitmap is stored again on close)
    but keeps the bitmap, busy, until the commit.
    """
    if kind == "abort":
        raise QMPError("Transaction aborted using Abort action")
    if grouped:
        raise QMPError(f"Action '{kind}' does not support Transaction property "
                       "completion-mode = grouped")
    if kind == "blockdev-snapshot-internal-sync":
        return await snapshots.take(daemon, data), _nothing
    if kind == "block-dirty-bitmap-add":
        node, bitmap = _prepare_add(daemon, data)
        _add_to(node, bitmap)
        return (lambda: node.bitmaps.pop(bitmap.name, None)), _nothing
    if kind == "block-dirty-bitmap-merge":
        target, sources = _merge_sources(daemon, data)
        undo = _restore_bits(target)
        for src in sources:
            target.merge_from(src)
        return undo, _nothing
    node, bitmap = _find(daemon, data["node"], data["name"])
    if kind == "block-dirty-bitmap-remove":
        bitmap.check_usable(inconsistent=False)
        await _unstore(node, bitmap)
        bitmap.busy = True

        async def remove() -> None:
            bitmap.busy = False
            node.bitmaps.pop(bitmap.name, None)
        return (lambda: setattr(bitmap, "busy", False)), remove
    if kind == "block-dirty-bitmap-clear":
        bitmap.check_usable()
        undo = _restore_bits(bitmap)
        bitmap.clear()
        return undo, _nothing
    bitmap.check_usable(readonly=False)
    was = bitmap.enabled
    bitmap.enabled = kind == "block-dirty-bitmap-enable"
    return (lambda: setattr(bitmap, "enabled", was)), _nothing


@command("transaction")
async def transaction(daemon: Daemon, args: dict[str, Any]) -> dict:
    """All actions or none: each applies in order; a failure undoes those before it."""
    grouped = args.get("properties", {}).get("completion-mode") == "grouped"
    undos: list[Undo] = []
    commits: list[Commit] = []
    try:
        # TransactionActionKind lists only the actions below (not QEMU's backup and
        # external snapshot ones), so others never get here.
        for action in args["actions"]:
            undo, commit = await _tx_action(daemon, action["type"], action["data"], grouped)
            undos.append(undo)
            commits.append(commit)
    except QMPError:
        for undo in reversed(undos):
            pending = undo()
            if inspect.isawaitable(pending):
                await pending
        raise
    for commit in commits:
        await commit()
    return {}

