"""``check``: qemu-img's report, exit codes and repair flow over a driver's ``check``."""

from __future__ import annotations

import sys
from typing import Any

from blockd.img.common import ImgError, Session, json_pretty

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
        raise ImgError(f"Unknown option for -r (expecting 'leaks' or 'all'): {repair}")
    node = await session.open(filename, fmt, read_only=repair is None, force_share=force_share,
                              image_opts=image_opts)
    if not hasattr(node, "check"):
        print(f"blockd-img: This image format does not support checks", file=sys.stderr)
        return "", 63
    res = await node.check(FIX[repair] if repair else 0)
    for message in res.messages:
        print(message, file=sys.stderr)
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
