"""qcow2 internal snapshots, both directions with qemu-img and qemu-storage-daemon.

Snapshots taken by qemu-img must be listed and readable in blockd;
snapshots taken by blockd must be listed, readable (``convert -l``) and
deletable by qemu-img.  After every step ``qemu-img check`` must find
the image clean and every snapshot and the active image must compare
equal to an expected raw image kept alongside.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import json
import re
import struct
import subprocess
from pathlib import Path

import pytest

from blockd.block.graph import BlockGraph
from blockd.drivers.qcow2 import snapshot as qsnap
from harness import HAVE_QSD, Daemon, blockd_img, same, sh_ok

KiB, MiB = 1 << 10, 1 << 20
SIZE = 2 * MiB


def check_clean(image: Path) -> dict:
    out = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                         capture_output=True, text=True)
    report = json.loads(out.stdout)
    assert out.returncode == 0, (out.stdout, out.stderr)
    for key in ("corruptions", "leaks", "check-errors"):
        assert report.get(key, 0) == 0, report
    return report


class Expected:
    """What the active image and each snapshot must read as (raw twins in memory)."""

    def __init__(self, image: Path, size: int) -> None:
        self.image = image
        self.active = bytearray(size)
        self.snaps: dict[str, bytearray] = {}

    def write(self, offset: int, data: bytes) -> None:
        self.active[offset:offset + len(data)] = data

    def verify(self) -> None:
        """qemu-img check clean; active and every snapshot equal their twins."""
        report = check_clean(self.image)
        # blockd's check counts the snapshots' references the same way.
        ours = blockd_img("check", "--output=json", str(self.image), cwd=self.image.parent)
        assert json.loads(ours[0]) == report
        twin = self.image.with_suffix(".twin")
        for name, content in [(None, self.active), *self.snaps.items()]:
            # qemu-img convert -l reads a snapshot through the active image's size.
            size = len(self.active)
            twin.write_bytes(bytes(content[:size]).ljust(size, b"\0"))
            src = [str(self.image)] if name is None else ["-l", name, str(self.image)]
            out = self.image.with_suffix(".out")
            sh_ok("qemu-img", "convert", "-O", "raw", *src, str(out))
            assert out.read_bytes() == twin.read_bytes(), name
        listed = json.loads(sh_ok("qemu-img", "info", "--output=json", str(self.image)))
        assert sorted(s["name"] for s in listed.get("snapshots", [])) == sorted(self.snaps)


async def _with_node(image: Path, fn, **opts) -> object:
    graph = BlockGraph()
    file = {"driver": "file", "filename": str(image), **opts.pop("file_opts", {})}
    node = await graph.open_node({"driver": "qcow2", "node-name": "q", "file": file, **opts})
    try:
        return await fn(node)
    finally:
        await graph.close_all()


def with_node(image: Path, fn, **opts) -> object:
    return asyncio.run(_with_node(image, fn, **opts))


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed * 7 + i // 512) & 0xFF or 1 for i in range(n))


def blockd_write(exp: Expected, offset: int, data: bytes) -> None:
    async def go(node):
        await node.write(offset, data)
    with_node(exp.image, go)
    exp.write(offset, data)


def blockd_snapshot(exp: Expected, name: str) -> None:
    async def go(node):
        await node.snapshot_create(name, qsnap.now_img(), icount=0)
    with_node(exp.image, go)
    exp.snaps[name] = bytearray(exp.active)


def blockd_delete(exp: Expected, name: str) -> None:
    async def go(node):
        await node.snapshot_delete(qsnap.find(node.image.snapshots, None, name))
    with_node(exp.image, go)
    del exp.snaps[name]


@pytest.mark.parametrize("opts", ["cluster_size=512", "cluster_size=65536",
                                  "cluster_size=16384,extended_l2=on", "compat=0.10",
                                  "refcount_bits=64,cluster_size=4096"])
def test_cow_after_blockd_snapshots_and_delete_orders(tmp_path, opts):
    """Writes after snapshots copy shared clusters; snapshots deleted in every order."""
    image = tmp_path / "a.qcow2"
    cs = int(re.search(r"cluster_size=(\d+)", opts).group(1)) if "cluster_size" in opts \
        else 65536
    base = tmp_path / "base.qcow2"
    sh_ok("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(base), str(SIZE))
    sh_ok("qemu-io", "-c", "write -P 0x11 0 192k", "-c", "write -c -P 0x22 1M 128k", str(base))
    exp0 = Expected(base, SIZE)
    exp0.write(0, b"\x11" * 192 * KiB)
    exp0.write(MiB, b"\x22" * 128 * KiB)
    blockd_snapshot(exp0, "s1")
    # Partial writes into shared data, shared compressed data and fresh areas.
    blockd_write(exp0, 4096 + 100, pattern(1, 3 * cs))
    blockd_write(exp0, MiB + cs // 2, pattern(2, cs))
    blockd_snapshot(exp0, "s2")
    sh_ok("qemu-img", "snapshot", "-c", "q3", str(base))
    exp0.snaps["q3"] = bytearray(exp0.active)
    blockd_write(exp0, 0, pattern(3, 2 * cs + 7))
    blockd_write(exp0, SIZE - cs, pattern(4, cs))
    exp0.verify()
    names = sorted(exp0.snaps)
    orders = list(itertools.permutations(names))
    # Every order at the smallest cluster size; elsewhere each snapshot goes first once.
    for k, order in enumerate(orders if cs == 512 else orders[::2]):
        image = tmp_path / f"o{k}.qcow2"
        image.write_bytes(base.read_bytes())
        exp = Expected(image, SIZE)
        exp.active, exp.snaps = bytearray(exp0.active), {n: bytearray(v) for n, v
                                                          in exp0.snaps.items()}
        for i, name in enumerate(order):
            if i % 2:
                sh_ok("qemu-img", "snapshot", "-d", name, str(image))
                del exp.snaps[name]
            else:
                blockd_delete(exp, name)
            blockd_write(exp, cs * (i + 1) - 3, pattern(10 + i, cs + 5))
            exp.verify()
        assert exp.snaps == {}


def test_qemu_img_snapshots_listed_and_readable(tmp_path):
    """Snapshots made by qemu-img: list, info, convert -l as qemu-img; the node view reads them."""
    image = tmp_path / "q.qcow2"
    sh_ok("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M")
    sh_ok("qemu-io", "-c", "write -P 1 0 256k", str(image))
    sh_ok("qemu-img", "snapshot", "-c", "first", str(image))
    sh_ok("qemu-img", "resize", str(image), "3M")
    sh_ok("qemu-io", "-c", "write -P 2 64k 64k", "-c", "write -P 3 2M 64k", str(image))
    sh_ok("qemu-img", "snapshot", "-c", "second", str(image))
    sh_ok("qemu-img", "snapshot", "-c", "dup", str(image))
    sh_ok("qemu-img", "snapshot", "-c", "dup", str(image))
    sh_ok("qemu-io", "-c", "write -P 4 0 4k", str(image))
    for args in (["snapshot", "-l", "q.qcow2"], ["snapshot", "q.qcow2"], ["info", "q.qcow2"],
                 ["info", "--output=json", "q.qcow2"], ["check", "q.qcow2"],
                 ["measure", "-l", "first", "-O", "qcow2", "q.qcow2"],
                 ["snapshot", "-l", "--image-opts", "driver=qcow2,file.filename=q.qcow2"]):
        same(tmp_path, *args)
    for param in ("first", "1", "second", "snapshot.id=2", "snapshot.name=first",
                  "snapshot.id=3,snapshot.name=dup", "nope", "snapshot.id=2,snapshot.name=x",
                  "snapshot.bad=1"):
        q = subprocess.run(["qemu-img", "convert", "-l", param, "-O", "raw", "q.qcow2",
                            "q.raw"], capture_output=True, text=True, cwd=tmp_path)
        data = (tmp_path / "q.raw").read_bytes() if q.returncode == 0 else None
        b = blockd_img("convert", "-l", param, "-O", "raw", "q.qcow2", "b.raw", cwd=tmp_path)
        assert b == ("", q.stderr.replace("qemu-img", "blockd-img"), q.returncode), param
        if data is not None:
            assert (tmp_path / "b.raw").read_bytes() == data, param

    async def view(node):
        return node.length(), bytes(await node.read(0, node.length()))
    size, content = with_node(image, view, **{"read-only": True, "snapshot": "first"})
    assert size == MiB and content == b"\1" * 256 * KiB + bytes(768 * KiB)
    size, content = with_node(image, view, **{"read-only": True, "snapshot": "second"})
    assert size == 3 * MiB
    assert content[:64 * KiB] == b"\1" * 64 * KiB and content[64 * KiB:128 * KiB] == b"\2" * 65536
    assert content[2 * MiB:2 * MiB + 65536] == b"\3" * 65536
    check_clean(image)


def test_snapshot_table_kept_through_other_operations(tmp_path):
    """Writes, resize, bitmaps and check leave every table entry field as it was."""
    image = tmp_path / "t.qcow2"
    sh_ok("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M")
    sh_ok("qemu-io", "-c", "write -P 1 0 128k", str(image))
    sh_ok("qemu-img", "snapshot", "-c", "keep", str(image))

    def table() -> bytes:
        raw = image.read_bytes()
        n, off = struct.unpack_from(">IQ", raw, 60)
        return bytes(raw[off:off + 4096]) if n else b""
    before = table()
    blockd_img("resize", "t.qcow2", "2M", cwd=tmp_path)
    blockd_img("bitmap", "--add", "t.qcow2", "b0", cwd=tmp_path)
    blockd_img("check", "-r", "all", "t.qcow2", cwd=tmp_path)

    async def go(node):
        await node.write(0, b"\7" * 70000)
        await node.write_zeroes(1 << 20, 1 << 20)
    with_node(image, go, discard="unmap")
    assert table()[:len(before.rstrip(b"\0"))] == before.rstrip(b"\0")
    check_clean(image)
    # Unknown extra data survives a table rewrite; a short v2-style extra gains the
    # fields QEMU writes today.
    sn = qsnap.Snapshot(id="1", name="n", l1_table_offset=65536, l1_size=1, date_sec=5,
                        date_nsec=6, vm_clock_nsec=7_000_000_123, vm_state_size=1 << 33,
                        disk_size=MiB, icount=42, unknown_extra=b"\xaa" * 8)
    again = qsnap.parse_table(sn.encode(), 1, 0)[0]
    assert again == sn
    short = bytearray(sn.encode()[:40]) + b"\0" * 8 + b"1n"
    struct.pack_into(">I", short, 36, 8)
    old = qsnap.parse_table(bytes(short), 1, 12345)[0]
    assert (old.disk_size, old.icount, old.vm_state_size) == (12345, -1, 0)


def test_blockd_img_snapshot_commands(tmp_path):
    """-c/-l/-a/-d side by side with qemu-img on twin images, errors included."""
    for tool in ("q", "b"):
        sh_ok("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / f"{tool}.qcow2"), "1M")
        sh_ok("qemu-io", "-c", "write -P 1 0 300k", str(tmp_path / f"{tool}.qcow2"))
    sh_ok("qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "r.raw"), "1M")

    def both(*args: str, after: tuple[str, ...] = ()) -> None:
        q = subprocess.run(["qemu-img", *args, "q.qcow2", *after], capture_output=True,
                           text=True, cwd=tmp_path)
        b = blockd_img(*args, "b.qcow2", *after, cwd=tmp_path)
        assert b[2] == q.returncode and b[1] == q.stderr.replace("qemu-img", "blockd-img") \
            .replace("q.qcow2", "b.qcow2"), (args, b, q.stderr)
        check_clean(tmp_path / "b.qcow2")

    both("snapshot", "-c", "one")
    sh_ok("qemu-io", "-c", "write -P 2 4k 8k", str(tmp_path / "q.qcow2"))
    sh_ok("qemu-io", "-c", "write -P 2 4k 8k", str(tmp_path / "b.qcow2"))
    both("resize", "2M")
    both("snapshot", "-c", "two")
    both("snapshot", "-c", "")
    both("snapshot", "-c", "two")
    both("resize", "--shrink", "512k")
    both("snapshot", "-a", "one")
    sh_ok("qemu-img", "compare", str(tmp_path / "q.qcow2"), str(tmp_path / "b.qcow2"))
    both("snapshot", "-a", "2")
    sh_ok("qemu-img", "compare", str(tmp_path / "q.qcow2"), str(tmp_path / "b.qcow2"))
    for args in (["snapshot", "-a", "zz"], ["snapshot", "-d", "zz"], ["snapshot", "-d", "1"],
                 ["snapshot", "-l", "-d", "x"], ["snapshot", "-c", "x", "-U"],
                 ["snapshot", "-d", "two"], ["snapshot", "-d", "one"]):
        both(*args)
    both("bitmap", "--add", "--disable", after=("b0",))  # QEMU refuses to apply then
    both("snapshot", "-a", "two")
    both("snapshot", "-a", "zz")
    both("bitmap", "--remove", after=("b0",))
    lq = sh_ok("qemu-img", "snapshot", "-l", str(tmp_path / "q.qcow2"))
    lb = sh_ok("qemu-img", "snapshot", "-l", str(tmp_path / "b.qcow2"))
    strip = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
    assert strip.sub("D", lq) == strip.sub("D", lb)
    for args in (["snapshot", "-l", "r.raw"], ["snapshot", "-c", "x", "r.raw"],
                 ["snapshot", "-d", "x", "r.raw"], ["snapshot", "-l"],
                 ["convert", "-l", "x", "-f", "raw", "-O", "raw", "r.raw", "o.raw"],
                 ["convert", "-l", "x", "-O", "raw", "q.qcow2", "q.qcow2", "o.raw"]):
        same(tmp_path, *args)


@pytest.mark.parametrize("opts,write", [("refcount_bits=1", "write -P 1 0 128k"),
                                        ("refcount_bits=4,cluster_size=4096",
                                         "write -c -P 2 0 128k")])
def test_refcount_overflow_is_refused_cleanly(tmp_path, opts, write):
    """Counts that would overflow (refcount_bits=1; a host cluster full of compressed
    clusters at 4 bits): QEMU's error, and (unlike QEMU) no leak."""
    for tool in ("q", "b"):
        path = tmp_path / f"{tool}.qcow2"
        sh_ok("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), "1M")
        sh_ok("qemu-io", "-c", write, str(path))
    q = subprocess.run(["qemu-img", "snapshot", "-c", "s", "q.qcow2"], capture_output=True,
                       text=True, cwd=tmp_path)
    b = blockd_img("snapshot", "-c", "s", "b.qcow2", cwd=tmp_path)
    assert b == ("", q.stderr.replace("qemu-img", "blockd-img").replace("q.qcow2", "b.qcow2"),
                 1)
    check_clean(tmp_path / "b.qcow2")
    assert sh_ok("qemu-img", "snapshot", "-l", str(tmp_path / "b.qcow2")) == ""
    # Without data nothing is shared twice, so it works for both.
    sh_ok("qemu-img", "create", "-q", "-f", "qcow2", "-o", "refcount_bits=1",
          str(tmp_path / "e.qcow2"), "1M")
    assert blockd_img("snapshot", "-c", "s", "e.qcow2", cwd=tmp_path)[2] == 0
    check_clean(tmp_path / "e.qcow2")


def test_check_and_repair_with_snapshots(tmp_path):
    """check counts snapshot references like qemu-img; repair fixes a too-low shared count."""
    image = tmp_path / "c.qcow2"
    sh_ok("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(image), "1M")
    sh_ok("qemu-io", "-c", "write -P 1 0 64k", "-c", "write -c -P 2 128k 8k", str(image))
    sh_ok("qemu-img", "snapshot", "-c", "a", str(image))
    blockd_img("snapshot", "-c", "b", "c.qcow2", cwd=tmp_path)
    sh_ok("qemu-io", "-c", "write -P 3 8k 4k", str(image))
    same(tmp_path, "check", "c.qcow2")
    same(tmp_path, "check", "--output=json", "c.qcow2")
    # Lower the count of the first data cluster (shared by three tables) to one.
    raw = bytearray(image.read_bytes())
    rt = struct.unpack_from(">Q", raw, 48)[0]
    block = struct.unpack_from(">Q", raw, rt)[0]
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00
    data = struct.unpack_from(">Q", raw, l2 + 8)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">H", raw, block + data // 4096 * 2, 1)
    image.write_bytes(bytes(raw))
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(bytes(raw))
    same(tmp_path, "check", "c.qcow2")
    b = blockd_img("check", "-r", "all", "c.qcow2", cwd=tmp_path)
    assert b[2] == 0, b
    check_clean(image)
    sh_ok("qemu-img", "compare", str(image), str(broken))


def _TX(name: str) -> dict:
    return {"type": "blockdev-snapshot-internal-sync", "data": {"device": "n", "name": name}}


QMP_SESSION = [
    ("blockdev-add", {"driver": "qcow2", "node-name": "n",
                      "file": {"driver": "file", "filename": "TMP/b.qcow2"}}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "ro", "read-only": True,
                      "file": {"driver": "file", "filename": "TMP/c.qcow2"}}),
    ("blockdev-add", {"driver": "raw", "node-name": "r",
                      "file": {"driver": "file", "filename": "TMP/r.raw", "node-name": "rf"}}),
    ("blockdev-snapshot-internal-sync", {"device": "n", "name": "s1"}),
    ("blockdev-snapshot-internal-sync", {"device": "n", "name": "s1"}),
    ("blockdev-snapshot-internal-sync", {"device": "n", "name": ""}),
    ("blockdev-snapshot-internal-sync", {"device": "n", "name": "1"}),
    ("blockdev-snapshot-internal-sync", {"device": "nope", "name": "x"}),
    ("blockdev-snapshot-internal-sync", {"device": "ro", "name": "x"}),
    ("blockdev-snapshot-internal-sync", {"device": "r", "name": "x"}),
    ("blockdev-snapshot-internal-sync", {"device": "rf", "name": "x"}),
    ("blockdev-snapshot-internal-sync", {"device": "n"}),
    ("blockdev-snapshot-internal-sync", {"device": "n", "name": "x", "id": "3"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "n"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "n", "name": "zz"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "n", "id": "9", "name": "s1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "nope", "id": "1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "ro", "id": "1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "ro", "name": "pre"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "r", "id": "1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "rf", "id": "1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "n", "id": ""}),
    ("query-named-block-nodes", {}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "n", "name": "1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "n", "id": "2", "name": "s1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "n", "id": "1", "name": "s1"}),
    ("blockdev-snapshot-internal-sync", {"device": "n", "name": "again"}),
    # In transactions: an abort (or a later failure) deletes what earlier actions took.
    ("transaction", {"actions": [_TX("t1"), _TX("t2")]}),
    ("transaction", {"actions": [_TX("t3"), {"type": "abort", "data": {}}]}),
    ("transaction", {"actions": [_TX("t4"), _TX("t1")]}),
    ("transaction", {"actions": [_TX("t5")], "properties": {"completion-mode": "grouped"}}),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-add",
                                  "data": {"node": "n", "name": "bm"}}, _TX("t6"),
                                 {"type": "abort", "data": {}}]}),
    ("query-named-block-nodes", {"flat": True}),
]


@pytest.mark.skipif(not HAVE_QSD, reason="qemu-storage-daemon not installed")
def test_qmp_matches_qsd(tmp_path):
    """Replies and errors byte for byte (timestamps masked) against qemu-storage-daemon."""
    results = []
    for qsd in (True, False):
        work = tmp_path / ("qsd" if qsd else "blockd")
        work.mkdir()
        for name in ("b", "c"):
            sh_ok("qemu-img", "create", "-q", "-f", "qcow2", str(work / f"{name}.qcow2"), "1M")
        sh_ok("qemu-io", "-c", "write -P 5 0 200k", str(work / "b.qcow2"))
        sh_ok("qemu-img", "snapshot", "-c", "pre", str(work / "c.qcow2"))
        sh_ok("qemu-img", "create", "-q", "-f", "raw", str(work / "r.raw"), "1M")
        lines = []
        with Daemon(str(work / "qmp.sock"), qsd=qsd) as daemon:
            client = daemon.client()
            for name, args in QMP_SESSION:
                text = json.dumps({"execute": name, "arguments": args})
                client.send(text.replace("TMP", str(work)))
                line = client.recv_line().decode().replace(str(work), "TMP")
                line = re.sub(r'"(date|vm-clock)-(sec|nsec)": \d+', r'"\1-\2": N', line)
                line = re.sub(r'"(actual-size|idle_time_ns)": \d+', r'"\1": N', line)
                line = re.sub(r"#block\d+", "#blockN", line)
                lines.append(line)
        results.append(lines)
        check_clean(work / "b.qcow2")
    for q, b in zip(*results):
        assert b == q
    # qsd's stamps (no icount, millisecond VM clock) print alike in both tools.
    qsd_image = tmp_path / "qsd" / "b.qcow2"
    for args in (["snapshot", "-l", str(qsd_image)], ["info", str(qsd_image)],
                 ["info", "--output=json", str(qsd_image)]):
        same(tmp_path, *args)
    # blockd's snapshots are qemu-img's to read and delete.
    blockd_dir = tmp_path / "blockd"
    sh_ok("qemu-img", "convert", "-l", "again", "-O", "raw", str(blockd_dir / "b.qcow2"),
          str(blockd_dir / "again.raw"))
    assert (blockd_dir / "again.raw").read_bytes()[:200 * KiB] == b"\5" * 200 * KiB
    sh_ok("qemu-img", "snapshot", "-d", "again", str(blockd_dir / "b.qcow2"))
    check_clean(blockd_dir / "b.qcow2")


def test_blockdev_add_snapshot_option(tmp_path):
    """The blockd-only ``snapshot`` member: read-only, by id or name, with the snapshot's size."""
    image = tmp_path / "v.qcow2"
    sh_ok("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M")
    sh_ok("qemu-io", "-c", "write -P 9 0 64k", str(image))
    sh_ok("qemu-img", "snapshot", "-c", "old", str(image))
    sh_ok("qemu-img", "resize", str(image), "4M")
    sh_ok("qemu-io", "-c", "write -P 8 0 64k", str(image))
    with Daemon(str(tmp_path / "qmp.sock")) as daemon:
        c = daemon.client()

        def add(**extra):
            return c.cmd("blockdev-add", driver="qcow2", **extra,
                         file={"driver": "file", "filename": str(image)})
        assert add(**{"node-name": "w", "snapshot": "old"})["error"]["desc"] == \
            "Device is not readonly"
        assert add(**{"node-name": "m", "snapshot": "zz", "read-only": True})["error"][
            "desc"] == "Can't find snapshot"
        assert add(**{"node-name": "s", "snapshot": "1", "read-only": True}) == {"return": {}}
        nodes = {n["node-name"]: n for n in c.cmd("query-named-block-nodes")["return"]}
        assert nodes["s"]["image"]["virtual-size"] == MiB
        assert nodes["s"]["image"]["snapshots"][0]["name"] == "old"
        child = [n["node-name"] for n in nodes.values() if n["drv"] == "file"][0]
        reply = c.cmd("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "s",
                                                   "read-only": False, "snapshot": "1",
                                                   "file": child}])
        assert reply["error"]["desc"] == "Device is not readonly"
        assert c.cmd("nbd-server-start", addr={"type": "unix", "data": {
            "path": str(tmp_path / "nbd.sock")}}) == {"return": {}}
        assert c.cmd("block-export-add", type="nbd", id="e", **{"node-name": "s"}) == \
            {"return": {}}
        out = sh_ok("qemu-img", "convert", "-f", "raw", "-O", "raw",
                    f"nbd+unix:///s?socket={tmp_path / 'nbd.sock'}", str(tmp_path / "s.raw"))
        assert out == ""
    assert (tmp_path / "s.raw").read_bytes() == b"\x09" * 65536 + bytes(MiB - 65536)
    check_clean(image)


@pytest.mark.parametrize("where,fmt,value,cmd", [
    ("header", ">Q", "off+8", "info"),           # table not cluster aligned
    ("header-count", ">I", "70000", "info"),     # more entries than QEMU allows
    ("entry", ">Q", "12345", "check"),            # snapshot L1 not aligned
    ("entry", ">Q", "12345", "convert"),
    ("entry", ">Q", "12345", "apply"),
    ("entry-l1-size", ">I", str(1 << 30), "convert"),
])
def test_corrupt_snapshot_tables(tmp_path, where, fmt, value, cmd):
    """Broken tables are refused (or reported) with qemu-img's messages."""
    image = tmp_path / "k.qcow2"
    sh_ok("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M")
    sh_ok("qemu-img", "snapshot", "-c", "s", str(image))
    raw = bytearray(image.read_bytes())
    off = struct.unpack_from(">Q", raw, 64)[0]
    pos = {"header": 64, "header-count": 60, "entry": off, "entry-l1-size": off + 8}[where]
    struct.pack_into(fmt, raw, pos, eval(value, {"off": off}))
    image.write_bytes(bytes(raw))
    args = {"info": ["info", "k.qcow2"], "check": ["check", "k.qcow2"],
            "convert": ["convert", "-l", "s", "-O", "raw", "k.qcow2", "k.raw"],
            "apply": ["snapshot", "-a", "s", "k.qcow2"]}[cmd]
    same(tmp_path, *args)


def test_snapshot_while_writing(tmp_path):
    """Writes in flight around a snapshot land wholly before or after it; a write to the
    same cluster issued after it (which copies the cluster) never loses them.

    A smoke test: the window in which a stale lookup could write into a freshly
    shared cluster is too narrow to hit reliably, so this checks the outcome only.
    """
    image = tmp_path / "w.qcow2"
    sh_ok("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(image), "1M")
    sh_ok("qemu-io", "-c", "write -P 1 0 1M", str(image))
    blocks = 256

    async def go(node):
        async def writer(offset: int, byte: int) -> None:
            await asyncio.sleep(0)
            await node.write(offset, bytes([byte]) * 2048)
        during = [asyncio.ensure_future(writer(i * 4096, 2)) for i in range(blocks)]
        await asyncio.sleep(0)
        await node.snapshot_create("mid", qsnap.now_img(), icount=0)
        after = [asyncio.ensure_future(writer(i * 4096 + 2048, 3)) for i in range(blocks)]
        await asyncio.gather(*during, *after)
    # O_DIRECT I/O runs in worker threads, so writes really are in flight together.
    with_node(image, go, file_opts={"cache": {"direct": True}})
    check_clean(image)
    for name, out in ((None, "a.raw"), ("mid", "m.raw")):
        src = [str(image)] if name is None else ["-l", name, str(image)]
        sh_ok("qemu-img", "convert", "-O", "raw", *src, str(tmp_path / out))
    active = (tmp_path / "a.raw").read_bytes()
    snap = (tmp_path / "m.raw").read_bytes()
    assert active == (b"\2" * 2048 + b"\3" * 2048) * blocks
    for i in range(blocks):
        assert snap[i * 4096:(i + 1) * 4096] in (b"\1" * 4096, b"\2" * 2048 + b"\1" * 2048), i


@pytest.mark.parametrize("opts,punched", [({"discard": "unmap"}, True), ({}, False),
                                          ({"discard": "unmap",
                                            "pass-discard-snapshot": False}, False)])
def test_delete_discards_freed_clusters(tmp_path, opts, punched):
    """Clusters only a deleted snapshot used go back to the file system when asked."""
    image = tmp_path / "d.qcow2"
    sh_ok("qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M")
    sh_ok("qemu-io", "-c", "write -P 1 0 4M", str(image))

    async def go(node):
        await node.snapshot_create("s", qsnap.now_img(), icount=0)
        await node.write(0, b"\2" * (4 << 20))
        before = os.stat(image).st_blocks
        await node.snapshot_delete(node.image.snapshots[0])
        return before - os.stat(image).st_blocks
    freed_blocks = with_node(image, go, **opts)
    assert (freed_blocks * 512 >= 4 << 20) is punched
    check_clean(image)


@pytest.mark.parametrize("lazy", [False, True])
def test_snapshots_amid_unflushed_writes_in_one_session(tmp_path, lazy):
    """Snapshots taken and deleted while L2 changes (and, lazily, counts) are still in
    memory, with every overlap check on: nothing is lost, nothing is reported as an
    overlap when freed snapshot tables are reused, and the image ends clean."""
    img = tmp_path / "s.qcow2"
    sh_ok("qemu-img", "create", "-f", "qcow2", "-o",
          f"cluster_size=512,lazy_refcounts={'on' if lazy else 'off'}", str(img), "1M")
    exp = Expected(img, 1 << 20)
    events: list = []

    async def go(node):
        node.image.emit = lambda name, data: events.append((name, data))
        for round_ in range(4):
            for i in range(24):
                data = pattern(round_ * 31 + i, 1536)
                offset = (i * 37 + round_ * 11) % 600 * 1536
                await node.write(offset, data)
                exp.write(offset, data)
            sn = await node.snapshot_create(f"r{round_}", qsnap.now_img(), icount=0)
            exp.snaps[sn.name] = bytearray(exp.active)
            if round_ % 2:
                # Delete an older one: its table clusters go back to the allocator.
                old = node.image.snapshots[0]
                await node.snapshot_delete(old)
                del exp.snaps[old.name]
        await node.flush()

    with_node(img, go, **{"overlap-check": "all"})
    assert events == []
    exp.verify()
