"""``rebase``: give an image another backing file.

Safe mode keeps what the guest sees: wherever the image itself holds
nothing, the old and the new backing are compared cluster by cluster
and clusters that differ get the old content written into the image;
only then does the header name the new backing file.  ``-b ""`` (no new
backing) compares against zeroes, which flattens the chain into the
image.  Unsafe mode (``-u``) only rewrites the header and opens neither
backing file.
"""

from __future__ import annotations

from blockd.block.backend import Backend
from blockd.block.filename import backing_path
from blockd.block.node import BlockNode, Status
from blockd.errors import QMPError
from blockd.img.common import Args, ImgError, Progress, Session, UsageError, cache_mode

CHUNK = 2 << 20
_FORMATS = ("raw", "qcow2", "luks")


async def _read(node: BlockNode | None, offset: int, n: int) -> bytes:
    """Guest data of a backing node, zeroes where it ends (or where there is none)."""
    if node is None or offset >= node.length():
        return bytes(n)
    have = min(n, node.length() - offset)
    data = bytes(await node.read(offset, have))
    return data + bytes(n - have)


async def _run(top: BlockNode, offset: int, limit: int) -> tuple[int, bool]:
    """(length, allocated) of the run at ``offset``, merged up to ``limit`` as QEMU does."""
    ext = await top.block_status(offset, limit)
    allocated = bool(ext.status & Status.ALLOCATED)
    n = ext.length
    while n < limit:
        ext = await top.block_status(offset + n, limit - n)
        if bool(ext.status & Status.ALLOCATED) != allocated:
            break
        n += ext.length
    return n, allocated


async def _copy_differences(top: BlockNode, out: Backend, old: BlockNode | None,
                            new: BlockNode | None, bar: Progress) -> None:
    size = top.length()
    cs = top.cluster_size() or 65536
    # As qemu-img: each pass over a range the image does not hold counts the same share.
    share = 100 / (size // min(size, CHUNK)) if size else 100.0
    old_end = old.length() if old is not None else 0
    new_end = new.length() if new is not None else 0
    offset = 0
    while offset < size:
        n, allocated = await _run(top, offset, min(CHUNK, size - offset))
        if not allocated:
            # As qemu-img, each backing file is read up to its end and no further.
            for end in (old_end, new_end):
                if offset < end:
                    n = min(n, end - offset)
            a = await _read(old, offset, n)
            b = await _read(new, offset, n)
            if a != b:
                # Whole clusters: the image allocates them whole anyway.  Past the
                # old backing file's end its content is zeroes, written as such.
                for pos in range(0, n, cs):
                    piece = a[pos:pos + cs]
                    if piece == b[pos:pos + cs]:
                        continue
                    if offset >= old_end:
                        await out.write_zeroes(offset + pos, len(piece))
                    else:
                        await out.write(offset + pos, piece)
            bar.add_percent(share)
        offset += n


async def run(args: Args) -> int:
    """``rebase [-f fmt] [-t cache] [-T src_cache] [-p] [-q] [-u] [-U] [-b backing_file
    [-F backing_fmt]] filename``."""
    if len(args.rest) != 1:
        raise UsageError("Expecting one image file name")
    unsafe = args.has("u")
    if not unsafe and not args.has("b"):
        raise UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    out_base = args.get("b") or ""
    out_fmt = args.get("F")
    if out_fmt is not None and out_fmt not in _FORMATS:
        raise ImgError(f"Invalid format name: '{out_fmt}'")
    filename = args.rest[0]
    cache, src_cache = cache_mode(args), cache_mode(args, "T")
    async with Session(args.objects) as session:
        top = await session.open(filename, args.get("f"), read_only=False,
                                 image_opts=args.has("image-opts"), cache=cache,
                                 extra={"backing": None} if unsafe else None)
        if not unsafe:
            new = None
            if out_base:
                try:
                    path = backing_path(top.filename(), out_base)
                except QMPError as exc:
                    raise ImgError(f"Could not resolve backing filename: {exc.desc}") from None
                try:
                    new = await session.open(path, out_fmt, force_share=args.has("U"),
                                             wrap=False, cache=src_cache)
                except ImgError as exc:
                    raise ImgError(f"Could not open new backing file '{out_base}': {exc}") \
                        from None
            bar = Progress(args.has("p") and not args.has("q"), top.length())
            await _copy_differences(top, session.user(top), top.backing, new, bar)
            bar.finish()
        what = f"Could not change the backing file to '{out_base}'"
        if not top.supports(BlockNode.change_backing_file):
            raise ImgError(f"{what}: Operation not supported")
        if out_base and not out_fmt:
            raise ImgError(f"{what}: backing format must be specified")
        try:
            await top.change_backing_file(out_base or None, out_fmt)
        except OSError as exc:
            raise ImgError(f"{what}: {exc.strerror}") from None
    return 0
