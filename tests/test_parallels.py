"""The parallels driver against qemu-img and qemu-io, both ways.

Images qemu-img makes (cluster sizes, both signatures) read as qemu-img
reads them, through blockd-img and a blockd NBD export, with the same
``info``, ``map`` and ``check``; the same qemu-io writes by QEMU and
through blockd leave identical files (BAT, growth, the in-use flag cleared
and the file cut back on close); images blockd-img and ``blockdev-create``
make equal qemu-img's; ``check`` and its repairs report and change what
qemu-img's do; hostile headers and BATs fail as QEMU fails, or clearly.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import struct
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from blockd.block.graph import BlockGraph
from blockd.errors import QMPError
from harness import Daemon, blockd_img, open_user, qemu_img, qemu_io_ok, same
from test_vpc import WRITES, check_nbd_read, check_same_writes, check_views, serve

MiB = 1 << 20
INUSE = 0x746F6E59


def _image(d: Path, opts: str = "", size: str = "11M", name: str = "a.prl") -> Path:
    image = d / name
    args = ["create", "-q", "-f", "parallels"] + (["-o", opts] if opts else [])
    r = qemu_img(*args, str(image), size)
    assert r.returncode == 0, r.stderr
    return image


def _patch(image: Path, *patches: tuple[int, str, int]) -> None:
    data = bytearray(image.read_bytes())
    for off, fmt, value in patches:
        struct.pack_into(fmt, data, off, value)
    image.write_bytes(bytes(data))


def _old_signature(image: Path) -> None:
    """The same image with the old ``WithoutFreeSpace`` signature: BAT entries in
    sectors, the size in 32 bits."""
    data = bytearray(image.read_bytes())
    tracks, entries = struct.unpack_from("<II", data, 28)
    data[:16] = b"WithoutFreeSpace"
    for i in range(entries):
        value, = struct.unpack_from("<I", data, 64 + 4 * i)
        struct.pack_into("<I", data, 64 + 4 * i, value * tracks)
    image.write_bytes(bytes(data))


# ---- reading what qemu-img makes ----------------------------------------------------------


@pytest.mark.parametrize("opts", ["", "cluster_size=4k", "cluster_size=64k", "cluster_size=3000"])
def test_qemu_images_read_alike(tmp_path, opts):
    image = _image(tmp_path, opts)
    qemu_io_ok("parallels", str(image), *WRITES)
    check_views(tmp_path, "parallels", "a.prl")
    for cmd in (["check"], ["check", "--output=json"]):
        same(tmp_path, *cmd, "-f", "parallels", "a.prl")
    check_nbd_read(tmp_path, "parallels", image)


def test_old_signature_reads_alike(tmp_path):
    image = _image(tmp_path, "cluster_size=64k")
    qemu_io_ok("parallels", str(image), *WRITES)
    _old_signature(image)
    check_views(tmp_path, "parallels", "a.prl")
    same(tmp_path, "check", "--output=json", "-f", "parallels", "a.prl")


def test_probed_and_sizes(tmp_path):
    for size in ("0", "10000", "1G"):
        _image(tmp_path, "cluster_size=4k", size, f"s{size}.prl")
        for cmd in (["info", "--output=json"], ["map", "--output=json"], ["check"],
                    ["check", "--output=json"]):
            same(tmp_path, *cmd, f"s{size}.prl")  # no -f: probed


# ---- writing ------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", ["", "cluster_size=4k", "cluster_size=3000"])
def test_writes_match_qemu(tmp_path, opts):
    image = _image(tmp_path, opts, "300M")
    qemu_io_ok("parallels", str(image), "write -P 0x99 2M 8k")
    check_same_writes(tmp_path, "parallels", image, WRITES + [
        "write -P 0x66 2M 512", "write -P 0x77 10M 3M", "write -P 0x78 200M 4k",
        "write -P 0x79 127M 2M", "write -z 250M 1M", "write -P 0x7a 298M 2M"])


def test_writes_to_old_signature_match_qemu(tmp_path):
    image = _image(tmp_path, "cluster_size=64k", "20M")
    qemu_io_ok("parallels", str(image), "write -P 0x99 1M 8k")
    _old_signature(image)
    check_same_writes(tmp_path, "parallels", image, WRITES)


@pytest.mark.parametrize("opts", ["cluster_size=64k", "cluster_size=4k"])
def test_parallel_writes_through_nbd(tmp_path, opts):
    """qemu-img convert with many requests in flight, out of order, into a blockd export:
    concurrent allocations leave an image with the source's content that qemu-img checks
    clean."""
    src = tmp_path / "src.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(src), "40M").returncode == 0
    qemu_io_ok("raw", str(src), *WRITES, "write -P 0x5a 20M 15M", "write -P 0x5b 36M 3M")
    image = _image(tmp_path, opts, "40M", "t.prl")
    daemon, uri = serve(tmp_path, "parallels", image, writable=True)
    try:
        r = qemu_img("convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw", str(src), uri)
        assert r.returncode == 0, r.stderr
    finally:
        daemon.stop()
    r = qemu_img("compare", "-f", "raw", "-F", "parallels", str(src), str(image))
    assert r.returncode == 0, r.stdout + r.stderr
    r = qemu_img("check", "-f", "parallels", str(image))
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_in_use_while_open(tmp_path):
    """Open for writing, the image carries the in-use flag (qemu-img check reports it);
    closed, the flag is gone and qemu-img check finds nothing."""
    image = _image(tmp_path)
    with Daemon(str(tmp_path / "qmp.sock"), "--blockdev",
                f"driver=file,node-name=f0,filename={image}",
                "--blockdev", "driver=parallels,node-name=p0,file=f0") as daemon:
        daemon.client()
        assert struct.unpack_from("<I", image.read_bytes(), 44)[0] == INUSE
        r = qemu_img("check", "-U", "-f", "parallels", str(image))
        assert r.returncode == 2 and "ERROR image was not closed correctly" in r.stderr
    assert struct.unpack_from("<I", image.read_bytes(), 44)[0] == 0
    assert qemu_img("check", "-f", "parallels", str(image)).returncode == 0


def test_convert_into_parallels(tmp_path):
    src = tmp_path / "src.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(src), "11M").returncode == 0
    qemu_io_ok("raw", str(src), *WRITES)
    for opts in ("cluster_size=1M", "cluster_size=4k"):
        out = blockd_img("convert", "-O", "parallels", "-o", opts, "src.raw", "o.prl",
                         cwd=tmp_path)
        assert out[2] == 0, out
        theirs = tmp_path / "q.prl"
        r = qemu_img("convert", "-O", "parallels", "-o", opts, str(src), str(theirs))
        assert r.returncode == 0, r.stderr
        r = qemu_img("compare", "-f", "raw", "-F", "parallels", str(src), str(tmp_path / "o.prl"))
        assert r.returncode == 0, r.stdout + r.stderr
        r = qemu_img("check", "-f", "parallels", str(tmp_path / "o.prl"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert (tmp_path / "o.prl").read_bytes() == theirs.read_bytes()
        check_views(tmp_path, "parallels", "o.prl")


def test_prealloc_options(tmp_path):
    """QEMU's runtime options, in option strings only (``blockdev-add`` refuses them, as
    qsd does): while open the file grows by the new clusters and ``prealloc-size`` more,
    zeroed or truncated, and is cut back on close to what qemu-io leaves."""
    writes = [(0, 5, MiB), (200 * MiB, 6, 65536)]
    for mode in ("falloc", "truncate"):
        image = _image(tmp_path, "", "400M", f"{mode}.prl")
        theirs = tmp_path / f"q{mode}.prl"
        shutil.copyfile(image, theirs)
        spec = f"driver=parallels,prealloc-mode={mode},prealloc-size=3M,file.driver=file"
        r = subprocess.run(["qemu-io", "--image-opts"] + sum(
            (["-c", f"write -P {p} {o} {n}"] for o, p, n in writes), []) +
            [f"{spec},file.filename={theirs}"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        lengths = asyncio.run(_write_in_process(image, mode, writes))
        # 1 MiB of header and BAT, a cluster and 3 MiB; then the next cluster fits.
        assert lengths == [5 * MiB, 5 * MiB]
        assert image.read_bytes() == theirs.read_bytes()
    for bad in ("prealloc-mode=bogus", "prealloc-size=abc", "prealloc-size=-5"):
        same(tmp_path, "info", "--image-opts",
             f"driver=parallels,{bad},file.driver=file,file.filename=falloc.prl")
    with Daemon(str(tmp_path / "qmp.sock")) as daemon:
        reply = daemon.client().cmd("blockdev-add", **{
            "driver": "parallels", "node-name": "p", "prealloc-size": 4096,
            "file": {"driver": "file", "filename": str(tmp_path / "falloc.prl")}})
        assert reply["error"]["desc"] == "Parameter 'prealloc-size' is unexpected"


async def _write_in_process(image: Path, mode: str, writes: list[tuple[int, int, int]]
                            ) -> list[int]:
    """The writes through a node opened with the options; the file's length after each."""
    graph = BlockGraph()
    user = await open_user(graph, {
        "driver": "parallels", "node-name": "p", "prealloc-mode": mode,
        "prealloc-size": "3M", "file": {"driver": "file", "filename": str(image)}})
    lengths = []
    try:
        for offset, byte, n in writes:
            await user.write(offset, bytes([byte]) * n)
            lengths.append(user.node.file_node.length())
    finally:
        await graph.close_all()
    return lengths


# ---- create -------------------------------------------------------------------------------


CREATE_CASES = [(opts, size) for size in ("0", "10000", "10M", "1G")
                for opts in ("", "cluster_size=4k", "cluster_size=513", "cluster_size=0",
                             "cluster_size=4G", "preallocation=falloc")] + [
    ("", "512"), ("", "1T"), ("cluster_size=64k", "100G"),
    ("cluster_size=512", "2T"),  # too large for the cluster size
    ("cluster_size=512", "1T"),  # a BAT of 2^33 bytes: QEMU's 32-bit sum wraps
]


@pytest.mark.parametrize("opts,size", CREATE_CASES)
def test_create_like_qemu(tmp_path, opts, size):
    argv = ["create", "-f", "parallels"] + (["-o", opts] if opts else []) + ["x.prl", size]
    q = qemu_img(*argv, cwd=tmp_path)
    theirs = (tmp_path / "x.prl").read_bytes() if q.returncode == 0 else None
    if theirs is not None:
        (tmp_path / "x.prl").unlink()
    b = blockd_img(*argv, cwd=tmp_path)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    if theirs is not None:
        assert (tmp_path / "x.prl").read_bytes() == theirs
        for cmd in (["info", "--output=json"], ["check", "--output=json"]):
            same(tmp_path, *cmd, "x.prl")


@pytest.mark.parametrize("opts", ["help", "cluster_size=x", "bogus=1"])
def test_create_errors(tmp_path, opts):
    same(tmp_path, "create", "-f", "parallels", "-o", opts, "x.prl", "10M")


def test_blockdev_create(tmp_path):
    """The QMP job, its checks in QEMU's order and words, and the image it makes."""
    path = tmp_path / "c.prl"
    replies = {}
    for qsd in (False, True):
        with Daemon(str(tmp_path / "qmp.sock"), qsd=qsd) as daemon:
            c = daemon.client()
            assert "error" not in c.create_job("f", {"driver": "file", "filename": str(path),
                                                     "size": 0})
            c.cmd("blockdev-add", driver="file", filename=str(path), **{"node-name": "f0"})
            got = []
            for opts in ({"size": 10 * MiB + 1}, {"size": MiB, "cluster-size": 1000},
                         {"size": MiB, "cluster-size": 1 << 31},
                         {"size": 1 << 50, "cluster-size": 4096}):
                got.append(c.create_job("bad", {"driver": "parallels", "file": "f0", **opts}))
            got.append(c.create_job("p", {"driver": "parallels", "file": "f0", "size": 5 * MiB,
                                          "cluster-size": 65536}))
            c.cmd("blockdev-del", **{"node-name": "f0"})
            replies[qsd] = got, path.read_bytes()
    assert replies[False] == replies[True]
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    assert info["virtual-size"] == 5 * MiB and info["format"] == "parallels"


# ---- check and repair ---------------------------------------------------------------------


def _written(d: Path, opts: str = "cluster_size=64k") -> Path:
    image = _image(d, opts, "11M", "h.prl")
    qemu_io_ok("parallels", str(image), "write -P 1 0 4k", "write -P 2 3M 4k",
            "write -P 3 200k 100k")
    return image


CHECK_CASES = {
    "clean": [],
    "unclean": [(44, "<I", INUSE)],
    "outside image": [(64 + 4 * 3, "<I", 999)],
    "fragmented": [(64, "<I", 40), (64 + 4 * 3, "<I", 41)],
    "unclean and outside": [(44, "<I", INUSE), (64 + 4 * 4, "<I", 5000)],
}


@pytest.mark.parametrize("case", sorted(CHECK_CASES))
@pytest.mark.parametrize("repair", [None, "leaks", "all"])
def test_check_and_repair(tmp_path, case, repair):
    image = _written(tmp_path)
    _patch(image, *CHECK_CASES[case])
    with open(image, "ab") as f:  # leaked space at the end
        f.write(b"\x01" * 70000)
    copy = tmp_path / "q.prl"
    shutil.copyfile(image, copy)
    flags = ["-r", repair] if repair else []
    for out in ([], ["--output=json"]):
        shutil.copyfile(copy, tmp_path / "h.prl")
        q = qemu_img("check", *flags, *out, "-f", "parallels", "h.prl", cwd=tmp_path)
        theirs = image.read_bytes()
        shutil.copyfile(copy, tmp_path / "h.prl")
        b = blockd_img("check", *flags, *out, "-f", "parallels", "h.prl", cwd=tmp_path)
        assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
        assert image.read_bytes() == theirs


def test_empty_big_image_leaks(tmp_path):
    """QEMU counts the BAT's clusters beyond the first as leaked; its repair cuts the file
    there, and closing grows it back."""
    _image(tmp_path, "cluster_size=4k", "1G", "h.prl")
    shutil.copyfile(tmp_path / "h.prl", tmp_path / "q.prl")
    for flags in ([], ["-r", "leaks"], []):
        q = qemu_img("check", *flags, "q.prl", cwd=tmp_path)
        b = blockd_img("check", *flags, "h.prl", cwd=tmp_path)
        assert b == (q.stdout.replace("q.prl", "h.prl"),
                     q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
        assert (tmp_path / "h.prl").read_bytes() == (tmp_path / "q.prl").read_bytes()


# ---- hostile images -----------------------------------------------------------------------


HOSTILE = {
    "version": [(16, "<I", 3)],
    "magic": [(0, "<I", 0x12345678)],
    "zero tracks": [(28, "<I", 0)],
    "huge tracks": [(28, "<I", 0x7FFFFFFF)],
    "tracks over limit": [(28, "<I", 0x7FFFFFFF // 513 + 1)],
    "catalog too large": [(32, "<I", 0x20000000)],
    "catalog past end of file": [(32, "<I", 0x1000000)],
    "size 2^53 sectors": [(36, "<Q", 1 << 53)],
    "size 2^62 sectors": [(36, "<Q", 1 << 62)],
    "size beyond the BAT": [(36, "<Q", 64 * MiB // 512)],
    "zero size": [(36, "<Q", 0)],
    "data_off zero": [(48, "<I", 0)],
    "data_off huge": [(48, "<I", 0xFFFFFFFF)],
    "entry far away": [(64, "<I", 0x3FFFFFFF)],
    "entry max": [(68, "<I", 0xFFFFFFFF)],
    "unclean": [(44, "<I", INUSE)],
    "ext_off": [(56, "<Q", 3)],
}


#: Damage QEMU opens and blockd refuses: a BAT past the end of the file (QEMU reads
#: zeroes there), a format extension (persistent bitmaps, not supported), a size whose
#: byte count wraps QEMU's 64-bit arithmetic (its image then has no size).
CLEAR_ERRORS = {"catalog past end of file": "extends past the end of the file",
                "ext_off": "format extensions", "size 2^62 sectors": "File too large"}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers(tmp_path, case):
    """qemu-img's message and exit status for the same damage, never a traceback; where
    QEMU reads on, blockd refuses with a clear error of its own (see CLEAR_ERRORS)."""
    image = _written(tmp_path)
    _patch(image, *HOSTILE[case])
    huge = case in ("size 2^53 sectors", "size 2^62 sectors")  # too big to map or copy
    for cmd in (["info"], ["check"]) if huge else (["info"], ["map", "--output=json"],
                                                   ["check"]):
        q = qemu_img(*cmd, "-f", "parallels", "h.prl", cwd=tmp_path)
        b = blockd_img(*cmd, "-f", "parallels", "h.prl", cwd=tmp_path)
        assert "Traceback" not in b[1]
        if case in CLEAR_ERRORS:
            assert b[2] == 1 and CLEAR_ERRORS[case] in b[1], b
            continue
        assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    if case not in CLEAR_ERRORS and not huge:
        assert _convert(tmp_path, "blockd-img") == _convert(tmp_path, "qemu-img")


def _convert(d: Path, tool: str) -> tuple[int, bytes]:
    """The raw image ``tool`` converts h.prl to, or its exit status when it fails."""
    out = d / f"{tool}.raw"
    if tool == "qemu-img":
        code = qemu_img("convert", "-f", "parallels", "-O", "raw", "h.prl", str(out),
                        cwd=d).returncode
    else:
        code = blockd_img("convert", "-f", "parallels", "-O", "raw", "h.prl", str(out),
                          cwd=d)[2]
    return code, out.read_bytes() if code == 0 else b""


def test_resize_refused(tmp_path):
    _image(tmp_path)
    same(tmp_path, "resize", "-f", "parallels", "a.prl", "20M")



# ---- random damage ------------------------------------------------------------------------

FUZZ_CASES = 120
MEMORY_BOUND = 96 * MiB
INTERESTING = [0, 1, 7, 8, 511, 512, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               1 << 32, (1 << 62) + 3, (1 << 63) - 1, (1 << 64) - 1]
FIELDS = [(16, "<I"), (20, "<I"), (24, "<I"), (28, "<I"), (32, "<I"), (36, "<Q"), (44, "<I"),
          (48, "<I"), (52, "<I"), (56, "<Q")] + [(64 + 4 * i, "<I") for i in range(12)]


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.7:
            off, spec = rng.choice(FIELDS)
            bits = 8 * struct.calcsize(spec)
            struct.pack_into(spec, out, off,
                             rng.choice(INTERESTING + [rng.getrandbits(bits)]) & (1 << bits) - 1)
        elif kind < 0.9:
            at = rng.randrange(min(len(out), 4096))
            out[at] ^= 1 << rng.randrange(8)
        else:
            del out[rng.randrange(len(out)):]
    return bytes(out)


async def _open_read_write(path: str, writable: bool) -> None:
    """Open, read (at most 32 MiB), write a little when writable, check, close: only the
    driver's errors may escape."""
    graph = BlockGraph()
    try:
        user = await open_user(graph, {"driver": "parallels", "node-name": "p",
                                       "read-only": not writable, "prealloc-size": 0,
                                       "file": {"driver": "file", "filename": path}}, writable)
    except QMPError:
        await graph.close_all()
        return
    node = user.node
    try:
        size = min(node.length(), 32 * MiB)
        for off in range(0, size, 4 * MiB):
            for call in (user.read(off, min(4 * MiB, size - off)),
                         user.block_status(off, min(4 * MiB, size - off))):
                try:
                    await call
                except OSError:
                    pass
        if writable and size:
            for off in (0, size // 2, size - 4096):
                try:
                    await user.write(max(off, 0), b"\xab" * min(4096, size))
                except OSError:
                    pass
        await node.check(0)
    finally:
        await graph.close_all()


def test_random_damage(tmp_path):
    """Damaged images opened, read, written and checked in process: a clear refusal or
    I/O, in bounded memory, never a traceback or a hang; a refused or read-only open leaves
    the file as it was."""
    rng = random.Random(4242)
    bases = []
    for opts in ("cluster_size=64k", "cluster_size=4k"):
        image = _image(tmp_path, opts, "11M", "base.prl")
        qemu_io_ok("parallels", str(image), *WRITES)
        bases.append(image.read_bytes())
    path = tmp_path / "fuzz.prl"
    for i in range(FUZZ_CASES):
        data = _mutate(bases[i % 2], rng)
        path.write_bytes(data)
        writable = i % 3 == 2
        tracemalloc.start()
        try:
            asyncio.run(asyncio.wait_for(_open_read_write(str(path), writable), 120))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < MEMORY_BOUND, (i, peak)
        if not writable:
            assert path.read_bytes() == data, i
