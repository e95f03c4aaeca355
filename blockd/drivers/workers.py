"""A small pool of threads for blocking file syscalls, with few hand-overs per request.

``asyncio.to_thread`` pays for every request: a context copy, a
``concurrent.futures.Future`` chained to an asyncio one, a wake-up of an idle
executor thread and one ``call_soon_threadsafe`` (a self-pipe write and a loop
wake-up) per result.  Here a request is one tuple on a ``SimpleQueue``; a worker
that finds more requests queued behind the one it woke for runs them in the same
turn (as long as no other worker is idle to take them) and hands every result
back to the loop in one wake-up.  Each request still gets its own result or
exception.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable

#: Requests one worker takes per turn: enough to share one loop wake-up among
#: a queue of small writes, few enough that one slow request delays little.
_BATCH = 16


class WorkerPool:
    """Threads started on demand, up to ``threads``, shared by every node and loop."""

    def __init__(self, threads: int) -> None:
        self._max = threads
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        #: Workers waiting for a request; only a hint for batching and spawning.
        self._idle = 0

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run ``fn(*args)`` in a worker; the returned future carries its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put((loop, fut, fn, args))
        if self._idle == 0 and self._threads < self._max:
            self._spawn()
        return fut

    def _spawn(self) -> None:
        with self._lock:
            if self._threads >= self._max:
                return
            self._threads += 1
        threading.Thread(target=self._work, name="blockd-io", daemon=True).start()

    def _work(self) -> None:
        q = self._queue
        while True:
            self._idle += 1
            job = q.get()
            self._idle -= 1
            batch = [job]
            while len(batch) < _BATCH and self._idle == 0:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            done: dict[asyncio.AbstractEventLoop, list] = {}
            for loop, fut, fn, args in batch:
                try:
                    outcome = (fut, fn(*args), None)
                except BaseException as exc:  # handed to the awaiting request
                    outcome = (fut, None, exc)
                done.setdefault(loop, []).append(outcome)
            for loop, outcomes in done.items():
                try:
                    loop.call_soon_threadsafe(_deliver, outcomes)
                except RuntimeError:  # the loop closed while the request ran
                    pass


def _deliver(outcomes: list) -> None:
    for fut, result, exc in outcomes:
        if fut.cancelled():
            continue
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)


#: Buffered writes mostly copy into the page cache: CPU-bound work that two
#: threads do with fewer hand-overs than many.
BUFFERED = WorkerPool(2)
#: Requests that wait for the device (O_DIRECT, reads the cache did not hold,
#: syncs): more of them may be in flight.
DEVICE = WorkerPool(8)
