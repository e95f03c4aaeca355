"""The file driver on a disk file system: RWF_NOWAIT refusals, the worker pool, O_DIRECT.

Files live under /var/tmp (the machine's disk, not tmpfs), where buffered
writes take the worker-thread path.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from blockd.block.graph import BlockGraph
from blockd.block.node import WriteFlags
from blockd.drivers.workers import BUFFERED, DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIB = 1024


def _file(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return str(path)


async def _open(path: str, direct: bool = False):
    graph = BlockGraph()
    node = await graph.open_node({"driver": "file", "node-name": "f", "filename": path,
                                  "cache": {"direct": direct}})
    return graph, node


def test_nowait_refusal_is_remembered_per_direction(disk_dir):
    path = _file(disk_dir / "a.raw", 1 << 20)

    async def body():
        graph, node = await _open(path)
        assert not node.in_memory
        for i in range(20):
            await node.write(i * 4 * KIB, bytes([i]) * 4 * KIB)
        # At most one refusal of a write; reads still try the page cache.
        assert node.nowait_refused <= 1
        assert node.nowait_read
        assert node.nowait_write == (node.nowait_refused == 0)
        for i in range(20):
            assert bytes(await node.read(i * 4 * KIB, 4 * KIB)) == bytes([i]) * 4 * KIB
        await graph.blockdev_del("f")

    asyncio.run(body())


SCRIPT = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from blockd.block.graph import BlockGraph

async def body():
    graph = BlockGraph()
    node = await graph.open_node({"driver": "file", "node-name": "f", "filename": sys.argv[2]})
    await asyncio.gather(*(node.write(i * 4096, b"x" * 4096) for i in range(50)))
    for i in range(50):
        await node.write(i * 4096, b"y" * 4096)

asyncio.run(body())
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_at_most_one_failing_nowait_write_syscall(disk_dir):
    """Counted by strace, not by the driver: the kernel sees one refused RWF_NOWAIT write."""
    path = _file(disk_dir / "a.raw", 1 << 20)
    done = subprocess.run(["strace", "-f", "-qq", "-e", "trace=pwritev2", "-e",
                           "status=failed", "-o", str(disk_dir / "trace"),
                           sys.executable, "-c", SCRIPT, ROOT, path],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    refused = (disk_dir / "trace").read_text().count("EOPNOTSUPP")
    assert refused <= 1
    with open(path, "rb") as f:
        assert f.read(200 * KIB) == b"y" * 200 * KIB


def test_concurrent_adjacent_and_overlapping_writes_read_back(disk_dir):
    size = 1 << 20
    path = _file(disk_dir / "a.raw", size)
    with open(path, "rb") as f:
        expect = bytearray(f.read())

    async def body():
        graph, node = await _open(path)
        # A burst of adjacent writes of varied sizes, all queued at once.
        writes = []
        pos = 0
        for i in range(64):
            n = (i % 7 + 1) * 1000
            writes.append((pos, bytes([i + 1]) * n))
            pos += n
        await asyncio.gather(*(node.write(o, d) for o, d in writes))
        for o, d in writes:
            expect[o:o + len(d)] = d
        # Overlapping writes in order, each waited for: the last one wins.
        for i in range(16):
            o = 300 * KIB + i * 1536
            d = bytes([0xA0 + i]) * 4 * KIB
            await node.write(o, d)
            expect[o:o + len(d)] = d
        # A request that fails in the worker fails alone, in the middle of a burst.
        results = await asyncio.gather(
            *(node.write(600 * KIB + i * 4 * KIB, b"z" * 4 * KIB) for i in range(8)),
            node.write(1 << 62, b"bad"),
            *(node.write(700 * KIB + i * 4 * KIB, b"w" * 4 * KIB) for i in range(8)),
            return_exceptions=True)
        assert [type(r) for r in results] == [type(None)] * 8 + [OSError] + [type(None)] * 8
        expect[600 * KIB:632 * KIB] = b"z" * 32 * KIB
        expect[700 * KIB:732 * KIB] = b"w" * 32 * KIB
        assert bytes(await node.read(0, size)) == bytes(expect)
        await graph.blockdev_del("f")

    asyncio.run(body())
    with open(path, "rb") as f:
        assert f.read() == bytes(expect)


def test_fua_write_is_synced_before_it_completes(disk_dir):
    path = _file(disk_dir / "a.raw", 64 * KIB)

    async def body():
        graph, node = await _open(path)
        await node.write(0, b"a" * 4 * KIB)
        assert node.flushed_gen < node.write_gen  # a plain write leaves work for a flush
        await node.write(4 * KIB, b"b" * 4 * KIB, WriteFlags.FUA)
        assert node.flushed_gen == node.write_gen  # covered both writes
        await node.write(8 * KIB, b"c" * 4 * KIB)
        await node.flush()
        assert node.flushed_gen == node.write_gen
        await graph.blockdev_del("f")

    asyncio.run(body())
    with open(path, "rb") as f:
        assert f.read(12 * KIB) == b"a" * 4 * KIB + b"b" * 4 * KIB + b"c" * 4 * KIB


def test_direct_unaligned_concurrent_writes_lose_nothing(disk_dir):
    """Every 512-byte sector of 64 KiB written by its own concurrent request, with
    aligned writes mixed in: each request's read-modify-write must not undo another's."""
    size = 256 * KIB
    path = _file(disk_dir / "a.raw", size)
    with open(path, "rb") as f:
        expect = bytearray(f.read())

    async def body():
        graph, node = await _open(path, direct=True)
        assert node.direct
        writes = [(i * 512, bytes([i % 251 + 1]) * 512) for i in range(128)]
        writes += [(64 * KIB + i * 4 * KIB, bytes([0x80 + i]) * 4 * KIB) for i in range(8)]
        writes += [(70 * KIB + 100, b"\x55" * 9000)]  # unaligned, over the aligned ones
        for o, d in writes:
            expect[o:o + len(d)] = d
        # The unaligned write over aligned ones goes last so its bytes win either way.
        await asyncio.gather(*(node.write(o, d) for o, d in writes[:-1]))
        await node.write(*writes[-1])
        assert bytes(await node.read(0, size)) == bytes(expect)
        start = 70 * KIB + 99
        assert bytes(await node.read(start, 9002)) == bytes(expect[start:start + 9002])
        assert node.direct_writes == []
        await graph.blockdev_del("f")

    asyncio.run(body())
    with open(path, "rb") as f:
        assert f.read() == bytes(expect)


def test_device_requests_run_side_by_side():
    """Requests that wait for the device are not queued behind each other: sixteen that
    can only finish together all get a thread (a generous timeout, not a timing test)."""
    barrier = threading.Barrier(16, timeout=60)

    async def body():
        return await asyncio.gather(*(DEVICE.run(barrier.wait) for _ in range(16)))

    assert sorted(asyncio.run(body())) == list(range(16))


def test_pool_results_and_errors_per_request():
    def job(i: int) -> int:
        if i % 5 == 3:
            raise OSError(i, "failed")
        return i * i

    async def body():
        return await asyncio.gather(*(BUFFERED.run(job, i) for i in range(40)),
                                    return_exceptions=True)

    for i, r in enumerate(asyncio.run(body())):
        if i % 5 == 3:
            assert isinstance(r, OSError) and r.errno == i
        else:
            assert r == i * i


def test_direct_unaligned_write_larger_than_scratch_buffer(disk_dir):
    """An unaligned O_DIRECT write bigger than a worker's scratch buffer gets a
    mapping of its own, which is closed after the write (it once failed with
    BufferError, the write lost)."""
    size = 4 << 20
    path = _file(disk_dir / "a.raw", size)
    with open(path, "rb") as f:
        expect = bytearray(f.read())
    data = os.urandom((2 << 20) + 100)

    async def body():
        graph, node = await _open(path, direct=True)
        await node.write(50, data)
        assert bytes(await node.read(0, size)) == bytes(expect[:50]) + data + \
            bytes(expect[50 + len(data):])
        await graph.blockdev_del("f")

    asyncio.run(body())
    expect[50:50 + len(data)] = data
    with open(path, "rb") as f:
        assert f.read() == bytes(expect)


def test_direct_unaligned_write_past_eof_writes_zeroes_around_it(disk_dir):
    """The block an unaligned O_DIRECT write past the end of the file rewrites holds
    zeroes where the file had no bytes, whatever the worker's buffer held before."""
    size = 64 * KIB
    path = _file(disk_dir / "a.raw", size)
    with open(path, "rb") as f:
        expect = bytearray(f.read())

    async def body():
        graph, node = await _open(path, direct=True)
        # Run in this thread, so the write's buffer held the read's random bytes.
        assert node._direct_read(0, 4 * KIB) == bytes(expect[:4 * KIB])
        node._direct_write(64 * KIB + 50, b"\x77" * 10)
        await graph.blockdev_del("f")

    asyncio.run(body())
    expect += bytes(50) + b"\x77" * 10
    with open(path, "rb") as f:
        data = f.read()
    assert data[:len(expect)] == bytes(expect)
    assert data[len(expect):] == bytes(len(data) - len(expect))


FORK_SCRIPT = """
import asyncio, os, sys
sys.path.insert(0, sys.argv[1])
from blockd.drivers.workers import WorkerPool

pool = WorkerPool(1, 1)

async def twice(x):
    return await asyncio.wait_for(pool.run(lambda: x * 2), 60)

assert asyncio.run(twice(1)) == 2  # the parent's pool has a thread now
pid = os.fork()
if pid == 0:
    os._exit(0 if asyncio.run(twice(21)) == 42 else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_pool_works_in_a_forked_child():
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT, ROOT], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
