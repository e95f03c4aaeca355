"""``commit``: write what an overlay holds into its backing file (or a deeper ``-b`` base).

The chain is opened with the base writable and the overlay above it; every
range allocated above the base is read through the overlay and written to
the base (as qemu-img's commit job does: data as read, no zero detection),
by the shared copy engine, at most at ``-r`` bytes a second.
Afterwards the overlay is emptied, unless ``-d`` is given or ``-b`` names
the base (emptying would then change what intermediate images show).
Emptying needs the format's ``make_empty()``.
"""

from __future__ import annotations

import os
from typing import Any

from blockd.block.backend import Backend
from blockd.block.node import BlockNode, Perm, Status
from blockd.img.common import (Args, ImgError, Progress, Session, UsageError, cache_mode,
                               parse_size)
from blockd.jobs.copy import DATA, SKIP, Copy
from blockd.jobs.ratelimit import RateLimit

CHUNK = 2 << 20


def _reopen_options(node: BlockNode, name: str, read_only: bool,
                    backing: str | None) -> dict[str, Any]:
    """Options that open ``node``'s image again, on an explicitly opened backing node."""
    file = node.file
    if file is None:
        raise ImgError(f"Cannot commit through '{node.filename()}'")
    options: dict[str, Any] = {"driver": node.driver, "node-name": name, "read-only": read_only,
                               "file": {"driver": file.driver, "filename": file.filename()}}
    for key in ("key-secret", "encrypt"):
        if key in node.options:
            options[key] = node.options[key]
    if node.backing is not None or backing is not None:
        options["backing"] = backing
    return options


async def _above_base(layers: list[BlockNode], offset: int, length: int) -> tuple[int, bool]:
    """(run length, allocated in some layer above the base) at ``offset``."""
    for layer in layers:
        if offset >= layer.length():
            continue
        ext = await layer.block_status(offset, min(length, layer.length() - offset))
        length = ext.length
        if ext.status & Status.ALLOCATED:
            return length, True
    return length, False


async def run(args: Args) -> int:
    """``commit [-q] [-f fmt] [-b base] [-d] [-p] filename``."""
    if len(args.rest) != 1:
        raise UsageError("Expecting one image file name")
    filename = args.rest[0]
    rate = parse_size(args.get("r") or "", what="rate limit") if args.has("r") else 0
    cache = cache_mode(args)
    async with Session(args.objects) as session:
        probe = await session.open(filename, args.get("f"), read_only=False,
                                   image_opts=args.has("image-opts"), cache=cache)
        chain = [probe]
        while chain[-1].backing is not None:
            chain.append(chain[-1].backing)
        if len(chain) == 1:
            raise ImgError("Image does not have a backing file")
        base_index = 1
        if args.has("b"):
            wanted = args.get("b") or ""
            names = [n.filename() for n in chain]
            matches = [i for i in range(1, len(chain)) if _same_file(names[i], wanted)]
            if not matches:
                raise ImgError(f"Did not find '{wanted}' in the backing chain of '{filename}'")
            base_index = matches[0]
        specs = [_reopen_options(n, f"c{i}", i not in (0, base_index),
                                 f"c{i + 1}" if i + 1 < len(chain) else None)
                 for i, n in enumerate(chain)]
        await session.graph.delete_node(probe)
        # Bottom up, so every layer finds its backing node already open.
        nodes = [await session.graph.open_node(spec) for spec in reversed(specs)][::-1]
        top, base = nodes[0], nodes[base_index]
        # The base is written through a user's edge, as qemu-img's block job does.
        out = Backend(session.graph, base, "an unnamed block device",
                      Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, Perm.all())
        size = top.length()
        if base.length() < size:
            await out.truncate(size)
        bar = Progress(args.has("p") and not args.has("q"), size)

        async def status(offset: int, n: int) -> tuple[int, str]:
            run_length, allocated = await _above_base(nodes[:base_index], offset, n)
            return run_length, DATA if allocated else SKIP

        await Copy(status, top.read, out.write, None, size, chunk=CHUNK,
                   limit=RateLimit(rate) if rate else None, done=bar.add).run()
        await out.flush()
        out.close()
        bar.finish()
        if not (args.has("d") or args.has("b")):
            if not top.supports(BlockNode.make_empty):
                raise ImgError(f"Could not empty {filename}: Operation not supported")
            await top.make_empty()
    if not args.has("q"):
        print("Image committed.")
    return 0


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b
