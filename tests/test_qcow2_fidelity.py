"""qcow2 results QEMU defines down to the table entries, compared with qemu-img and qsd.

Each case does the same thing to two copies of an image, once with the QEMU
tool and once with blockd, then requires the same guest content
(``qemu-img compare``), the same ``qemu-img map`` and, where QEMU's choice of
entry is the point (zero flags, subcluster bits), the same raw L2 entries.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from harness import HAVE_QSD, Daemon, blockd_img, map_json, qemu_img, qemu_io_ok, same

needs_qsd = pytest.mark.skipif(not HAVE_QSD, reason="qemu-storage-daemon not installed")


def l2_entries(path: Path) -> dict[int, tuple[int, int]]:
    """Every non-zero L2 entry of the active table: guest offset -> (entry, bitmap)."""
    data = path.read_bytes()
    version, = struct.unpack_from(">I", data, 4)
    cluster_bits, = struct.unpack_from(">I", data, 20)
    l1_size, l1_offset = struct.unpack_from(">IQ", data, 36)
    extended = version >= 3 and bool(struct.unpack_from(">Q", data, 72)[0] & 16)
    cs, width = 1 << cluster_bits, 16 if extended else 8
    out = {}
    for i in range(l1_size):
        table = struct.unpack_from(">Q", data, l1_offset + 8 * i)[0] & 0x00FFFFFFFFFFFE00
        for j in range(cs // width if table else 0):
            raw, bitmap = struct.unpack_from(">QQ", data, table + j * width) if extended \
                else (struct.unpack_from(">Q", data, table + j * width)[0], 0)
            if raw or bitmap:
                out[(i * (cs // width) + j) * cs] = (raw, bitmap)
    return out


def assert_same_image(mine: Path, theirs: Path, entries: bool = False,
                      offsets: bool = True) -> None:
    """Same content, map (with host offsets unless ``offsets`` is off), and a clean check."""
    res = qemu_img("compare", str(theirs), str(mine))
    assert res.returncode == 0, res.stdout + res.stderr
    check = qemu_img("check", str(mine))
    assert check.returncode == 0, check.stdout + check.stderr
    ours, qemu = map_json(mine), map_json(theirs)
    if not offsets:
        for m in (*ours, *qemu):
            m.pop("offset", None)
    assert ours == qemu
    if entries:
        assert l2_entries(mine) == l2_entries(theirs)


def _base(d: Path) -> Path:
    """An 8 MiB backing file full of 0xaa."""
    base = d / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "8M")
    qemu_io_ok("qcow2", base, "write -P 0xaa 0 8M")
    return base


def _overlays(d: Path, opts: str, size: str = "4M", backing: bool = True) -> tuple[Path, Path]:
    """q.qcow2 and b.qcow2: the same overlay (with some data of its own) for each tool."""
    if backing:
        _base(d)
    out = []
    for name in ("q.qcow2", "b.qcow2"):
        args = ["create", "-q", "-f", "qcow2", "-o", opts or "compat=1.1"]
        if backing:
            args += ["-b", "base.qcow2", "-F", "qcow2"]
        res = qemu_img(*args, name, size, cwd=d)
        assert res.returncode == 0, res.stderr
        qemu_io_ok("qcow2", d / name, "write -P 0xbb 1M 1M", "write -P 0xcc 3000k 10k")
        out.append(d / name)
    return out[0], out[1]


# ---- growing an image whose backing file is longer ----------------------------------

RESIZE = [
    ("", "1M", "4M", "off"), ("", "1000k", "4M", "off"), ("", "3005k", "6M", "off"),
    ("", "1000k", "1010k", "off"), ("extended_l2=on", "1000k", "4M", "off"),
    ("extended_l2=on", "1001k", "4M", "off"), ("extended_l2=on,cluster_size=128k", "3005k", "7M", "off"),
    ("", "1000k", "4M", "metadata"), ("extended_l2=on", "1001k", "4M", "metadata"),
    ("", "1000k", "4M", "falloc"), ("", "1000k", "4M", "full"),
    ("extended_l2=on", "1000k", "4M", "full"), ("compat=0.10", "1M", "4M", "off"),
]


@pytest.mark.parametrize("opts,shrink,grow,prealloc", RESIZE)
def test_grow_after_shrink_reads_zeroes_not_backing(tmp_path, opts, shrink, grow, prealloc):
    """The grown tail reads as zeroes, as QEMU zeroes it when the backing file would
    show through (a v2 image cannot, and the resize fails as qemu-img's does)."""
    q, b = _overlays(tmp_path, opts)
    for img in (q, b):
        assert qemu_img("resize", "-q", "--shrink", str(img), shrink).returncode == 0
    res = qemu_img("resize", "-q", f"--preallocation={prealloc}", str(q), grow)
    mine = blockd_img("resize", "-q", f"--preallocation={prealloc}", str(b), grow, cwd=tmp_path)
    assert mine == (res.stdout, res.stderr.replace("qemu-img", "blockd-img"), res.returncode)
    # falloc and full place the new clusters where each tool's allocator finds room.
    assert_same_image(b, q, entries=prealloc in ("off", "metadata"),
                      offsets=prealloc in ("off", "metadata"))


@needs_qsd
@pytest.mark.parametrize("opts", ["", "extended_l2=on"])
def test_block_resize_grow_after_shrink_reads_zeroes(tmp_path, opts):
    """The same through QMP ``block_resize``, against qemu-storage-daemon."""
    q, b = _overlays(tmp_path, opts)
    for img, qsd in ((q, True), (b, False)):
        with Daemon(str(tmp_path / "qmp.sock"), "--blockdev",
                    f"driver=qcow2,node-name=disk,file.driver=file,file.filename={img}",
                    qsd=qsd) as daemon:
            client = daemon.client()
            for size in (1000 << 10, 4 << 20):
                assert client.cmd("block_resize", **{"node-name": "disk", "size": size}) == \
                    {"return": {}}
    assert_same_image(b, q, entries=True)


def test_metadata_preallocation_keeps_backing_visible(tmp_path):
    """Extended L2 lets a preallocated overlay have a backing file: its subclusters are
    mapped but not allocated, so the backing file still shows (qemu-img's file exactly)."""
    _base(tmp_path)
    for tool, name in ((qemu_img, "q.qcow2"), (blockd_img, "b.qcow2")):
        tool("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,preallocation=metadata",
             "-b", "base.qcow2", "-F", "qcow2", name, "8M", cwd=tmp_path)
    assert (tmp_path / "b.qcow2").read_bytes() == (tmp_path / "q.qcow2").read_bytes()
    assert_same_image(tmp_path / "b.qcow2", tmp_path / "q.qcow2")


# ---- creating with an external data file --------------------------------------------

@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc", "full"])
@pytest.mark.parametrize("opts,size", [("cluster_size=64k", "8M"), ("cluster_size=64k", "10000k"),
                                       ("cluster_size=2M", "10000k"),
                                       ("extended_l2=on", "10000k"),
                                       ("data_file_raw=on", "10000k")])
def test_create_with_data_file_sizes_and_preallocates_it(tmp_path, opts, size, prealloc):
    """The data file gets qemu-img's length; falloc and full reserve all of it.

    (qemu-img itself leaves it sparse when the size ends inside a cluster: the
    zeroes it writes after the end make the file long enough before it would
    preallocate.  blockd preallocates what was asked.)
    """
    for tool, name in ((qemu_img, "q"), (blockd_img, "b")):
        res = tool("create", "-q", "-f", "qcow2", "-o",
                   f"data_file={tmp_path / name}.data,preallocation={prealloc},{opts}",
                   f"{name}.qcow2", size, cwd=tmp_path)
        assert (res.returncode if tool is qemu_img else res[2]) == 0, res
    ours, qemu = os.stat(tmp_path / "b.data"), os.stat(tmp_path / "q.data")
    assert ours.st_size == qemu.st_size
    if prealloc in ("falloc", "full"):
        assert ours.st_blocks * 512 >= ours.st_size
    assert_same_image(tmp_path / "b.qcow2", tmp_path / "q.qcow2")


# ---- zeroing through an NBD export -----------------------------------------------------

def _qemu_io_over_nbd(d: Path, image: Path, qsd: bool, cmds: list[str]) -> None:
    """Serve ``image`` from qsd or blockd over NBD and run qemu-io commands on the export."""
    nbd = d / "nbd.sock"
    with Daemon(str(d / "qmp.sock"), "--blockdev",
                f"driver=qcow2,node-name=disk,file.driver=file,file.filename={image}",
                "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                "--export", "type=nbd,id=e,node-name=disk,writable=on", qsd=qsd):
        qemu_io_ok("raw", f"nbd+unix:///disk?socket={nbd}", *cmds)


ZERO_CMDS = ["write -P 1 0 64k", "write -z 4k 8k", "write -z 20k 3k", "write -z 64k 10k",
             "write -P 2 200k 2k", "write -z 198k 6k", "write -z 300k 100k", "write -z 1000k 20k",
             "write -z -u 2040k 16k", "write -z 3M 512", "write -P 3 3200k 64k",
             "write -z -u 3210k 2k", "write -z 3300k 1k", "write -z 4000k 96k"]


@needs_qsd
@pytest.mark.parametrize("opts,backing", [
    ("extended_l2=on", False), ("extended_l2=on", True), ("extended_l2=on,cluster_size=128k", True),
    ("compat=1.1", False), ("compat=1.1", True), ("compat=0.10", False), ("compat=0.10", True),
    ("cluster_size=4k", True)])
def test_zero_writes_leave_qsd_entries(tmp_path, opts, backing):
    """Small and unaligned zero writes: a zero cluster (or zero subclusters) wherever the
    rest already reads as zeroes, data only where QEMU writes data."""
    q, b = _overlays(tmp_path, opts, backing=backing)
    _qemu_io_over_nbd(tmp_path, q, True, ZERO_CMDS)
    _qemu_io_over_nbd(tmp_path, b, False, ZERO_CMDS)
    assert_same_image(b, q, entries=True)


@needs_qsd
def test_small_zero_write_makes_a_zero_cluster(tmp_path):
    """``write -z 0 4k`` on an unallocated cluster without backing file: one zero
    cluster, as qsd leaves it, not a data cluster."""
    q, b = _overlays(tmp_path, "", backing=False)
    for img in (q, b):
        qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    _qemu_io_over_nbd(tmp_path, q, True, ["write -z 0 4k"])
    _qemu_io_over_nbd(tmp_path, b, False, ["write -z 0 4k"])
    assert l2_entries(b) == {0: (1, 0)}
    assert_same_image(b, q, entries=True)


# ---- convert ---------------------------------------------------------------------------

def _convert_sources(d: Path) -> None:
    """base.qcow2 (8 MiB of 0xaa), short.qcow2 and odd.qcow2 (1 MiB and 1000 KiB of it),
    top.qcow2 over base.qcow2 and the standalone s.qcow2, each with data equal to the
    backing file's, other data, zero clusters, unallocated runs and zero data."""
    _base(d)
    for name, size in (("short.qcow2", "1M"), ("odd.qcow2", "1000k")):
        qemu_img("create", "-q", "-f", "qcow2", str(d / name), size)
        qemu_io_ok("qcow2", d / name, f"write -P 0xaa 0 {size}")
    cmds = ["write -P 0xaa 0 128k", "write -P 0xcc 1M 64k", "write -z 512k 64k",
            "write -z 2M 128k", "write -P 0 3M 64k", "write -P 0xcc 3500k 4k"]
    # The size ends inside a cluster: qemu-img -c copies that cluster whole.
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             str(d / "top.qcow2"), "4128k", cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", str(d / "s.qcow2"), "4128k")
    for name in ("top.qcow2", "s.qcow2"):
        qemu_io_ok("qcow2", d / name, *cmds)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("backing", ["base.qcow2", "short.qcow2", "odd.qcow2"])
@pytest.mark.parametrize("source", ["top.qcow2", "s.qcow2"])
def test_convert_with_backing_file(tmp_path, source, backing, compress):
    """-B: what the source's top layer leaves to its backing file stays unallocated,
    what it holds as zeroes becomes zero clusters up to the end of the new backing
    file, and a source without backing file reads as zeroes where it is unallocated
    (the new backing file must not show through there)."""
    _convert_sources(tmp_path)
    args = ["convert", *(["-c"] if compress else []), "-O", "qcow2", "-B", backing, "-F", "qcow2",
            source]
    res = qemu_img(*args, "q.qcow2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert blockd_img(*args, "b.qcow2", cwd=tmp_path) == ("", "", 0)
    assert_same_image(tmp_path / "b.qcow2", tmp_path / "q.qcow2", offsets=not compress)
    if source == "s.qcow2" or backing == "base.qcow2":  # else the backing files differ
        assert qemu_img("compare", source, "b.qcow2", cwd=tmp_path).returncode == 0


SECRET_OBJ = ["--object", "secret,id=s0,data=abc"]


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_convert_into_preallocated_encrypted_image(tmp_path, prealloc):
    """Preallocated clusters of an encrypted image do not read as zeroes (the file's
    zeroes are deciphered), so zeroes are written there, as qemu-img does."""
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "4M")
    qemu_io_ok("qcow2", src, "write -P 0x11 64k 128k", "write -P 0x22 1M 64k", "write -z 2M 64k",
               "write -P 0 3M 64k")
    opts = f"encrypt.format=luks,encrypt.key-secret=s0,preallocation={prealloc},encrypt.iter-time=10"
    res = qemu_img("convert", *SECRET_OBJ, "-O", "qcow2", "-o", opts, "src.qcow2", "q.qcow2",
                   cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert blockd_img("convert", *SECRET_OBJ, "-O", "qcow2", "-o", opts, "src.qcow2", "b.qcow2",
                      cwd=tmp_path)[2] == 0
    opened = {n: f"driver=qcow2,file.filename={n},encrypt.key-secret=s0" for n in ("q.qcow2", "b.qcow2")}
    res = qemu_img("compare", *SECRET_OBJ, "--image-opts", "driver=qcow2,file.filename=src.qcow2",
                   opened["b.qcow2"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    maps = [qemu_img("map", *SECRET_OBJ, "--output=json", "--image-opts", opened[n],
                     cwd=tmp_path).stdout for n in ("q.qcow2", "b.qcow2")]
    assert json.loads(maps[1]) == json.loads(maps[0])


# ---- rebase ----------------------------------------------------------------------------

@pytest.mark.parametrize("opts", ["", "extended_l2=on"])
@pytest.mark.parametrize("old,new", [("short", "base"), ("base", "short"), ("short", ""),
                                     ("short", "odd")])
def test_rebase_across_backing_file_ends(tmp_path, opts, old, new):
    """Past the old backing file's end its content is zeroes: where the new one differs
    there, zero clusters are written, not data (qemu-img's map)."""
    _base(tmp_path)
    for name, size, pattern in (("short.qcow2", "1000k", "0xaa"), ("odd.qcow2", "2500k", "0xdd")):
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / name), size)
        qemu_io_ok("qcow2", tmp_path / name, f"write -P {pattern} 0 {size}")
    for name in ("q.qcow2", "b.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts or "compat=1.1", "-b", f"{old}.qcow2",
                 "-F", "qcow2", name, "4M", cwd=tmp_path)
        qemu_io_ok("qcow2", tmp_path / name, "write -P 0xcc 1M 64k", "write -z 3M 64k")
    args = ["rebase", "-b", f"{new}.qcow2", "-F", "qcow2"] if new else ["rebase", "-b", ""]
    res = qemu_img(*args, "q.qcow2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert blockd_img(*args, "b.qcow2", cwd=tmp_path) == ("", "", 0)
    assert_same_image(tmp_path / "b.qcow2", tmp_path / "q.qcow2", entries=True)


# ---- measure ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v3.qcow2 with bitmaps blockd-img added (every granularity spelling), v2.qcow2, and
    x.luks; only read by the tests, so made once."""
    d = tmp_path_factory.mktemp("measure")
    qemu_img("create", "-q", "-f", "qcow2", str(d / "v3.qcow2"), "100M")
    qemu_io_ok("qcow2", d / "v3.qcow2", "write -P 1 0 3M", "write -P 2 50M 64k")
    for i, args in enumerate([["--granularity", "512"], ["--granularity=2M"], ["-g", "64k"],
                              []]):
        assert blockd_img("bitmap", "--add", *args, "v3.qcow2", f"bitmap{i}" * (i + 1),
                          cwd=d)[2] == 0
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(d / "v2.qcow2"), "100M")
    res = qemu_img("create", "-q", "-f", "luks", *SECRET_OBJ, "-o", "key-secret=s0,iter-time=10",
                   str(d / "x.luks"), "20M")
    assert res.returncode == 0, res.stderr
    return d


LUKS_OPEN = ["--image-opts", "driver=luks,file.filename=x.luks,key-secret=s0"]
MEASURE = [
    ["-O", "qcow2", "v3.qcow2"], ["--output=json", "-O", "qcow2", "v3.qcow2"],
    ["-O", "qcow2", "-o", "cluster_size=2M", "v3.qcow2"],
    ["-O", "qcow2", "-o", "cluster_size=512", "v3.qcow2"],
    ["-O", "qcow2", "-o", "compat=0.10", "v3.qcow2"], ["-O", "qcow2", "v2.qcow2"],
    ["--output=json", "-O", "qcow2", "v2.qcow2"],
    ["-O", "luks", *SECRET_OBJ, "-o", "key-secret=s0,iter-time=10", "v3.qcow2"],
    ["-O", "luks", *SECRET_OBJ, "-o", "key-secret=s0,iter-time=10", "--size", "10G"],
    ["-O", "luks", *SECRET_OBJ, "-o", "key-secret=s0,iter-time=10,cipher-alg=aes-128", "--size",
     "1G"],
    ["-O", "luks", *SECRET_OBJ, "-o", "key-secret=s0,iter-time=10,cipher-alg=aes-128,"
     "cipher-mode=cbc,ivgen-alg=essiv", "--size", "1G"],
    ["-O", "luks", *SECRET_OBJ, "-o", "key-secret=s0,iter-time=10,cipher-alg=twofish-256",
     "--size", "1G"],
    ["-O", "qcow2", *SECRET_OBJ, "-o", "encrypt.format=luks,encrypt.key-secret=s0,"
     "encrypt.iter-time=10", "v3.qcow2"],
    ["-O", "qcow2", *SECRET_OBJ, "-o", "encrypt.format=luks,encrypt.key-secret=s0,"
     "encrypt.iter-time=10,cluster_size=2M", "--size", "1G"],
    ["-O", "qcow2", *SECRET_OBJ, *LUKS_OPEN],
    ["-O", "luks", *SECRET_OBJ, "-o", "key-secret=s0,iter-time=10", *LUKS_OPEN],
    ["-O", "raw", *SECRET_OBJ, *LUKS_OPEN],
    # refused as qemu-img refuses them
    ["-O", "luks", "--size", "1G"],
    ["-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"],
    ["-O", "luks", *SECRET_OBJ, "-o", "key-secret=nosuch", "--size", "1G"],
    ["-O", "qcow2", *SECRET_OBJ, "-o", "encrypt.format=luks,encrypt.key-secret=s0,"
     "encrypt.cipher-alg=bogus", "--size", "1G"],
    ["-O", "luks", *SECRET_OBJ, "-o", "key-secret=s0,cipher-alg=des,cipher-mode=cbc", "--size",
     "1G"],
]


@pytest.mark.parametrize("args", MEASURE, ids=lambda a: " ".join(a).replace(SECRET_OBJ[1], "s0"))
def test_measure_as_qemu_img(measured, args):
    """Bitmaps counted only when both sides could store them (qcow2 v3), LUKS header
    room for luks targets and LUKS-encrypted qcow2 targets, LUKS sources read."""
    same(measured, "measure", *args)


@pytest.mark.parametrize("args", [
    ["-f", "luks", "-o", "key-secret=s0,cipher-alg=bogus"],
    ["-f", "luks", "-o", "key-secret=s0,hash-alg=nope"],
    ["-f", "luks", "-o", "cipher-mode=nope"],
    ["-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=bogus"],
])
def test_create_refuses_unknown_crypto_names(tmp_path, args):
    """Names outside QEMU's enums get its message (were a KeyError, or another text)."""
    same(tmp_path, "create", "-q", *SECRET_OBJ, *args, "t.img", "1M")


# ---- bitmap directory order ---------------------------------------------------------

def _bitmap_list(path: Path) -> list[tuple[str, list[str], int]]:
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    return [(b["name"], b["flags"], b["granularity"])
            for b in info["format-specific"]["data"].get("bitmaps", [])]


def test_bitmap_directory_order_across_runs(tmp_path):
    """Bitmaps already stored keep their place in the directory, new ones follow (each
    run rewrote it in the reverse order)."""
    steps = [["--add"], ["--add"], ["--add", "--granularity", "8k"], ["--remove"], ["--add"],
             ["--disable"], ["--clear"], ["--add"]]
    names = ["bm1", "bm2", "bm3", "bm2", "bm4", "bm1", "bm3", "bm5"]
    for name in ("q.qcow2", "b.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / name), "100M")
    for step, bitmap in zip(steps, names):
        assert qemu_img("bitmap", *step, "q.qcow2", bitmap, cwd=tmp_path).returncode == 0
        assert blockd_img("bitmap", *step, "b.qcow2", bitmap, cwd=tmp_path)[2] == 0
    assert _bitmap_list(tmp_path / "b.qcow2") == _bitmap_list(tmp_path / "q.qcow2")
    assert qemu_img("check", str(tmp_path / "b.qcow2")).returncode == 0


@needs_qsd
def test_bitmap_directory_order_after_a_session(tmp_path):
    """Bitmaps added in one session go after the stored ones, newest first, as qsd
    writes them."""
    for name in ("q.qcow2", "b.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / name), "10M")
        for bitmap in ("x", "y", "z"):
            qemu_img("bitmap", "--add", str(tmp_path / name), bitmap)
    for name, qsd in (("q.qcow2", True), ("b.qcow2", False)):
        with Daemon(str(tmp_path / "qmp.sock"), "--blockdev",
                    f"driver=qcow2,node-name=d,file.driver=file,"
                    f"file.filename={tmp_path / name}", qsd=qsd) as daemon:
            client = daemon.client()
            for bitmap in ("a", "b"):
                assert client.cmd("block-dirty-bitmap-add", node="d", name=bitmap,
                                  persistent=True) == {"return": {}}
            assert client.cmd("block-dirty-bitmap-remove", node="d", name="y") == \
                {"return": {}}
            assert client.cmd("block-dirty-bitmap-add", node="d", name="c",
                              persistent=True) == {"return": {}}
    assert _bitmap_list(tmp_path / "b.qcow2") == _bitmap_list(tmp_path / "q.qcow2")
