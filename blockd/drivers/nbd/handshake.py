"""The client side of the NBD handshake: connect, negotiate, learn the export.

Only the fixed-newstyle handshake is spoken, as the protocol module
supports.  The negotiation follows QEMU's client: structured replies,
then one metadata context (``base:allocation``, or the one named by
``x-dirty-bitmap``), then ``NBD_OPT_GO`` asking for block sizes, with
``NBD_OPT_EXPORT_NAME`` as the fallback for servers without ``GO``.
Failures are raised as :class:`HandshakeError` carrying QEMU's message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from typing import Any

from blockd.nbd import protocol as p

#: Largest request a client sends when the server names no maximum (QEMU's buffer size).
MAX_BUFFER = 32 << 20


class HandshakeError(Exception):
    """The connection or the negotiation failed; the message is QEMU's, the hint
    what the server said about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


@dataclasses.dataclass
class ExportInfo:
    """What the server told us about the export."""

    size: int = 0
    flags: int = 0
    structured: bool = False
    #: The negotiated metadata context id, or ``None`` when block status is unavailable.
    context_id: int | None = None
    min_block: int = 0
    opt_block: int = 0
    max_block: int = 0


class _Stream:
    """A connected socket's stream, parsed into server events."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = p.ClientParser()

    async def event(self) -> Any:
        while True:
            try:
                ev = self.parser.next_event()
            except p.ProtocolError as exc:
                raise HandshakeError(str(exc)) from None
            if ev is not None:
                return ev
            data = await self.reader.read(65536)
            if not data:
                raise HandshakeError("Failed to read option reply: Unexpected end-of-file "
                                     "before all data were read")
            self.parser.receive_data(data)

    async def option(self, option: int, data: bytes = b"") -> None:
        self.writer.write(p.option_request(option, data))
        await self.writer.drain()

    async def reply(self, option: int) -> p.OptionReply:
        ev = await self.event()
        if not isinstance(ev, p.OptionReply) or ev.option != option:
            raise HandshakeError(f"Unexpected option reply for option {int(option)} "
                                 f"({p.option_name(option)})")
        return ev


#: What an oldstyle server sends after NBDMAGIC.
_OLDSTYLE_MAGIC = 0x00420281861253


async def _read_exactly(s: _Stream, n: int, what: str) -> bytes:
    try:
        return await s.reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise HandshakeError(f"Failed to read {what}: Unexpected end-of-file before all "
                             "data were read") from None


async def _check_magics(s: _Stream) -> None:
    """The greeting's two magics, checked with QEMU's messages before the parser sees them."""
    initial = await _read_exactly(s, 8, "initial magic")
    if int.from_bytes(initial, "big") != p.NBDMAGIC:
        raise HandshakeError(f"Bad initial magic received: 0x{int.from_bytes(initial, 'big'):x}")
    server = await _read_exactly(s, 8, "server magic")
    magic = int.from_bytes(server, "big")
    if magic == _OLDSTYLE_MAGIC:
        raise HandshakeError("Server uses the oldstyle handshake, which blockd does not speak")
    if magic != p.IHAVEOPT:
        raise HandshakeError(f"Bad server magic received: 0x{magic:x}")
    s.parser.receive_data(initial + server)


def address_text(server: dict[str, Any]) -> str:
    """How QEMU names a server address in connection errors."""
    if server["type"] == "unix":
        return server["path"]
    return f"{server['host']}:{server['port']}"


async def open_socket(server: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a ``SocketAddress`` (unix or inet), with QEMU's error text."""
    try:
        if server["type"] == "unix":
            return await asyncio.open_unix_connection(server["path"], limit=1 << 22)
        family = socket.AF_UNSPEC
        if server.get("ipv4") and not server.get("ipv6"):
            family = socket.AF_INET
        elif server.get("ipv6") and not server.get("ipv4"):
            family = socket.AF_INET6
        return await asyncio.open_connection(server["host"], server["port"], family=family,
                                             limit=1 << 22)
    except socket.gaierror as exc:
        raise HandshakeError(f"address resolution failed for {address_text(server)}: "
                             f"{exc.strerror}") from None
    except OSError as exc:
        # asyncio words its own text around the errno; QEMU prints strerror().
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise HandshakeError(f"Failed to connect to '{address_text(server)}': {reason}") \
            from None


def _reply_error(reply: p.OptionReply) -> HandshakeError:
    """QEMU's message for an error answer to an option (the server's text is only a hint)."""
    option = f"{reply.option} ({p.option_name(reply.option)})"
    messages: dict[int, str] = {
        p.Rep.ERR_POLICY: f"Denied by server for option {option}",
        p.Rep.ERR_INVALID: f"Invalid parameters for option {option}",
        p.Rep.ERR_PLATFORM: f"Server lacks support for option {option}",
        p.Rep.ERR_TLS_REQD: f"TLS negotiation required before option {option}",
        p.Rep.ERR_UNKNOWN: "Requested export not available",
        p.Rep.ERR_SHUTDOWN: f"Server shutting down before option {option}",
        p.Rep.ERR_BLOCK_SIZE_REQD: f"Server requires INFO_BLOCK_SIZE for option {option}",
    }
    message = messages.get(reply.reply, f"Unknown error code when asking for option {option}")
    said = reply.data.decode(errors="replace")
    return HandshakeError(message, f"server reported: {said}" if said else "")


async def negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    export: str, context: str | None) -> tuple[ExportInfo, p.ClientParser]:
    """Run the handshake on a fresh connection; the parser is left in transmission.

    ``context`` is the metadata context to ask for (``None``: none).
    """
    s = _Stream(reader, writer)
    await _check_magics(s)
    greeting = await s.event()
    if not greeting.flags & p.HandshakeFlag.FIXED_NEWSTYLE:
        raise HandshakeError("Server does not support the fixed newstyle handshake")
    no_zeroes = bool(greeting.flags & p.HandshakeFlag.NO_ZEROES)
    cflags = p.ClientFlag.FIXED_NEWSTYLE | (p.ClientFlag.NO_ZEROES if no_zeroes else 0)
    writer.write(p.client_flags(cflags))
    info = ExportInfo()

    await s.option(p.Opt.STRUCTURED_REPLY)
    reply = await s.reply(p.Opt.STRUCTURED_REPLY)
    if reply.reply == p.Rep.ACK:
        info.structured = True
    elif reply.reply != p.Rep.ERR_UNSUP:
        raise _reply_error(reply)

    if info.structured and context is not None:
        await s.option(p.Opt.SET_META_CONTEXT, p.meta_context_data(export, [context]))
        while True:
            reply = await s.reply(p.Opt.SET_META_CONTEXT)
            if reply.reply == p.Rep.META_CONTEXT:
                cid, name = p.parse_rep_meta_context(reply.data)
                if name != context or info.context_id is not None:
                    raise HandshakeError(f"Unexpected context name {name}")
                info.context_id = cid
            elif reply.reply == p.Rep.ACK:
                break
            elif reply.reply == p.Rep.ERR_UNSUP:
                break
            else:
                raise _reply_error(reply)

    await s.option(p.Opt.GO, p.info_request_data(export, [p.Info.BLOCK_SIZE]))
    while True:
        reply = await s.reply(p.Opt.GO)
        if reply.reply == p.Rep.INFO:
            try:
                kind, value = p.parse_rep_info(reply.data)
            except p.InvalidOption as exc:
                raise HandshakeError(f"Invalid info reply: {exc}") from None
            if kind == p.Info.EXPORT:
                info.size, info.flags = value  # type: ignore[misc]
            elif kind == p.Info.BLOCK_SIZE:
                info.min_block, info.opt_block, info.max_block = value  # type: ignore[misc]
        elif reply.reply == p.Rep.ACK:
            break
        elif reply.reply == p.Rep.ERR_UNSUP:
            # An old server: the export is chosen with EXPORT_NAME, no sizes.
            writer.write(p.option_request(p.Opt.EXPORT_NAME, export.encode()))
            s.parser.expect_export_name_reply(no_zeroes)
            ev = await s.event()
            info.size, info.flags = ev.size, ev.flags
            info.min_block = info.opt_block = info.max_block = 0
            break
        else:
            raise _reply_error(reply)
    if info.min_block:
        problem = p.check_block_sizes(info.min_block, info.opt_block, info.max_block, info.size)
        if problem:
            raise HandshakeError(problem)
    s.parser.start_transmission()
    return info, s.parser
