"""QMP monitors on sockets and stdio, many clients each.

QEMU serves one client per monitor socket; blockd accepts any number,
each with its own negotiation state and in-order command queue, while
events go to every negotiated client.  A client that stops reading is
disconnected once its unsent output passes a limit, and a client that
floods stops being read while its queue is full, so neither can starve
the others.  Input is parsed a slice at a time with a yield to the event
loop between slices, so a client streaming megabytes of JSON delays the
others by one slice's parsing, not by its whole burst.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import stat
import sys
from typing import Any, Callable, cast

import blockd
from blockd.qjson import JSONStreamer, encode
from blockd.qmp.dispatch import Dispatcher, Request, error_reply, parse_request
from blockd.qmp.session import SessionState

log = logging.getLogger(__name__)

#: In-band requests queued per client before we stop reading its socket.
QUEUE_MAX = 8
#: Unsent output (bytes) after which a client that does not read is dropped.
OUTPUT_MAX = 64 << 20
#: Bytes of input parsed before other clients get a turn.
FEED_SLICE = 4096
#: Clients one monitor socket serves at once; more are disconnected at once, so a
#: connection flood cannot use up the daemon's file descriptors.
CLIENTS_MAX = 64


def greeting(oob: bool) -> dict[str, Any]:
    major, minor, micro = blockd.QEMU_VERSION
    return {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                "package": f"blockd {blockd.__version__}"},
                    "capabilities": ["oob"] if oob else []}}


class ClientSession(asyncio.Protocol):
    """One connected QMP client."""

    def __init__(self, dispatcher: Dispatcher, *, pretty: bool = False, oob: bool = True,
                 on_close: Callable[["ClientSession"], None] | None = None) -> None:
        self.dispatcher = dispatcher
        self.pretty = pretty
        self.oob_capable = oob
        self.state = SessionState()
        self.streamer = JSONStreamer()
        self.queue: collections.deque[Request | dict[str, Any]] = collections.deque()
        self.wakeup = asyncio.Event()
        self.transport: asyncio.Transport | None = None
        self.writer: Any = None
        self.worker: asyncio.Task[None] | None = None
        self.oob_tasks: set[asyncio.Task[None]] = set()
        self.unsubscribe: Callable[[], None] | None = None
        self.paused = False
        self.closed = False
        self.on_close = on_close
        #: Parses a large burst of input slice by slice (reading is paused meanwhile).
        self.feeder: asyncio.Task[None] | None = None
        self.drained = asyncio.Event()

    # ---- transport callbacks ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream socket's
        if self.writer is None:
            self.writer = transport
        self.send(greeting(self.oob_capable))
        self.worker = asyncio.get_running_loop().create_task(self._work())

    def data_received(self, data: bytes) -> None:
        if len(data) <= FEED_SLICE and self.feeder is None:
            self._feed_slice(data)
            return
        self.feeder = asyncio.get_running_loop().create_task(self._feed(data))
        self._update_reading()

    def _feed_slice(self, data: bytes) -> None:
        try:
            messages = self.streamer.feed(data)
        except Exception:  # a parser bug must cost one client, not the daemon
            log.exception("QMP input could not be parsed; disconnecting the client")
            self.close()
            return
        for value, err in messages:
            self._accept(value, err)

    async def _feed(self, data: bytes) -> None:
        """Parse a burst slice by slice, waiting whenever the request queue is full."""
        try:
            for pos in range(0, len(data), FEED_SLICE):
                while len(self.queue) >= QUEUE_MAX and not self.closed:
                    self.drained.clear()
                    await self.drained.wait()
                if self.closed:
                    return
                self._feed_slice(data[pos:pos + FEED_SLICE])
                await asyncio.sleep(0)
        finally:
            self.feeder = None
            self._update_reading()

    def _update_reading(self) -> None:
        """Read only while no burst is being parsed and the queue has room.

        Reading resumes once the queue is down to half, so a flooding client
        is read in batches rather than one message at a time.
        """
        if self.transport is None or self.closed:
            return
        limit = QUEUE_MAX // 2 if self.paused else QUEUE_MAX
        pause = self.feeder is not None or len(self.queue) >= limit
        if pause != self.paused:
            self.paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        for value, err in self.streamer.end():
            self._accept(value, err)
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    # ---- requests ---------------------------------------------------------

    def _accept(self, value: Any, err: str | None) -> None:
        if self.closed:
            return
        if err is not None:
            self._enqueue(error_reply(err))
            return
        req = parse_request(value, self.state)
        if isinstance(req, Request) and req.oob:
            self._run_oob(req)
        else:
            self._enqueue(req)

    def _enqueue(self, item: Request | dict[str, Any]) -> None:
        self.queue.append(item)
        self.wakeup.set()
        self._update_reading()

    def _run_oob(self, req: Request) -> None:
        pre = self.dispatcher.precheck(req, self.state)
        if pre is not None:
            self.send(pre)
            return
        task = asyncio.get_running_loop().create_task(self._finish(req))
        self.oob_tasks.add(task)
        task.add_done_callback(self.oob_tasks.discard)

    async def _finish(self, req: Request) -> None:
        reply = await self.dispatcher.run(req, self.state)
        self.send(reply)
        if req.name == "quit" and "return" in reply:
            self.dispatcher.daemon.request_quit()

    async def _work(self) -> None:
        """Run in-band requests one after another, in arrival order, once start-up is done."""
        await self.dispatcher.daemon.started.wait()
        while not self.closed:
            if not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            item = self.queue.popleft()
            self.drained.set()
            self._update_reading()
            if not isinstance(item, Request):
                self.send(item)
                continue
            pre = self.dispatcher.precheck(item, self.state)
            if pre is not None:
                self.send(pre)
                continue
            await self._finish(item)
            if item.name == "qmp_capabilities" and self.state.negotiated and self.unsubscribe is None:
                self.unsubscribe = self.dispatcher.daemon.subscribe(self.send)

    # ---- output -----------------------------------------------------------

    def send(self, msg: dict[str, Any]) -> None:
        if self.closed or self.writer is None:
            return
        text = encode(msg, pretty=self.pretty).replace("\n", "\r\n") + "\r\n"
        self.writer.write(text.encode("utf-8"))
        if self.writer.get_write_buffer_size() > OUTPUT_MAX:
            log.warning("QMP client does not read its replies; disconnecting it")
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.wakeup.set()
        self.drained.set()
        if self.unsubscribe is not None:
            self.unsubscribe()
        for task in self.oob_tasks:
            task.cancel()
        for t in {self.transport, self.writer}:
            if t is not None:
                t.close()
        if self.on_close is not None:
            self.on_close(self)


class _Refused(asyncio.Protocol):
    """A connection over the client limit: closed before anything is said."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Monitor:
    """A listening QMP endpoint (unix or TCP socket) or the stdio monitor."""

    def __init__(self, dispatcher: Dispatcher, *, pretty: bool = False) -> None:
        self.dispatcher = dispatcher
        self.pretty = pretty
        self.server: asyncio.base_events.Server | None = None
        self.sessions: set[ClientSession] = set()
        self.path: str | None = None

    def _connection(self) -> asyncio.Protocol:
        if len(self.sessions) >= CLIENTS_MAX:
            log.warning("QMP monitor has %d clients; refusing another", CLIENTS_MAX)
            return _Refused()
        return self._session()

    def _session(self, oob: bool = True) -> ClientSession:
        session = ClientSession(self.dispatcher, pretty=self.pretty, oob=oob,
                                on_close=self.sessions.discard)
        self.sessions.add(session)
        return session

    async def listen_unix(self, path: str) -> None:
        """Listen on a unix socket created with mode 0600 (only our user connects)."""
        if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            self.server = await asyncio.get_running_loop().create_unix_server(
                self._connection, path)
        finally:
            os.umask(old)
        self.path = path

    async def listen_tcp(self, host: str, port: int) -> None:
        self.server = await asyncio.get_running_loop().create_server(
            self._connection, host, port, family=socket.AF_UNSPEC, reuse_address=True)

    async def attach_stdio(self) -> None:
        """Serve one client on stdin/stdout (no OOB, as QEMU's stdio chardev)."""
        loop = asyncio.get_running_loop()
        session = self._session(oob=False)
        wtransport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(os.dup(sys.stdout.fileno()), "wb"))
        session.writer = wtransport
        await loop.connect_read_pipe(lambda: session, os.fdopen(os.dup(sys.stdin.fileno()), "rb"))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for session in list(self.sessions):
            session.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
