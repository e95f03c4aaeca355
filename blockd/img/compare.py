"""``compare``: do two images show the guest the same content?

Runs that both images report as zero are skipped without reading; the
rest is read in chunks and compared.  The first difference is reported at
its 512-byte sector, as qemu-img does.  Exit status: 0 identical, 1
different, 2 when an image cannot be opened or read.
"""

from __future__ import annotations

import sys
from typing import Callable

from blockd.block.node import BlockNode, Status
from blockd.img.common import (PROG, Args, ImgError, Progress, Session, UsageError, cache_mode,
                               chain_status)

CHUNK = 2 << 20
#: What ``-s`` requires to be equal, besides the content.
_STRICT = Status.ALLOCATED | Status.DATA | Status.ZERO


def _mismatch(a: bytes, b: bytes, base: int) -> int | None:
    """Sector offset of the first byte where ``a`` and ``b`` differ, if any."""
    if a == b:
        return None
    lo, hi = 0, len(a)
    while hi - lo > 4096:  # bisect on slices: the comparisons run in C
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    first = next(i for i in range(lo, hi) if a[i] != b[i])
    return (base + first) // 512 * 512


def _zero(status: int) -> bool:
    return bool(status & Status.ZERO) and not status & Status.DATA \
        or not status & Status.ALLOCATED and not status & Status.DATA


async def compare_nodes(a: BlockNode, b: BlockNode, strict: bool, bar: Progress,
                        say: Callable[[str], None]) -> str | None:
    """The mismatch message, or None when the images are equal (sizes aside).

    A size difference is announced through ``say`` once the common part matched.
    """
    common = min(a.length(), b.length())
    offset = 0
    while offset < common:
        ea = await chain_status(a, offset, min(CHUNK, common - offset))
        eb = await chain_status(b, offset, min(CHUNK, common - offset))
        n, sa, sb = min(ea.length, eb.length), ea.status, eb.status
        if strict and sa & _STRICT != sb & _STRICT:
            return f"Strict mode: Offset {offset} block status mismatch!"
        if not (_zero(sa) and _zero(sb)):
            at = _mismatch(bytes(await a.read(offset, n)), bytes(await b.read(offset, n)), offset)
            if at is not None:
                return f"Content mismatch at offset {at}!"
        offset += n
        bar.add(n)
    longer = a if a.length() > b.length() else b
    if a.length() != b.length():
        say("Warning: Image size mismatch!")
    while offset < longer.length():
        ext = await chain_status(longer, offset, min(CHUNK, longer.length() - offset))
        n = ext.length
        if not _zero(ext.status):
            data = bytes(await longer.read(offset, n))
            at = _mismatch(data, bytes(n), offset)
            if at is not None:
                return f"Content mismatch at offset {at}!"
        offset += n
        bar.add(n)
    return None


async def run(args: Args) -> int:
    """``compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2``."""
    if len(args.rest) != 2:
        raise UsageError("Expecting two image file names")
    quiet = args.has("q")

    def say(text: str) -> None:
        if not quiet:
            print(text)

    try:
        async with Session(args.objects) as session:
            cache = cache_mode(args, "T")
            share, image_opts = args.has("U"), args.has("image-opts")
            a = await session.open(args.rest[0], args.get("f"), force_share=share,
                                   image_opts=image_opts, cache=cache)
            b = await session.open(args.rest[1], args.get("F"), force_share=share,
                                   image_opts=image_opts, cache=cache)
            # qemu-img ends the progress line after the verdict, without drawing 100% again.
            bar = Progress(args.has("p") and not quiet, max(a.length(), b.length()), step=2.0)
            if a.length() != b.length() and args.has("s"):
                say("Strict mode: Image size mismatch!")
                bar.end_line()
                return 1
            message = await compare_nodes(a, b, args.has("s"), bar, say)
            say(message or "Images are identical.")
            bar.end_line()
    except ImgError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: Error while reading: {exc.strerror}", file=sys.stderr)
        return 2
    return 1 if message else 0
