"""What every blockd-img subcommand shares: opening images, sizes, errors, output."""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, overload

from blockd.block.filename import image_options
from blockd.block.backend import Backend
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode, Extent, Perm, Status
from blockd.block.probe import fill_drivers, open_image, probe_name
from blockd.errors import QMPError
from blockd.objects import ObjectStore

#: The name in messages: ``qemu-img`` when run under that name (a symlink or wrapper
#: standing in for it), so scripts and filters written for qemu-img's output match.
PROG = "qemu-img" if os.path.basename(sys.argv[0] if sys.argv else "") == "qemu-img" \
    else "blockd-img"

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
             "p": 1 << 50, "e": 1 << 60}


class ImgError(Exception):
    """A failure reported as ``blockd-img: <message>`` with exit status 1.

    ``newline=False`` reproduces qemu-img messages whose hint lacks a final newline.
    """

    def __init__(self, message: str, newline: bool = True) -> None:
        super().__init__(message)
        self.newline = newline


class UsageError(ImgError):
    """A command line mistake: the message is followed by a pointer to ``--help``."""


@dataclass
class Args:
    """A subcommand's parsed command line: options by name (last one wins) and operands."""

    opts: dict[str, str] = field(default_factory=dict)
    objects: list[str] = field(default_factory=list)
    o: list[str] = field(default_factory=list)
    rest: list[str] = field(default_factory=list)
    #: Every option in command line order, for commands whose options are actions.
    seq: list[tuple[str, str]] = field(default_factory=list)

    def has(self, name: str) -> bool:
        return name in self.opts

    @overload
    def get(self, name: str) -> str | None: ...

    @overload
    def get(self, name: str, default: str) -> str: ...

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.opts.get(name, default)

    def output(self) -> str:
        fmt = self.opts.get("output", "human")
        if fmt not in ("human", "json"):
            raise ImgError("--output must be used with human or json as argument.")
        return fmt


def parse_size(text: str, limit: int = (1 << 63) - 1, what: str = "image size") -> int:
    """qemu-img sizes: a number with an optional k/M/G/T/P/E suffix (binary), at most
    ``limit``; ``what`` names the value in the error, as qemu-img does."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?)([bkmgtpeBKMGTPE]?)", text)
    if not m:
        raise ImgError(f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes "
                       f"for\n{PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes "
                       "and exabytes.")
    value = float(m.group(1)) * _SUFFIXES[m.group(2).lower()] if "." in m.group(1) \
        else int(m.group(1)) * _SUFFIXES[m.group(2).lower()]
    if value > limit:
        raise ImgError(f"Invalid {what} specified. Must be between 0 and {limit}.")
    return int(value)


def size_to_str(value: int) -> str:
    """QEMU's human sizes: three significant digits and a binary unit."""
    suffixes = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    if value == 0:
        return "0 B"
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = max(0, (exp - 1) // 10)
    return f"{value / (1 << (i * 10)):0.3g} {suffixes[i]}"


_RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write operations "
    "on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.")


def _image_opts(text: str) -> dict[str, Any]:
    """``--image-opts`` options: keyval syntax (its errors stand alone, as qemu-img's)."""
    from blockd.keyval import parse as parse_keyval

    try:
        return parse_keyval(text, None)
    except QMPError as exc:
        raise ImgError(exc.desc) from None


@dataclass(frozen=True)
class CacheMode:
    """A qemu-img cache mode (``-t``/``-T``) as node options.

    ``direct`` bypasses the page cache, ``no_flush`` drops flushes (nothing is
    made durable), and ``write_through`` makes every write durable when it
    completes, as a disk with its write cache off does.
    """

    direct: bool = False
    no_flush: bool = False
    write_through: bool = False


#: The modes qemu-img accepts, by name.
CACHE_MODES = {
    "none": CacheMode(direct=True), "off": CacheMode(direct=True),
    "directsync": CacheMode(direct=True, write_through=True),
    "writeback": CacheMode(), "writethrough": CacheMode(write_through=True),
    "unsafe": CacheMode(no_flush=True),
}


def cache_mode(args: Args, letter: str = "t", default: str = "writeback") -> CacheMode:
    """The mode ``-t`` (target, written) or ``-T`` (source) names, refused with
    qemu-img's words when it names none."""
    name = args.get(letter, default) or ""
    mode = CACHE_MODES.get(name)
    if mode is None:
        kind = "source cache" if letter == "T" else "cache"
        raise ImgError(f"Invalid {kind} option: {name}")
    return mode


class Session:
    """A graph with secrets from ``--object``; closes everything on exit.

    Each image it opens is held by a user (:meth:`user`), as qemu-img holds a
    BlockBackend: the permissions it takes reach filters and their storage,
    and requests sent through it take the request path (padding, bitmaps).
    """

    def __init__(self, objects: list[str]) -> None:
        self.store = ObjectStore()
        if objects:
            # Imported only when needed: the schema machinery costs start-up time.
            from blockd.keyval import parse as parse_keyval
        for text in objects:
            try:
                self.store.add(parse_keyval(text, "qom-type"))
            except QMPError as exc:
                raise ImgError(exc.desc) from None
        self.graph = BlockGraph(self.store.secret_bytes)
        self.users: dict[int, Backend] = {}

    async def open(self, filename: str, fmt: str | None, *, read_only: bool = True,
                   force_share: bool = False, image_opts: bool = False,
                   extra: dict[str, Any] | None = None, wrap: bool = True,
                   cache: CacheMode = CACHE_MODES["writeback"]) -> BlockNode:
        """Open an image named as qemu-img names it: a file, a ``json:``/protocol name
        (:mod:`blockd.block.filename`) or ``--image-opts`` options; the format is
        probed when not given.  ``cache`` is the default for options the name
        leaves unset."""
        given = _image_opts(filename) if image_opts else {"driver": fmt} if fmt else None
        try:
            options = image_options(None if image_opts else filename, given, typed=image_opts)
            options.setdefault("node-name", f"img{len(self.graph.nodes)}")
            options["read-only"] = read_only
            if force_share:
                options["force-share"] = True
            if cache.direct or cache.no_flush:
                given_cache = options.setdefault("cache", {})
                given_cache.setdefault("direct", cache.direct)
                given_cache.setdefault("no-flush", cache.no_flush)
            self.graph.write_through = cache.write_through and not read_only

            def probed(fmt: str) -> None:
                if fmt == "raw" and not read_only and not image_opts:
                    print(_RAW_PROBE_WARNING.format(filename), file=sys.stderr)

            node = await open_image(self.graph, options,
                                    None if image_opts else probe_name(filename),
                                    typed=image_opts or filename.startswith("json:"),
                                    probed=probed, extra=extra)
            perm = Perm.CONSISTENT_READ | (Perm(0) if read_only else Perm.WRITE | Perm.RESIZE)
            try:
                self.users[id(node)] = Backend(self.graph, node, "an unnamed block device",
                                               perm, Perm.all())
            except QMPError:
                await self.graph.delete_node(node)
                raise
            return node
        except QMPError as exc:
            message = exc.human()
            raise ImgError(f"Could not open '{filename}': {message}" if wrap else message) \
                from None

    async def detect(self, filename: str) -> str:
        """The format of the image ``filename`` names: as a ``json:`` name gives it, else
        as probing finds it."""
        try:
            options = image_options(filename)
            await fill_drivers(self.graph, options, probe_name(filename))
        except QMPError as exc:
            raise ImgError(exc.desc) from None
        return options["driver"]

    def user(self, node: BlockNode) -> Backend:
        """The user holding an image :meth:`open` opened."""
        return self.users[id(node)]

    async def close(self) -> None:
        for user in self.users.values():
            user.close()
        self.users.clear()
        await self.graph.close_all()

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def human_dump(value: Any, indent: int) -> list[str]:
    """QEMU's indented dump of nested data (``Format specific information``).

    A scalar in a list goes on its index's line (``[0]: auto``).  The walk keeps
    its own stack (of lines still to print and containers still to open), so no
    depth of nesting can exhaust Python's.
    """
    from blockd.qjson import qdict_keys

    lines: list[str] = []
    stack: list[tuple[str, Any, int]] = [("", value, indent)]
    while stack:
        line, node, level = stack.pop()
        if line:
            lines.append(line)
        if not isinstance(node, (dict, list)):
            continue
        pad = " " * (level * 4)
        if isinstance(node, dict):
            items = [(f"{pad}{key.replace('-', ' ')}:", node[key]) for key in qdict_keys(node)]
        else:
            items = [(f"{pad}[{i}]:", item) for i, item in enumerate(node)]
        for label, item in reversed(items):  # pushed last to first: popped in order
            if isinstance(item, (dict, list)):
                stack.append((label, item, level + 1))
            else:
                stack.append((f"{label} {_scalar(item)}", None, 0))
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def json_pretty(value: Any) -> str:
    """qemu-img's JSON: QEMU's pretty printer with plain newlines."""
    from blockd.qjson import encode

    return encode(value, pretty=True).replace("\r\n", "\n")


def fail(message: str, usage: bool = False, newline: bool = True) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, end="\n" if newline else "")
    if usage:
        print(f"Try '{PROG} --help' for more information", file=sys.stderr)
    return 1


class Progress:
    """qemu-img's ``-p`` percentage, redrawn in place (through a pipe too, as qemu-img does)."""

    def __init__(self, enabled: bool, total: int, step: float = 1.0) -> None:
        self.enabled = enabled
        self.total = max(1, total)
        self.step = step
        self.done = 0
        self._pct = 0.0
        self._shown = 0.0
        self._draw(0.0)

    def add(self, n: int) -> None:
        self.done += n
        self._update(min(100.0, self.done * 100 / self.total))

    def add_percent(self, pct: float) -> None:
        """Advance by a share rather than by bytes (qemu-img counts some loops per pass)."""
        self._pct = min(100.0, self._pct + pct)
        self._update(self._pct)

    def _update(self, pct: float) -> None:
        # qemu-img's rule: redraw after more than one step, and whenever at 100%.
        if pct - self._shown > self.step or pct == 100.0:
            self._draw(pct)

    def _draw(self, pct: float) -> None:
        self._shown = pct
        if self.enabled:
            print(f"    ({pct:3.2f}/100%)", end="\r", flush=True)

    def finish(self) -> None:
        # qemu-img draws the final 100% once more when it ends, whatever was shown.
        if self.enabled:
            self._draw(100.0)
        self.end_line()

    def end_line(self) -> None:
        """Leave the progress line (after a failure, without drawing 100% again)."""
        if self.enabled:
            print()


async def chain_extents(node: BlockNode, offset: int, length: int,
                        top_only: bool = False) -> list[Extent]:
    """:func:`chain_status` of a whole range, as consecutive extents: the top layer's
    :meth:`~BlockNode.extents` in one call, the backing chain asked only where
    the top layer leaves the content to it."""
    out = []
    for ext in await node.extents(offset, length):
        end = offset + ext.length
        if ext.status & Status.ALLOCATED or top_only or node.backing is None:
            out.append(ext)
            offset = end
        while offset < end:
            sub = await _below(node, offset, end - offset)
            out.append(sub)
            offset += sub.length
    return out


async def chain_status(node: BlockNode, offset: int, length: int,
                       top_only: bool = False) -> Extent:
    """Status of the run at ``offset`` through the backing chain (of the top layer only
    with ``top_only``): what the guest sees there, and which layer holds it.

    Unallocated runs are asked of the backing file, cut to its length; past
    its end they read as zeroes.
    """
    ext = await node.block_status(offset, length)
    if ext.status & Status.ALLOCATED or top_only or node.backing is None:
        return ext
    return await _below(node, offset, ext.length)


async def _below(node: BlockNode, offset: int, length: int) -> Extent:
    """:func:`chain_status` of a run ``node`` leaves unallocated, from its backing file on."""
    backing = node.backing
    assert backing is not None
    if offset >= backing.length():
        return Extent(length, Status.ZERO)
    return await chain_status(backing, offset, min(length, backing.length() - offset))
