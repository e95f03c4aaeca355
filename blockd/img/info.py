"""``info``: what an image is, alone or with its backing chain."""

from __future__ import annotations

from typing import Any

from blockd.block.filename import has_protocol
from blockd.block.node import BlockNode
from blockd.block.query import image_info
from blockd.img.common import Args, Session, UsageError, human_dump, json_pretty, size_to_str
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
    return info


async def info(session: Session, filename: str, fmt: str | None, output: str,
               backing_chain: bool, force_share: bool, image_opts: bool) -> str:
    session.graph.no_io = True  # described only: encrypted images need no key
    node = await session.open(filename, fmt, force_share=force_share, image_opts=image_opts)
    # QEMU shows the name the node makes of itself; for a format on a file named plainly
    # that is the name as given.
    plain = not image_opts and not has_protocol(filename) and node.is_format and \
        node.file is not None and node.file.driver == "file"
    chain = [(node, filename if plain else node.filename())]
    if backing_chain:
        cur = node
        while cur.backing is not None:
            cur = cur.backing
            chain.append((cur, cur.filename()))
    infos = [_image_info(n, name) for n, name in chain]
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
