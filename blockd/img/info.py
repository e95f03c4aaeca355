"""``info``: what an image is, alone or with its backing chain."""

from __future__ import annotations

import os
from typing import Any

from blockd.block.filename import has_protocol
from blockd.block.node import BlockNode
from blockd.block.query import image_info
from blockd.img.common import (Args, ImgError, Session, UsageError, human_dump, json_pretty,
                               size_to_str)
from blockd.img.snapshot import table_lines


def info_text(info: dict[str, Any]) -> str:
    lines = [f"image: {info['filename']}", f"file format: {info['format']}",
             f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {size_to_str(info['actual-size'])}" if "actual-size" in info
             else "disk size: unavailable"]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full and full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("dirty-flag"):
        lines.append("dirty flag: yes")
    if info.get("snapshots"):
        lines += table_lines(info["snapshots"])
    if "format-specific" in info:
        lines.append("Format specific information:")
        lines += human_dump(info["format-specific"]["data"], 1)
    return "\n".join(lines) + "\n"


def _image_info(node: BlockNode, filename: str) -> dict[str, Any]:
    info = image_info(node, flat=True)
    info["filename"] = filename
    name = info.get("backing-filename")
    if name and "full-backing-filename" not in info:  # the backing file was not opened
        info["full-backing-filename"] = name if os.path.isabs(name) or ":" in name else \
            os.path.join(os.path.dirname(node.filename() or ""), name)
    return info


async def info(session: Session, filename: str, fmt: str | None, output: str,
               backing_chain: bool, force_share: bool, image_opts: bool) -> str:
    """Each image of the chain opened alone, without its backing file, as qemu-img opens
    them: one whose backing file is missing is still described, and a chain that comes
    back to an image it named is refused by name."""
    session.graph.no_io = True  # described only: encrypted images need no key
    node = await session.open(filename, fmt, force_share=force_share, image_opts=image_opts,
                              extra={"backing": None})
    # QEMU shows the name the node makes of itself; for a format on a file named plainly
    # that is the name as given.
    plain = not image_opts and not has_protocol(filename) and node.is_format and \
        node.file is not None and node.file.driver == "file"
    infos = [_image_info(node, filename if plain else node.filename())]
    seen = {filename}
    while backing_chain and "full-backing-filename" in infos[-1]:
        name = infos[-1]["full-backing-filename"]
        if name in seen:
            raise ImgError(f"Backing file '{name}' creates an infinite loop.")
        seen.add(name)
        node = await session.open(name, infos[-1].get("backing-filename-format"),
                                  force_share=force_share, extra={"backing": None})
        infos.append(_image_info(node, node.filename()))
    if output == "json":
        return json_pretty(infos if backing_chain else infos[0]) + "\n"
    return "\n".join(info_text(i) for i in infos)


async def run(args: Args) -> int:
    """``info [-f fmt] [--output=ofmt] [--backing-chain] [-U] [--image-opts] filename``."""
    if len(args.rest) != 1:
        raise UsageError("Expecting one image file name")
    output = args.output()
    async with Session(args.objects) as session:
        text = await info(session, args.rest[0], args.get("f"), output,
                          args.has("backing-chain"), args.has("U"), args.has("image-opts"))
    print(text, end="")
    return 0
