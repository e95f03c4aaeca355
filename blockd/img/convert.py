"""``convert`` and ``compare``: copying and comparing guest content.

Convert walks the source's block status, skips zeroes on a fresh
target, and copies with ``-m`` requests in flight.  With ``-c`` every
cluster is compressed in a worker thread, so clusters compress in
parallel while the loop writes those already done (``-W`` lets them
land out of order; without it they are still written in order).
"""

from __future__ import annotations

import asyncio
import sys

from blockd.block.backend import is_zero
from blockd.block.node import BlockNode, Status
from blockd.img.common import ImgError, Session, is_tty

CHUNK = 2 << 20


class Progress:
    """qemu-img's ``-p`` line, redrawn in place; silent when not on a terminal."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled and is_tty()
        self.total = max(1, total)
        self.done = 0
        self._shown = -1.0

    def add(self, n: int) -> None:
        self.done += n
        pct = self.done * 100 / self.total
        if self.enabled and pct - self._shown >= 1 or pct == 100:
            if self.enabled:
                print(f"\r    ({pct:.2f}/100%)", end="", file=sys.stdout, flush=True)
            self._shown = pct

    def finish(self) -> None:
        if self.enabled:
            print(f"\r    (100.00/100%)")


async def convert(session: Session, src_name: str, src_fmt: str | None, dst_name: str,
                  dst_fmt: str, options: dict[str, str], *, compress: bool, parallel: int,
                  out_of_order: bool, no_create: bool, progress: bool, image_opts: bool,
                  force_share: bool) -> None:
    from blockd.img.create import create_image

    src = await session.open(src_name, src_fmt, force_share=force_share, image_opts=image_opts)
    size = src.length()
    if compress and dst_fmt != "qcow2":
        raise ImgError("Compression not supported for this file format")
    if not no_create:
        await create_image(session, dst_name, dst_fmt, size, options)
    dst = await session.open(dst_name, dst_fmt, read_only=False)
    fresh = not no_create
    bar = Progress(progress, size)
    cluster = dst.cluster_size() or CHUNK
    step = cluster if compress else CHUNK
    queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=parallel * 2)

    # Without -W a chunk waits for the one before it to be written, so the
    # target is filled in order; the reads and compression still overlap.
    written: dict[int, asyncio.Event] = {}

    async def in_order(offset: int) -> None:
        if not out_of_order and offset > 0:
            await written.setdefault(offset - step, asyncio.Event()).wait()

    async def copy(offset: int) -> None:
        n = min(step, size - offset)
        pos = offset
        try:
            while pos < offset + n:
                ext = await src.block_status(pos, offset + n - pos)
                if ext.status & Status.ZERO and not ext.status & Status.DATA:
                    await in_order(offset)
                    if not fresh:
                        await dst.write_zeroes(pos, ext.length)
                    pos += ext.length
                    continue
                data = await src.read(pos, ext.length)
                if compress and ext.length == cluster and pos % cluster == 0:
                    if not (fresh and is_zero(data)):
                        packed = await dst.compress_cluster(data)
                        await in_order(offset)
                        await dst.write_compressed(pos, bytes(data), packed)
                else:
                    await in_order(offset)
                    await _write_sparse(dst, pos, data, fresh, cluster)
                pos += ext.length
        finally:
            written.setdefault(offset, asyncio.Event()).set()
        bar.add(n)

    async def worker() -> None:
        while (offset := await queue.get()) is not None:
            await copy(offset)

    workers = [asyncio.create_task(worker()) for _ in range(max(1, parallel))]
    try:
        for offset in range(0, size, step):
            await queue.put(offset)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
    await dst.flush()
    bar.finish()


async def _write_sparse(dst: BlockNode, offset: int, data: bytes | bytearray | memoryview,
                        fresh: bool, granularity: int) -> None:
    """Write ``data`` except the aligned all-zero pieces a fresh target already reads as zero."""
    view = memoryview(data)
    start = None  # beginning of the pending run of non-zero pieces
    pos = 0
    while pos < len(view):
        n = min(granularity - (offset + pos) % granularity, len(view) - pos)
        zero = fresh and is_zero(view[pos:pos + n])
        if zero and start is not None:
            await dst.write(offset + start, view[start:pos])
            start = None
        elif not zero and start is None:
            start = pos
        pos += n
    if start is not None:
        await dst.write(offset + start, view[start:])


async def compare(session: Session, a_name: str, b_name: str, a_fmt: str | None,
                  b_fmt: str | None, strict: bool, force_share: bool) -> tuple[str, int]:
    a = await session.open(a_name, a_fmt, force_share=force_share)
    b = await session.open(b_name, b_fmt, force_share=force_share)
    common = min(a.length(), b.length())
    if strict and a.length() != b.length():
        return "Strict mode: Image size mismatch!\n", 1
    offset = 0
    while offset < common:
        n = min(CHUNK, common - offset)
        if strict:
            sa, sb = await _alloc(a, offset, n), await _alloc(b, offset, n)
            if sa != sb:
                return f"Strict mode: Offset {offset} block status mismatch!\n", 1
        da, db = bytes(await a.read(offset, n)), bytes(await b.read(offset, n))
        if da != db:
            first = next(i for i in range(n) if da[i] != db[i])
            return f"Content mismatch at offset {(offset + first) // 512 * 512}!\n", 1
        offset += n
    longer, name = (a, a_name) if a.length() > b.length() else (b, b_name)
    if a.length() != b.length():
        out = "Warning: Image size mismatch!\n"
        pos = common
        while pos < longer.length():
            n = min(CHUNK, longer.length() - pos)
            data = bytes(await longer.read(pos, n))
            if data.count(0) != n:
                first = next(i for i in range(n) if data[i])
                return out + f"Content mismatch at offset {(pos + first) // 512 * 512}!\n", 1
            pos += n
        return out + "Images are identical.\n", 0
    return "Images are identical.\n", 0


async def _alloc(node: BlockNode, offset: int, n: int) -> bool:
    return bool((await node.block_status(offset, n)).status & Status.ALLOCATED)
