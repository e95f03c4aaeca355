"""qcow2 writes: seeded mixes of writes, zero writes and discards checked with qemu-img.

Every operation goes through the driver on the qcow2 image and through
qemu-io on a raw twin; afterwards `qemu-img check` must find the image
clean and `qemu-img compare` equal to the twin.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from blockd.block.graph import BlockGraph
from blockd.block.node import WriteFlags
from harness import qemu_img_ok, qemu_io_ok, sh

MiB = 1 << 20
SIZE = 6 * MiB
BASE_CMDS = ["write -P 0xee 0 2M", "write -P 0xdd 4M 1M"]


def check_clean(image: str) -> dict:
    out = sh("qemu-img", "check", "--output=json", image)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    return report


async def open_qcow2(path: str, **opts) -> tuple[BlockGraph, object]:
    g = BlockGraph()
    node = await g.open_node({"driver": "qcow2", "node-name": "q",
                              "file": {"driver": "file", "filename": path}, **opts})
    return g, node


def cluster_size_of(opts: str) -> int:
    for part in opts.split(","):
        if part.startswith("cluster_size="):
            v = part.split("=")[1]
            return int(v[:-1]) << (20 if v.endswith("M") else 10) if v[-1] in "kM" else int(v)
    return 65536


def base_byte(off: int) -> int:
    if off < 2 * MiB:
        return 0xEE
    if 4 * MiB <= off < 5 * MiB:
        return 0xDD
    return 0


def ops_for(seed: int, size: int, n: int, cs: int) -> list[tuple[str, int, int, int]]:
    rnd = random.Random(seed)
    ops = []
    for i in range(n):
        kind = rnd.choice(["write", "write", "write", "zero", "zero-unmap", "discard"])
        if rnd.random() < 0.3:  # cluster aligned, several clusters
            off = rnd.randrange(0, size // cs) * cs
            length = min(size - off, cs * rnd.randint(1, 4))
        else:
            off = rnd.randrange(0, size - 1) // 512 * 512
            length = min(size - off, rnd.randint(1, 40) * 512)
        ops.append((kind, off, length, (i * 37 + 1) & 0xFF))
    return ops


def twin_commands(ops, cs: int, v2_backing: bool) -> list[str]:
    """qemu-io commands that give the raw twin what the qcow2 image should read."""
    cmds = []
    for kind, off, length, pat in ops:
        if kind == "write":
            cmds.append(f"write -P {pat} {off} {length}")
        elif kind.startswith("zero"):
            cmds.append(f"write -z {off} {length}")
        else:
            # Only whole clusters are discarded; they read as zeroes, or on a v2
            # image with a backing file as the backing file again.
            first, last = -(-off // cs) * cs, (off + length) // cs * cs
            if last <= first:
                continue
            if not v2_backing:
                cmds.append(f"write -z {first} {last - first}")
                continue
            pos = first
            while pos < last:
                b = base_byte(pos)
                end = pos + 512
                while end < last and base_byte(end) == b:
                    end += 512
                cmds.append(f"write -P {b} {pos} {end - pos}")
                pos = end
    return cmds


async def apply_ops(node, ops) -> None:
    for kind, off, length, pat in ops:
        if kind == "write":
            await node.write(off, bytes([pat]) * length)
        elif kind == "zero":
            await node.write_zeroes(off, length)
        elif kind == "zero-unmap":
            await node.write_zeroes(off, length, WriteFlags.MAY_UNMAP)
        else:
            await node.discard(off, length)


WRITE_VARIANTS = [
    ("cluster_size=64k", False), ("cluster_size=64k", True),
    ("cluster_size=512,refcount_bits=2", False), ("cluster_size=1k,refcount_bits=1", True),
    ("cluster_size=4k,refcount_bits=64", True), ("cluster_size=8k,refcount_bits=8", False),
    ("cluster_size=2M", False), ("cluster_size=128k,refcount_bits=32", True),
    ("extended_l2=on,cluster_size=32k", True), ("extended_l2=on,cluster_size=16k", False),
    ("extended_l2=on,cluster_size=64k,preallocation=metadata", True),
    ("compat=0.10,cluster_size=8k", False), ("compat=0.10,cluster_size=4k", True),
    ("lazy_refcounts=on", True), ("data_file=DATA", False), ("data_file=DATA", True),
    ("data_file=DATA,data_file_raw=on", False),
    ("data_file=DATA,extended_l2=on,cluster_size=32k", True), ("preallocation=metadata,cluster_size=4k", False),
    ("preallocation=falloc,cluster_size=16k", False), ("preallocation=full", False),
]


@pytest.mark.parametrize("opts,backing", WRITE_VARIANTS)
def test_seeded_mix_matches_raw_twin(tmp_path, opts, backing):
    cs = cluster_size_of(opts)
    img, twin = str(tmp_path / "a.qcow2"), str(tmp_path / "twin.raw")
    qemu_img_ok("create", "-q", "-f", "raw", twin, str(SIZE))
    create = ["create", "-q", "-f", "qcow2", "-o", opts.replace("DATA", str(tmp_path / "d.data"))]
    if backing:
        base = str(tmp_path / "base.raw")
        qemu_img_ok("create", "-q", "-f", "raw", base, str(SIZE))
        qemu_io_ok("raw", base, *BASE_CMDS)
        qemu_io_ok("raw", twin, *BASE_CMDS)
        create += ["-b", base, "-F", "raw"]
    qemu_img_ok(*create, img, str(SIZE))
    ops = ops_for(sum(map(ord, opts)) + backing, SIZE, 300, cs)

    async def body() -> None:
        g, node = await open_qcow2(img, discard="unmap")
        await apply_ops(node, ops)
        await g.close_all()

    asyncio.run(body())
    qemu_io_ok("raw", twin, *twin_commands(ops, cs, backing and "compat=0.10" in opts))
    check_clean(img)
    out = sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, twin)
    assert out.returncode == 0, out.stdout


def test_writes_over_compressed_clusters(tmp_path):
    src, img, twin = (str(tmp_path / n) for n in ("src.raw", "c.qcow2", "twin.raw"))
    qemu_img_ok("create", "-q", "-f", "raw", src, str(SIZE))
    qemu_io_ok("raw", src, "write -P 0x5a 0 3M", "write -P 0x6b 4M 1M")
    qemu_img_ok("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", src, img)
    qemu_img_ok("convert", "-O", "raw", src, twin)
    ops = ops_for(11, SIZE, 250, 4096)

    async def body() -> None:
        g, node = await open_qcow2(img, discard="unmap")
        await apply_ops(node, ops)
        await g.close_all()

    asyncio.run(body())
    qemu_io_ok("raw", twin, *twin_commands(ops, 4096, False))
    check_clean(img)
    assert sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, twin).returncode == 0


def test_compressed_writes_pass_check(tmp_path):
    img = str(tmp_path / "w.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "2M")
    rnd = random.Random(3)
    clusters = {}

    async def body() -> None:
        g, node = await open_qcow2(img)
        for i in range(200):
            c = rnd.randrange(512)
            data = bytes([rnd.randrange(4)]) * 1000 + bytes([i & 0xFF]) * 3096
            await node.write_compressed(c * 4096, data)
            clusters[c] = data
        for c, data in clusters.items():
            assert bytes(await node.read(c * 4096, 4096)) == data
        await g.close_all()

    asyncio.run(body())
    report = check_clean(img)
    assert report["compressed-clusters"] > 0
    raw = str(tmp_path / "w.raw")
    qemu_img_ok("convert", "-O", "raw", img, raw)
    with open(raw, "rb") as f:
        content = f.read()
    for c, data in clusters.items():
        assert content[c * 4096:(c + 1) * 4096] == data


def test_concurrent_writes_allocate_each_cluster_once(tmp_path):
    img = str(tmp_path / "p.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "4M")
    model = bytearray(4 * MiB)
    rnd = random.Random(5)
    ops = []
    for i in range(400):
        off = rnd.randrange(0, 4 * MiB // 512 - 16) * 512
        n = rnd.randint(1, 16) * 512
        ops.append((off, bytes([i & 0xFF or 1]) * n))

    async def body() -> None:
        g, node = await open_qcow2(img)
        # Non-overlapping batches run concurrently: each batch's result is defined.
        batch: list = []
        used: list[tuple[int, int]] = []
        for off, data in ops + [(None, None)]:
            clash = off is None or any(off < e and s < off + len(data) for s, e in used)
            if clash:
                await asyncio.gather(*(node.write(o, d) for o, d in batch))
                for o, d in batch:
                    model[o:o + len(d)] = d
                batch, used = [], []
            if off is not None:
                batch.append((off, data))
                used.append((off, off + len(data)))
        assert bytes(await node.read(0, 4 * MiB)) == model
        await g.close_all()

    asyncio.run(body())
    check_clean(img)


def test_new_cluster_counts_wait_for_their_l2_entries(tmp_path):
    """Eager refcounts: an allocating write raises the count in memory only, and the
    flush stores it before the L2 entry, so the file never has the entry without it."""
    img = str(tmp_path / "h.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", img, "8M")

    async def body() -> None:
        g, node = await open_qcow2(img)
        rc = node.image.refcounts
        await node.write(0, b"a" * 65536)
        await node.write(5 * 65536 + 100, b"b" * 1000)
        assert rc.held and node.map.pending
        # Before the flush the file has neither the counts nor the entries; after it, both.
        for flushed in (False, True):
            if flushed:
                await node.flush()
                assert not rc.held and not node.map.pending
            out = sh("qemu-img", "check", "-U", "--output=json", img)
            report = json.loads(out.stdout)
            assert report.get("corruptions", 0) == report.get("leaks", 0) == 0, out.stdout
        await node.write(65536, b"c" * 65536)
        await g.close_all()

    asyncio.run(body())
    check_clean(img)
    qemu_io_ok("qcow2", img, "read -P 0x61 0 64k", "read -P 0x63 64k 64k",
               "read -P 0x62 327780 1000")


def test_racing_writers_to_one_new_cluster_allocate_it_once(tmp_path):
    """Two whole-cluster writes to the same unallocated cluster, each looking it up
    before the other takes the lock: the second must look again, not allocate twice."""
    img = str(tmp_path / "r.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", img, "1M")

    async def body() -> None:
        g, node = await open_qcow2(img)
        lookup = node.map.lookup

        async def slow_lookup(*args):
            entry = await lookup(*args)
            await asyncio.sleep(0)  # the other writer runs before this one goes on
            return entry

        node.map.lookup = slow_lookup
        await asyncio.gather(node.write(0, b"a" * 65536), node.write(0, b"b" * 65536))
        node.map.lookup = lookup
        assert bytes(await node.read(0, 65536)) in (b"a" * 65536, b"b" * 65536)
        await g.close_all()

    asyncio.run(body())
    check_clean(img)


def test_model_of_thousands_of_ops(tmp_path):
    """An in-memory model follows 4000 operations; blockd and qemu-img agree with it."""
    size, cs = 4 * MiB, 4096
    img = str(tmp_path / "m.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs},extended_l2=off", img,
                str(size))
    model = bytearray(size)
    rnd = random.Random(1234)

    async def body() -> None:
        g, node = await open_qcow2(img, discard="unmap")
        for i in range(4000):
            off = rnd.randrange(0, size // 512) * 512
            length = min(size - off, rnd.randint(1, 24) * 512)
            r = rnd.random()
            if r < 0.5:
                data = bytes([rnd.randrange(256)]) * length
                await node.write(off, data)
                model[off:off + length] = data
            elif r < 0.7:
                flags = WriteFlags.MAY_UNMAP if rnd.random() < 0.5 else WriteFlags.NONE
                await node.write_zeroes(off, length, flags)
                model[off:off + length] = bytes(length)
            elif r < 0.8:
                await node.discard(off, length)
                first, last = -(-off // cs) * cs, (off + length) // cs * cs
                if last > first:
                    model[first:last] = bytes(last - first)
            elif r < 0.85:
                await node.flush()
            else:
                assert bytes(await node.read(off, length)) == model[off:off + length], i
        assert bytes(await node.read(0, size)) == model
        await g.close_all()

    asyncio.run(body())
    check_clean(img)
    raw = str(tmp_path / "m.raw")
    qemu_img_ok("convert", "-O", "raw", img, raw)
    with open(raw, "rb") as f:
        assert f.read() == model


@pytest.mark.parametrize("event", ["cluster_alloc_space", "write_aio"])
def test_failed_data_write_leaks_nothing(tmp_path, event):
    img = str(tmp_path / "f.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "1M")

    async def body() -> None:
        g = BlockGraph()
        node = await g.open_node({"driver": "qcow2", "node-name": "q", "file": {
            "driver": "blkdebug", "image": {"driver": "file", "filename": img},
            "inject-error": [{"event": event, "errno": 5, "once": True}]}})
        with pytest.raises(OSError):
            if event == "cluster_alloc_space":  # a partial write: zeroes around it
                await node.write(8192 + 100, b"x" * 100)
            else:
                await node.write(8192, b"x" * 4096)
        await node.write(16384, b"y" * 4096)
        assert bytes(await node.read(16384, 4096)) == b"y" * 4096
        await g.close_all()

    asyncio.run(body())
    check_clean(img)


EVENTS = ["l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
          "l2_load", "l2_update", "l2_alloc_write", "read_aio", "write_aio",
          "refblock_load", "refblock_update_part", "refblock_alloc", "refblock_alloc_write",
          "refblock_alloc_hookup", "refblock_alloc_switch_table", "cluster_alloc",
          "cluster_free", "cluster_alloc_space", "flush_to_os", "flush_to_disk"]


@pytest.mark.parametrize("once", [False, True])
@pytest.mark.parametrize("event", EVENTS)
def test_failure_at_each_metadata_step_never_corrupts(tmp_path, event, once):
    """An I/O error injected at any point may leak clusters but never corrupts the image."""
    img = str(tmp_path / "e.qcow2")
    # Tiny clusters and wide refcounts: blocks and the refcount table fill up quickly.
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, "64k")
    qemu_io_ok("qcow2", img, "write -P 0x11 0 4k")
    errors = []

    async def body() -> None:
        g = BlockGraph()
        node = await g.open_node({"driver": "qcow2", "node-name": "q", "discard": "unmap",
                                  "file": {"driver": "blkdebug", "image": {
                                      "driver": "file", "filename": img},
                                      "inject-error": [{"event": event, "errno": 5, "once": once}]}})
        steps = [lambda: node.write(100, b"a" * 700), lambda: node.write(8192, b"b" * 512),
                 lambda: node.discard(0, 1024), lambda: node.write_zeroes(2048, 1024),
                 lambda: node.flush(), lambda: node.read(0, 4096),
                 lambda: node.truncate(32 << 20), lambda: node.write(30 << 20, b"c" * 4096),
                 lambda: node.write(40000, b"d" * 9000),
                 lambda: node.write(1 << 20, b"e" * (2200 << 10))]
        for i, step in enumerate(steps):
            try:
                await step()
            except OSError as exc:
                errors.append((i, exc))
        await g.close_all()

    asyncio.run(body())
    out = sh("qemu-img", "check", "--output=json", img)
    report = json.loads(out.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
    assert errors or once, "the event never fired"
    failed = {i for i, _ in errors}
    if once and not failed & {6, 9}:  # the image grew and the last write worked
        qemu_io_ok("qcow2", img, "read -P 0x65 1M 2200k")
