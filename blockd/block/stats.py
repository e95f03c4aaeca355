"""I/O accounting: the counters behind ``query-blockstats``."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Stats:
    """The ``BlockDeviceStats`` counters QEMU keeps per backend/node."""

    rd_bytes: int = 0
    wr_bytes: int = 0
    unmap_bytes: int = 0
    rd_operations: int = 0
    wr_operations: int = 0
    flush_operations: int = 0
    unmap_operations: int = 0
    rd_total_time_ns: int = 0
    wr_total_time_ns: int = 0
    flush_total_time_ns: int = 0
    unmap_total_time_ns: int = 0
    failed_rd_operations: int = 0
    failed_wr_operations: int = 0
    failed_flush_operations: int = 0
    failed_unmap_operations: int = 0
    wr_highest_offset: int = 0
    last_access_ns: int | None = None
