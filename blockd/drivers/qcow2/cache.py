"""Metadata caches of an open qcow2 image and their sizing from the runtime options.

L2 tables are cached in slices of ``l2-cache-entry-size`` bytes so that
a random access to a big image reads (and keeps) only the slice it
needs; refcount blocks are cached whole.  Metadata is written through
to the file when it changes, so dropping an entry never loses anything:
that keeps eviction, ``cache-clean-interval`` and discarded tables
simple.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from blockd.drivers.qcow2.header import Header
from blockd.errors import QMPError

#: QEMU's default ceiling for the L2 cache on Linux.
DEFAULT_L2_CACHE_MAX = 32 << 20
#: Minimum entries QEMU keeps in each cache.
MIN_L2_ENTRIES = 2
MIN_REFCOUNT_CLUSTERS = 4
INT_MAX = (1 << 31) - 1
DEFAULT_CLEAN_INTERVAL = 600


@dataclasses.dataclass
class CacheConfig:
    l2_entries: int
    l2_entry_size: int
    refcount_entries: int
    clean_interval: int


def cache_config(options: dict[str, Any], h: Header) -> CacheConfig:
    """Check the cache options as QEMU does (same order, same messages) and size the caches.

    By default the L2 cache covers the whole virtual disk up to 32 MiB of
    tables, QEMU's choice since a miss costs a read per request; the
    refcount cache stays minimal because allocation touches few blocks.
    """
    cs = h.cluster_size
    combined = options.get("cache-size")
    l2_max = options.get("l2-cache-size")
    refcount = options.get("refcount-cache-size")
    entry_bytes = 16 if h.extended_l2 else 8
    max_l2 = -(-(-(-h.size // cs) * entry_bytes) // cs) * cs
    min_refcount = MIN_REFCOUNT_CLUSTERS * cs
    l2_setting = DEFAULT_L2_CACHE_MAX if l2_max is None else l2_max
    if combined is not None:
        if l2_max is not None and refcount is not None:
            raise QMPError("cache-size, l2-cache-size and refcount-cache-size may not be set "
                           "at the same time")
        if l2_max is not None and l2_max > combined:
            raise QMPError("l2-cache-size may not exceed cache-size")
        if refcount is not None and refcount > combined:
            raise QMPError("refcount-cache-size may not exceed cache-size")
        if l2_max is not None:
            l2 = min(max_l2, l2_max)
            refcount = combined - l2
        elif refcount is not None:
            l2 = combined - refcount
        elif combined >= max_l2 + min_refcount:
            l2, refcount = max_l2, combined - max_l2
        else:
            refcount = min(combined, min_refcount)
            l2 = combined - refcount
    else:
        l2 = min(max_l2, l2_setting)
        if refcount is None:
            refcount = min_refcount
    entry_size = options.get("l2-cache-entry-size", cs)
    if entry_size < 512 or entry_size > cs or entry_size & (entry_size - 1):
        raise QMPError(f"L2 cache entry size must be a power of two between 512 and the "
                       f"cluster size ({cs})")
    # QEMU counts cache entries in an int.
    l2_entries = max(MIN_L2_ENTRIES, l2 // entry_size)
    if l2_entries > INT_MAX:
        raise QMPError("L2 cache size too big")
    refcount_clusters = max(MIN_REFCOUNT_CLUSTERS, refcount // cs)
    if refcount_clusters > INT_MAX:
        raise QMPError("Refcount cache size too big")
    interval = options.get("cache-clean-interval", DEFAULT_CLEAN_INTERVAL)
    if interval < 0 or interval > 0xFFFFFFFF:
        raise QMPError("Cache clean interval too big")
    return CacheConfig(l2_entries, entry_size, refcount_clusters, interval)


class MetadataCache:
    """Least recently used pieces of metadata, with a 'used since the last clean' mark."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.entries: collections.OrderedDict[int, bytearray] = collections.OrderedDict()
        self.used: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: int) -> bytearray | None:
        data = self.entries.get(key)
        if data is not None:
            self.entries.move_to_end(key)
            self.used.add(key)
        return data

    def put(self, key: int, data: bytearray) -> None:
        self.entries[key] = data
        self.entries.move_to_end(key)
        self.used.add(key)
        while len(self.entries) > self.capacity:
            old, _ = self.entries.popitem(last=False)
            self.used.discard(old)

    def drop(self, key: int) -> None:
        self.entries.pop(key, None)
        self.used.discard(key)

    def drop_where(self, pred: Any) -> None:
        for key in [k for k in self.entries if pred(k)]:
            self.drop(key)

    def clean(self) -> None:
        """Free what nobody used since the previous call (``cache-clean-interval``)."""
        for key in [k for k in self.entries if k not in self.used]:
            del self.entries[key]
        self.used.clear()

    def clear(self) -> None:
        self.entries.clear()
        self.used.clear()
