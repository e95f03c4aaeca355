"""The NBD server: sockets and scheduling around the pure wire code in :mod:`.protocol`.

Each connection is an :class:`asyncio.Protocol`.  Handshake options are
answered as they arrive.  A transmission request is served at once
until it has to wait, and then goes on as a task of its own, so a slow
read does not hold up the requests behind it while the many that never
wait (memory file systems) cost no task.  Replies are queued whole and
the replies finished in one turn of the event loop go out in one write,
so they never interleave and cost one syscall together.
A connection stops reading while too many requests or bytes are in
flight, or while its replies are not being read, which bounds the memory
and tasks a client can make the server hold; a client that does not
finish the handshake in time is dropped so it cannot sit on a
``max-connections`` slot.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from typing import TYPE_CHECKING, Any, Coroutine, Generator, Iterator, cast

from blockd.block.node import ChildLink, Status, WriteFlags
from blockd.nbd import protocol as p
from blockd.paths import os_path

if TYPE_CHECKING:
    from blockd.daemon import Daemon
    from blockd.exports import Export

log = logging.getLogger(__name__)

MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 << 20
#: Requests a connection may have running before it stops reading.
MAX_IN_FLIGHT = 64
#: Payload bytes (read lengths, write data) a connection may have in flight.
MAX_IN_FLIGHT_BYTES = 64 << 20
#: Commands that change the export's content.
WRITES = frozenset({p.Cmd.WRITE, p.Cmd.WRITE_ZEROES, p.Cmd.TRIM})
#: The FUA request flag as a plain int: ``int & IntFlag`` builds a flag object, slowly.
FUA = int(p.CmdFlag.FUA)
#: Reply bytes queued in one turn of the event loop before they are sent anyway.
OUTBOX_MAX = 256 << 10
#: Connections an NBD server takes at once unless ``max-connections`` says otherwise:
#: QEMU 7.2's stable releases cap them so (CVE-2024-7409); 0 lifts the cap.
DEFAULT_MAX_CONNECTIONS = 100
#: Clients the kernel queues for a listener that is not accepting.
LISTEN_BACKLOG = 128
#: Seconds a client has from connecting to choosing an export.
HANDSHAKE_TIMEOUT = 10.0
#: Reads this long are answered with hole chunks where the image has none.
SPARSE_READ_MIN = 64 << 10
#: Upper bound on extents in one BLOCK_STATUS reply.
MAX_EXTENTS = 1 << 16

CONTEXT_BASE = 0
CONTEXT_DEPTH = 1
CONTEXT_BITMAP = 2
QEMU_DEPTH = "qemu:allocation-depth"
QEMU_BITMAP = "qemu:dirty-bitmap:"
#: Command names in messages, as QEMU words them.
_CMD_NAMES: dict[int, str] = {p.Cmd.READ: "read", p.Cmd.WRITE: "write", p.Cmd.DISC: "disconnect",
              p.Cmd.FLUSH: "flush", p.Cmd.TRIM: "trim", p.Cmd.CACHE: "cache",
              p.Cmd.WRITE_ZEROES: "write zeroes", p.Cmd.BLOCK_STATUS: "block status",
              p.Cmd.RESIZE: "resize"}
#: Commands this server runs (a 7.2 server knows no RESIZE).
_SERVED = frozenset({p.Cmd.READ, p.Cmd.WRITE, p.Cmd.FLUSH, p.Cmd.TRIM, p.Cmd.CACHE,
                     p.Cmd.WRITE_ZEROES, p.Cmd.BLOCK_STATUS})
#: QEMU's message when the block layer fails a command.
_FAILED: dict[int, str] = {p.Cmd.READ: "reading from file failed", p.Cmd.WRITE: "writing to file failed",
           p.Cmd.WRITE_ZEROES: "writing to file failed", p.Cmd.FLUSH: "flush failed",
           p.Cmd.TRIM: "discard failed", p.Cmd.CACHE: "caching data failed",
           p.Cmd.BLOCK_STATUS: "can't get block status"}

_ERRNO_TO_NBD = {
    errno.EPERM: p.Err.EPERM, errno.EROFS: p.Err.EPERM, errno.EIO: p.Err.EIO,
    errno.ENOMEM: p.Err.ENOMEM, errno.ENOSPC: p.Err.ENOSPC, errno.EDQUOT: p.Err.ENOSPC,
    errno.EFBIG: p.Err.ENOSPC, errno.EOVERFLOW: p.Err.EOVERFLOW,
    errno.ENOTSUP: p.Err.ENOTSUP, errno.ESHUTDOWN: p.Err.ESHUTDOWN,
}


def nbd_error(exc: OSError) -> int:
    """The wire error for a host error; the protocol fixes the numbers, not the host."""
    return _ERRNO_TO_NBD.get(exc.errno or errno.EIO, p.Err.EINVAL)


async def status_extents(link: ChildLink, offset: int, length: int,
                         limit: int = MAX_EXTENTS) -> list[tuple[int, int]]:
    """``base:allocation`` descriptors: HOLE where no data is stored, ZERO where reads are zero."""
    out: list[tuple[int, int]] = []
    end = offset + length
    while offset < end and len(out) < limit:
        ext = await link.block_status(offset, min(end - offset, 0xFFFFF000))
        flags = (0 if ext.status & Status.DATA else p.STATE_HOLE) | \
            (p.STATE_ZERO if ext.status & Status.ZERO else 0)
        if out and out[-1][1] == flags and out[-1][0] + ext.length <= 0xFFFFFFFF:
            out[-1] = (out[-1][0] + ext.length, flags)
        else:
            out.append((ext.length, flags))
        offset += ext.length
    return out


async def depth_extents(link: ChildLink, offset: int, length: int) -> list[tuple[int, int]]:
    """``qemu:allocation-depth``: 0 unallocated, 1 this image, 2+ a backing file."""
    out: list[tuple[int, int]] = []
    end = offset + length
    while offset < end and len(out) < MAX_EXTENTS:
        depth, run = 0, end - offset
        cur: ChildLink | None = link
        level = 1
        while cur is not None:
            ext = await cur.block_status(offset, run)
            run = min(run, ext.length)
            if ext.status & Status.ALLOCATED:
                depth = level
                break
            cur, level = cur.child.backing_child, level + 1
        if out and out[-1][1] == depth:
            out[-1] = (out[-1][0] + run, depth)
        else:
            out.append((run, depth))
        offset += run
    return out


class NBDServer:
    """Listeners and the exports they serve (``nbd-server-start``).

    At ``max_connections`` clients the listeners stop accepting, as QEMU's
    do: a further client waits in the socket's backlog, unanswered, until
    a connection ends, and holds nothing of the daemon's meanwhile.  Until
    the command line is applied they do not accept either, so a client
    finds the exports the command line makes.
    """

    def __init__(self, daemon: "Daemon", max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.daemon = daemon
        #: 0 is no limit.
        self.max_connections = max_connections
        self.listeners: list[socket.socket] = []
        self.accepting = False
        self.stopped = False
        self.connections: set[Connection] = set()
        self.unix_path: str | None = None

    def exports(self) -> dict[str, "Export"]:
        return {e.name: e for e in self.daemon.exports.values() if not e.shutting_down}

    async def listen_unix(self, path: str) -> None:
        """Listen on a unix socket created with mode 0600 (only our user connects)."""
        target = os_path(path)
        try:
            if stat.S_ISSOCK(os.stat(target).st_mode):
                os.unlink(target)  # a stale socket of an earlier run
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(target)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        self.unix_path = path
        self._listen(sock)

    async def listen_inet(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
            except OSError:
                sock.close()
                raise
            self._listen(sock)

    def _listen(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.listen(LISTEN_BACKLOG)
        self.listeners.append(sock)
        if self.accepting:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)
        self.update_accepting()

    def update_accepting(self) -> None:
        """Watch the listeners for clients exactly while a connection slot is free."""
        want = (self.daemon.started.is_set() and not self.stopped
                and (not self.max_connections or len(self.connections) < self.max_connections))
        if want == self.accepting:
            return
        self.accepting = want
        loop = asyncio.get_running_loop()
        for sock in self.listeners:
            if want:
                loop.add_reader(sock.fileno(), self._accept, sock)
            else:
                loop.remove_reader(sock.fileno())

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of descriptors, say: the client stays queued
            log.warning("NBD server could not accept a client: %s", exc.strerror)
            return
        sock.setblocking(False)
        conn = Connection(self)
        # Counted from the accept on, so a burst of clients cannot overshoot the limit.
        self.connections.add(conn)
        self.update_accepting()
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(lambda: conn, sock))

        def started(task: asyncio.Task[Any]) -> None:
            if task.cancelled() or task.exception() is not None:
                sock.close()
                conn.connection_lost(None)  # frees the slot

        task.add_done_callback(started)

    async def stop(self) -> None:
        self.stopped = True
        self.update_accepting()
        for sock in self.listeners:
            sock.close()
        for conn in list(self.connections):
            conn.abort()
        if self.unix_path is not None:
            try:
                os.unlink(os_path(self.unix_path))
            except OSError:
                pass


class Connection(asyncio.Protocol):
    """One client, from greeting to disconnect."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.parser = p.ServerParser(MAX_PAYLOAD)
        self.transport: asyncio.Transport | None = None
        self.no_zeroes = False
        self.structured = False
        self.export: "Export | None" = None
        #: Metadata contexts chosen by SET_META_CONTEXT: id -> (kind, argument).
        self.contexts: dict[int, tuple[int, Any]] = {}
        self.in_flight = 0
        self.in_flight_bytes = 0
        #: Reading is paused (too much in flight, or replies not drained).
        self.paused = False
        self.write_paused = False
        self.handshake_timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.tasks: set[asyncio.Task[None]] = set()
        #: :meth:`_process` is running (it is not re-entered).
        self._processing = False
        #: Replies finished in this turn of the event loop, sent together (see :meth:`_reply`).
        self._outbox: list[bytes | bytearray | memoryview] = []
        self._outbox_bytes = 0

    # ---- connection lifetime ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream = cast(asyncio.Transport, transport)  # a stream socket's
        self.handshake_timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT, self._handshake_expired)
        stream.write(p.greeting())

    def _handshake_expired(self) -> None:
        if not self.parser.in_transmission:
            log.info("NBD client did not finish the handshake in time")
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
        self.server.connections.discard(self)
        self.server.update_accepting()
        if self.export is not None:
            self.export.connections.discard(self)
        for task in self.tasks:
            task.cancel()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _write(self, *parts: bytes | bytearray | memoryview) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(parts)

    def _reply(self, *parts: bytes | bytearray | memoryview) -> None:
        """Queue one whole reply, to leave with the others finished meanwhile in one send.

        Requests served from memory finish many at a time: one ``sendmsg`` for
        all of them instead of one each saves syscalls and wakes the client
        once, so it sends its next requests as a batch too.  :meth:`_process`
        sends what its requests queued when it is done; a reply from elsewhere
        (a task) goes at the end of this turn of the event loop.
        """
        if not self._outbox and not self._processing:
            asyncio.get_running_loop().call_soon(self._send_replies)
        self._outbox += parts
        self._outbox_bytes += sum(map(len, parts))
        if self._outbox_bytes >= OUTBOX_MAX:
            # Big replies go now: the transport's flow control then sees them.
            self._send_replies()

    def _send_replies(self) -> None:
        if self._outbox:
            parts, self._outbox, self._outbox_bytes = self._outbox, [], 0
            self._write(*parts)

    # ---- input ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.parser.receive_data(data)
        self._process()

    def _process(self) -> None:
        """Handle buffered messages until the connection has too much in flight.

        A request served synchronously from :meth:`_request` ends by calling
        this again; the loop already running here takes the next message.
        """
        if self._processing:
            return
        self._processing = True
        try:
            while not self.closing and not self.write_paused and not self._busy():
                event = self.parser.next_event()
                if event is None:
                    break
                if isinstance(event, p.Request):
                    self._request(event)
                elif isinstance(event, p.OptionRequest):
                    self._option(event)
                else:
                    self._client_flags(event.flags)
        except p.ProtocolError as exc:
            log.info("NBD client broke the protocol: %s", exc)
            self.abort()
        finally:
            self._processing = False
        self._send_replies()
        self._flow()

    def _busy(self) -> bool:
        return self.in_flight >= MAX_IN_FLIGHT or self.in_flight_bytes >= MAX_IN_FLIGHT_BYTES

    def _flow(self) -> None:
        """Read the socket only while requests can be taken and replies are drained."""
        stop = self._busy() or self.write_paused
        if stop != self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = stop
            if stop:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._process()

    def _client_flags(self, flags: int) -> None:
        if not flags & p.ClientFlag.FIXED_NEWSTYLE:
            raise p.ProtocolError("client does not speak fixed newstyle")
        # int(): ``~`` on an IntFlag keeps only the members it knows, so the mask was 0.
        if flags & ~int(p.ClientFlag.FIXED_NEWSTYLE | p.ClientFlag.NO_ZEROES):
            raise p.ProtocolError(f"unknown client flags 0x{flags:x}")
        self.no_zeroes = bool(flags & p.ClientFlag.NO_ZEROES)

    # ---- handshake -------------------------------------------------------------

    def _transmission_flags(self, export: "Export") -> int:
        f = p.TransmissionFlag
        flags = f.HAS_FLAGS | f.SEND_FLUSH | f.SEND_FUA | f.SEND_CACHE
        if self.structured:  # DF means something only to structured reads
            flags |= f.SEND_DF
        if self.server.max_connections != 1:  # one connection at a time cannot be multi
            flags |= f.CAN_MULTI_CONN
        if export.writable:
            flags |= f.SEND_TRIM | f.SEND_WRITE_ZEROES | f.SEND_FAST_ZERO
        else:
            flags |= f.READ_ONLY
        return flags

    def _option(self, req: p.OptionRequest) -> None:
        opt = req.option
        try:
            if opt == p.Opt.EXPORT_NAME:
                self._opt_export_name(req.data.decode(errors="replace"))
            elif opt == p.Opt.ABORT:
                self._write(p.rep_ack(opt))
                self.closing = True
                self._hang_up()
            elif opt == p.Opt.LIST:
                p.no_payload(req.data, opt)
                for exp in self.server.exports().values():
                    self._write(p.rep_server(opt, exp.name, exp.description or ""))
                self._write(p.rep_ack(opt))
            elif opt in (p.Opt.INFO, p.Opt.GO):
                self._opt_info(opt, req.data)
            elif opt == p.Opt.STARTTLS:
                p.no_payload(req.data, opt)
                self._write(p.rep_error(opt, p.Rep.ERR_POLICY, "TLS not configured"))
            elif opt == p.Opt.STRUCTURED_REPLY:
                p.no_payload(req.data, opt)
                if self.structured:
                    raise p.InvalidOption("structured reply already negotiated")
                self.structured = True
                self._write(p.rep_ack(opt))
            elif opt in (p.Opt.LIST_META_CONTEXT, p.Opt.SET_META_CONTEXT):
                self._opt_meta_context(opt, req.data)
            else:
                self._write(p.rep_error(opt, p.Rep.ERR_UNSUP,
                                        f"Unsupported option {opt} ({p.opt_name(opt)})"))
        except p.InvalidOption as exc:
            self._write(p.rep_error(opt, p.Rep.ERR_INVALID, str(exc)))

    def _find(self, name: str) -> "Export | None":
        return self.server.exports().get(name)

    @property
    def serving(self) -> Export:
        """The export the handshake chose: transmission requests come only after it."""
        assert self.export is not None
        return self.export

    def _hang_up(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _opt_export_name(self, name: str) -> None:
        export = self._find(name)
        if export is None:
            # This option has no error reply: the protocol says to disconnect.
            self.closing = True
            self._hang_up()
            return
        self._write(p.export_name_reply(export.backend.length(),
                                        self._transmission_flags(export), self.no_zeroes))
        self._enter_transmission(export)

    def _opt_info(self, opt: int, data: bytes) -> None:
        name, infos = p.parse_info_request(data, opt)
        export = self._find(name)
        if export is None:
            self._write(p.rep_unknown_export(opt, name))
            return
        if p.Info.NAME in infos:
            self._write(p.rep_info_name(opt, export.name))
        if p.Info.DESCRIPTION in infos and export.description:
            self._write(p.rep_info_description(opt, export.description))
        self._write(p.rep_info_block_size(opt, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD))
        self._write(p.rep_info_export(opt, export.backend.length(),
                                      self._transmission_flags(export)))
        self._write(p.rep_ack(opt))
        if opt == p.Opt.GO:
            self._enter_transmission(export)

    def _enter_transmission(self, export: "Export") -> None:
        self.export = export
        export.connections.add(self)
        self.parser.start_transmission()
        if self.contexts and self._context_export != export.name:
            self.contexts = {}

    _context_export: str | None = None

    def _available_contexts(self, export: "Export") -> Iterator[tuple[int, str, Any]]:
        yield CONTEXT_BASE, p.BASE_ALLOCATION, None
        if export.allocation_depth:
            yield CONTEXT_DEPTH, QEMU_DEPTH, None
        for i, (name, bitmap) in enumerate(export.bitmaps.items()):
            yield CONTEXT_BITMAP + i, QEMU_BITMAP + name, bitmap

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        if opt == p.Opt.SET_META_CONTEXT and not self.structured:
            raise p.InvalidOption(f"request option '{p.opt_name(opt)}' when structured reply "
                                  "is not negotiated")
        # The export is looked up before the queries are read, as in QEMU.
        name = p.meta_context_name(data, opt)
        export = self._find(name)
        if export is None:
            self._write(p.rep_unknown_export(opt, name))
            return
        queries = p.meta_context_queries(data, opt)
        chosen: dict[int, tuple[int, Any]] = {}
        for cid, cname, arg in self._available_contexts(export):
            listing_all = opt == p.Opt.LIST_META_CONTEXT and not queries
            if listing_all or any(_context_matches(q, cname, opt) for q in queries):
                self._write(p.rep_meta_context(opt, cid, cname))
                kind = cid if cid < CONTEXT_BITMAP else CONTEXT_BITMAP
                chosen[cid] = (kind, arg)
        if opt == p.Opt.SET_META_CONTEXT:
            self.contexts = chosen
            self._context_export = name
        self._write(p.rep_ack(opt))

    # ---- transmission ----------------------------------------------------------

    def _request(self, req: p.Request) -> None:
        if req.cmd == p.Cmd.DISC:
            self.closing = True
            asyncio.get_running_loop().create_task(self._disconnect())
            return
        cost = len(req.data) if req.data else min(req.length, MAX_PAYLOAD) \
            if req.cmd == p.Cmd.READ else 0
        self.in_flight += 1
        self.in_flight_bytes += cost
        # Served here until it must wait: most requests on a memory file system never
        # do, and need no task of their own.  One that waits becomes a task then.
        serve = self._serve(req, cost)
        try:
            waiting = serve.send(None)
        except StopIteration:
            return
        task = asyncio.get_running_loop().create_task(_finish(serve, waiting))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _disconnect(self) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks))
        self._send_replies()
        if self.transport is not None:
            self.transport.close()

    async def _serve(self, req: p.Request, cost: int) -> None:
        try:
            refusal = self._refusal(req)
            if refusal is None:
                await self._dispatch(req)
            else:
                self._reply_error(req, p.Err.EINVAL, refusal)
        except OSError as exc:
            self._reply_error(req, nbd_error(exc), _FAILED.get(req.cmd, exc.strerror or ""))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("NBD request %d failed", req.cmd)
            self._reply_error(req, p.Err.EIO, "internal error")
        finally:
            self.in_flight -= 1
            self.in_flight_bytes -= cost
            self._process()

    def _reply_error(self, req: p.Request, error: int, message: str = "") -> None:
        # With structured replies every error is a chunk (with its message), as in QEMU.
        if self.structured:
            self._reply(p.chunk_error(req.handle, error, message))
        else:
            self._reply(p.simple_reply(req.handle, error))

    def _ok(self, req: p.Request) -> None:
        if self.structured and req.cmd in (p.Cmd.READ, p.Cmd.BLOCK_STATUS):
            self._reply(p.chunk_none(req.handle))
        else:
            self._reply(p.simple_reply(req.handle))

    def _refusal(self, req: p.Request) -> str | None:
        """Why a request is refused (EINVAL) before it runs, in QEMU's words and order."""
        cmd, export = req.cmd, self.serving
        if req.length > MAX_PAYLOAD and cmd in (p.Cmd.READ, p.Cmd.CACHE):
            return f"len ({req.length} ) is larger than max len ({MAX_PAYLOAD})"
        if cmd in WRITES and not export.writable:
            return "Export is read-only"
        size = export.backend.length()
        if req.offset > size or req.length > size - req.offset:
            return f"operation past EOF; From: {req.offset}, Len: {req.length}, Size: {size}"
        if req.flags & ~self._valid_flags(cmd):
            return (f"unsupported flags for command {_CMD_NAMES.get(cmd, '<unknown>')} "
                    f"(got 0x{req.flags:x})")
        if cmd == p.Cmd.BLOCK_STATUS:
            if not req.length:
                return "need non-zero length"
            if not self.contexts:
                return "CMD_BLOCK_STATUS not negotiated"
        elif cmd not in _SERVED:
            return f"invalid request type ({cmd}) received"
        return None

    async def _dispatch(self, req: p.Request) -> None:
        """Run a request :meth:`_refusal` let through."""
        export = self.serving
        backend = export.backend
        cmd = req.cmd
        if cmd == p.Cmd.READ:
            await self._read(req)
        elif cmd == p.Cmd.WRITE:
            fua = req.flags & FUA or export.writethrough
            await backend.write(req.offset, req.data, WriteFlags.FUA if fua else WriteFlags.NONE)
            self._reply(p.simple_reply(req.handle))  # simple even with structured replies
        elif cmd == p.Cmd.WRITE_ZEROES:
            flags = WriteFlags.NONE
            if not req.flags & p.CmdFlag.NO_HOLE:
                flags |= WriteFlags.MAY_UNMAP
            if req.flags & p.CmdFlag.FAST_ZERO:
                flags |= WriteFlags.NO_FALLBACK
            if req.flags & p.CmdFlag.FUA or export.writethrough:
                flags |= WriteFlags.FUA
            await backend.write_zeroes(req.offset, req.length, flags)
            self._ok(req)
        elif cmd == p.Cmd.TRIM:
            await backend.discard(req.offset, req.length)
            if req.flags & p.CmdFlag.FUA or export.writethrough:
                await backend.flush()
            self._ok(req)
        elif cmd == p.Cmd.FLUSH:
            await backend.flush()
            self._ok(req)
        elif cmd == p.Cmd.CACHE:
            # Prefetching holds nothing: read piece by piece and drop the data.
            for off in range(req.offset, req.offset + req.length, MAX_PAYLOAD):
                await backend.read(off, min(MAX_PAYLOAD, req.offset + req.length - off))
            self._ok(req)
        else:
            await self._block_status(req)

    def _valid_flags(self, cmd: int) -> int:
        """Flags a command may carry; anything else is EINVAL, as in QEMU."""
        valid = FUA
        if cmd == p.Cmd.READ and self.structured:
            valid |= p.CmdFlag.DF
        elif cmd == p.Cmd.WRITE_ZEROES:
            valid |= p.CmdFlag.NO_HOLE | p.CmdFlag.FAST_ZERO
        elif cmd == p.Cmd.BLOCK_STATUS:
            valid |= p.CmdFlag.REQ_ONE
        return int(valid)

    async def _read(self, req: p.Request) -> None:
        backend = self.serving.backend
        if not self.structured:
            data = await backend.read(req.offset, req.length)
            self._reply(p.simple_reply(req.handle), data)
            return
        if not req.length:
            self._reply(p.chunk_none(req.handle))
            return
        if req.length < SPARSE_READ_MIN or req.flags & p.CmdFlag.DF:
            data = await backend.read(req.offset, req.length)
            self._reply(p.chunk_offset_data_header(req.handle, req.offset, req.length, True), data)
            return
        parts: list[bytes | bytearray | memoryview] = []
        offset, end = req.offset, req.offset + req.length
        while offset < end:
            ext = await backend.block_status(offset, end - offset)
            n = ext.length
            last = offset + n >= end
            if ext.status & Status.ZERO:
                parts.append(p.chunk_offset_hole(req.handle, offset, n, last))
            else:
                data = await backend.read(offset, n)
                parts += [p.chunk_offset_data_header(req.handle, offset, n, last), data]
            offset += n
        self._reply(*parts)

    async def _block_status(self, req: p.Request) -> None:
        link = self.serving.backend.link
        one = bool(req.flags & p.CmdFlag.REQ_ONE)
        parts = []
        items = list(self.contexts.items())
        for i, (cid, (kind, arg)) in enumerate(items):
            if kind == CONTEXT_BASE:
                extents = await status_extents(link, req.offset, req.length, 1 if one else MAX_EXTENTS)
            elif kind == CONTEXT_DEPTH:
                extents = await depth_extents(link, req.offset, req.length)
            else:
                extents = [(n, p.STATE_DIRTY if dirty else 0)
                           for n, dirty in arg.extents(req.offset, req.length)]
            if one:
                extents = extents[:1]
                if extents[0][0] > req.length:
                    extents = [(req.length, extents[0][1])]
            parts.append(p.chunk_block_status(req.handle, cid, extents, i == len(items) - 1))
        self._reply(*parts)


class _Started:
    """Awaiting it finishes a coroutine that was started by hand and is waiting for
    ``waiting`` (what it yielded): it passes everything on, as ``await`` would have."""

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, Any, None]:
        coro, waiting = self.coro, self.waiting
        while True:
            try:
                sent = yield waiting
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: B036 - passed on, cancellation included
                try:
                    waiting = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waiting = coro.send(sent)
                except StopIteration:
                    return


async def _finish(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """The task that takes over a request that had to wait (see ``Connection._request``)."""
    await _Started(coro, waiting)


def _context_matches(query: str, name: str, opt: int) -> bool:
    """Exact names select; for LIST, ``qemu:`` and ``qemu:dirty-bitmap:`` list their family."""
    if query == name:
        return True
    if opt == p.Opt.LIST_META_CONTEXT:
        if query == "qemu:" and name.startswith("qemu:"):
            return True
        if query == QEMU_BITMAP and name.startswith(QEMU_BITMAP):
            return True
    return False
