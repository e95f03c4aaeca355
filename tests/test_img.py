"""blockd-img against qemu-img: same output, exit codes and resulting files."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def blockd_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockd.img.cli", *args],
                          capture_output=True, text=True)


def both(*args: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    return qemu_img(*args), blockd_img(*args)


@pytest.fixture
def images(tmp_path):
    q = str(tmp_path / "a.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", q, "64M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 100k", "-c",
                    "write -z 1M 64k", "-c", "write -P 0x22 5M 64k", q], capture_output=True)
    b = str(tmp_path / "b.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", q, "-F", "qcow2", b)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 4k 4k", b], capture_output=True)
    r = str(tmp_path / "c.raw")
    qemu_img("create", "-f", "raw", r, "8M")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x44 1M 64k", r], capture_output=True)
    return q, b, r


@pytest.mark.parametrize("cmd", [
    ["info"], ["info", "--output=json"], ["info", "--backing-chain"],
    ["info", "--output=json", "--backing-chain"], ["map"], ["map", "--output=json"], ["check"],
    ["check", "--output=json"],
])
def test_outputs_match(images, cmd):
    for img in images:
        q, b = both(*cmd, img)
        if cmd[0] == "check" and img.endswith(".raw"):
            assert b.returncode == q.returncode == 63
            continue
        assert (b.stdout, b.returncode) == (q.stdout, q.returncode), img


@pytest.mark.parametrize("opts", ["", "cluster_size=4k", "compat=0.10", "lazy_refcounts=on,refcount_bits=8",
                                  "extended_l2=on", "preallocation=metadata"])
def test_create_matches(tmp_path, opts):
    args = ["-f", "qcow2"] + (["-o", opts] if opts else [])
    q = qemu_img("create", *args, str(tmp_path / "q.qcow2"), "32M")
    b = blockd_img("create", *args, str(tmp_path / "b.qcow2"), "32M")
    assert b.stdout.replace("b.qcow2", "q.qcow2") == q.stdout and b.returncode == 0
    assert qemu_img("check", str(tmp_path / "b.qcow2")).returncode == 0
    qi = json.loads(qemu_img("info", "--output=json", str(tmp_path / "q.qcow2")).stdout)
    bi = json.loads(qemu_img("info", "--output=json", str(tmp_path / "b.qcow2")).stdout)
    assert qi["format-specific"] == bi["format-specific"]
    assert qi["virtual-size"] == bi["virtual-size"] and qi["cluster-size"] == bi["cluster-size"]


def test_create_with_backing_and_raw(tmp_path, images):
    q, _, _ = images
    out = blockd_img("create", "-f", "qcow2", "-b", q, "-F", "qcow2", str(tmp_path / "n.qcow2"))
    assert out.returncode == 0 and f"backing_file={q} backing_fmt=qcow2" in out.stdout
    info = json.loads(qemu_img("info", "--output=json", str(tmp_path / "n.qcow2")).stdout)
    assert info["backing-filename"] == q and info["virtual-size"] == 64 << 20
    q1, b1 = both("create", "-f", "raw", str(tmp_path / "r.raw"), "1G")
    assert b1.stdout == q1.stdout


@pytest.mark.parametrize("flags", [[], ["-c"], ["-c", "-W"], ["-m", "1"]])
def test_convert_produces_equal_clean_images(tmp_path, images, flags):
    _, b, _ = images
    out = str(tmp_path / "out.qcow2")
    res = blockd_img("convert", *flags, "-O", "qcow2", b, out)
    assert res.returncode == 0, res.stderr
    assert qemu_img("compare", b, out).returncode == 0
    assert qemu_img("check", out).returncode == 0
    raw = str(tmp_path / "out.raw")
    assert blockd_img("convert", "-O", "raw", out, raw).returncode == 0
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", b, raw).returncode == 0


def test_compare_messages_and_codes(tmp_path, images):
    q, b, r = images
    for pair in [(q, q), (q, b), (b, r)]:
        qq, bb = both("compare", *pair)
        assert (bb.stdout, bb.returncode) == (qq.stdout, qq.returncode), pair


def test_check_leaks_repair(tmp_path, images):
    q, _, _ = images
    size = os.path.getsize(q)
    end = size // 4096 + 1
    with open(q, "r+b") as f:
        f.seek(2 * 4096 + 2 * end)
        f.write(struct.pack(">H", 1))
        f.truncate((end + 1) * 4096)
    qq, bb = both("check", q)
    assert (bb.stdout, bb.returncode) == (qq.stdout, qq.returncode) and bb.returncode == 3
    fixed = blockd_img("check", "-r", "leaks", q)
    assert fixed.returncode == 0 and "1 leaked clusters" in fixed.stdout
    assert qemu_img("check", q).returncode == 0


def test_resize(tmp_path, images):
    q, _, r = images
    assert blockd_img("resize", q, "+64M").stdout == "Image resized.\n"
    assert json.loads(qemu_img("info", "--output=json", q).stdout)["virtual-size"] == 128 << 20
    assert blockd_img("resize", q, "-8M").returncode == 1
    assert blockd_img("resize", "--shrink", q, "-8M").returncode == 0
    assert blockd_img("resize", "-f", "raw", r, "16M").returncode == 0
    assert os.path.getsize(r) == 16 << 20
    assert qemu_img("check", q).returncode == 0
