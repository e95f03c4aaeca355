"""Tests for blockd.qjson, QEMU 7.2's QMP dialect of JSON.

The unit tests pin behaviour observed on qemu-storage-daemon 7.2; the
differential tests replay byte corpora against the real daemon, when it
is installed, and demand identical replies.
"""

from __future__ import annotations

import math
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockd.qjson import JSONStreamer, encode, qdict_keys
from harness import WAIT

Message = tuple[object | None, str | None]
PE = "JSON parse error, "


def parse(*writes: bytes, eof: bool = False) -> list[Message]:
    """Feed writes to a fresh streamer and collect everything it returns."""
    streamer = JSONStreamer()
    out: list[Message] = []
    for data in writes:
        out += streamer.feed(data)
    if eof:
        out += streamer.end()
    return out


def one(data: bytes) -> object:
    """The single value data parses to."""
    out = parse(data)
    assert len(out) == 1 and out[0][1] is None, out
    return out[0][0]


def errors(data: bytes) -> list[str | None]:
    """The error texts (None for values) of everything data produces."""
    return [desc for _, desc in parse(data)]


# ---- values --------------------------------------------------------------


def test_object_keeps_member_order_and_types() -> None:
    value = one(b'{"b": 1, "a": [true, false, null, "x", 1.5, {}], "c": {"d": []}}')
    assert value == {"b": 1, "a": [True, False, None, "x", 1.5, {}], "c": {"d": []}}
    assert isinstance(value, dict) and list(value) == ["b", "a", "c"]


@pytest.mark.parametrize("text, value", [
    (b"0", 0), (b"-0", 0), (b"42", 42), (b"-7", -7),
    (b"9223372036854775807", 2**63 - 1), (b"-9223372036854775808", -2**63),
    (b"9223372036854775808", 2**63), (b"18446744073709551615", 2**64 - 1),
    (b"18446744073709551616", 1.8446744073709552e19),
    (b"-9223372036854775809", -9.2233720368547758e18),
    (b"1" * 5000, math.inf),
    (b"1.0", 1.0), (b"1e5", 100000.0), (b"1E+2", 100.0), (b"2.5e-3", 0.0025),
    (b"-0.0", -0.0), (b"1e400", math.inf), (b"-1e400", -math.inf), (b"1e-400", 0.0),
])
def test_numbers_are_int64_uint64_or_double(text: bytes, value: object) -> None:
    got = one(text + b" ")
    assert got == value and type(got) is type(value)
    if value == 0:
        assert math.copysign(1, got) == math.copysign(1, value)  # type: ignore[arg-type]


@pytest.mark.parametrize("text, value", [
    (rb'"a\"b\\c\/d\b\f\n\r\t"', 'a"b\\c/d\b\f\n\r\t'),
    (rb"'single \"quoted\" \'too\''", "single \"quoted\" 'too'"),
    (rb'"\'"', "'"),
    (rb'"\u0041\u00e9\u20AC\uD83D\uDE00"', "A\u00e9\u20ac\U0001f600"),
    (rb'"\u0000"', "\0"),
    (b'"\xc0\x80"', "\0"),  # the overlong NUL of modified UTF-8
    (b'"caf\xc3\xa9 \xf0\x9f\x98\x80 \x7f"', "caf\u00e9 \U0001f600 \x7f"),
    (b'"{[:,]}"', "{[:,]}"),
])
def test_strings(text: bytes, value: str) -> None:
    assert one(text) == value


@pytest.mark.parametrize("text, desc", [
    (rb'"\q"', "invalid escape sequence in string"),
    (b'"\\\xc3\xa9"', "invalid escape sequence in string"),
    (b'"\xc3"', "invalid UTF-8 sequence in string"),
    (b'"\xa9"', "invalid UTF-8 sequence in string"),
    (b'"\xc1\xbf"', "invalid UTF-8 sequence in string"),  # overlong
    (b'"\xed\xa0\x80"', "invalid UTF-8 sequence in string"),  # surrogate
    (b'"\xef\xbf\xbe"', "invalid UTF-8 sequence in string"),  # U+FFFE
    (b'"\xef\xb7\x90"', "invalid UTF-8 sequence in string"),  # U+FDD0
    (b'"\xf4\x90\x80\x80"', "invalid UTF-8 sequence in string"),  # beyond U+10FFFF
    (rb'"\uD800"', r"\uD800 is not a valid Unicode character"),
    (rb'"\udc00x"', r"\udc00 is not a valid Unicode character"),
    (rb'"\uD800\u0041"', r"\uD800 is not a valid Unicode character"),
    (rb'"\uD83F\uDFFE"', r"\uD83F\uDFFE is not a valid Unicode character"),
    (rb'"\uFFFE"', r"\uFFFE is not a valid Unicode character"),
    (rb'"\uFDD0"', r"\uFDD0 is not a valid Unicode character"),
    # QEMU quotes six bytes of a short escape, closing quote included...
    (rb'"\u12"', '\\u12" is not a valid Unicode character'),
    (rb'"\u"', '\\u" is not a valid Unicode character'),
    (rb"'\uzz'", "\\uzz' is not a valid Unicode character"),
    # ...and cut multi-byte characters show as U+FFFD.
    (b'"\\u1\xc3\xa9"', '\\u1\u00e9" is not a valid Unicode character'),
    (b'"\\u123\xc3\xa9"', "\\u123\ufffd is not a valid Unicode character"),
    (b'"\xc3" "\\q"', "invalid UTF-8 sequence in string"),
])
def test_string_errors(text: bytes, desc: str) -> None:
    assert errors(text)[0] == PE + desc


# ---- parser errors ------------------------------------------------------


@pytest.mark.parametrize("text, desc", [
    (b"nonsense ", "invalid keyword 'nonsense'"),
    (b"truefalse ", "invalid keyword 'truefalse'"),
    (b'{"a" 1}', "missing : in object pair"),
    (b'{"a"}', "missing : in object pair"),
    (b'{"a": 1 "b": 2}', "expected separator in dict"),
    (b'{"a": 1]', "expected separator in dict"),
    (b"[1 2]", "expected separator in list"),
    (b"[1}", "expected separator in list"),
    (b"{1: 2}", "key is not a string in object"),
    (b"{true: 2}", "key is not a string in object"),
    (b"{[1, 2]: 3}", "key is not a string in object"),
    (b"{[1 2]: 3}", "expected separator in list"),  # the key's own error comes first
    (b"{nul: 3}", "invalid keyword 'nul'"),
    (b'{"a": 1, "a": 2}', "duplicate key"),
    (b'{"a": 1, "a": [1 2]}', "expected separator in list"),
    (b'{"a":}', "expecting value"),
    (b'{"a": 1,}', "expecting value"),
    (b"[1,]", "expecting value"),
    (b"[,]", "expecting value"),
    (b"{,}", "expecting value"),
    (b"{]", "expecting value"),
    (b"[}", "expecting value"),
    (b"[{]}", "expecting value"),
    (b"]", "expecting value"),
    (b"}", "expecting value"),
    (b":", "expecting value"),
    (b",", "expecting value"),
])
def test_parse_errors(text: bytes, desc: str) -> None:
    assert errors(text) == [PE + desc]


def test_only_first_parse_error_counts() -> None:
    assert errors(b'{"a": nonsense, 1: [1 2]}') == [PE + "invalid keyword 'nonsense'"]


# ---- lexer errors and recovery -------------------------------------------


@pytest.mark.parametrize("text, descs", [
    (b"%\n", ["stray '%'"]),
    (b"01\n", ["stray '01'"]),
    (b"-01\n", ["stray '-01'"]),
    (b"[1.}\n", ["stray '1.}'"]),  # the '}' went into the bad token
    (b"1.x\n", ["stray '1.x'"]),
    (b"1ex\n", ["stray '1ex'"]),
    (b"1e+}\n", ["stray '1e+}'"]),
    (b"-x\n", ["stray '-x'"]),
    (b"True\n", ["stray 'T'"]),  # keywords are lower case; "rue" is skipped
    (b"\x01\n", ["stray '\x01'"]),
    (b"\x00\n", ["stray ''"]),  # printed with %s
    (b'"a\x00b"\n', ["stray '\"a'"]),
    (b'"ab\ncd"\n', ["stray '\"ab\n'"]),
    (b'"ab\xff"\n', ["stray '\"ab\ufffd'"]),
    (b'"\xc0\x80\x01"\n', ["stray '\"\x00\x01'"]),
    (b"\xff", ["stray '\ufffd'"]),
    (b"\xff\xfe\xff", ["stray '\ufffd'"] * 3),  # these bytes end recovery too
    (b"%\t \x7fxyz\xc3\xa9\n", ["stray '%'"]),  # tab, space and high bytes are skipped
])
def test_lexical_errors(text: bytes, descs: list[str]) -> None:
    assert errors(text) == [PE + d for d in descs]


def test_recovery_resumes_at_structural_characters() -> None:
    out = parse(b'{"a": 01, "b": 2}\n')
    assert out == [
        (None, PE + "stray '01'"),  # drops the partial object too
        (None, PE + "expecting value"),  # ','
        ("b", None),
        (None, PE + "expecting value"),  # ':'
        (2, None),
        (None, PE + "expecting value"),  # '}'
    ]
    # Recovery swallows a keyword and stops at the brace.
    assert parse(b'%xyz{"execute": "x"}') == [(None, PE + "stray '%'"), ({"execute": "x"}, None)]
    # A newline ends recovery even inside what looked like a string.
    assert parse(b'%"abc\n"d"') == [(None, PE + "stray '%'"), ("d", None)]


# ---- streaming -----------------------------------------------------------


def test_scalars_at_top_level_are_complete_at_once() -> None:
    assert parse(b'1 "two" [3] {"4": 4} null 1true') == [
        (1, None), ("two", None), ([3], None), ({"4": 4}, None), (None, None), (1, None)]
    # "true" waits for the byte that ends it.
    assert parse(b"true") == []
    assert parse(b"true", b" ") == [(True, None)]


def test_several_values_per_write_and_whitespace_between() -> None:
    data = b' {"a": 1}\r\n\t{"b": [2]}  ["c"]\n'
    assert parse(data) == [({"a": 1}, None), ({"b": [2]}, None), (["c"], None)]


def test_value_split_at_every_byte() -> None:
    data = (b'{"execute": "query-version", "id": [-12.5e+3, "a\\u00e9\\"\xc3\xa9", '
            b"'q', true, null, 1234567890123456789012, {}]}")
    whole = parse(data)
    assert len(whole) == 1 and whole[0][1] is None
    assert parse(*(data[i:i + 1] for i in range(len(data)))) == whole
    for cut in range(1, len(data)):
        assert parse(data[:cut], data[cut:]) == whole


def test_unmatched_closer_ends_message_at_once() -> None:
    assert parse(b"[1}") == [(None, PE + "expected separator in list")]
    assert parse(b'{"a": [1}') == []  # both counts are back to zero only later
    assert parse(b'{"a": [1}', b"]") == [(None, PE + "expected separator in list")]
    assert parse(b"[{]") == []  # braces and brackets are counted apart
    assert parse(b"[{]", b"}") == [(None, PE + "expecting value")]


def test_streamer_resets_after_an_error() -> None:
    assert parse(b'{"a": %}{"b": 1}') == [(None, PE + "stray '%'"), (None, PE + "expecting value"),
                                          ({"b": 1}, None)]


def _random_corpus(rnd: random.Random) -> bytes:
    """Plausible and implausible QMP input for self-consistency checks."""
    pieces = [
        b'{"execute": "query-version", "id": 1}', b"{'a': [1, 2.5, -3e2, true]}", b'{"k": "\\u00e9\\n"}',
        b'{"a":{"b":{"c":[[], {}]}}}', b'"\xc3\xa9"', b'"\xc3"', b"{", b"}", b"[", b"]", b":", b",",
        b"01", b"1.", b"-", b"nul", b"null", b"%", b"\xff", b"\x00", b'"abc', b"'x'", b'"\\ud800"',
        b'{"a": 1, "a": 2}', b"12345678901234567890123", b" ", b"\n", b"\t", b"1e5", b'"\\u0000"',
    ]
    return b"".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 30)))


def test_chunking_never_changes_the_result() -> None:
    """Whole writes take the fast json path; single bytes never can."""
    rnd = random.Random(1234)
    for _ in range(300):
        data = _random_corpus(rnd)
        whole = parse(data, eof=True)
        split = parse(*(data[i:i + 1] for i in range(len(data))), eof=True)
        assert [(repr(v), d) for v, d in whole] == [(repr(v), d) for v, d in split], data


def test_whole_messages_parse_exactly_like_byte_by_byte() -> None:
    """Messages that arrive whole go through json's C scanner only when
    that cannot differ from QEMU; these must all fall back correctly."""
    cases = [
        b'{"a": "\xc3\xa9"}', b'{"a": "\xc0\x80"}', b'{"a": "\xef\xbf\xbe"}', b'{"a": "\\u00e9\\ud800"}',
        b'{"a": 18446744073709551616}', b'{"a": -9223372036854775809}', b'{"a": 1' + b"0" * 5000 + b"}",
        b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b'{"a": 1, "a": 1}', b"{'a': 1}",
        b"[" * 1025 + b"]" * 1025, b'{"a":' * 1025 + b"1" + b"}" * 1025, b'{"a": 01}', b'{"a": 1.}',
    ]
    for data in cases:
        assert parse(data + b"\n") == parse(*(data[i:i + 1] for i in range(len(data))), b"\n"), data
    assert parse(b'{"a": NaN}') == [(None, PE + "stray 'N'"), (None, PE + "expecting value")]
    assert parse(b'{"a": -Infinity}\n') == [(None, PE + "stray '-I'"), (None, PE + "expecting value")]
    assert parse(b"[" * 1025 + b"]" * 1025) == (
        [(None, "JSON nesting depth limit exceeded")] + [(None, PE + "expecting value")] * 1025)


# ---- limits ----------------------------------------------------------------


def test_nesting_limit() -> None:
    ok = one(b"[" * 1024 + b"]" * 1024)
    assert isinstance(ok, list)
    assert parse(b"[" * 1025) == [(None, "JSON nesting depth limit exceeded")]
    # Braces and brackets count together; the rest then parses afresh.
    assert parse(b'{"a":' * 512 + b"[" * 513 + b"]]") == [
        (None, "JSON nesting depth limit exceeded"), (None, PE + "expecting value"),
        (None, PE + "expecting value")]
    deep = one(b'{"a":' * 1023 + b"[]" + b"}" * 1023)
    assert encode(deep) == '{"a": ' * 1023 + "[]" + "}" * 1023


class SmallLimits(JSONStreamer):
    """QEMU's limits, scaled down so tests stay quick."""

    MAX_TOKEN_SIZE = 64
    MAX_TOKEN_COUNT = 9


def small(*writes: bytes) -> list[Message]:
    streamer = SmallLimits()
    return [item for data in writes for item in streamer.feed(data)]


def test_token_count_limit() -> None:
    assert small(b"[1,2,3,4]") == [([1, 2, 3, 4], None)]  # 9 tokens
    assert small(b"[1,2,3,4 ]") == [([1, 2, 3, 4], None)]
    # The tenth token (5) is dropped with the message; "]" then stands alone.
    assert small(b"[1,2,3,4,5]") == [(None, "JSON token count limit exceeded"), (None, PE + "expecting value")]


def test_token_size_limit_counts_all_tokens_of_a_message() -> None:
    # The tokens of a message may total 63 bytes: [ + "x..." + ] here.
    assert small(b'["' + b"x" * 59 + b'"]') == [(["x" * 59], None)]
    assert small(b'["' + b"x" * 60 + b'"]') == [(None, "JSON token size limit exceeded")]
    assert small(b'["' + b"x" * 61 + b'"]') == [(None, "JSON token size limit exceeded"),
                                                (None, PE + "expecting value")]
    assert small(b'"' + b"x" * 61 + b'"') == [("x" * 61, None)]
    assert small(b'"' + b"x" * 62 + b'"') == [(None, "JSON token size limit exceeded")]


def test_overlong_token_is_cut_and_lexing_restarts() -> None:
    # After 65 bytes the lexer gives up on the token; what follows is new input.
    assert small(b'"' + b"x" * 64 + b'"\n') == [(None, "JSON token size limit exceeded"),
                                                (None, PE + "stray '\"\n'")]
    assert small(b"1" * 65 + b"23 ") == [(None, "JSON token size limit exceeded"), (23, None)]
    assert small(b"x" * 66 + b"true ") == [(None, "JSON token size limit exceeded"),
                                           (None, PE + "invalid keyword 'xtrue'")]
    # The same in tiny writes: nothing is buffered beyond the limit.
    assert small(*[b'"'] + [b"x"] * 64 + [b'"\n']) == small(b'"' + b"x" * 64 + b'"\n')


def test_endless_input_is_not_buffered() -> None:
    """Whitespace, recovery and over-long tokens all keep memory flat."""
    streamer = SmallLimits()
    assert streamer.feed(b"[") == []
    for _ in range(100):
        assert streamer.feed(b" " * 10000) == []
    assert streamer.feed(b"%" + b"a" * 100000 + b"\n") == [(None, PE + "stray '%'")]
    # 1 + 999 bytes: 15 tokens cut at 65 bytes, then 25 bytes pending.
    assert streamer.feed(b'"' + b"a" * 999) == [(None, "JSON token size limit exceeded")] * 15
    assert streamer.end() == [(None, PE + "invalid keyword '" + "a" * 25 + "'")]


# ---- end of input ------------------------------------------------------------


@pytest.mark.parametrize("text, out", [
    (b"", []),
    (b"  ", []),
    (b"12", [(12, None)]),
    (b"1.5", [(1.5, None)]),
    (b"true", [(True, None)]),
    (b"nul", [(None, PE + "invalid keyword 'nul'")]),
    (b'"abc', [(None, PE + "stray '\"abc'")]),
    (b"'ab\\", [(None, PE + "stray ''ab\\'")]),
    (b"-", [(None, PE + "stray '-'")]),
    (b"1.", [(None, PE + "stray '1.'")]),
    (b"1e+", [(None, PE + "stray '1e+'")]),
    (b"{", [(None, PE + "premature EOI")]),
    (b'{"a": 1', [(None, PE + "premature EOI")]),
    (b'{"a": "x"', [(None, PE + "premature EOI")]),
    (b'{"a" 1', [(None, PE + "missing : in object pair")]),
    (b'[1, "abc', [(None, PE + "stray '\"abc'")]),
    (b"%abc", [(None, PE + "stray '%'")]),
])
def test_end_flushes_like_qemu(text: bytes, out: list[Message]) -> None:
    assert parse(text, eof=True) == out


def test_streamer_is_usable_after_end() -> None:
    streamer = JSONStreamer()
    assert streamer.feed(b"[1") == []
    assert streamer.end() == [(None, PE + "premature EOI")]
    assert streamer.feed(b"[2]") == [([2], None)]


# ---- encoder ---------------------------------------------------------------


def test_encode_scalars() -> None:
    assert encode(None) == "null"
    assert encode(True) == "true" and encode(False) == "false"
    assert encode(0) == "0" and encode(-2**63) == "-9223372036854775808"
    assert encode(2**64 - 1) == "18446744073709551615"
    assert encode(0.1) == "0.10000000000000001"
    assert encode(1.0) == "1" and encode(100000.0) == "100000" and encode(-0.0) == "-0"
    assert encode(1.8446744073709552e19) == "1.8446744073709552e+19"
    assert encode(1e-7) == "9.9999999999999995e-08"
    assert encode(math.inf) == "inf" and encode(-math.inf) == "-inf" and encode(math.nan) == "nan"


def test_encode_string_escapes() -> None:
    assert encode('"\\/\b\f\n\r\t') == r'"\"\\/\b\f\n\r\t"'
    assert encode("\x00\x01\x1f\x7f") == r'"\u0000\u0001\u001F\u007F"'
    assert encode("\u00e9\u20ac\ufffd") == r'"\u00E9\u20AC\uFFFD"'
    assert encode("\U0001f600") == r'"\uD83D\uDE00"'
    assert encode("a/b") == '"a/b"'
    # QEMU cannot hold these, so they print as U+FFFD.  Escaped bytes of
    # a surrogateescape'd name come out as QEMU prints the raw bytes.
    assert encode("\ud800\ufffe\U0010ffff") == r'"\uFFFD\uFFFD\uFFFD"'
    assert encode(b"ok\xe2\x82 \xff".decode("utf-8", "surrogateescape")) == r'"ok\uFFFD \uFFFD"'


def test_encode_dicts_in_qdict_order() -> None:
    assert encode({"return": {}, "id": 1}) == '{"return": {}, "id": 1}'
    assert encode({"id": 1, "error": {"class": "GenericError", "desc": "x"}}) == \
        '{"id": 1, "error": {"class": "GenericError", "desc": "x"}}'
    assert encode({"error": 1, "id": 2}) == '{"id": 2, "error": 1}'
    assert encode({"major": 7, "minor": 2, "micro": 0}) == '{"micro": 0, "minor": 2, "major": 7}'
    # "ac", "as" and "p" share a bucket: the newest member comes first.
    assert encode({"ac": 1, "as": 2, "p": 3}) == '{"p": 3, "as": 2, "ac": 1}'
    assert qdict_keys({"qemu": 1, "package": 2}) == ["qemu", "package"]
    assert qdict_keys({"version": 1, "capabilities": 2}) == ["version", "capabilities"]
    assert encode([]) == "[]" and encode({}) == "{}" and encode([1, [2, {}]]) == "[1, [2, {}]]"


def test_qdict_keys_follows_tdb_hash() -> None:
    def bucket(key: str) -> int:
        raw = key.encode("utf-8").replace(b"\0", b"\xc0\x80")
        value = 0x238F13AF * len(raw) & 0xFFFFFFFF
        for i, c in enumerate(raw):
            value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
        return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512

    rnd = random.Random(99)
    alphabet = "abcdefghijklmnopqrstuvwxyz-_0\0\u00e9\u20ac\U0001f600"
    for _ in range(200):
        keys = list({"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 80))) for _ in range(30)})
        expected = sorted(range(len(keys)), key=lambda i: (bucket(keys[i]), -i))
        assert qdict_keys(dict.fromkeys(keys)) == [keys[i] for i in expected]
    long_key = "x" * 100000
    assert qdict_keys({long_key: 1, "a": 2}) == sorted([long_key, "a"], key=bucket)


def test_encode_pretty() -> None:
    assert encode({}, pretty=True) == "{\n}"
    assert encode([], pretty=True) == "[\n]"
    assert encode(3, pretty=True) == "3"
    assert encode({"return": {}, "id": [1, {"a": []}]}, pretty=True) == (
        '{\n    "return": {\n    },\n    "id": [\n        1,\n        {\n'
        '            "a": [\n            ]\n        }\n    ]\n}')


def test_encode_deep_nesting() -> None:
    value: object = []
    for _ in range(5000):
        value = [value]
    assert encode(value) == "[" * 5001 + "]" * 5001


def test_encode_rejects_what_qmp_cannot_carry() -> None:
    with pytest.raises(TypeError):
        encode({"a": object()})
    with pytest.raises(TypeError):
        encode({1: 2})


def test_round_trip() -> None:
    value = {"execute": "x", "arguments": {"s": "\u00e9\0\U0001f600'\"", "n": [-1, 2**63, 0.5, None, True]}}
    assert one(encode(value).encode()) == value
    assert one(encode(value, pretty=True).encode()) == value


# ---- differential tests against qemu-storage-daemon --------------------------

QSD = shutil.which("qemu-storage-daemon")
needs_qsd = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed")
SYNC = b'\n\xff\n{"execute": "query-version", "id": "sync"}\n'


class Monitor:
    """A QMP connection to qemu-storage-daemon that returns raw reply texts."""

    def __init__(self, path: Path, pretty: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(WAIT)
        self.sock.connect(str(path))
        self.pretty = pretty
        self.buf = b""

    def reply(self) -> str:
        """The next reply, without its final line break; QEMU ends lines with CR LF."""
        end = b"\r\n}\r\n" if self.pretty else b"\r\n"
        while (i := self.buf.find(end)) < 0:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        cut = i + len(end) - 2
        text, self.buf = self.buf[:cut], self.buf[cut + 2:]
        return text.decode("ascii")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def replies_until_sync(self) -> list[str]:
        out = [self.reply()]
        while not out[-1].endswith('"id": "sync"}'):
            out.append(self.reply())
        return out


@pytest.fixture
def qsd(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Monitor, str]]:
    """A negotiated monitor and the greeting; the daemon dies afterwards, whatever happens."""
    if QSD is None:
        pytest.skip("qemu-storage-daemon is not installed")
    pretty = getattr(request, "param", False)
    path = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        [QSD, "--chardev", f"socket,id=m,path={path},server=on,wait=off",
         "--monitor", "chardev=m" + (",pretty=on" if pretty else "")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mon = None
    try:
        deadline = time.monotonic() + WAIT
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-storage-daemon did not start"
            time.sleep(0.01)
        mon = Monitor(path, pretty)
        greeting = mon.reply()
        mon.send(b'{"execute": "qmp_capabilities"}')
        assert mon.reply() == encode({"return": {}}, pretty=pretty).replace("\n", "\r\n")
        yield mon, greeting
    finally:
        if mon is not None:
            mon.sock.close()
        proc.kill()
        proc.wait()


def version_text(mon: Monitor) -> str:
    """What query-version returns, as text."""
    mon.send(b'{"execute": "query-version"}')
    reply = mon.reply()
    assert reply.startswith('{"return": ') and reply.endswith("}")
    return reply[len('{"return": '):-1]


def model(writes: list[bytes], version: str) -> list[str | None]:
    """The replies QEMU's monitor should give, from JSONStreamer and a sliver of QMP.

    None stands for "QEMU got a JSON object that is not a plain
    query-version": its reply belongs to the dispatcher, not to JSON.
    """
    streamer = JSONStreamer()
    out: list[str | None] = []
    for data in writes + [SYNC]:
        for value, desc in streamer.feed(data):
            if desc is not None:
                out.append(encode({"error": {"class": "GenericError", "desc": desc}}))
            elif not isinstance(value, dict):
                out.append(encode({"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}))
            elif value.get("execute") == "query-version" and set(value) <= {"execute", "id"}:
                out.append('{"return": ' + version + (', "id": ' + encode(value["id"]) if "id" in value else "") + "}")
            else:
                out.append(None)
    return out


def replay(mon: Monitor, writes: list[bytes], strict: bool = True) -> None:
    """Send writes one by one and compare every reply with the model's.

    Unless strict, the corpus may produce objects the model leaves to
    the dispatcher; their replies must merely not be JSON-level ones.
    """
    expected = model(writes, version_text(mon))
    assert not strict or None not in expected
    for data in writes + [SYNC]:
        mon.send(data)
    got = mon.replies_until_sync()
    loose = [g for e, g in zip(expected, got) if e is None]
    assert all('"desc": "JSON parse error' not in g and "must be a JSON object" not in g for g in loose)
    assert [g if e is None else e for e, g in zip(expected, got)] + expected[len(got):] == got


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def split_at(data: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def qv(ident: bytes) -> bytes:
    return b'{"execute": "query-version", "id": ' + ident + b"}"


ECHOED_IDS = [
    b"1", b"-1", b"0", b"-0", b"9223372036854775807", b"-9223372036854775808", b"9223372036854775808",
    b"18446744073709551615", b"18446744073709551616", b"-9223372036854775809", b"123456789012345678901234567890",
    b"0.1", b"1.0", b"1e5", b"-0.0", b"1e400", b"-1e400", b"1e-400", b"5e-324", b"2.5E-3", b"3.141592653589793",
    b"1.7976931348623157e308", b"true", b"false", b"null", b"[]", b"{}", b"[[], {}, [{}]]",
    rb'"a/b \"q\" \\ \/ \b\f\n\r\t"', rb'"\u0000\u0001\u001f\u007f\u0080\u00e9\u07ff\u0800\uFFFD"',
    rb'"\uD83D\uDE00\udbff\udfff"', b'"\xc0\x80 \xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \x7f"', b"'single'",
    b'{"return": 1, "id": 2, "error": 3, "class": 4, "desc": 5, "QMP": 6, "version": 7, "capabilities": 8}',
    b'{"ac": 1, "as": 2, "p": 3, "bc": 4, "q": 5}', b'{"\\u0000": 1, "\\u00e9": 2, "": 3, "a\\nb": 4}',
    b'{"nested": {"deeper": {"deepest": [1, {"x": "y"}]}}}',
    b"[" * 1020 + b"]" * 1020, b'{"a":' * 1023 + b"1" + b"}" * 1023,
]

MALFORMED = [
    b"nonsense\n", b"%\n", b"01\n", b"[1.}\n", b"\xff", b"\xfe", b"\x00\n", b"\x01\n", b"True\n",
    b"-\n", b"-x\n", b"1e\n", b"1e+\n", b"1.5.3\n", b"'abc'", b"1 2 3\n", b"[1, 2]", b'"abc"',
    b'{"a" 1}', b'{"a": 1 "b": 2}', b"[1 2]", b"{1: 2}", b"{[1, 2]: 3}", b'{"a": 1, "a": 2}', b"]", b"}",
    b"{]", b"[}", b"[{]}", b'{"a":}', b"[1,]", b",", b":", b"{,}",
    rb'"\q"', rb'"\uD800"', rb'"\uD800\u0041"', rb'"\uDC00"', rb'"\uFFFE"', rb'"\uFDD0"', rb'"\uD83F\uDFFF"',
    rb'"\u12"', rb'"\u"', b'"\\u12\xc3\xa9"', b'"\\u1\xc3\xa9"', b'"\\u123\xc3\xa9"',
    b'"\xc3"', b'"\xa9"', b'"\xc1\xbf"', b'"\xed\xa0\x80"', b'"\xef\xbf\xbe"', b'"\xf4\x90\x80\x80"',
    b'"\xf8\x88\x80\x80\x80"', b'"\\\xc3\xa9"', b'"abc\xff"\n', b'"ab\x01"\n', b'"a\x00b"\n', b'"ab\ncd"\n',
    b'"\xc0\x80\x01"\n', b"%\t \x7fxyz\xc3\xa9" + qv(b"1"), b'{"a": 01, "b": 2}\n', b"[" * 1025 + b"]]\n",
    b'{"a":' * 512 + b"[" * 513 + b"\n", b"[" * 1024 + b"]" * 1024, b'{"execute": "query-version", "id": 1, "id": 2}',
]


@needs_qsd
def test_differential_echoed_ids(qsd: tuple[Monitor, str]) -> None:
    mon, _ = qsd
    replay(mon, [qv(ident) + b"\n" for ident in ECHOED_IDS])


@needs_qsd
def test_differential_malformed_input(qsd: tuple[Monitor, str]) -> None:
    mon, _ = qsd
    replay(mon, [data for bad in MALFORMED for data in (bad, b"\n" + qv(b'"after"') + b"\n")])


SHORT_IDS = [ident for ident in ECHOED_IDS if len(ident) < 200]


@needs_qsd
def test_differential_split_writes(qsd: tuple[Monitor, str]) -> None:
    mon, _ = qsd
    msg = qv(b'"a\\u00e9\xc3\xa9\\uD83D\\uDE00"') + qv(b"-12.5e+3") + qv(b"true")
    # Cut inside a key, escapes, a UTF-8 sequence, a number and "true".
    writes = split_at(msg, 4, 38, 44, 46, 52, 95, 97, 100, 139, 141)
    stream = b"".join(qv(ident) for ident in SHORT_IDS) + b" ".join(MALFORMED[:40]) + b"\n"
    replay(mon, writes + split_every(stream, 1) + split_every(stream, 7) + split_every(stream, 97))


@needs_qsd
def test_differential_random(qsd: tuple[Monitor, str]) -> None:
    mon, _ = qsd
    rnd = random.Random(20221213)
    pieces = SHORT_IDS + MALFORMED[:-4]
    for _ in range(5):
        stream = b"".join(rnd.choice([qv(rnd.choice(SHORT_IDS)), rnd.choice(pieces), b" ", b"\n", b"{", b"["])
                          for _ in range(150))
        cuts = sorted(rnd.sample(range(1, len(stream)), 60))
        replay(mon, [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])], strict=False)


def rebuild_version(text: str) -> dict[str, object]:
    """VersionInfo as QEMU builds it, members in QAPI order.

    Parsing a reply and encoding it again would not do: members sharing
    a hash bucket come out newest first, so reading reverses them.
    """
    version = one(text.replace("\r\n", "\n").encode())
    assert isinstance(version, dict)
    qemu = version["qemu"]
    return {"qemu": {"major": qemu["major"], "minor": qemu["minor"], "micro": qemu["micro"]},
            "package": version["package"]}


@needs_qsd
def test_differential_greeting_and_return_order(qsd: tuple[Monitor, str]) -> None:
    """Rebuild QEMU's replies in its insertion order; encode() must reorder them alike."""
    mon, greeting = qsd
    rebuilt = rebuild_version(version_text(mon))
    assert greeting == encode({"QMP": {"version": rebuilt, "capabilities": ["oob"]}})
    mon.send(qv(b"[1]"))
    assert mon.reply() == encode({"return": rebuilt, "id": [1]})
    mon.send(b'{"id": 5}')
    assert mon.reply() == encode({"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"},
                                  "id": 5})


@needs_qsd
@pytest.mark.parametrize("qsd", [True], indirect=True)
def test_differential_pretty(qsd: tuple[Monitor, str]) -> None:
    mon, greeting = qsd
    mon.send(b'{"execute": "query-version"}')
    reply = mon.reply()
    assert reply.startswith("{\r\n    \"return\": ")
    version = rebuild_version(reply[len("{\r\n    \"return\": "):-len("\r\n}")])
    expected_greeting = {"QMP": {"version": version, "capabilities": ["oob"]}}
    assert greeting == encode(expected_greeting, pretty=True).replace("\n", "\r\n")
    for ident in [b"{}", b"[]", b'{"a": [], "b": {}, "c": [1, [], {"x": {}}], "d": "x"}', b'"\\u00e9"']:
        mon.send(qv(ident))
        expected = {"return": version, "id": one(ident + b" ")}
        assert mon.reply() == encode(expected, pretty=True).replace("\n", "\r\n")
    mon.send(b"[1 2]")
    assert mon.reply() == encode({"error": {"class": "GenericError", "desc": PE + "expected separator in list"}},
                                 pretty=True).replace("\n", "\r\n")


@needs_qsd
@pytest.mark.parametrize("text", [
    '{"driver":"null-co"', '{"driver":"null-co', '{"driver":1.', '{"driver":nul', '{"driver":1',
    '{"driver" 1', "{", '{"a":1}{', '{"a":1} "x"', '{"a":1}}', '{"a":1} %', '{"a":-', "{'a\\",
])
def test_differential_end_of_input(text: str) -> None:
    """QEMU flushes its parser at the end of a JSON command-line option."""
    assert QSD is not None
    proc = subprocess.run([QSD, "--blockdev", text], capture_output=True, timeout=WAIT)
    prefix = f"qemu-storage-daemon: --blockdev {text}: "
    stderr = proc.stderr.decode()
    assert proc.returncode != 0 and stderr.startswith(prefix)
    out = parse(text.encode(), eof=True)
    if out[0][1] is not None:
        expected = out[0][1]
    else:
        assert len(out) > 1
        expected = "Expecting at most one JSON value"
    assert stderr[len(prefix):].rstrip("\n") == expected
