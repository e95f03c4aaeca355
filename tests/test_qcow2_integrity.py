"""qcow2 integrity: overlap checks, the corrupt bit and BLOCK_IMAGE_CORRUPTED, against qsd.

Each corruption is planted by hand in an image qemu-io wrote, then the
same session runs on qemu-storage-daemon and on blockd: writes and reads
over NBD with qemu-io, the events, the queries and a second open.  The
two must agree, and qemu-img must judge the result the same way.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct

import pytest

from blockd.block.graph import BlockGraph
from harness import HAVE_QSD, Daemon, blockd_img_run, sh

pytestmark = pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")


def tables(path: str) -> tuple[int, int, int]:
    """L1 table offset, refcount table offset and the first L2 table's offset."""
    with open(path, "rb") as f:
        h = f.read(104)
        l1_off, rt_off = struct.unpack(">Q", h[40:48])[0], struct.unpack(">Q", h[48:56])[0]
        f.seek(l1_off)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    return l1_off, rt_off, l2


def poke(path: str, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def make_image(path: str, creator: str = "qemu") -> None:
    """The same two clusters of data, in an image made by QEMU's tools or by blockd's."""
    if creator == "qemu":
        sh("qemu-img", "create", "-f", "qcow2", path, "4M")
        sh("qemu-io", "-c", "write -P 1 0 64k", "-c", "write -P 2 1M 64k", path)
        return
    assert blockd_img_run("create", "-q", "-f", "qcow2", path, "4M").returncode == 0

    async def fill() -> None:
        g = BlockGraph()
        node = await g.open_node({"driver": "qcow2", "node-name": "q",
                                  "file": {"driver": "file", "filename": path}})
        await node.write(0, b"\1" * 65536)
        await node.write(1 << 20, b"\2" * 65536)
        await g.close_all()

    asyncio.run(fill())


COPIED = 1 << 63
CASES = {
    # An L2 entry sends guest cluster 0 onto a metadata structure: the write is refused.
    "l2-at-l1": lambda l1, rt, l2: (l2, COPIED | l1),
    "l2-at-reftable": lambda l1, rt, l2: (l2, COPIED | rt),
    "l2-at-refblock": lambda l1, rt, l2: (l2, COPIED | 0x20000),
    "l2-at-l2": lambda l1, rt, l2: (l2, COPIED | l2),
    # Entries that cannot be valid: the lookup itself stops the image.
    "l1-unaligned": lambda l1, rt, l2: (l1, COPIED | l2 | 0x200),
    "l2-unaligned": lambda l1, rt, l2: (l2, COPIED | 0x50200),
}


def drain(c) -> list[dict]:
    """Events sent so far: everything before the reply to a command sent now."""
    c.send(json.dumps({"execute": "query-version"}))
    events = []
    while "event" in (msg := c.recv()):
        events.append(msg)
    return events


def session(tmp: str, img: str, qsd: bool, overlap: object = None) -> dict:
    """Everything a client sees when it writes to the image through a daemon."""
    d = os.path.join(tmp, "qsd" if qsd else "blockd")
    os.makedirs(d)
    local = os.path.join(d, "img.qcow2")
    shutil.copy(img, local)
    out: dict = {}
    opts = {} if overlap is None else {"overlap-check": overlap}
    with Daemon(os.path.join(d, "qmp.sock"), qsd=qsd) as dm:
        c = dm.client()
        out["add"] = c.cmd("blockdev-add", driver="qcow2", **{"node-name": "n0"}, **opts,
                           file={"driver": "file", "filename": local})
        c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": d + "/nbd.sock"}})
        c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "n0"}, writable=True)
        url = f"nbd+unix:///n0?socket={d}/nbd.sock"
        io = sh("qemu-io", "-f", "raw", "-c", "write -P 9 0 4k", "-c", "read -P 1 1M 4k",
                "-c", "write -P 3 2M 4k", "-c", "flush", url)
        out["io"] = [line for line in (io.stdout + io.stderr).splitlines()
                     if "ops/sec" not in line and "qcow2:" not in line]
        out["events"] = [{k: v for k, v in e.items() if k != "timestamp"} for e in drain(c)
                         if e["event"] == "BLOCK_IMAGE_CORRUPTED"]
        nodes = c.cmd("query-named-block-nodes")
        out["query"] = nodes.get("error") or "ok"
        out["rw-again"] = c.cmd("blockdev-add", driver="qcow2", **{"node-name": "n1"},
                                file={"driver": "file", "filename": local, "locking": "off"})
        out["ro-again"] = c.cmd("blockdev-add", driver="qcow2",
                                **{"node-name": "n2", "read-only": True},
                                file={"driver": "file", "filename": local, "locking": "off"})
    info = json.loads(sh("qemu-img", "info", "--output=json", local).stdout)
    out["corrupt-bit"] = info["format-specific"]["data"]["corrupt"]
    out["file"] = local
    return out


@pytest.mark.parametrize("creator", ["qemu", "blockd"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_session_same_as_qsd(tmp_path, case, creator):
    img = str(tmp_path / "base.qcow2")
    make_image(img, creator)
    where, value = CASES[case](*tables(img))
    poke(img, where, value)
    theirs = session(str(tmp_path), img, qsd=True)
    ours = session(str(tmp_path), img, qsd=False)
    for key in ("add", "io", "events", "query", "rw-again", "ro-again", "corrupt-bit"):
        assert ours[key] == theirs[key], key
    assert ours["events"] and ours["events"][0]["data"]["fatal"] is True
    assert ours["corrupt-bit"] is True
    # Nothing was written over the metadata: qemu-img sees the same state in both files.
    assert sh("qemu-img", "check", ours["file"]).returncode == \
        sh("qemu-img", "check", theirs["file"]).returncode


def test_overlap_check_none_lets_the_write_through(tmp_path):
    """With the checks off both daemons write where the corrupt entry points."""
    img = str(tmp_path / "base.qcow2")
    make_image(img)
    where, value = CASES["l2-at-refblock"](*tables(img))
    poke(img, where, value)
    theirs = session(str(tmp_path), img, qsd=True, overlap="none")
    ours = session(str(tmp_path), img, qsd=False, overlap="none")
    assert ours["events"] == theirs["events"] == []
    assert ours["io"] == theirs["io"]
    assert ours["corrupt-bit"] is theirs["corrupt-bit"] is False


def test_structure_flags_choose_what_is_checked(tmp_path):
    """A template with one structure switched off lets exactly that overlap through."""
    img = str(tmp_path / "base.qcow2")
    make_image(img)
    where, value = CASES["l2-at-l1"](*tables(img))
    poke(img, where, value)
    ours = session(str(tmp_path), img, qsd=False,
                   overlap={"template": "all", "active-l1": False})
    assert ours["events"] == []
    assert ours["corrupt-bit"] is False


def test_repair_clears_the_corrupt_bit(tmp_path):
    """check -r all repairs a corrupt-marked image like qemu-img, and it opens read-write again."""
    img = str(tmp_path / "base.qcow2")
    make_image(img)
    where, value = CASES["l2-at-l1"](*tables(img))
    poke(img, where, value)
    marked = session(str(tmp_path), img, qsd=False)["file"]
    twin = str(tmp_path / "twin.qcow2")
    shutil.copy(marked, twin)
    ours, theirs = blockd_img_run("check", "-r", "all", marked), sh("qemu-img", "check", "-r", "all",
                                                                 twin)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
    for path in (marked, twin):
        info = json.loads(sh("qemu-img", "info", "--output=json", path).stdout)
        assert info["format-specific"]["data"]["corrupt"] is False
        assert sh("qemu-img", "check", path).returncode == 0
    with Daemon(str(tmp_path / "q.sock")) as dm:
        assert dm.client().cmd("blockdev-add", driver="qcow2", **{"node-name": "n0"},
                               file={"driver": "file", "filename": marked}) == {"return": {}}


TOLERATED = {
    # A compressed cluster pointing at metadata or past the end: the request fails with
    # EIO (nothing inflates), the image is not marked.
    "compressed-at-l1": lambda l1, rt, l2: (l2, (1 << 62) | l1),
    "compressed-at-reftable": lambda l1, rt, l2: (l2, (1 << 62) | rt),
    "compressed-past-eof": lambda l1, rt, l2: (l2, (1 << 62) | 0x1000000),
    # Tables and data past the end of the file read as zeroes, in QEMU as here.
    "l2-table-past-eof": lambda l1, rt, l2: (l1, COPIED | 0x1000000),
    "data-past-eof": lambda l1, rt, l2: (l2, COPIED | 0x1000000),
}


@pytest.mark.parametrize("case", sorted(TOLERATED))
def test_entries_qemu_does_not_mark_corrupt(tmp_path, case):
    img = str(tmp_path / "base.qcow2")
    make_image(img)
    poke(img, *TOLERATED[case](*tables(img)))
    theirs = session(str(tmp_path), img, qsd=True)
    ours = session(str(tmp_path), img, qsd=False)
    for key in ("add", "io", "events", "query", "rw-again", "ro-again", "corrupt-bit"):
        assert ours[key] == theirs[key], key
    assert ours["events"] == []


def test_lazy_refcounts_dirty_bit_lifecycle(tmp_path):
    """Dirty from the first deferred count to the clean close; a crash copy is repaired on
    read-write open only, and a read-only open leaves the file as it is."""
    img, crashed = str(tmp_path / "l.qcow2"), str(tmp_path / "crashed.qcow2")
    assert blockd_img_run("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img,
                          "64M").returncode == 0

    def dirty(path: str) -> bool:
        with open(path, "rb") as f:
            f.seek(72)
            return bool(struct.unpack(">Q", f.read(8))[0] & 1)

    def opts(path: str, read_only: bool = False) -> dict:
        return {"driver": "qcow2", "node-name": "q", "read-only": read_only,
                "file": {"driver": "file", "filename": path}}

    async def session() -> None:
        g = BlockGraph()
        node = await g.open_node(opts(img))
        assert not dirty(img)
        for i in range(40):
            await node.write(i * 1048576 + 4096, bytes([i + 1]) * 8192)
        await node.flush()
        assert dirty(img) and node.is_dirty()
        shutil.copy(img, crashed)  # what a crash right now would leave
        await g.close_all()
        assert not dirty(img)

        with open(crashed, "rb") as f:
            before = f.read()
        g = BlockGraph()
        node = await g.open_node(opts(crashed, read_only=True))
        assert bytes(await node.read(7 * 1048576 + 4096, 8192)) == bytes([8]) * 8192
        await g.close_all()
        with open(crashed, "rb") as f:
            assert f.read() == before

        g = BlockGraph()
        node = await g.open_node(opts(crashed))
        assert not dirty(crashed)
        await g.close_all()

    asyncio.run(session())
    assert sh("qemu-img", "check", img).returncode == 0
    assert sh("qemu-img", "check", crashed).returncode == 0
    out = sh("qemu-io", "-r", "-c", f"read -P 40 {39 * 1048576 + 4096} 8k", crashed)
    assert "verification failed" not in out.stdout and out.returncode == 0


def test_reopen_without_lazy_refcounts_stores_the_counts(tmp_path):
    img = str(tmp_path / "r.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", img, "64M")

    async def body() -> None:
        g = BlockGraph()
        node = await g.open_node({"driver": "qcow2", "node-name": "q", "lazy-refcounts": True,
                                  "file": {"driver": "file", "filename": img}})
        await node.write(0, b"x" * 4096)
        await node.write(8 << 20, b"y" * 4096)
        await node.flush()
        assert node.is_dirty()
        assert sh("qemu-img", "check", "-U", img).returncode == 2  # counts still in memory
        opts = {**node.options, "lazy-refcounts": False}
        await node.reopen_commit(await node.reopen_prepare(opts, False), opts, False)
        assert not node.is_dirty()
        assert sh("qemu-img", "check", "-U", img).returncode == 0
        await node.write(16 << 20, b"z" * 4096)
        await node.flush()
        assert sh("qemu-img", "check", "-U", img).returncode == 0  # eager from now on
        await g.close_all()

    asyncio.run(body())


def read_only_session(tmp: str, img: str, qsd: bool, file_read_only: bool) -> dict:
    """Reads through a read-only qcow2 node (over a file node of either mode) of an image
    with a bad L2 entry for cluster 0."""
    d = os.path.join(tmp, ("qsd" if qsd else "blockd") + ("-ro" if file_read_only else "-rw"))
    os.makedirs(d)
    local = os.path.join(d, "img.qcow2")
    shutil.copy(img, local)
    out: dict = {}
    with Daemon(os.path.join(d, "qmp.sock"), qsd=qsd) as dm:
        c = dm.client()
        out["file"] = c.cmd("blockdev-add", driver="file", filename=local,
                            **{"node-name": "f0", "read-only": file_read_only})
        out["add"] = c.cmd("blockdev-add", driver="qcow2", file="f0",
                           **{"node-name": "d0", "read-only": True})
        c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": d + "/nbd.sock"}})
        c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"})
        io = sh("qemu-io", "-r", "-f", "raw", "-c", "read -P 1 0 4k", "-c", "read -P 2 1M 4k",
                "-c", "read -P 1 0 4k", f"nbd+unix:///d0?socket={d}/nbd.sock")
        out["io"] = [line for line in (io.stdout + io.stderr).splitlines()
                     if "ops/sec" not in line]
        out["events"] = [{k: v for k, v in e.items() if k != "timestamp"} for e in drain(c)]
        out["query"] = [n["node-name"] for n in c.cmd("query-named-block-nodes")["return"]]
        out["del"] = c.cmd("blockdev-del", **{"node-name": "d0"})
    with open(local, "rb") as f:
        out["bytes"] = f.read()
    return out


@pytest.mark.parametrize("file_read_only", [False, True], ids=["rw-file", "ro-file"])
def test_read_only_node_reports_corruption_without_writing(tmp_path, file_read_only):
    """A read-only qcow2 node only fails the request that meets a corrupt entry: the event
    says fatal=false, the image is left byte for byte, healthy clusters stay readable and
    queries about all nodes still answer (as in qsd)."""
    img = str(tmp_path / "base.qcow2")
    make_image(img)
    poke(img, *CASES["l2-unaligned"](*tables(img)))
    with open(img, "rb") as f:
        before = f.read()
    theirs = read_only_session(str(tmp_path), img, True, file_read_only)
    ours = read_only_session(str(tmp_path), img, False, file_read_only)
    assert ours == theirs
    assert ours["bytes"] == before
    assert ours["io"][1] == "read 4096/4096 bytes at offset 1048576"
    assert [e["data"]["fatal"] for e in ours["events"]] == [False]
    assert ours["query"] == ["d0", "f0"]
