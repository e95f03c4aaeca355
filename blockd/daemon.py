"""The daemon's state: everything a QMP command may act on.

One :class:`Daemon` exists per process.  Command handlers receive it and
reach the node graph, the secret objects, the NBD server, exports and
jobs through it; events go out through :meth:`Daemon.emit`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from blockd.crypto import workers
from blockd.block.graph import BlockGraph

EventSink = Callable[[dict[str, Any]], None]


class Daemon:
    def __init__(self) -> None:
        from blockd.objects import ObjectStore

        self.objects = ObjectStore()
        self.graph = BlockGraph(self.objects.secret_bytes)
        self.graph.emit = self.emit
        #: Set by nbd-server-start (blockd.nbd.server.NBDServer).
        self.nbd: Any = None
        #: Block exports by id (blockd.exports.Export).
        self.exports: dict[str, Any] = {}
        #: Jobs by id (blockd.jobs.job.Job), oldest first.
        self.jobs: dict[str, Any] = {}
        self._sinks: list[EventSink] = []
        #: Set when a client ran ``quit`` or a signal arrived; the main loop waits on it.
        self.quit_requested = asyncio.Event()
        #: Set once the whole command line is applied.  Monitors greet clients before
        #: that (as qemu-storage-daemon's do) but run no request until it is set, and
        #: the NBD server accepts no client, so nobody sees a half-configured daemon
        #: and ``quit`` is never lost.
        self.started = asyncio.Event()

    def finish_startup(self) -> None:
        """The command line is applied: monitors answer and the NBD server greets."""
        self.started.set()
        if self.nbd is not None:
            self.nbd.update_accepting()

    def request_quit(self) -> None:
        self.quit_requested.set()

    def subscribe(self, sink: EventSink) -> Callable[[], None]:
        """Deliver every event to ``sink``; returns the unsubscribe function."""
        self._sinks.append(sink)
        return lambda: self._sinks.remove(sink)

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Broadcast an event to every negotiated QMP client."""
        now = time.time()
        msg: dict[str, Any] = {"event": event}
        if data is not None:
            msg["data"] = data
        sec = int(now)
        msg["timestamp"] = {"seconds": sec, "microseconds": int((now - sec) * 1_000_000)}
        for sink in list(self._sinks):
            sink(msg)

    async def shutdown(self) -> None:
        """Stop serving, end every job and close every node cleanly (flushes)."""
        from blockd.jobs.job import cancel_all

        await cancel_all(self)
        if self.nbd is not None:
            await self.nbd.stop()
            self.nbd = None
        for export in list(self.exports.values()):
            await export.delete()
        await self.graph.close_all()
        workers.shutdown()
