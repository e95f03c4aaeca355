"""Node graph commands: add, delete, query, reopen, resize, stats."""

from __future__ import annotations

from typing import Any

from blockd.block.backend import Backend
from blockd.block.node import BlockNode, Perm
from blockd.block.query import block_device_info, stats_info
from blockd.daemon import Daemon
from blockd.errors import QMPError
from blockd.qmp.registry import command


def check_common_options(options: dict[str, Any]) -> None:
    """Cross-member rules of ``BlockdevOptions`` that a schema cannot state."""
    if options.get("detect-zeroes") == "unmap" and options.get("discard", "ignore") != "unmap":
        raise QMPError("setting detect-zeroes to unmap is not allowed without setting "
                       "discard operation to unmap")
    if options.get("force-share") and not options.get("read-only", False):
        raise QMPError("force-share=on can only be used with read-only images")


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
    if node.read_only:
        raise QMPError("Image is read-only")
    user = Backend(daemon.graph, node, "an unnamed block device", Perm.RESIZE, Perm.all())
    try:
        await user.link.truncate(size, exact=False, prealloc="off")
    except OSError as exc:
        raise QMPError(f"Could not resize: {exc.strerror}") from None
    finally:
        user.close()
    _resize_bitmaps(node)
    return {}


def _resize_bitmaps(node: BlockNode) -> None:
    """Bitmaps follow their node's new size, and those of storage below that changed too."""
    for bitmap in node.bitmaps.values():
        if bitmap.size != node.length():
            bitmap.resize(node.length())
    for link in node.children.values():
        if link.role != "backing":
            _resize_bitmaps(link.child)


@command("blockdev-reopen")
async def blockdev_reopen(daemon: Daemon, args: dict[str, Any]) -> dict:
    await reopen(daemon, args["options"])
    return {}


async def reopen(daemon: Daemon, entries: list[dict[str, Any]]) -> None:
    """Reopen several nodes atomically: all prepare, then all commit or all abort."""
    graph = daemon.graph
    plan: list[tuple[BlockNode, dict[str, Any], bool]] = []
    seen: set[str] = set()
    for options in entries:
        name = options.get("node-name")
        if name is None:
            raise QMPError("node-name not specified")
        node = graph.nodes.get(name)
        if node is None:
            raise QMPError(f"Failed to find node with node-name='{name}'")
        if name in seen:
            raise QMPError(f"Node '{name}' is listed twice in the reopen queue")
        seen.add(name)
        if options["driver"] != node.driver:
            raise QMPError("Cannot change the option 'driver'")
        check_common_options(options)
        plan.append((node, options, bool(options.get("read-only", False))))
    _check_children_unchanged(graph, plan)
    _add_implicit_children(graph, plan)
    # Nodes going read-only must not have writers above them.
    for node, _, ro in plan:
        if ro and not node.read_only:
            _check_no_writers(node, plan)
    for node, _, ro in plan:
        if ro and not node.read_only:
            await node.flush()
    prepared: list[tuple[BlockNode, Any]] = []
    try:
        for node, options, ro in plan:
            prepared.append((node, await node.reopen_prepare(options, ro)))
    except BaseException:
        for node, state in reversed(prepared):
            await node.reopen_abort(state)
        raise
    old = [(node, node.options, node.read_only) for node, _, _ in plan]
    # Children commit first, so a parent becoming writable finds its storage writable.
    entries = sorted(zip(prepared, plan), key=lambda e: _height(e[0][0]))
    for (node, state), (_, options, ro) in entries:
        await node.reopen_commit(state, options, ro)
    try:
        for node, _, _ in plan:
            graph.refresh(node)
    except QMPError:
        # Permissions refused (e.g. an image lock): restore the old options.
        for node, options, ro in old:
            state = await node.reopen_prepare(options, ro)
            await node.reopen_commit(state, options, ro)
            graph.refresh(node)
        raise


def _height(node: BlockNode) -> int:
    """Longest path down to a leaf: storage sorts before the formats above it."""
    return 1 + max((_height(link.child) for link in node.children.values()), default=0)


def _add_implicit_children(graph: Any, plan: list[tuple[BlockNode, dict[str, Any], bool]]) -> None:
    """Children a node created inline follow its read-only change, as in QEMU."""
    listed = {node.node_name for node, _, _ in plan}
    i = 0
    while i < len(plan):  # grows as children join, so grandchildren follow too
        node, _, ro = plan[i]
        i += 1
        for link in node.children.values():
            child = link.child
            if child.node_name in graph.implicit and child.node_name not in listed \
                    and link.role != "backing" and child.read_only != ro:
                plan.append((child, {**child.options, "read-only": ro}, ro))
                listed.add(child.node_name)


def _check_children_unchanged(graph: Any, plan: list[tuple[BlockNode, dict[str, Any], bool]]) -> None:
    """Children given by reference must be the ones the node already has."""
    for node, options, _ in plan:
        for role in ("file", "data-file", "image"):
            link = node.children.get(role)
            if link is None or role not in options:
                continue
            ref = options[role]
            if isinstance(ref, str):
                graph.lookup_node(ref)
            else:
                raise QMPError(f"Cannot change the option '{role}'")
            if ref != link.child.node_name:
                raise QMPError(f"Cannot change the option '{role}'")


def _check_no_writers(node: BlockNode, plan: list[tuple[BlockNode, dict[str, Any], bool]]) -> None:
    read_only_after = {n.node_name for n, _, ro in plan if ro}
    for link in node.parents:
        parent = link.parent
        if not link.perm & Perm.WRITE:
            continue
        if isinstance(parent, BlockNode) and parent.node_name in read_only_after:
            continue
        # The topmost node QEMU names is the one whose users still write.
        raise QMPError(f"Read-only block node '{_top_writer_node(node, read_only_after)}' "
                       "cannot support read-write users")


def _top_writer_node(node: BlockNode, read_only_after: set[str]) -> str:
    for link in node.parents:
        parent = link.parent
        if isinstance(parent, BlockNode) and link.perm & Perm.WRITE and parent.node_name in read_only_after:
            return _top_writer_node(parent, read_only_after)
    return node.node_name
