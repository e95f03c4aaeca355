"""Dirty bitmap commands and the ``transaction`` that groups them."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from blockd.block.dirty_bitmap import MAX_NAME, DirtyBitmap
from blockd.block.node import BlockNode
from blockd.daemon import Daemon
from blockd.errors import QMPError
from blockd.qmp.registry import command

DEFAULT_GRANULARITY = 65536


def _node(daemon: Daemon, name: str) -> BlockNode:
    node = daemon.graph.nodes.get(name)
    if node is None:
        raise QMPError(f"Cannot find device='{name}' nor node-name='{name}'")
    return node


def _find(daemon: Daemon, node_name: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    node = _node(daemon, node_name)
    bitmap = node.bitmaps.get(name)
    if bitmap is None:
        raise QMPError(f"Dirty bitmap '{name}' not found")
    return node, bitmap


def default_granularity(node: BlockNode) -> int:
    """The node's cluster size (at least 4 KiB), else 64 KiB: QEMU's choice."""
    cluster = node.cluster_size()
    if cluster:
        return max(4096, 1 << (cluster - 1).bit_length())
    return DEFAULT_GRANULARITY


def _prepare_add(daemon: Daemon, args: dict[str, Any]) -> tuple[BlockNode, DirtyBitmap]:
    node = _node(daemon, args["node"])
    name = args["name"]
    if not name:
        raise QMPError("Bitmap name cannot be empty")
    if len(name) > MAX_NAME:
        raise QMPError(f"Bitmap name too long: {name}")
    granularity = args.get("granularity", default_granularity(node))
    if granularity < 512 or granularity & (granularity - 1):
        raise QMPError("Granularity must be power of 2 and at least 512")
    if name in node.bitmaps:
        raise QMPError(f"Bitmap already exists: {name}")
    persistent = args.get("persistent", False)
    if persistent:
        node.check_bitmap_storable(name, granularity)
    bitmap = DirtyBitmap(name, node.length(), granularity, persistent=persistent,
                         enabled=not args.get("disabled", False))
    return node, bitmap


def _add_to(node: BlockNode, bitmap: DirtyBitmap) -> None:
    # Newest first, as QEMU lists them.
    node.bitmaps = {bitmap.name: bitmap, **node.bitmaps}


@command("block-dirty-bitmap-add")
async def bitmap_add(daemon: Daemon, args: dict[str, Any]) -> dict:
    _add_to(*_prepare_add(daemon, args))
    return {}


@command("block-dirty-bitmap-remove")
async def bitmap_remove(daemon: Daemon, args: dict[str, Any]) -> dict:
    node, bitmap = _find(daemon, args["node"], args["name"])
    bitmap.check_usable(busy_only=True)
    del node.bitmaps[bitmap.name]
    if bitmap.persistent:
        await node.remove_stored_bitmap(bitmap.name)
    return {}


@command("block-dirty-bitmap-clear")
async def bitmap_clear(daemon: Daemon, args: dict[str, Any]) -> dict:
    _, bitmap = _find(daemon, args["node"], args["name"])
    bitmap.check_usable()
    bitmap.clear()
    return {}


@command("block-dirty-bitmap-enable")
async def bitmap_enable(daemon: Daemon, args: dict[str, Any]) -> dict:
    _, bitmap = _find(daemon, args["node"], args["name"])
    bitmap.check_usable(allow_readonly=True)
    bitmap.enabled = True
    return {}


@command("block-dirty-bitmap-disable")
async def bitmap_disable(daemon: Daemon, args: dict[str, Any]) -> dict:
    _, bitmap = _find(daemon, args["node"], args["name"])
    bitmap.check_usable(allow_readonly=True)
    bitmap.enabled = False
    return {}


def _merge_sources(daemon: Daemon, args: dict[str, Any]) -> tuple[DirtyBitmap, list[DirtyBitmap]]:
    _, target = _find(daemon, args["node"], args["target"])
    target.check_usable()
    sources = []
    for src in args["bitmaps"]:
        if isinstance(src, str):
            _, bitmap = _find(daemon, args["node"], src)
        else:
            _, bitmap = _find(daemon, src["node"], src["name"])
        if bitmap.inconsistent:
            raise QMPError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")
        sources.append(bitmap)
    return target, sources


@command("block-dirty-bitmap-merge")
async def bitmap_merge(daemon: Daemon, args: dict[str, Any]) -> dict:
    target, sources = _merge_sources(daemon, args)
    for src in sources:
        target.merge_from(src)
    return {}


@command("x-debug-block-dirty-bitmap-sha256")
async def bitmap_sha256(daemon: Daemon, args: dict[str, Any]) -> dict:
    _, bitmap = _find(daemon, args["node"], args["name"])
    return {"sha256": bitmap.sha256()}


# ---- transaction ---------------------------------------------------------------------

Undo = Callable[[], None]


def _tx_action(daemon: Daemon, kind: str, data: dict[str, Any]) -> tuple[Callable[[], None], Undo]:
    """Check an action now (raise to abort), return (commit, undo) closures."""
    if kind == "abort":
        raise QMPError("Transaction aborted using Abort action")
    if kind == "block-dirty-bitmap-add":
        node, bitmap = _prepare_add(daemon, data)
        return (lambda: _add_to(node, bitmap)), (lambda: node.bitmaps.pop(bitmap.name, None))
    if kind == "block-dirty-bitmap-merge":
        target, sources = _merge_sources(daemon, data)
        saved = bytes(target.bits)

        def merge() -> None:
            for src in sources:
                target.merge_from(src)
        return merge, (lambda: target.bits.__setitem__(slice(None), saved))
    node, bitmap = _find(daemon, data["node"], data["name"])
    if kind == "block-dirty-bitmap-remove":
        bitmap.check_usable(busy_only=True)
        old = dict(node.bitmaps)
        return (lambda: node.bitmaps.pop(bitmap.name, None)), \
            (lambda: setattr(node, "bitmaps", old))
    if kind == "block-dirty-bitmap-clear":
        bitmap.check_usable()
        saved = bytes(bitmap.bits)
        return bitmap.clear, (lambda: bitmap.bits.__setitem__(slice(None), saved))
    if kind in ("block-dirty-bitmap-enable", "block-dirty-bitmap-disable"):
        bitmap.check_usable(allow_readonly=True)
        was = bitmap.enabled
        want = kind.endswith("enable")
        return (lambda: setattr(bitmap, "enabled", want)), \
            (lambda: setattr(bitmap, "enabled", was))
    raise QMPError(f"Action '{kind}' is not supported by blockd")


@command("transaction")
async def transaction(daemon: Daemon, args: dict[str, Any]) -> dict:
    """All actions or none: each is checked and applied in order, undone on a failure."""
    done: list[Undo] = []
    try:
        for action in args["actions"]:
            commit, undo = _tx_action(daemon, action["type"], action.get("data", {}))
            commit()
            done.append(undo)
    except QMPError:
        for undo in reversed(done):
            undo()
        raise
    removed = [a["data"] for a in args["actions"] if a["type"] == "block-dirty-bitmap-remove"]
    for data in removed:
        node = daemon.graph.nodes[data["node"]]
        await node.remove_stored_bitmap(data["name"])
    return {}
