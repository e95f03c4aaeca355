"""The shapes of ``query-named-block-nodes``, ``query-blockstats`` and the graph dump.

Members are inserted in QAPI declaration order; the JSON encoder turns
that into QEMU's output order.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable

from blockd.block.filename import has_protocol
from blockd.block.node import BlockNode, ChildLink, Perm
from blockd.block.stats import Stats
from blockd.errors import QMPError


def filter_or_cow(node: BlockNode) -> BlockNode | None:
    """The child QEMU's queries walk down: a filter's one child, else the backing file."""
    return node.filtered if node.is_filter else node.backing


def chain_depth(node: BlockNode) -> int:
    """Filters count as layers of the chain, as in QEMU's ``backing_file_depth``."""
    depth = 0
    cur = filter_or_cow(node)
    while cur is not None:
        depth += 1
        cur = filter_or_cow(cur)
    return depth


def _storage_dir(node: BlockNode) -> str | None:
    """The directory of the file under ``node`` (through filters and formats)."""
    while node.file is not None or node.is_filter:
        below = filter_or_cow(node) if node.is_filter else node.file
        if below is None:
            return None
        node = below
    name = node.exact_filename()
    return os.path.dirname(name) if name and not has_protocol(name) else None


def image_info(node: BlockNode, flat: bool) -> dict[str, Any]:
    """``ImageInfo`` of a node; with ``flat`` false, the backing chain nests."""
    if node.ejected():
        raise QMPError(f"Block device {node.node_name} is ejected")
    info: dict[str, Any] = {"filename": node.filename(), "format": node.driver}
    if node.has_info():
        info["dirty-flag"] = node.is_dirty()
    actual = node.allocated_file_size()
    if actual is not None:
        info["actual-size"] = actual
    info["virtual-size"] = node.length()
    cluster = node.cluster_size()
    if cluster is not None:
        info["cluster-size"] = cluster
    if node.encrypted():
        info["encrypted"] = True
    backing_name = node.backing_filename()
    if backing_name:
        info["backing-filename"] = backing_name
        # QEMU makes a relative name absolute; json: and protocol names stand as they are.
        full = backing_name if has_protocol(backing_name) else \
            node.backing.filename() if node.backing is not None and \
            not node.backing_overridden() else _full_name(node, backing_name)
        if full:
            info["full-backing-filename"] = full
        fmt = node.backing_format()
        if fmt:
            info["backing-filename-format"] = fmt
    snapshots = node.snapshots()
    if snapshots:
        info["snapshots"] = snapshots
    below = None if flat else filter_or_cow(node)
    if below is not None:
        info["backing-image"] = image_info(below, flat)
    specific = node.format_specific()
    if specific is not None:
        info["format-specific"] = specific
    return info


def _full_name(node: BlockNode, name: str) -> str | None:
    if os.path.isabs(name):
        return name
    where = _storage_dir(node)
    return os.path.join(where, name) if where is not None else None


def cache_info(node: BlockNode) -> dict[str, bool]:
    cache = node.options.get("cache", {})
    return {"writeback": True, "direct": bool(cache.get("direct", False)),
            "no-flush": bool(cache.get("no-flush", False))}


def block_device_info(node: BlockNode, flat: bool) -> dict[str, Any]:
    """``BlockDeviceInfo`` as ``query-named-block-nodes`` reports it."""
    info: dict[str, Any] = {"file": node.filename(), "node-name": node.node_name,
                            "ro": node.read_only, "drv": node.driver}
    backing = node.backing
    if backing is not None:
        # The node's name, not the image header's: they differ once the link changed
        # (and a relative name is resolved).
        info["backing_file"] = backing.filename()
    # QEMU stops walking the chain for flat output before it counts a layer.
    info["backing_file_depth"] = 0 if flat else chain_depth(node)
    info["encrypted"] = node.encrypted()
    info["detect_zeroes"] = node.options.get("detect-zeroes", "off")
    for key in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"):
        info[key] = 0
    info["image"] = image_info(node, flat)
    info["cache"] = cache_info(node)
    info["write_threshold"] = node.write_threshold.offset if node.write_threshold else 0
    bitmaps = node.dirty_bitmaps_info()
    if bitmaps:
        info["dirty-bitmaps"] = bitmaps
    return info


def stats_info(stats: Stats) -> dict[str, Any]:
    """``BlockDeviceStats`` from a node's counters."""
    out: dict[str, Any] = {
        "rd_bytes": stats.rd_bytes, "wr_bytes": stats.wr_bytes,
        "unmap_bytes": stats.unmap_bytes, "rd_operations": stats.rd_operations,
        "wr_operations": stats.wr_operations, "flush_operations": stats.flush_operations,
        "unmap_operations": stats.unmap_operations,
        "rd_total_time_ns": stats.rd_total_time_ns, "wr_total_time_ns": stats.wr_total_time_ns,
        "flush_total_time_ns": stats.flush_total_time_ns,
        "unmap_total_time_ns": stats.unmap_total_time_ns,
        "wr_highest_offset": stats.wr_highest_offset,
        "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0,
    }
    if stats.last_access_ns is not None:
        out["idle_time_ns"] = time.monotonic_ns() - stats.last_access_ns
    out.update({
        "failed_rd_operations": stats.failed_rd_operations,
        "failed_wr_operations": stats.failed_wr_operations,
        "failed_flush_operations": stats.failed_flush_operations,
        "failed_unmap_operations": stats.failed_unmap_operations,
        "invalid_rd_operations": 0, "invalid_wr_operations": 0,
        "invalid_flush_operations": 0, "invalid_unmap_operations": 0,
        "account_invalid": False, "account_failed": False,
        "timed_stats": [],
    })
    return out


#: ``BlockPermission`` names in QEMU's enum order.
_PERM_QAPI = ((Perm.CONSISTENT_READ, "consistent-read"), (Perm.WRITE, "write"),
              (Perm.WRITE_UNCHANGED, "write-unchanged"), (Perm.RESIZE, "resize"))


def _perm_list(perm: Perm) -> list[str]:
    # QEMU prepends while walking the enum, so its lists come out highest bit first.
    return [name for bit, name in reversed(_PERM_QAPI) if perm & bit]


def block_graph(nodes: Iterable[BlockNode]) -> dict[str, Any]:
    """``XDbgBlockGraph``: every user and node, every edge with its permissions.

    Ids are numbered as parents and children are first met, users first, as
    QEMU numbers them; both lists come out newest first, as QEMU prepends.
    """
    nodes = list(nodes)
    ids: dict[int, int] = {}
    out_nodes: list[dict[str, Any]] = []
    out_edges: list[dict[str, Any]] = []

    def num(obj: object) -> int:
        return ids.setdefault(id(obj), len(ids) + 1)

    def add(obj: object, kind: str, name: str, links: Iterable[ChildLink]) -> None:
        out_nodes.append({"id": num(obj), "type": kind, "name": name})
        for link in links:
            out_edges.append({"parent": num(obj), "child": num(link.child), "name": link.role,
                              "perm": _perm_list(link.perm),
                              "shared-perm": _perm_list(link.shared)})

    users: dict[int, list[ChildLink]] = {}
    for node in nodes:
        for link in node.parents:
            if not isinstance(link.parent, BlockNode):
                users.setdefault(id(link.parent), []).append(link)
    for links in users.values():
        user = links[0].parent
        add(user, user.graph_type, user.graph_name, links)
    for node in nodes:
        # A node's newest child heads QEMU's list of children.
        add(node, "block-driver", node.node_name, reversed(list(node.children.values())))
    out_nodes.reverse()
    out_edges.reverse()
    return {"nodes": out_nodes, "edges": out_edges}
