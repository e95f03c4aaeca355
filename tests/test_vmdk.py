"""The vmdk driver against qemu-img/qemu-io: images either side made are read the same
by the other, info/map/check agree, and hostile headers fail cleanly."""

from __future__ import annotations

import json
import os
import re
import struct

import pytest

from harness import Daemon, blockd_img_run, qemu_io, sh

from blockd.drivers.vmdk import probe

SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized"]
SIZE = "2560M"  # past 2 GiB: the split subformats get two extents
#: qemu-io writes at scattered offsets: small, across grains, across the 2 GiB split, zeroes.
WRITES = ["write -P 0x11 0 4k", "write -P 0x22 100M 70k", "write -P 0x33 2047M 2M",
          "write -z 1G 128k", "write -P 0x44 2500M 512", "write -z 2100M 64k"]
#: What streamOptimized takes: whole grains (64 KiB) in new places only.
STREAM_WRITES = ["write -P 0x11 0 64k", "write -P 0x22 100M 64k", "write -P 0x33 2047M 128k",
                 "write -P 0x44 2500M 64k"]


def qemu_image(tmp, subformat: str, extra: str = "", writes: bool = True) -> str:
    img = str(tmp / f"{subformat}.vmdk")
    opts = f"subformat={subformat}" + (f",{extra}" if extra else "")
    r = sh("qemu-img", "create", "-q", "-f", "vmdk", "-o", opts, img, SIZE)
    assert r.returncode == 0, r.stderr
    if writes:
        r = qemu_io("vmdk", img, *STREAM_WRITES if subformat == "streamOptimized" else WRITES)
        assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
    return img


def same_output(*args: str) -> None:
    """qemu-img and blockd-img print the same and exit the same."""
    q = sh("qemu-img", *args)
    b = blockd_img_run(*args)
    assert (b.returncode, b.stdout) == (q.returncode, q.stdout), b.stderr
    return q


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_qemu_images_read_identically(tmp_path, subformat):
    img = qemu_image(tmp_path, subformat)
    out = str(tmp_path / "out.raw")
    r = blockd_img_run("convert", "-f", "vmdk", "-O", "raw", img, out)
    assert r.returncode == 0, r.stderr
    r = sh("qemu-img", "compare", "-f", "vmdk", "-F", "raw", img, out)
    assert r.returncode == 0, r.stdout + r.stderr
    same_output("info", "-f", "vmdk", "--output=json", img)
    same_output("info", "-f", "vmdk", img)
    same_output("map", "-f", "vmdk", "--output=json", img)
    same_output("map", "-f", "vmdk", img)
    same_output("check", "-f", "vmdk", img)


@pytest.mark.parametrize("extra", ["zeroed_grain=on", "adapter_type=lsilogic,hwversion=7"])
def test_zeroed_grains_and_options_read(tmp_path, extra):
    img = qemu_image(tmp_path, "monolithicSparse", extra)
    same_output("map", "-f", "vmdk", "--output=json", img)
    same_output("info", "-f", "vmdk", "--output=json", img)
    out = str(tmp_path / "out.raw")
    assert blockd_img_run("convert", "-f", "vmdk", "-O", "raw", img, out).returncode == 0
    assert sh("qemu-img", "compare", "-f", "vmdk", "-F", "raw", img, out).returncode == 0


def _export(tmp, img: str):
    d = Daemon(str(tmp / "qmp.sock"))
    c = d.client()
    r = c.cmd("blockdev-add", driver="vmdk", **{"node-name": "n0"},
              file={"driver": "file", "filename": img})
    assert "return" in r, r
    c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp / "nbd.sock")}})
    r = c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "n0"}, writable=True)
    assert "return" in r, r
    return d, c, f"nbd+unix:///n0?socket={tmp}/nbd.sock"


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentFlat",
                                       "streamOptimized"])
def test_nbd_export_reads_like_qemu(tmp_path, subformat):
    img = qemu_image(tmp_path, subformat)
    d, c, url = _export(tmp_path, img)
    with d:
        r = sh("qemu-img", "compare", "-f", "raw", "-F", "vmdk", "-U", url, img)
        assert r.returncode == 0, r.stdout + r.stderr
        r = qemu_io("raw", url, *["read -P 0x11 0 4k", "read -P 0x33 2047M 64k",
                                 "read -P 0 200M 64k"])
        assert "failed" not in r.stdout and "Pattern verification" not in r.stdout, r.stdout


@pytest.mark.parametrize("subformat,extra", [
    ("monolithicSparse", ""), ("monolithicSparse", "zeroed_grain=on"),
    ("monolithicFlat", ""), ("twoGbMaxExtentSparse", ""), ("twoGbMaxExtentFlat", "")])
def test_writes_through_nbd_read_back_by_qemu(tmp_path, subformat, extra):
    img = qemu_image(tmp_path, subformat, extra, writes=False)
    twin = str(tmp_path / "twin.raw")
    sh("qemu-img", "create", "-q", "-f", "raw", twin, SIZE)
    d, c, url = _export(tmp_path, img)
    with d:
        r = qemu_io("raw", url, *WRITES + ["write -P 0x55 2044M 8M", "write -z 0 128k",
                                          "write -P 0x66 100M 512"])
        assert "failed" not in r.stdout, r.stdout + r.stderr
    qemu_io("raw", twin, *WRITES + ["write -P 0x55 2044M 8M", "write -z 0 128k",
                                   "write -P 0x66 100M 512"])
    r = sh("qemu-img", "compare", "-f", "vmdk", "-F", "raw", img, twin)
    assert r.returncode == 0, r.stdout + r.stderr
    r = sh("qemu-img", "check", "-f", "vmdk", img)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(sh("qemu-img", "info", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["create-type"] == subformat


def _files(d) -> dict[str, bytes | tuple[bytes, bytes, bytes]]:
    """Every file of a directory, the random CID (random in QEMU too) masked.

    A descriptor is compared as QEMU reads it, up to its NUL: what follows
    depends on the length of the CID it replaced.  So is a sparse header: QEMU
    writes its 79 bytes and leaves the rest of the sector as it was (text of an
    earlier descriptor, with its random CID, after a failed create).
    """
    out: dict[str, bytes | tuple[bytes, bytes, bytes]] = {}
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            data = f.read()
        if data[:4] == b"KDMV":
            text = data[512:512 + 10240]
            out[name] = (data[:79], _mask_cid(text.split(b"\0")[0]), data[512 + 10240:])
        elif b"# Disk DescriptorFile" in data[:64]:
            out[name] = _mask_cid(data.split(b"\0")[0])
        else:
            out[name] = data
    return out


def _mask_cid(text: bytes) -> bytes:
    return re.sub(rb"\nCID=[0-9a-f]+\n", b"\nCID=?\n", text)


CREATE_CASES = [
    "subformat=monolithicSparse", "subformat=monolithicFlat",
    "subformat=twoGbMaxExtentSparse", "subformat=twoGbMaxExtentFlat",
    "subformat=streamOptimized", "zeroed_grain=on,adapter_type=lsilogic",
    "hwversion=7,toolsversion=12,adapter_type=buslogic", "compat6=on,adapter_type=legacyESX",
]


@pytest.mark.parametrize("opts", CREATE_CASES)
def test_create_writes_what_qemu_img_writes(tmp_path, opts):
    for who in ("q", "b"):
        (tmp_path / who).mkdir()
    q = sh("qemu-img", "create", "-f", "vmdk", "-o", opts, "img.vmdk", "2049M",
           cwd=str(tmp_path / "q"))
    b = blockd_img_run("create", "-f", "vmdk", "-o", opts, str(tmp_path / "b" / "img.vmdk"), "2049M")
    assert q.returncode == b.returncode == 0, b.stderr
    assert b.stdout.replace(str(tmp_path / "b") + "/", "") == q.stdout
    assert _files(tmp_path / "q") == _files(tmp_path / "b")
    r = sh("qemu-img", "check", str(tmp_path / "b" / "img.vmdk"))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("opts,message", [
    ("adapter_type=scsi", "invalid parameter value: scsi"),
    ("subformat=sparse", "invalid parameter value: sparse"),
    ("subformat=monolithicFlat,zeroed_grain=on", "Flat image can't enable zeroed grain"),
    ("compat6=on,hwversion=7", "compat6 cannot be enabled with hwversion set"),
])
def test_create_refusals_match_qemu_img(tmp_path, opts, message):
    q = sh("qemu-img", "create", "-q", "-f", "vmdk", "-o", opts, str(tmp_path / "q.vmdk"), "1M")
    b = blockd_img_run("create", "-q", "-f", "vmdk", "-o", opts, str(tmp_path / "b.vmdk"), "1M")
    assert message in q.stderr
    assert b.returncode == q.returncode == 1
    assert b.stderr.replace("blockd-img", "qemu-img").replace("b.vmdk", "q.vmdk") == q.stderr


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_convert_into_vmdk_matches_qemu_img(tmp_path, subformat):
    src = str(tmp_path / "src.raw")
    sh("qemu-img", "create", "-q", "-f", "raw", src, "130M")
    qemu_io("raw", src, *["write -P 1 0 4k", "write -P 2 1M 300k", "write -P 3 129M 64k",
                         "write -P 4 130046k 1k"])
    for who in ("q", "b"):
        (tmp_path / who).mkdir()
    opts = f"subformat={subformat}"
    r = sh("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", opts, src,
           str(tmp_path / "q" / "img.vmdk"))
    assert r.returncode == 0, r.stderr
    r = blockd_img_run("convert", "-f", "raw", "-O", "vmdk", "-o", opts, src,
                       str(tmp_path / "b" / "img.vmdk"))
    assert r.returncode == 0, r.stderr
    img = str(tmp_path / "b" / "img.vmdk")
    assert sh("qemu-img", "compare", "-f", "vmdk", "-F", "raw", img, src).returncode == 0
    assert sh("qemu-img", "check", img).returncode == 0
    assert _files(tmp_path / "q") == _files(tmp_path / "b")


def test_blockdev_create_matches_qsd(tmp_path):
    """Same files (CID aside) and the same errors from qemu-storage-daemon and blockd."""
    errors = {}
    names = ("img.vmdk", "img-s001.vmdk", "img-s002.vmdk")
    for qsd in (True, False):
        d = tmp_path / ("qsd" if qsd else "blockd")
        d.mkdir()
        for name in names:
            open(d / name, "wb").close()
        opts = {"driver": "vmdk", "size": (2 << 30) + (1 << 20),
                "file": {"driver": "file", "filename": str(d / names[0])},
                "extents": [{"driver": "file", "filename": str(d / n)} for n in names[1:]],
                "subformat": "twoGbMaxExtentSparse", "zeroed-grain": True,
                "adapter-type": "lsilogic", "hwversion": "6"}
        with Daemon(str(tmp_path / f"{qsd}.sock"), qsd=qsd) as dm:
            c = dm.client()
            got = [c.create_job("j", opts).get("error")]
            for bad in (dict(opts, extents=opts["extents"] * 2), dict(opts, size=1000),
                        dict(opts, subformat="monolithicFlat", **{"backing-file": "x"})):
                got.append(c.create_job("k", bad).get("error"))
        errors[qsd] = got
    assert errors[True] == errors[False]
    assert errors[True][0] is None
    assert _files(tmp_path / "qsd") == _files(tmp_path / "blockd")


# ---- backing files --------------------------------------------------------------------


def test_backing_chain_and_stale_parent_cid(tmp_path):
    """An overlay reads through its parent while the parent's CID is the one it recorded;
    after the parent changes, reads of what the overlay leaves to it fail, as in QEMU."""
    d = str(tmp_path)
    sh("qemu-img", "create", "-q", "-f", "vmdk", "base.vmdk", "10M", cwd=d)
    qemu_io("vmdk", f"{d}/base.vmdk", *["write -P 7 0 1M"])
    r = blockd_img_run("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "top.vmdk",
                       cwd=d)
    assert r.returncode == 0, r.stderr
    qemu_io("vmdk", f"{d}/top.vmdk", *["write -P 8 64k 4k"])
    for args in (["info", "-f", "vmdk", "--output=json"],
                 ["info", "-f", "vmdk", "--backing-chain"],
                 ["map", "-f", "vmdk", "--output=json"], ["check", "-f", "vmdk"]):
        q, b = sh("qemu-img", *args, "top.vmdk", cwd=d), blockd_img_run(*args, "top.vmdk", cwd=d)
        assert (b.returncode, b.stdout) == (q.returncode, q.stdout), b.stderr
    for who in ("q", "b"):
        args = ("convert", "-f", "vmdk", "-O", "raw", "top.vmdk", f"{who}.raw")
        r = sh("qemu-img", *args, cwd=d) if who == "q" else blockd_img_run(*args, cwd=d)
        assert r.returncode == 0, r.stderr
    assert sh("qemu-img", "compare", "-f", "raw", "-F", "raw", f"{d}/q.raw",
              f"{d}/b.raw").returncode == 0
    qemu_io("vmdk", f"{d}/base.vmdk", *["write -P 9 5M 4k"])  # the base gets a new CID
    q = sh("qemu-img", "convert", "-f", "vmdk", "-O", "raw", "top.vmdk", "q2.raw", cwd=d)
    b = blockd_img_run("convert", "-f", "vmdk", "-O", "raw", "top.vmdk", "b2.raw", cwd=d)
    assert q.returncode == b.returncode == 1
    assert b.stderr.replace("blockd-img", "qemu-img") == q.stderr


# ---- streamOptimized writes ----------------------------------------------------------


def test_stream_takes_only_new_whole_grains_like_qemu(tmp_path):
    """Each qemu-io command's outcome is the same against QEMU and against blockd's export."""
    cmds = ["write -P 1 0 64k", "write -P 2 64k 4k", "write -P 3 0 64k", "write -P 4 1M 128k",
            "write -P 5 10M 70k", "write -z 20M 64k", "write -P 6 33423360 64k"]
    results = {}
    for who in ("q", "b"):
        img = str(tmp_path / f"{who}.vmdk")
        sh("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", img,
           "33488896")
        outcome = []
        if who == "q":
            for c in cmds:
                outcome.append(qemu_io("vmdk", img, *[c]).stdout.splitlines()[0])
        else:
            os.mkdir(tmp_path / "d")
            d, _, url = _export(tmp_path / "d", img)
            with d:
                for c in cmds:
                    outcome.append(qemu_io("raw", url, *[c]).stdout.splitlines()[0])
        results[who] = outcome
    assert results["b"] == results["q"]
    r = sh("qemu-img", "compare", "-f", "vmdk", "-F", "vmdk", str(tmp_path / "q.vmdk"),
           str(tmp_path / "b.vmdk"))
    assert r.returncode == 0, r.stdout
    assert sh("qemu-img", "check", str(tmp_path / "b.vmdk")).returncode == 0


# ---- hostile images ------------------------------------------------------------------

#: Header fields of a monolithicSparse file: offset and struct format.
FIELDS = {"version": (4, "<I"), "flags": (8, "<I"), "capacity": (12, "<Q"),
          "granularity": (20, "<Q"), "num_gtes": (44, "<I"), "rgd": (48, "<Q"),
          "gd": (56, "<Q"), "grain_offset": (64, "<Q"), "compress": (77, "<H")}
MUTATIONS = [("version", 4), ("version", 3), ("capacity", 2**64 - 1), ("capacity", 2**55 - 1),
             ("capacity", 2**42), ("granularity", 0), ("granularity", 0x400000),
             ("granularity", 3), ("num_gtes", 0), ("num_gtes", 513), ("num_gtes", 1),
             ("gd", 2**64 - 1), ("gd", 2**55), ("gd", 0x100000), ("rgd", 2**55),
             ("grain_offset", 0x100000), ("compress", 1), ("flags", 0xFFFFFFFF)]


def _no_offset(text: str) -> set[str]:
    return set(re.sub(r"at byte \d+", "at byte N", text).splitlines())


def _same_failure(tmp_path, img: str) -> None:
    """info and a full read: qemu-img and blockd-img agree (blockd never with a traceback)."""
    for args in (["info", "-f", "vmdk"], ["convert", "-f", "vmdk", "-O", "raw"]):
        extra = [str(tmp_path / "out.raw")] if args[0] == "convert" else []
        q = sh("qemu-img", *args, img, *extra)
        b = blockd_img_run(*args, img, *extra)
        assert "Traceback" not in b.stderr, b.stderr
        assert b.returncode == q.returncode, (q.stderr, b.stderr)
        # Which chunks of a parallel copy fail, and first, is not fixed: offsets are masked
        # and repeated lines count once.
        assert _no_offset(b.stderr.replace("blockd-img", "qemu-img")) == _no_offset(q.stderr)
        if q.returncode == 0 and args[0] == "info":
            assert b.stdout == q.stdout


@pytest.mark.parametrize("field,value", MUTATIONS)
def test_hostile_header_fields(tmp_path, field, value):
    img = str(tmp_path / "m.vmdk")
    sh("qemu-img", "create", "-q", "-f", "vmdk", img, "100M")
    qemu_io("vmdk", img, *["write -P 7 0 1M", "write -P 8 50M 64k"])
    offset, fmt = FIELDS[field]
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
    _same_failure(tmp_path, img)


@pytest.mark.parametrize("text", [
    b"version=1\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"nosuch.img\" 0\n",
    b"version=1\ncreateType=\"fancy\"\n",
    b"version=1\nCID=1\nparentCID=ffffffff\n",
    b"version=1\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"x.img\"\n",
    b"version=1\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"x.img\" -3\n",
    b"version=1\ncreateType=\"twoGbMaxExtentSparse\"\nRW 100 SPARSE \"x.img\" 7\n",
    b"version=1\ncreateType=\"monolithicFlat\"\nCID=1\nparentCID=ffffffff\n"
    b"RW 100 FLAT \"x.img\" 0\nRW 100 SPARSE \"x.img\"\n",
    b"version=1\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"x.img\" 0\n",
    b"version=1\ncreateType=\"vmfs\"\nCID=1\nparentCID=ffffffff\nRW 300 VMFS \"x.img\"\n"
    b"RO 100 FLAT \"x.img\" 0\nRW 0 FLAT \"x.img\" 0\n",
    b"version=1\n\xff\xfe\x00garbage",
    b"KDM",
])
def test_hostile_descriptors(tmp_path, text):
    with open(tmp_path / "x.img", "wb") as f:
        f.write(b"\x5a" * 512 * 150)
    img = str(tmp_path / "d.vmdk")
    with open(img, "wb") as f:
        f.write(text)
    _same_failure(tmp_path, img)


def test_check_finds_a_grain_past_the_end_like_qemu(tmp_path):
    img = str(tmp_path / "c.vmdk")
    sh("qemu-img", "create", "-q", "-f", "vmdk", img, "100M")
    qemu_io("vmdk", img, *["write -P 7 0 1M"])
    with open(img, "r+b") as f:
        f.seek(56)
        gd = struct.unpack("<Q", f.read(8))[0]
        f.seek(gd * 512)
        gt = struct.unpack("<I", f.read(4))[0]
        f.seek(gt * 512 + 4 * 3)
        f.write(struct.pack("<I", 0x100000))
    for args in (["check", "-f", "vmdk"], ["check", "-f", "vmdk", "--output=json"],
                 ["check", "-f", "vmdk", "-r", "all"]):
        q, b = sh("qemu-img", *args, img), blockd_img_run(*args, img)
        assert (b.returncode, b.stdout) == (q.returncode, q.stdout)
        assert b.stderr.replace("blockd-img", "qemu-img") == q.stderr


@pytest.mark.parametrize("buf,score", [
    (b"KDMV" + bytes(508), 100), (b"COWD", 100), (b"# Disk DescriptorFile\nversion=1\n", 100),
    (b"   \r\n# c\nversion=3\r\n", 100), (b"\nversion=1\n", 0), (b"version=4\n", 0),
    (b"  x\nversion=1\n", 0), (b"KDM", 0), (b"QFI\xfb", 0), (b"# only a comment", 0),
])
def test_probe_scores_as_qemu(buf, score):
    assert probe(buf, "x.vmdk") == score


def _vmware_stream(path: str, size: int, grains: dict[int, bytes]) -> None:
    """A streamOptimized file as VMware writes it: grains with markers, then each grain
    table and the directory behind their markers, the header again in a footer with the
    directory's place, and the end-of-stream marker."""
    import zlib

    capacity, gran = size // 512, 128
    tables = -(-capacity // (gran * 512))
    text = (b'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
            b'createType="streamOptimized"\n\nRW %d SPARSE "x.vmdk"\n' % capacity)

    def header(gd: int) -> bytes:
        return (b"KDMV" + struct.pack("<IIQQQQIQQQc4sH", 3, 0x30001, capacity, gran, 1, 1, 512,
                                      0, gd, 128, b"\0", b"\n \r\n", 1)).ljust(512, b"\0")

    out = bytearray(header(2**64 - 1) + text.ljust(512, b"\0"))
    out += bytes(128 * 512 - len(out))
    gts = [[0] * 512 for _ in range(tables)]
    for index in sorted(grains):
        packed = zlib.compress(grains[index])
        gts[index // 512][index % 512] = len(out) // 512
        rec = struct.pack("<QI", index * gran, len(packed)) + packed
        out += rec + bytes(-len(rec) % 512)
    gd = []
    for gt in gts:
        out += struct.pack("<QII", 4, 0, 1).ljust(512, b"\0")
        gd.append(len(out) // 512)
        out += struct.pack("<512I", *gt)
    out += struct.pack("<QII", 1, 0, 2).ljust(512, b"\0")
    gd_sector = len(out) // 512
    out += struct.pack(f"<{tables}I", *gd).ljust(512, b"\0")
    out += struct.pack("<QII", 1, 0, 3).ljust(512, b"\0") + header(gd_sector)
    out += bytes(512)
    with open(path, "wb") as f:
        f.write(out)


def _reads_like_qemu(tmp_path, img: str) -> bytes:
    """info, map and check print what qemu-img prints; both convert it to the same raw
    bytes, which are returned."""
    for args in (["info", "-f", "vmdk", "--output=json"], ["map", "-f", "vmdk", "--output=json"],
                 ["check", "-f", "vmdk"]):
        same_output(*args, img)
    for who in ("q", "b"):
        args = ("convert", "-f", "vmdk", "-O", "raw", img, str(tmp_path / f"{who}.raw"))
        r = sh("qemu-img", *args) if who == "q" else blockd_img_run(*args)
        assert r.returncode == 0, r.stderr
    data = (tmp_path / "b.raw").read_bytes()
    assert data == (tmp_path / "q.raw").read_bytes()
    return data


def test_vmware_stream_with_footer_reads_like_qemu(tmp_path):
    img = str(tmp_path / "x.vmdk")
    grains = {0: b"\x01" * 65536, 7: bytes(range(256)) * 256, 600: b"end" * 20000 + b"\0" * 5536}
    _vmware_stream(img, 64 << 20, grains)
    data = _reads_like_qemu(tmp_path, img)
    assert data[7 * 65536:8 * 65536] == grains[7] and data[600 * 65536:601 * 65536] == grains[600]
    # A footer that is not one is refused, as QEMU refuses it.
    with open(img, "r+b") as f:
        f.seek(-512, os.SEEK_END)
        f.write(b"\xff" * 16)
    _same_failure(tmp_path, img)


@pytest.mark.parametrize("subformat,extra", [
    ("monolithicSparse", ""), ("monolithicSparse", "zeroed_grain=on"),
    ("twoGbMaxExtentSparse", "zeroed_grain=on"), ("monolithicFlat", "")])
def test_writes_lay_out_files_as_qemu_does(tmp_path, subformat, extra):
    """The same writes, by qemu-io into the image and through blockd's export, leave the
    same files (grains in the same places, the same table entries), the CID aside."""
    cmds = WRITES + ["write -P 0x55 2044M 8M", "write -z 0 128k", "write -P 0x66 100M 512",
                     "write -z 2047M 64k"]
    for who in ("q", "b"):
        d = tmp_path / who
        d.mkdir()
        img = qemu_image(d, subformat, extra, writes=False)
        if who == "q":
            r = qemu_io("vmdk", img, *cmds)
            assert "failed" not in r.stdout, r.stdout
        else:
            daemon, _, url = _export(tmp_path, img)
            with daemon:
                r = qemu_io("raw", url, *cmds)
                assert "failed" not in r.stdout, r.stdout
            for sock in ("qmp.sock", "nbd.sock"):
                if os.path.exists(tmp_path / sock):
                    os.unlink(tmp_path / sock)
    assert _files(tmp_path / "q") == _files(tmp_path / "b")


def test_vmfs_sparse_cowd_extent_reads_like_qemu(tmp_path):
    """A vmfsSparse descriptor over a VMware 3 (COWD) extent, grain tables of 4096 entries."""
    gran, sectors = 8, 100000
    tables = -(-sectors // (gran * 4096))
    gd_sector = 4
    gt_sector = gd_sector + 1
    data_sector = gt_sector + tables * 32
    gts = [[0] * 4096 for _ in range(tables)]
    grains = {0: b"\x11" * 4096, 5: b"\x22" * 4096, 4096 + 3: bytes(range(256)) * 16}
    body = bytearray()
    for i, (index, data) in enumerate(sorted(grains.items())):
        gts[index // 4096][index % 4096] = data_sector + i * gran
        body += data
    head = b"COWD" + struct.pack("<10I", 1, 3, sectors, gran, gd_sector, tables, 0, 0, 0, 0)
    out = bytearray(head.ljust(gd_sector * 512, b"\0"))
    out += struct.pack(f"<{tables}I", *(gt_sector + t * 32 for t in range(tables))).ljust(512,
                                                                                          b"\0")
    for gt in gts:
        out += struct.pack("<4096I", *gt)
    out += body
    (tmp_path / "x-delta.vmdk").write_bytes(bytes(out))
    img = str(tmp_path / "x.vmdk")
    with open(img, "wb") as f:
        f.write(b'# Disk DescriptorFile\nversion=1\nCID=a1b2c3d4\nparentCID=ffffffff\n'
                b'createType="vmfsSparse"\n\nRW %d VMFSSPARSE "x-delta.vmdk"\n' % sectors)
    data = _reads_like_qemu(tmp_path, img)
    assert data[5 * 4096:6 * 4096] == grains[5]


def test_blockdev_add_replies_match_qsd(tmp_path):
    """blockdev-add of good and broken vmdk images: the same replies from both daemons."""
    good = qemu_image(tmp_path, "twoGbMaxExtentSparse", writes=False)
    sh("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized",
       str(tmp_path / "v3.vmdk"), "1M")
    (tmp_path / "garbage.vmdk").write_bytes(b"version=1\ncreateType=\"monolithicFlat\"\n"
                                            b"RW 100 FLAT \"missing.img\" 0\n")
    (tmp_path / "tiny.vmdk").write_bytes(b"KD")
    with open(tmp_path / "v3.vmdk", "r+b") as f:
        f.seek(77)
        f.write(b"\0\0")  # version 3 without compression: read-only only
    cases = [(good, {}), (good, {"read-only": True}), (str(tmp_path / "v3.vmdk"), {}),
             (str(tmp_path / "v3.vmdk"), {"read-only": True}),
             (str(tmp_path / "garbage.vmdk"), {}), (str(tmp_path / "tiny.vmdk"), {})]
    replies = {}
    for qsd in (True, False):
        got = []
        with Daemon(str(tmp_path / f"{qsd}.sock"), qsd=qsd) as dm:
            c = dm.client()
            for i, (img, extra) in enumerate(cases):
                got.append(c.cmd("blockdev-add", driver="vmdk", **{"node-name": f"n{i}"},
                                 file={"driver": "file", "filename": img}, **extra))
                if "return" in got[-1]:
                    c.cmd("blockdev-del", **{"node-name": f"n{i}"})
        replies[qsd] = got
    assert replies[False] == replies[True]
