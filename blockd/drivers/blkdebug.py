"""The ``blkdebug`` filter: fault injection at the points a format driver names.

Format drivers above call :meth:`BlockNode.debug_event` on their storage
child at QEMU's event points (``l2_update``, ``write_aio``...).  A rule
whose event fires (in the right state) becomes *active*; the next I/O
request that matches its I/O type and sector then fails with the rule's
errno, once or until the rule is cleared.  ``set-state`` rules move the
filter between numbered states so a test can aim at, say, the second
L2 update.  Rules come from ``inject-error``/``set-state`` options or a
config file in QEMU's INI format.
"""

from __future__ import annotations

import asyncio
import configparser
import dataclasses
import errno as errnos
import os
from typing import Any

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, Extent, WriteFlags
from blockd.errors import QMPError

IO_TYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
DEFAULT_IO_TYPES = frozenset(IO_TYPES[:5])


@dataclasses.dataclass
class InjectRule:
    event: str
    state: int = 0
    iotypes: frozenset[str] = DEFAULT_IO_TYPES
    errno: int = errnos.EIO
    sector: int = -1
    once: bool = False
    immediately: bool = False


@dataclasses.dataclass
class StateRule:
    event: str
    state: int
    new_state: int


def _bool(value: str) -> bool:
    return value.strip('"').lower() in ("on", "yes", "true", "1")


def _parse_config(path: str) -> tuple[list[InjectRule], list[StateRule]]:
    parser = configparser.ConfigParser(strict=False)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise QMPError(f"Could not read blkdebug config file: {exc.strerror}") from None
    # QEMU's format repeats section names; number them so configparser keeps each.
    counter = 0
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            counter += 1
            line = f"[{counter} {stripped[1:-1].strip()}]"
        lines.append(line)
    parser.read_string("\n".join(lines))
    inject, state = [], []
    for section in parser.sections():
        kind = section.split(" ", 1)[1]
        opts = {k: v.strip('"') for k, v in parser[section].items()}
        if kind == "inject-error":
            inject.append(InjectRule(
                event=opts["event"], state=int(opts.get("state", 0)),
                errno=int(opts.get("errno", errnos.EIO)), sector=int(opts.get("sector", -1)),
                once=_bool(opts.get("once", "off")), immediately=_bool(opts.get("immediately", "off"))))
        elif kind == "set-state":
            state.append(StateRule(opts["event"], int(opts["state"]), int(opts["new_state"])))
    return inject, state


class BlkdebugNode(BlockNode):
    driver = "blkdebug"
    is_filter = True
    strong_options = ("config", "inject-error", "set-state", "align", "max-transfer",
                      "opt-write-zero", "max-write-zero", "opt-discard", "max-discard")

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.state = 1
        self.inject: list[InjectRule] = []
        self.set_state_rules: list[StateRule] = []
        self.active: list[InjectRule] = []

    async def open(self, ctx: OpenContext) -> None:
        opts = self.options
        if "config" in opts:
            self.inject, self.set_state_rules = _parse_config(opts["config"])
        for r in opts.get("inject-error", []):
            types = frozenset([r["iotype"]]) if "iotype" in r else DEFAULT_IO_TYPES
            self.inject.append(InjectRule(r["event"], r.get("state", 0), types,
                                          r.get("errno", errnos.EIO), r.get("sector", -1),
                                          r.get("once", False), r.get("immediately", False)))
        for r in opts.get("set-state", []):
            self.set_state_rules.append(StateRule(r["event"], r.get("state", 0), r["new_state"]))
        align = opts.get("align", 1)
        if align <= 0 or align & (align - 1):
            raise QMPError("Cannot meet constraints with align " + str(align))
        await ctx.open_child(opts["image"], "image")

    @property
    def image(self) -> BlockNode:
        return self.children["image"].child

    @property
    def file(self) -> BlockNode | None:
        """Queries walk filters through ``file``; blkdebug's child is called image."""
        return self.image

    def exact_filename(self) -> str | None:
        if any(key in self.options for key in self.strong_options if key != "config"):
            return None
        inner = self.image.exact_filename()
        if inner is None:
            return None
        return f"blkdebug:{self.options.get('config', '')}:{inner}"

    # ---- rules ------------------------------------------------------------------

    def debug_event(self, event: str) -> None:
        """Activate the inject rules of ``event`` and apply its state changes."""
        new_state = self.state
        for rule in self.inject:
            if rule.event == event and rule.state in (0, self.state) and rule not in self.active:
                self.active.insert(0, rule)
        for rule in self.set_state_rules:
            if rule.event == event and rule.state in (0, self.state):
                new_state = rule.new_state
        self.state = new_state
        # Events raised above us also reach the image (a blkdebug stack).
        self.image.debug_event(event)

    async def _check(self, offset: int, length: int, iotype: str) -> None:
        for rule in self.active:
            if iotype not in rule.iotypes:
                continue
            if rule.sector >= 0:
                start = rule.sector * 512
                if not (offset < start + 512 and start < offset + length):
                    continue
            if rule.once:
                # A one-shot rule is gone for good, not just deactivated.
                self.active.remove(rule)
                self.inject.remove(rule)
            if not rule.immediately:
                await asyncio.sleep(0)
            raise OSError(rule.errno, os.strerror(rule.errno))

    # ---- data path ----------------------------------------------------------------

    def length(self) -> int:
        return self.image.length()

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        await self._check(offset, length, "read")
        return await self.image.read(offset, length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        await self._check(offset, len(data), "write")
        await self.image.write(offset, data, flags)

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        await self._check(offset, length, "write-zeroes")
        await self.image.write_zeroes(offset, length, flags)

    async def discard(self, offset: int, length: int) -> None:
        await self._check(offset, length, "discard")
        await self.image.discard(offset, length)

    async def flush(self) -> None:
        await self._check(0, 0, "flush")
        await self.image.flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        await self._check(offset, length, "block-status")
        return await self.image.block_status(offset, length)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        await self.image.truncate(size, exact, prealloc)

    def allocated_file_size(self) -> int | None:
        return self.image.allocated_file_size()
