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

from blockd.block.io import is_zero
from blockd.block.filename import create_path
from blockd.block.node import BlockNode, Claim, Extent, Status, WriteFlags
from blockd.errors import QMPError
from blockd.drivers.file import FileNode
from blockd.img.common import (PROG, Args, ImgError, Progress, Session, cache_mode, chain_extents,
                               parse_size)
from blockd.img.bulkio import BulkIO, PieceFailed, host_file
from blockd.img.zeroscan import zero_runs
from blockd.img.snapshot import load_param, parse_param

#: What one copy task reads and places at a time, one job for the writer helper:
#: qemu-img's request size, so a failure names the byte qemu-img names (the start
#: of the failing request).  Small enough that a chunk the loop has just read is
#: still in the CPU's cache when the writer copies it out: 2 MiB chunks beat 8 MiB
#: ones, the extra hand-overs included (bench/notes.md).
CHUNK = 2 << 20
#: Copy tasks (each with a chunk buffer) at most, whatever ``-m`` says: one chunk
#: being written, one read and one placed keep the writer busy, and more buffers
#: cost more than they give (fresh pages to fault in, and to free at the end).
PLAIN_TASKS = 3
MAX_SPARSE = 16 << 20
#: Zeroes are written as qemu-img writes them: the target may drop what it held there.
UNMAP = WriteFlags.MAY_UNMAP


@dataclass
class Plan:
    """What the options ask of one conversion."""

    compress: bool = False
    parallel: int = 8
    out_of_order: bool = False
    fresh: bool = True        # the target reads as zeroes before we start
    sparse: int = 4096        # zero detection granularity; 0 writes everything
    top_only: bool = False    # -B: leave what the sources do not hold to the backing file
    backing_end: int | None = None  # -B: the target's backing file's length
    salvage: bool = False     # --salvage: sectors that cannot be read are copied as zeroes
    quiet: bool = False       # -q: --salvage's warnings left out


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
                copied = await _copy_compressed(src, dst, offset, end, cluster, plan, in_order)
                if copied:  # zero clusters are no work qemu-img counts
                    bar.add(copied)
            else:
                assert buf is not None
                await copy_plain(offset, end, buf, claims)
        finally:
            placed.setdefault(offset, asyncio.Event()).set()
            for claim, *_ in claims:  # only left when the copy failed
                with contextlib.suppress(OSError):  # that failure is the one to report
                    await claim.abort()

    async def copy_plain(offset: int, end: int, buf: mmap.mmap,
                         claims: list[tuple[Claim, int, int, int]]) -> None:
        assert io is not None  # missing only with plan.compress
        zeros: list[tuple[int, int]] = []                   # guest ranges reading as zero
        spans: list[tuple[int, int, int]] = []              # data: buffer start, stop, guest
        pieces: list[tuple[FileNode, int, int, int]] = []   # of it, read through io
        pos = offset
        while pos < end:  # a chunk may span sources
            node, local, left = src.locate(pos)
            exts = await _extents(node, local, min(end - pos, left), pos, plan)
            if plan.top_only:
                exts = _cut(exts, pos, plan.backing_end)
            for ext in exts:
                n, status = ext.length, ext.status
                kind = _backed_run(node, local, ext, pos, plan) if plan.top_only else ""
                if kind == "backing":
                    pass
                elif kind == "zero" and plan.sparse or not kind and _reads_as_zero(status, plan):
                    zeros.append((pos, n))
                else:
                    at = pos - offset
                    spans.append((at, at + n, pos))
                    file = host_file(ext.child)
                    # Zero runs (with -S 0) may sit on host clusters holding anything.
                    # Salvaging reads go through the driver, sector by sector on failure.
                    if file is not None and ext.offset is not None and \
                            not status & Status.ZERO and not plan.salvage:
                        pieces.append((file, ext.offset, at, at + n))
                    else:
                        memoryview(buf)[at:at + n] = await _read_run(node, local, n, pos,
                                                                     plan)
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
                await dst.write_zeroes(zpos, zlen, UNMAP)
        for (at, stop, _), found in zip(spans, runs):
            await _place(dst, offset, buf, at, stop, found, plan, claims, cluster)
            bar.add(stop - at)  # as qemu-img counts: each run of data once placed
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


def _reads_as_zero(status: int, plan: Plan) -> bool:
    """A run left to the target's zeroes rather than read and written: reading as zero
    counts, whether or not the source keeps it allocated, as in qemu-img (with ``-S 0``,
    every run is written)."""
    return bool(plan.sparse) and bool(status & Status.ZERO
                                      or not status & (Status.DATA | Status.ALLOCATED))


async def _extents(node: BlockNode, local: int, length: int, pos: int, plan: Plan,
                   unit: int = 512) -> list[Extent]:
    """:func:`chain_extents` of ``length`` bytes of ``node`` at ``local`` (``pos`` in the
    sources laid end to end), failing with qemu-img's message.

    With ``--salvage`` a ``unit`` (a sector; a cluster when compressing) whose
    status cannot be read is copied as data (its read may still succeed), with
    qemu-img's warning, and the rest is asked for again.
    """
    out: list[Extent] = []
    done = 0
    while done < length:
        try:
            out += await chain_extents(node, local + done, length - done, plan.top_only)
            break
        except OSError as exc:
            if not plan.salvage:
                raise ImgError(f"error while reading block status at offset {pos + done}: "
                               f"{exc.strerror}") from None
            if not plan.quiet:
                print(f"{PROG}: warning: error while reading block status at offset "
                      f"{pos + done}: {exc.strerror}", file=sys.stderr)
            n = min(unit, length - done)
            out.append(Extent(n, Status.DATA | Status.ALLOCATED))
            done += n
    return out


async def data_bytes(src: _Source, plan: Plan, granule: int) -> int:
    """The bytes the copy will read and write: what ``-p`` counts, as qemu-img counts it
    (zero runs, and with ``-B`` runs left to the backing file, are not work), in whole
    ``granule``s (compressed clusters are written whole)."""
    total = 0
    end = 0  # of the last granule counted
    for start, node in src.parts:
        pos = start
        for ext in await _extents(node, 0, node.length(), start, plan, max(granule, 512)):
            if (ext.status & Status.ALLOCATED or not plan.top_only) \
                    and not _reads_as_zero(ext.status, plan):
                first = max(end, pos // granule * granule)
                end = min(src.size, -(-(pos + ext.length) // granule) * granule)
                total += max(0, end - first)
            pos += ext.length
    return total


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
                await dst.write_zeroes(offset + zstart, zend - zstart, UNMAP)
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
    pieces = []
    for claim, start, stop, _ in claims:
        file = host_file(claim.file)
        assert file is not None  # only buffered host files hand out claims
        pieces.append((file, claim.host, start, stop))
    try:
        await io.write(buf, pieces)
    except PieceFailed as exc:
        raise ImgError(f"error while writing at byte {claims[exc.index][3]}: "
                       f"{exc.error.strerror}") from None
    while claims:
        claim, *_ = claims.pop(0)
        await claim.commit()


def _cut(exts: list[Extent], pos: int, at: int | None) -> list[Extent]:
    """``exts`` (consecutive from ``pos`` on) with the one spanning ``at`` cut in two
    there, as qemu-img cuts its runs at the end of the target's backing file."""
    if at is None:
        return exts
    out = []
    for ext in exts:
        if pos < at < pos + ext.length:
            head = at - pos
            out.append(Extent(head, ext.status, ext.offset, ext.child))
            out.append(Extent(ext.length - head, ext.status,
                              None if ext.offset is None else ext.offset + head, ext.child))
        else:
            out.append(ext)
        pos += ext.length
    return out


def _backed_run(node: BlockNode, offset: int, ext: Extent, pos: int, plan: Plan) -> str:
    """What qemu-img does with a run of a source's top layer (``ext`` at ``offset`` in
    ``node``, ``pos`` in the sources) when the target has a backing file: "data" to
    copy, "zero" to write as zeroes, "backing" to leave to the target's backing file.

    Only the top layer's own status counts: where it holds nothing, the source
    reads as zeroes if it has no backing file (or past its end), and is left to
    the target's backing file elsewhere.  Zeroes from the end of the target's
    backing file on are left unwritten: the target reads as zeroes there anyway.
    """
    if ext.status & Status.ALLOCATED:
        kind = "zero" if ext.status & Status.ZERO else "data"
    elif node.backing is None or offset >= node.backing.length():
        kind = "zero"
    else:
        return "backing"
    if kind == "zero" and plan.backing_end is not None and pos >= plan.backing_end:
        return "backing"
    return kind


async def _read(src: _Source, offset: int, end: int, plan: Plan) -> bytes | None:
    """Guest bytes of [offset, end), or None when the sources say it is all zero."""
    parts = []
    pos = offset
    any_data = False
    while pos < end:
        node, local, left = src.locate(pos)
        ext = (await _extents(node, local, min(end - pos, left), pos, plan, end - pos))[0]
        n, status = ext.length, ext.status
        if status & Status.DATA or status & Status.ALLOCATED and not status & Status.ZERO:
            any_data = True
        parts.append(bytes(await _read_run(node, local, n, pos, plan)))
        pos += n
    return b"".join(parts) if any_data else None


async def _read_run(node: BlockNode, local: int, n: int, pos: int,
                    plan: Plan) -> bytes | bytearray | memoryview:
    """``n`` bytes of ``node`` at ``local`` (``pos`` in the sources laid end to end).

    With ``--salvage`` a failed read is done again a sector at a time, and each
    sector that still fails reads as zeroes, with qemu-img's warning.
    """
    try:
        return await node.read(local, n)
    except OSError as exc:
        if not plan.salvage:
            raise ImgError(f"error while reading at byte {pos}: {exc.strerror}") from None
    out = bytearray(n)
    for at in range(0, n, 512):
        size = min(512, n - at)
        try:
            out[at:at + size] = await node.read(local + at, size)
        except OSError as exc:
            if not plan.quiet:
                print(f"{PROG}: warning: error while reading offset {local + at}: "
                      f"{exc.strerror}", file=sys.stderr)
    return out


async def _copy_compressed(src: _Source, dst: BlockNode, offset: int, end: int, cluster: int,
                           plan: Plan, in_order: Callable[[int], Awaitable[None]]) -> int:
    """One cluster, compressed in a worker thread; a short last cluster is padded.
    The bytes written as data (0 for a cluster of zeroes).

    With -B a cluster the source's top layer leaves to its backing file (or
    holds as zeroes) in one run is not read: qemu-img decides by the run at
    the cluster's start, and copies a cluster of several runs (or the short
    last one) whole.
    """
    if plan.top_only:
        node, local, left = src.locate(offset)
        ext = await node.block_status(local, min(end - offset, left))
        whole = end - offset == cluster and ext.length >= cluster and not (
            plan.backing_end is not None and offset < plan.backing_end < end)
        kind = _backed_run(node, local, ext, offset, plan) if whole else "data"
        if kind != "data":
            await in_order(offset)
            if kind == "zero":
                await dst.write_zeroes(offset, end - offset, UNMAP)
            return 0
    data = await _read(src, offset, end, plan)
    if data is None or is_zero(data):
        await in_order(offset)
        if not plan.fresh:
            await dst.write_zeroes(offset, end - offset, UNMAP)
        return 0
    data += bytes(cluster - len(data))
    packed = await dst.compress_cluster(data)
    await in_order(offset)
    try:
        await dst.write_compressed(offset, data, packed)
    except OSError as exc:
        raise ImgError(f"error while writing at byte {offset}: {exc.strerror}") from None
    return end - offset


def _plan(args: Args) -> Plan:
    plan = Plan(compress=args.has("c"), out_of_order=args.has("W"), salvage=args.has("salvage"),
                quiet=args.has("q"))
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
    from blockd.img.create import (add_backing_options, create_image, help_text, parse_opts,
                                   wants_help)

    out_fmt = args.get("O", "raw") or "raw"
    text = ",".join(args.o)
    if wants_help(text):  # with the protocol's options once a target is named
        print(help_text(out_fmt, with_protocol=len(args.rest) >= 2), end="")
        return 0
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
    # qemu-img's default: nothing is flushed, the target is new and is thrown away if
    # the command fails.
    cache, src_cache = cache_mode(args, default="unsafe"), cache_mode(args, "T")
    keys: dict[str, Any] = {}
    plan.fresh = not no_create or args.has("target-is-zero")
    helpers = contextlib.nullcontext() if plan.compress else \
        BulkIO(min(plan.parallel, PLAIN_TASKS), CHUNK)
    async with Session(args.objects) as session, helpers as io:
        nodes = [await session.open(name, args.get("f"), force_share=args.has("U"),
                                    image_opts=args.has("image-opts"), cache=src_cache)
                 for name in sources]
        if snapshot is not None:
            await load_param(nodes[0], snapshot)
        src = _Source(nodes)
        if args.has("bitmaps"):
            _check_bitmaps(nodes[0], args.has("skip-broken-bitmaps"))
        if not no_create:
            try:
                create_path(target)  # only a host file can be created, as qemu-img checks
            except QMPError as exc:
                raise ImgError(exc.desc) from None
        if plan.compress and out_fmt not in ("qcow2", "vmdk"):
            raise ImgError("Compression not supported for this file format")
        if not no_create:
            opts = parse_opts(out_fmt, text)
            add_backing_options(out_fmt, opts, args.get("B"), args.get("F"))
            if "backing_file" in opts:
                if "backing_fmt" not in opts:
                    raise ImgError("Use of backing file requires explicit backing format")
                plan.top_only = True
            if plan.compress and (opts.get("encryption") or opts.get("encrypt.format")):
                raise ImgError("Compression and encryption not supported at the same time")
            await create_image(session, target, out_fmt, src.size, opts,
                               context=f"error while converting {out_fmt}: ")
            keys = _key_secrets(opts)
        dst = await session.open(target, None if args.has("target-image-opts") else out_fmt,
                                 read_only=False, image_opts=args.has("target-image-opts"),
                                 extra=keys, cache=cache)
        if not args.has("target-is-zero") and not dst.has_zero_init():
            plan.fresh = False  # what is not written does not read as zeroes
        if plan.top_only and dst.backing is not None:
            plan.backing_end = dst.backing.length()
        if dst.needs_compressed_writes:
            plan.compress = True  # a stream takes only whole compressed grains, as in qemu-img
        if args.has("bitmaps") and not _stores_bitmaps(dst):
            raise ImgError(f"Format driver '{out_fmt}' does not support bitmaps")
        if no_create and dst.length() < src.size:
            raise ImgError("output file is smaller than input file")
        progress = args.has("p") and not args.has("q")
        granule = (dst.cluster_size() or 65536) if plan.compress else 1
        # qemu-img counts the work in a pass of its own, which salvaging makes visible.
        counted = progress or plan.salvage
        bar = Progress(progress, await data_bytes(src, plan, granule) if counted else src.size)
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
            await cmds.bitmap_add(handle, {
                "node": dst.node_name, "name": bm.name, "granularity": bm.granularity,
                "persistent": True, "disabled": not bm.enabled})
        except QMPError as exc:
            raise ImgError(f"Failed to create bitmap {bm.name}: {exc.desc}") from None
        try:
            await cmds.bitmap_merge(handle, {
                "node": dst.node_name, "target": bm.name,
                "bitmaps": [{"node": src.node_name, "name": bm.name}]})
        except QMPError as exc:
            await cmds.bitmap_remove(handle, {"node": dst.node_name,
                                              "name": bm.name})
            raise ImgError(f"Failed to populate bitmap {bm.name}: {exc.desc}") from None
