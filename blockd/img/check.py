"""``check``: qemu-img's report, exit codes and repair flow over a driver's ``check``.

A format node that can check itself has ``async check(fix: int)`` returning
a result with ImageCheck's counters (see blockd.drivers.qcow2.check); formats
without one get qemu-img's "does not support checks" and exit status 63.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import TYPE_CHECKING, Any

from blockd.img.common import (CACHE_MODES, PROG, Args, CacheMode, Session, UsageError,
                               cache_mode, json_pretty)

if TYPE_CHECKING:
    from blockd.block.node import BlockNode
    from blockd.drivers.qcow2.check import CheckResult

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


def _failed(res: CheckResult) -> str | None:
    """qemu-img's "Check failed" lines, when the check itself failed or met internal errors."""
    if res.error:
        failure = res.failure.format(prog=PROG)
        why = f"{PROG}: {failure}\n" if failure else ""
        return f"{why}{PROG}: Check failed: {os.strerror(res.error)}"
    if res.check_errors:
        return f"{PROG}: Check failed"
    return None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _run_check(node: BlockNode, fix: int) -> CheckResult:
    """The driver's check, its messages on stderr as they come (between corruption reports)."""
    return await node.check(fix, _say)


async def check(session: Session, filename: str, fmt: str | None, output: str,
                repair: str | None, force_share: bool,
                image_opts: bool, cache: CacheMode = CACHE_MODES["writeback"]
                ) -> tuple[str, int, str | None]:
    """The report, the exit status and the "Check failed" line to print after the report."""
    if repair is not None and repair not in FIX:
        raise UsageError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}")
    # Repairing opens even a corrupt-marked image read-write, as qemu-img check -r does.
    node = await session.open(filename, fmt, read_only=repair is None, force_share=force_share,
                              image_opts=image_opts, cache=cache,
                              extra={"x-check": True, "x-repair": repair is not None})
    try:
        res = await _run_check(node, FIX[repair] if repair else 0)
    except OSError as exc:
        if exc.errno != errno.ENOTSUP:
            raise
        # A format without checks, or one that checks but cannot repair (vdi).
        print(f"{PROG}: This image format does not support checks", file=sys.stderr)
        return "", 63, None
    prefix = ""
    if not res.error and (res.leaks_fixed or res.corruptions_fixed):
        prefix = ("The following inconsistencies were found and repaired:\n\n"
                  f"    {res.leaks_fixed} leaked clusters\n"
                  f"    {res.corruptions_fixed} corruptions\n\n"
                  "Double checking the fixed image now...\n")
        fixed = res.leaks_fixed, res.corruptions_fixed
        res = await _run_check(node, 0)
        res.leaks_fixed, res.corruptions_fixed = fixed  # the report keeps what was repaired
    if output == "json":
        prefix = ""
    text = "" if res.error else prefix + _report(res, filename, node.driver, output)
    failed = _failed(res)
    return text, 1 if failed else exit_code(res), failed


async def run(args: Args) -> int:
    """``check [-q] [-f fmt] [--output=ofmt] [-r leaks|all] [-U] filename``."""
    if len(args.rest) != 1:
        raise UsageError("Expecting one image file name")
    output = args.output()
    cache = cache_mode(args, "T")
    async with Session(args.objects) as session:
        text, code, failed = await check(session, args.rest[0], args.get("f"), output,
                                         args.get("r"), args.has("U"), args.has("image-opts"),
                                         cache)
    if not args.has("q"):
        print(text, end="")
    if failed:
        print(failed, file=sys.stderr)
    return code
