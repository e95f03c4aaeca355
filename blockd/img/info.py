"""``info`` and ``map``: what an image is and where its data lives."""

from __future__ import annotations

from typing import Any

from blockd.block.node import BlockNode, Status
from blockd.block.query import image_info
from blockd.img.common import Session, human_dump, json_pretty, size_to_str


def info_text(info: dict[str, Any]) -> str:
    lines = [f"image: {info['filename']}", f"file format: {info['format']}",
             f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {size_to_str(info['actual-size'])}" if "actual-size" in info
             else "disk size: unavailable"]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("encrypted"):
        lines.append("encrypted: yes")
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
    node = await session.open(filename, fmt, force_share=force_share, image_opts=image_opts)
    chain = [(node, filename)]
    if backing_chain:
        cur = node
        while cur.backing is not None:
            cur = cur.backing
            chain.append((cur, cur.filename()))
    infos = [_image_info(n, name) for n, name in chain]
    if output == "json":
        return json_pretty(infos if backing_chain else infos[0]) + "\n"
    return "\n".join(info_text(i) for i in infos)


async def _layer_status(node: BlockNode, offset: int, length: int
                        ) -> tuple[int, int, Status, int | None, BlockNode]:
    """(length, depth, status, host offset, deciding layer) for the run at ``offset``."""
    depth, cur = 0, node
    while True:
        ext = await cur.block_status(offset, length)
        length = ext.length
        if ext.status & Status.ALLOCATED or cur.backing is None:
            present = bool(ext.status & Status.ALLOCATED)
            return length, depth, ext.status if present else Status.ZERO, \
                ext.offset if present else None, cur
        if offset >= cur.backing.length():
            return length, depth, Status.ZERO, None, cur
        length = min(length, cur.backing.length() - offset)
        cur, depth = cur.backing, depth + 1


async def map_entries(node: BlockNode) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    offset, size = 0, node.length()
    while offset < size:
        n, depth, status, host, layer = await _layer_status(node, offset, size - offset)
        e = {"start": offset, "length": n, "depth": depth,
             "present": bool(status & Status.ALLOCATED), "zero": bool(status & Status.ZERO),
             "data": bool(status & Status.DATA)}
        if host is not None:
            e["offset"] = host
        e["file"] = layer.filename()
        prev = entries[-1] if entries else None
        if prev and all(prev[k] == e[k] for k in ("depth", "present", "zero", "data")) and \
                ("offset" in prev) == ("offset" in e) and \
                ("offset" not in e or prev["offset"] + prev["length"] == e["offset"]):
            prev["length"] += n
        else:
            entries.append(e)
        offset += n
    return entries


async def map_image(session: Session, filename: str, fmt: str | None, output: str,
                    force_share: bool, image_opts: bool) -> str:
    node = await session.open(filename, fmt, force_share=force_share, image_opts=image_opts)
    entries = await map_entries(node)
    if output == "json":
        rows = []
        for e in entries:
            row = (f'{{ "start": {e["start"]}, "length": {e["length"]}, "depth": {e["depth"]}, '
                   f'"present": {str(e["present"]).lower()}, "zero": {str(e["zero"]).lower()}, '
                   f'"data": {str(e["data"]).lower()}')
            if "offset" in e:
                row += f', "offset": {e["offset"]}'
            rows.append(row + "}")
        return "[" + ",\n".join(rows) + "]\n"
    out = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e["data"] and "offset" in e:
            out.append(f"{_hex(e['start']):<16}{_hex(e['length']):<16}{_hex(e['offset']):<16}"
                       f"{e['file'] if e['depth'] else filename}")
    return "\n".join(out) + "\n"


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"
