"""The ``nbd`` protocol driver: a block node whose storage is an NBD export.

It behaves as QEMU 7.2's NBD client does: the export's size, read-only
flag and block sizes come from the handshake; requests are aligned to
the server's minimum block size and split at its maximum; block status
asks one extent of the negotiated context (``base:allocation``, or the
``x-dirty-bitmap`` context, whose dirty runs then read as holes: QEMU's
way of showing a bitmap through ``qemu-img map``).  A broken connection
fails the requests in flight with ``EIO``, unless ``reconnect-delay``
lets them wait for a new connection, which is tried in the background.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from typing import Any

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, Extent, Status, WriteFlags
from blockd.drivers.nbd.connection import Connection, ConnectionLost
from blockd.drivers.nbd.handshake import (MAX_BUFFER, HandshakeError, address_text,
                                          negotiate, open_socket)
from blockd.errors import QMPError
from blockd.nbd import protocol as p

_INT_MAX = (1 << 31) - 1
#: The options that name the export; a reopen cannot change them.
_CONNECTION_OPTIONS = ("server", "export", "tls-creds", "tls-hostname", "x-dirty-bitmap",
                       "reconnect-delay", "open-timeout")
#: Bounds of the pause between reconnection attempts (seconds), as QEMU's client.
_RETRY_FIRST, _RETRY_MAX = 1.0, 16.0


def _eio() -> OSError:
    return OSError(errno.EIO, "Input/output error")


def _align_down(value: int, align: int) -> int:
    return value - value % align


class NbdNode(BlockNode):
    driver = "nbd"
    is_protocol = True
    strong_options = ("server", "export", "tls-creds", "tls-hostname")

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.server: dict[str, Any] = options.get("server", {})
        self.export: str | None = options.get("export")
        self.context = options.get("x-dirty-bitmap")
        self.reconnect_delay = options.get("reconnect-delay", 0)
        self.conn: Connection | None = None
        #: "connected", "wait" (requests wait for a reconnect), "nowait" (they fail
        #: until one succeeds) or "quit" (the server broke the protocol, or closed).
        self.state = "connected"
        self._wait_until = 0.0
        self._reconnected = asyncio.Event()
        self._reconnecting: asyncio.Task | None = None
        #: Serializes read-modify-write of blocks smaller than the server's minimum.
        self._rmw = asyncio.Lock()

    # ---- open and close -----------------------------------------------------

    async def open(self, ctx: OpenContext) -> None:
        opts = self.options
        if not self.server:
            # --image-opts may leave it out; QMP's schema already requires it.
            raise QMPError("NBD server address missing")
        kind = self.server["type"]
        if kind == "fd":
            # qemu-storage-daemon's words: it has no monitor file descriptors either.
            raise QMPError("only QEMU supports file descriptor passing")
        if kind not in ("unix", "inet"):
            raise QMPError(f"blockd's NBD client cannot connect to '{kind}' addresses")
        if "tls-creds" in opts:
            creds = opts["tls-creds"]
            try:
                ctx.secret(creds)
            except QMPError:
                raise QMPError(f"No TLS credentials with id '{creds}'") from None
            raise QMPError(f"Object with id '{creds}' is not TLS credentials")
        if self.export is not None and len(self.export.encode()) > p.MAX_STRING:
            raise QMPError("export name too long to send to server")
        if self.context is not None and len(self.context.encode()) > p.MAX_STRING:
            raise QMPError("x-dirty-bitmap query too long to send to server")
        timeout = opts.get("open-timeout", 0)
        deadline = time.monotonic() + timeout
        pause = _RETRY_FIRST
        while True:
            try:
                if timeout:
                    # The timeout also bounds a server that accepts and then says nothing.
                    left = max(deadline - time.monotonic(), 0.001)
                    self.conn = await asyncio.wait_for(self._connect(), left)
                else:
                    self.conn = await self._connect()
                break
            except TimeoutError:
                raise QMPError(f"Failed to connect to '{address_text(self.server)}': "
                               "Connection timed out") from None
            except HandshakeError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QMPError(str(exc), hint=exc.hint) from None
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, _RETRY_MAX)
        try:
            self._check_export()
        except BaseException:
            self.conn.disconnect()
            self.conn = None
            raise
        self._reconnected.set()

    def _check_export(self) -> None:
        info = self.info
        if self.context is not None and info.context_id is None:
            # QEMU 7.2 loses its own message here and reports the errno only.
            raise QMPError("Could not open image: Invalid argument")
        if info.flags & p.TransmissionFlag.READ_ONLY and not self.read_only:
            if not self.options.get("auto-read-only"):
                raise QMPError("Could not open image: Permission denied")
            self.read_only = True

    async def _connect(self) -> Connection:
        reader, writer = await open_socket(self.server)
        context = self.context if self.context is not None else p.BASE_ALLOCATION
        try:
            info, parser = await negotiate(reader, writer, self.export or "", context)
        except OSError as exc:
            writer.close()
            raise HandshakeError(f"Failed to read option reply: {os.strerror(exc.errno)}"
                                 if exc.errno else str(exc)) from None
        except BaseException:
            writer.close()
            raise
        return Connection(reader, writer, parser, info)

    async def close(self) -> None:
        self.state = "quit"
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self.conn is not None:
            self.conn.disconnect()
            self.conn = None

    @property
    def info(self) -> Any:
        assert self.conn is not None
        return self.conn.info

    # ---- the connection's life ------------------------------------------------

    def _lost(self, conn: Connection, exc: ConnectionLost) -> None:
        """The connection broke: decide between waiting, failing and giving up."""
        if conn is not self.conn:
            return
        self._reconnected.clear()
        if exc.fatal or self.state == "quit":
            self.state = "quit"
            return
        self.state = "wait" if self.reconnect_delay else "nowait"
        self._wait_until = time.monotonic() + self.reconnect_delay
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(conn))

    async def _reconnect(self, old: Connection) -> None:
        """Try again and again (QEMU's pauses) until connected or closed."""
        pause = _RETRY_FIRST
        while self.state != "quit":
            try:
                conn = await self._connect()
            except (HandshakeError, OSError):
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_MAX)
                continue
            if conn.info.size != old.info.size or \
                    conn.info.flags & p.TransmissionFlag.READ_ONLY and not self.read_only:
                # Not the export we had: writing to it would be silently wrong.
                conn.disconnect()
                self.state = "quit"
                return
            self.conn = conn
            self.state = "connected"
            self._reconnected.set()
            return

    async def _ready(self) -> Connection:
        conn = self.conn
        if conn is not None and conn.lost is not None:
            self._lost(conn, conn.lost)
        if self.state == "connected" and self.conn is not None:
            return self.conn
        if self.state == "wait":
            left = self._wait_until - time.monotonic()
            if left > 0:
                try:
                    await asyncio.wait_for(self._reconnected.wait(), left)
                except TimeoutError:
                    pass
            if self.state == "connected" and self.conn is not None:
                return self.conn
            if self.state == "wait":
                self.state = "nowait"
        raise _eio()

    async def _request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                       data: bytes | bytearray | memoryview = b"") -> Any:
        """One request, sent again after a reconnect while ``reconnect-delay`` allows."""
        while True:
            conn = await self._ready()
            try:
                return await conn.request(cmd, offset, length, flags, data)
            except ConnectionLost as exc:
                self._lost(conn, exc)

    # ---- limits -------------------------------------------------------------

    def _alignment(self) -> int:
        """QEMU's request alignment: the server's minimum, else a guess that is safe."""
        info = self.info
        if info.min_block:
            return info.min_block
        return 1 if info.size % 512 or info.context_id is not None else 512

    def _max_transfer(self) -> int:
        limit = min(MAX_BUFFER, self.info.max_block or MAX_BUFFER)
        return max(self._alignment(), _align_down(limit, self._alignment()))

    # ---- data path ----------------------------------------------------------

    def length(self) -> int:
        # QEMU counts whole 512-byte sectors; the tail past the export reads as zeroes.
        return -(-self.info.size // 512) * 512

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        align = self._alignment()
        start, end = _align_down(offset, align), -(-(offset + length) // align) * align
        if start == offset and end == offset + length:
            return await self._read_aligned(offset, length)
        data = await self._read_aligned(start, end - start)
        return memoryview(data)[offset - start:offset - start + length]

    async def _read_aligned(self, offset: int, length: int) -> bytes | bytearray:
        size = self.info.size
        within = max(0, min(length, size - offset))
        step = self._max_transfer()
        if within <= step:
            buf = (await self._request(p.Cmd.READ, offset, within)).buf if within else b""
        else:
            parts = await asyncio.gather(*(
                self._request(p.Cmd.READ, pos, min(step, offset + within - pos))
                for pos in range(offset, offset + within, step)))
            buf = b"".join(part.buf for part in parts)
        if within < length:
            buf = bytes(buf) + bytes(length - within)
        return buf

    def _write_flags(self, flags: WriteFlags) -> tuple[int, bool]:
        """Wire flags for a write, and whether FUA must be done by a flush afterwards."""
        if not flags & WriteFlags.FUA:
            return 0, False
        if self.info.flags & p.TransmissionFlag.SEND_FUA:
            return p.CmdFlag.FUA, False
        return 0, True

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        align = self._alignment()
        if offset % align or len(data) % align:
            await self._read_modify_write(offset, data, flags)
            return
        wire, flush = self._write_flags(flags)
        step = self._max_transfer()
        view = memoryview(data)
        await asyncio.gather(*(
            self._request(p.Cmd.WRITE, offset + pos, min(step, len(view) - pos), wire,
                          view[pos:pos + step])
            for pos in range(0, len(view), step)))
        if flush:
            await self.flush()

    async def _read_modify_write(self, offset: int, data: bytes | bytearray | memoryview,
                                 flags: WriteFlags) -> None:
        """A write smaller than the server's blocks: whole blocks go on the wire."""
        align = self._alignment()
        start = _align_down(offset, align)
        end = -(-(offset + len(data)) // align) * align
        async with self._rmw:
            buf = bytearray(await self._read_aligned(start, end - start))
            buf[offset - start:offset - start + len(data)] = data
            await self.write(start, buf, flags)

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        info = self.info
        if not info.flags & p.TransmissionFlag.SEND_WRITE_ZEROES:
            await super().write_zeroes(offset, length, flags)
            return
        wire, flush = self._write_flags(flags)
        if not (flags & WriteFlags.MAY_UNMAP and self.options.get("discard") == "unmap"):
            wire |= p.CmdFlag.NO_HOLE
        if flags & WriteFlags.NO_FALLBACK:
            if not info.flags & p.TransmissionFlag.SEND_FAST_ZERO:
                raise OSError(errno.ENOTSUP, "Operation not supported")
            wire |= p.CmdFlag.FAST_ZERO
        align = self._alignment()
        head = min(length, -offset % align)
        if head:
            await self.write(offset, bytes(head), flags & WriteFlags.FUA)
            offset, length = offset + head, length - head
        tail = length % align
        step = self._max_transfer()
        body = length - tail
        await asyncio.gather(*(
            self._request(p.Cmd.WRITE_ZEROES, pos, min(step, offset + body - pos), wire)
            for pos in range(offset, offset + body, step)))
        if tail:
            await self.write(offset + body, bytes(tail), flags & WriteFlags.FUA)
        if flush:
            await self.flush()

    async def discard(self, offset: int, length: int) -> None:
        if self.options.get("discard") != "unmap" or \
                not self.info.flags & p.TransmissionFlag.SEND_TRIM:
            return
        align = self._alignment()
        start = -(-offset // align) * align
        end = _align_down(offset + length, align)
        step = _align_down(_INT_MAX, align)
        for pos in range(start, end, step):
            await self._request(p.Cmd.TRIM, pos, min(step, end - pos))

    async def flush(self) -> None:
        if self.options.get("cache", {}).get("no-flush"):
            return
        if self.info.flags & p.TransmissionFlag.SEND_FLUSH:
            await self._request(p.Cmd.FLUSH)

    async def block_status(self, offset: int, length: int) -> Extent:
        info = self.info
        if offset >= info.size:
            return Extent(length, Status.ZERO | Status.ALLOCATED)
        if info.context_id is None:
            return Extent(length, Status.DATA | Status.ALLOCATED, offset, self)
        # Asked from the block holding ``offset``, as QEMU's block layer aligns it.
        align = self._alignment()
        start = _align_down(offset, align)
        end = min(-(-(offset + length) // align) * align, info.size)
        ask = min(end - start, _align_down(_INT_MAX, align))
        reply = await self._request(p.Cmd.BLOCK_STATUS, start, ask, p.CmdFlag.REQ_ONE)
        n, flags = reply.extent
        if not n:
            raise _eio()
        if info.min_block and n % info.min_block:
            # A server that reports part of a block (qemu-nbd 3.1 at an unaligned EOF).
            if n > info.min_block:
                n = _align_down(n, info.min_block)
            else:
                n, flags = info.min_block, 0
        n = min(min(n, ask) - (offset - start), length)
        if n <= 0:
            raise _eio()
        if self.context == "qemu:allocation-depth" and flags > 2:
            flags = 2
        status = Status.NONE if flags & p.STATE_HOLE else Status.DATA
        if flags & p.STATE_ZERO:
            status |= Status.ZERO
        if status:
            status |= Status.ALLOCATED
        return Extent(n, status, offset, self)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        current = self.info.size
        if size != current and exact:
            raise OSError(errno.ENOTSUP, "Cannot resize NBD nodes")
        if size > current:
            raise OSError(errno.EINVAL, "Cannot grow NBD nodes")

    # ---- queries and reopen -------------------------------------------------

    def exact_filename(self) -> str | None:
        """The URI QEMU names the node by, when the address can be written as one."""
        server, export = self.server, self.export
        if server["type"] == "unix":
            base = f"nbd+unix://{'/' + export if export is not None else ''}"
            return f"{base}?socket={server['path']}"
        if server["type"] == "inet" and not any(k in server for k in ("ipv4", "ipv6", "to")):
            name = f"nbd://{server['host']}:{server['port']}"
            return name + (f"/{export}" if export is not None else "")
        return None

    def full_options(self) -> dict[str, Any]:
        """QEMU builds ``json:`` names from its flattened options: ``server.path``..."""
        opts: dict[str, Any] = {"driver": self.driver}
        for key, value in self.server.items():
            opts[f"server.{key}"] = value
        for key in self.strong_options[1:]:
            if key in self.options:
                opts[key] = self.options[key]
        return opts

    def has_info(self) -> bool:
        return False

    def allocated_file_size(self) -> int | None:
        return None

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        for key in _CONNECTION_OPTIONS:
            if options.get(key) != self.options.get(key):
                raise QMPError(f"Cannot change the option '{key}'")
        if not read_only and self.info.flags & p.TransmissionFlag.READ_ONLY:
            raise QMPError("Can't reopen read-only NBD mount as read/write")
        return None
