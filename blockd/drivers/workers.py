"""A small pool of threads for blocking file syscalls, with few hand-overs per request.

``asyncio.to_thread`` pays for every request: a context copy, a
``concurrent.futures.Future`` chained to an asyncio one, a wake-up of an idle
executor thread and one ``call_soon_threadsafe`` (a self-pipe write and a loop
wake-up) per result.  Here a request is one tuple on a ``SimpleQueue``; a worker
that finds more requests queued behind the one it woke for may run them in the
same turn (as long as no other worker is idle to take them) and hands every
result back to the loop in one wake-up.  Threads start when requests queue up
faster than idle workers take them.  Each request still gets its own result or
exception.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from typing import Any, Callable

class WorkerPool:
    """Threads started on demand, up to ``threads``, shared by every node and loop."""

    def __init__(self, threads: int, batch: int) -> None:
        self._max = threads
        self._batch = batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        #: Workers waiting for a request, and requests no worker has taken yet:
        #: hints (updated without a lock) for batching and starting threads.
        self._idle = 0
        self._queued = 0
        os.register_at_fork(after_in_child=self._forget_threads)

    def _forget_threads(self) -> None:
        """A forked child has none of the parent's threads: it starts its own."""
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._idle = self._queued = 0

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run ``fn(*args)`` in a worker; the returned future carries its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put((loop, fut, fn, args))
        self._queued += 1
        if self._queued > self._idle and self._threads < self._max:
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
            self._queued -= 1
            batch = [job]
            while len(batch) < self._batch and self._idle == 0:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
                self._queued -= 1
            done: dict[asyncio.AbstractEventLoop, list] = {}
            for loop, fut, fn, args in batch:
                outcome: tuple[Any, Any, BaseException | None]
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
#: threads do with fewer hand-overs than many, a worker taking up to 16 queued
#: writes in one turn (few enough that one slow write delays little).
BUFFERED = WorkerPool(2, 16)
#: Requests that wait for the device (O_DIRECT, reads the cache did not hold,
#: syncs): as many in flight as the guest queues (QEMU's pool has 64 threads),
#: so one request per turn.
DEVICE = WorkerPool(32, 1)
