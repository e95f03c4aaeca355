"""The simple drivers in-process: file, raw (with windows), null-co; image locking against qemu-io."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from blockd.block.backend import Backend
from blockd.block.graph import BlockGraph
from blockd.block.node import Perm, Status, WriteFlags
from blockd.drivers import file as file_driver
from blockd.errors import QMPError
from harness import sh


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.raw"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    return str(path)


def test_file_read_write_roundtrip_with_qemu_io(image):
    assert sh("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", image).returncode == 0

    async def body():
        g = BlockGraph()
        node = await g.open_node({"driver": "file", "node-name": "f", "filename": image})
        assert node.length() == 4 << 20
        assert bytes(await node.read(0, 65536)) == b"\x11" * 65536
        assert bytes(await node.read(65536, 512)) == bytes(512)
        await node.write(1 << 20, b"\x22" * 8192, WriteFlags.FUA)
        await g.blockdev_del("f")

    run(body())
    assert sh("qemu-io", "-f", "raw", "-c", "read -P 0x22 1M 8k", image).returncode == 0


def test_block_status_holes_and_zeroing(image):
    async def body():
        g = BlockGraph()
        node = await g.open_node({"driver": "file", "node-name": "f", "filename": image,
                                  "discard": "unmap"})
        await node.write(0, b"\x33" * 65536)
        ext = await node.block_status(0, 4 << 20)
        assert ext.status & Status.DATA and ext.length == 65536
        ext = await node.block_status(65536, (4 << 20) - 65536)
        assert ext.status & Status.ZERO
        await node.write_zeroes(0, 4096, WriteFlags.MAY_UNMAP)
        assert bytes(await node.read(0, 4096)) == bytes(4096)
        await node.write_zeroes(4096, 4096)
        assert bytes(await node.read(0, 8192)) == bytes(8192)
        await node.discard(8192, 65536 - 8192)
        assert (await node.block_status(0, 65536)).status & Status.ZERO
        await g.blockdev_del("f")

    run(body())


def test_raw_window_and_errors(image):
    with open(image, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\x44" * 4096)

    async def body():
        g = BlockGraph()
        node = await g.open_node({"driver": "raw", "node-name": "r", "offset": 1 << 20,
                                  "size": 1 << 20,
                                  "file": {"driver": "file", "filename": image}})
        assert node.length() == 1 << 20
        assert bytes(await node.read(0, 4096)) == b"\x44" * 4096
        with pytest.raises(QMPError, match="has to be smaller or equal"):
            await g.open_node({"driver": "raw", "node-name": "r2", "offset": 4 << 20,
                               "size": 4096, "file": {"driver": "file", "filename": image,
                                                      "read-only": True}})
        # The failed open left no node behind.
        assert len(g.nodes) == 2 and "r" in g.nodes

    run(body())


def test_null_co_reads_zeroes_and_drops_writes():
    async def body():
        g = BlockGraph()
        node = await g.open_node({"driver": "null-co", "node-name": "n", "size": 1 << 20,
                                  "read-zeroes": True})
        await node.write(0, b"x" * 512)
        assert bytes(await node.read(0, 512)) == bytes(512)
        assert (await node.block_status(0, 1 << 20)).status & Status.ZERO
        assert node.filename() == 'json:{"read-zeroes": true, "driver": "null-co", "size": 1048576}'
        plain = await g.open_node({"driver": "null-co", "node-name": "p", "latency-ns": 10})
        assert plain.filename() == "null-co://"

    run(body())


def test_missing_file_and_directory_errors(tmp_path):
    async def body():
        g = BlockGraph()
        with pytest.raises(QMPError) as err:
            await g.open_node({"driver": "file", "node-name": "f",
                               "filename": str(tmp_path / "nope")})
        assert err.value.desc == f"Could not open '{tmp_path}/nope': No such file or directory"
        with pytest.raises(QMPError, match="is not a file|Is a directory"):
            await g.open_node({"driver": "file", "node-name": "f", "filename": str(tmp_path)})

    run(body())


def test_locks_exclude_qemu_io_until_released(image):
    """A writer that shares nothing keeps qemu-io out; releasing it lets qemu-io in."""
    async def body():
        g = BlockGraph()
        node = await g.open_node({"driver": "file", "node-name": "f", "filename": image})
        user = Backend(g, node, "an unnamed block device",
                       Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ)
        out = sh("qemu-io", "-f", "raw", "-c", "read 0 4k", image)
        assert out.returncode != 0
        assert 'Failed to get "write" lock' in out.stderr or \
            'Failed to get shared "write" lock' in out.stderr
        user.close()
        assert sh("qemu-io", "-f", "raw", "-c", "write 0 4k", image).returncode == 0
        await g.blockdev_del("f")

    run(body())


def test_lock_held_by_qemu_refuses_blockd(image):
    """qemu-io holding the image for writing makes a blockd writer fail with QEMU's text."""
    proc = subprocess.Popen(["qemu-io", "-f", "raw", image], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("write 0 512\n")
        proc.stdin.flush()
        proc.stdout.readline()

        async def body():
            g = BlockGraph()
            node = await g.open_node({"driver": "file", "node-name": "f", "filename": image})
            with pytest.raises(QMPError) as err:
                Backend(g, node, "an unnamed block device",
                        Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ)
            assert "lock" in err.value.desc
            await g.blockdev_del("f")

        run(body())
    finally:
        proc.stdin.close()
        proc.wait()


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_file_create(tmp_path, prealloc):
    path = str(tmp_path / "new.raw")
    run(file_driver.create(BlockGraph(), {"driver": "file", "filename": path,
                                          "size": 3 << 20, "preallocation": prealloc}))
    st = os.stat(path)
    assert st.st_size == 3 << 20
    if prealloc != "off":
        assert st.st_blocks * 512 >= 3 << 20


def test_truncate_grows_and_shrinks(image):
    async def body():
        g = BlockGraph()
        node = await g.open_node({"driver": "file", "node-name": "f", "filename": image})
        await node.truncate(8 << 20)
        assert node.length() == os.path.getsize(image) == 8 << 20
        await node.truncate(1 << 20)
        assert os.path.getsize(image) == 1 << 20
        await g.blockdev_del("f")

    run(body())
