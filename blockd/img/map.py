"""``map``: where each run of guest data lives, layer by layer, as qemu-img prints it."""

from __future__ import annotations

from typing import Any

from blockd.block.filename import has_protocol
from blockd.block.node import BlockNode, Status
from blockd.img.common import PROG, Args, ImgError, Session, UsageError, parse_size


async def _layer_status(node: BlockNode, offset: int, length: int
                        ) -> tuple[int, int, Status, int | None, BlockNode]:
    """(length, depth, status, host offset, deciding layer) for the run at ``offset``."""
    depth, cur = 0, node
    while True:
        ext = await cur.block_status(offset, length)
        length = ext.length
        if ext.status & Status.ALLOCATED or cur.backing is None:
            present = bool(ext.status & Status.ALLOCATED)
            status = ext.status if present else \
                Status.ZERO if cur.supports_backing else Status.NONE
            # qemu-img shows a host offset wherever the run reads as data or as zeroes,
            # a zero subcluster left unallocated inside an allocated cluster included;
            # the file named is the one holding the data (a vmdk's extent, say).
            return length, depth, status, \
                ext.offset if status & (Status.DATA | Status.ZERO) else None, \
                ext.child if present and ext.child is not None else cur
        if offset >= cur.backing.length():
            return length, depth, Status.ZERO, None, cur
        length = min(length, cur.backing.length() - offset)
        cur, depth = cur.backing, depth + 1


class MapFailed(Exception):
    """The status of a run could not be read: the runs printed before it (qemu-img prints
    each once the next one starts; the one being merged is lost) and the message."""

    def __init__(self, done: list[dict[str, Any]], message: str) -> None:
        super().__init__(message)
        self.done = done
        self.message = message


async def map_entries(node: BlockNode, start: int = 0, end: int | None = None
                      ) -> list[dict[str, Any]]:
    """Runs of equal status between ``start`` and ``end``, merged where contiguous."""
    entries: list[dict[str, Any]] = []
    size = node.length() if end is None else min(end, node.length())
    offset = start
    while offset < size:
        try:
            n, depth, status, host, layer = await _layer_status(node, offset, size - offset)
        except OSError as exc:
            raise MapFailed(entries[:-1], "Could not read file metadata: "
                                          f"{exc.strerror or 'Input/output error'}") from None
        e = {"start": offset, "length": n, "depth": depth,
             "present": bool(status & Status.ALLOCATED), "zero": bool(status & Status.ZERO),
             "data": bool(status & Status.DATA)}
        if host is not None:
            e["offset"] = host
        e["file"] = layer.filename()
        prev = entries[-1] if entries else None
        if prev and all(prev[k] == e[k] for k in ("depth", "present", "zero", "data", "file")) \
                and \
                ("offset" in prev) == ("offset" in e) and \
                ("offset" not in e or prev["offset"] + prev["length"] == e["offset"]):
            prev["length"] += n
        else:
            entries.append(e)
        offset += n
    if not entries:  # qemu-img describes an empty range by one empty run
        entries.append({"start": start, "length": 0, "depth": 0, "present": False,
                        "zero": False, "data": False, "file": node.filename()})
    return entries


def json_text(entries: list[dict[str, Any]]) -> str:
    """qemu-img's JSON map: one object per line, its own spacing."""
    return "[" + ",\n".join(_json_rows(entries)) + "]\n"


def _json_rows(entries: list[dict[str, Any]]) -> list[str]:
    rows = []
    for e in entries:
        row = (f'{{ "start": {e["start"]}, "length": {e["length"]}, "depth": {e["depth"]}, '
               f'"present": {_bool(e["present"])}, "zero": {_bool(e["zero"])}, '
               f'"data": {_bool(e["data"])}')
        if "offset" in e:
            row += f', "offset": {e["offset"]}'
        rows.append(row + "}")
    return rows


def human_text(entries: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The table of runs with data at a known host offset, and the file holding them.

    Data without a host offset (encrypted, compressed) cannot be shown in this
    form: the table so far is returned with the error that stops it.
    """
    out = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e["data"] and "offset" not in e:
            return "\n".join(out) + "\n", "File contains external, encrypted or compressed " \
                "clusters."
        if e["data"] and not e["zero"]:  # data known to read as zero is not listed
            out.append(f"{_hex(e['start']):<16}{_hex(e['length']):<16}{_hex(e['offset']):<16}"
                       f"{e['file']}")
    return "\n".join(out) + "\n", None


def _bool(v: bool) -> str:
    return "true" if v else "false"


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"


async def run(args: Args) -> int:
    """``map [-f fmt] [--output=ofmt] [--start-offset=N] [--max-length=N] [-U] filename``."""
    if len(args.rest) != 1:
        raise UsageError("Expecting one image file name")
    output = args.output()
    start = 0
    end = None
    if args.has("start-offset"):
        start = _offset(args.get("start-offset"), "start offset")
    if args.has("max-length"):
        end = start + _offset(args.get("max-length"), "max length")
    async with Session(args.objects) as session:
        node = await session.open(args.rest[0], args.get("f"), force_share=args.has("U"),
                                  image_opts=args.has("image-opts"))
        if args.has("picture"):
            await _picture(node, args.get("picture") or "")
            return 0
        try:
            entries = await map_entries(node, start, end)
        except MapFailed as exc:
            if output == "json":
                print("[" + "".join(row + ",\n" for row in _json_rows(exc.done)), end="")
            else:
                print(human_text(exc.done)[0], end="")
            raise ImgError(exc.message) from None
        # The top layer is named as the user gave a plain file name; backing layers,
        # other files (a vmdk's extents) and images named by json: or a protocol by
        # their node filename.
        if not args.has("image-opts") and not has_protocol(args.rest[0]):
            top = node.filename()
            for e in entries:
                if e["depth"] == 0 and e["file"] == top:
                    e["file"] = args.rest[0]
    if output == "json":
        print(json_text(entries), end="")
        return 0
    text, error = human_text(entries)
    print(text, end="", flush=True)
    if error:
        raise ImgError(error)
    return 0


async def _picture(node: BlockNode, path: str) -> None:
    """Draw the image file's cluster layout (beyond qemu-img: blockd's own option)."""
    from blockd.img import picture

    if not path.endswith((".png", ".svg")):
        raise ImgError("--picture needs a file name ending in .png or .svg")
    if node.driver != "qcow2":
        raise ImgError(f"--picture is not supported for format '{node.driver}'")
    from blockd.drivers.qcow2.check import cluster_kinds

    kinds = await cluster_kinds(node)
    if path.endswith(".png"):
        data = picture.render_png(kinds)
    else:
        data = picture.render_svg(kinds, node.filename()).encode()
    with open(path, "wb") as f:
        f.write(data)


def _offset(text: str | None, what: str) -> int:
    try:
        return parse_size(text or "")
    except ImgError:
        raise ImgError(f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes "
                       f"for\n{PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes "
                       "and exabytes.") from None
