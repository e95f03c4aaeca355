"""Node graph commands: add, delete, query, reopen, resize, stats."""

from __future__ import annotations

from typing import Any

from blockd.block import op_blockers
from blockd.block.backend import Backend
from blockd.block.graph import check_common_options
from blockd.block.node import BlockNode, Perm
from blockd.block.query import block_device_info, block_graph, stats_info
from blockd.block.reopen import reopen
from blockd.block.write_threshold import threshold_of
from blockd.commands.snapshots import root_node
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


@command("block-set-write-threshold")
async def block_set_write_threshold(daemon: Daemon, args: dict[str, Any]) -> dict:
    node = daemon.graph.nodes.get(args["node-name"])
    if node is None:
        raise QMPError(f"Device '{args['node-name']}' not found")
    threshold_of(node, daemon.emit).set(args["write-threshold"])
    return {}


def _in_chain(top: BlockNode, node: BlockNode) -> bool:
    """Whether ``node`` is ``top`` or below it through backing files and filters."""
    current: BlockNode | None = top
    while current is not None:
        if current is node:
            return True
        current = current.backing if current.backing is not None else current.filtered
    return False


@command("change-backing-file")
async def change_backing_file(daemon: Daemon, args: dict[str, Any]) -> dict:
    """Rewrite the backing file name in an image's header; the open chain stays as it
    is (a read-only image is made writable for the change, then read-only again)."""
    device, name = args["device"], args["backing-file"]
    root = root_node(daemon, device)
    image = daemon.graph.lookup_node(args["image-node-name"])
    if image.backing is None:
        raise QMPError("not allowing backing file change on an image without a backing file")
    op_blockers.check(root, "change")
    if not _in_chain(root, image):
        raise QMPError(f"'{device}' and image file are not in the same chain")
    read_only = image.read_only
    # The node's own options, its links as they are, and only read-only-ness changed.
    same = {**image.options, "node-name": image.node_name,
            "backing": image.backing.node_name}
    if read_only:
        await reopen(daemon.graph, [{**same, "read-only": False}])
    try:
        backing = image.backing
        await image.change_backing_file(name, backing.driver if backing is not None else None)
        if image.auto_backing_file is not None:
            image.auto_backing_file = name
    except OSError as exc:
        raise QMPError(f"Could not change backing file to '{name}': {exc.strerror}") from None
    finally:
        if read_only:
            await reopen(daemon.graph, [{**same, "read-only": True}])
    return {}
