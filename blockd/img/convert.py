"""``convert``: copy guest content from one or more images into a new (or existing) one.

The sources' block status is walked so zero and unallocated runs are not
read, and on a fresh target not written either; read data is scanned for
zero pieces of the ``-S`` size, which are left as holes too.  ``-m``
requests run concurrently.  With ``-c`` every cluster is compressed in a
worker thread, so clusters compress in parallel while the loop writes
those already done (``-W`` lets them land out of order; without it they
are written in guest order).  With ``-B`` the target gets a backing file
and only what the sources' top layers hold is copied.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from blockd.block.backend import is_zero
from blockd.block.node import BlockNode, Status
from blockd.errors import QMPError
from blockd.img.common import PROG, Args, ImgError, Progress, Session, parse_size
from blockd.img.snapshot import load_param, parse_param

CHUNK = 2 << 20
#: Options qemu-img has that would change the result here if silently ignored.
_UNSUPPORTED = {"salvage": "--salvage"}
MAX_SPARSE = 16 << 20


@dataclass
class Plan:
    """What the options ask of one conversion."""

    compress: bool = False
    parallel: int = 8
    out_of_order: bool = False
    fresh: bool = True        # the target reads as zeroes before we start
    sparse: int = 4096        # zero detection granularity; 0 writes everything
    top_only: bool = False    # -B: leave what the sources do not hold to the backing file


class _Source:
    """The sources laid end to end, as one guest address space."""

    def __init__(self, nodes: list[BlockNode]) -> None:
        self.parts: list[tuple[int, BlockNode]] = []
        pos = 0
        for node in nodes:
            self.parts.append((pos, node))
            pos += node.length()
        self.size = pos

    def locate(self, offset: int) -> tuple[BlockNode, int, int]:
        """(node, offset in it, bytes left in it) for a global offset."""
        for start, node in reversed(self.parts):
            if offset >= start:
                return node, offset - start, node.length() - (offset - start)
        raise AssertionError("offset before the first source")


async def _status(node: BlockNode, offset: int, length: int, top_only: bool
                  ) -> tuple[int, Status]:
    """Status through the backing chain (or of the top layer only)."""
    cur = node
    while True:
        ext = await cur.block_status(offset, length)
        length = ext.length
        if ext.status & Status.ALLOCATED or top_only or cur.backing is None:
            return length, ext.status
        if offset >= cur.backing.length():
            return length, Status.ZERO
        length = min(length, cur.backing.length() - offset)
        cur = cur.backing


async def copy_image(src: _Source, dst: BlockNode, plan: Plan, bar: Progress) -> None:
    """Copy every chunk of ``src`` into ``dst`` with ``plan.parallel`` tasks."""
    size = src.size
    cluster = dst.cluster_size() or 65536
    step = cluster if plan.compress else CHUNK
    queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=plan.parallel * 2)
    # Without -W a chunk waits for the one before it to be written, so the
    # target is filled in order; the reads and compression still overlap.
    written: dict[int, asyncio.Event] = {}

    async def in_order(offset: int) -> None:
        if not plan.out_of_order and offset > 0:
            await written.setdefault(offset - step, asyncio.Event()).wait()

    async def copy(offset: int) -> None:
        end = min(offset + step, size)
        pos = offset
        try:
            if plan.compress:
                await _copy_compressed(src, dst, offset, end, cluster, plan, in_order)
                pos = end
            while pos < end:
                node, local, left = src.locate(pos)
                n, status = await _status(node, local, min(end - pos, left), plan.top_only)
                if plan.top_only and not status & Status.ALLOCATED:
                    pos += n
                    continue
                if status & Status.ZERO and not status & Status.DATA and plan.sparse or \
                        not status & (Status.DATA | Status.ALLOCATED) and plan.sparse:
                    await in_order(offset)
                    if not plan.fresh:
                        await dst.write_zeroes(pos, n)
                    pos += n
                    continue
                try:
                    data = await node.read(local, n)
                except OSError as exc:
                    raise ImgError(f"error while reading at byte {pos}: {exc.strerror}") \
                        from None
                try:
                    await in_order(offset)
                    await _write_sparse(dst, pos, data, plan)
                except OSError as exc:
                    raise ImgError(f"error while writing at byte {pos}: {exc.strerror}") \
                        from None
                pos += n
        finally:
            written.setdefault(offset, asyncio.Event()).set()
        bar.add(end - offset)

    async def worker() -> None:
        while (offset := await queue.get()) is not None:
            await copy(offset)

    workers = [asyncio.create_task(worker()) for _ in range(plan.parallel)]
    try:
        for offset in range(0, size, step):
            await queue.put(offset)
            if any(w.done() for w in workers):
                break  # a worker failed; gather reports it
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
    await dst.flush()


async def _read(src: _Source, offset: int, end: int, plan: Plan) -> bytes | None:
    """Guest bytes of [offset, end), or None when the sources say it is all zero."""
    parts = []
    pos = offset
    any_data = False
    while pos < end:
        node, local, left = src.locate(pos)
        n, status = await _status(node, local, min(end - pos, left), plan.top_only)
        if status & Status.DATA or status & Status.ALLOCATED and not status & Status.ZERO:
            any_data = True
        try:
            parts.append(bytes(await node.read(local, n)))
        except OSError as exc:
            raise ImgError(f"error while reading at byte {pos}: {exc.strerror}") from None
        pos += n
    return b"".join(parts) if any_data else None


async def _copy_compressed(src: _Source, dst: BlockNode, offset: int, end: int, cluster: int,
                           plan: Plan, in_order: Callable[[int], Awaitable[None]]) -> None:
    """One cluster, compressed in a worker thread; a short last cluster is padded."""
    data = await _read(src, offset, end, plan)
    if data is None or is_zero(data):
        await in_order(offset)
        if not plan.fresh:
            await dst.write_zeroes(offset, end - offset)
        return
    data += bytes(cluster - len(data))
    packed = await dst.compress_cluster(data)
    await in_order(offset)
    try:
        await dst.write_compressed(offset, data, packed)
    except OSError as exc:
        raise ImgError(f"error while writing at byte {offset}: {exc.strerror}") from None


async def _write_sparse(dst: BlockNode, offset: int, data: bytes | bytearray | memoryview,
                        plan: Plan) -> None:
    """Write ``data`` except the aligned zero pieces a fresh target already reads as zero."""
    if not plan.sparse:
        await dst.write(offset, data)
        return
    buf = data if isinstance(data, (bytes, bytearray)) else bytes(data)
    pos = 0
    for zstart, zend in _zero_runs(buf, offset, plan.sparse):
        if zstart > pos:
            await dst.write(offset + pos, memoryview(buf)[pos:zstart])
        if not plan.fresh:
            await dst.write_zeroes(offset + zstart, zend - zstart)
        pos = zend
    if pos < len(buf):
        await dst.write(offset + pos, memoryview(buf)[pos:] if pos else buf)


def _zero_runs(buf: bytes | bytearray, offset: int, gran: int) -> list[tuple[int, int]]:
    """Runs of whole ``gran``-aligned (in guest terms) zero pieces in ``buf``.

    ``find`` skips over data at memchr speed, so data without zero pieces costs
    one scan and no Python loop per piece.
    """
    zeros = _zeros(gran)
    size = len(buf)
    runs: list[tuple[int, int]] = []
    search = 0
    while True:
        i = buf.find(zeros, search)
        if i < 0:
            return runs
        a = i + (-(offset + i)) % gran
        if a + gran > size:
            return runs
        start = a
        while a + gran <= size and buf.startswith(zeros, a):
            a += gran
        if a > start:
            runs.append((start, a))
            search = a
        else:
            search = i + 1


@functools.lru_cache(maxsize=4)
def _zeros(n: int) -> bytes:
    return bytes(n)


def _plan(args: Args) -> Plan:
    plan = Plan(compress=args.has("c"), out_of_order=args.has("W"))
    try:
        plan.parallel = int(args.get("m", "8") or "")
    except ValueError:
        plan.parallel = 0
    if not 1 <= plan.parallel <= 16:
        raise ImgError("Invalid number of coroutines. Allowed number of coroutines is between "
                       "1 and 16")
    if args.has("S"):
        try:
            plan.sparse = parse_size(args.get("S") or "")
        except ImgError:
            plan.sparse = -1
        if plan.sparse < 0 or plan.sparse % 512 or plan.sparse > MAX_SPARSE:
            raise ImgError("Invalid buffer size for sparse output specified. Valid sizes are "
                           f"multiples of 512 up to {MAX_SPARSE}. Select 0 to disable sparse "
                           "detection (fully allocates output).")
    return plan


def _key_secrets(opts: dict[str, Any]) -> dict[str, Any]:
    """Open options that unlock a new encrypted target with the key it was created with,
    as qemu-img passes the ``-o`` key secrets on to the open."""
    out: dict[str, Any] = {}
    if "key-secret" in opts:
        out["key-secret"] = opts["key-secret"]
    if "encrypt.key-secret" in opts:
        out["encrypt"] = {"key-secret": opts["encrypt.key-secret"]}
    return out


async def run(args: Args) -> int:
    """``convert [-c] [-p] [-q] [-n] [-W] [-m N] [-S size] [-f fmt] [-O fmt] [-o opts]
    [-B backing [-F fmt]] [-U] filename [filename2 ...] output_filename``."""
    from blockd.img.create import create_image, help_text, parse_opts, wants_help

    out_fmt = args.get("O", "raw") or "raw"
    text = ",".join(args.o)
    if wants_help(text):
        print(help_text(out_fmt, with_protocol=False), end="")
        return 0
    for name, what in _UNSUPPORTED.items():
        if args.has(name):
            raise ImgError(f"{what} is not supported by {PROG} yet")
    snapshot = parse_param(args.get("l") or "") if args.has("l") else None
    plan = _plan(args)
    if args.has("skip-broken-bitmaps") and not args.has("bitmaps"):
        raise ImgError("Use of --skip-broken-bitmaps requires --bitmaps")
    if args.has("target-is-zero") and not args.has("n"):
        raise ImgError("--target-is-zero requires use of -n flag")
    if len(args.rest) < 2:
        raise ImgError("Must specify image file name")
    *sources, target = args.rest
    if snapshot is not None and len(sources) > 1:
        raise ImgError("No support for concatenating multiple snapshot")
    if args.has("bitmaps") and len(sources) > 1:
        raise ImgError("Copying bitmaps only possible with single source")
    no_create = args.has("n")
    keys: dict[str, Any] = {}
    plan.fresh = not no_create or args.has("target-is-zero")
    async with Session(args.objects) as session:
        nodes = [await session.open(name, args.get("f"), force_share=args.has("U"),
                                    image_opts=args.has("image-opts")) for name in sources]
        if snapshot is not None:
            await load_param(nodes[0], snapshot)
        src = _Source(nodes)
        if args.has("bitmaps"):
            _check_bitmaps(nodes[0], args.has("skip-broken-bitmaps"))
        if plan.compress and out_fmt != "qcow2":
            raise ImgError("Compression not supported for this file format")
        if not no_create:
            opts = parse_opts(out_fmt, text)
            if plan.compress and (opts.get("encryption") or opts.get("encrypt.format")):
                raise ImgError("Compression and encryption not supported at the same time")
            if args.has("B"):
                if out_fmt == "raw":
                    raise ImgError(f"Backing file not supported for file format '{out_fmt}'")
                opts["backing_file"] = args.get("B")
                if args.has("F"):
                    opts["backing_fmt"] = args.get("F")
                plan.top_only = True
                plan.fresh = False  # the backing file shows through unwritten parts
            await create_image(session, target, out_fmt, src.size, opts)
            keys = _key_secrets(opts)
        dst = await session.open(target, None if args.has("target-image-opts") else out_fmt,
                                 read_only=False, image_opts=args.has("target-image-opts"),
                                 extra=keys)
        if dst.driver == "luks" and not args.has("target-is-zero"):
            plan.fresh = False  # unwritten LUKS payload reads as noise, not zeroes
        if args.has("bitmaps") and not _stores_bitmaps(dst):
            raise ImgError(f"Format driver '{out_fmt}' does not support bitmaps")
        if no_create and dst.length() < src.size:
            raise ImgError("output file is smaller than input file")
        bar = Progress(args.has("p") and not args.has("q"), src.size)
        try:
            await copy_image(src, dst, plan, bar)
        except QMPError as exc:
            raise ImgError(exc.desc) from None
        bar.finish()
        if args.has("bitmaps"):
            await _copy_bitmaps(session, nodes[0], dst, args.has("skip-broken-bitmaps"))
    return 0


def _stores_bitmaps(node: BlockNode) -> bool:
    """Whether the node's format keeps persistent bitmaps (overrides the refusing default)."""
    return type(node).check_bitmap_storable is not BlockNode.check_bitmap_storable


def _check_bitmaps(src: BlockNode, skip_broken: bool) -> None:
    """Refuse before copying anything, as qemu-img does, if a bitmap cannot be copied."""
    if not _stores_bitmaps(src):
        raise ImgError("Source lacks bitmap support")
    for bm in src.bitmaps.values():
        if bm.persistent and bm.inconsistent and not skip_broken:
            raise ImgError(f"Cannot copy inconsistent bitmap '{bm.name}'\n"
                           f"Try --skip-broken-bitmaps, or use '{PROG} bitmap --remove' to "
                           "delete it")


async def _copy_bitmaps(session: Session, src: BlockNode, dst: BlockNode,
                        skip_broken: bool) -> None:
    """Each persistent bitmap recreated on the target (same granularity and enabled state)
    and filled by a merge, through the QMP handlers ``qemu-img`` also goes through."""
    from blockd.commands import bitmaps as cmds
    from blockd.img.bitmap import _Handle

    handle = _Handle(session.graph)
    for bm in list(src.bitmaps.values()):
        if not bm.persistent:
            continue
        if skip_broken and bm.inconsistent:
            print(f"{PROG}: warning: Skipping inconsistent bitmap '{bm.name}'", file=sys.stderr)
            continue
        try:
            await cmds.bitmap_add(handle, {  # type: ignore[arg-type]
                "node": dst.node_name, "name": bm.name, "granularity": bm.granularity,
                "persistent": True, "disabled": not bm.enabled})
        except QMPError as exc:
            raise ImgError(f"Failed to create bitmap {bm.name}: {exc.desc}") from None
        try:
            await cmds.bitmap_merge(handle, {  # type: ignore[arg-type]
                "node": dst.node_name, "target": bm.name,
                "bitmaps": [{"node": src.node_name, "name": bm.name}]})
        except QMPError as exc:
            await cmds.bitmap_remove(handle, {"node": dst.node_name,  # type: ignore[arg-type]
                                              "name": bm.name})
            raise ImgError(f"Failed to populate bitmap {bm.name}: {exc.desc}") from None
