"""Dirty bitmaps: the bitmap itself, marking through exports, NBD's dirty-bitmap context."""

from __future__ import annotations

import subprocess

import pytest

from blockd.block.dirty_bitmap import DirtyBitmap
from harness import HAVE_QSD, Daemon


def test_marking_counting_and_extents():
    bm = DirtyBitmap("b", 1 << 20, 4096)
    bm.mark(0, 1)
    bm.mark(8192, 12288)       # granules 2..4
    bm.mark(65536, 65536 * 2)  # a whole-byte run
    assert bm.count() == (1 + 3 + 32) * 4096
    assert bm.extents(0, 16384) == [(4096, True), (4096, False), (8192, True)]
    bm.enabled = False
    bm.mark(500000, 4096)
    assert bm.count() == (1 + 3 + 32) * 4096
    other = DirtyBitmap("o", 1 << 20, 65536)
    other.merge_from(bm)
    assert other.extents(0, 1 << 20)[:2] == [(65536, True), (65536, True)] or \
        other.extents(0, 1 << 20)[0] == (3 * 65536, True)
    bm.clear()
    assert bm.count() == 0


def test_sha256_of_empty_bitmap_is_qemus():
    # 16 MiB at 64 KiB granularity: 256 bits, hashed as four 64-bit words.
    assert DirtyBitmap("b", 16 << 20, 65536).sha256() == \
        "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925"


def _session(tmp_path, qsd: bool) -> tuple[str, list[str]]:
    work = tmp_path / ("qsd" if qsd else "blockd")
    work.mkdir()
    img = str(work / "a.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", img, "16M"], check=True)
    nbd = str(work / "nbd.sock")
    with Daemon(str(work / "qmp.sock"),
                "--blockdev", f"driver=file,node-name=f0,filename={img}",
                "--blockdev", "driver=raw,node-name=r0,file=f0",
                "--nbd-server", f"addr.type=unix,addr.path={nbd}", qsd=qsd) as d:
        c = d.client()
        c.cmd("block-dirty-bitmap-add", node="r0", name="b0", granularity=4096)
        c.cmd("block-export-add", type="nbd", id="w", **{"node-name": "r0", "name": "w"},
              writable=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 1", "-c", "write 5M 70k",
                        "-c", "write -z 9M 8k", "-c", "discard 12M 4k",
                        f"nbd+unix:///w?socket={nbd}"], check=True, capture_output=True)
        sha = c.cmd("x-debug-block-dirty-bitmap-sha256", node="r0", name="b0")["return"]["sha256"]
        c.cmd("block-dirty-bitmap-disable", node="r0", name="b0")
        c.cmd("block-export-add", type="nbd", id="r", **{"node-name": "r0", "name": "r"},
              bitmaps=["b0"])
        busy = c.cmd("block-dirty-bitmap-clear", node="r0", name="b0")
        out = subprocess.run(["nbdinfo", "--map=qemu:dirty-bitmap:b0",
                              f"nbd+unix:///r?socket={nbd}"], capture_output=True, text=True)
        info = c.cmd("query-named-block-nodes", flat=True)["return"]
        bitmaps = [n for n in info if n["node-name"] == "r0"][0]["dirty-bitmaps"]
    return sha, [out.stdout, busy["error"]["desc"], bitmaps]


@pytest.mark.skipif(not HAVE_QSD, reason="qemu-storage-daemon not installed")
def test_writes_over_nbd_mark_like_qemu(tmp_path):
    expected = _session(tmp_path, qsd=True)
    actual = _session(tmp_path, qsd=False)
    assert actual == expected
    assert "dirty" in actual[1][0]


def test_incremental_backup_example_runs(tmp_path):
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "incremental_backup.py"),
                          str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["copied 327680 dirty bytes of 67108864",
                                       "Images are identical."]
