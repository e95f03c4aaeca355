"""The vhdx driver against qemu-img and qemu-io, both ways.

Images qemu-img makes (dynamic, fixed, block sizes, log sizes, written by
qemu-io) read as qemu-img reads them, by ``convert`` and over NBD; the same
writes by QEMU and through blockd leave the same file but for the random
GUIDs and the checksums over them; images blockd-img makes equal
qemu-img's likewise and pass ``qemu-img check``; a dirty log is replayed as
``qemu-img check -r all`` replays it and refused read-only with QEMU's
message; hostile headers, region tables, metadata, BATs and logs fail as
qemu-img fails them, without a traceback.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import subprocess
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockd.block.graph import BlockGraph
from blockd.drivers.vhdx import layout as L
from blockd.errors import QMPError
from harness import Daemon, blockd_img, qemu_img, qemu_io_ok, same
from test_hostile_images import CASES, MEMORY_BOUND, _fuzz
from test_vpc import WRITES, check_nbd_read, check_views, raw_bytes, serve

MiB = 1 << 20
#: Enough to hold every image's metadata here (a 0-byte image has a 64 MiB BAT).
HEAD = 80 * MiB


def _qemu_image(d: Path, opts: str, size: str = "11M", name: str = "a.vhdx") -> Path:
    image = d / name
    r = qemu_img("create", "-q", "-f", "vhdx", "-o", opts, str(image), size)
    assert r.returncode == 0, r.stderr
    return image


def masked(path: Path, page83: bool = True) -> tuple[int, bytes]:
    """(file size, head of the file) with what is random masked: the GUIDs of the headers
    and log entries and the checksums over them (and the page 83 GUID if ``page83``), and
    the rest of a log entry's descriptor sector, which QEMU leaves uninitialised.
    Whether a header's log GUID is set is kept, and the sequence numbers as counted from
    the lower one (new images start at a random one)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        data = bytearray(f.read(HEAD))
    if len(data) < L.HEADER_SECTION_END:  # creation failed before the headers
        return size, bytes(data)
    base = min(struct.unpack_from("<Q", data, off + 8)[0] for off in L.HEADER_OFFSETS)
    for off in L.HEADER_OFFSETS:
        struct.pack_into("<Q", data, off + 8, struct.unpack_from("<Q", data, off + 8)[0] - base)
        has_log = data[off + 48:off + 64] != bytes(16)
        data[off + 4:off + 8] = bytes(4)
        data[off + 16:off + 64] = bytes(48)
        data[off + 48] = has_log
    log_off, log_len = struct.unpack_from("<IQ", data, L.HEADER_OFFSETS[0] + 68)
    for s in range(log_len, log_len + log_off, 4096):
        if data[s:s + 4] == b"loge":
            data[s + 4:s + 8] = bytes(4)
            data[s + 32:s + 48] = bytes(16)
            end = min(64 + 32 * struct.unpack_from("<I", data, s + 24)[0], 4096)
            data[s + end:s + 4096] = bytes(4096 - end)
    if page83:
        meta = struct.unpack_from("<Q", data, L.REGION_TABLE_OFFSETS[0] + 48 + 16)[0]
        item = meta + L.METADATA_TABLE_SIZE + 16
        data[item:item + 16] = bytes(16)
    return size, bytes(data)


# ---- reading what QEMU wrote ---------------------------------------------------------------

READ_OPTS = ["subformat=dynamic", "subformat=fixed", "block_size=1M", "block_size=32M",
             "block_state_zero=off", "log_size=2M", "subformat=fixed,block_state_zero=off"]


@pytest.mark.parametrize("opts", READ_OPTS)
def test_qemu_images_read_alike(tmp_path, opts):
    image = _qemu_image(tmp_path, opts)
    qemu_io_ok("vhdx", str(image), *WRITES)
    check_views(tmp_path, "vhdx", "a.vhdx")
    for cmd in (["check"], ["check", "--output=json"]):
        same(tmp_path, *cmd, "-f", "vhdx", "a.vhdx")
    check_nbd_read(tmp_path, "vhdx", image)


def test_probed_and_odd_sizes(tmp_path):
    for size in ("0", "10000", "1G"):
        _qemu_image(tmp_path, "subformat=dynamic", size, f"s{size}.vhdx")
        for cmd in (["info", "--output=json"], ["map", "--output=json"], ["check"]):
            same(tmp_path, *cmd, f"s{size}.vhdx")


# ---- writing as QEMU writes --------------------------------------------------------------

@pytest.mark.parametrize("opts", ["subformat=dynamic", "subformat=fixed", "block_size=1M",
                                  "block_state_zero=off"])
def test_writes_match_qemu(tmp_path, opts):
    """The same writes by qemu-io and by qemu-io through a blockd export: the same BAT,
    log entries, header sequence numbers and data."""
    image = _qemu_image(tmp_path, opts, "300M")
    qemu_io_ok("vhdx", str(image), "write -P 0x99 2M 8k")
    writes = WRITES + ["write -P 0x66 2M 512", "write -P 0x77 10M 3M", "write -P 0x78 200M 4k",
                       "write -P 0x79 127M 2M", "write -z 250M 1M"]
    theirs, ours = tmp_path / "theirs.vhdx", tmp_path / "ours.vhdx"
    shutil.copyfile(image, theirs)
    shutil.copyfile(image, ours)
    qemu_io_ok("vhdx", str(theirs), *writes)
    daemon, uri = serve(tmp_path, "vhdx", ours, writable=True)
    try:
        qemu_io_ok("raw", uri, *writes)
    finally:
        daemon.stop()
    assert masked(ours, page83=False) == masked(theirs, page83=False)
    seq = [struct.unpack_from("<Q", masked_head(p), o + 8)[0]
           for p in (ours, theirs) for o in L.HEADER_OFFSETS]
    assert seq[:2] == seq[2:]
    assert qemu_img("compare", "-f", "vhdx", "-F", "vhdx", str(ours), str(theirs)).returncode == 0
    assert qemu_img("check", "-f", "vhdx", str(ours)).returncode == 0


def masked_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1 << 20)


def test_parallel_writes_through_nbd(tmp_path):
    """Many requests in flight into a blockd export: consistent image, the source's data."""
    src = tmp_path / "src.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(src), "40M").returncode == 0
    qemu_io_ok("raw", str(src), *WRITES, "write -P 0x5a 20M 15M", "write -P 0x5b 36M 3M")
    image = _qemu_image(tmp_path, "block_size=1M", "40M", "t.vhdx")
    daemon, uri = serve(tmp_path, "vhdx", image, writable=True)
    try:
        r = qemu_img("convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw", str(src), uri)
        assert r.returncode == 0, r.stderr
    finally:
        daemon.stop()
    r = qemu_img("compare", "-f", "raw", "-F", "vhdx", str(src), str(image))
    assert r.returncode == 0, r.stdout + r.stderr
    assert qemu_img("check", "-f", "vhdx", str(image)).returncode == 0


@pytest.mark.parametrize("opts", ["subformat=dynamic", "subformat=fixed", "block_size=2M"])
def test_convert_into_vhdx(tmp_path, opts):
    """blockd-img convert -O vhdx makes the file qemu-img convert makes."""
    src = tmp_path / "src.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(src), "11M").returncode == 0
    qemu_io_ok("raw", str(src), *WRITES)
    out = blockd_img("convert", "-O", "vhdx", "-o", opts, "src.raw", "o.vhdx", cwd=tmp_path)
    assert out[2] == 0, out
    r = qemu_img("convert", "-O", "vhdx", "-o", opts, "src.raw", "q.vhdx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = qemu_img("compare", "-f", "raw", "-F", "vhdx", str(src), str(tmp_path / "o.vhdx"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert qemu_img("check", "-f", "vhdx", str(tmp_path / "o.vhdx")).returncode == 0
    assert masked(tmp_path / "o.vhdx") == masked(tmp_path / "q.vhdx")
    check_views(tmp_path, "vhdx", "o.vhdx")


# ---- create ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["0", "512", "10000", "20M", "1G", "200G"])
@pytest.mark.parametrize("opts", ["subformat=dynamic", "subformat=fixed", "block_size=1M",
                                  "block_size=3M,log_size=1500k", "block_state_zero=off",
                                  "block_size=0", "block_size=512M",
                                  "subformat=fixed,block_state_zero=off"])
def test_create_like_qemu(tmp_path, size, opts):
    """Same messages and the same file, but for the random GUIDs."""
    if "fixed" in opts and size == "200G":
        pytest.skip("a 200G fixed image is too much to write sparsely twice here")
    argv = ["create", "-f", "vhdx", "-o", opts, "x.vhdx", size]
    q = qemu_img(*argv, cwd=tmp_path)
    image = tmp_path / "x.vhdx"
    theirs = masked(image) if image.exists() else None
    image.unlink(missing_ok=True)
    b = blockd_img(*argv, cwd=tmp_path)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    assert masked(image) == theirs  # a failure leaves the file as far as it got
    if q.returncode:
        return
    same(tmp_path, "check", "-f", "vhdx", "x.vhdx")
    same(tmp_path, "info", "--output=json", "-f", "vhdx", "x.vhdx")


@pytest.mark.parametrize("opts", ["subformat=bogus", "block_size=3000", "log_size=5G",
                                  "block_state_zero=maybe", "help"])
def test_create_errors(tmp_path, opts):
    same(tmp_path, "create", "-f", "vhdx", "-o", opts, "x.vhdx", "10M")


def test_create_too_large(tmp_path):
    same(tmp_path, "create", "-f", "vhdx", "x.vhdx", "65T")


def test_blockdev_create(tmp_path):
    """The QMP job with QEMU's option checks, and an image qemu-img accepts."""
    path = tmp_path / "c.vhdx"
    with Daemon(str(tmp_path / "qmp.sock")) as daemon:
        c = daemon.client()
        assert "error" not in c.create_job("f", {"driver": "file", "filename": str(path),
                                                 "size": 0})
        assert "return" in c.cmd("blockdev-add", driver="file", filename=str(path),
                                 **{"node-name": "f0"})
        for bad, message in ((
                {"log-size": 3 * MiB + 1}, "Log size must be a multiple of 1 MB"),
                ({"block-size": 3 * MiB}, "Block size must be a power of two"),
                ({"block-size": 512 * MiB}, "Block size must not exceed 268435456"),
                ({"size": 65 << 40}, "Image size too large; max of 64TB")):
            opts = {"driver": "vhdx", "file": "f0", "size": MiB, **bad}
            assert c.create_job("x", opts)["error"] == message
        assert "error" not in c.create_job("v", {"driver": "vhdx", "file": "f0",
                                                 "size": 5 * MiB, "subformat": "fixed",
                                                 "block-size": 2 * MiB, "log-size": 2 * MiB})
        c.cmd("blockdev-del", **{"node-name": "f0"})
    info = json.loads(qemu_img("info", "--output=json", "-f", "vhdx", str(path)).stdout)
    assert info["virtual-size"] == 5 * MiB and info["cluster-size"] == 2 * MiB
    assert qemu_img("check", "-f", "vhdx", str(path)).returncode == 0


# ---- the log ---------------------------------------------------------------------------------

def make_dirty(image: Path) -> None:
    """Leave ``image`` (whose log holds flushed entries) as a crash would between writing a
    log entry and replaying it: the current header names the last entry's log GUID and the
    BAT sector it rewrites is wiped in place."""
    data = bytearray(image.read_bytes())
    last = max(s for s in range(MiB, 2 * MiB, 4096) if data[s:s + 4] == b"loge")
    guid = bytes(data[last + 32:last + 48])
    target = struct.unpack_from("<Q", data, last + 64 + 16)[0]
    data[target:target + 4096] = bytes(4096)
    headers = [L.parse_header(bytes(data[o:o + 4096])) for o in L.HEADER_OFFSETS]
    cur = 0 if headers[0].sequence > headers[1].sequence else 1
    headers[cur].log_guid = guid
    off = L.HEADER_OFFSETS[cur]
    data[off:off + 80] = L.header_slot(headers[cur], bytes(data[off:off + 4096]))
    image.write_bytes(bytes(data))


def test_dirty_log(tmp_path):
    """Refused read-only with QEMU's message; replayed by check -r all as qemu-img does,
    leaving the same file and the data as before the crash."""
    image = _qemu_image(tmp_path, "block_size=1M")
    qemu_io_ok("vhdx", str(image), *WRITES)
    clean = raw_bytes(tmp_path, "vhdx", str(image))
    make_dirty(image)
    for cmd in (["info"], ["map", "--output=json"], ["check"]):
        same(tmp_path, *cmd, "-f", "vhdx", "a.vhdx")
    theirs = tmp_path / "theirs.vhdx"
    shutil.copyfile(image, theirs)
    r = qemu_img("check", "-r", "all", "-f", "vhdx", "theirs.vhdx", cwd=tmp_path)
    b = blockd_img("check", "-r", "all", "-f", "vhdx", "a.vhdx", cwd=tmp_path)
    assert b == (r.stdout, r.stderr, r.returncode)
    assert masked(image, page83=False) == masked(theirs, page83=False)
    assert raw_bytes(tmp_path, "vhdx", "a.vhdx", "blockd-img") == clean


def test_dirty_log_replayed_by_daemon(tmp_path):
    """A read-write blockdev-add replays the log; a read-only one is refused."""
    image = _qemu_image(tmp_path, "block_size=1M")
    qemu_io_ok("vhdx", str(image), *WRITES)
    clean = raw_bytes(tmp_path, "vhdx", str(image))
    make_dirty(image)
    with Daemon(str(tmp_path / "qmp.sock")) as daemon:
        c = daemon.client()
        r = c.cmd("blockdev-add", driver="vhdx", **{"node-name": "ro", "read-only": True},
                  file={"driver": "file", "filename": str(image)})
        assert r["error"]["desc"] == (f"VHDX image file '{image}' opened read-only, but "
                                      "contains a log that needs to be replayed"), r
        r = c.cmd("blockdev-add", driver="vhdx", **{"node-name": "rw"},
                  file={"driver": "file", "filename": str(image)})
        assert "return" in r, r
        c.cmd("blockdev-del", **{"node-name": "rw"})
    assert qemu_img("check", "-f", "vhdx", str(image)).returncode == 0
    assert raw_bytes(tmp_path, "vhdx", "a.vhdx") == clean


def _failing_bat_write(image: Path) -> dict:
    """``image`` as a vhdx node whose file fails the first write to the BAT's first
    sector: the log entry is written, its replay fails, and the log stays dirty."""
    rule = {"event": "pwritev", "sector": 2 * MiB // 512, "errno": 5, "once": True}
    return {"driver": "vhdx", "file": {"driver": "blkdebug", "inject-error": [rule],
                                       "image": {"driver": "file", "filename": str(image)}}}


def test_log_left_by_failed_replay(tmp_path):
    """A write whose BAT update fails after its log entry is written: blockd leaves the
    file QEMU leaves (same log entry, same headers), qemu-img refuses both read-only, and
    both tools replay them alike."""
    image = _qemu_image(tmp_path, "block_size=1M")
    theirs, ours = tmp_path / "theirs.vhdx", tmp_path / "ours.vhdx"
    shutil.copyfile(image, theirs)
    shutil.copyfile(image, ours)
    r = subprocess.run(["qemu-io", "-c", "write -P 0x11 0 4k",
                        "json:" + json.dumps(_failing_bat_write(theirs))],
                       capture_output=True, text=True, timeout=120)
    assert "write failed: Input/output error" in r.stdout, r.stdout + r.stderr
    nbd = str(tmp_path / "nbd.sock")
    daemon = Daemon(str(tmp_path / "qmp.sock"),
                    "--blockdev", json.dumps({"node-name": "img", **_failing_bat_write(ours)}),
                    "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                    "--export", "type=nbd,id=e0,node-name=img,writable=on")
    try:
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k",
                            f"nbd+unix:///img?socket={nbd}"],
                           capture_output=True, text=True, timeout=120)
        assert "write failed: Input/output error" in r.stdout, r.stdout + r.stderr
    finally:
        daemon.stop()
    assert masked(ours, page83=False) == masked(theirs, page83=False)
    for name in ("ours.vhdx", "theirs.vhdx"):
        r = qemu_img("info", name, cwd=tmp_path)
        assert r.returncode == 1 and "contains a log that needs to be replayed" in r.stderr
    r = qemu_img("check", "-r", "all", "theirs.vhdx", cwd=tmp_path)
    b = blockd_img("check", "-r", "all", "ours.vhdx", cwd=tmp_path)
    assert b == (r.stdout, r.stderr, r.returncode)
    assert masked(ours, page83=False) == masked(theirs, page83=False)
    assert qemu_img("compare", str(ours), str(theirs)).returncode == 0


# ---- 4096-byte logical sectors ----------------------------------------------------------------

def test_4k_logical_sectors(tmp_path):
    """An image with 4096-byte logical sectors (as Hyper-V makes) reads with its size and
    data.  QEMU 7.2 refuses it (only 512 is supported there): blockd deliberately differs."""
    image = _qemu_image(tmp_path, "block_size=1M", "16M")
    qemu_io_ok("vhdx", str(image), *WRITES)
    expected = raw_bytes(tmp_path, "vhdx", str(image))
    data = bytearray(image.read_bytes())
    meta = struct.unpack_from("<Q", data, L.REGION_TABLE_OFFSETS[0] + 48 + 16)[0]
    struct.pack_into("<I", data, meta + L.METADATA_TABLE_SIZE + 32, 4096)
    image.write_bytes(bytes(data))
    info = json.loads(blockd_img("info", "--output=json", "a.vhdx", cwd=tmp_path)[0])
    assert info["virtual-size"] == 16 * MiB
    assert raw_bytes(tmp_path, "vhdx", "a.vhdx", "blockd-img") == expected
    r = qemu_img("info", "a.vhdx", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.endswith("Operation not supported\n"), r.stderr
    # Writes through a blockd export land where reads find them.
    daemon, uri = serve(tmp_path, "vhdx", image, writable=True)
    try:
        qemu_io_ok("raw", uri, "write -P 0x61 6M 8k", "write -P 0x62 15M 1M")
    finally:
        daemon.stop()
    got = raw_bytes(tmp_path, "vhdx", "a.vhdx", "blockd-img")
    want = bytearray(expected)
    want[6 * MiB:6 * MiB + 8192] = b"\x61" * 8192
    want[15 * MiB:16 * MiB] = b"\x62" * MiB
    assert got == bytes(want)


# ---- check and hostile images -------------------------------------------------------------------

def _patched(d: Path, *patches: tuple[int, str, int | bytes]) -> Path:
    image = _qemu_image(d, "block_size=1M", "11M", "h.vhdx")
    qemu_io_ok("vhdx", str(image), "write -P 1 0 4k", "write -P 2 3M 4k")
    data = bytearray(image.read_bytes())
    for off, fmt, value in patches:
        struct.pack_into(fmt, data, off, value)
    image.write_bytes(bytes(data))
    return image


def _fix_checksum(image: Path, off: int, size: int) -> None:
    data = bytearray(image.read_bytes())
    block = bytearray(data[off:off + size])
    L.set_checksum(block)
    data[off:off + size] = block
    image.write_bytes(bytes(data))


H1, H2, RT = L.HEADER_OFFSETS[0], L.HEADER_OFFSETS[1], L.REGION_TABLE_OFFSETS[0]
BAT = 2 * MiB
META = 3 * MiB
#: (patches, structures whose checksum is recomputed after patching).
HOSTILE = {
    "signature": ([(0, "<8s", b"vhdxfilx")], []),
    "both headers bad": ([(H1 + 100, "<I", 1), (H2 + 100, "<I", 1)], []),
    "one header bad": ([(H1 + 100, "<I", 1)], []),
    "header version": ([(H1 + 66, "<H", 2), (H2 + 66, "<H", 2)], [H1, H2]),
    "log version": ([(H1 + 64, "<H", 1), (H2 + 64, "<H", 1)], [H1, H2]),
    "log offset": ([(H1 + 72, "<Q", 12345), (H2 + 72, "<Q", 12345)], [H1, H2]),
    "same sequence": ([(H1 + 8, "<Q", 7), (H2 + 8, "<Q", 7)], [H1, H2]),
    "region checksum": ([(RT + 100, "<I", 1)], []),
    "region signature": ([(RT, "<4s", b"rega")], [RT]),
    "region count": ([(RT + 8, "<I", 5000)], [RT]),
    "region overlap": ([(RT + 16 + 16, "<Q", META)], [RT]),
    "region over log": ([(RT + 16 + 16, "<Q", MiB)], [RT]),
    "unknown required region": ([(RT + 16 + 32, "<16s", b"x" * 16), (RT + 16 + 32 + 28, "<I", 1)],
                                [RT]),
    "no metadata region": ([(RT + 8, "<I", 1)], [RT]),
    "metadata signature": ([(META, "<8s", b"metadatx")], []),
    "metadata count": ([(META + 10, "<H", 5000)], []),
    "block size": ([(META + 65536, "<I", 3 * MiB)], []),
    "block size small": ([(META + 65536, "<I", 4096)], []),
    "has parent": ([(META + 65536 + 4, "<I", 2)], []),
    "sector size": ([(META + 65536 + 32, "<I", 1024)], []),
    "huge size": ([(META + 65536 + 8, "<Q", 1 << 62)], []),
    "bat too small": ([(RT + 16 + 24, "<I", 8)], [RT]),
    "bat beyond end of file": ([(RT + 16 + 16, "<Q", 16 * MiB), (RT + 16 + 24, "<I", 1 << 30),
                                (META + 65536 + 8, "<Q", 100 << 40)], [RT]),
    "huge bat beyond end of file": ([(RT + 16 + 16, "<Q", 16 * MiB),
                                     (RT + 16 + 24, "<I", 0xFFF00000),
                                     (META + 65536 + 8, "<Q", 400 << 40)], [RT]),
    "bat past end": ([(BAT, "<Q", (1 << 40) | 6)], []),
    "bat over metadata": ([(BAT, "<Q", META | 6)], []),
    "bat overflow": ([(BAT, "<Q", 0xFFFFFFFFFFF00006)], []),
    "bat partially present": ([(BAT, "<Q", (12 << 20) | 7)], []),
    "bat undefined state": ([(BAT, "<Q", 4)], []),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_images(tmp_path, case):
    """qemu-img's messages and exit status for the same damage, never a traceback."""
    patches, sums = HOSTILE[case]
    image = _patched(tmp_path, *patches)
    for off in sums:
        _fix_checksum(image, off, 4096 if off in (H1, H2) else L.REGION_TABLE_SIZE)
    for cmd in (["info"], ["map", "--output=json"], ["check"], ["check", "--output=json"]):
        q = qemu_img(*cmd, "-f", "vhdx", "h.vhdx", cwd=tmp_path)
        b = blockd_img(*cmd, "-f", "vhdx", "h.vhdx", cwd=tmp_path)
        assert "Traceback" not in b[1]
        assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode), cmd
    assert raw_or_error(tmp_path, "blockd-img") == raw_or_error(tmp_path, "qemu-img")


def test_block_in_header_section(tmp_path):
    """A present block at file offset 0: QEMU reads the file's own header as the guest's
    data; blockd fails the read instead (it opens and checks as QEMU does)."""
    _patched(tmp_path, (BAT, "<Q", 6))
    for cmd in (["info"], ["check"]):
        same(tmp_path, *cmd, "-f", "vhdx", "h.vhdx")
    code, data = raw_or_error(tmp_path, "blockd-img")
    assert code == 1 and not data


def raw_or_error(d: Path, tool: str) -> tuple[int, bytes]:
    out = d / f"{tool}.raw"
    if tool == "qemu-img":
        code = qemu_img("convert", "-f", "vhdx", "-O", "raw", "h.vhdx", str(out), cwd=d).returncode
    else:
        code = blockd_img("convert", "-f", "vhdx", "-O", "raw", "h.vhdx", str(out), cwd=d)[2]
    data = out.read_bytes() if code == 0 else b""
    return code, data


LOG = MiB
#: Damage to the log of a dirty image: each still opens (or fails) as in qemu-img.
HOSTILE_LOG = {
    "entry checksum": [(LOG + 4, "<I", 1)],
    "entry length": [(LOG + 8, "<I", 3 * MiB)],
    "descriptor signature": [(LOG + 64, "<4s", b"dexc")],
    "descriptor sequence": [(LOG + 64 + 24, "<Q", 99)],
    "data sector sequence": [(LOG + 4096 + 4092, "<I", 99)],
    "flushed offset past end": [(LOG + 48, "<Q", 1 << 40)],
    "descriptor count": [(LOG + 24, "<I", 1000)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LOG))
def test_hostile_log(tmp_path, case):
    image = _qemu_image(tmp_path, "block_size=1M", "11M", "h.vhdx")
    qemu_io_ok("vhdx", str(image), "write -P 1 0 4k")
    make_dirty(image)
    data = bytearray(image.read_bytes())
    for off, fmt, value in HOSTILE_LOG[case]:
        struct.pack_into(fmt, data, off, value)
    image.write_bytes(bytes(data))
    shutil.copyfile(image, tmp_path / "theirs.vhdx")
    for cmd in (["info"], ["check", "--output=json"]):
        same(tmp_path, *cmd, "-f", "vhdx", "h.vhdx")
    r = qemu_img("check", "-r", "all", "-f", "vhdx", "theirs.vhdx", cwd=tmp_path)
    b = blockd_img("check", "-r", "all", "-f", "vhdx", "h.vhdx", cwd=tmp_path)
    assert "Traceback" not in b[1]
    assert b == (r.stdout, r.stderr.replace("theirs.vhdx", "h.vhdx")
                 .replace("qemu-img", "blockd-img"), r.returncode)


# ---- random damage, in process ------------------------------------------------------------------

#: (offset, length) of the structures a mutation hits: file identifier, headers, region
#: table, log entry (header, descriptor, data sector), BAT, metadata table and items.
FUZZ_AREAS = [(0, 16), (H1, 80), (H2, 80), (RT, 112), (LOG, 128), (LOG + 4096, 8),
              (LOG + 8188, 4), (BAT, 96), (META, 200), (META + 65536, 40)]


@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("vhdx-fuzz")
    clean = _qemu_image(d, "block_size=1M", "11M", "clean.vhdx")
    qemu_io_ok("vhdx", str(clean), "write -P 1 0 4k", "write -P 2 3M 4k")
    dirty = d / "dirty.vhdx"
    shutil.copyfile(clean, dirty)
    make_dirty(dirty)
    return {"clean": clean.read_bytes(), "dirty": dirty.read_bytes()}


async def _exercise(path: str) -> None:
    """Open read-only, then read-write (replaying a log), read everything and write a
    little: only the driver's errors (QMPError on open, OSError on I/O) may escape."""
    for read_only in (True, False):
        g = BlockGraph()
        try:
            node = await g.open_node({"driver": "vhdx", "node-name": "v", "read-only": read_only,
                                      "file": {"driver": "file", "filename": path}})
        except QMPError:
            await g.close_all()
            continue
        try:
            size = min(node.length(), 16 * MiB)
            for off in range(0, size, MiB):
                try:
                    assert len(await node.read(off, min(MiB, size - off))) == min(MiB, size - off)
                except OSError:
                    pass
            if not read_only:
                for off in (0, 5 * MiB, size - 4096):
                    if 0 <= off < size:
                        try:
                            await node.write(off, b"\xab" * 4096)
                        except OSError:
                            pass
        finally:
            await g.close_all()


@_fuzz(max(CASES // 3, 1))
@given(rng=st.randoms(use_true_random=False), which=st.sampled_from(["clean", "dirty"]),
       fix_sums=st.booleans())
def test_random_damage_in_process(fuzz_bases, tmp_path, rng, which, fix_sums):
    data = bytearray(fuzz_bases[which])
    for _ in range(rng.randint(1, 4)):
        start, length = rng.choice(FUZZ_AREAS)
        data[start + rng.randrange(length)] = rng.choice([0, 1, 0xFF, rng.randrange(256)])
    if fix_sums:
        for off, size in ((H1, 4096), (H2, 4096), (RT, L.REGION_TABLE_SIZE)):
            block = bytearray(data[off:off + size])
            L.set_checksum(block)
            data[off:off + size] = block
    path = tmp_path / "f.vhdx"
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        asyncio.run(_exercise(str(path)))
        assert tracemalloc.get_traced_memory()[1] < MEMORY_BOUND
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("cmd", [["measure", "-O", "vhdx", "r.raw"],
                                 ["measure", "-f", "vhdx", "-O", "qcow2", "a.vhdx"],
                                 ["resize", "a.vhdx", "30M"],
                                 ["amend", "-o", "log_size=2M", "a.vhdx"],
                                 ["check", "-r", "leaks", "a.vhdx"],
                                 ["compare", "a.vhdx", "r.raw"]])
def test_other_subcommands(tmp_path, cmd):
    """What qemu-img's other subcommands say about vhdx (no measure, resize or amend)."""
    image = _qemu_image(tmp_path, "block_size=1M", "20M")
    qemu_io_ok("vhdx", str(image), *WRITES)
    assert qemu_img("convert", "-O", "raw", "a.vhdx", "r.raw", cwd=tmp_path).returncode == 0
    qemu_io_ok("raw", str(tmp_path / "r.raw"), "write -P 0x42 12M 512")
    same(tmp_path, *cmd)
