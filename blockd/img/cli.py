"""``blockd-img``: qemu-img's command line (subcommands, getopt-style options, exit codes).

Each subcommand lives in its own module as ``async def run(args: Args) -> int``;
this module only parses options the way qemu-img's getopt_long does (GNU
permutation, qemu-img's wording for unknown and incomplete options) and maps
failures to ``blockd-img: ...`` on stderr with exit status 1.
"""

from __future__ import annotations

import asyncio
import getopt
import importlib
import os
import sys

from blockd.drivers import driver_names
from blockd.img.common import PROG, Args, ImgError, UsageError, fail

USAGE = f"""\
{PROG} version 7.2.0 (blockd)
usage: {PROG} [standard options] command [command options]
The same subcommands, options, output and exit codes as qemu-img, on blockd's drivers.

Command syntax:
  amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename
  bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap
  check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename
  commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename
  compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2
  convert [--object objectdef] [--image-opts] [--target-image-opts] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] filename [filename2 [...]] output_filename
  create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output
  info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [--picture=out.png|out.svg] [-U] filename
  measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]
  rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename
  snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename
  resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size

Supported formats: {' '.join(sorted(driver_names()))}
"""

#: subcommand -> (module, short options, long options); as qemu-img 7.2 accepts them.
COMMANDS: dict[str, tuple[str, str, list[str]]] = {
    "amend": ("amend", "ho:f:t:pq", ["help", "object=", "image-opts", "force"]),
    "bitmap": ("bitmap", "hb:f:F:g:", ["help", "object=", "image-opts", "add", "remove",
                                       "clear", "enable", "disable", "merge=", "granularity=",
                                       "source-file=", "source-format="]),
    "check": ("check", "hf:r:T:qU", ["help", "format=", "repair=", "object=", "image-opts",
                                      "force-share", "output="]),
    "commit": ("commit", "f:ht:b:dpqr:", ["help", "object=", "image-opts"]),
    "create": ("create", "F:b:f:ho:qu", ["help", "object="]),
    "info": ("info", "f:hU", ["help", "format=", "output=", "backing-chain", "object=",
                              "image-opts", "force-share"]),
    "map": ("map", "f:hU", ["help", "format=", "output=", "object=", "image-opts",
                            "force-share", "start-offset=", "max-length=", "picture="]),
    "compare": ("compare", "hf:F:T:pqsU", ["help", "object=", "image-opts", "force-share"]),
    "convert": ("convert", "hf:O:B:CcF:o:l:S:pt:T:qnm:Wr:U",
                ["help", "object=", "image-opts", "target-image-opts", "salvage",
                 "target-is-zero", "bitmaps", "skip-broken-bitmaps", "force-share",
                 "target-format="]),
    "rebase": ("rebase", "hf:F:b:upt:T:qU", ["help", "object=", "image-opts", "force-share"]),
    "resize": ("resize", "f:hq", ["help", "object=", "image-opts", "preallocation=", "shrink"]),
    "dd": ("dd", "hf:O:U", ["help", "image-opts", "object=", "force-share"]),
    "measure": ("measure", "hf:O:o:l:U", ["help", "image-opts", "object=", "output=", "size=",
                                          "force-share"]),
    "snapshot": ("snapshot", "la:c:d:hqU", ["help", "object=", "image-opts", "force-share"]),
}

#: Long spellings that mean the same as a short option.
_ALIASES = {"format": "f", "repair": "r", "force-share": "U", "granularity": "g",
            "source-file": "b", "source-format": "F"}


def valid_option_list(text: str) -> bool:
    """qemu-img's check of each ``-o``: not empty, no leading comma, and no lone comma at
    the end (an even run of them is escaped commas)."""
    trailing = len(text) - len(text.rstrip(","))
    return bool(text) and not text.startswith(",") and trailing % 2 == 0


def parse(args: list[str], short: str, long: list[str]) -> Args:
    """GNU getopt with qemu-img's error texts; repeatable ``--object`` and ``-o`` collected."""
    try:
        opts, rest = getopt.gnu_getopt(args, short, long)
    except getopt.GetoptError as exc:
        opt = ("-" if len(exc.opt) == 1 else "--") + exc.opt
        if "requires argument" in exc.msg:
            raise UsageError(f"missing argument for option '{opt}'") from None
        if "must not have an argument" in exc.msg:
            raise UsageError(f"option '{opt}' doesn't allow an argument") from None
        raise UsageError(f"unrecognized option '{opt}'") from None
    out = Args(rest=rest)
    for key, value in opts:
        key = key.lstrip("-")
        key = _ALIASES.get(key, key)
        out.seq.append((key, value))
        if key == "object":
            out.objects.append(value)
        elif key == "o":
            if not valid_option_list(value):
                raise ImgError(f"Invalid option list: {value}")
            out.o.append(value)
        else:
            out.opts[key] = value
    return out


async def _dispatch(command: str, argv: list[str]) -> int:
    if command not in COMMANDS:
        raise UsageError(f"Command not found: {command}")
    module, short, long = COMMANDS[command]
    if command == "resize" and argv and argv[-1].startswith("-") and argv[-1][1:2].isdigit() \
            and "--" not in argv:
        # A negative size is an operand, not an option.
        argv = argv[:-1] + ["--", argv[-1]]
    args = parse(argv, short, long)
    if args.has("h") or args.has("help"):
        print(USAGE, end="")
        return 0
    run = importlib.import_module(f"blockd.img.{module}").run
    return await run(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``blockd-img`` console script."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        return fail("Not enough arguments", usage=True)
    if args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    if args[0] in ("-V", "--version"):
        print(f"{PROG} version 7.2.0 (blockd)")
        return 0
    try:
        return asyncio.run(_dispatch(args[0], args[1:]))
    except UsageError as exc:
        return fail(str(exc), usage=True)
    except ImgError as exc:
        return fail(str(exc), newline=exc.newline)
    except OSError as exc:
        return fail(exc.strerror or str(exc))
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """The ``blockd-img`` command: :func:`main`, then exit without the interpreter's
    clean-up, a noticeable part of a short convert's run (every file is
    closed by then, and the output is flushed here)."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
