"""One negotiated NBD connection in transmission: many requests in flight.

Requests are sent as they come (up to :data:`MAX_IN_FLIGHT`, QEMU's
number) and a single reader task hands each reply chunk to the request
with its handle.  Server errors become :class:`OSError` with the errno
QEMU maps them to.  When the connection breaks, every request still in
flight fails with :class:`ConnectionLost`, which the driver turns into
``EIO`` or a retry after reconnecting.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from blockd.drivers.nbd.handshake import ExportInfo
from blockd.nbd import protocol as p

#: Requests in flight per connection, as in QEMU's client.
MAX_IN_FLIGHT = 16


class ConnectionLost(Exception):
    """The connection broke before the request was answered.

    ``fatal`` is set for protocol violations, after which QEMU gives up on
    the server rather than reconnecting.
    """

    def __init__(self, reason: str, fatal: bool = False) -> None:
        super().__init__(reason)
        self.fatal = fatal


class _Pending:
    """A request waiting for its reply."""

    __slots__ = ("cmd", "offset", "length", "buf", "error", "extent", "future")

    def __init__(self, cmd: int, offset: int, length: int, future: asyncio.Future) -> None:
        self.cmd = cmd
        self.offset = offset
        self.length = length
        #: A read's data: the payload itself when one chunk carries all of it (no
        #: copy), else a buffer the chunks are copied into.
        self.buf: bytes | bytearray | None = None
        self.error = 0
        self.extent: tuple[int, int] | None = None
        self.future = future

    def place(self, start: int, data: bytes) -> None:
        """Put a chunk's bytes (``data``) at ``start`` within the request."""
        if self.buf is None and start == 0 and len(data) == self.length:
            self.buf = data
            return
        if type(self.buf) is not bytearray:
            self.buf = bytearray(self.buf) if self.buf is not None else bytearray(self.length)
        self.buf[start:start + len(data)] = data


class Connection:
    """Transmission on a negotiated connection (see :func:`negotiate`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 parser: p.ClientParser, info: ExportInfo) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = parser
        self.info = info
        self._pending: dict[int, _Pending] = {}
        self._next_handle = 1
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.lost: ConnectionLost | None = None
        self._task = asyncio.get_running_loop().create_task(self._receive())

    # ---- sending ------------------------------------------------------------

    async def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                      data: bytes | bytearray | memoryview = b"") -> _Pending:
        """Send one request and wait for its whole reply; raises OSError for a server
        error and ConnectionLost when the connection breaks."""
        async with self._slots:
            if self.lost is not None:
                raise self.lost
            handle = self._next_handle
            self._next_handle += 1
            fut = asyncio.get_running_loop().create_future()
            req = _Pending(cmd, offset, length, fut)
            self._pending[handle] = req
            if cmd == p.Cmd.READ and not self.info.structured:
                self.parser.expect_read(handle, length)
            header = p.request(cmd, handle, offset, length, flags)
            try:
                if data:
                    self.writer.writelines((header, data))
                else:
                    self.writer.write(header)
                await self.writer.drain()
            except (OSError, RuntimeError) as exc:
                self._fail(ConnectionLost(f"Failed to send request: {exc}"))
            await fut
        if req.error:
            raise OSError(req.error, os.strerror(req.error))
        return req

    def disconnect(self) -> None:
        """Say goodbye (``NBD_CMD_DISC``) and close; pending requests fail."""
        if self.lost is None:
            try:
                self.writer.write(p.request(p.Cmd.DISC, 0))
            except (OSError, RuntimeError):
                pass
        self._fail(ConnectionLost("Connection closed"))
        self._task.cancel()
        self.writer.close()

    # ---- receiving ----------------------------------------------------------

    async def _receive(self) -> None:
        try:
            while True:
                data = await self.reader.read(1 << 20)
                if not data:
                    raise ConnectionLost("server dropped connection")
                self.parser.receive_data(data)
                for ev in self.parser.events():
                    self._dispatch(ev)
        except ConnectionLost as exc:
            self._fail(exc)
        except p.ProtocolError as exc:
            self._fail(ConnectionLost(f"Protocol error: {exc}", fatal=True))
        except OSError as exc:
            self._fail(ConnectionLost(f"Connection closed: {exc.strerror}"))
        except Exception as exc:  # a reply this client cannot make sense of
            self._fail(ConnectionLost(f"Protocol error: {exc}", fatal=True))

    def _fail(self, exc: ConnectionLost) -> None:
        if self.lost is None:
            self.lost = exc
        pending, self._pending = self._pending, {}
        for req in pending.values():
            if not req.future.done():
                req.future.set_exception(self.lost)
        if not self.writer.is_closing():
            self.writer.close()

    def _dispatch(self, ev: Any) -> None:
        req = self._pending.get(ev.handle)
        if req is None:
            raise p.ProtocolError("unexpected cookie value")
        if isinstance(ev, p.SimpleReply):
            if self.info.structured and req.cmd in (p.Cmd.READ, p.Cmd.BLOCK_STATUS) \
                    and not ev.error:
                raise p.ProtocolError("simple reply when structured reply chunk was expected")
            if ev.error:
                req.error = p.errno_from_wire(ev.error)
            elif req.cmd == p.Cmd.READ:
                req.buf = ev.data
            self._finish(ev.handle, req)
            return
        if not self.info.structured:
            raise p.ProtocolError("unexpected structured reply")
        self._chunk(req, ev)
        if ev.done:
            self._finish(ev.handle, req)

    def _chunk(self, req: _Pending, ev: p.StructuredChunk) -> None:
        kind = ev.type
        if kind == p.Chunk.NONE:
            if not ev.done or ev.payload:
                raise p.ProtocolError("invalid NBD_REPLY_TYPE_NONE chunk")
        elif kind & (1 << 15):
            error, _, _ = p.parse_error_chunk(ev.payload)
            if not error:
                raise p.ProtocolError("server sent structured error chunk with error = 0")
            if not req.error:
                req.error = p.errno_from_wire(error)
        elif kind == p.Chunk.OFFSET_DATA and req.cmd == p.Cmd.READ:
            offset, data = p.parse_offset_data(ev.payload)
            start = offset - req.offset
            if start < 0 or start + len(data) > req.length:
                raise p.ProtocolError("server sent chunk exceeding requested region")
            req.place(start, data)
        elif kind == p.Chunk.OFFSET_HOLE and req.cmd == p.Cmd.READ:
            offset, length = p.parse_offset_hole(ev.payload)
            start = offset - req.offset
            if not length or start < 0 or start + length > req.length:
                raise p.ProtocolError("server sent chunk exceeding requested region")
            req.place(start, bytes(length))
        elif kind == p.Chunk.BLOCK_STATUS and req.cmd == p.Cmd.BLOCK_STATUS:
            cid, extents = p.parse_block_status(ev.payload)
            if cid != self.info.context_id:
                raise p.ProtocolError(f"unexpected context id {cid} for "
                                      f"NBD_REPLY_TYPE_BLOCK_STATUS, when negotiated "
                                      f"context id is {self.info.context_id}")
            if req.extent is None:
                req.extent = extents[0]
        else:
            raise p.ProtocolError(f"unexpected reply type {kind}")

    def _finish(self, handle: int, req: _Pending) -> None:
        if req.cmd == p.Cmd.BLOCK_STATUS and not req.error and req.extent is None:
            raise p.ProtocolError("no block status extent in the reply")
        del self._pending[handle]
        if req.cmd == p.Cmd.READ and req.buf is None:
            req.buf = bytes(req.length)
        if not req.future.done():
            req.future.set_result(None)


