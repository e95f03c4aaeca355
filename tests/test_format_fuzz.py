"""Hostile images in every format blockd opens besides qcow2 and LUKS (which have their
own targeted fuzzing in test_hostile_images.py): random damage to headers and tables
gives the driver's errors only, never a traceback, a hang or unbounded memory."""

from __future__ import annotations

import asyncio
import random
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockd.block.graph import BlockGraph
from blockd.drivers import driver_names
from blockd.errors import QMPError
from harness import open_user, qemu_img, qemu_io_ok
from test_hostile_images import CASES, MEMORY_BOUND

MiB = 1 << 20
#: Seed images: (name, qemu-img create options, format).
SEEDS = [
    ("sparse.vmdk", ["-o", "subformat=monolithicSparse"], "vmdk"),
    ("stream.vmdk", ["-o", "subformat=streamOptimized"], "vmdk"),
    ("dynamic.vhd", ["-o", "subformat=dynamic"], "vpc"),
    ("dynamic.vdi", [], "vdi"),
    ("img.vhdx", [], "vhdx"),
    ("img.qed", [], "qed"),
    ("img.qcow", [], "qcow"),
    ("img.parallels", [], "parallels"),
]
OPENED = [seed for seed in SEEDS if seed[2] in driver_names()]
#: Values that break size and offset arithmetic.
NASTY = [0, 1, 2, 0x1FF, 0x200, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF,
         0x7FFF_FFFF_FFFF_FFFF, 1 << 40, 1 << 55]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """Each format's seed image with data in a few places, made by qemu-img and qemu-io
    (a stream-optimized vmdk takes its data by conversion)."""
    d = tmp_path_factory.mktemp("seeds")
    raw = d / "src.raw"
    qemu_img("create", "-q", "-f", "raw", str(raw), "4M")
    qemu_io_ok("raw", raw, "write -P 0x5a 0 100k", "write -P 0x33 1M 64k", "write -P 7 3M 4k")
    out = {}
    for name, opts, fmt in OPENED:
        path = d / name
        qemu_img("convert", "-q", "-f", "raw", "-O", fmt, *opts, str(raw), str(path))
        out[name] = path.read_bytes()
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Nasty values of both byte orders at random places, mostly in the first 64 KiB
    (headers, descriptors, tables), flipped bits, or a cut-off file."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not out:
            break
        kind = rng.random()
        head = min(len(out), 64 * 1024 if rng.random() < 0.8 else len(out))
        at = rng.randrange(head)
        if kind < 0.6:
            fmt = rng.choice(["<I", ">I", "<Q", ">Q", "<H", ">H"])
            size = struct.calcsize(fmt)
            value = rng.choice(NASTY) & ((1 << (8 * size)) - 1)
            if at + size <= len(out):
                struct.pack_into(fmt, out, at, value)
        elif kind < 0.9:
            out[at] ^= 1 << rng.randrange(8)
        else:
            del out[rng.randrange(len(out)):]
    return bytes(out)


async def _exercise(path: str, fmt: str, writable: bool) -> None:
    """Open, read everything (or write a little), ask block status, describe, close;
    only the driver's errors (QMPError on open, OSError on I/O) may escape."""
    g = BlockGraph()
    try:
        user = await open_user(g, {"driver": fmt, "node-name": "n", "read-only": not writable,
                                   "file": {"driver": "file", "filename": path}}, writable)
    except QMPError:
        await g.close_all()
        return
    node = user.node
    try:
        size = min(node.length(), 16 * MiB)
        for off in range(0, size, MiB):
            n = min(MiB, size - off)
            try:
                if writable:
                    await user.write(off, b"\xab" * min(n, 4096))
                else:
                    assert len(await user.read(off, n)) == n
            except OSError:
                pass
            try:
                assert (await user.block_status(off, n)).length > 0
            except OSError:
                pass
        node.format_specific()
        try:
            await user.flush()
        except OSError:
            pass
    finally:
        await g.close_all()


def _run(path: Path, fmt: str, writable: bool) -> None:
    tracemalloc.start()
    try:
        asyncio.run(asyncio.wait_for(_exercise(str(path), fmt, writable), 120))
        assert tracemalloc.get_traced_memory()[1] < MEMORY_BOUND
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name,fmt", [(n, f) for n, _, f in OPENED])
@settings(max_examples=max(CASES // 4, 1), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False), writable=st.booleans())
def test_hostile_image(seeds, tmp_path, name, fmt, rng, writable):
    path = tmp_path / name
    path.write_bytes(mutate(seeds[name], rng))
    _run(path, fmt, writable)
