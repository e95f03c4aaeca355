"""Format probing against qemu-img, and the refusal of formats blockd has no driver for.

Images of every format qemu-img 7.2 knows are made by qemu-img itself (or
by hand where it cannot make them: dmg, bochs, cloop).  blockd-img must
name the format qemu-img detects and refuse it in every subcommand, with
``-f`` too, rather than read it as raw; the daemon refuses the driver in
``blockdev-add``; a backing file of such a format is refused as well.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from blockd.drivers import driver_names
from harness import HAVE_QSD, Daemon, blockd_img, qemu_img, without_module_notes

UNSUPPORTED = re.compile(r"Driver '([a-z0-9_-]+)' is not supported by blockd")

#: (file name, qemu-img command making it from src.raw, format qemu-img detects).
MADE = [
    ("sparse.vmdk", ["convert", "-O", "vmdk", "-o", "subformat=monolithicSparse"], "vmdk"),
    ("flat.vmdk", ["convert", "-O", "vmdk", "-o", "subformat=monolithicFlat"], "vmdk"),
    ("split.vmdk", ["convert", "-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"], "vmdk"),
    ("splitflat.vmdk", ["convert", "-O", "vmdk", "-o", "subformat=twoGbMaxExtentFlat"], "vmdk"),
    ("stream.vmdk", ["convert", "-O", "vmdk", "-o", "subformat=streamOptimized"], "vmdk"),
    ("img.vhdx", ["convert", "-O", "vhdx"], "vhdx"),
    ("dynamic.vhd", ["convert", "-O", "vpc", "-o", "subformat=dynamic"], "vpc"),
    ("img.vdi", ["convert", "-O", "vdi"], "vdi"),
    ("img.qed", ["convert", "-O", "qed"], "qed"),
    ("img.parallels", ["convert", "-O", "parallels"], "parallels"),
    ("img.qcow", ["convert", "-O", "qcow"], "qcow"),
]
HANDMADE = [("img.dmg", "dmg"), ("img.bochs", "bochs"), ("img.cloop", "cloop")]
ALL_IMAGES = [(name, fmt) for name, _, fmt in MADE] + HANDMADE
#: Formats blockd has no driver for yet: refused by name everywhere.
IMAGES = [(name, fmt) for name, fmt in ALL_IMAGES if fmt not in driver_names()]
#: Formats with a driver: probed and opened as qemu-img opens them.
OPENED = [(name, fmt) for name, fmt in ALL_IMAGES if fmt in driver_names()]
#: A format qemu-img makes that blockd has no driver for (backing file tests).
UNSUPPORTED_MADE = next(((name, fmt) for name, _, fmt in MADE if fmt not in driver_names()),
                        None)


def _dmg() -> bytes:
    """The smallest dmg qemu-img opens: an XML property list with no chunks, and the
    ``koly`` trailer pointing at it."""
    plist = b"<plist></plist>"
    trailer = bytearray(512)
    trailer[:4] = b"koly"
    struct.pack_into(">QQ", trailer, 0xD8, 0, len(plist))
    return plist.ljust(4096, b"\0") + bytes(trailer)


def _bochs() -> bytes:
    """A growing redolog of 4 KiB: one catalog entry, not yet allocated."""
    header = bytearray(512)
    header[:22] = b"Bochs Virtual HD Image"
    header[32:39] = b"Redolog"
    header[48:55] = b"Growing"
    struct.pack_into("<IIIIIIQ", header, 64, 0x20000, 512, 1, 1, 4096, 0, 4096)
    return bytes(header) + b"\xff\xff\xff\xff" + bytes(508)


def _cloop() -> bytes:
    """One compressed block of 512 zero bytes behind the V2.0 shell-script header."""
    magic = (b"#!/bin/sh\n#V2.0 Format\n"
             b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
    start = 128 + 8 + 16
    data = zlib.compress(bytes(512))
    return (magic.ljust(128, b"\0") + struct.pack(">II", 512, 1)
            + struct.pack(">QQ", start, start + len(data)) + data).ljust(1024, b"\0")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("probe")
    (d / "src.raw").write_bytes(b"\x5a" * 65536 + bytes(65536))
    for name, cmd, _ in MADE:
        res = qemu_img(*cmd, "src.raw", name, cwd=d)
        assert res.returncode == 0, res.stderr
    qemu_img("convert", "-O", "vpc", "-o", "subformat=fixed", "src.raw", "fixed.vhd", cwd=d)
    (d / "img.dmg").write_bytes(_dmg())
    (d / "img.bochs").write_bytes(_bochs())
    (d / "img.cloop").write_bytes(_cloop())
    return d


def qemu_format(d: Path, name: str, *opts: str) -> str:
    res = qemu_img("info", "--output=json", *opts, name, cwd=d)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["format"]


def refused(res: tuple[str, str, int], status: int = 1) -> str:
    """The format blockd-img refused by name (asserting it failed with qemu-img's exit
    status for a failed open, 2 for compare, and said so)."""
    out, err, code = res
    m = UNSUPPORTED.search(err)
    assert code == status and m is not None, res
    assert "Traceback" not in err
    return m.group(1)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- probing -----------------------------------------------------------------------


@pytest.mark.parametrize("name,fmt", OPENED)
def test_probed_format_opens_as_qemu_img_detects(images: Path, name: str, fmt: str) -> None:
    assert qemu_format(images, name) == fmt
    out, err, code = blockd_img("info", "--output=json", name, cwd=images)
    assert (code, err) == (0, "")
    assert json.loads(out)["format"] == fmt


@pytest.mark.parametrize("name,fmt", IMAGES)
def test_probed_format_is_refused_by_name(images: Path, name: str, fmt: str) -> None:
    assert qemu_format(images, name) == fmt
    assert refused(blockd_img("info", name, cwd=images)) == fmt


@pytest.mark.parametrize("name,fmt", IMAGES)
def test_every_subcommand_refuses(images: Path, name: str, fmt: str, tmp_path: Path) -> None:
    """Nothing opens the image as raw, and nothing is written to it."""
    shutil.copytree(images, tmp_path, dirs_exist_ok=True)
    before = digest(tmp_path / name)
    commands = [
        ["info", name], ["check", name], ["map", name], ["map", "--output=json", name],
        ["measure", "-O", "qcow2", name], ["compare", name, "src.raw"],
        ["compare", "src.raw", name], ["convert", "-O", "qcow2", name, "out.qcow2"],
        ["convert", "-n", "--target-image-opts", "src.raw", f"file.filename={name}"],
        ["snapshot", "-l", name],
        ["dd", f"if={name}", "of=out.raw", "bs=64k"], ["resize", name, "1M"],
        ["rebase", "-u", "-b", "", name], ["commit", name], ["amend", "-o", "size=1M", name],
        ["bitmap", "--add", name, "b0"],
    ]
    for cmd in commands:
        if fmt == "dmg" and "--target-image-opts" in cmd:
            continue  # dmg goes by the name, which options lack: raw to qemu-img too
        status = 2 if cmd[0] == "compare" else 1
        assert refused(blockd_img(*cmd, cwd=tmp_path), status) == fmt, cmd
        # The same with the format given: refused by the driver, not after probing.
        with_f = [cmd[0], "-f", fmt, *cmd[1:]] if cmd[0] not in ("compare", "convert", "dd",
                                                                 "snapshot") else None
        if with_f is not None:
            assert refused(blockd_img(*with_f, cwd=tmp_path)) == fmt, with_f
    assert digest(tmp_path / name) == before
    assert not (tmp_path / "out.qcow2").exists()


@pytest.mark.parametrize("name,fmt", IMAGES)
def test_explicit_format_is_refused(images: Path, name: str, fmt: str) -> None:
    assert refused(blockd_img("info", "-f", fmt, name, cwd=images)) == fmt
    assert refused(blockd_img("convert", "-f", fmt, "-O", "raw", name, "/dev/null",
                              cwd=images)) == fmt
    assert refused(blockd_img("compare", "-f", "raw", "-F", fmt, "src.raw", name,
                              cwd=images), 2) == fmt
    assert refused(blockd_img("info", "--image-opts", f"driver={fmt},file.filename={name}",
                              cwd=images)) == fmt


def test_fixed_vhd_is_raw_to_both(images: Path) -> None:
    """A fixed VHD has its footer at the end only: qemu-img probes it as raw."""
    assert qemu_format(images, "fixed.vhd") == "raw"
    out, err, code = blockd_img("info", "--output=json", "fixed.vhd", cwd=images)
    assert code == 0 and json.loads(out)["format"] == "raw", err
    assert qemu_format(images, "fixed.vhd", "-f", "vpc") == "vpc"
    out, err, code = blockd_img("info", "--output=json", "-f", "vpc", "fixed.vhd", cwd=images)
    assert code == 0 and json.loads(out)["format"] == "vpc", err


def _qcow2_header(version: int) -> bytes:
    return (b"QFI\xfb" + struct.pack(">I", version)).ljust(4096, b"\0")


#: Contents at the edges of the signatures, and what qemu-img makes of them.
EDGES = [
    ("v0.img", _qcow2_header(0), "raw"),
    ("luks2.img", b"LUKS\xba\xbe\x00\x02".ljust(4096, b"\0"), "raw"),
    ("empty.img", b"", "raw"),
    ("desc.vmdk", b"# Disk DescriptorFile\n  \r\n   \nversion=1\r\nCID=1\n", "vmdk"),
    ("desc4.vmdk", b"# Disk DescriptorFile\nversion=4\n", "raw"),
    ("blank.vmdk", b"# Disk DescriptorFile\n\nversion=1\n", "raw"),
    ("par.img", b"WithoutFreeSpace" + struct.pack("<I", 3) + bytes(4000), "raw"),
    ("cloop.dmg", _cloop(), "dmg"),
    ("zero.dmg", bytes(4096), "dmg"),
]


@pytest.mark.parametrize("name,data,fmt", EDGES)
def test_probe_edges_match_qemu(tmp_path: Path, name: str, data: bytes, fmt: str) -> None:
    (tmp_path / name).write_bytes(data)
    res = qemu_img("info", "--output=json", name, cwd=tmp_path)
    if res.returncode == 0:
        assert json.loads(res.stdout)["format"] == fmt
    else:  # a header made only to be probed: the named driver fails to open it
        assert fmt != "raw" and fmt in res.stderr.lower(), res.stderr
    out, err, code = blockd_img("info", "--output=json", name, cwd=tmp_path)
    if fmt == "raw":
        assert code == 0 and json.loads(out)["format"] == "raw", err
    elif fmt in driver_names():  # probed as qemu-img probes it, then opened or refused
        assert (code, err) == (res.returncode, without_module_notes(res.stderr).replace(
            "qemu-img", "blockd-img"))
    else:
        assert refused((out, err, code)) == fmt


# ---- backing files -----------------------------------------------------------------


def test_backing_file_of_unsupported_format(images: Path, tmp_path: Path) -> None:
    """Given as the backing format, and probed when the overlay names none.  ``info``
    opens no backing file (as qemu-img's), so only the others refuse."""
    if UNSUPPORTED_MADE is None:
        pytest.skip("every format qemu-img makes has a driver")
    name0, fmt = UNSUPPORTED_MADE
    base = "base." + name0.rsplit(".", 1)[1]
    shutil.copy(images / name0, tmp_path / base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", fmt, "given.qcow2",
             cwd=tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", fmt, "probed.qcow2",
             cwd=tmp_path)
    # Turn the backing format extension into one nobody knows (skipped when read).
    data = (tmp_path / "probed.qcow2").read_bytes()
    assert data.count(b"\xe2\x79\x2a\xca") == 1
    (tmp_path / "probed.qcow2").write_bytes(data.replace(b"\xe2\x79\x2a\xca", b"\x12\x34\x56\x78"))
    probed = json.loads(qemu_img("info", "--output=json", "probed.qcow2", cwd=tmp_path).stdout)
    assert "backing-filename-format" not in probed
    for name in ("given.qcow2", "probed.qcow2"):
        assert blockd_img("info", name, cwd=tmp_path)[2] == 0
        for cmd in (["map", name], ["convert", "-O", "raw", name, "o.raw"],
                    ["compare", name, base]):
            out, err, code = blockd_img(*cmd, cwd=tmp_path)
            assert "Could not open backing file: " in err, (cmd, err)
            assert refused((out, err, code), 2 if cmd[0] == "compare" else 1) == fmt, cmd
    out, err, code = blockd_img("create", "-f", "qcow2", "-b", base, "new.qcow2",
                                cwd=tmp_path)
    assert code == 1 and f"Detected format of {fmt}." in err


# ---- the daemon --------------------------------------------------------------------


def _add(client, path: Path, driver: str) -> dict:
    return client.cmd("blockdev-add", **{"driver": driver, "node-name": "n0",
                                         "file": {"driver": "file", "filename": str(path)}})


@pytest.mark.parametrize("name,fmt", IMAGES)
def test_blockdev_add_refuses_driver(images: Path, tmp_path: Path, name: str, fmt: str) -> None:
    with Daemon(str(tmp_path / "b.sock")) as daemon:
        c = daemon.client()
        reply = _add(c, images / name, fmt)
        assert reply["error"] == {"class": "GenericError",
                                  "desc": f"Driver '{fmt}' is not supported by blockd"}
        inline = c.cmd("blockdev-add", driver="raw", **{"node-name": "n1"},
                       file={"driver": fmt, "file": {"driver": "file",
                                                     "filename": str(images / name)}})
        assert inline["error"]["desc"] == f"Driver '{fmt}' is not supported by blockd"
        # A name QEMU does not know either keeps QEMU's schema error.
        assert _add(c, images / name, "nosuch")["error"] == {
            "class": "GenericError", "desc": "Parameter 'driver' does not accept value 'nosuch'"}
        assert c.cmd("query-named-block-nodes")["return"] == []
    if HAVE_QSD:
        with Daemon(str(tmp_path / "q.sock"), qsd=True) as qsd:
            reply = _add(qsd.client(), images / name, fmt)
            # qsd opens it; blockd's refusal keeps the class QEMU uses for failures.
            assert "return" in reply or reply["error"]["class"] == "GenericError"


def test_blockdev_add_refuses_unsupported_backing(images: Path, tmp_path: Path) -> None:
    if UNSUPPORTED_MADE is None:
        pytest.skip("every format qemu-img makes has a driver")
    name0, fmt = UNSUPPORTED_MADE
    base = "base." + name0.rsplit(".", 1)[1]
    shutil.copy(images / name0, tmp_path / base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", fmt, "top.qcow2",
             cwd=tmp_path)
    with Daemon(str(tmp_path / "b.sock")) as daemon:
        c = daemon.client()
        reply = _add(c, tmp_path / "top.qcow2", "qcow2")
        assert reply["error"]["class"] == "GenericError"
        assert reply["error"]["desc"] == ("Could not open backing file: "
                                          f"Driver '{fmt}' is not supported by blockd")
        assert c.cmd("query-named-block-nodes")["return"] == []


#: Drivers that need a network service or a device this machine lacks: a filename qemu-img
#: maps to each, and blockdev-add arguments QEMU's schema accepts for it.
NETWORK = [
    ("http", "http://127.0.0.1:9/x.img", {"url": "http://127.0.0.1:9/x.img"}),
    ("https", "https://127.0.0.1:9/x.img", {"url": "https://127.0.0.1:9/x.img"}),
    ("ftp", "ftp://127.0.0.1:9/x.img", {"url": "ftp://127.0.0.1:9/x.img"}),
    ("ftps", "ftps://127.0.0.1:9/x.img", {"url": "ftps://127.0.0.1:9/x.img"}),
    ("ssh", "ssh://127.0.0.1:9/x.img",
     {"server": {"host": "127.0.0.1", "port": "9"}, "path": "/x.img"}),
    ("nfs", "nfs://127.0.0.1/x.img",
     {"server": {"type": "inet", "host": "127.0.0.1"}, "path": "/x.img"}),
    ("iscsi", "iscsi://127.0.0.1/iqn.2000-01.x:t/0",
     {"transport": "tcp", "portal": "127.0.0.1", "target": "iqn.2000-01.x:t"}),
    ("rbd", "rbd:pool/image", {"pool": "pool", "image": "image"}),
    ("gluster", "gluster://127.0.0.1/vol/x.img",
     {"volume": "vol", "path": "x.img", "server": [{"type": "inet", "host": "127.0.0.1",
                                                    "port": "24007"}]}),
    ("nvme", "nvme://0000:00:00.0/1", {"device": "0000:00:00.0", "namespace": 1}),
    ("vvfat", "fat:/tmp", {"dir": "/tmp"}),
]


@pytest.mark.parametrize("driver,name,_", NETWORK)
def test_network_driver_names_are_refused(tmp_path: Path, driver: str, name: str, _) -> None:
    """The README's list of drivers blockd does not have: each filename gives the error
    the README shows, never a guess at another driver."""
    out, err, code = blockd_img("info", name, cwd=tmp_path)
    assert (out, err, code) == ("", f"blockd-img: Could not open '{name}': Driver '{driver}' "
                                "is not supported by blockd\n", 1)


def test_network_drivers_refused_by_blockdev_add(tmp_path: Path) -> None:
    with Daemon(str(tmp_path / "b.sock")) as daemon:
        c = daemon.client()
        for driver, _, args in NETWORK:
            reply = c.cmd("blockdev-add", driver=driver, **{"node-name": "n"}, **args)
            assert reply["error"] == {"class": "GenericError",
                                      "desc": f"Driver '{driver}' is not supported by blockd"}
        assert c.cmd("query-named-block-nodes")["return"] == []


def test_blkreplay_is_unknown_as_in_qsd_and_qemu_img(tmp_path: Path) -> None:
    """blkreplay is in QEMU's schema but only system emulators have it: qsd and qemu-img
    call it unknown, and so does blockd."""
    (tmp_path / "a.raw").write_bytes(bytes(65536))
    image = {"driver": "file", "filename": str(tmp_path / "a.raw")}
    opts = f"driver=blkreplay,image.driver=file,image.filename={tmp_path}/a.raw"
    q = qemu_img("info", "--image-opts", opts)
    assert blockd_img("info", "--image-opts", opts, cwd=tmp_path) == \
        ("", q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    for qsd in ([False, True] if HAVE_QSD else [False]):
        with Daemon(str(tmp_path / f"{qsd}.sock"), qsd=qsd) as daemon:
            reply = daemon.client().cmd("blockdev-add", driver="blkreplay",
                                        **{"node-name": "r"}, image=image)
        assert reply == {"error": {"class": "GenericError",
                                   "desc": "Unknown driver 'blkreplay'"}}
