"""What every blockd-img subcommand shares: opening images, sizes, errors, output."""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Any

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.errors import QMPError
from blockd.objects import ObjectStore

PROG = "blockd-img"

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
             "p": 1 << 50, "e": 1 << 60}


class ImgError(Exception):
    """A failure reported as ``blockd-img: <message>`` with exit status 1."""


def parse_size(text: str) -> int:
    """qemu-img sizes: a number with an optional k/M/G/T/P/E suffix (binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgtpeBKMGTPE]?)\s*", text)
    if not m:
        raise ImgError("Invalid image size specified. You may use k, M, G, T, P or E suffixes "
                       "for")
    value = float(m.group(1)) * _SUFFIXES[m.group(2).lower()]
    if value > (1 << 63) - 1:
        raise ImgError("Image size must be less than 8 EiB!")
    return int(value)


def size_to_str(value: int) -> str:
    """QEMU's human sizes: three significant digits and a binary unit."""
    suffixes = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    if value == 0:
        return "0 B"
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = max(0, (exp - 1) // 10)
    return f"{value / (1 << (i * 10)):0.3g} {suffixes[i]}"


def probe_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise ImgError(f"Could not open '{path}': {exc.strerror}") from None
    if magic[:4] == b"QFI\xfb":
        return "qcow2"
    if magic == b"LUKS\xba\xbe":
        return "luks"
    return "raw"


class Session:
    """A graph with secrets from ``--object``; closes everything on exit."""

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

    async def open(self, filename: str, fmt: str | None, *, read_only: bool = True,
                   force_share: bool = False, image_opts: bool = False,
                   extra: dict[str, Any] | None = None) -> BlockNode:
        if image_opts:
            from blockd.keyval import parse as parse_keyval
            from blockd.keyval import typed
            from blockd.qmp.schema import Schema

            schema = Schema()
            options = typed(schema, schema.commands["blockdev-add"], parse_keyval(filename, None))
        else:
            fmt = fmt or probe_format(filename)
            options = {"driver": fmt, "file": {"driver": "file", "filename": filename}}
        options.setdefault("node-name", f"img{len(self.graph.nodes)}")
        options["read-only"] = read_only
        if force_share:
            options["force-share"] = True
        options.update(extra or {})
        try:
            return await self.graph.open_node(options)
        except QMPError as exc:
            raise ImgError(f"Could not open '{filename}': {exc.desc}"
                           if not exc.desc.startswith("Could not open") else exc.desc) from None

    async def close(self) -> None:
        await self.graph.close_all()


def human_dump(value: Any, indent: int) -> list[str]:
    """QEMU's indented dump of nested data (``Format specific information``)."""
    from blockd.qmp.json import qdict_keys

    pad = " " * (indent * 4)
    lines = []
    if isinstance(value, dict):
        for key in qdict_keys(value):
            item = value[key]
            name = key.replace("-", " ")
            if isinstance(item, (dict, list)):
                lines.append(f"{pad}{name}:")
                lines += human_dump(item, indent + 1)
            else:
                lines.append(f"{pad}{name}: {_scalar(item)}")
    else:
        for i, item in enumerate(value):
            lines.append(f"{pad}[{i}]:")
            lines += human_dump(item, indent + 1)
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def json_pretty(value: Any) -> str:
    """qemu-img's JSON: QEMU's pretty printer with plain newlines."""
    from blockd.qmp.json import encode

    return encode(value, pretty=True).replace("\r\n", "\n")


def fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


def is_tty() -> bool:
    return os.isatty(sys.stdout.fileno())
