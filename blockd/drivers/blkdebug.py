"""The ``blkdebug`` filter: fault injection at the points a format driver names.

Format drivers above call :meth:`BlockNode.debug_event` on their storage
child at QEMU's event points (``l2_update``, ``write_aio``...); the filter
raises ``pwritev``/``pwritev_zero``/``pwritev_done`` on itself for the
writes it gets, where QEMU's generic write path does.  ``align`` is the
node's ``request_alignment``: the request path (:mod:`blockd.block.io`)
pads unaligned requests and raises ``pwritev_rmw_*`` around its reads.

QEMU's rule semantics, checked against qemu-io:

* an event arms the ``inject-error`` rules of that event whose ``state``
  is 0 or the current state; the armed set is *replaced*, not extended,
  and stays armed until the next event that arms something;
* the first armed rule (in definition order) whose I/O type and sector
  match a request fails it; ``sector`` matches a request containing the
  sector's first byte; ``once`` deletes the rule for good; errno 0 fails
  nothing; without ``immediately`` the failure comes after one yield;
* ``set-state`` rules of the event (current state or 0) choose the next
  state, the first defined one winning.

Rules come from a config file in QEMU's INI dialect first, then from the
``inject-error``/``set-state`` options; all error rules are created before
all state rules, so errors are reported in that order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno as errnos
import functools
import json
import os
import re
from typing import Any

from blockd.block.graph import OpenContext, unsupported_option
from blockd.block.node import BlockNode, ChildLink, Extent, Perm, WriteFlags
from blockd.errors import QMPError
from blockd.qjson import qdict_keys
from blockd.qmp.schema import SCHEMA_DIR

IO_TYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
DEFAULT_IO_TYPES = frozenset(IO_TYPES[:5])
SIZE_OPTIONS = ("align", "max-transfer", "opt-write-zero", "max-write-zero",
                "opt-discard", "max-discard")
LIST_OPTIONS = ("inject-error", "set-state", "take-child-perms", "unshare-child-perms")
PERMS = {"consistent-read": Perm.CONSISTENT_READ, "write": Perm.WRITE,
         "write-unchanged": Perm.WRITE_UNCHANGED, "resize": Perm.RESIZE}
_INT_MAX = 2**31 - 1


@functools.cache
def _events() -> frozenset[str]:
    """QEMU's event names, from the schema that QMP validates against."""
    with open(SCHEMA_DIR / "types" / "BlkdebugEvent.json") as f:
        return frozenset(json.load(f)["enum"])


@dataclasses.dataclass(eq=False)
class InjectRule:
    event: str
    state: int = 0
    iotypes: frozenset[str] = DEFAULT_IO_TYPES
    errno: int = errnos.EIO
    sector: int = -1
    once: bool = False
    immediately: bool = False

    def matches(self, offset: int, length: int, iotype: str) -> bool:
        if iotype not in self.iotypes:
            return False
        if self.sector == -1:
            return True
        # QEMU tests the sector's first byte, and never for length 0 (flush).
        start = self.sector * 512
        return length > 0 and offset <= start < offset + length


@dataclasses.dataclass(eq=False)
class StateRule:
    event: str
    state: int
    new_state: int


# ---- config files ---------------------------------------------------------------

#: The options of each config-file group and their QemuOpts types.
_GROUPS: dict[str, dict[str, str]] = {
    "inject-error": {"event": "string", "state": "number", "iotype": "string",
                     "errno": "number", "sector": "number", "once": "bool",
                     "immediately": "bool"},
    "set-state": {"event": "string", "state": "number", "new_state": "number"},
}
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")
_NUMBER = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")


def _int32(value: int) -> int:
    """C's conversion of a 64-bit option value to ``int``."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def _parse_number(name: str, text: str) -> int:
    """``strtoull`` with base 0 over the whole text (so "-1" wraps, "010" is octal)."""
    m = _NUMBER.match(text)
    if not m:
        raise QMPError(f"Parameter '{name}' expects a number")
    digits = m.group(2)
    value = int(digits, 16) if digits[:2] in ("0x", "0X") else int(digits, 8 if digits[0] == "0" else 10)
    if value >= 1 << 64:
        raise QMPError(f"Parameter '{name}' expects a number")
    return -value & ((1 << 64) - 1) if m.group(1) == "-" else value


def _parse_bool(name: str, text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise QMPError(f"Parameter '{name}' expects 'on' or 'off'")


def _scan_token(line: str) -> tuple[str, str] | None:
    """``sscanf(line, " %63s = \\"%1023[^\\"]\\"")``: the key and the (maybe empty) value.

    The key is the first word even when nothing after it fits the pattern;
    then the value is empty, which is how QEMU treats unquoted values.
    """
    m = re.match(r"\s*(\S{1,63})", line)
    if not m:
        return None
    rest = re.match(r'\s*=\s*"([^"]{1,1023})', line[m.end():])
    return m.group(1), rest.group(1) if rest else ""


def parse_config(path: str) -> list[tuple[str, dict[str, Any]]]:
    """Groups of a blkdebug config file, in file order, with typed values.

    Follows QEMU's INI reader: ``[group]`` or ``[group "id"]`` headers,
    ``key = "value"`` lines, ``#`` comments and empty lines; anything else
    is a parse error.  Values are checked against the group's option types
    as they are read.
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise QMPError(f"Could not read blkdebug config file: {exc.strerror}") from None
    groups: list[tuple[str, dict[str, Any]]] = []
    for line in text.splitlines(keepends=True):
        if line[0] in "\n#":
            continue
        if line[0] == "[":
            m = re.match(r'\[(\S{1,63})\s+"[^"]{1,63}"\]', line) or re.match(r"\[([^\]]{1,63})", line)
            if not m:
                raise QMPError("parse error")
            if m.group(1) not in _GROUPS:
                raise QMPError(f"There is no option group '{m.group(1)}'")
            groups.append((m.group(1), {}))
            continue
        token = _scan_token(line)
        if token is None:
            raise QMPError("parse error")
        if not groups:
            raise QMPError("no group defined")
        group, opts = groups[-1]
        key, value = token
        kind = _GROUPS[group].get(key)
        if kind is None:
            raise QMPError(f"Invalid parameter '{key}'")
        if kind == "number":
            opts[key] = _int64(_parse_number(key, value))
        elif kind == "bool":
            opts[key] = _parse_bool(key, value)
        else:
            opts[key] = value
    return groups


# ---- rules ------------------------------------------------------------------------

def _event(opts: dict[str, Any], events: frozenset[str]) -> str:
    event = opts.get("event")
    if event is None:
        raise QMPError("Missing event name for rule")
    if event not in events:
        raise QMPError(f"invalid parameter value: {event}")
    return event


def build_rules(groups: list[tuple[str, dict[str, Any]]]) -> tuple[list[InjectRule], list[StateRule]]:
    """Rules from config groups and options, error rules before state rules as QEMU adds them."""
    events = _events()
    inject: list[InjectRule] = []
    states: list[StateRule] = []
    for kind, opts in groups:
        if kind != "inject-error":
            continue
        event = _event(opts, events)
        iotypes = DEFAULT_IO_TYPES
        if "iotype" in opts:
            if opts["iotype"] not in IO_TYPES:
                raise QMPError(f"invalid parameter value: {opts['iotype']}")
            iotypes = frozenset([opts["iotype"]])
        inject.append(InjectRule(event, _int32(opts.get("state", 0)), iotypes,
                                 _int32(opts.get("errno", errnos.EIO)), opts.get("sector", -1),
                                 bool(opts.get("once", False)), bool(opts.get("immediately", False))))
    for kind, opts in groups:
        if kind == "set-state":
            states.append(StateRule(_event(opts, events), _int32(opts.get("state", 0)),
                                    _int32(opts.get("new_state", 0))))
    return inject, states


#: QAPI member order of the rule structs, the order QEMU's visitor rebuilds them in.
_RULE_MEMBERS = {
    "inject-error": ("event", "state", "iotype", "errno", "sector", "once", "immediately"),
    "set-state": ("event", "state", "new_state"),
}


def _flat_rules(options: dict[str, Any]) -> list[tuple[str, Any]]:
    """The rule options as QEMU's flattened keys (``inject-error.0.event``).

    Returned in reverse: QEMU's copies of the options leave keys that share
    a hash bucket in that order, which decides how the ``json:`` name prints.
    """
    flat = []
    for key, members in _RULE_MEMBERS.items():
        for i, rule in enumerate(options.get(key, [])):
            flat += [(f"{key}.{i}.{m}", rule[m]) for m in members if m in rule]
    return flat[::-1]


def _spans(offset: int, length: int, limit: int) -> list[tuple[int, int]]:
    """Cut a request into pieces of at most ``limit`` bytes (0: no limit)."""
    if not limit or length <= limit:
        return [(offset, length)]
    return [(o, min(limit, offset + length - o)) for o in range(offset, offset + length, limit)]


class BlkdebugNode(BlockNode):
    driver = "blkdebug"
    is_filter = True
    filtered_role = "image"
    relinkable = ("image",)
    reopen_mutable = ()
    #: A protocol in QEMU's terms (opened by its own name), though it stores nothing.
    is_protocol = True
    strong_options = ("config", "align", "max-transfer", "opt-write-zero", "max-write-zero",
                      "opt-discard", "max-discard")

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.state = 1
        self.inject: list[InjectRule] = []
        self.set_state_rules: list[StateRule] = []
        self.active: list[InjectRule] = []
        self.take_perms = Perm(0)
        self.unshare_perms = Perm(0)
        self.align = self.max_transfer = 0
        self.opt_write_zero = self.max_write_zero = 0
        self.opt_discard = self.max_discard = 0

    async def open(self, ctx: OpenContext) -> None:
        opts = self.options
        # QemuOpts reads size options in QDict order and refuses negatives first.
        for key in qdict_keys(opts):
            if key in SIZE_OPTIONS and opts[key] < 0:
                raise QMPError(f"Parameter '{key}' expects a non-negative number below 2^64")
        groups = parse_config(opts["config"]) if "config" in opts else []
        groups += [("inject-error", r) for r in opts.get("inject-error", [])]
        groups += [("set-state", r) for r in opts.get("set-state", [])]
        self.inject, self.set_state_rules = build_rules(groups)
        for name in opts.get("take-child-perms", []):
            self.take_perms |= PERMS[name]
        for name in opts.get("unshare-child-perms", []):
            self.unshare_perms |= PERMS[name]
        await ctx.open_child(opts["image"], "image")
        self._set_limits()
        self.debug_event("none")  # QEMU raises it as the open ends: its rules arm at once
        # An empty list leaves its key unconsumed; QEMU complains about it last.
        for key in LIST_OPTIONS:
            if opts.get(key) == []:
                raise QMPError(unsupported_option(self, key))

    def _set_limits(self) -> None:
        """Check the alignment overrides against each other as QEMU does."""
        opts = self.options

        def limit(key: str, multiple_of: int) -> int:
            value = opts.get(key, 0)
            if value and (value >= _INT_MAX or value % multiple_of):
                raise QMPError(f"Cannot meet constraints with {key} {value}")
            return value

        self.align = opts.get("align", 0)
        if self.align and (self.align >= _INT_MAX or self.align & (self.align - 1)):
            raise QMPError(f"Cannot meet constraints with align {self.align}")
        self.request_alignment = max(self.align, 1)
        align = max(self.align, 1)
        self.max_transfer = limit("max-transfer", align)
        self.opt_write_zero = limit("opt-write-zero", align)
        self.max_write_zero = limit("max-write-zero", max(self.opt_write_zero, align))
        self.opt_discard = limit("opt-discard", align)
        self.max_discard = limit("max-discard", max(self.opt_discard, align))

    @property
    def image(self) -> BlockNode:
        return self.children["image"].child

    @property
    def image_child(self) -> ChildLink:
        """The edge to the image, through which requests go."""
        return self.children["image"]

    @property
    def file(self) -> BlockNode | None:
        """Queries walk filters through ``file``; blkdebug's child is called image."""
        return self.image

    def child_perm(self, role: str) -> tuple[Perm, Perm]:
        perm, shared = super().child_perm(role)
        return perm | self.take_perms, shared & ~self.unshare_perms

    # ---- names ----------------------------------------------------------------------

    def exact_filename(self) -> str | None:
        if any(key in self.options for key in self.strong_options if key != "config"):
            return None
        if any(self.options.get(key) for key in ("inject-error", "set-state")):
            return None
        inner = self.image.exact_filename()
        if inner is None:
            return None
        return f"blkdebug:{self.options.get('config', '')}:{inner}"

    def full_options(self) -> dict[str, Any]:
        """QEMU names rules by their flattened keys (``inject-error.0.event``)."""
        opts = super().full_options()
        opts.update(_flat_rules(self.options))
        return opts

    # ---- rules ------------------------------------------------------------------------

    def debug_event(self, event: str) -> None:
        """Arm the error rules of ``event`` and move to the state its rules choose.

        Events stop here: QEMU does not pass them on to the image.
        """
        armed = [r for r in self.inject if r.event == event and r.state in (0, self.state)]
        if armed:
            self.active = armed
        for rule in self.set_state_rules:
            if rule.event == event and rule.state in (0, self.state):
                self.state = rule.new_state
                break

    async def _check(self, offset: int, length: int, iotype: str) -> None:
        """Fail the request if an armed rule matches it."""
        rule = next((r for r in self.active if r.matches(offset, length, iotype)), None)
        if rule is None or rule.errno == 0:
            return
        if rule.once:
            self.active.remove(rule)
            self.inject.remove(rule)
        if not rule.immediately:
            await asyncio.sleep(0)
        if rule.errno > 0:
            raise OSError(rule.errno, os.strerror(rule.errno))

    # ---- data path ----------------------------------------------------------------------

    def length(self) -> int:
        return self.image.length()

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        # Requests come aligned to ``align`` (the request path pads them); pieces
        # of ``max-transfer`` are checked one by one.
        out = bytearray()
        for o, n in _spans(offset, length, self.max_transfer):
            await self._check(o, n, "read")
            out += await self.image_child.read(o, n)
        return out

    async def padding_read_failed(self, offset: int, length: int,
                                  exc: OSError) -> bytes | bytearray | memoryview:
        """QEMU 7.2 ignores a failed padding read of a plain write and writes whatever
        its buffer held; the image's bytes make the write succeed as there without
        the damage."""
        return await self.image_child.read(offset, length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        self.debug_event("pwritev")
        view = memoryview(data)
        try:
            for o, n in _spans(offset, len(view), self.max_transfer):
                await self._check(o, n, "write")
                await self.image_child.write(o, view[o - offset:o - offset + n], flags)
        finally:
            self.debug_event("pwritev_done")

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        self.debug_event("pwritev_zero")
        try:
            zalign = max(self.opt_write_zero, self.align, 1)
            for o, n in self._limited(offset, length, zalign, self.max_write_zero):
                if n < zalign:
                    # Pieces below opt-write-zero fall back to writing zeroes, as in QEMU.
                    if flags & WriteFlags.NO_FALLBACK:
                        raise OSError(errnos.ENOTSUP, os.strerror(errnos.ENOTSUP))
                    await self._check(o, n, "write")
                    await self.image_child.write(o, bytes(n), flags & WriteFlags.FUA)
                    continue
                await self._check(o, n, "write-zeroes")
                await self.image_child.write_zeroes(o, n, flags)
        finally:
            self.debug_event("pwritev_done")

    @staticmethod
    def _limited(offset: int, length: int, align: int, limit: int) -> list[tuple[int, int]]:
        """Split off an unaligned head and tail, then cut the rest at ``limit``."""
        pieces = []
        end = offset + length
        first = min(end, -(-offset // align) * align)
        if first > offset:
            pieces.append((offset, first - offset))
        last = max(first, end - end % align)
        if last > first:
            step = limit - limit % align if limit >= align else 0
            pieces += _spans(first, last - first, step or limit)
        if end > last:
            pieces.append((last, end - last))
        return pieces

    async def discard(self, offset: int, length: int) -> None:
        dalign = max(self.opt_discard, self.align, 1)
        for o, n in self._limited(offset, length, dalign, self.max_discard):
            # Unlike write-zeroes, QEMU checks the rules before dropping a
            # piece too small to pass on (discard is advisory).
            await self._check(o, n, "discard")
            if n >= dalign:
                await self.image_child.discard(o, n)

    async def flush(self) -> None:
        await self._check(0, 0, "flush")
        await self.image_child.flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        await self._check(offset, length, "block-status")
        ext = await self.image_child.block_status(offset, length)
        # The run is named as this node's, not the file's: reads must come through
        # here (where errors are injected), never straight from the host file.
        return Extent(ext.length, ext.status, ext.offset, self)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        await self.image_child.truncate(size, exact, prealloc)

    def allocated_file_size(self) -> int | None:
        """None: QEMU's blkdebug, a protocol driver, does not say ("disk size: unavailable")."""
        return None
