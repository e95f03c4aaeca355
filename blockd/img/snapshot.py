"""``snapshot``: list, create, apply or delete qcow2 internal snapshots; and ``-l`` of convert.

The list is qemu-img's table, padded by bytes like C's printf (a
multibyte name takes fewer columns than its byte count).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from blockd.block.node import BlockNode
from blockd.drivers.qcow2 import snapshot as qsnap
from blockd.drivers.qcow2.driver import Qcow2Node
from blockd.errors import QMPError
from blockd.img.common import PROG, Args, ImgError, Session, UsageError, size_to_str

_ACTIONS = ("l", "a", "c", "d")
_PARAM_KEYS = ("snapshot.id", "snapshot.name")


def _pad(text: str, width: int, left: bool) -> str:
    fill = " " * max(0, width - len(text.encode()))
    return text + fill if left else fill + text


def table_header() -> str:
    return (_pad("ID", 10, True) + _pad("TAG", 17, True) + _pad("VM SIZE", 8, False)
            + _pad("DATE", 20, False) + _pad("VM CLOCK", 13, False) + _pad("ICOUNT", 11, False))


def table_row(info: dict[str, Any]) -> str:
    """One ``SnapshotInfo`` as a row of qemu-img's snapshot table."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["date-sec"]))
    secs = info["vm-clock-sec"]
    clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
             f"{info['vm-clock-nsec'] // 1_000_000 % 1000:03d}")
    icount = str(info["icount"]) if "icount" in info else ""
    return (_pad(info["id"], 9, True) + " " + _pad(info["name"], 16, True) + " "
            + _pad(size_to_str(info["vm-state-size"]), 8, False) + _pad(date, 20, False)
            + _pad(clock, 13, False) + _pad(icount, 11, False))


def table_lines(snapshots: list[dict[str, Any]]) -> list[str]:
    """``Snapshot list:`` and the table, as both ``snapshot -l`` and ``info`` print it."""
    return ["Snapshot list:", table_header()] + [table_row(s) for s in snapshots]


def parse_param(text: str) -> tuple[str | None, str | None, str | None]:
    """``-l`` of convert: a name or id, or ``snapshot.id=..,snapshot.name=..``.

    Returns (id or name, id, name); the first is set for the plain form only.
    """
    if not text.startswith("snapshot."):
        return text, None, None
    found: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq:
            print(f"{PROG}: warning: short-form boolean option '{key}' deprecated\n"
                  f"Please use {key}=on instead", file=sys.stderr)
            value = "on"
        if key not in _PARAM_KEYS:
            raise ImgError(f"Invalid parameter '{key}'\n"
                           f"{PROG}: Failed in parsing snapshot param '{text}'")
        found[key] = value
    return None, found.get("snapshot.id"), found.get("snapshot.name")


async def load_param(node: BlockNode, param: tuple[str | None, str | None, str | None]) -> None:
    """Show the snapshot ``param`` names instead of the active image (read-only nodes)."""
    key, snap_id, name = param
    if not isinstance(node, Qcow2Node):
        raise ImgError(f"Failed to load snapshot: Block format '{node.driver}' used by device "
                       "'' does not support temporarily loading internal snapshots")
    snaps = node.image.snapshots
    sn = qsnap.find_id_or_name(snaps, key) if key is not None else qsnap.find(snaps, snap_id,
                                                                              name)
    if sn is None:
        raise ImgError("Failed to load snapshot: Can't find snapshot")
    try:
        await node.show_snapshot(sn, own_size=False)
    except QMPError as exc:
        raise ImgError(f"Failed to load snapshot: {exc.desc}") from None


async def run(args: Args) -> int:
    """``snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a s | -c s | -d s] file``."""
    actions = [(k, v) for k, v in args.seq if k in _ACTIONS]
    if len(actions) > 1:
        raise UsageError("Cannot mix '-l', '-a', '-c', '-d'")
    if len(args.rest) != 1:
        raise UsageError("Expecting one image file name")
    # Without an action qemu-img opens the image read-write and does nothing.
    action, name = actions[-1] if actions else ("", "")
    filename = args.rest[0]
    read_only = action == "l"
    force_share = args.has("U")
    if force_share and not read_only:
        raise ImgError(f"Could not open '{filename}': force-share=on can only be used with "
                       "read-only images")
    async with Session(args.objects) as session:
        node = await session.open(filename, None, read_only=read_only, force_share=force_share,
                                  image_opts=args.has("image-opts"))
        if action == "l":
            if node.snapshots():
                print("\n".join(table_lines(node.snapshots())))
        elif action == "c":
            if not node.supports(BlockNode.snapshot_create):
                raise ImgError(f"Could not create snapshot '{name}': -95 (Operation not "
                               "supported)")
            try:
                await node.snapshot_create(name, qsnap.now_img(), icount=0)
            except OSError as exc:
                raise ImgError(f"Could not create snapshot '{name}': -{exc.errno} "
                               f"({exc.strerror})") from None
        elif action == "":
            pass
        elif action == "a":
            if not isinstance(node, Qcow2Node):
                raise ImgError(f"Could not apply snapshot '{name}': Block driver does not "
                               "support snapshots")
            if node.bitmaps:
                raise ImgError(f"Could not apply snapshot '{name}': Device has active dirty "
                               "bitmaps")
            sn = qsnap.find_id_or_name(node.image.snapshots, name)
            if sn is None:
                raise ImgError(f"Could not apply snapshot '{name}': Failed to load snapshot: "
                               "No such file or directory")
            try:
                qsnap.validate_l1(node.image, sn)
            except OSError as exc:
                # qemu-img reports the reason, then the apply failing with EINVAL.
                print(f"{PROG}: {exc.strerror}", file=sys.stderr)
                raise ImgError(f"Could not apply snapshot '{name}': Failed to load snapshot: "
                               "Invalid argument") from None
            try:
                await node.snapshot_revert(sn)
            except OSError as exc:
                raise ImgError(f"Could not apply snapshot '{name}': Failed to load snapshot: "
                               f"{exc.strerror}") from None
            except QMPError as exc:
                raise ImgError(f"Could not apply snapshot '{name}': {exc.desc}") from None
        else:
            sn = qsnap.find(node.image.snapshots, None, name) \
                if isinstance(node, Qcow2Node) else None
            if sn is None:
                raise ImgError(f"Could not delete snapshot '{name}': snapshot not found")
            try:
                await node.snapshot_delete(sn)
            except OSError as exc:
                raise ImgError(f"Could not delete snapshot '{name}': {exc.strerror}") from None
    return 0
