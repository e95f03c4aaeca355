"""The qed driver against qemu-img and qemu-io, both ways (helpers from test_vpc.py).

Images qemu-img makes read as qemu-img reads them (convert, NBD, info,
map, check); the same writes by QEMU and through blockd leave identical
files (allocation order, L2 tables, zero clusters, need-check flag
cleared on close); ``create`` and ``blockdev-create`` make qemu-img's
files; ``check`` and its repair count what qemu-img counts; hostile
headers and tables fail with QEMU's messages or a clear one.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockd.block.graph import BlockGraph
from blockd.errors import QMPError
from harness import Daemon, blockd_img, open_user, qemu_img, qemu_io_ok, same
from test_vpc import WRITES, check_nbd_read, check_same_writes, check_views, serve

MiB = 1 << 20


def _qemu_image(d: Path, opts: str = "", size: str = "11M", name: str = "a.qed") -> Path:
    image = d / name
    argv = ["create", "-q", "-f", "qed"] + (["-o", opts] if opts else []) + [str(image), size]
    r = qemu_img(*argv, cwd=d)
    assert r.returncode == 0, r.stderr
    return image


@pytest.mark.parametrize("opts", ["", "cluster_size=4k", "cluster_size=1M,table_size=16",
                                  "cluster_size=16k,table_size=2"])
def test_qemu_images_read_alike(tmp_path, opts):
    image = _qemu_image(tmp_path, opts)
    qemu_io_ok("qed", str(image), *WRITES)
    check_views(tmp_path, "qed", "a.qed")
    for cmd in (["check"], ["check", "--output=json"], ["map", "--output=json"], ["map"]):
        same(tmp_path, *cmd, "-f", "qed", "a.qed")
    check_nbd_read(tmp_path, "qed", image)


@pytest.mark.parametrize("opts", ["", "cluster_size=4k,table_size=2"])
def test_writes_match_qemu(tmp_path, opts):
    image = _qemu_image(tmp_path, opts, "300M")
    qemu_io_ok("qed", str(image), "write -P 0x99 2M 8k")
    check_same_writes(tmp_path, "qed", image, WRITES + [
        "write -P 0x66 2M 512", "write -P 0x77 10M 3M", "write -P 0x78 200M 4k",
        "write -z 250M 1M", "write -z 2M 64k", "write -P 0x79 250M 512",
        "write -z 10M 200k"])


def test_backing_file(tmp_path):
    """Reads through a raw and a qcow2 backing file, copy on write from them, and the
    backing format recorded only for raw (QED has no field for others)."""
    base = tmp_path / "base.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(base), "8M").returncode == 0
    qemu_io_ok("raw", str(base), "write -P 0xb1 0 8M")
    for fmt, name in (("raw", "base.raw"), ("qed", "mid.qed")):
        if fmt == "qed":
            r = qemu_img("create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "mid.qed",
                         cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            qemu_io_ok("qed", str(tmp_path / "mid.qed"), "write -P 0xc2 1M 64k")
        r = qemu_img("create", "-q", "-f", "qed", "-b", name, "-F", fmt, "top.qed", "11M",
                     cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        check_views(tmp_path, "qed", "top.qed")
        check_same_writes(tmp_path, "qed", tmp_path / "top.qed",
                          ["write -P 0x12 100k 1k", "write -P 0x13 1M 3k", "write -z 2M 64k",
                           "write -P 0x14 7M 2M", "write -z 3M 64k", "write -P 0x15 3076k 1k"])
        check_views(tmp_path, "qed", "ours.qed")
        (tmp_path / "top.qed").unlink()


def test_convert_and_create(tmp_path):
    src = tmp_path / "src.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(src), "11M").returncode == 0
    qemu_io_ok("raw", str(src), *WRITES)
    for opts in ("cluster_size=65536", "cluster_size=4k,table_size=1", "table_size=8"):
        out = tmp_path / "o.qed"
        q = qemu_img("convert", "-O", "qed", "-o", opts, "src.raw", "o.qed", cwd=tmp_path)
        theirs = out.read_bytes() if out.exists() else None
        out.unlink(missing_ok=True)
        b = blockd_img("convert", "-O", "qed", "-o", opts, "src.raw", "o.qed", cwd=tmp_path)
        assert b[1:] == (q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
        if q.returncode:
            continue
        assert out.read_bytes() == theirs
        assert qemu_img("check", "o.qed", cwd=tmp_path).returncode == 0
        out.unlink()
    for opts, size in (("", "0"), ("", "1000"), ("cluster_size=4k", "1G"),
                       ("cluster_size=4k,table_size=1", "1G"), ("cluster_size=2k", "1M"),
                       ("table_size=3", "1M"), ("cluster_size=4k", "100T"), ("help", "1M"),
                       ("backing_fmt=raw", "1M"), ("cluster_size=64M,table_size=16", "1G")):
        argv = ["create", "-f", "qed"] + (["-o", opts] if opts else []) + ["x.qed", size]
        q = qemu_img(*argv, cwd=tmp_path)
        theirs = (tmp_path / "x.qed").read_bytes() if q.returncode == 0 and opts != "help" \
            else None
        (tmp_path / "x.qed").unlink(missing_ok=True)
        b = blockd_img(*argv, cwd=tmp_path)
        assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
        if theirs is not None:
            assert (tmp_path / "x.qed").read_bytes() == theirs
    same(tmp_path, "create", "-f", "qed", "-o", "help")


def test_blockdev_create_like_qsd(tmp_path):
    """The same jobs in blockd and qemu-storage-daemon: the same replies and files."""
    results = []
    for qsd in (False, True):
        d = tmp_path / ("qsd" if qsd else "blockd")
        d.mkdir()
        with Daemon(str(d / "qmp.sock"), qsd=qsd) as daemon:
            c = daemon.client()
            replies = []
            for i, extra in enumerate([{}, {"cluster-size": 4096, "table-size": 2},
                                       {"backing-file": "base.raw", "backing-fmt": "raw"},
                                       {"cluster-size": 1000}, {"table-size": 32},
                                       {"size": 1 << 60}]):
                path = d / f"c{i}.qed"
                c.create_job(f"f{i}", {"driver": "file", "filename": str(path), "size": 0})
                opts = {"driver": "qed", "file": {"driver": "file", "filename": str(path)},
                        "size": 5 * MiB, **extra}
                replies.append(c.create_job(f"q{i}", opts))
        files = sorted(p.name for p in d.glob("c*.qed"))
        results.append((replies, [(n, (d / n).read_bytes()) for n in files]))
    assert results[0] == results[1]


def test_dirty_flag(tmp_path):
    """The need-check flag: set by the first allocating write while open, cleared after
    idling and on close; a dirty image opened read-write is repaired first (as QEMU),
    read-only it opens as it is and info says so."""
    image = _qemu_image(tmp_path)
    daemon, uri = serve(tmp_path, "qed", image, writable=True)
    try:
        qemu_io_ok("raw", uri, "write -P 1 0 4k")
        assert struct.unpack_from("<Q", image.read_bytes(), 16)[0] & 2
        deadline = time.monotonic() + 120  # QEMU's idle timer is 5 s; a busy machine is slow
        while struct.unpack_from("<Q", image.read_bytes(), 16)[0] & 2:
            assert time.monotonic() < deadline, "need-check flag never cleared"
            time.sleep(0.2)
        qemu_io_ok("raw", uri, "write -P 2 1M 4k")
        assert struct.unpack_from("<Q", image.read_bytes(), 16)[0] & 2
    finally:
        daemon.stop()
    assert not struct.unpack_from("<Q", image.read_bytes(), 16)[0] & 2
    # A dirty image with a cluster pointing past the end of the file.
    data = bytearray(image.read_bytes())
    struct.pack_into("<Q", data, 16, 2)
    l2 = struct.unpack_from("<Q", data, 65536)[0]
    struct.pack_into("<Q", data, l2 + 8 * 40, 1 << 40)
    image.write_bytes(bytes(data))
    shutil.copyfile(image, tmp_path / "b.qed")
    for cmd in (["info"], ["info", "--output=json"], ["check"], ["check", "--output=json"]):
        same(tmp_path, *cmd, "-f", "qed", "a.qed")
    qemu_io_ok("qed", str(image), "read -P 1 0 4k")  # QEMU repairs as it opens
    daemon, uri = serve(tmp_path, "qed", tmp_path / "b.qed", writable=True)
    daemon.stop()
    assert (tmp_path / "b.qed").read_bytes() == image.read_bytes()


@pytest.mark.parametrize("case", ["leak", "bad l2 entry", "bad l1 entry", "shared cluster",
                                  "unaligned entry", "overlapping table"])
def test_check_and_repair(tmp_path, case):
    image = _qemu_image(tmp_path, "cluster_size=4k,table_size=2")
    qemu_io_ok("qed", str(image), "write -P 1 0 12k", "write -P 2 4M 4k")
    data = bytearray(image.read_bytes())
    cs = 4096
    l1 = cs
    l2 = struct.unpack_from("<Q", data, l1)[0]
    if case == "leak":
        data += bytes(3 * cs)
    elif case == "bad l2 entry":
        struct.pack_into("<Q", data, l2 + 8, len(data) + cs)
    elif case == "bad l1 entry":
        struct.pack_into("<Q", data, l1 + 8, 1 << 40)
    elif case == "shared cluster":
        struct.pack_into("<Q", data, l2 + 8, struct.unpack_from("<Q", data, l2)[0])
    elif case == "unaligned entry":
        struct.pack_into("<Q", data, l2 + 16, struct.unpack_from("<Q", data, l2)[0] + 512)
    elif case == "overlapping table":
        struct.pack_into("<Q", data, l1 + 8, l2)
    image.write_bytes(bytes(data))
    shutil.copyfile(image, tmp_path / "orig.qed")
    for cmd in (["check"], ["check", "--output=json"], ["map", "--output=json"], ["map"]):
        same(tmp_path, *cmd, "-f", "qed", "a.qed")
    q = qemu_img("check", "-r", "all", "a.qed", cwd=tmp_path)
    repaired = image.read_bytes()
    shutil.copyfile(tmp_path / "orig.qed", image)
    b = blockd_img("check", "-r", "all", "a.qed", cwd=tmp_path)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    assert image.read_bytes() == repaired


def _hostile(d: Path, off: int, fmt: str, value: int) -> None:
    image = _qemu_image(d, "cluster_size=4k,table_size=2", "8M", "h.qed")
    qemu_io_ok("qed", str(image), "write -P 1 0 8k", "write -P 2 3M 4k")
    data = bytearray(image.read_bytes())
    struct.pack_into(fmt, data, off, value)
    image.write_bytes(bytes(data))


HOSTILE = {
    "magic": (0, "<I", 0x12345678),
    "features": (16, "<Q", 0x100),
    "cluster size": (4, "<I", 4097),
    "cluster size huge": (4, "<I", 1 << 31),
    "table size": (8, "<I", 3),
    "table size one": (8, "<I", 1),
    "header size": (12, "<I", 1 << 31),
    "image size": (48, "<Q", 1 << 62),
    "image size odd": (48, "<Q", 8 * MiB + 1),
    "l1 offset": (40, "<Q", 1 << 50),
    "l1 offset unaligned": (40, "<Q", 4097),
    "backing flag": (16, "<Q", 1),
    "backing name past header": (56, "<I", 4090),
    "backing name long": (60, "<I", 5000),
    "autoclear": (32, "<Q", 0xff),
    "l1 entry past eof": (4096, "<Q", 1 << 40),
    "l1 entry unaligned": (4096, "<Q", 3 * 4096 + 5),
    "l2 entry past eof": (5 * 4096, "<Q", 1 << 40),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers(tmp_path, case):
    """qemu-img's message and exit status for the same damage, never a traceback."""
    _hostile(tmp_path, *HOSTILE[case])
    for cmd in (["info"], ["check"], ["map", "--output=json"], ["map"]):
        q = qemu_img(*cmd, "-f", "qed", "h.qed", cwd=tmp_path)
        b = blockd_img(*cmd, "-f", "qed", "h.qed", cwd=tmp_path)
        assert "Traceback" not in b[1]
        assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    outs = []
    for tool in ("qemu-img", "blockd-img"):
        out = tmp_path / f"{tool}.raw"
        run = qemu_img if tool == "qemu-img" else blockd_img
        r = run("convert", "-f", "qed", "-O", "raw", "h.qed", str(out), cwd=tmp_path)
        code = r.returncode if tool == "qemu-img" else r[2]
        outs.append((code, out.read_bytes() if code == 0 else b""))
    assert outs[0] == outs[1]


def test_qmp_session_like_qsd(tmp_path):
    """blockdev-add of a qed image with its backing chain, then query-named-block-nodes:
    the same replies as qemu-storage-daemon's."""
    base = tmp_path / "base.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(base), "8M").returncode == 0
    _qemu_image(tmp_path)
    r = qemu_img("create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "top.qed",
                 cwd=tmp_path)
    assert r.returncode == 0
    answers = []
    for qsd in (False, True):
        with Daemon(str(tmp_path / "qmp.sock"), qsd=qsd) as daemon:
            c = daemon.client()
            got = [c.cmd("blockdev-add", driver="qed", **{"node-name": "q0"},
                         file={"driver": "file", "filename": str(tmp_path / "top.qed")}),
                   c.cmd("blockdev-add", driver="qed", **{"node-name": "q1", "read-only": True},
                         file={"driver": "file", "filename": str(tmp_path / "a.qed")}),
                   c.cmd("blockdev-add", driver="qed", **{"node-name": "q2"},
                         file={"driver": "file", "filename": str(base)})]
            nodes = c.cmd("query-named-block-nodes", flat=True)["return"]
            for n in nodes:
                n.pop("image", None) if n["drv"] == "file" else None
                for key in ("actual-size",):
                    n.get("image", {}).pop(key, None)
                    for b in (n.get("image", {}).get("backing-image"),):
                        if b:
                            b.pop(key, None)
            got.append(sorted(json.dumps(n, sort_keys=True) for n in nodes
                              if n["node-name"] in ("q0", "q1")))
            answers.append(got)
    assert answers[0] == answers[1]


# ---- fuzzing: hostile headers and tables, in process ----------------------------------

FUZZ_CASES = int(os.environ.get("BLOCKD_FUZZ_CASES", "120"))
#: What opening, reading and writing one hostile image may cost in memory.
MEMORY_BOUND = 96 * MiB


async def _exercise(path: str, driver: str, writable: bool) -> None:
    """Open, read up to 16 MiB and ask its block status, write a little, close: only the
    driver's errors (QMPError on open, OSError on I/O) may escape."""
    g = BlockGraph()
    try:
        user = await open_user(g, {"driver": driver, "node-name": "n",
                                   "read-only": not writable,
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
                assert len(await user.read(off, n)) == n
                assert (await user.block_status(off, n)).length > 0
            except OSError:
                pass
        if writable:
            for off in (0, 5000, MiB + 512, size - 4096):
                if 0 <= off < size:
                    try:
                        await user.write(off, b"\xab" * min(4096, size - off))
                        await user.write_zeroes(off, min(65536, size - off))
                    except OSError:
                        pass
        if hasattr(node, "check"):
            try:
                await node.check(0, None)
            except OSError:
                pass
    finally:
        await g.close_all()


def fuzz_image(path: Path, data: bytes, driver: str, rng: random.Random,
               fields: list[tuple[int, str]], tables: list[int]) -> None:
    """Mutate header ``fields`` (offset, struct format) and entries of the tables at
    ``tables``, then exercise the image read-only and read-write."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.5 and fields:
            off, fmt = rng.choice(fields)
            bits = struct.calcsize(fmt) * 8
            value = rng.choice([0, 1, 2, 3, rng.getrandbits(bits), 1 << rng.randrange(bits),
                                (1 << bits) - 1, 512, 4096, 65536])
            struct.pack_into(fmt, buf, off, value & ((1 << bits) - 1))
        elif tables:
            at = rng.choice(tables) + 8 * rng.randrange(16)
            if at + 8 <= len(buf):
                value = rng.choice([1, 2, 512, 4097, len(buf), len(buf) + 4096, 1 << 40,
                                    1 << 63, rng.getrandbits(64)])
                buf[at:at + 8] = value.to_bytes(8, rng.choice(["little", "big"]))
        else:
            buf[rng.randrange(len(buf))] = rng.getrandbits(8)
    path.write_bytes(bytes(buf))
    tracemalloc.start()
    try:
        asyncio.run(_exercise(str(path), driver, False))
        asyncio.run(_exercise(str(path), driver, True))
        assert tracemalloc.get_traced_memory()[1] < MEMORY_BOUND
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("qedfuzz")
    image = _qemu_image(d, "cluster_size=4k,table_size=2", "8M")
    qemu_io_ok("qed", str(image), "write -P 1 0 12k", "write -P 2 3M 4k", "write -z 5M 8k")
    return image.read_bytes()


@settings(max_examples=FUZZ_CASES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False))
def test_fuzz(tmp_path, fuzz_base, rng):
    l2 = struct.unpack_from("<Q", fuzz_base, 4096)[0]
    fuzz_image(tmp_path / "f.qed", fuzz_base, "qed", rng,
               [(4, "<I"), (8, "<I"), (12, "<I"), (16, "<Q"), (24, "<Q"), (32, "<Q"),
                (40, "<Q"), (48, "<Q"), (56, "<I"), (60, "<I")], [4096, l2, l2 + 8 * 760])


def test_rebase(tmp_path):
    """rebase rewrites the header cluster as QEMU does (byte for byte), safe or not."""
    for name, size in (("a.raw", "8M"), ("b.raw", "8M")):
        assert qemu_img("create", "-q", "-f", "raw", name, size, cwd=tmp_path).returncode == 0
    qemu_io_ok("raw", str(tmp_path / "a.raw"), "write -P 0xa1 0 1M")
    qemu_io_ok("raw", str(tmp_path / "b.raw"), "write -P 0xb1 512k 1M")
    r = qemu_img("create", "-q", "-f", "qed", "-b", "a.raw", "-F", "raw", "top.qed",
                 cwd=tmp_path)
    assert r.returncode == 0
    qemu_io_ok("qed", str(tmp_path / "top.qed"), "write -P 0xc1 768k 4k")
    orig = (tmp_path / "top.qed").read_bytes()
    for argv in (["-u", "-b", "b.raw", "-F", "raw"], ["-u", "-b", "b.raw", "-F", "qcow2"],
                 ["-u", "-b", ""], ["-b", "b.raw", "-F", "raw"], ["-u", "-b", "b.raw"]):
        q = qemu_img("rebase", "-f", "qed", *argv, "top.qed", cwd=tmp_path)
        theirs = (tmp_path / "top.qed").read_bytes()
        (tmp_path / "top.qed").write_bytes(orig)
        b = blockd_img("rebase", "-f", "qed", *argv, "top.qed", cwd=tmp_path)
        assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode), argv
        assert (tmp_path / "top.qed").read_bytes() == theirs, argv
        (tmp_path / "top.qed").write_bytes(orig)


@pytest.mark.parametrize("fmt,opts,ext", [("qed", "cluster_size=4k,table_size=2", "qed"),
                                          ("qed", "cluster_size=64k", "qed"),
                                          ("qcow", "", "qcow")])
def test_parallel_reads_and_writes_through_nbd(tmp_path, fmt, opts, ext):
    """qemu-img convert with many requests in flight, out of order, into a blockd export
    (while reads run too): a consistent image with the source's content, checked clean."""
    src = tmp_path / "src.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(src), "40M").returncode == 0
    qemu_io_ok("raw", str(src), *WRITES, "write -P 0x5a 20M 15M", "write -P 0x5b 36M 3M")
    image = tmp_path / f"t.{ext}"
    r = blockd_img("create", "-q", "-f", fmt, *(["-o", opts] if opts else []), str(image),
                   "40M", cwd=tmp_path)
    assert r[2] == 0, r
    daemon, uri = serve(tmp_path, fmt, image, writable=True)
    try:
        r = qemu_img("convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw", str(src), uri)
        assert r.returncode == 0, r.stderr
        r = qemu_img("compare", "-f", "raw", "-F", "raw", str(src), uri)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        daemon.stop()
    r = qemu_img("compare", "-f", "raw", "-F", fmt, str(src), str(image))
    assert r.returncode == 0, r.stdout + r.stderr
    if fmt == "qed":
        # (QEMU counts one cluster past the end of a file of cluster_size - 1 clusters or
        # more as leaked; blockd's check counts as QEMU's does.)
        r = qemu_img("check", "-f", fmt, str(image))
        assert r.returncode in (0, 3) and "corrupt" not in r.stdout, r.stdout + r.stderr
        same(tmp_path, "check", "-f", fmt, image.name)


@pytest.mark.parametrize("fmt", ["qed", "qcow"])
def test_backing_chain_loop_refused(tmp_path, fmt):
    """An image naming itself as its backing file: refused with a clear message (QEMU
    would open it again and again)."""
    assert qemu_img("create", "-q", "-f", "raw", "x.raw", "1M", cwd=tmp_path).returncode == 0
    r = qemu_img("create", "-q", "-f", fmt, "-b", "x.raw", "-F", "raw", f"s.{fmt}", "1M",
                 cwd=tmp_path)
    assert r.returncode == 0
    data = (tmp_path / f"s.{fmt}").read_bytes()
    (tmp_path / f"s.{fmt}").write_bytes(data.replace(b"x.raw", b"s.qed" if fmt == "qed"
                                                     else b"s.qco"))
    name = f"s.{fmt}" if fmt == "qed" else "s.qco"
    if fmt == "qcow":
        (tmp_path / f"s.{fmt}").rename(tmp_path / name)
    for cmd in (["convert", "-O", "raw", name, "o.raw"], ["map", name]):
        out, err, code = blockd_img(*cmd, cwd=tmp_path)
        assert code == 1 and "Backing chain loops back to" in err, err


def test_export_deletion_marks_clean(tmp_path):
    """A write sets the need-check flag; deleting the writable export clears it at once
    (QEMU drains the node), in blockd as in qemu-storage-daemon."""
    flags = []
    for qsd in (False, True):
        image = _qemu_image(tmp_path, name=f"r{int(qsd)}.qed")
        nbd = str(tmp_path / "nbd.sock")
        with Daemon(str(tmp_path / "qmp.sock"), qsd=qsd) as daemon:
            c = daemon.client()
            assert "return" in c.cmd("blockdev-add", driver="file", filename=str(image),
                                     **{"node-name": "f0"})
            assert "return" in c.cmd("blockdev-add", driver="qed", file="f0",
                                     **{"node-name": "q0"})
            c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
            c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"},
                  writable=True)
            qemu_io_ok("raw", f"nbd+unix:///q0?socket={nbd}", "write -P 3 0 4k")
            steps = [struct.unpack_from("<Q", image.read_bytes(), 16)[0]]
            c.export_del("e0")
            deadline = time.monotonic() + 60  # blockd cleans up just after its reply
            while struct.unpack_from("<Q", image.read_bytes(), 16)[0] & 2 and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            steps.append(struct.unpack_from("<Q", image.read_bytes(), 16)[0])
            steps.append(c.cmd("blockdev-reopen", options=[{
                "driver": "qed", "node-name": "q0", "file": "f0", "read-only": True}]))
            steps.append(struct.unpack_from("<Q", image.read_bytes(), 16)[0])
            flags.append(steps)
    assert flags[0] == flags[1]
    assert flags[0][0] == 2 and flags[0][-1] == 0


def test_hostile_headers_over_qmp(tmp_path):
    """blockdev-add of each damaged image (read-only, then read-write, which may repair
    it): the same replies and files as qemu-storage-daemon's, each on its own copy."""
    answers = []
    for qsd in (False, True):
        names = []
        for case in sorted(HOSTILE):
            d = tmp_path / f"{case.replace(' ', '_')}-{qsd}"
            d.mkdir()
            _hostile(d, *HOSTILE[case])
            names.append(d / "h.qed")
        with Daemon(str(tmp_path / "qmp.sock"), qsd=qsd) as daemon:
            c = daemon.client()
            got = []
            for i, path in enumerate(names):
                for ro in (True, False):
                    reply = c.cmd("blockdev-add", driver="qed", **{"node-name": f"n{i}{ro}"},
                                  **{"read-only": ro},
                                  file={"driver": "file", "filename": str(path)})
                    got.append((path.parent.name.split("-")[0], ro, reply))
                    if "return" in reply:
                        c.cmd("blockdev-del", **{"node-name": f"n{i}{ro}"})
        answers.append((got, [p.read_bytes() for p in names]))
    assert answers[0] == answers[1]
