"""``bitmap``: add, remove, clear, enable, disable and merge persistent dirty bitmaps.

Like qemu-img, which runs its QMP bitmap commands on the opened image, the
actions go through blockd's ``block-dirty-bitmap-*`` handlers, in command line
order; the format stores the result when the image is closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blockd.block.graph import BlockGraph
from blockd.errors import QMPError
from blockd.img.common import Args, ImgError, Session, parse_size

_ACTIONS = ("add", "remove", "clear", "enable", "disable", "merge")


@dataclass
class _Handle:
    """What the bitmap command handlers need of a daemon: its graph."""

    graph: BlockGraph


async def run(args: Args) -> int:
    """``bitmap (--add|--remove|--clear|--enable|--disable|--merge SRC)... [-g N]
    [-b source [-F fmt]] [-f fmt] filename bitmap``."""
    from blockd.commands import bitmaps as cmds

    actions = [(key, value) for key, value in args.seq if key in _ACTIONS]
    if not actions:
        raise ImgError("Need at least one of --add, --remove, --clear, --enable, --disable, "
                       "or --merge")
    if args.has("g") and not any(key == "add" for key, _ in actions):
        raise ImgError("granularity only supported with --add")
    if args.has("b") and not any(key == "merge" for key, _ in actions):
        raise ImgError("-b only supported with --merge")
    if args.has("F") and not args.has("b"):
        raise ImgError("-F only supported with -b")
    if len(args.rest) != 2:
        raise ImgError("Expecting filename and bitmap name")
    filename, name = args.rest
    granularity = None
    if args.has("g"):
        granularity = parse_size(args.get("g") or "")
    async with Session(args.objects) as session:
        node = await session.open(filename, args.get("f"), read_only=False,
                                  image_opts=args.has("image-opts"))
        source = node
        if args.has("b"):
            source = await session.open(args.get("b") or "", args.get("F"))
        handle = _Handle(session.graph)
        for action, value in actions:
            request: dict[str, Any] = {"node": node.node_name, "name": name}
            try:
                if action == "add":
                    request["persistent"] = True
                    if granularity is not None:
                        request["granularity"] = granularity
                    await cmds.bitmap_add(handle, request)
                elif action == "merge":
                    merge = {"node": node.node_name, "target": name,
                             "bitmaps": [{"node": source.node_name, "name": value}]}
                    await cmds.bitmap_merge(handle, merge)
                else:
                    handler = {"remove": cmds.bitmap_remove, "clear": cmds.bitmap_clear,
                               "enable": cmds.bitmap_enable,
                               "disable": cmds.bitmap_disable}[action]
                    await handler(handle, request)
            except QMPError as exc:
                raise ImgError(f"Operation {action} on bitmap {name} failed: {exc.desc}") \
                    from None
    return 0
