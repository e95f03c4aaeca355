"""A byte-rate limit in time slices, as QEMU limits its jobs (``speed`` in bytes/s).

Work is accounted in slices (100 ms for block jobs): while a slice's quota
is not used up, nothing waits; once it is, the caller waits until the
excess has been paid for, and the next slice starts then.  The limit is
coarse by design: it keeps the average, not every request, under the speed.
"""

from __future__ import annotations

import time
from typing import Callable

#: QEMU's slice for block jobs.
SLICE = 0.1


class RateLimit:
    """Bytes per second over slices; a speed of 0 means no limit."""

    def __init__(self, speed: int = 0, slice_seconds: float = SLICE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slice = slice_seconds
        self.clock = clock
        self.quota = 0.0
        self.slice_start = 0.0
        self.slice_end = 0.0
        self.dispatched = 0
        self.set_speed(speed)

    def set_speed(self, speed: int) -> None:
        # A positive speed allows at least one byte a slice, however slow.
        self.quota = max(speed * self.slice, 1.0) if speed else 0.0

    def delay(self, n: int, now: float | None = None) -> float:
        """Account ``n`` bytes; the seconds to wait before the next request (0 to go on)."""
        if not self.quota:
            return 0.0
        if now is None:
            now = self.clock()
        if self.slice_end < now:
            # The last slice (possibly stretched by a wait) is over: start afresh.
            self.slice_start = now
            self.slice_end = now + self.slice
            self.dispatched = 0
        self.dispatched += n
        if self.dispatched < self.quota:
            return 0.0
        # Over quota: stretch the slice to cover what was sent, and wait for its end.
        self.slice_end = self.slice_start + self.dispatched / self.quota * self.slice
        return self.slice_end - now
