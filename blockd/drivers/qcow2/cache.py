"""Sizing the metadata caches from the qcow2 runtime options, with QEMU's rules."""

from __future__ import annotations

from typing import Any

from blockd.drivers.qcow2.header import Header
from blockd.errors import QMPError

#: QEMU's default ceiling for the L2 cache on Linux.
DEFAULT_L2_CACHE_MAX = 32 << 20


def cache_sizes(options: dict[str, Any], h: Header) -> int:
    """Check the cache options and return how many L2 tables to keep in memory.

    By default the cache covers the whole virtual disk up to 32 MiB of
    tables, which is QEMU's choice: a miss costs a read per request.
    """
    cs = h.cluster_size
    entry_size = options.get("l2-cache-entry-size", cs)
    if entry_size < 512 or entry_size > cs or entry_size & (entry_size - 1):
        raise QMPError(f"L2 cache entry size must be a power of two between 512 and the "
                       f"cluster size ({cs})")
    combined = options.get("cache-size")
    l2 = options.get("l2-cache-size")
    refcount = options.get("refcount-cache-size")
    if combined is not None and l2 is not None and refcount is not None:
        raise QMPError("cache-size, l2-cache-size and refcount-cache-size may not be set "
                       "at the same time")
    if combined is not None:
        if l2 is not None and l2 > combined:
            raise QMPError("l2-cache-size may not exceed cache-size")
        if refcount is not None and refcount > combined:
            raise QMPError("refcount-cache-size may not exceed cache-size")
        if l2 is None:
            l2 = combined - (refcount if refcount is not None else 4 * cs)
    entry_bytes = 16 if h.extended_l2 else 8
    covering = -(-h.size // cs) * entry_bytes
    if l2 is None:
        l2 = min(covering, DEFAULT_L2_CACHE_MAX)
    interval = options.get("cache-clean-interval", 600)
    if interval < 0 or interval > 0xFFFFFFFF:
        raise QMPError(f"Cache clean interval too big")
    return max(2, -(-l2 // cs))
