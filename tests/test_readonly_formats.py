"""The read-only formats (bochs, cloop, dmg) against qemu-img and qemu-storage-daemon.

qemu-img cannot create these, so the images are written here from the
formats' layouts (tests/readonly_images.py).  qemu-img must read each one
as the bytes it was built from (which checks the builders), and blockd
must read it identically through blockd-img and over an NBD export, with
the same ``info``, ``map`` and ``check`` answers, the same refusal of
writing, and QEMU's errors for damaged headers and tables.  Random damage
must end in a clear error or a read, never a traceback, a hang or memory
beyond a bound.  (Debian's QEMU lacks its dmg bzip2 module: bzip2 chunks are
compared with the bytes the image was built from only.)
"""

from __future__ import annotations

import asyncio
import random
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from blockd.block.graph import BlockGraph
from blockd.errors import QMPError
from harness import HAVE_QSD, ROOT, Daemon, blockd_img, open_user, qemu_img, without_module_notes
from readonly_images import (BZIP2, COPY, ZLIB, bochs_image, cloop_image, dmg_image, pattern,
                             write)
from test_vpc import nbd_uri

MiB = 1 << 20
GUEST = pattern(3 * MiB)

#: name -> (format, file name, image bytes, whether this QEMU reads it)
IMAGES = {
    "bochs": ("bochs", "a.bochs", lambda: bochs_image(GUEST), True),
    "bochs v1 4k extents": ("bochs", "a.bochs",
                            lambda: bochs_image(GUEST, extent=4096, version=0x00010000), True),
    "bochs big bitmap": ("bochs", "a.bochs", lambda: bochs_image(GUEST, bitmap=1500), True),
    "cloop 64k": ("cloop", "a.cloop", lambda: cloop_image(GUEST), True),
    "cloop 512": ("cloop", "a.cloop", lambda: cloop_image(GUEST, 512), True),
    "dmg xml zlib": ("dmg", "a.dmg", lambda: dmg_image(GUEST, [ZLIB]), True),
    "dmg xml raw": ("dmg", "a.dmg", lambda: dmg_image(GUEST, [COPY], chunk_sectors=2048), True),
    "dmg rsrc zlib raw": ("dmg", "a.dmg", lambda: dmg_image(GUEST, [ZLIB, COPY],
                                                            resource_fork=True), True),
    "dmg bzip2": ("dmg", "a.dmg", lambda: dmg_image(GUEST, [BZIP2, ZLIB, COPY]), False),
}


def _quiet(stderr: str) -> str:
    """qemu-img's stderr without the notes of Debian's build about its missing dmg
    modules (bzip2, lzfse), which it prints on every dmg open; its other warnings as
    blockd-img logs them (without the program's name)."""
    return without_module_notes(stderr).replace("qemu-img: warning: ", "warning: ")


def alike(cwd: Path, *args: str) -> None:
    """:func:`same`, but for dmg's module notes."""
    q = qemu_img(*args, cwd=cwd)
    b = blockd_img(*args, cwd=cwd)
    assert b == (q.stdout, _quiet(q.stderr).replace("qemu-img", "blockd-img"),
                 q.returncode), args


def _raw(d: Path, tool: str, *args: str) -> tuple[int, bytes]:
    out = d / f"{tool}.raw"
    if out.exists():
        out.unlink()
    if tool == "qemu-img":
        code = qemu_img("convert", *args, "-O", "raw", str(out), cwd=d).returncode
    else:
        code = blockd_img("convert", *args, "-O", "raw", str(out), cwd=d)[2]
    return code, out.read_bytes() if code == 0 else b""


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_read_alike(tmp_path, name):
    fmt, file, build, qemu_reads = IMAGES[name]
    image = write(tmp_path / file, build())
    assert _raw(tmp_path, "blockd-img", "-f", fmt, file) == (0, GUEST)
    if qemu_reads:
        assert _raw(tmp_path, "qemu-img", "-f", fmt, file) == (0, GUEST)
        for cmd in (["info"], ["info", "--output=json"], ["map", "--output=json"],
                    ["check"], ["check", "--output=json"]):
            alike(tmp_path, *cmd, "-f", fmt, file)
            alike(tmp_path, *cmd, file)  # probed: by signature, by magic, by name
    nbd = str(tmp_path / "nbd.sock")
    daemon = Daemon(str(tmp_path / "qmp.sock"),
                    "--blockdev", f"driver=file,node-name=f0,filename={image}",
                    "--blockdev", f"driver={fmt},node-name=img,file=f0,read-only=on",
                    "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                    "--export", "type=nbd,id=e0,node-name=img")
    try:
        assert _raw(tmp_path, "qemu-img", "-f", "raw", nbd_uri(nbd, "img")) == (0, GUEST)
        # Unaligned reads are served from whole sectors: the same as from the guest bytes.
        write(tmp_path / "guest.raw", GUEST)
        for src, out in ((nbd_uri(nbd, "img"), "dd.raw"), (tmp_path / "guest.raw", "g.raw")):
            r = qemu_img("dd", "-f", "raw", "-O", "raw", "bs=1000", "skip=7", "count=900",
                         f"if={src}", f"of={tmp_path / out}")
            assert r.returncode == 0, r.stderr
        assert (tmp_path / "dd.raw").read_bytes() == (tmp_path / "g.raw").read_bytes()
    finally:
        daemon.stop()


def test_dmg_probed_by_name_only(tmp_path):
    """A dmg image not named ``.dmg`` is raw to qemu-img, and to blockd."""
    write(tmp_path / "a.img", dmg_image(GUEST[:MiB], [ZLIB]))
    alike(tmp_path, "info", "--output=json", "a.img")
    write(tmp_path / "c.dmg", cloop_image(GUEST[:MiB]))  # a cloop header in a .dmg: dmg
    alike(tmp_path, "info", "c.dmg")


@pytest.mark.parametrize("fmt", ["bochs", "cloop", "dmg"])
def test_create_refused(tmp_path, fmt):
    alike(tmp_path, "create", "-f", fmt, f"x.{fmt}", "1M")
    alike(tmp_path, "create", "-f", fmt, "-o", "help")


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
def test_read_write_open_as_qsd(tmp_path):
    """Read-write is refused with QEMU's words; ``auto-read-only`` opens read-only."""
    files = {}
    for name in ("bochs", "cloop 64k", "dmg xml zlib"):
        fmt, file, build, _ = IMAGES[name]
        files[fmt] = write(tmp_path / file, build())
    answers = {}
    for qsd in (False, True):
        with Daemon(str(tmp_path / f"{qsd}.sock"), qsd=qsd) as daemon:
            c = daemon.client()
            got = []
            for fmt, path in sorted(files.items()):
                for extra in ({"read-only": False}, {"read-only": False, "auto-read-only": True},
                              {}):
                    reply = c.cmd("blockdev-add", driver=fmt, **{"node-name": "n"}, **extra,
                                  file={"driver": "file", "filename": str(path)})
                    got.append(reply.get("error", {}).get("desc"))
                    if "return" in reply:
                        nodes = c.cmd("query-named-block-nodes")["return"]
                        got.append([(n["node-name"], n["ro"], n["drv"]) for n in nodes
                                    if n["node-name"] == "n"])
                        c.cmd("blockdev-del", **{"node-name": "n"})
            answers[qsd] = got
    assert answers[False] == answers[True]
    assert answers[False].count("Image is read-only") == 6  # read-only is off by default


# ---- damaged images -----------------------------------------------------------------------


def _bochs_cases() -> dict[str, list[tuple[int, str, int]]]:
    return {
        "bochs magic": [(0, "<B", ord("X"))],
        "bochs type": [(32, "<B", ord("X"))],
        "bochs version": [(64, "<I", 0x30000)],
        "bochs catalog too large": [(72, "<I", 0x100001)],
        "bochs catalog too small": [(72, "<I", 3)],
        "bochs catalog past end of file": [(68, "<I", 0x7FFFFFF0)],
        "bochs extent 256": [(80, "<I", 256)],
        "bochs extent not a power of 2": [(80, "<I", 12288)],
        "bochs extent too large": [(80, "<I", 16 << 20)],
        "bochs bitmap 0": [(76, "<I", 0)],
        "bochs disk huge": [(88, "<Q", 1 << 62)],
        "bochs entry far away": [(512, "<I", 0x7FFFFFFF)],
    }


def _cloop_cases() -> dict[str, list[tuple[int, str, int]]]:
    return {
        "cloop block size 1000": [(128, ">I", 1000)],
        "cloop block size 0": [(128, ">I", 0)],
        "cloop block size huge": [(128, ">I", 128 << 20)],
        "cloop n_blocks over limit": [(132, ">I", 0x20000000)],
        "cloop too many offsets": [(132, ">I", 0x10000000)],
        "cloop table past end of file": [(132, ">I", 0x1000000)],
        "cloop offsets decreasing": [(136 + 8 * 3, ">Q", 5)],
        "cloop block too large": [(136 + 8 * 2, ">Q", 1 << 40)],
        "cloop bad stream": [(136 + 8 * 49, ">Q", 0)],
        "cloop fewer blocks": [(132, ">I", 20)],
    }


def _koly(data: bytes) -> int:
    return len(data) - 512


def _dmg_cases(data: bytes) -> dict[str, list[tuple[int, str, int]]]:
    k = _koly(data)
    return {
        "dmg no koly": [(k, ">I", 0x12345678)],
        "dmg data fork past koly": [(k + 0x18, ">Q", k + 1)],
        "dmg xml offset past koly": [(k + 0xD8, ">Q", k)],
        "dmg xml length past koly": [(k + 0xE0, ">Q", k)],
        "dmg xml length 0": [(k + 0xE0, ">Q", 0)],
        "dmg rsrc past koly": [(k + 0x28, ">Q", k + 100), (k + 0x30, ">Q", 1)],
        "dmg sectors negative": [(k + 0x1EC, ">Q", 1 << 63)],
        "dmg sectors beyond chunks": [(k + 0x1EC, ">Q", 100000)],
        "dmg sectors fewer": [(k + 0x1EC, ">Q", 100)],
        "dmg data fork offset moved": [(k + 0x18, ">Q", 64)],
    }


def _rsrc_cases(data: bytes) -> dict[str, list[tuple[int, str, int]]]:
    k = _koly(data)
    rsrc = struct.unpack_from(">Q", data, k + 0x28)[0]
    first = rsrc + 256 + 4  # the first mish block
    chunk = first + 204
    return {
        "rsrc data offset past fork": [(rsrc, ">I", 0x7FFFFFFF)],
        "rsrc count 0": [(rsrc + 8, ">I", 0)],
        "rsrc count past fork": [(rsrc + 8, ">I", 0x7FFFFFFF)],
        "rsrc resource size 0": [(first - 4, ">I", 0)],
        "rsrc resource size huge": [(first - 4, ">I", 0x7FFFFFFF)],
        "rsrc not mish": [(first, ">I", 0x12345678)],
        "rsrc chunk sector count huge": [(chunk + 0x10, ">Q", 1 << 40)],
        "rsrc chunk length huge": [(chunk + 0x20, ">Q", 1 << 40)],
        "rsrc chunk unknown type": [(chunk, ">I", 0x80000099)],
        "rsrc chunk type 0": [(chunk, ">I", 0)],
        "rsrc chunk offset huge": [(chunk + 0x18, ">Q", 1 << 62)],
        "rsrc chunk sector moved": [(chunk + 8, ">Q", 1 << 30)],
        "rsrc zero chunk huge": [(chunk, ">I", 2), (chunk + 0x10, ">Q", 1 << 40)],
        "rsrc first sector huge": [(first + 8, ">Q", (1 << 64) - 5)],
    }


def _all_cases() -> list[tuple[str, str, str, bytes, list[tuple[int, str, int]]]]:
    """(case, format, file name, base image, patches)."""
    bochs = bochs_image(GUEST[:MiB])
    cloop = cloop_image(GUEST[:4 * MiB // 4 * 3])
    dmg = dmg_image(GUEST[:MiB], [ZLIB, COPY])
    rsrc = dmg_image(GUEST[:MiB], [ZLIB, COPY], resource_fork=True)
    out = [(n, "bochs", "h.bochs", bochs, p) for n, p in _bochs_cases().items()]
    out += [(n, "cloop", "h.cloop", cloop, p) for n, p in _cloop_cases().items()]
    out += [(n, "dmg", "h.dmg", dmg, p) for n, p in _dmg_cases(dmg).items()]
    out += [(n, "dmg", "h.dmg", rsrc, p) for n, p in _rsrc_cases(rsrc).items()]
    return out


CASES = {case[0]: case for case in _all_cases()}

#: Damage QEMU opens and blockd refuses, and the words of blockd's error: a table the file
#: cannot hold (QEMU reads zeroes past its end), a chunk QEMU refuses with a message printed
#: before a bare "Invalid argument" (blockd's error is that message).
CLEAR_ERRORS = {
    "cloop table past end of file": "extends past the end of the file",
    "rsrc chunk sector count huge": "is larger than max",
    "rsrc chunk length huge": "is larger than max",
}
#: Damage QEMU warns about when it opens the image.
WARNS = {"rsrc chunk unknown type"}
#: Where QEMU serves stale bytes of an earlier chunk: blockd fails the read instead.
READ_FAILS = {"dmg data fork offset moved"}


def _patched(d: Path, case: str) -> tuple[str, str]:
    _, fmt, name, data, patches = CASES[case]
    buf = bytearray(data)
    for off, spec, value in patches:
        struct.pack_into(spec, buf, off, value)
    (d / name).write_bytes(bytes(buf))
    return fmt, name


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_images_as_qemu(tmp_path, case):
    """qemu-img's message and status for the same damage, and the same bytes or failure
    from convert, never a traceback."""
    fmt, name = _patched(tmp_path, case)
    for cmd in (["info"], ["map", "--output=json"]):
        q = qemu_img(*cmd, "-f", fmt, name, cwd=tmp_path)
        b = blockd_img(*cmd, "-f", fmt, name, cwd=tmp_path)
        assert "Traceback" not in b[1]
        if case in CLEAR_ERRORS:
            assert b[2] == 1 and CLEAR_ERRORS[case] in b[1], b
            continue
        if case in WARNS:  # logged once a process: seen by a process of its own below
            assert (b[0], b[2]) == (q.stdout, q.returncode)
            continue
        assert b == (q.stdout, _quiet(q.stderr).replace("qemu-img", "blockd-img"),
                     q.returncode)
    if case in WARNS:
        r = subprocess.run([sys.executable, "-m", "blockd.img.cli", "info", "-f", fmt,
                            str(tmp_path / name)], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
        assert r.stderr == _quiet(q.stderr), r.stderr
    if case in CLEAR_ERRORS:
        return
    theirs, ours = _raw(tmp_path, "qemu-img", "-f", fmt, name), \
        _raw(tmp_path, "blockd-img", "-f", fmt, name)
    if case in READ_FAILS:
        assert ours[0] == 1
    else:
        assert ours == theirs


# ---- random damage ------------------------------------------------------------------------

FUZZ_CASES = 150
#: What opening and reading one hostile image may cost.
MEMORY_BOUND = 160 * MiB
INTERESTING = [0, 1, 511, 512, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def _mutate(data: bytes, fields: list[tuple[int, str]], rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.6:
            off, spec = rng.choice(fields)
            bits = 8 * struct.calcsize(spec)
            value = rng.choice(INTERESTING + [rng.getrandbits(bits)]) & ((1 << bits) - 1)
            if off + struct.calcsize(spec) <= len(out):
                struct.pack_into(spec, out, off, value)
        elif kind < 0.9:
            at = rng.randrange(len(out))
            out[at] ^= 1 << rng.randrange(8)
        else:
            del out[rng.randrange(len(out)):]
    return bytes(out)


def _fuzz_bases() -> list[tuple[str, bytes, list[tuple[int, str]]]]:
    guest = GUEST[:MiB]
    bochs = bochs_image(guest)
    cloop = cloop_image(guest, 16384)
    rsrc = dmg_image(guest, [ZLIB, COPY, BZIP2], resource_fork=True)
    xml = dmg_image(guest, [ZLIB, COPY])
    k = len(rsrc) - 512
    r = struct.unpack_from(">Q", rsrc, k + 0x28)[0]
    chunk_fields = [(r + 260 + 204 + 40 * i + f, s) for i in range(6)
                    for f, s in ((0, ">I"), (8, ">Q"), (16, ">Q"), (24, ">Q"), (32, ">Q"))]
    kx = len(xml) - 512
    koly = [(0x18, ">Q"), (0x28, ">Q"), (0x30, ">Q"), (0xD8, ">Q"), (0xE0, ">Q"),
            (0x1EC, ">Q")]
    return [
        ("bochs", bochs, [(64, "<I"), (68, "<I"), (72, "<I"), (76, "<I"), (80, "<I"),
                          (84, "<Q"), (88, "<Q")] + [(512 + 4 * i, "<I") for i in range(8)]),
        ("cloop", cloop, [(128, ">I"), (132, ">I")] + [(136 + 8 * i, ">Q") for i in range(8)]),
        ("dmg", rsrc, [(k + f, s) for f, s in koly] + [(r, ">I"), (r + 8, ">I"),
                                                        (r + 256, ">I")] + chunk_fields),
        ("dmg", xml, [(kx + f, s) for f, s in koly]),
    ]


async def _open_and_read(fmt: str, path: str) -> None:
    """Open, read every byte (at most 64 MiB), close; only the driver's errors escape."""
    g = BlockGraph()
    try:
        user = await open_user(g, {"driver": fmt, "node-name": "h", "read-only": True,
                                   "file": {"driver": "file", "filename": path}}, False)
    except QMPError:
        await g.close_all()
        return
    try:
        size = min(user.length(), 64 * MiB)
        for off in range(0, size, MiB):
            try:
                data = await user.read(off, min(MiB, size - off))
                assert len(data) == min(MiB, size - off)
            except OSError:
                pass
    finally:
        await g.close_all()


def test_random_damage(tmp_path):
    rng = random.Random(2323)
    bases = _fuzz_bases()
    path = tmp_path / "fuzz.img"
    for i in range(FUZZ_CASES):
        fmt, data, fields = bases[i % len(bases)]
        path.write_bytes(_mutate(data, fields, rng))
        tracemalloc.start()
        try:
            asyncio.run(asyncio.wait_for(_open_and_read(fmt, str(path)), 120))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < MEMORY_BOUND, (i, fmt, peak)


def test_random_damage_in_the_daemon(tmp_path):
    """One daemon opens damaged images of every format: it answers after each, and a
    refused one leaves the file as it was."""
    rng = random.Random(77)
    bases = _fuzz_bases()
    with Daemon(str(tmp_path / "qmp.sock")) as daemon:
        c = daemon.client()
        for i in range(40):
            fmt, data, fields = bases[i % len(bases)]
            path = tmp_path / f"d{i % 4}.img"
            data = _mutate(data, fields, rng)
            path.write_bytes(data)
            reply = c.cmd("blockdev-add", driver=fmt, **{"node-name": "h", "read-only": True},
                          file={"driver": "file", "filename": str(path)})
            assert "return" in reply or reply["error"]["class"] == "GenericError", reply
            if "return" in reply:
                assert c.cmd("blockdev-del", **{"node-name": "h"}) == {"return": {}}
            assert path.read_bytes() == data
            assert c.cmd("query-version")["return"]["qemu"]["major"] == 7
        assert daemon.proc.poll() is None


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
def test_reopen_refused_as_qsd(tmp_path):
    """QEMU cannot reopen nodes of these drivers (nor parallels): blockdev-reopen says so,
    with the node's name, whatever the new options."""
    files = {fmt: write(tmp_path / f"r.{fmt}", IMAGES[name][2]())
             for fmt, name in (("bochs", "bochs"), ("cloop", "cloop 64k"),
                               ("dmg", "dmg xml zlib"))}
    assert qemu_img("create", "-q", "-f", "parallels", str(tmp_path / "r.prl"),
                    "1M").returncode == 0
    files["parallels"] = tmp_path / "r.prl"
    answers = {}
    for qsd in (False, True):
        with Daemon(str(tmp_path / f"{qsd}.sock"), qsd=qsd) as daemon:
            c = daemon.client()
            got = []
            for fmt, path in sorted(files.items()):
                c.cmd("blockdev-add", driver="file", filename=str(path), **{"node-name": "f"})
                got.append(c.cmd("blockdev-add", driver=fmt, file="f", **{"node-name": "n",
                                                                          "read-only": True}))
                for ro in (False, True):
                    got.append(c.cmd("blockdev-reopen", options=[{
                        "driver": fmt, "node-name": "n", "file": "f", "read-only": ro}]))
                c.cmd("blockdev-del", **{"node-name": "n"})
                c.cmd("blockdev-del", **{"node-name": "f"})
            answers[qsd] = got
    assert answers[False] == answers[True]
    assert sum("does not support reopening files" in str(a) for a in answers[False]) == 8
