"""Node graph commands: add, delete, query, reopen, resize, stats."""

from __future__ import annotations

from typing import Any

from blockd.block import op_blockers
from blockd.block.backend import Backend
from blockd.block.graph import check_common_options
from blockd.block.node import BlockNode, Perm
from blockd.block.query import block_device_info, block_graph, stats_info
from blockd.block.reopen import reopen
from blockd.daemon import Daemon
from blockd.errors import QMPError
from blockd.qmp.registry import command


async def add_node(daemon: Daemon, options: dict[str, Any]) -> BlockNode:
    """``blockdev-add`` body, shared with ``--blockdev`` on the command line."""
    check_common_options(options)
    return await daemon.graph.open_node(options)


@command("blockdev-add")
async def blockdev_add(daemon: Daemon, args: dict[str, Any]) -> dict:
    await add_node(daemon, args)
    return {}


@command("blockdev-del")
async def blockdev_del(daemon: Daemon, args: dict[str, Any]) -> dict:
    await daemon.graph.blockdev_del(args["node-name"])
    return {}


@command("query-named-block-nodes")
async def query_named_block_nodes(daemon: Daemon, args: dict[str, Any]) -> list:
    flat = args.get("flat", False)
    return [block_device_info(node, flat) for node in reversed(list(daemon.graph))]


@command("query-block")
async def query_block(daemon: Daemon, args: dict[str, Any]) -> list:
    """Named block backends only; like qemu-storage-daemon, blockd has none."""
    return []


@command("x-debug-query-block-graph")
async def x_debug_query_block_graph(daemon: Daemon, args: dict[str, Any]) -> dict:
    return block_graph(daemon.graph)


@command("query-blockstats")
async def query_blockstats(daemon: Daemon, args: dict[str, Any]) -> list:
    if not args.get("query-nodes", False):
        return []
    return [node_stats(node) for node in daemon.graph]


def node_stats(node: BlockNode) -> dict[str, Any]:
    """``BlockStats`` of one node, with its storage child's stats as ``parent``."""
    out: dict[str, Any] = {"node-name": node.node_name, "stats": stats_info(node.stats)}
    if node.file is not None:
        out["parent"] = node_stats(node.file)
    specific = node.driver_stats()
    if specific is not None:
        out["driver-specific"] = specific
    return out


@command("block_resize")
async def block_resize(daemon: Daemon, args: dict[str, Any]) -> dict:
    device, node_name = args.get("device"), args.get("node-name")
    node = daemon.graph.nodes.get(node_name) if node_name is not None and device is None else None
    if node is None:
        raise QMPError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")
    size = args["size"]
    if size < 0:
        raise QMPError("Parameter 'size' expects a >0 size")
    if op_blockers.blocker_of(node, "resize") is not None:
        # QEMU names the device argument, which is null when the node is named.
        raise QMPError(f"Device '{'(null)' if device is None else device}' is in use")
    if node.read_only:
        raise QMPError("Image is read-only")
    user = Backend(daemon.graph, node, "an unnamed block device", Perm.RESIZE, Perm.all())
    try:
        await user.link.truncate(size, exact=False, prealloc="off")
    except OSError as exc:
        raise QMPError(f"Could not resize: {exc.strerror}") from None
    finally:
        user.close()
    return {}


@command("blockdev-reopen")
async def blockdev_reopen(daemon: Daemon, args: dict[str, Any]) -> dict:
    await reopen(daemon.graph, args["options"])
    return {}
