"""qcow2 check and repair against qemu-img check on the same images."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess

import pytest

from blockd.block.graph import BlockGraph
from blockd.drivers.qcow2.check import FIX_ERRORS, FIX_LEAKS


def sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def qemu_check(img: str) -> tuple[dict, str]:
    out = sh("qemu-img", "check", "--output=json", img)
    report = json.loads(out.stdout)
    report.pop("filename")
    report.pop("format")
    return report, out.stderr


def ours(img: str, fix: int = 0):
    async def body():
        g = BlockGraph()
        node = await g.open_node({"driver": "qcow2", "node-name": "q", "read-only": fix == 0,
                                  "file": {"driver": "file", "filename": img}})
        res = await node.check(fix)
        await g.close_all()
        return res
    return asyncio.run(body())


@pytest.fixture
def busy_image(tmp_path):
    img = str(tmp_path / "k.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k", img, "16M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 100k", "-c", "write -P 2 8M 64k", img)
    sh("qemu-img", "snapshot", "-c", "s1", img)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 3 4k 8k", "-c", "write -z 8M 4k", img)
    return img


@pytest.mark.parametrize("opts", ["cluster_size=64k", "cluster_size=512,refcount_bits=1",
                                  "extended_l2=on", "compat=0.10", "preallocation=metadata"])
def test_clean_images_same_numbers(tmp_path, opts):
    img = str(tmp_path / "a.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", "-o", opts, img, "8M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 300k", "-c", "write -P 8 5M 1M", img)
    assert ours(img).as_dict() == qemu_check(img)[0]


def test_snapshots_and_compressed_same_numbers(tmp_path, busy_image):
    assert ours(busy_image).as_dict() == qemu_check(busy_image)[0]
    src, dst = str(tmp_path / "s.raw"), str(tmp_path / "c.qcow2")
    sh("qemu-img", "create", "-f", "raw", src, "1M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 9 0 512k", src)
    sh("qemu-img", "convert", "-c", "-O", "qcow2", src, dst)
    assert ours(dst).as_dict() == qemu_check(dst)[0]


def _refblock_set(img: str, cluster: int, value: int, cs: int = 4096) -> None:
    """Write a 16-bit refcount straight into the first refcount block (cluster 2)."""
    with open(img, "r+b") as f:
        f.seek(2 * cs + 2 * cluster)
        f.write(struct.pack(">H", value))


def test_leaks_reported_and_repaired(busy_image):
    size = sh("stat", "-c", "%s", busy_image).stdout.strip()
    end = int(size) // 4096 + 1
    _refblock_set(busy_image, end, 1)
    _refblock_set(busy_image, end + 1, 1)
    with open(busy_image, "r+b") as f:  # counts past the end of the file are not compared
        f.truncate((end + 2) * 4096)
    expected, stderr = qemu_check(busy_image)
    res = ours(busy_image)
    assert res.as_dict() == expected and expected["leaks"] == 2
    assert [m for m in res.messages] == [l for l in stderr.splitlines() if l.startswith("Leaked")]
    fixed = ours(busy_image, FIX_LEAKS)
    assert fixed.leaks_fixed == 2
    report, _ = qemu_check(busy_image)
    assert "leaks" not in report and "corruptions" not in report


def test_corruption_reported_and_repaired(busy_image):
    # Cluster 3 holds the L1 table (refcount 1); claim 0 users of a data cluster instead:
    # lower the count of a data cluster shared with the snapshot from 2 to 1.
    res = ours(busy_image)
    assert not res.corruptions
    with open(busy_image, "rb") as f:
        f.seek(2 * 4096)
        counts = struct.unpack(">2048H", f.read(4096))
    shared = next(i for i, c in enumerate(counts) if c == 2)
    _refblock_set(busy_image, shared, 1)
    expected, _ = qemu_check(busy_image)
    assert ours(busy_image).as_dict() == expected and expected["corruptions"] >= 1
    ours(busy_image, FIX_LEAKS | FIX_ERRORS)
    report, _ = qemu_check(busy_image)
    assert "corruptions" not in report and "leaks" not in report


def test_dirty_lazy_refcount_image_is_repaired_on_open(tmp_path):
    img = str(tmp_path / "d.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "4M")
    # qemu-io killed mid-session leaves the dirty bit and unwritten refcounts.
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 5 0 256k", "-c", "sigraise 9", img)
    assert json.loads(sh("qemu-img", "info", "--output=json", "-U", img).stdout)["dirty-flag"]

    async def body():
        g = BlockGraph()
        node = await g.open_node({"driver": "qcow2", "node-name": "q",
                                  "file": {"driver": "file", "filename": img}})
        assert not node.is_dirty()
        assert bytes(await node.read(0, 4096)) == b"\x05" * 4096
        await g.close_all()

    asyncio.run(body())
    report, _ = qemu_check(img)
    assert "leaks" not in report and "corruptions" not in report
    assert not json.loads(sh("qemu-img", "info", "--output=json", img).stdout)["dirty-flag"]
