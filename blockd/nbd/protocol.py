"""The NBD wire format, without any I/O.

Encoders return ``bytes`` ready to send; parsers are fed bytes as they
arrive and hand back typed events, in the style of h11.  Keeping the
format here means the server is only about scheduling, and every byte
layout can be tested without sockets.  Only the fixed-newstyle
handshake is spoken (as QEMU does); all integers are big-endian.

Two parsers exist: :class:`ServerParser` reads what a client sends (the
server uses it) and :class:`ClientParser` reads what a server sends
(the ``nbd`` client driver uses it, and so do tests that talk to the
server without an external client).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import enum
import struct
from typing import Iterable, Iterator

# ---- magics ------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: Longest string (export name, description, message) the protocol allows.
MAX_STRING = 4096
#: Largest option payload accepted; anything bigger is a hostile client.
MAX_OPTION_DATA = 64 * 1024
#: Zero padding after an ``NBD_OPT_EXPORT_NAME`` reply unless NO_ZEROES was agreed.
EXPORT_NAME_PADDING = 124


class HandshakeFlag(enum.IntFlag):
    """Server handshake flags (16 bits, sent in the greeting)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client flags (32 bits, the client's first message)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERROR_BIT = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT | 1
    ERR_POLICY = REP_ERROR_BIT | 2
    ERR_INVALID = REP_ERROR_BIT | 3
    ERR_PLATFORM = REP_ERROR_BIT | 4
    ERR_TLS_REQD = REP_ERROR_BIT | 5
    ERR_UNKNOWN = REP_ERROR_BIT | 6
    ERR_SHUTDOWN = REP_ERROR_BIT | 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT | 8
    ERR_TOO_BIG = REP_ERROR_BIT | 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


REPLY_FLAG_DONE = 1 << 0


class Chunk(enum.IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class Err(enum.IntEnum):
    """Error values on the wire (fixed by the protocol, not the host's errno)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


#: Wire error values as host errno values; anything unknown reads as EINVAL (QEMU's rule).
_ERRNO_FROM_WIRE: dict[int, int] = {
    Err.EPERM: errno.EPERM, Err.EIO: errno.EIO, Err.ENOMEM: errno.ENOMEM,
    Err.EINVAL: errno.EINVAL, Err.ENOSPC: errno.ENOSPC, Err.EOVERFLOW: errno.EOVERFLOW,
    Err.ENOTSUP: errno.ENOTSUP, Err.ESHUTDOWN: errno.ESHUTDOWN}


def errno_from_wire(error: int) -> int:
    """The host errno a client reports for a server's error value."""
    return _ERRNO_FROM_WIRE.get(error, errno.EINVAL)


#: The names QEMU gives options in its client's error messages.
OPT_NAMES: dict[int, str] = {
    Opt.EXPORT_NAME: "export name", Opt.ABORT: "abort", Opt.LIST: "list",
    Opt.PEEK_EXPORT: "peek export", Opt.STARTTLS: "starttls", Opt.INFO: "info", Opt.GO: "go",
    Opt.STRUCTURED_REPLY: "structured reply", Opt.LIST_META_CONTEXT: "list meta context",
    Opt.SET_META_CONTEXT: "set meta context", Opt.EXTENDED_HEADERS: "extended headers"}


def option_name(option: int) -> str:
    return OPT_NAMES.get(option, "<unknown>")


def check_block_sizes(minimum: int, preferred: int, maximum: int, size: int) -> str | None:
    """Why an ``NBD_INFO_BLOCK_SIZE`` answer is unusable (QEMU's words), or ``None``.

    A client aligns and splits its requests by these numbers, so nonsense
    here must stop the connection rather than be guessed around.
    """
    if not minimum or minimum & (minimum - 1):
        return f"server minimum block size {minimum} is not a power of two"
    if not preferred or preferred & (preferred - 1) or preferred < minimum:
        return f"server preferred block size {preferred} is not valid"
    if maximum < minimum:
        return f"server maximum block size {maximum} is not valid"
    if size % minimum:
        return f"export size {size} is not multiple of minimum block size {minimum}"
    return None


#: ``base:allocation`` extent flags.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
#: ``qemu:dirty-bitmap:NAME`` extent flag.
STATE_DIRTY = 1 << 0

BASE_ALLOCATION = "base:allocation"


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot continue."""


class InvalidOption(Exception):
    """An option's payload is malformed; answer ``NBD_REP_ERR_INVALID`` and carry on."""


# ---- structs -----------------------------------------------------------------

_GREETING = struct.Struct(">QQH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_HEADER = struct.Struct(">IHHQI")
_CHUNK_OFFSET = struct.Struct(">IHHQIQ")
_HOLE = struct.Struct(">IHHQIQI")
_EXPORT_INFO = struct.Struct(">HQH")
_BLOCK_SIZE_INFO = struct.Struct(">HIII")
_EXTENT = struct.Struct(">II")


def _string(text: str) -> bytes:
    data = text.encode()
    if len(data) > MAX_STRING:
        raise ValueError("NBD strings are limited to 4096 bytes")
    return data


def _message(text: str) -> bytes:
    """A message for humans, cut to what the protocol allows: it may quote what a client
    sent (bytes that are not UTF-8 included, see ``_Reader.text``), and must never
    fail the reply."""
    return text.encode(errors="surrogateescape")[:MAX_STRING]


def quoted_name(name: str) -> str:
    """An export name as error messages quote it: at most 80 bytes, then "...", as QEMU."""
    raw = name.encode(errors="surrogateescape")
    if len(raw) < 80:
        return name
    return raw[:80].decode(errors="surrogateescape") + "..."


# ---- handshake: server to client ---------------------------------------------------

def greeting(flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> bytes:
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


def rep_ack(option: int) -> bytes:
    return option_reply(option, Rep.ACK)


def rep_error(option: int, reply: int, message: str = "") -> bytes:
    """An error reply; the optional message is for humans (clients log it)."""
    return option_reply(option, reply, _message(message))


def rep_unknown_export(option: int, name: str) -> bytes:
    return rep_error(option, Rep.ERR_UNKNOWN, f"export '{quoted_name(name)}' not present")


def rep_server(option: int, name: str, details: str = "") -> bytes:
    """One export in an ``NBD_OPT_LIST`` answer."""
    raw = _string(name)
    return option_reply(option, Rep.SERVER, _U32.pack(len(raw)) + raw + _string(details))


def rep_info_export(option: int, size: int, flags: int) -> bytes:
    return option_reply(option, Rep.INFO, _EXPORT_INFO.pack(Info.EXPORT, size, flags))


def rep_info_name(option: int, name: str) -> bytes:
    return option_reply(option, Rep.INFO, _U16.pack(Info.NAME) + _string(name))


def rep_info_description(option: int, description: str) -> bytes:
    return option_reply(option, Rep.INFO, _U16.pack(Info.DESCRIPTION) + _string(description))


def rep_info_block_size(option: int, minimum: int, preferred: int, maximum: int) -> bytes:
    return option_reply(option, Rep.INFO,
                        _BLOCK_SIZE_INFO.pack(Info.BLOCK_SIZE, minimum, preferred, maximum))


def rep_meta_context(option: int, context_id: int, name: str) -> bytes:
    return option_reply(option, Rep.META_CONTEXT, _U32.pack(context_id) + _string(name))


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The answer to ``NBD_OPT_EXPORT_NAME``: it has no option-reply header."""
    body = _U64.pack(size) + _U16.pack(flags)
    return body if no_zeroes else body + bytes(EXPORT_NAME_PADDING)


# ---- handshake: client to server ---------------------------------------------------

def client_flags(flags: int = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES) -> bytes:
    return _U32.pack(flags)


def option_request(option: int, data: bytes = b"") -> bytes:
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def info_request_data(name: str, infos: Iterable[int] = ()) -> bytes:
    """Payload of ``NBD_OPT_INFO`` / ``NBD_OPT_GO``."""
    raw = _string(name)
    items = list(infos)
    return (_U32.pack(len(raw)) + raw + _U16.pack(len(items))
            + b"".join(_U16.pack(i) for i in items))


def meta_context_data(name: str, queries: Iterable[str] = ()) -> bytes:
    """Payload of ``NBD_OPT_LIST_META_CONTEXT`` / ``NBD_OPT_SET_META_CONTEXT``."""
    raw = _string(name)
    items = [_string(q) for q in queries]
    return (_U32.pack(len(raw)) + raw + _U32.pack(len(items))
            + b"".join(_U32.pack(len(q)) + q for q in items))


# ---- option payload parsers --------------------------------------------------------

#: Option names in messages, as QEMU 7.2 words them (it names no others).
_OPT_NAMES: dict[int, str] = {Opt.EXPORT_NAME: "export name", Opt.ABORT: "abort", Opt.LIST: "list",
              Opt.STARTTLS: "starttls", Opt.INFO: "info", Opt.GO: "go",
              Opt.STRUCTURED_REPLY: "structured reply",
              Opt.LIST_META_CONTEXT: "list meta context",
              Opt.SET_META_CONTEXT: "set meta context"}


def opt_name(option: int) -> str:
    return _OPT_NAMES.get(option, "<unknown>")


class _Reader:
    """Bounds-checked reads from one option payload; malformed means InvalidOption,
    with QEMU's words for the option being read."""

    def __init__(self, data: bytes, option: int = 0) -> None:
        self.data = data
        self.pos = 0
        self.option = option

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise InvalidOption(f"Inconsistent lengths in option {opt_name(self.option)}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def name(self) -> str:
        """An export name: its length (at most 4096), then its bytes."""
        length = self.u32()
        if length > MAX_STRING:
            raise InvalidOption(f"Invalid name length: {length}")
        return self.text(length)

    def text(self, length: int) -> str:
        """A client's string.  Bytes that are not UTF-8 are kept (surrogate escapes):
        such a name matches no export and is quoted back as sent, as QEMU does."""
        raw = self.take(length)
        if b"\0" in raw:
            raise InvalidOption(f"Unexpected embedded NUL in option {opt_name(self.option)}")
        return raw.decode(errors="surrogateescape")

    def string(self, length: int) -> str:
        """A server's string (client side): UTF-8 within the protocol's limit."""
        if length > MAX_STRING:
            raise InvalidOption("string is too long")
        try:
            return self.take(length).decode()
        except UnicodeDecodeError:
            raise InvalidOption("string is not valid UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise InvalidOption(f"option '{opt_name(self.option)}' has unexpected length")


def no_payload(data: bytes, option: int) -> None:
    """Options that take no data refuse some with QEMU's words."""
    _Reader(data, option).end()


def parse_info_request(data: bytes, option: int = Opt.GO) -> tuple[str, list[int]]:
    """Export name and requested info types of ``NBD_OPT_INFO`` / ``NBD_OPT_GO``."""
    r = _Reader(data, option)
    name = r.name()
    count = r.u16()
    infos = [r.u16() for _ in range(count)]
    r.end()
    return name, infos


def meta_context_name(data: bytes, option: int) -> str:
    """The export name of a meta-context option: looked up before the queries are read."""
    return _Reader(data, option).name()


def meta_context_queries(data: bytes, option: int) -> list[str]:
    """The queries after the export name.  As in QEMU 7.2, a query longer than the
    protocol's strings is skipped.  Bytes after the last query are ignored (QEMU 7.2
    leaves them in the stream, to be misread as the next option's header)."""
    r = _Reader(data, option)
    r.name()
    queries = []
    for _ in range(r.u32()):
        length = r.u32()
        if length > MAX_STRING:
            r.take(length)
        else:
            queries.append(r.text(length))
    return queries


# ---- option reply payload parsers (client side) ------------------------------------

def parse_rep_info(data: bytes) -> tuple[int, object]:
    """``(info type, value)``: EXPORT gives ``(size, flags)``, BLOCK_SIZE a triple."""
    r = _Reader(data)
    kind = r.u16()
    if kind == Info.EXPORT:
        size = _U64.unpack(r.take(8))[0]
        value: object = (size, r.u16())
    elif kind == Info.BLOCK_SIZE:
        value = (r.u32(), r.u32(), r.u32())
    elif kind in (Info.NAME, Info.DESCRIPTION):
        value = r.string(len(data) - 2)
    else:
        value = r.take(len(data) - 2)
    r.end()
    return kind, value


def parse_rep_meta_context(data: bytes) -> tuple[int, str]:
    r = _Reader(data)
    context_id = r.u32()
    return context_id, r.string(len(data) - 4)


# ---- transmission: client to server ------------------------------------------------

def request(cmd: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0,
            data: bytes = b"") -> bytes:
    """A request header, followed by the payload of a write."""
    return _REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


# ---- transmission: server to client ------------------------------------------------

def simple_reply(handle: int, error: int = 0) -> bytes:
    """Header of a simple reply; a successful read's data follows it."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk_none(handle: int) -> bytes:
    """The final chunk of a reply whose earlier chunks carried everything."""
    return _CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, Chunk.NONE, handle, 0)


def chunk_offset_data_header(handle: int, offset: int, length: int, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; ``length`` bytes of data follow it."""
    return _CHUNK_OFFSET.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                              Chunk.OFFSET_DATA, handle, 8 + length, offset)


def chunk_offset_hole(handle: int, offset: int, length: int, done: bool) -> bytes:
    return _HOLE.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                      Chunk.OFFSET_HOLE, handle, 12, offset, length)


def chunk_block_status(handle: int, context_id: int, extents: Iterable[tuple[int, int]],
                       done: bool) -> bytes:
    """A BLOCK_STATUS chunk for one metadata context: ``(length, flags)`` descriptors."""
    body = _U32.pack(context_id) + b"".join(_EXTENT.pack(n, f) for n, f in extents)
    return _CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                              Chunk.BLOCK_STATUS, handle, len(body)) + body


def chunk_error(handle: int, error: int, message: str = "", offset: int | None = None,
                done: bool = True) -> bytes:
    """An ERROR chunk, or ERROR_OFFSET when ``offset`` names where a read failed."""
    text = _message(message)
    body = _U32.pack(error) + _U16.pack(len(text)) + text
    kind = Chunk.ERROR
    if offset is not None:
        body += _U64.pack(offset)
        kind = Chunk.ERROR_OFFSET
    return _CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                              kind, handle, len(body)) + body


# ---- chunk payload parsers (client side) -------------------------------------------

def parse_offset_data(payload: bytes) -> tuple[int, bytes]:
    if len(payload) < 9:
        raise ProtocolError("OFFSET_DATA chunk too short")
    return _U64.unpack_from(payload)[0], payload[8:]


def parse_offset_hole(payload: bytes) -> tuple[int, int]:
    if len(payload) != 12:
        raise ProtocolError("OFFSET_HOLE chunk has the wrong size")
    return _U64.unpack_from(payload)[0], _U32.unpack_from(payload, 8)[0]


def parse_block_status(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise ProtocolError("BLOCK_STATUS chunk has the wrong size")
    context_id = _U32.unpack_from(payload)[0]
    return context_id, [_EXTENT.unpack_from(payload, p) for p in range(4, len(payload), 8)]


def parse_error_chunk(payload: bytes) -> tuple[int, str, int | None]:
    """``(error, message, offset or None)`` of an ERROR / ERROR_OFFSET chunk."""
    if len(payload) < 6:
        raise ProtocolError("error chunk too short")
    error, mlen = struct.unpack_from(">IH", payload)
    rest = payload[6 + mlen:]
    offset = _U64.unpack(rest)[0] if len(rest) == 8 else None
    return error, payload[6:6 + mlen].decode(errors="replace"), offset


# ---- events ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClientFlags:
    flags: int


@dataclasses.dataclass(frozen=True)
class OptionRequest:
    option: int
    data: bytes


@dataclasses.dataclass(slots=True)
class Request:
    """A transmission request; ``data`` is the payload of a WRITE (often a view of
    the received bytes), else empty.

    Not frozen, unlike the other events: one is built per request, and a
    frozen dataclass is several times slower to build.
    """

    flags: int
    cmd: int
    handle: int
    offset: int
    length: int
    data: bytes | memoryview = b""


@dataclasses.dataclass(frozen=True)
class Greeting:
    flags: int


@dataclasses.dataclass(frozen=True)
class OptionReply:
    option: int
    reply: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class ExportNameReply:
    size: int
    flags: int


@dataclasses.dataclass(frozen=True)
class SimpleReply:
    handle: int
    error: int
    data: bytes = b""


@dataclasses.dataclass(frozen=True)
class StructuredChunk:
    flags: int
    type: int
    handle: int
    payload: bytes

    @property
    def done(self) -> bool:
        return bool(self.flags & REPLY_FLAG_DONE)


class _Buffer:
    """Received chunks, consumed from the front.

    Chunks are kept as the transport delivered them, so a write payload that
    lies inside one chunk is handed on as a view of it without a copy; only
    bytes that straddle chunks are joined.
    """

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes | memoryview] = collections.deque()
        self._pos = 0  # consumed bytes of the first chunk
        self._size = 0  # unconsumed bytes in all chunks

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._chunks.append(data if type(data) is bytes else bytes(data))
            self._size += len(data)

    def available(self) -> int:
        return self._size

    def _front(self, n: int) -> tuple[bytes | memoryview, int]:
        """``n`` contiguous unconsumed bytes: (buffer, offset) inside the first chunk.

        Bytes that straddle chunks are joined, exactly ``n`` of them: the rest
        of the last chunk stays behind as a view, so nothing is copied twice.
        """
        if not n:
            return b"", 0
        chunks = self._chunks
        first = chunks[0]
        if len(first) - self._pos >= n:
            return first, self._pos
        parts: list[bytes | memoryview] = [memoryview(first)[self._pos:]]
        have = len(parts[0])
        chunks.popleft()
        while have < n:
            chunk = chunks.popleft()
            need = n - have
            if len(chunk) > need:
                parts.append(memoryview(chunk)[:need])
                chunks.appendleft(memoryview(chunk)[need:])
                have = n
            else:
                parts.append(chunk)
                have += len(chunk)
        joined = b"".join(parts)
        chunks.appendleft(joined)
        self._pos = 0
        return joined, 0

    def peek(self, st: struct.Struct) -> tuple:
        return st.unpack_from(*self._front(st.size))

    def take(self, n: int) -> bytes:
        chunk = self.take_view(n)
        return chunk if type(chunk) is bytes else bytes(chunk)

    def take_view(self, n: int) -> bytes | memoryview:
        """Like :meth:`take`, without copying: for write payloads."""
        buf, off = self._front(n)
        chunk = buf if off == 0 and n == len(buf) else memoryview(buf)[off:off + n]
        self.skip(n)
        return chunk

    def skip(self, n: int) -> None:
        self._size -= n
        self._pos += n
        chunks = self._chunks
        while chunks and self._pos >= len(chunks[0]):
            self._pos -= len(chunks[0])
            chunks.popleft()


class ServerParser:
    """Parses what a client sends: flags, then options, then requests.

    The handshake ends when the server says so (:meth:`start_transmission`
    after a successful ``NBD_OPT_GO`` / ``NBD_OPT_EXPORT_NAME``), because
    only the server knows whether the option succeeded.
    """

    def __init__(self, max_payload: int = 32 << 20) -> None:
        self._buf = _Buffer()
        self._state = "flags"
        self._max_payload = max_payload

    def receive_data(self, data: bytes) -> None:
        self._buf.feed(data)

    def start_transmission(self) -> None:
        self._state = "transmission"

    @property
    def in_transmission(self) -> bool:
        return self._state == "transmission"

    def next_event(self) -> ClientFlags | OptionRequest | Request | None:
        """The next complete message, or ``None`` if more bytes are needed."""
        buf = self._buf
        if self._state == "transmission":
            if buf.available() < _REQUEST.size:
                return None
            magic, flags, cmd, handle, offset, length = buf.peek(_REQUEST)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic 0x{magic:08x}")
            if cmd == Cmd.WRITE:
                if length > self._max_payload:
                    raise ProtocolError(f"write of {length} bytes exceeds the maximum payload")
                if buf.available() < _REQUEST.size + length:
                    return None
                buf.skip(_REQUEST.size)
                return Request(flags, cmd, handle, offset, length, buf.take_view(length))
            buf.skip(_REQUEST.size)
            return Request(flags, cmd, handle, offset, length)
        if self._state == "flags":
            if buf.available() < 4:
                return None
            (flags,) = buf.peek(_U32)
            buf.skip(4)
            self._state = "options"
            return ClientFlags(flags)
        if self._state == "options":
            if buf.available() < _OPTION_HEADER.size:
                return None
            magic, option, length = buf.peek(_OPTION_HEADER)
            if magic != IHAVEOPT:
                raise ProtocolError("bad option magic")
            if length > MAX_OPTION_DATA:
                raise ProtocolError(f"option of {length} bytes is too long")
            if buf.available() < _OPTION_HEADER.size + length:
                return None
            buf.skip(_OPTION_HEADER.size)
            return OptionRequest(option, buf.take(length))
        return None

    def events(self) -> Iterator[ClientFlags | OptionRequest | Request]:
        """Every complete message buffered so far."""
        while (event := self.next_event()) is not None:
            yield event


class ClientParser:
    """Parses what a server sends; the client says what it is waiting for.

    A simple reply to a read carries as many bytes as were asked, which
    only the client knows: :meth:`expect_read` records that per handle.
    """

    def __init__(self) -> None:
        self._buf = _Buffer()
        self._state = "greeting"
        self._no_zeroes = False
        self._reads: dict[int, int] = {}

    def receive_data(self, data: bytes) -> None:
        self._buf.feed(data)

    def expect_export_name_reply(self, no_zeroes: bool) -> None:
        self._state = "export-name"
        self._no_zeroes = no_zeroes

    def start_transmission(self) -> None:
        self._state = "transmission"

    def expect_read(self, handle: int, length: int) -> None:
        self._reads[handle] = length

    def next_event(self) -> Greeting | OptionReply | ExportNameReply | SimpleReply | StructuredChunk | None:
        buf = self._buf
        if self._state == "greeting":
            if buf.available() < _GREETING.size:
                return None
            magic, opt_magic, flags = buf.peek(_GREETING)
            if magic != NBDMAGIC or opt_magic != IHAVEOPT:
                raise ProtocolError("not a fixed-newstyle NBD server")
            buf.skip(_GREETING.size)
            self._state = "options"
            return Greeting(flags)
        if self._state == "options":
            if buf.available() < _OPTION_REPLY.size:
                return None
            magic, option, reply, length = buf.peek(_OPTION_REPLY)
            if magic != OPT_REPLY_MAGIC:
                raise ProtocolError("bad option reply magic")
            if buf.available() < _OPTION_REPLY.size + length:
                return None
            buf.skip(_OPTION_REPLY.size)
            return OptionReply(option, reply, buf.take(length))
        if self._state == "export-name":
            need = 10 if self._no_zeroes else 10 + EXPORT_NAME_PADDING
            if buf.available() < need:
                return None
            body = buf.take(need)
            self._state = "transmission"
            return ExportNameReply(_U64.unpack_from(body)[0], _U16.unpack_from(body, 8)[0])
        if buf.available() < 4:
            return None
        (magic,) = buf.peek(_U32)
        if magic == SIMPLE_REPLY_MAGIC:
            if buf.available() < _SIMPLE_REPLY.size:
                return None
            _, error, handle = buf.peek(_SIMPLE_REPLY)
            length = self._reads.get(handle, 0) if error == 0 else 0
            if buf.available() < _SIMPLE_REPLY.size + length:
                return None
            buf.skip(_SIMPLE_REPLY.size)
            self._reads.pop(handle, None)
            return SimpleReply(handle, error, buf.take(length))
        if magic == STRUCTURED_REPLY_MAGIC:
            if buf.available() < _CHUNK_HEADER.size:
                return None
            _, flags, kind, handle, length = buf.peek(_CHUNK_HEADER)
            if buf.available() < _CHUNK_HEADER.size + length:
                return None
            buf.skip(_CHUNK_HEADER.size)
            if flags & REPLY_FLAG_DONE:
                self._reads.pop(handle, None)
            return StructuredChunk(flags, kind, handle, buf.take(length))
        raise ProtocolError(f"bad reply magic 0x{magic:08x}")

    def events(self) -> Iterator[Greeting | OptionReply | ExportNameReply | SimpleReply | StructuredChunk]:
        while (event := self.next_event()) is not None:
            yield event
