"""The vdi driver against qemu-img and qemu-io, both ways (helpers shared with test_vpc.py).

Images qemu-img makes, static and dynamic, read as qemu-img reads them;
the same writes by QEMU and through blockd leave identical files; images
blockd-img makes equal qemu-img's but for their UUIDs and pass
``qemu-img check``; ``check`` reports what qemu-img reports, corrupt
block maps included; hostile headers fail with QEMU's messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from harness import Daemon, blockd_img, qemu_img, qemu_io_ok, same
from test_vpc import (WRITES, check_nbd_read, check_same_create, check_same_writes, check_views,
                      metadata_of)

MiB = 1 << 20


def _qemu_image(d: Path, opts: str, size: str = "11M", name: str = "a.vdi") -> Path:
    image = d / name
    r = qemu_img("create", "-q", "-f", "vdi", "-o", opts, str(image), size)
    assert r.returncode == 0, r.stderr
    return image


@pytest.mark.parametrize("opts", ["static=off", "static=on"])
def test_qemu_images_read_alike(tmp_path, opts):
    image = _qemu_image(tmp_path, opts)
    qemu_io_ok("vdi", str(image), *WRITES)
    check_views(tmp_path, "vdi", "a.vdi")
    for cmd in (["check"], ["check", "--output=json"]):
        same(tmp_path, *cmd, "-f", "vdi", "a.vdi")
    check_nbd_read(tmp_path, "vdi", image)


def test_odd_sizes(tmp_path):
    for size in ("0", "10000", "1G"):
        _qemu_image(tmp_path, "static=off", size, f"s{size}.vdi")
        for cmd in (["info", "--output=json"], ["map", "--output=json"], ["check"]):
            same(tmp_path, *cmd, "-f", "vdi", f"s{size}.vdi")


@pytest.mark.parametrize("opts", ["static=off", "static=on"])
def test_writes_match_qemu(tmp_path, opts):
    image = _qemu_image(tmp_path, opts, "300M")
    qemu_io_ok("vdi", str(image), "write -P 0x99 2M 8k")
    # Blocks far apart make the block map rewrite span several sectors.
    check_same_writes(tmp_path, "vdi", image, WRITES + [
        "write -P 0x66 2M 512", "write -P 0x77 10M 3M", "write -P 0x78 200M 4k",
        "write -P 0x79 127M 2M", "write -z 250M 1M"])


def test_convert_into_vdi(tmp_path):
    src = tmp_path / "src.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(src), "11M").returncode == 0
    qemu_io_ok("raw", str(src), *WRITES)
    for opts in ("static=off", "static=on"):
        out = blockd_img("convert", "-O", "vdi", "-o", opts, "src.raw", "o.vdi", cwd=tmp_path)
        assert out[2] == 0, out
        r = qemu_img("compare", "-f", "raw", "-F", "vdi", str(src), str(tmp_path / "o.vdi"))
        assert r.returncode == 0, r.stdout + r.stderr
        r = qemu_img("check", "-f", "vdi", str(tmp_path / "o.vdi"))
        assert r.returncode == 0, r.stdout + r.stderr
        check_views(tmp_path, "vdi", "o.vdi")


@pytest.mark.parametrize("size", ["0", "512", "10000", "10M", "1G"])
@pytest.mark.parametrize("opts", ["static=off", "static=on", "preallocation=falloc",
                                  "static=on,preallocation=full"])
def test_create_like_qemu(tmp_path, size, opts):
    """Same messages and the same file, but for the two random UUIDs."""
    theirs = check_same_create(tmp_path, "vdi", opts, size, "x.vdi")[1]
    size, ours = metadata_of(tmp_path / "x.vdi")
    assert size == theirs[0]
    theirs = theirs[1]
    assert ours[:392] + ours[424:] == theirs[:392] + theirs[424:]
    assert ours[392:424] != bytes(32)
    same(tmp_path, "check", "-f", "vdi", "x.vdi")
    same(tmp_path, "info", "--output=json", "-f", "vdi", "x.vdi")


@pytest.mark.parametrize("opts", ["preallocation=metadata", "preallocation=bogus",
                                  "static=maybe", "help"])
def test_create_errors(tmp_path, opts):
    same(tmp_path, "create", "-f", "vdi", "-o", opts, "x.vdi", "10M")


def test_blockdev_create(tmp_path):
    """The QMP job: off and metadata (static) preallocation; QEMU refuses falloc and full."""
    path = tmp_path / "c.vdi"
    with Daemon(str(tmp_path / "qmp.sock")) as daemon:
        c = daemon.client()
        assert "error" not in c.create_job("f", {"driver": "file", "filename": str(path),
                                                 "size": 0})
        assert "return" in c.cmd("blockdev-add", driver="file", filename=str(path),
                                 **{"node-name": "f0"})
        for mode in ("falloc", "full"):
            bad = c.create_job(mode, {"driver": "vdi", "file": "f0", "size": MiB,
                                      "preallocation": mode})
            assert bad["error"] == "Preallocation mode not supported for vdi"
        assert "error" not in c.create_job("v", {"driver": "vdi", "file": "f0", "size": 5 * MiB,
                                                 "preallocation": "metadata"})
        c.cmd("blockdev-del", **{"node-name": "f0"})
    info = json.loads(qemu_img("info", "--output=json", "-f", "vdi", str(path)).stdout)
    assert info["virtual-size"] == 5 * MiB
    assert qemu_img("check", "-f", "vdi", str(path)).returncode == 0


# ---- check and hostile images -------------------------------------------------------------


def _patched(d: Path, *patches: tuple[int, str, int]) -> None:
    image = _qemu_image(d, "static=off", "11M", "h.vdi")
    qemu_io_ok("vdi", str(image), "write -P 1 0 4k", "write -P 2 3M 4k")
    data = bytearray(image.read_bytes())
    for off, fmt, value in patches:
        struct.pack_into(fmt, data, off, value)
    image.write_bytes(bytes(data))


@pytest.mark.parametrize("patches", [
    [(512 + 4 * 5, "<I", 0), (512 + 4 * 6, "<I", 99)],  # shared data block, entry too large
    [(388, "<I", 7)],  # wrong count of allocated blocks
    [(512 + 4 * 7, "<I", 0xFFFFFFFE)],  # a discarded block is fine
])
def test_check_corruptions(tmp_path, patches):
    _patched(tmp_path, *patches)
    for cmd in (["check"], ["check", "--output=json"], ["check", "-r", "all"],
                ["check", "-r", "leaks"]):
        same(tmp_path, *cmd, "-f", "vdi", "h.vdi")


HOSTILE = {
    "signature": [(64, "<I", 0x12345678)],
    "version": [(68, "<I", 0x00020003)],
    "bmap unaligned": [(340, "<I", 513)],
    "data unaligned": [(344, "<I", 1025)],
    "sector size": [(360, "<I", 4096)],
    "block size": [(376, "<I", 2 << 20)],
    "huge disk size": [(368, "<Q", 1 << 62)],
    "disk size over map": [(368, "<Q", 12 * MiB)],
    "too many blocks": [(384, "<I", 0x30000000)],
    "link uuid": [(430, "<B", 1)],
    "parent uuid": [(450, "<B", 1)],
    "odd disk size": [(368, "<Q", 10 * MiB + 1)],
    "data offset huge": [(344, "<I", 0xFFFFFE00)],
    "entry far away": [(512, "<I", 0x3FFFFFFF)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers(tmp_path, case):
    """qemu-img's message and exit status for the same damage, never a traceback."""
    _patched(tmp_path, *HOSTILE[case])
    for cmd in (["info"], ["map", "--output=json"]):
        q = qemu_img(*cmd, "-f", "vdi", "h.vdi", cwd=tmp_path)
        b = blockd_img(*cmd, "-f", "vdi", "h.vdi", cwd=tmp_path)
        assert "Traceback" not in b[1]
        assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    assert raw_or_error(tmp_path, "blockd-img") == raw_or_error(tmp_path, "qemu-img")


def raw_or_error(d: Path, tool: str) -> tuple[int, bytes]:
    out = d / f"{tool}.raw"
    if tool == "qemu-img":
        code = qemu_img("convert", "-f", "vdi", "-O", "raw", "h.vdi", str(out), cwd=d).returncode
    else:
        code = blockd_img("convert", "-f", "vdi", "-O", "raw", "h.vdi", str(out), cwd=d)[2]
    data = out.read_bytes() if code == 0 else b""
    return code, data


def test_block_map_past_end_of_file(tmp_path):
    """A map that the file cannot hold: QEMU would read it as zeroes (every block at data
    block 0); refused with a clear message instead, and without reading it."""
    _patched(tmp_path, (384, "<I", 0x1FFFFF80), (368, "<Q", 1 << 40))
    out, err, code = blockd_img("info", "-f", "vdi", "h.vdi", cwd=tmp_path)
    assert code == 1 and "extends past the end of the file" in err, err


def test_compare_vpc_with_vdi(tmp_path):
    """compare across the two formats, same and differing content, as qemu-img reports it."""
    vpc = tmp_path / "a.vhd"
    assert qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", str(vpc),
                    "11M").returncode == 0
    qemu_io_ok("vpc", str(vpc), *WRITES)
    vdi = _qemu_image(tmp_path, "static=off")
    qemu_io_ok("vdi", str(vdi), *WRITES)
    same(tmp_path, "compare", "-f", "vpc", "-F", "vdi", "a.vhd", "a.vdi")
    qemu_io_ok("vdi", str(vdi), "write -P 0x12 6M 512")
    for flags in ([], ["-s"]):
        same(tmp_path, "compare", *flags, "-f", "vpc", "-F", "vdi", "a.vhd", "a.vdi")


def test_writes_to_odd_sized_image(tmp_path):
    """VBoxManage makes images of any byte size; QEMU rounds up to a sector and writes the
    rounded size back with the header when it allocates, and so does blockd."""
    _patched(tmp_path, (368, "<Q", 10 * MiB + 1))
    check_same_writes(tmp_path, "vdi", tmp_path / "h.vdi", ["write -P 5 5M 4k",
                                                            "write -P 6 10M 512"])
