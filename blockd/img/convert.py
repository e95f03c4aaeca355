"""``convert``: copy guest content from one or more images into a new (or existing) one.

The sources' block status is walked so zero and unallocated runs are not
read, and on a fresh target not written either; read data is scanned for
zero pieces of the ``-S`` size, which are left as holes too.  Several chunks
are in flight at once; wherever source and target keep the bytes in host
files, they are read with plain syscalls and written by the helper process
of :mod:`blockd.img.bulkio`.  With ``-c`` every cluster is compressed in a
worker thread (``-m`` at a time), so clusters compress in parallel while
the loop writes those already done (``-W`` lets them land out of order;
without it they are written in guest order).  With ``-B`` the target gets a
backing file and only what the sources' top layers hold is copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from blockd.block.backend import is_zero
from blockd.block.node import BlockNode, Claim, Status
from blockd.errors import QMPError
from blockd.drivers.file import FileNode
from blockd.img.common import (PROG, Args, ImgError, Progress, Session, chain_extents,
                               chain_status, parse_size)
from blockd.img.bulkio import BulkIO, PieceFailed, host_file
from blockd.img.zeroscan import zero_runs
from blockd.img.snapshot import load_param, parse_param

#: What one copy task reads and places at a time, one job for the writer helper:
#: qemu-img's request size, so a failure names the byte qemu-img names (the start
#: of the failing request).  Small enough that a chunk the loop has just read is
#: still in the CPU's cache when the writer copies it out: 2 MiB chunks beat 8 MiB
#: ones (medians of 30 interleaved runs of 2 GiB copies, 0.73 s against 0.77 s
#: from qcow2, 0.78 s against 0.82 s raw to raw), the extra hand-overs included.
CHUNK = 2 << 20
#: Copy tasks (each with a chunk buffer) at most, whatever ``-m`` says: one chunk
#: being written, one read and one placed keep the writer busy, and more buffers
#: cost more than they give (fresh pages to fault in, and to free at the end).
PLAIN_TASKS = 3
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


async def copy_image(src: _Source, dst: BlockNode, plan: Plan, bar: Progress,
                     io: BulkIO | None) -> None:
    """Copy every chunk of ``src`` into ``dst`` with up to ``plan.parallel`` tasks.

    Each task owns a chunk buffer.  Data held in host files is read into it
    through ``io`` (on the loop where the page cache holds it), scanned for
    zero pieces, and written from it by ``io``'s writer helper where the
    target can :meth:`~BlockNode.claim` room for it; the loop writes only
    what the target's driver must write itself.  ``io`` (whose buffers set
    the number of tasks) may be None only with ``plan.compress``.
    """
    size = src.size
    cluster = dst.cluster_size() or 65536
    step = cluster if plan.compress else CHUNK
    # Without -W a chunk is placed (written, or its room claimed) only after the
    # one before it, so the target is filled in order; the reads still overlap.
    placed: dict[int, asyncio.Event] = {}

    async def in_order(offset: int) -> None:
        if not plan.out_of_order and offset > 0:
            await placed.setdefault(offset - step, asyncio.Event()).wait()

    async def copy(offset: int, buf: mmap.mmap | None) -> None:
        end = min(offset + step, size)
        claims: list[tuple[Claim, int, int, int]] = []
        try:
            if plan.compress:
                await _copy_compressed(src, dst, offset, end, cluster, plan, in_order)
            else:
                assert buf is not None
                await copy_plain(offset, end, buf, claims)
        finally:
            placed.setdefault(offset, asyncio.Event()).set()
            for claim, *_ in claims:  # only left when the copy failed
                with contextlib.suppress(OSError):  # that failure is the one to report
                    await claim.abort()
        bar.add(end - offset)

    async def copy_plain(offset: int, end: int, buf: mmap.mmap,
                         claims: list[tuple[Claim, int, int, int]]) -> None:
        zeros: list[tuple[int, int]] = []                   # guest ranges reading as zero
        spans: list[tuple[int, int, int]] = []              # data: buffer start, stop, guest
        pieces: list[tuple[FileNode, int, int, int]] = []   # of it, read through io
        pos = offset
        while pos < end:  # a chunk may span sources
            node, local, left = src.locate(pos)
            for ext in await chain_extents(node, local, min(end - pos, left), plan.top_only):
                n, status = ext.length, ext.status
                if plan.top_only and not status & Status.ALLOCATED:
                    pass
                elif status & Status.ZERO and not status & Status.DATA and plan.sparse or \
                        not status & (Status.DATA | Status.ALLOCATED) and plan.sparse:
                    zeros.append((pos, n))
                else:
                    at = pos - offset
                    spans.append((at, at + n, pos))
                    file = host_file(ext.child)
                    if file is not None and ext.offset is not None:
                        pieces.append((file, ext.offset, at, at + n))
                    else:
                        try:
                            memoryview(buf)[at:at + n] = await node.read(local, n)
                        except OSError as exc:
                            raise ImgError(f"error while reading at byte {pos}: "
                                           f"{exc.strerror}") from None
                pos += n
                local += n
        try:
            if pieces:
                await io.read(pieces, buf)
        except PieceFailed as exc:
            raise ImgError(f"error while reading at byte {offset + pieces[exc.index][2]}: "
                           f"{exc.error.strerror}") from None
        runs = [zero_runs(buf, *span, plan.sparse) for span in spans]
        await in_order(offset)
        if not plan.fresh:
            for zpos, zlen in zeros:
                await dst.write_zeroes(zpos, zlen)
        for (at, stop, _), found in zip(spans, runs):
            await _place(dst, offset, buf, at, stop, found, plan, claims, cluster)
        placed.setdefault(offset, asyncio.Event()).set()
        await _fill_claims(io, buf, claims)

    chunks = iter(range(0, size, step))

    async def worker(buf: mmap.mmap | None) -> None:
        for offset in chunks:  # shared: each task takes the next chunk when free
            await copy(offset, buf)

    # The helpers' buffers are page-aligned: the kernel also copies to and from
    # those measurably faster than into a bytearray's odd offset.
    buffers = io.buffers if io is not None else [None] * plan.parallel
    workers = [asyncio.create_task(worker(buf)) for buf in buffers]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    await dst.flush()


async def _place(dst: BlockNode, offset: int, buf: mmap.mmap, start: int, stop: int,
                 runs: list[tuple[int, int]], plan: Plan,
                 claims: list[tuple[Claim, int, int, int]], cluster: int) -> None:
    """Put ``buf[start:stop]`` (guest bytes from ``offset + start``) into ``dst``, all
    but the zero ``runs`` a fresh target already reads as zero.

    Whole clusters the target can claim go on ``claims``, for the writer
    helper to write; the rest is written through the driver here.
    """
    pos = start
    for zstart, zend in [*runs, (stop, stop)]:
        if zstart > pos:
            await _claim_or_write(dst, offset, buf, pos, zstart, claims, cluster)
        if zend > zstart and not plan.fresh:
            try:
                await dst.write_zeroes(offset + zstart, zend - zstart)
            except OSError as exc:
                raise ImgError(f"error while writing at byte {offset + zstart}: "
                               f"{exc.strerror}") from None
        pos = zend


async def _claim_or_write(dst: BlockNode, offset: int, buf: mmap.mmap, start: int, stop: int,
                          claims: list[tuple[Claim, int, int, int]], cluster: int) -> None:
    """Claim room for ``buf[start:stop]`` (guest bytes from ``offset + start``), or
    write it through the driver where the target cannot hand out room."""
    pos = start
    try:
        while pos < stop:
            claim = await dst.claim(offset + pos, stop - pos)
            if claim is not None and host_file(claim.file) is not None:
                claims.append((claim, pos, pos + claim.length, offset + pos))
                pos += claim.length
                continue
            if claim is not None:
                await claim.abort()
            # Up to the next cluster boundary, after which a claim may work; from an
            # aligned offset the target cannot claim the rest either.
            nxt = stop if (offset + pos) % cluster == 0 else \
                min(stop, pos + cluster - (offset + pos) % cluster)
            await dst.write(offset + pos, memoryview(buf)[pos:nxt])
            pos = nxt
    except OSError as exc:
        raise ImgError(f"error while writing at byte {offset + pos}: {exc.strerror}") from None


async def _fill_claims(io: BulkIO, buf: mmap.mmap,
                       claims: list[tuple[Claim, int, int, int]]) -> None:
    """Write the claimed data in one job of the writer helper, then commit the claims
    in order (each leaves the list when committed; the caller aborts what is left)."""
    if not claims:
        return
    pieces = [(host_file(claim.file), claim.host, start, stop)
              for claim, start, stop, _ in claims]
    try:
        await io.write(buf, pieces)  # type: ignore[arg-type]
    except PieceFailed as exc:
        raise ImgError(f"error while writing at byte {claims[exc.index][3]}: "
                       f"{exc.error.strerror}") from None
    while claims:
        claim, *_ = claims.pop(0)
        await claim.commit()


async def _read(src: _Source, offset: int, end: int, plan: Plan) -> bytes | None:
    """Guest bytes of [offset, end), or None when the sources say it is all zero."""
    parts = []
    pos = offset
    any_data = False
    while pos < end:
        node, local, left = src.locate(pos)
        ext = await chain_status(node, local, min(end - pos, left), plan.top_only)
        n, status = ext.length, ext.status
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
    helpers = contextlib.nullcontext() if plan.compress else \
        BulkIO(min(plan.parallel, PLAIN_TASKS), CHUNK)
    async with Session(args.objects) as session, helpers as io:
        nodes = [await session.open(name, args.get("f"), force_share=args.has("U"),
                                    image_opts=args.has("image-opts")) for name in sources]
        if snapshot is not None:
            await load_param(nodes[0], snapshot)
        src = _Source(nodes)
        if args.has("bitmaps"):
            _check_bitmaps(nodes[0], args.has("skip-broken-bitmaps"))
        if plan.compress and out_fmt not in ("qcow2", "vmdk"):
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
            await create_image(session, target, out_fmt, src.size, opts,
                               context=f"error while converting {out_fmt}: ")
            keys = _key_secrets(opts)
        dst = await session.open(target, None if args.has("target-image-opts") else out_fmt,
                                 read_only=False, image_opts=args.has("target-image-opts"),
                                 extra=keys)
        if getattr(dst, "needs_compressed_writes", False):
            plan.compress = True  # a stream takes only whole compressed grains, as in qemu-img
        if dst.driver == "luks" and not args.has("target-is-zero"):
            plan.fresh = False  # unwritten LUKS payload reads as noise, not zeroes
        if args.has("bitmaps") and not _stores_bitmaps(dst):
            raise ImgError(f"Format driver '{out_fmt}' does not support bitmaps")
        if no_create and dst.length() < src.size:
            raise ImgError("output file is smaller than input file")
        bar = Progress(args.has("p") and not args.has("q"), src.size)
        try:
            await copy_image(src, dst, plan, bar, io)
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
