"""``create`` and ``resize``: new images with qemu-img's option syntax and messages."""

from __future__ import annotations

import os
from typing import Any

from blockd.drivers import file as file_driver
from blockd.errors import QMPError
from blockd.img.common import ImgError, Session, parse_size

#: ``-o`` options per format: name -> (blockdev-create member, parser).
_QCOW2_OPTS = {
    "compat": ("version", lambda v: {"0.10": "v2", "1.1": "v3", "v2": "v2", "v3": "v3"}[v]),
    "cluster_size": ("cluster-size", parse_size),
    "refcount_bits": ("refcount-bits", int),
    "lazy_refcounts": ("lazy-refcounts", lambda v: v == "on"),
    "extended_l2": ("extended-l2", lambda v: v == "on"),
    "preallocation": ("preallocation", str),
    "compression_type": ("compression-type", str),
    "backing_file": ("backing-file", str),
    "backing_fmt": ("backing-fmt", str),
}
_RAW_OPTS = {"preallocation": ("preallocation", str)}
FORMATS = {"qcow2": _QCOW2_OPTS, "raw": _RAW_OPTS}


def parse_opts(fmt: str, text: str) -> dict[str, str]:
    table = FORMATS[fmt]
    opts: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in table:
            raise ImgError(f"Invalid parameter '{key}'")
        opts[key] = value
    return opts


def help_text(fmt: str) -> str:
    return "Supported options:\n" + "".join(f"  {name}\n" for name in ["size", *FORMATS[fmt]])


def formatting_line(filename: str, fmt: str, size: int, opts: dict[str, str]) -> str:
    """The "Formatting ..." line, options in the order qemu-img prints them."""
    if fmt == "raw":
        parts = [f"size={size}"] + ([f"preallocation={opts['preallocation']}"]
                                    if "preallocation" in opts else [])
    else:
        parts = [f"cluster_size={parse_size(opts.get('cluster_size', '65536'))}",
                 f"extended_l2={opts.get('extended_l2', 'off')}"]
        if "preallocation" in opts:
            parts.append(f"preallocation={opts['preallocation']}")
        parts += [f"compression_type={opts.get('compression_type', 'zlib')}", f"size={size}"]
        for key in ("compat", "backing_file", "backing_fmt"):
            if key in opts:
                parts.append(f"{key}={opts[key]}")
        parts += [f"lazy_refcounts={opts.get('lazy_refcounts', 'off')}",
                  f"refcount_bits={opts.get('refcount_bits', '16')}"]
    return f"Formatting '{filename}', fmt={fmt} " + " ".join(parts)


async def create_image(session: Session, filename: str, fmt: str, size: int | None,
                       opts: dict[str, str]) -> str:
    if fmt not in FORMATS:
        raise ImgError(f"Unknown file format '{fmt}'")
    if size is None:
        backing = opts.get("backing_file")
        if not backing:
            raise ImgError("Image creation needs a size parameter")
        path = backing if os.path.isabs(backing) else \
            os.path.join(os.path.dirname(filename), backing)
        base = await session.open(path, opts.get("backing_fmt"))
        size = base.length()
    size = -(-size // 512) * 512 if fmt == "qcow2" else size
    line = formatting_line(filename, fmt, size, opts)
    table = FORMATS[fmt]
    options: dict[str, Any] = {"driver": fmt, "size": size}
    try:
        for key, value in opts.items():
            member, conv = table[key]
            options[member] = conv(value)
    except (KeyError, ValueError):
        raise ImgError(f"Invalid value for option '{key}': {value}") from None
    try:
        prealloc = options.pop("preallocation", "off") if fmt == "raw" else "off"
        await file_driver.create(session.graph, {"driver": "file", "filename": filename,
                                                 "size": 0 if fmt == "qcow2" else size,
                                                 "preallocation": prealloc})
        if fmt == "qcow2":
            from blockd.drivers.qcow2.create import create

            options["file"] = {"driver": "file", "filename": filename}
            await create(session.graph, options)
    except QMPError as exc:
        raise ImgError(f"{filename}: {exc.desc}") from None
    return line + "\n"


async def resize(session: Session, filename: str, fmt: str | None, size_text: str,
                 shrink: bool, prealloc: str) -> str:
    node = await session.open(filename, fmt, read_only=False)
    current = node.length()
    if size_text.startswith(("+", "-")):
        delta = parse_size(size_text[1:])
        size = current + delta if size_text[0] == "+" else current - delta
    else:
        size = parse_size(size_text)
    if size < current and not shrink:
        raise ImgError("Use the --shrink option to perform a shrink operation.")
    try:
        await node.truncate(size, exact=True, prealloc=prealloc)
    except OSError as exc:
        raise ImgError(f"Error resizing image: {exc.strerror}") from None
    return "Image resized.\n"
