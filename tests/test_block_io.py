"""The request path of every edge (blockd/block/io.py).

Dirty bitmaps on every node of a chain count the bytes qemu-storage-daemon
counts after the same writes through exports at different levels; a write
without the write permission is refused; an unaligned write to a child with
a larger request alignment is padded (and concurrent ones serialised);
a drained section waits for requests in flight and holds new ones.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess

import pytest

from blockd.block import io
from blockd.block.backend import Backend
from blockd.block.graph import BlockGraph
from blockd.block.node import Perm
from harness import HAVE_QSD, Daemon, open_user, qemu_tool

GRANULE = 65536


def _images(d: str) -> None:
    for name, fmt, extra in (("disk.raw", "raw", []), ("back.qcow2", "qcow2", []),
                             ("top.qcow2", "qcow2", ["-b", "back.qcow2", "-F", "qcow2"])):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *extra, os.path.join(d, name),
                        "4M"], check=True, cwd=d)


def _nodes(d: str) -> list[dict]:
    def file(name: str, path: str) -> dict:
        return {"driver": "file", "node-name": name, "filename": os.path.join(d, path)}
    return [file("f-raw", "disk.raw"), {"driver": "raw", "node-name": "raw0", "file": "f-raw"},
            file("f-back", "back.qcow2"),
            {"driver": "qcow2", "node-name": "back", "file": "f-back", "backing": None},
            file("f-top", "top.qcow2"),
            {"driver": "qcow2", "node-name": "top", "file": "f-top", "backing": "back"}]


#: (export, qemu-io command): writes entering the graph at different levels.
WRITES = [("raw0", "write -P 1 0 4k"), ("raw0", "write -P 2 1048676 100"),
          ("f-raw", "write -P 3 2M 4k"), ("raw0", "write -z 3M 64k"),
          ("top", "write -P 4 0 4k"), ("top", "write -P 5 1M 130k"),
          ("back", "write -P 6 3M 4k")]


def _counts(tmp_path, qsd: bool, bitmaps: dict[str, list[str]], images=_images, nodes=_nodes,
            writes=None) -> dict[str, dict[str, int]]:
    """Dirty bitmap counts after ``writes`` (default :data:`WRITES`) through exports of the
    graph ``nodes(d)`` over the files ``images(d)`` made."""
    writes = WRITES if writes is None else writes
    d = str(tmp_path / ("qsd" if qsd else "blockd"))
    os.mkdir(d)
    images(d)
    sock = os.path.join(d, "nbd.sock")
    with Daemon(os.path.join(d, "qmp.sock"), qsd=qsd) as daemon:
        c = daemon.client()
        for opts in nodes(d):
            assert c.cmd("blockdev-add", **opts) == {"return": {}}
        for node, names in bitmaps.items():
            for name in names:
                r = c.cmd("block-dirty-bitmap-add", node=node, name=name, granularity=GRANULE)
                assert r == {"return": {}}, r
        c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        for export in sorted({e for e, _ in writes}):
            r = c.cmd("block-export-add", type="nbd", id=export, **{"node-name": export},
                      writable=True)
            assert r == {"return": {}}, (export, r)
        for export, command in writes:
            r = qemu_tool("qemu-io", "-f", "raw", "-c", command,
                          f"nbd+unix:///{export}?socket={sock}")
            assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
        nodes = c.cmd("query-named-block-nodes", flat=True)["return"]
    return {n["node-name"]: {b["name"]: b["count"] for b in n.get("dirty-bitmaps", [])}
            for n in nodes if n["node-name"] in bitmaps}


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
def test_dirty_bitmaps_count_like_qsd_on_every_level(tmp_path):
    """The file under a raw node counts the export's writes (blockd counted 0 before)."""
    bitmaps = {"f-raw": ["a", "b"], "raw0": ["a"], "top": ["a"], "back": ["a"]}
    ours = _counts(tmp_path, False, bitmaps)
    assert ours == _counts(tmp_path, True, bitmaps)
    assert ours["f-raw"]["a"] == 4 * GRANULE  # 0, 1M, 2M and 3M were written
    assert ours["back"]["a"] == GRANULE


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
def test_dirty_bitmaps_on_a_qcow2_file_count_like_qsd(tmp_path):
    bitmaps = {"f-top": ["a"], "f-back": ["a"]}
    assert _counts(tmp_path, False, bitmaps) == _counts(tmp_path, True, bitmaps)


def _raw_over_file(path: str, **file: object) -> dict:
    return {"driver": "raw", "node-name": "top",
            "file": {"driver": "file", "node-name": "f", "filename": path, **file}}


def test_write_without_permission_is_refused(tmp_path):
    path = str(tmp_path / "a.raw")
    with open(path, "wb") as f:
        f.truncate(1 << 20)

    async def body() -> None:
        g = BlockGraph()
        reader = await open_user(g, _raw_over_file(path), writable=False)
        for attempt in (reader.write(0, b"x" * 512), reader.write_zeroes(0, 512),
                        reader.discard(0, 512), reader.truncate(2 << 20),
                        # the raw node's own edge took no write either: its parents need none
                        reader.node.file_child.write(0, b"x" * 512)):
            with pytest.raises(OSError) as err:
                await attempt
            assert err.value.errno == errno.EPERM
        assert bytes(await reader.read(0, 512)) == bytes(512)
        with pytest.raises(OSError) as err:
            await reader.node.file_child.read(-1, 512)
        assert err.value.errno == errno.EIO
        await g.close_all()

    asyncio.run(body())
    with open(path, "rb") as f:
        assert f.read(512) == bytes(512)


@pytest.mark.parametrize("kind", ["blkdebug", "direct"])
def test_unaligned_writes_on_an_aligned_child_read_back(tmp_path, kind):
    path = str(tmp_path / "a.raw")
    with open(path, "wb") as f:
        f.write(b"\x66" * (1 << 20))
    child = {"driver": "blkdebug", "align": 4096, "image": {"driver": "file", "filename": path}} \
        if kind == "blkdebug" else {"driver": "file", "filename": path, "cache": {"direct": True}}
    expect = bytearray(b"\x66" * (1 << 20))

    async def body() -> None:
        g = BlockGraph()
        user = await open_user(g, {"driver": "raw", "node-name": "top", "file": child})
        writes = [(5000, b"\x01" * 100), (4095, b"\x02" * 2), (12288 - 7, b"\x03" * 8200)]
        # Overlapping sub-block writes at once: each pads the same block, none may undo
        # another's bytes.
        writes += [(40960 + i * 300, bytes([0x10 + i]) * 300) for i in range(12)]
        await asyncio.gather(*(user.write(o, d) for o, d in writes))
        for o, d in writes:
            expect[o:o + len(d)] = d
        await user.write_zeroes(70000, 5000)
        expect[70000:75000] = bytes(5000)
        assert bytes(await user.read(4000, 100)) == bytes(expect[4000:4100])
        assert bytes(await user.read(0, 1 << 20)) == bytes(expect)
        await user.flush()
        await g.close_all()

    asyncio.run(body())
    with open(path, "rb") as f:
        assert f.read() == bytes(expect)


def test_drain_waits_for_requests_and_holds_new_ones(tmp_path):
    path = str(tmp_path / "a.raw")
    with open(path, "wb") as f:
        f.truncate(1 << 20)

    async def body() -> None:
        g = BlockGraph()
        user = await open_user(g, _raw_over_file(path))
        raw = user.node
        f = raw.file
        release = asyncio.Event()
        seen: list[tuple[str, int, int]] = []

        async def hook(node, offset: int, length: int) -> None:
            seen.append((node.node_name, offset, length))
            await release.wait()

        f.add_before_write(hook)
        write = asyncio.ensure_future(user.write(4096, b"w" * 4096))
        await asyncio.sleep(0.05)
        assert seen == [("f", 4096, 4096)] and raw.requests.in_flight == f.requests.in_flight == 1
        entered = asyncio.Event()
        leave = asyncio.Event()

        async def section() -> None:
            async with io.drain(f):
                entered.set()
                await leave.wait()

        drained = asyncio.ensure_future(section())
        await asyncio.sleep(0.05)
        assert not entered.is_set()  # the write is still in flight
        f.remove_before_write(hook)
        release.set()
        await asyncio.wait_for(entered.wait(), 60)
        assert write.done() and raw.requests.in_flight == f.requests.in_flight == 0
        # A user's new request waits for the section's end; a node's edge is not held.
        read = asyncio.ensure_future(user.read(4096, 4096))
        await asyncio.sleep(0.05)
        assert not read.done()
        leave.set()
        await drained
        assert bytes(await asyncio.wait_for(read, 60)) == b"w" * 4096
        await g.close_all()

    asyncio.run(body())


def test_serialised_section_holds_overlapping_writes(tmp_path):
    path = str(tmp_path / "a.raw")
    with open(path, "wb") as f:
        f.truncate(1 << 20)

    async def body() -> None:
        g = BlockGraph()
        user = await open_user(g, _raw_over_file(path))
        f = user.node.file
        async with io.serialised(f, 0, 8192):
            outside = asyncio.ensure_future(user.write(65536, b"o" * 512))
            inside = asyncio.ensure_future(user.write(4096, b"i" * 512))
            await asyncio.wait_for(outside, 60)
            await asyncio.sleep(0.05)
            assert not inside.done()
            assert bytes(await user.read(4096, 512)) == bytes(512)
        await asyncio.wait_for(inside, 60)
        assert bytes(await user.read(4096, 512)) == b"i" * 512
        await g.close_all()

    asyncio.run(body())


def test_backend_is_a_parent_like_any_other(tmp_path):
    """An export's writes reach the file node's bitmaps through the raw node's edge."""
    path = str(tmp_path / "a.raw")
    with open(path, "wb") as f:
        f.truncate(1 << 20)

    async def body() -> None:
        from blockd.block.dirty_bitmap import DirtyBitmap

        g = BlockGraph()
        node = await g.open_node(_raw_over_file(path))
        f = node.file
        f.bitmaps["b"] = DirtyBitmap("b", f.length(), GRANULE)
        user = Backend(g, node, "an unnamed block device", Perm.CONSISTENT_READ | Perm.WRITE)
        await user.write(GRANULE - 1, b"x" * 2)
        assert f.bitmaps["b"].count() == 2 * GRANULE
        await g.close_all()

    asyncio.run(body())


#: Writes to an image, allocating and not, aligned and not.
FORMAT_WRITES = [("img", "write -P 1 0 4k"), ("img", "write -P 2 1048676 100"),
                 ("img", "write -P 3 2M 130k"), ("img", "write -P 4 0 512"),
                 ("img", "write -z 3M 64k")]


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
@pytest.mark.parametrize("fmt", [
    "qed", "qcow",
    pytest.param("parallels", marks=pytest.mark.xfail(
        strict=True, reason="QEMU preallocates with one write-zeroes past the end of the file "
        "(counted); blockd's file driver cannot zero past its end, so parallels zeroes up to "
        "it and preallocates the rest by truncation (not counted)"))])
def test_dirty_bitmaps_on_the_file_of_an_image_count_like_qsd(tmp_path, fmt):
    """A format's own writes to its file (data and metadata) reach the file's bitmaps."""
    def images(d: str) -> None:
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, os.path.join(d, "img"), "4M"],
                       check=True)

    def nodes(d: str) -> list[dict]:
        return [{"driver": "file", "node-name": "f", "filename": os.path.join(d, "img")},
                {"driver": fmt, "node-name": "img", "file": "f"}]

    bitmaps = {"f": ["a"], "img": ["a"]}
    ours = _counts(tmp_path, False, bitmaps, images, nodes, FORMAT_WRITES)
    assert ours == _counts(tmp_path, True, bitmaps, images, nodes, FORMAT_WRITES)
    assert ours["f"]["a"] > 0


def _punched(tmp_path, qsd: bool, discard: str | None) -> list[bool]:
    """Discards of a qcow2's clusters and of a raw file through exports: which freed the
    file's blocks.  The edge decides by the file node's ``discard`` option alone."""
    d = tmp_path / f"{'qsd' if qsd else 'blockd'}-{discard}"
    d.mkdir()
    raw, img = str(d / "a.raw"), str(d / "a.qcow2")
    with open(raw, "wb") as f:
        f.write(b"\x11" * (1 << 20))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 0 1M", img], check=True,
                   capture_output=True)
    extra = {} if discard is None else {"discard": discard}
    sock = str(d / "nbd.sock")
    before = [os.stat(p).st_blocks for p in (raw, img)]
    with Daemon(str(d / "qmp.sock"), qsd=qsd) as daemon:
        c = daemon.client()
        for opts in ({"driver": "file", "node-name": "f-raw", "filename": raw, **extra},
                     {"driver": "file", "node-name": "f-q", "filename": img, **extra},
                     {"driver": "qcow2", "node-name": "q", "file": "f-q", "discard": "unmap"}):
            assert c.cmd("blockdev-add", **opts) == {"return": {}}
        c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        for export in ("f-raw", "q"):
            r = c.cmd("block-export-add", type="nbd", id=export, **{"node-name": export},
                      writable=True)
            assert r == {"return": {}}, r
            r = qemu_tool("qemu-io", "-f", "raw", "-c", "discard 0 1M",
                          f"nbd+unix:///{export}?socket={sock}")
            assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
    return [os.stat(p).st_blocks < b for p, b in zip((raw, img), before)]


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
@pytest.mark.parametrize("discard", [None, "ignore", "unmap"])
def test_discards_reach_a_file_only_with_unmap_like_qsd(tmp_path, discard):
    ours = _punched(tmp_path, False, discard)
    assert ours == _punched(tmp_path, True, discard)
    assert ours == [discard == "unmap"] * 2
