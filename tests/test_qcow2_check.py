"""qcow2 check and repair against qemu-img check on the same images."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
from typing import Any

import pytest

from blockd.block.graph import BlockGraph
from blockd.drivers.qcow2.check import FIX_ERRORS, FIX_LEAKS
from harness import blockd_img, sh


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


# ---- qemu-img check -r against blockd-img check -r on hand-broken images -------------

def _peek(img: str, offset: int, fmt: str) -> tuple:
    with open(img, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))


def _poke(img: str, offset: int, fmt: str, *values: int) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _layout(img: str) -> tuple[int, int, int]:
    """(cluster size, first refcount block offset, first L2 table offset) of a fresh image."""
    cluster_bits, = _peek(img, 20, ">I")
    l1_offset, reftable, = _peek(img, 40, ">Q")[0], _peek(img, 48, ">Q")[0]
    return 1 << cluster_bits, _peek(img, reftable, ">Q")[0], \
        _peek(img, l1_offset, ">Q")[0] & 0x00FFFFFFFFFFFE00


def _set_count(img: str, cluster: int, value: int) -> None:
    """A 16-bit refcount in the first refcount block."""
    _poke(img, _layout(img)[1] + 2 * cluster, ">H", value)


def _written(tmp_path, opts: str = "cluster_size=4k", size: str = "16M",
             writes: tuple[str, ...] = ("write -P 1 0 100k", "write -P 2 8M 64k")) -> str:
    img = str(tmp_path / "broken.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", "-o", opts, img, size)
    cmds = [a for w in writes for a in ("-c", w)]
    if cmds:
        sh("qemu-io", "-f", "qcow2", *cmds, img)
    return img


def _compressed(tmp_path) -> str:
    src, img = str(tmp_path / "src.raw"), str(tmp_path / "broken.qcow2")
    sh("qemu-img", "create", "-f", "raw", src, "1M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 9 0 512k", src)
    sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", src, img)
    return img


def _lazy_dirty(tmp_path) -> str:
    # qemu-io killed mid-session: dirty bit set, the new clusters' counts still zero.
    img = _written(tmp_path, "cluster_size=4k,lazy_refcounts=on", writes=())
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 5 0 256k", "-c", "sigraise 9", img)
    return img


def _refblock_count(value: int):
    def make(tmp_path) -> str:
        img = _written(tmp_path)
        _set_count(img, _layout(img)[1] // 4096, value)
        return img
    return make


def _header_count(value: int):
    def make(tmp_path) -> str:
        img = _written(tmp_path)
        _set_count(img, 0, value)
        return img
    return make


def _reftable_zeroed(tmp_path) -> str:
    img = _written(tmp_path)
    _poke(img, _peek(img, 48, ">Q")[0], ">Q", 0)
    return img


def _reftable_unaligned(tmp_path) -> str:
    img = _written(tmp_path)
    _poke(img, _peek(img, 48, ">Q")[0], ">Q", _layout(img)[1] + 512)
    return img


def _compressed_count(delta: int):
    def make(tmp_path) -> str:
        img = _compressed(tmp_path)
        last = os.path.getsize(img) // 4096 - 1  # holds compressed data only
        _set_count(img, last, 1 + delta)
        return img
    return make


def _l2_maps_refblock(tmp_path) -> str:
    img = _written(tmp_path)
    _, refblock, l2 = _layout(img)
    _poke(img, l2 + 8 * 30, ">Q", (1 << 63) | refblock)
    return img


def _extended_l2_misaligned(tmp_path) -> str:
    img = _written(tmp_path, "extended_l2=on", writes=("write -P 1 0 64k", "write -P 2 2M 128k"))
    _, _, l2 = _layout(img)
    data, = _peek(img, l2, ">Q")
    _poke(img, l2, ">Q", data + 0x200)  # a data cluster
    # A preallocated cluster (every subcluster reads as zeroes), misaligned too.
    _poke(img, l2 + 16 * 32, ">QQ", (data + 0x1200) | (1 << 63), 0xFFFFFFFF << 32)
    return img


def _rebuild_1bit(tmp_path) -> str:
    img = _written(tmp_path, "cluster_size=512,refcount_bits=1", "4M",
                   ("write -P 1 0 300k", "write -P 2 2M 300k"))
    reftable, clusters = _peek(img, 48, ">QI")
    _poke(img, reftable, f">{clusters * 64}Q", *[0] * (clusters * 64))
    return img


def _snapshots(tmp_path) -> str:
    img = _written(tmp_path, writes=("write -P 1 0 64k",))
    sh("qemu-img", "snapshot", "-c", "s1", img)
    sh("qemu-img", "snapshot", "-c", "s2", img)
    return img


def _snapshot_entry(img: str, index: int) -> int:
    """Offset of snapshot table entry ``index``."""
    nb, pos = _peek(img, 60, ">IQ")
    for _ in range(index):
        id_len, name_len = _peek(img, pos + 12, ">HH")
        extra, = _peek(img, pos + 36, ">I")
        pos += 40 + extra + id_len + name_len
        pos += -pos % 8
    return pos


def _snapshot_edit(index: int, offset: int, fmt: str, value: Any, add: bool = False):
    def make(tmp_path) -> str:
        img = _snapshots(tmp_path)
        pos = _snapshot_entry(img, index) + offset
        _poke(img, pos, fmt, value + (_peek(img, pos, fmt)[0] if add else 0))
        return img
    return make


def _snapshot_incomplete(tmp_path) -> str:
    """A v3 entry with 8 bytes of extra data instead of at least 16 (no disk size)."""
    img = _snapshots(tmp_path)
    pos = _snapshot_entry(img, 0)
    id_len, name_len = _peek(img, pos + 12, ">HH")
    extra, = _peek(img, pos + 36, ">I")
    with open(img, "r+b") as f:
        f.seek(pos)
        entry = bytearray(f.read(40 + extra + id_len + name_len))
        names = entry[40 + extra:]
        struct.pack_into(">I", entry, 36, 8)
        shrunk = bytes(entry[:48]) + bytes(names)
        rest_start = _snapshot_entry(img, 1)
        f.seek(rest_start)
        rest = f.read(_snapshot_entry(img, 2) - rest_start)
        f.seek(pos)
        f.write(shrunk + bytes(-len(shrunk) % 8) + rest)
    return img


def _too_many_snapshots(tmp_path) -> str:
    img = _snapshots(tmp_path)
    _poke(img, 60, ">I", 70000)
    return img


def _snapshot_count_max(tmp_path) -> str:
    """2^32 - 1 snapshots in a table of zeroes: QEMU's counters (C ints) wrap on repair."""
    img = _written(tmp_path, writes=("write -P 1 0 64k",))
    _poke(img, 60, ">IQ", 0xFFFFFFFF, 0x10000)
    return img


BROKEN = {
    "snapshot-count-max": _snapshot_count_max,
    "snapshot-extra-data-too-big": _snapshot_edit(1, 36, ">I", 2000),
    "snapshot-l1-unaligned": _snapshot_edit(0, 0, ">Q", 512, add=True),
    "snapshot-l1-too-big": _snapshot_edit(1, 8, ">I", 0x400001),
    "snapshot-incomplete": _snapshot_incomplete,
    "too-many-snapshots": _too_many_snapshots,
    "lazy-dirty": _lazy_dirty,
    "refblock-count-2": _refblock_count(2),
    "refblock-count-0": _refblock_count(0),
    "reftable-zeroed": _reftable_zeroed,
    "reftable-unaligned": _reftable_unaligned,
    "header-count-2": _header_count(2),
    "header-count-0": _header_count(0),
    "compressed-count-0": _compressed_count(-1),
    "compressed-count-3": _compressed_count(2),
    "l2-maps-refblock": _l2_maps_refblock,
    "extended-l2-misaligned": _extended_l2_misaligned,
    "rebuild-1-bit-refcounts": _rebuild_1bit,
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_check_and_repair_like_qemu_img(tmp_path, name):
    """Same stdout, stderr and exit status as qemu-img for check, --output=json, -r leaks
    and -r all; the repaired files are byte for byte qemu-img's."""

    broken = BROKEN[name](tmp_path)
    for run in (["check"], ["check", "--output=json"], ["check", "-r", "leaks"],
                ["check", "-r", "all"], ["check", "-r", "all", "--output=json"]):
        for tool in ("q", "b"):
            shutil.copy(broken, tmp_path / f"{tool}.qcow2")
        q = sh("qemu-img", *run, "q.qcow2", cwd=tmp_path)
        b = blockd_img(*run, "b.qcow2", cwd=tmp_path)
        assert b == (q.stdout.replace("q.qcow2", "b.qcow2"),
                     q.stderr.replace("qemu-img", "blockd-img"), q.returncode), run
        q_file = (tmp_path / "q.qcow2").read_bytes()
        assert (tmp_path / "b.qcow2").read_bytes() == q_file, run
