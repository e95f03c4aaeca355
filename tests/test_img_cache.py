"""qemu-img's cache modes (``-t``/``-T``): refused with its words when unknown, and
turned into the open flags and flushes each mode means."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import blockd_img, qemu_img, qemu_io_ok, same

ROOT = Path(__file__).resolve().parent.parent

BAD = [
    ("check", "-T"), ("convert", "-t"), ("convert", "-T"), ("commit", "-t"),
    ("amend", "-t"), ("compare", "-T"), ("rebase", "-t"), ("rebase", "-T"),
]


def _argv(sub: str, flag: str) -> list[str]:
    extra = {"convert": ["-O", "raw", "a.qcow2", "out.raw"], "amend": ["-o", "compat=1.1",
             "a.qcow2"], "compare": ["a.qcow2", "a.qcow2"], "rebase": ["-u", "-b", "",
             "a.qcow2"]}.get(sub, ["a.qcow2"])
    return [sub, flag, "bogus", *extra]


@pytest.mark.parametrize("sub,flag", BAD)
def test_unknown_cache_mode_is_refused_as_qemu_img_does(tmp_path, sub, flag):
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M")
    out, err, code = same(tmp_path, *_argv(sub, flag))
    assert code in (1, 2) and "cache option: bogus" in err


def _traced_opens(cwd: Path, *args: str) -> str:
    """The ``openat`` calls of a blockd-img run (strace), to see the flags it used."""
    log = cwd / "strace.log"
    subprocess.run(["strace", "-f", "-e", "trace=openat", "-o", str(log),
                    sys.executable, "-m", "blockd.img.cli", *args],
                   cwd=ROOT, check=True, capture_output=True)
    return log.read_text()


MODES = {  # mode: flags the target's file must be opened with, and without
    "none": ({"O_DIRECT"}, {"O_DSYNC"}),
    "directsync": ({"O_DIRECT", "O_DSYNC"}, set()),
    "writethrough": ({"O_DSYNC"}, {"O_DIRECT"}),
    "writeback": (set(), {"O_DIRECT", "O_DSYNC"}),
    "unsafe": (set(), {"O_DIRECT", "O_DSYNC"}),
}


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("mode", sorted(MODES))
def test_convert_target_cache_mode_on_disk(disk_dir, mode):
    """Each mode opens the target as it says and gives the same image as qemu-img
    (2 MiB and more per request: the O_DIRECT path's own buffers)."""
    src = disk_dir / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "16M")
    qemu_io_ok("qcow2", src, "write -P 7 0 3M", "write -P 9 5M 100k", "write -z 8M 1M")
    out = disk_dir / f"out-{mode}.qcow2"
    log = _traced_opens(disk_dir, "convert", "-t", mode, "-T", "none", "-O", "qcow2",
                        str(src), str(out))
    opens = [line for line in log.splitlines() if str(out) in line and "O_RDWR" in line
             and "O_CREAT" not in line]
    want, unwanted = MODES[mode]
    line = opens[-1]  # creating the image opened it before, as qemu-img does, uncached
    assert all(flag in line for flag in want), line
    assert not any(flag in line for flag in unwanted), line
    assert any("O_DIRECT" in line for line in log.splitlines() if str(src) in line)
    assert qemu_img("compare", str(src), str(out)).returncode == 0
    assert qemu_img("check", "-q", str(out)).returncode == 0


def test_source_cache_none_on_check_and_compare(disk_dir):
    src = disk_dir / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "4M")
    qemu_io_ok("qcow2", src, "write -P 3 1000 3M")
    for args in (["check", "-T", "none", "a.qcow2"],
                 ["compare", "-T", "directsync", "a.qcow2", "a.qcow2"],
                 ["check", "-T", "unsafe", "a.qcow2"]):
        q = qemu_img(*args, cwd=disk_dir)
        assert blockd_img(*args, cwd=disk_dir) == (q.stdout, q.stderr, q.returncode)
