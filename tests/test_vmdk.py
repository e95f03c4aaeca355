"""The vmdk driver against qemu-img/qemu-io: images either side made are read the same
by the other, info/map/check agree, and hostile headers fail cleanly."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from harness import ROOT, Daemon

from blockd.drivers.vmdk import probe

SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized"]
SIZE = "2560M"  # past 2 GiB: the split subformats get two extents
#: qemu-io writes at scattered offsets: small, across grains, across the 2 GiB split, zeroes.
WRITES = ["write -P 0x11 0 4k", "write -P 0x22 100M 70k", "write -P 0x33 2047M 2M",
          "write -z 1G 128k", "write -P 0x44 2500M 512", "write -z 2100M 64k"]
#: What streamOptimized takes: whole grains (64 KiB) in new places only.
STREAM_WRITES = ["write -P 0x11 0 64k", "write -P 0x22 100M 64k", "write -P 0x33 2047M 128k",
                 "write -P 0x44 2500M 64k"]


def blockd_img(*argv: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "blockd.img.cli", *argv], capture_output=True,
                          text=True, timeout=600, env=env, cwd=cwd)


def run(*argv: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=cwd)


def qemu_io(fmt: str, image: str, cmds: list[str]) -> subprocess.CompletedProcess:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    return run(*args, image)


def qemu_image(tmp, subformat: str, extra: str = "", writes: bool = True) -> str:
    img = str(tmp / f"{subformat}.vmdk")
    opts = f"subformat={subformat}" + (f",{extra}" if extra else "")
    r = run("qemu-img", "create", "-q", "-f", "vmdk", "-o", opts, img, SIZE)
    assert r.returncode == 0, r.stderr
    if writes:
        r = qemu_io("vmdk", img, STREAM_WRITES if subformat == "streamOptimized" else WRITES)
        assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
    return img


def same_output(*args: str) -> None:
    """qemu-img and blockd-img print the same and exit the same."""
    q = run("qemu-img", *args)
    b = blockd_img(*args)
    assert (b.returncode, b.stdout) == (q.returncode, q.stdout), b.stderr
    return q


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_qemu_images_read_identically(tmp_path, subformat):
    img = qemu_image(tmp_path, subformat)
    out = str(tmp_path / "out.raw")
    r = blockd_img("convert", "-f", "vmdk", "-O", "raw", img, out)
    assert r.returncode == 0, r.stderr
    r = run("qemu-img", "compare", "-f", "vmdk", "-F", "raw", img, out)
    assert r.returncode == 0, r.stdout + r.stderr
    same_output("info", "-f", "vmdk", "--output=json", img)
    same_output("info", "-f", "vmdk", img)
    same_output("map", "-f", "vmdk", "--output=json", img)
    same_output("map", "-f", "vmdk", img)
    same_output("check", "-f", "vmdk", img)


@pytest.mark.parametrize("extra", ["zeroed_grain=on", "adapter_type=lsilogic,hwversion=7"])
def test_zeroed_grains_and_options_read(tmp_path, extra):
    img = qemu_image(tmp_path, "monolithicSparse", extra)
    same_output("map", "-f", "vmdk", "--output=json", img)
    same_output("info", "-f", "vmdk", "--output=json", img)
    out = str(tmp_path / "out.raw")
    assert blockd_img("convert", "-f", "vmdk", "-O", "raw", img, out).returncode == 0
    assert run("qemu-img", "compare", "-f", "vmdk", "-F", "raw", img, out).returncode == 0


def _export(tmp, img: str):
    d = Daemon(str(tmp / "qmp.sock"))
    c = d.client()
    r = c.cmd("blockdev-add", driver="vmdk", **{"node-name": "n0"},
              file={"driver": "file", "filename": img})
    assert "return" in r, r
    c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp / "nbd.sock")}})
    r = c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "n0"}, writable=True)
    assert "return" in r, r
    return d, c, f"nbd+unix:///n0?socket={tmp}/nbd.sock"


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentFlat",
                                       "streamOptimized"])
def test_nbd_export_reads_like_qemu(tmp_path, subformat):
    img = qemu_image(tmp_path, subformat)
    d, c, url = _export(tmp_path, img)
    with d:
        r = run("qemu-img", "compare", "-f", "raw", "-F", "vmdk", "-U", url, img)
        assert r.returncode == 0, r.stdout + r.stderr
        r = qemu_io("raw", url, ["read -P 0x11 0 4k", "read -P 0x33 2047M 64k",
                                 "read -P 0 200M 64k"])
        assert "failed" not in r.stdout and "Pattern verification" not in r.stdout, r.stdout


@pytest.mark.parametrize("subformat,extra", [
    ("monolithicSparse", ""), ("monolithicSparse", "zeroed_grain=on"),
    ("monolithicFlat", ""), ("twoGbMaxExtentSparse", ""), ("twoGbMaxExtentFlat", "")])
def test_writes_through_nbd_read_back_by_qemu(tmp_path, subformat, extra):
    img = qemu_image(tmp_path, subformat, extra, writes=False)
    twin = str(tmp_path / "twin.raw")
    run("qemu-img", "create", "-q", "-f", "raw", twin, SIZE)
    d, c, url = _export(tmp_path, img)
    with d:
        r = qemu_io("raw", url, WRITES + ["write -P 0x55 2044M 8M", "write -z 0 128k",
                                          "write -P 0x66 100M 512"])
        assert "failed" not in r.stdout, r.stdout + r.stderr
    qemu_io("raw", twin, WRITES + ["write -P 0x55 2044M 8M", "write -z 0 128k",
                                   "write -P 0x66 100M 512"])
    r = run("qemu-img", "compare", "-f", "vmdk", "-F", "raw", img, twin)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("qemu-img", "check", "-f", "vmdk", img)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["create-type"] == subformat
