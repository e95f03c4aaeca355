"""``check``: qemu-img's report, exit codes and repair flow over a driver's ``check``.

A format node that can check itself has ``async check(fix: int)`` returning
a result with ImageCheck's counters (see blockd.drivers.qcow2.check); formats
without one get qemu-img's "does not support checks" and exit status 63.
"""

from __future__ import annotations

import sys
from typing import Any

from blockd.img.common import PROG, Args, ImgError, Session, UsageError, json_pretty

FIX = {"leaks": 1, "all": 3}


def _report(res: Any, filename: str, fmt: str, output: str) -> str:
    d = res.as_dict()
    if output == "json":
        return json_pretty({"filename": filename, "format": fmt, **d}) + "\n"
    lines = []
    if not (res.corruptions or res.leaks or res.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if res.corruptions:
            lines += ["", f"{res.corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if res.leaks:
            lines += ["", f"{res.leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if res.check_errors:
            lines += ["", f"{res.check_errors} internal errors have occurred during the check."]
    if res.total_clusters and res.allocated_clusters:
        t, a = res.total_clusters, res.allocated_clusters
        lines.append(f"{a}/{t} = {a * 100 / t:0.2f}% allocated, "
                     f"{res.fragmented_clusters * 100 / a:0.2f}% fragmented, "
                     f"{res.compressed_clusters * 100 / a:0.2f}% compressed clusters")
    if res.image_end_offset:
        lines.append(f"Image end offset: {res.image_end_offset}")
    return "\n".join(lines) + "\n"


def exit_code(res: Any) -> int:
    if res.check_errors:
        return 1
    if res.corruptions:
        return 2
    if res.leaks:
        return 3
    return 0


async def check(session: Session, filename: str, fmt: str | None, output: str,
                repair: str | None, force_share: bool, image_opts: bool) -> tuple[str, int]:
    if repair is not None and repair not in FIX:
        raise UsageError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}")
    # Repairing opens even a corrupt-marked image read-write, as qemu-img check -r does.
    node = await session.open(filename, fmt, read_only=repair is None, force_share=force_share,
                              image_opts=image_opts,
                              extra={"x-repair": True} if repair is not None else None)
    if not hasattr(node, "check") or repair is not None and not getattr(node, "can_repair", True):
        print(f"{PROG}: This image format does not support checks", file=sys.stderr)
        return "", 63
    res = await node.check(FIX[repair] if repair else 0)
    for message in res.messages:
        print(message, file=sys.stderr)
    if getattr(res, "failure", None):  # the driver's check stopped with an error
        raise ImgError(f"Check failed: {res.failure}")
    prefix = ""
    if res.leaks_fixed or res.corruptions_fixed:
        prefix = ("The following inconsistencies were found and repaired:\n\n"
                  f"    {res.leaks_fixed} leaked clusters\n"
                  f"    {res.corruptions_fixed} corruptions\n\n"
                  "Double checking the fixed image now...\n")
        res = await node.check(0)
        for message in res.messages:
            print(message, file=sys.stderr)
    if output == "json":
        prefix = ""
    return prefix + _report(res, filename, node.driver, output), exit_code(res)


async def run(args: Args) -> int:
    """``check [-q] [-f fmt] [--output=ofmt] [-r leaks|all] [-U] filename``."""
    if len(args.rest) != 1:
        raise UsageError("Expecting one image file name")
    output = args.output()
    async with Session(args.objects) as session:
        text, code = await check(session, args.rest[0], args.get("f"), output, args.get("r"),
                                 args.has("U"), args.has("image-opts"))
    if not args.has("q"):
        print(text, end="")
    return code
