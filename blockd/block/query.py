"""The shapes of ``query-named-block-nodes`` and ``query-blockstats``.

Members are inserted in QAPI declaration order; the JSON encoder turns
that into QEMU's output order.
"""

from __future__ import annotations

import time
from typing import Any

from blockd.block.filename import has_protocol
from blockd.block.node import BlockNode
from blockd.block.stats import Stats
from blockd.errors import QMPError


def chain_depth(node: BlockNode) -> int:
    depth = 0
    cur = node.backing
    while cur is not None:
        depth += 1
        cur = _format_below(cur).backing
    return depth


def _format_below(node: BlockNode) -> BlockNode:
    """Skip filters (QEMU reports the backing chain through them)."""
    while node.is_filter and node.file is not None:
        node = node.file
    return node


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
            node.backing.filename() if node.backing is not None else None
        if full:
            info["full-backing-filename"] = full
        fmt = node.backing_format()
        if fmt:
            info["backing-filename-format"] = fmt
    snapshots = node.snapshots()
    if snapshots:
        info["snapshots"] = snapshots
    if not flat and node.backing is not None:
        info["backing-image"] = image_info(node.backing, flat)
    specific = node.format_specific()
    if specific is not None:
        info["format-specific"] = specific
    return info


def cache_info(node: BlockNode) -> dict[str, bool]:
    cache = node.options.get("cache", {})
    return {"writeback": True, "direct": bool(cache.get("direct", False)),
            "no-flush": bool(cache.get("no-flush", False))}


def block_device_info(node: BlockNode, flat: bool) -> dict[str, Any]:
    """``BlockDeviceInfo`` as ``query-named-block-nodes`` reports it."""
    info: dict[str, Any] = {"file": node.filename(), "node-name": node.node_name,
                            "ro": node.read_only, "drv": node.driver}
    backing_name = node.backing_filename()
    if backing_name:
        # QEMU names the backing node's file once one is attached (a relative name
        # resolved), the image's own record otherwise.
        backing = node.backing
        info["backing_file"] = backing.filename() if backing is not None else backing_name
    # QEMU stops walking the chain for flat output before it counts a layer.
    info["backing_file_depth"] = 0 if flat else chain_depth(node)
    info["encrypted"] = node.encrypted()
    info["detect_zeroes"] = node.options.get("detect-zeroes", "off")
    for key in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"):
        info[key] = 0
    info["image"] = image_info(node, flat)
    info["cache"] = cache_info(node)
    info["write_threshold"] = 0
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
