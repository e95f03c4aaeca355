"""The vpc (VHD) driver against qemu-img and qemu-io, both ways.

Images qemu-img makes (every subformat, data from qemu-io at scattered
offsets) must read byte for byte as qemu-img reads them, through
blockd-img and through a blockd NBD export, with the same ``info`` and
``map``; the same qemu-io writes done by QEMU and through blockd must leave
identical files; images blockd-img makes must equal qemu-img's apart from
their UUID and timestamp; hostile headers must fail with QEMU's message.

The helpers here serve test_vdi.py too.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from harness import HAVE_QSD, Daemon, blockd_img, qemu_img, qemu_io_ok, qsd_and_blockd, same

MiB = 1 << 20

#: Writes at scattered offsets, across block boundaries, zero writes, tiny writes.
WRITES = ["write -P 0x11 0 4k", "write -P 0x22 1536k 1M", "write -P 0x33 5M 512",
          "write -z 7M 64k", "write -P 0x44 9M 100k", "write -P 0x55 4095k 2k"]


def raw_bytes(d: Path, fmt: str, image: str, tool: str = "qemu-img") -> bytes:
    """The guest's bytes of ``image``, converted to raw by ``tool``."""
    out = d / f"{tool}.raw"
    if tool == "qemu-img":
        r = qemu_img("convert", "-f", fmt, "-O", "raw", image, str(out), cwd=d)
        assert r.returncode == 0, r.stderr
    else:
        assert blockd_img("convert", "-f", fmt, "-O", "raw", image, str(out), cwd=d)[2] == 0
    data = out.read_bytes()
    out.unlink()
    return data


def check_views(d: Path, fmt: str, image: str) -> None:
    """Same bytes, info and map as qemu-img."""
    assert raw_bytes(d, fmt, image, "blockd-img") == raw_bytes(d, fmt, image)
    for cmd in (["info"], ["info", "--output=json"], ["map", "--output=json"], ["map"]):
        same(d, *cmd, "-f", fmt, image)


def nbd_uri(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def serve(d: Path, fmt: str, image: Path, writable: bool = False) -> tuple[Daemon, str]:
    """A blockd daemon exporting ``image`` as 'img' over NBD."""
    nbd = str(d / "nbd.sock")
    mode = "on" if writable else "off"
    daemon = Daemon(str(d / "qmp.sock"),
                    "--blockdev", f"driver=file,node-name=f0,filename={image}",
                    "--blockdev", f"driver={fmt},node-name=img,file=f0",
                    "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                    "--export", f"type=nbd,id=e0,node-name=img,writable={mode}")
    return daemon, nbd_uri(nbd, "img")


def check_nbd_read(d: Path, fmt: str, image: Path) -> None:
    expected = raw_bytes(d, fmt, str(image))
    daemon, uri = serve(d, fmt, image)
    try:
        out = d / "nbd.raw"
        r = qemu_img("convert", "-f", "raw", "-O", "raw", uri, str(out))
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == expected
        out.unlink()
    finally:
        daemon.stop()


def check_same_writes(d: Path, fmt: str, image: Path, writes: list[str]) -> None:
    """``writes`` by qemu-io on one copy and by qemu-io through blockd on another: the two
    files must be identical, byte for byte (allocation order, metadata, footer)."""
    theirs = d / ("theirs" + image.suffix)
    ours = d / ("ours" + image.suffix)
    shutil.copyfile(image, theirs)
    shutil.copyfile(image, ours)
    qemu_io_ok(fmt, str(theirs), *writes)
    daemon, uri = serve(d, fmt, ours, writable=True)
    try:
        qemu_io_ok("raw", uri, *writes)
    finally:
        daemon.stop()
    assert ours.read_bytes() == theirs.read_bytes()
    assert qemu_img("compare", "-f", fmt, "-F", fmt, str(ours), str(theirs)).returncode == 0


def metadata_of(path: Path, head: int = 1 << 20) -> tuple[int, bytes]:
    """(size, bytes) of a new image without reading its sparse data area: the first
    ``head`` bytes and the last sector (a VHD footer), whole if the file is small."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= head + 512:
            return size, f.read()
        data = f.read(head)
        f.seek(size - 512)
        return size, data + f.read()


def check_same_create(d: Path, fmt: str, opts: str, size: str,
                      name: str) -> tuple[int, tuple[int, bytes]]:
    """qemu-img create, then blockd-img create over it: the same output and status.
    Returns that status and what :func:`metadata_of` finds in qemu-img's image."""
    argv = ["create", "-f", fmt, "-o", opts, name, size]
    q = qemu_img(*argv, cwd=d)
    theirs = metadata_of(d / name)
    (d / name).unlink()
    b = blockd_img(*argv, cwd=d)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    return q.returncode, theirs


def footer_fields_masked(data: bytes, offsets: list[int]) -> bytes:
    """A VHD with the timestamp, checksum and UUID of the footers at ``offsets`` zeroed."""
    buf = bytearray(data)
    for off in offsets:
        buf[off + 24:off + 28] = bytes(4)  # timestamp
        buf[off + 64:off + 84] = bytes(20)  # checksum and UUID
    return bytes(buf)


# ---- reading what qemu-img makes ----------------------------------------------------------


@pytest.mark.parametrize("opts", ["subformat=dynamic", "subformat=fixed",
                                  "subformat=dynamic,force_size=on",
                                  "subformat=fixed,force_size=on"])
def test_qemu_images_read_alike(tmp_path, opts):
    image = tmp_path / "a.vhd"
    assert qemu_img("create", "-q", "-f", "vpc", "-o", opts, str(image), "11M").returncode == 0
    qemu_io_ok("vpc", str(image), *WRITES)
    check_views(tmp_path, "vpc", "a.vhd")
    check_nbd_read(tmp_path, "vpc", image)


def test_empty_and_big_sparse(tmp_path):
    for size in ("0", "127G"):
        image = tmp_path / f"e{size}.vhd"
        assert qemu_img("create", "-q", "-f", "vpc", str(image), size).returncode == 0
        for cmd in (["info", "--output=json"], ["map", "--output=json"]):
            same(tmp_path, *cmd, "-f", "vpc", image.name)


@pytest.mark.parametrize("app", [b"win ", b"d2v ", b"tap\0", b"CTXS", b"qem2", b"vpc ",
                                 b"qemu", b"vs  "])
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_creator_app_decides_size(tmp_path, app, subformat):
    """Hyper-V, Disk2vhd, XenServer... images are sized by current_size, the rest by CHS."""
    image = tmp_path / "a.vhd"
    assert qemu_img("create", "-q", "-f", "vpc", "-o", f"subformat={subformat}", str(image),
                    "11M").returncode == 0
    qemu_io_ok("vpc", str(image), "write -P 3 10M 1M")
    data = image.read_bytes()
    at = [0, len(data) - 512] if subformat == "dynamic" else [len(data) - 512]
    for off in at:
        data = _patch(data, off + 28, ">I", int.from_bytes(app, "big"), off)
        # A current_size below the geometry's, so the two rules differ.
        data = _patch(data, off + 48, ">Q", 10 * MiB + 4096, off)
    image.write_bytes(data)
    check_views(tmp_path, "vpc", "a.vhd")


def test_max_geometry_uses_current_size(tmp_path):
    image = tmp_path / "a.vhd"
    assert qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", str(image),
                    "11M").returncode == 0
    data = _patch(image.read_bytes(), 28, ">I", int.from_bytes(b"vpc ", "big"), 0)
    image.write_bytes(data)
    same(tmp_path, "info", "--output=json", "-f", "vpc", "a.vhd")


@pytest.mark.parametrize("fmt,opts,ext", [("vpc", "subformat=dynamic", "vhd"),
                                          ("vpc", "subformat=fixed", "vhd"),
                                          ("vdi", "static=off", "vdi"),
                                          ("vdi", "static=on", "vdi")])
def test_parallel_writes_through_nbd(tmp_path, fmt, opts, ext):
    """qemu-img convert with many requests in flight, out of order, into a blockd export:
    concurrent allocations must leave a consistent image with the source's content."""
    src = tmp_path / "src.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(src), "40M").returncode == 0
    qemu_io_ok("raw", str(src), *WRITES, "write -P 0x5a 20M 15M", "write -P 0x5b 36M 3M")
    image = tmp_path / f"t.{ext}"
    assert qemu_img("create", "-q", "-f", fmt, "-o", opts, str(image), "40M").returncode == 0
    daemon, uri = serve(tmp_path, fmt, image, writable=True)
    try:
        r = qemu_img("convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw", str(src), uri)
        assert r.returncode == 0, r.stderr
    finally:
        daemon.stop()
    r = qemu_img("compare", "-f", "raw", "-F", fmt, str(src), str(image))
    assert r.returncode == 0, r.stdout + r.stderr
    if fmt == "vdi":
        assert qemu_img("check", "-f", "vdi", str(image)).returncode == 0


def test_differencing_refused(tmp_path):
    """QEMU opens a differencing disk as if it had no parent; blockd says it cannot."""
    image = tmp_path / "a.vhd"
    assert qemu_img("create", "-q", "-f", "vpc", str(image), "11M").returncode == 0
    data = image.read_bytes()
    for off in (0, len(data) - 512):
        data = _patch(data, off + 60, ">I", 4, off)
    image.write_bytes(data)
    out, err, code = blockd_img("info", "-f", "vpc", "a.vhd", cwd=tmp_path)
    assert code == 1 and "Unsupported VHD disk type 4" in err, err


@pytest.mark.parametrize("fmt", ["vpc", "vdi"])
def test_unsupported_operations(tmp_path, fmt):
    """What QEMU's vpc and vdi drivers cannot do fails with qemu-img's messages."""
    assert qemu_img("create", "-q", "-f", fmt, str(tmp_path / "a.img"), "10M").returncode == 0
    for argv in (["resize", "-f", fmt, "a.img", "20M"], ["amend", "-f", fmt, "-o", "size=30M",
                                                         "a.img"],
                 ["measure", "-O", fmt, "--size", "10M"], ["check", "-r", "all", "-f", fmt,
                                                            "a.img"]):
        same(tmp_path, *argv)
    if fmt == "vpc":
        same(tmp_path, "check", "-f", fmt, "a.img")


# ---- writing as QEMU writes ---------------------------------------------------------------


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_writes_match_qemu(tmp_path, subformat):
    image = tmp_path / "a.vhd"
    assert qemu_img("create", "-q", "-f", "vpc", "-o", f"subformat={subformat}", str(image),
                    "11M").returncode == 0
    qemu_io_ok("vpc", str(image), "write -P 0x99 2M 8k")
    check_same_writes(tmp_path, "vpc", image, WRITES + ["write -P 0x66 2M 512",
                                                        "write -P 0x77 10M 1M"])


def test_writes_to_foreign_bitmaps(tmp_path):
    """A block whose sector bitmap is not all ones (Hyper-V leaves them partial) gets every
    bit set by the first write to it, as QEMU does."""
    image = tmp_path / "a.vhd"
    assert qemu_img("create", "-q", "-f", "vpc", str(image), "11M").returncode == 0
    qemu_io_ok("vpc", str(image), "write -P 0x99 0 4k", "write -P 0x98 4M 4k")
    data = bytearray(image.read_bytes())
    bat = struct.unpack(">6I", data[1536:1560])
    for entry in (bat[0], bat[2]):
        data[entry * 512:entry * 512 + 512] = b"\x0f" + bytes(511)
    image.write_bytes(bytes(data))
    check_same_writes(tmp_path, "vpc", image, ["write -P 1 4M 512", "write -P 2 8k 512"])


def test_convert_into_vpc(tmp_path):
    """blockd-img convert -O vpc makes an image qemu-img reads as the source."""
    src = tmp_path / "src.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(src), "11M").returncode == 0
    qemu_io_ok("raw", str(src), *WRITES)
    for opts in ("subformat=dynamic", "subformat=fixed", "force_size=on"):
        out = blockd_img("convert", "-O", "vpc", "-o", opts, "src.raw", "o.vhd", cwd=tmp_path)
        assert out[2] == 0, out
        r = qemu_img("compare", "-f", "raw", "-F", "vpc", str(src), str(tmp_path / "o.vhd"))
        assert r.returncode == 0, r.stdout + r.stderr
        check_views(tmp_path, "vpc", "o.vhd")


# ---- creating -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["0", "512", "10M", "1G", "3G", "127G", "2040G", "2041G",
                                  "10000"])
@pytest.mark.parametrize("opts", ["subformat=dynamic", "subformat=fixed", "force_size=on",
                                  "subformat=fixed,force_size=on"])
def test_create_like_qemu(tmp_path, size, opts):
    """Same messages and the same file, but for UUID and timestamp; CHS rounding included."""
    status, theirs = check_same_create(tmp_path, "vpc", opts, size, "x.vhd")
    if status:
        return
    ours = metadata_of(tmp_path / "x.vhd")
    assert ours[0] == theirs[0]
    copies = [len(ours[1]) - 512] if "fixed" in opts else [0, len(ours[1]) - 512]
    assert footer_fields_masked(ours[1], copies) == footer_fields_masked(theirs[1], copies)
    same(tmp_path, "info", "--output=json", "-f", "vpc", "x.vhd")


@pytest.mark.parametrize("opts", ["subformat=foo", "preallocation=metadata",
                                  "preallocation=bogus", "force_size=maybe", "help"])
def test_create_errors(tmp_path, opts):
    same(tmp_path, "create", "-f", "vpc", "-o", opts, "x.vhd", "10M")


def test_blockdev_create(tmp_path):
    """The QMP job: an exact CHS size is needed unless force-size is on, as in QEMU."""
    path = tmp_path / "c.vhd"
    with Daemon(str(tmp_path / "qmp.sock")) as daemon:
        c = daemon.client()

        def job(n: int, **opts) -> dict:
            return c.create_job(f"j{n}", {"driver": "vpc", "file": "f0", **opts})

        assert "error" not in c.create_job("f", {"driver": "file", "filename": str(path),
                                                 "size": 0})
        assert "return" in c.cmd("blockdev-add", driver="file", filename=str(path),
                                 **{"node-name": "f0"})
        bad = job(1, size=10 * MiB)
        assert bad["error"] == "The requested image size cannot be represented in CHS geometry"
        assert "error" not in job(2, size=10 * MiB, **{"force-size": True})
        assert "error" not in job(3, size=10514432, subformat="dynamic")
        c.cmd("blockdev-del", **{"node-name": "f0"})
    info = json.loads(qemu_img("info", "--output=json", "-f", "vpc", str(path)).stdout)
    assert info["virtual-size"] == 10514432


# ---- hostile images -----------------------------------------------------------------------


def _patch(data: bytes, off: int, fmt: str, value: int, footer: int | None) -> bytes:
    """``value`` packed at ``off``; the checksum of the footer at offset ``footer`` (if any)
    made right again, so the field itself is what is judged."""
    buf = bytearray(data)
    struct.pack_into(fmt, buf, off, value)
    if footer is not None:
        at = footer
        buf[at + 64:at + 68] = bytes(4)
        struct.pack_into(">I", buf, at + 64, ~sum(buf[at:at + 512]) & 0xFFFFFFFF)
    return bytes(buf)


HOSTILE = {
    "checksum": (64, ">I", 1, None),
    "block size 0": (512 + 32, ">I", 0, None),
    "block size odd": (512 + 32, ">I", 3 << 20, None),
    "block size 256": (512 + 32, ">I", 256, None),
    "bat entries huge": (512 + 28, ">I", 0x7FFFFFFF, None),
    "bat entries negative": (512 + 28, ">I", 0x80000001, None),
    "bat entries too few": (512 + 28, ">I", 1, None),
    "bat offset past end": (512 + 16, ">Q", 1 << 40, None),
    "bat offset wraps": (512 + 16, ">Q", 0xFFFFFFFFFFFFFF00, None),
    "header offset past end": (16, ">Q", 1 << 40, 0),
    "header offset wraps": (16, ">Q", 0xFFFFFFFFFFFFFF00, 0),
    "huge current size": (48, ">Q", 1 << 62, 0),
    "max geometry": (56, ">I", 0xFFFF10FF, 0),
    "huge geometry": (56, ">I", 0xFFFFFFFF, 0),
    "bat entry past end": (1536, ">I", 0x7FFFFFFF, None),
    "magic": (512, ">Q", 0, None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers(tmp_path, case):
    """qemu-img info's message for the same damage, never a traceback or a hang."""
    image = tmp_path / "h.vhd"
    assert qemu_img("create", "-q", "-f", "vpc", str(image), "11M").returncode == 0
    qemu_io_ok("vpc", str(image), "write -P 1 0 4k")
    off, fmt, value, footer = HOSTILE[case]
    data = _patch(image.read_bytes(), off, fmt, value, footer)
    if case == "huge current size":
        data = _patch(data, 28, ">I", int.from_bytes(b"win ", "big"), 0)
    image.write_bytes(data)
    q = qemu_img("info", "-f", "vpc", "h.vhd", cwd=tmp_path)
    b = blockd_img("info", "-f", "vpc", "h.vhd", cwd=tmp_path)
    assert "Traceback" not in b[1]
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)


def test_short_files(tmp_path):
    for n in (0, 100, 511):
        (tmp_path / "s.vhd").write_bytes(b"x" * n)
        same(tmp_path, "info", "-f", "vpc", "s.vhd")


# ---- QMP, against qemu-storage-daemon -----------------------------------------------------


def _qmp_images(work: Path) -> None:
    for name, fmt, opts in (("d.vhd", "vpc", "subformat=dynamic"),
                            ("f.vhd", "vpc", "subformat=fixed"),
                            ("s.vdi", "vdi", "static=on"), ("y.vdi", "vdi", "static=off")):
        assert qemu_img("create", "-q", "-f", fmt, "-o", opts, str(work / name),
                        "11M").returncode == 0
        qemu_io_ok(fmt, str(work / name), "write -P 7 1M 64k")
    for name in ("new.vhd", "new.vdi"):
        (work / name).write_bytes(b"")


def _add(node: str, fmt: str, name: str, **extra) -> str:
    return json.dumps({"execute": "blockdev-add", "arguments": {
        "driver": fmt, "node-name": node, "read-only": True, **extra,
        "file": {"driver": "file", "filename": f"TMP/{name}"}}})


def _create(job: str, **options) -> str:
    return json.dumps({"execute": "blockdev-create", "arguments": {"job-id": job,
                                                                  "options": options}})


QMP_SESSION = [
    '{"execute":"qmp_capabilities"}',
    _add("d", "vpc", "d.vhd"), _add("f", "vpc", "f.vhd"), _add("s", "vdi", "s.vdi"),
    _add("y", "vdi", "y.vdi"), _add("bad", "vpc", "d.vhd", force_size=True),
    '{"execute":"query-named-block-nodes","arguments":{"flat":true}}',
    '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"nv",'
    '"filename":"TMP/new.vhd"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"ni",'
    '"filename":"TMP/new.vdi"}}',
    # One job at a time: blockd lists jobs oldest first, qsd newest first.
    _create("c1", driver="vpc", file="nv", size=10 * MiB),
    '{"execute":"query-jobs"}',
    '{"execute":"job-dismiss","arguments":{"id":"c1"}}',
    _create("c2", driver="vdi", file="ni", size=MiB, preallocation="full"),
    '{"execute":"query-jobs"}',
    '{"execute":"job-dismiss","arguments":{"id":"c2"}}',
    _create("c3", driver="vpc", file="nv", size=10 * MiB, subformat="nosuch"),
    _create("c4", driver="vpc", file="nv", size=10514432, subformat="fixed"),
    '{"execute":"query-jobs"}',
    '{"execute":"job-dismiss","arguments":{"id":"c4"}}',
    _create("c5", driver="vdi", file="ni", size=5 * MiB, preallocation="metadata"),
    '{"execute":"query-jobs"}',
    '{"execute":"blockdev-del","arguments":{"node-name":"d"}}',
    _add("w", "vpc", "d.vhd", **{"read-only": False}),
    '{"execute":"blockdev-add","arguments":{"driver":"vdi","node-name":"v","file":"ni"}}',
    '{"execute":"block_resize","arguments":{"node-name":"w","size":33554432}}',
    '{"execute":"block_resize","arguments":{"node-name":"v","size":33554432}}',
]


def test_qmp_session_matches_qsd(tmp_path):
    if not HAVE_QSD:
        pytest.skip("qemu-storage-daemon not installed")
    theirs, ours = qsd_and_blockd(tmp_path, QMP_SESSION, setup=_qmp_images)
    assert ours == theirs


@pytest.mark.parametrize("block_size", [512, 64 << 10, 512 << 10, 16 << 20])
def test_other_block_sizes(tmp_path, block_size):
    """Dynamic disks made elsewhere (Hyper-V sized by current_size) with other block sizes:
    read, mapped and written as QEMU does."""
    from blockd.drivers.vpc import dynamic, footer

    size = 11 * MiB
    entries = dynamic.entries_for(size // 512, block_size)
    table = -(-entries * 4 // 512) * 512
    foot = bytearray(footer.build(size, footer.TYPE_DYNAMIC, footer.geometry(size // 512),
                                  False, 0, bytes(16)))
    data = bytes(foot) + dynamic.build(entries, block_size) + b"\xff" * table + bytes(foot)
    image = tmp_path / "a.vhd"
    image.write_bytes(_patch(data, 28, ">I", int.from_bytes(b"win ", "big"), 0))
    data = image.read_bytes()
    image.write_bytes(_patch(data, len(data) - 512 + 28, ">I", int.from_bytes(b"win ", "big"),
                             len(data) - 512))
    # Sector-sized blocks have no bitmap at all; few writes, each block costs three syncs.
    writes = WRITES if block_size > 512 else ["write -P 1 0 4k", "write -P 2 5M 512",
                                              "write -z 7M 1k"]
    check_same_writes(tmp_path, "vpc", image, writes)
    shutil.copyfile(tmp_path / "theirs.vhd", image)
    check_views(tmp_path, "vpc", "a.vhd")
