"""Opening the backing file an image names, for every format that records one.

The name is relative to the directory of the storage under any filters
(QEMU's ``bdrv_dirname``), so ``blkdebug::top.qcow2`` finds its backing
file next to ``top.qcow2``; the format is the recorded one or probed.  A
chain that comes back to a file already in it is refused: QEMU would
open it forever.
"""

from __future__ import annotations

import contextvars
import os

from blockd.block.filename import backing_path, image_options, typed_options
from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode
from blockd.block.probe import fill_drivers, probe_name
from blockd.errors import QMPError
from blockd.paths import os_path

#: Files of the images whose backing files are being opened, in this open call.
_BACKING_CHAIN: contextvars.ContextVar[frozenset[tuple[int, int] | None]] = \
    contextvars.ContextVar("backing_chain", default=frozenset())


def _file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of a file, to recognise it under any name; None if it cannot be stat'ed."""
    try:
        st = os.stat(os_path(path))
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


async def open_backing_file(ctx: OpenContext, file: BlockNode, name: str,
                            fmt: str | None) -> None:
    """Open backing file ``name`` (format ``fmt``, probed if None) of the image stored in
    ``file`` and attach it as the opening node's ``backing`` child."""
    storage = file
    while storage.file is not None:
        storage = storage.file
    try:
        path = backing_path(storage.filename(), name)
        options = image_options(path, {"driver": fmt} if fmt else None)
    except QMPError as exc:
        raise QMPError(f"Could not open backing file: {exc.desc}") from None
    chain = _BACKING_CHAIN.get() | {_file_id(file.filename())}
    if _file_id(path) in chain - {None}:
        raise QMPError(f"Could not open backing file: Backing chain loops back to '{path}'")
    token = _BACKING_CHAIN.set(chain)
    try:
        await fill_drivers(ctx.graph, options, probe_name(path))
        if path.startswith("json:"):
            options = typed_options(options)
        await ctx.open_child(options, "backing")
    except QMPError as exc:
        raise QMPError(f"Could not open backing file: {exc.desc}", hint=exc.hint) from None
    finally:
        _BACKING_CHAIN.reset(token)


async def open_backing(ctx: OpenContext, node: BlockNode, name: str | None,
                       fmt: str | None) -> None:
    """``node``'s backing link: the one its options choose (``null`` for none), else the
    file ``name`` the image records (none if empty)."""
    opts = node.options
    if "backing" in opts:
        if opts["backing"] is not None:
            await ctx.open_child(opts["backing"], "backing")
        return
    if name:
        await open_backing_file(ctx, node.file_node, name, fmt)
