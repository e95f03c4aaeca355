"""QMP's dialect of JSON, reproduced byte for byte from QEMU 7.2.

QEMU does not use a textbook JSON parser.  Its lexer is a byte-level
state machine with its own error recovery, a streamer splits the token
stream into messages by counting brackets, a parser turns each message
into QObjects, and the encoder prints QDicts in hash-table order.  Every
one of those quirks is visible to a QMP client (error texts, how many
errors a bad line causes, the order of keys in replies), so this module
models them all rather than wrapping :mod:`json`.

The module is sans-I/O: :class:`JSONStreamer` eats bytes and returns
messages, :func:`encode` returns text.  The standard :mod:`json` decoder
is used only as an accelerator for messages that both parsers are known
to read identically.
"""

from __future__ import annotations

import codecs
import functools
import json
import math
import re
from typing import Any, Callable, Protocol, cast

__all__ = ["JSONStreamer", "encode", "qdict_keys"]

Message = tuple[object | None, str | None]

# Token kinds.  The structural ones come first so a single comparison
# tells them apart from scalars.
_LCURLY, _RCURLY, _LSQUARE, _RSQUARE, _COLON, _COMMA = range(6)
_STRING, _INTEGER, _FLOAT, _KEYWORD = range(6, 10)
_STRUCTURAL = {ord(c): k for c, k in zip("{}[]:,", range(6))}

# Lexer states.  Every state but the first two is "inside a token".
(_START, _RECOVER, _DQ, _DQ_ESC, _SQ, _SQ_ESC, _ZERO, _INT, _SIGN,
 _FRAC0, _FRAC, _EXP0, _EXP_SIGN, _EXP, _WORD) = range(15)

# What a byte does in a state: consume it and move on, consume it and
# report the token so far as stray, consume it and complete the token,
# or complete the token without it (the byte then starts afresh).
_GO, _ERR, _DONE, _AHEAD = range(4)


def _state(default: tuple[int, int], *rules: tuple[bytes, tuple[int, int]]) -> list[tuple[int, int]]:
    """Build one row of the lexer's transition table."""
    row = [default] * 256
    for chars, action in rules:
        for c in chars:
            row[c] = action
    return row


_DIGITS = b"0123456789"
_STRING_BODY = bytes(range(0x20, 0xFE))
_ERROR = (_ERR, 0)
_TABLE: dict[int, list[tuple[int, int]]] = {
    _DQ: _state(_ERROR, (_STRING_BODY, (_GO, _DQ)), (b"\\", (_GO, _DQ_ESC)), (b'"', (_DONE, _STRING))),
    _DQ_ESC: _state(_ERROR, (_STRING_BODY, (_GO, _DQ))),
    _SQ: _state(_ERROR, (_STRING_BODY, (_GO, _SQ)), (b"\\", (_GO, _SQ_ESC)), (b"'", (_DONE, _STRING))),
    _SQ_ESC: _state(_ERROR, (_STRING_BODY, (_GO, _SQ))),
    _ZERO: _state((_AHEAD, _INTEGER), (_DIGITS, _ERROR), (b".", (_GO, _FRAC0)), (b"eE", (_GO, _EXP0))),
    _INT: _state((_AHEAD, _INTEGER), (_DIGITS, (_GO, _INT)), (b".", (_GO, _FRAC0)), (b"eE", (_GO, _EXP0))),
    _SIGN: _state(_ERROR, (b"0", (_GO, _ZERO)), (_DIGITS[1:], (_GO, _INT))),
    _FRAC0: _state(_ERROR, (_DIGITS, (_GO, _FRAC))),
    _FRAC: _state((_AHEAD, _FLOAT), (_DIGITS, (_GO, _FRAC)), (b"eE", (_GO, _EXP0))),
    _EXP0: _state(_ERROR, (b"+-", (_GO, _EXP_SIGN)), (_DIGITS, (_GO, _EXP))),
    _EXP_SIGN: _state(_ERROR, (_DIGITS, (_GO, _EXP))),
    _EXP: _state((_AHEAD, _FLOAT), (_DIGITS, (_GO, _EXP))),
    _WORD: _state((_AHEAD, _KEYWORD), (b"abcdefghijklmnopqrstuvwxyz", (_GO, _WORD))),
}
# Where a token may begin.  Whitespace and structural bytes never get
# here: the START fast path below always matches them.
_FIRST = _state(_ERROR, (b'"', (_GO, _DQ)), (b"'", (_GO, _SQ)), (b"0", (_GO, _ZERO)),
                (_DIGITS[1:], (_GO, _INT)), (b"-", (_GO, _SIGN)),
                (b"abcdefghijklmnopqrstuvwxyz", (_GO, _WORD)))

# Runs of bytes that keep a state where it is, so long tokens cost one
# regex call instead of a Python step per byte.
_RUNS = {
    _DQ: re.compile(rb'[^"\\\x00-\x1f\xfe\xff]+'),
    _SQ: re.compile(rb"[^'\\\x00-\x1f\xfe\xff]+"),
    _INT: re.compile(rb"[0-9]+"),
    _FRAC: re.compile(rb"[0-9]+"),
    _EXP: re.compile(rb"[0-9]+"),
    _WORD: re.compile(rb"[a-z]+"),
}
# After a lexical error QEMU skips to a byte where JSON can plausibly
# resume: a structural character, a control character other than tab,
# or one of the bytes that never occur in UTF-8.
_RECOVERY_SKIP = re.compile(rb"[^\x00-\x08\x0a-\x1f\[\]{}:,\xfe\xff]*")

# One step at the start state: optional whitespace, then a complete token.
# Numbers and keywords only match when the byte that ends them is
# already here.  The empty last group means "no complete token": the
# data ran out, or the byte-level table has to take over.
_TOKEN = re.compile(rb"""
    [ \t\r\n]*+
    (?:
        ([{}\[\]:,])
      | ("[^"\\\x00-\x1f\xfe\xff]*+(?:\\[\x20-\xfd][^"\\\x00-\x1f\xfe\xff]*+)*+"
        |'[^'\\\x00-\x1f\xfe\xff]*+(?:\\[\x20-\xfd][^'\\\x00-\x1f\xfe\xff]*+)*+')
      | (-?+(?:0|[1-9][0-9]*+)(?=[^0-9.eE]))
      | (-?+(?:0|[1-9][0-9]*+)(?:\.[0-9]++(?:[eE][+-]?+[0-9]++)?+|[eE][+-]?+[0-9]++)(?=[^0-9eE]))
      | ([a-z]++(?=[^a-z]))
      | ()
    )""", re.VERBOSE)
_PUNCT_GROUP, _NO_TOKEN = 1, 6
_GROUP_KIND = {2: _STRING, 3: _INTEGER, 4: _FLOAT, 5: _KEYWORD}
_WHITESPACE = re.compile(r"[ \t\r\n]*")


class _TokenMatch(Protocol):
    """A match of ``_TOKEN``: one of its groups always matched."""

    lastindex: int

    def start(self, group: int) -> int: ...

    def end(self) -> int: ...


# These patterns match (maybe empty) at every position, so their matches are never None.
_match_token = cast(Callable[[bytes, int], _TokenMatch], _TOKEN.match)
_skip_garbage = cast(Callable[[bytes, int], "re.Match[bytes]"], _RECOVERY_SKIP.match)
_skip_whitespace = cast(Callable[[str, int], "re.Match[str]"], _WHITESPACE.match)
_NON_ASCII = re.compile(r"[^\x00-\x7f]")

# Parser states: what the parser expects next.
(_P_TOP, _P_LIST_FIRST, _P_LIST_VALUE, _P_LIST_SEP, _P_DICT_FIRST, _P_DICT_KEY,
 _P_DICT_COLON, _P_DICT_VALUE, _P_DICT_SEP, _P_DONE, _P_FAILED) = range(11)
_EXPECTING_VALUE = {_P_TOP, _P_LIST_FIRST, _P_LIST_VALUE, _P_DICT_FIRST, _P_DICT_KEY, _P_DICT_VALUE}
_SEPARATOR_ERRORS = {
    _P_LIST_SEP: "expected separator in list",
    _P_DICT_COLON: "missing : in object pair",
    _P_DICT_SEP: "expected separator in dict",
}
_KEYWORDS = {b"true": True, b"false": False, b"null": None}

_INT64_MIN = -(1 << 63)
_UINT64_LIMIT = 1 << 64
_MIN_CODEPOINT = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)
_SIMPLE_ESCAPES = {ord(k): v for k, v in {
    '"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
}.items()}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")
# Code points QEMU refuses although Python's UTF-8 codec allows them.
_NONCHARACTER = re.compile("[\ufdd0-\ufdef" + "".join(
    chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17)) + "]")
_UNPRINTABLE = re.compile("[\ud800-\udfff" + _NONCHARACTER.pattern[1:-1] + "]")


class _ParseError(Exception):
    """A message is malformed; the argument is QEMU's text after "JSON parse error, "."""


class _NotFast(Exception):
    """The :mod:`json` accelerator met something only the full parser gets right."""


def _codepoint(data: bytes, i: int) -> tuple[int, int]:
    """Decode one character of QEMU's modified UTF-8 at data[i].

    Returns the code point (-1 when invalid) and where the next character
    starts.  How far an invalid sequence reaches matters: it decides how
    many replacement characters QEMU prints.
    """
    byte = data[i]
    i += 1
    if byte < 0x80:
        return byte, i
    if byte >= 0xFE or not byte & 0x40:
        return -1, i
    length = 2
    while byte & (0x80 >> length):
        length += 1
    cp = byte & ((0x80 >> length) - 1)
    for _ in range(length - 1):
        nxt = data[i] if i < len(data) else 0
        if nxt & 0xC0 != 0x80:
            return -1, i
        i += 1
        cp = cp << 6 | nxt & 0x3F
    if (cp > 0x10FFFF or 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE or 0xD800 <= cp <= 0xDFFF
            or (cp < _MIN_CODEPOINT[length - 2] and not (cp == 0 and length == 2))):
        return -1, i
    return cp, i


def _render(data: bytes) -> str:
    """Text as QEMU prints a C string: invalid UTF-8 becomes U+FFFD."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if text.isascii() or not _NONCHARACTER.search(text):
            return text
    out = []
    i = 0
    while i < len(data):
        cp, i = _codepoint(data, i)
        out.append(chr(cp) if cp >= 0 else "\ufffd")
    return "".join(out)


def _c_string(data: bytes) -> bytes:
    """What "%s" prints of a buffer: everything before the first NUL."""
    return data.split(b"\0", 1)[0]


def _qemu_bytes_error(exc: UnicodeError) -> tuple[bytes, int]:
    """Codec error handler: lone surrogates as QEMU would hold them.

    U+DC80..U+DCFF are raw bytes smuggled through ``surrogateescape``
    (how Python decodes file names); other surrogates keep their
    three-byte form, which QEMU treats as invalid.
    """
    assert isinstance(exc, UnicodeEncodeError)
    out = bytearray()
    for ch in exc.object[exc.start:exc.end]:
        cp = ord(ch)
        out += bytes([cp - 0xDC00]) if 0xDC80 <= cp <= 0xDCFF else ch.encode("utf-8", "surrogatepass")
    return bytes(out), exc.end


codecs.register_error("blockd.qjson", _qemu_bytes_error)


def _qemu_bytes(text: str) -> bytes:
    """The C string QEMU would hold for text (NUL is stored as C0 80)."""
    return text.encode("utf-8", "blockd.qjson").replace(b"\0", b"\xc0\x80")


def _decode_plain(raw: bytes) -> str:
    """Decode string contents without escapes, validating like QEMU."""
    if raw.isascii():
        return raw.decode("ascii")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # The one overlong form QEMU accepts: C0 80 for U+0000.  C0 can
        # only ever start a sequence, so replacing the pair is exact.
        try:
            text = raw.replace(b"\xc0\x80", b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise _ParseError("invalid UTF-8 sequence in string") from None
    if _NONCHARACTER.search(text):
        raise _ParseError("invalid UTF-8 sequence in string")
    return text


def _hex4(raw: bytes, i: int) -> int:
    m = _HEX4.match(raw, i)
    return int(m.group(), 16) if m else -1


def _decode_string(token: bytes) -> str:
    """Turn a string token (quotes included) into its value, or fail as QEMU does."""
    if b"\\" not in token:
        return _decode_plain(token[1:-1])
    parts = []
    i = 1
    end = len(token) - 1
    while i < end:
        j = token.find(b"\\", i, end)
        if j < 0:
            j = end
        if j > i:
            parts.append(_decode_plain(token[i:j]))
        if j == end:
            break
        simple = _SIMPLE_ESCAPES.get(token[j + 1])
        if simple is not None:
            parts.append(simple)
            i = j + 2
            continue
        if token[j + 1] != ord("u"):
            raise _ParseError("invalid escape sequence in string")
        cp = _hex4(token, j + 2)
        i = j + 6
        if 0xD800 <= cp <= 0xDBFF and token[i:i + 2] == b"\\u":
            low = _hex4(token, i + 2)
            if 0xDC00 <= low <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) | (low & 0x3FF)
                i += 6
            else:
                cp = -1
        if cp < 0 or 0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE:
            # QEMU quotes the escape as far as it read it, which may run
            # into the closing quote when the hex digits are missing.
            raise _ParseError(f"{_render(token[j:i])} is not a valid Unicode character")
        parts.append(chr(cp))
    return "".join(parts)


def _number(kind: int, token: bytes | str) -> int | float:
    """Numbers as QEMU keeps them: int64, else uint64, else double."""
    if kind == _INTEGER and len(token) <= 20:
        value = int(token)
        if _INT64_MIN <= value < _UINT64_LIMIT:
            return value
    return float(token)


def _integer(text: str) -> int | float:
    """json hook: integers beyond 64 bits become doubles, as in QEMU."""
    return _number(_INTEGER, text)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json hook: QEMU rejects duplicate keys, so leave those to the full parser."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _NotFast
    return result


def _no_constants(name: str) -> float:
    """json hook: NaN and Infinity are not JSON to QEMU."""
    raise _NotFast


# The C scanner behind json.loads, without the Python wrapper around it.
_SCAN = json.JSONDecoder(object_pairs_hook=_pairs, parse_int=_integer,
                         parse_constant=_no_constants).scan_once  # type: ignore[attr-defined]


class JSONStreamer:
    """Feed raw bytes from a QMP client; get back complete messages.

    Lexer, streamer and parser are fused: tokens are parsed as they
    arrive, so only the value under construction and the token being
    lexed are kept, both bounded by QEMU's limits.  Errors the parser
    finds are held back until the message ends, because QEMU parses a
    message only once its brackets balance and a limit error that
    strikes first replaces the parse error.
    """

    #: Bytes all tokens of one message may total; also the longest token.
    MAX_TOKEN_SIZE = 64 << 20
    #: Tokens in one message.
    MAX_TOKEN_COUNT = 2 << 20
    #: Open brackets and braces, counted together.
    MAX_NESTING = 1024

    def __init__(self) -> None:
        self._lex = _START
        self._tok = bytearray()  # the token being lexed
        self._out: list[Message] = []
        self._reset()

    def _reset(self) -> None:
        """Forget the message in progress (the lexer carries on as it is)."""
        self._braces = 0
        self._brackets = 0
        self._count = 0
        self._size = 0
        self._error: str | None = None
        self._pstate = _P_TOP
        self._stack: list[tuple[Any, int, Any]] = []
        self._cur: Any = None
        self._key: Any = None
        self._result: Any = None

    # ---- public interface ---------------------------------------------

    def feed(self, data: bytes) -> list[Message]:
        """Each item is (value, None) for a parsed top-level JSON value or
        (None, desc) for an error, desc being QEMU's text, such as
        "JSON parse error, expecting value"."""
        out: list[Message] = []
        self._out = out
        data = bytes(data)
        n = len(data)
        pos = 0
        text: str | None = None
        ascii = True
        match = _match_token
        push = self._push
        while pos < n:
            if self._lex != _START:
                pos = self._lex_token(data, pos)
                continue
            m = match(data, pos)
            group = m.lastindex
            start = m.start(group)
            pos = m.end()
            if group == _PUNCT_GROUP:
                kind = _STRUCTURAL[data[start]]
                if not self._count and (kind == _LCURLY or kind == _LSQUARE):
                    if text is None:
                        text = data.decode("latin-1")
                        ascii = data.isascii()
                    # It stops at a message it cannot take, or after the last one.
                    pos = self._fast_messages(text, start, ascii)
                    if pos == n or data[pos] not in b"{[":
                        continue
                    kind = _STRUCTURAL[data[pos]]
                    pos += 1
                push(kind, b"")
            elif group != _NO_TOKEN and pos - start <= self.MAX_TOKEN_SIZE:
                push(_GROUP_KIND[group], data[start:pos])
            elif start < n:
                # A token the regex cannot finish here: the byte-level table.
                action, state = _FIRST[data[start]]
                self._tok.append(data[start])
                pos = start + 1
                if action == _ERR:
                    self._stray()
                else:
                    self._lex = state
                    self._check_token_size()
        return out

    def end(self) -> list[Message]:
        """At EOF: finish a pending partial value as QEMU does at end of input.

        A number or keyword still being lexed counts as complete, an
        unterminated string or number is a stray token, and a message
        whose brackets never balanced is reported (usually as
        "premature EOI").
        """
        out: list[Message] = []
        self._out = out
        if self._lex == _RECOVER:
            self._lex = _START
        elif self._lex != _START:
            action, kind = _TABLE[self._lex][0]
            if action == _AHEAD:
                self._emit_token(kind)
            else:
                self._stray()
            self._lex = _START
        if self._count:
            self._finish()
        return out

    # ---- lexer --------------------------------------------------------

    def _lex_token(self, data: bytes, pos: int) -> int:
        """Advance a token that is in progress (or skip after an error)."""
        state = self._lex
        if state == _RECOVER:
            pos = _skip_garbage(data, pos).end()
            if pos < len(data):
                self._lex = _START
            return pos
        run = _RUNS.get(state)
        if run is not None:
            m = run.match(data, pos)
            if m:
                end = m.end()
                room = self.MAX_TOKEN_SIZE + 1 - len(self._tok)
                if end - pos >= room:
                    # QEMU gives up on a token the byte it grows too long.
                    self._tok += data[pos:pos + room]
                    self._check_token_size()
                    return pos + room
                self._tok += data[pos:end]
                pos = end
                if pos == len(data):
                    return pos
        action, arg = _TABLE[state][data[pos]]
        if action == _AHEAD:
            self._emit_token(arg)
            return pos
        self._tok.append(data[pos])
        if action == _GO:
            self._lex = arg
            self._check_token_size()
        elif action == _DONE:
            self._emit_token(arg)
        else:
            self._stray()
        return pos + 1

    def _check_token_size(self) -> None:
        """Abandon a token that outgrew the limit; lexing restarts after it."""
        if len(self._tok) > self.MAX_TOKEN_SIZE:
            self._tok.clear()
            self._lex = _START
            self._fail("JSON token size limit exceeded")

    def _emit_token(self, kind: int) -> None:
        token = bytes(self._tok)
        self._tok.clear()
        self._lex = _START
        self._push(kind, token)

    def _stray(self) -> None:
        """Report a lexical error; the lexer then resynchronises."""
        token = bytes(self._tok)
        self._tok.clear()
        self._lex = _RECOVER
        self._fail(f"JSON parse error, stray '{_render(_c_string(token))}'")

    # ---- streamer -----------------------------------------------------

    def _fast_messages(self, text: str, pos: int, ascii: bool) -> int:
        """Parse whole messages with :mod:`json` while that is provably exact.

        text is the input decoded as Latin-1, so positions match the
        bytes.  Returns where the last message parsed this way (and the
        whitespace after it) ended: pos itself if there was none.
        """
        limit = min(self.MAX_TOKEN_COUNT, self.MAX_TOKEN_SIZE)
        while True:
            try:
                value, end = _SCAN(text, pos)
            except (StopIteration, ValueError, RecursionError, _NotFast):
                return pos
            # Byte count bounds the token count and size; brace count
            # bounds the nesting.  The rest are the cases where QEMU's
            # reading of a string could differ from Python's.
            if (end - pos >= limit
                    or text.count("{", pos, end) + text.count("[", pos, end) > self.MAX_NESTING
                    or text.find("\\u", pos, end) >= 0
                    or not ascii and _NON_ASCII.search(text, pos, end)):
                return pos
            self._out.append((value, None))
            pos = _skip_whitespace(text, end).end()
            if not text.startswith(("{", "["), pos):
                return pos

    def _push(self, kind: int, token: bytes) -> None:
        """Take one token: enforce the limits, parse it, end the message when due.

        token is the token's text; structural tokens pass b"" (length 1).
        """
        braces = self._braces
        brackets = self._brackets
        if kind < _COLON:
            if kind == _LCURLY:
                braces += 1
            elif kind == _RCURLY:
                braces -= 1
            elif kind == _LSQUARE:
                brackets += 1
            else:
                brackets -= 1
            self._braces = braces
            self._brackets = brackets
        size = self._size + (len(token) or 1)
        if size >= self.MAX_TOKEN_SIZE:
            self._fail("JSON token size limit exceeded")
        elif self._count >= self.MAX_TOKEN_COUNT:
            self._fail("JSON token count limit exceeded")
        elif braces + brackets > self.MAX_NESTING:
            self._fail("JSON nesting depth limit exceeded")
        else:
            self._size = size
            self._count += 1
            if self._error is None:
                try:
                    self._parse(kind, token)
                except _ParseError as exc:
                    self._error = str(exc)
                    self._pstate = _P_FAILED
                    self._stack = []
                    self._cur = self._key = None
            if braces <= 0 and brackets <= 0 or braces < 0 or brackets < 0:
                self._finish()

    def _fail(self, desc: str) -> None:
        self._out.append((None, desc))
        self._reset()

    def _finish(self) -> None:
        """The message's brackets balanced (or a closer was unmatched): report it."""
        if self._error is not None:
            self._fail("JSON parse error, " + self._error)
        elif self._pstate == _P_DONE:
            self._out.append((self._result, None))
            self._reset()
        else:
            self._fail("JSON parse error, premature EOI")

    # ---- parser -------------------------------------------------------

    def _parse(self, kind: int, token: bytes) -> None:
        """Advance the parser by one token, raising _ParseError on QEMU's first complaint."""
        state = self._pstate
        if state in _EXPECTING_VALUE:
            if kind >= _STRING:
                if kind == _STRING:
                    value: Any = _decode_string(token)
                elif kind == _KEYWORD:
                    if token not in _KEYWORDS:
                        raise _ParseError(f"invalid keyword '{token.decode('ascii')}'")
                    value = _KEYWORDS[token]
                else:
                    value = _number(kind, token)
                self._deliver(value)
            elif kind == _LCURLY or kind == _LSQUARE:
                self._stack.append((self._cur, state, self._key))
                if kind == _LCURLY:
                    self._cur, self._pstate = {}, _P_DICT_FIRST
                else:
                    self._cur, self._pstate = [], _P_LIST_FIRST
            elif (kind == _RCURLY and state == _P_DICT_FIRST) or (kind == _RSQUARE and state == _P_LIST_FIRST):
                self._close()
            else:
                raise _ParseError("expecting value")
        elif state == _P_LIST_SEP and kind == _COMMA:
            self._pstate = _P_LIST_VALUE
        elif state == _P_DICT_SEP and kind == _COMMA:
            self._pstate = _P_DICT_KEY
        elif state == _P_DICT_COLON and kind == _COLON:
            self._pstate = _P_DICT_VALUE
        elif (state == _P_LIST_SEP and kind == _RSQUARE) or (state == _P_DICT_SEP and kind == _RCURLY):
            self._close()
        else:
            raise _ParseError(_SEPARATOR_ERRORS[state])

    def _close(self) -> None:
        value = self._cur
        self._cur, self._pstate, self._key = self._stack.pop()
        self._deliver(value)

    def _deliver(self, value: Any) -> None:
        """A complete value arrived; place it where the parser expects one."""
        state = self._pstate
        if state == _P_TOP:
            self._result = value
            self._pstate = _P_DONE
        elif state == _P_LIST_FIRST or state == _P_LIST_VALUE:
            self._cur.append(value)
            self._pstate = _P_LIST_SEP
        elif state == _P_DICT_VALUE:
            if self._key in self._cur:
                raise _ParseError("duplicate key")
            self._cur[self._key] = value
            self._pstate = _P_DICT_SEP
        elif isinstance(value, str):
            self._key = value
            self._pstate = _P_DICT_COLON
        else:
            raise _ParseError("key is not a string in object")


# ---- encoder ------------------------------------------------------------

_QDICT_BUCKETS = 512


def _bucket(key: str) -> int:
    """The QDict hash bucket of key (QEMU's tdb_hash over its C string).

    The hash adds byte i shifted left by i * 5 % 24, a pattern that
    repeats every 24 bytes, so whole strided slices can be summed at
    once; keys from clients may be megabytes long.
    """
    raw = _qemu_bytes(key)
    value = 0x238F13AF * len(raw)
    for phase in range(min(24, len(raw))):
        value += sum(raw[phase::24]) << (phase * 5 % 24)
    return (1103515243 * value + 12345 & 0xFFFFFFFF) % _QDICT_BUCKETS


def qdict_keys(d: dict[str, Any]) -> list[str]:
    """The keys of d in the order QEMU's QDict iterates them.

    A QDict is a hash table walked bucket by bucket, each bucket a list
    with the newest entry first; d's insertion order stands for QEMU's.
    QEMU prints and visits members in this order, so replies and the
    order of its checks depend on it.
    """
    return list(_qdict_order(tuple(d)))


# The encoder's caches only take short keys: replies repeat the same few
# over and over, while long ones may come from a client and pin memory.
_CACHEABLE_KEY = 64
_CACHEABLE_KEYS = 1024


def _qdict_order(keys: tuple[str, ...]) -> tuple[str, ...]:
    if not all(isinstance(key, str) for key in keys):
        raise TypeError("QMP JSON object keys must be strings")
    if len(keys) < 2:
        return keys
    if sum(map(len, keys)) <= _CACHEABLE_KEYS:
        return _cached_order(keys)
    return _hash_order(keys)


def _hash_order(keys: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(k for _, _, k in sorted((_bucket(k), -i, k) for i, k in enumerate(keys)))


_cached_order = functools.lru_cache(maxsize=1024)(_hash_order)


_ESCAPE = re.compile('[\x00-\x1f"\\\\\x7f-\U0010ffff]')
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    cp = ord(ch)
    if cp > 0xFFFF:
        cp -= 0x10000
        return "\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF))
    return "\\u%04X" % cp


def _encode_str(text: str) -> str:
    """A JSON string as QEMU prints it: pure ASCII, \\u escapes in upper case."""
    if not _ESCAPE.search(text):
        return '"' + text + '"'
    if _UNPRINTABLE.search(text):
        text = _render(_qemu_bytes(text))
    return '"' + _ESCAPE.sub(_escape_char, text) + '"'


def _member(key: str) -> str:
    """The text before a member's value."""
    return _cached_member(key) if len(key) <= _CACHEABLE_KEY else _encode_str(key) + ": "


@functools.lru_cache(maxsize=4096)
def _cached_member(key: str) -> str:
    return _encode_str(key) + ": "


def _encode_float(value: float) -> str:
    """C's "%.17g", including glibc's spelling of NaN."""
    if value != value:
        return "-nan" if math.copysign(1.0, value) < 0 else "nan"
    return "%.17g" % value


def _encode_scalar(obj: object) -> str:
    encoder = _SCALAR_ENCODERS.get(type(obj))
    if encoder is not None:
        return encoder(obj)
    # Subclasses (enums, mostly) print as their base type.
    for base in (bool, int, float, str):
        if isinstance(obj, base):
            return _SCALAR_ENCODERS[base](base(obj))
    raise TypeError(f"cannot encode {type(obj).__name__} as QMP JSON")


_SCALAR_ENCODERS: dict[type, Any] = {
    str: _encode_str,
    int: int.__repr__,
    float: _encode_float,
    bool: lambda value: "true" if value else "false",
    type(None): lambda value: "null",
}


def encode(obj: object, pretty: bool = False) -> str:
    """Serialise like QEMU's qobject JSON output (no trailing newline).

    Compact output separates with ", " and ": "; pretty output puts each
    member on its own line indented by four spaces per level, and even an
    empty container gets a line break.  Iterative, because QEMU happily
    echoes values nested 1024 deep.
    """
    if not isinstance(obj, (dict, list)):
        return _encode_scalar(obj)
    out: list[str] = []
    comma = "," if pretty else ", "
    # Work stack, last item first: finished text, or a (container, depth)
    # still to expand.
    work: list[str | tuple[Any, int]] = [(obj, 0)]
    while work:
        item = work.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        container, depth = item
        inner = "\n" + "    " * (depth + 1) if pretty else ""
        work.append(("\n" + "    " * depth if pretty else "") + ("}" if isinstance(container, dict) else "]"))
        if isinstance(container, dict):
            members = [(_member(key), container[key]) for key in _qdict_order(tuple(container))]
            opener = "{"
        else:
            members = [("", value) for value in container]
            opener = "["
        for n in range(len(members) - 1, -1, -1):
            prefix, value = members[n]
            if isinstance(value, (dict, list)):
                work.append((value, depth + 1))
            else:
                encoder = _SCALAR_ENCODERS.get(type(value))
                work.append(encoder(value) if encoder is not None else _encode_scalar(value))
            work.append((comma if n else "") + inner + prefix)
        out.append(opener)
    return "".join(out)
