"""``blockd-img``: qemu-img's command line (subcommands, getopt-style options, exit codes)."""

from __future__ import annotations

import asyncio
import getopt
import sys
from typing import Any, Awaitable, Callable

from blockd.img import check as check_cmd
from blockd.img import convert as convert_cmd
from blockd.img import create as create_cmd
from blockd.img import info as info_cmd
from blockd.img.common import ImgError, Session, fail, parse_size

USAGE = """\
usage: blockd-img [standard options] command [command options]
blockd-img is qemu-img for blockd: the same subcommands, options and output.

Command syntax:
  check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename
  compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2
  convert [--object objectdef] [--image-opts] [-c] [-p] [-q] [-n] [-f fmt] [-O output_fmt] [-o options] [-m num_coroutines] [-W] [-U] filename output_filename
  create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-o options] filename [size]
  info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  map [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [-U] filename
  resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size
"""

LONG = ["object=", "image-opts", "output=", "backing-chain", "force-share", "shrink",
        "preallocation=", "help", "target-image-opts"]


def _parse(args: list[str], short: str) -> tuple[dict[str, Any], list[str]]:
    try:
        opts, rest = getopt.gnu_getopt(args, short, LONG)
    except getopt.GetoptError as exc:
        raise ImgError(str(exc)) from None
    out: dict[str, Any] = {"objects": []}
    for key, value in opts:
        key = key.lstrip("-")
        if key == "object":
            out["objects"].append(value)
        elif key in ("U", "force-share"):
            out["U"] = True
        else:
            out[key] = value
    return out, rest


def _output(o: dict[str, Any]) -> str:
    fmt = o.get("output", "human")
    if fmt not in ("human", "json"):
        raise ImgError(f"--output must be used with human or json as argument.")
    return fmt


async def _run(command: str, args: list[str]) -> int:
    if command == "create":
        o, rest = _parse(args, "f:o:b:F:uq")
        fmt = o.get("f", "raw")
        if o.get("o") == "help" or o.get("o", "").endswith(",help"):
            print(create_cmd.help_text(fmt), end="")
            return 0
        opts = create_cmd.parse_opts(fmt, o.get("o", "")) if fmt in create_cmd.FORMATS else {}
        if "b" in o:
            opts["backing_file"] = o["b"]
        if "F" in o:
            opts["backing_fmt"] = o["F"]
        if not rest:
            raise ImgError("Expecting image file name")
        size = parse_size(rest[1]) if len(rest) > 1 else None
        session = Session(o["objects"])
        try:
            text = await create_cmd.create_image(session, rest[0], fmt, size, opts)
        finally:
            await session.close()
        if "q" not in o:
            print(text, end="")
        return 0
    if command in ("info", "map", "check"):
        o, rest = _parse(args, "f:r:hUq")
        if len(rest) != 1:
            raise ImgError("Expecting one image file name")
        session = Session(o["objects"])
        try:
            if command == "info":
                text = await info_cmd.info(session, rest[0], o.get("f"), _output(o),
                                           "backing-chain" in o, "U" in o, "image-opts" in o)
                code = 0
            elif command == "map":
                text = await info_cmd.map_image(session, rest[0], o.get("f"), _output(o),
                                                "U" in o, "image-opts" in o)
                code = 0
            else:
                text, code = await check_cmd.check(session, rest[0], o.get("f"), _output(o),
                                                   o.get("r"), "U" in o, "image-opts" in o)
        finally:
            await session.close()
        if "q" not in o or command != "check":
            print(text, end="")
        return code
    if command == "convert":
        o, rest = _parse(args, "f:O:o:cpnm:WUqS:B:")
        if len(rest) != 2:
            raise ImgError("Expecting one image file name and one output file name"
                           if len(rest) < 2 else "At most one filename argument is allowed.")
        out_fmt = o.get("O", "raw")
        opts = create_cmd.parse_opts(out_fmt, o.get("o", "")) if out_fmt in create_cmd.FORMATS \
            else {}
        session = Session(o["objects"])
        try:
            await convert_cmd.convert(
                session, rest[0], o.get("f"), rest[1], out_fmt, opts, compress="c" in o,
                parallel=int(o.get("m", 8)), out_of_order="W" in o, no_create="n" in o,
                progress="p" in o, image_opts="image-opts" in o, force_share="U" in o)
        finally:
            await session.close()
        return 0
    if command == "compare":
        o, rest = _parse(args, "f:F:psqU")
        if len(rest) != 2:
            raise ImgError("Expecting two image file names")
        session = Session(o["objects"])
        try:
            text, code = await convert_cmd.compare(session, rest[0], rest[1], o.get("f"),
                                                   o.get("F"), "s" in o, "U" in o)
        finally:
            await session.close()
        if "q" not in o:
            print(text, end="")
        return code
    if command == "resize":
        # A leading '-' in the size is a size, not an option.
        if args and args[-1].startswith("-") and args[-1][1:2].isdigit():
            args = args[:-1] + ["--", args[-1]]
        o, rest = _parse(args, "f:qU")
        if len(rest) != 2:
            raise ImgError("Expecting image file name and size")
        session = Session(o["objects"])
        try:
            text = await create_cmd.resize(session, rest[0], o.get("f"), rest[1],
                                           "shrink" in o, o.get("preallocation", "off"))
        finally:
            await session.close()
        if "q" not in o:
            print(text, end="")
        return 0
    raise ImgError(f"Command not found: {command}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 1
    if args[0] in ("-V", "--version"):
        from blockd import QEMU_VERSION

        print("blockd-img version %d.%d.%d (blockd)" % QEMU_VERSION)
        return 0
    runner: Callable[[Awaitable[int]], int] = asyncio.run
    try:
        return runner(_run(args[0], args[1:]))
    except ImgError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(exc.strerror or str(exc))


if __name__ == "__main__":
    sys.exit(main())
