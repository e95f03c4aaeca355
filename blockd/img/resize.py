"""``resize``: change an image's virtual size, absolutely or by ``+``/``-`` a delta.

Shrinking needs ``--shrink`` because it drops guest data; preallocation
applies to the grown part only, so it is refused when shrinking.
"""

from __future__ import annotations

from blockd.block.node import check_length
from blockd.errors import QMPError
from blockd.img.common import PROG, Args, ImgError, Session, UsageError, parse_size

_PREALLOC = ("off", "metadata", "falloc", "full")


def _parse_delta(text: str) -> tuple[str, int]:
    """('+'|'-'|'', bytes) from a size operand."""
    sign = text[0] if text[:1] in ("+", "-") else ""
    try:
        amount = parse_size(text[len(sign):], limit=1 << 128)  # range checked below
    except ImgError:
        raise ImgError("Parameter 'size' expects a non-negative number below 2^64\n"
                       "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                       "peta-\nand exabytes, respectively.") from None
    if amount >= 1 << 64:
        raise ImgError(f"Value '{text[len(sign):]}' is out of range for parameter 'size'")
    # qemu-img reads the option back as a signed 64-bit number.
    return sign, amount - (1 << 64) if amount >= 1 << 63 else amount


async def run(args: Args) -> int:
    """``resize [-f fmt] [--preallocation=mode] [-q] [--shrink] filename [+|-]size``."""
    if len(args.rest) < 2:
        raise UsageError("Not enough arguments")
    if len(args.rest) > 2:
        raise UsageError("Expecting image file name and size")
    filename, size_text = args.rest
    sign, amount = _parse_delta(size_text)
    prealloc = args.get("preallocation", "off") or ""
    if prealloc not in _PREALLOC:
        raise ImgError(f"Invalid preallocation mode '{prealloc}'")
    async with Session(args.objects) as session:
        node = await session.open(filename, args.get("f"), read_only=False,
                                  image_opts=args.has("image-opts"))
        current = node.length()
        size = current + amount if sign == "+" else current - amount if sign == "-" else amount
        if size <= 0:
            raise ImgError("New image size must be positive")
        if prealloc != "off" and size < current:
            raise ImgError("Preallocation can only be used for growing images")
        if size < current and not args.has("shrink"):
            raise ImgError("Use the --shrink option to perform a shrink operation.\n"
                           f"{PROG}: warning: Shrinking an image will delete all data beyond "
                           "the shrunken image's end. Before performing such an operation, make "
                           "sure there is no important data there.")
        try:
            check_length(size)
            await session.user(node).truncate(size, exact=False, prealloc=prealloc)
        except OSError as exc:
            raise ImgError(exc.strerror or str(exc)) from None
        except QMPError as exc:
            raise ImgError(exc.desc) from None
    if not args.has("q"):
        print("Image resized.")
    return 0
