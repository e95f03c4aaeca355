"""``dd``: copy a byte range of an image into a new one, with dd's operand syntax.

The output size follows qemu-img's arithmetic: ``count`` blocks (or the
whole input) minus the ``skip`` blocks, so ``count`` counts from the
start of the input, not from the skipped position.
"""

from __future__ import annotations

import sys

from blockd.img.common import PROG, Args, ImgError, Session, parse_size

CHUNK = 2 << 20


def _operands(rest: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in rest:
        key, eq, value = item.partition("=")
        if not eq or key not in ("if", "of", "bs", "count", "skip"):
            raise ImgError(f"unrecognized operand {key}")
        out[key] = value
    return out


def _number(key: str, value: str) -> int:
    try:
        n = parse_size(value)
    except ImgError:
        raise ImgError(f"Invalid {key} specified. You may use k, M, G, T, P or E suffixes for\n"
                       f"{PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes and "
                       "exabytes.") from None
    if key == "bs" and not 0 < n <= 0x7FFFFFFF:
        raise ImgError("Invalid bs specified. Must be between 1 and 2147483647.")
    return n


async def run(args: Args) -> int:
    """``dd [-f fmt] [-O fmt] [-U] [bs=N] [count=N] [skip=N] if=input of=output``."""
    from blockd.img.create import create_image

    ops = _operands(args.rest)
    if "if" not in ops or "of" not in ops:
        raise ImgError("Must specify both input and output files")
    bs = _number("bs", ops["bs"]) if "bs" in ops else 512
    out_fmt = args.get("O", "raw") or "raw"
    async with Session(args.objects) as session:
        src = await session.open(ops["if"], args.get("f"), force_share=args.has("U"),
                                 image_opts=args.has("image-opts"))
        size = src.length()
        if "count" in ops:
            count = _number("count", ops["count"])
            if count <= size // bs:
                size = count * bs
        start = _number("skip", ops["skip"]) * bs if "skip" in ops else 0
        out_size = max(0, size - start)
        await create_image(session, ops["of"], out_fmt, out_size, {})
        if start > src.length():
            # qemu-img reports this and still succeeds, leaving an empty image.
            print(f"{PROG}: {ops['if']}: cannot skip to specified offset", file=sys.stderr)
        dst = session.user(await session.open(ops["of"], out_fmt, read_only=False))
        reader = session.user(src)
        pos = start
        while pos < size:
            n = min(CHUNK - CHUNK % bs if bs <= CHUNK else bs, size - pos)
            try:
                data = await reader.read(pos, n)
            except OSError as exc:
                raise ImgError(f"error while reading from input image file: {exc.strerror}") \
                    from None
            try:
                await dst.write(pos - start, data)
            except OSError as exc:
                raise ImgError(f"error while writing to output image file: {exc.strerror}") \
                    from None
            pos += n
        await dst.flush()
    return 0
