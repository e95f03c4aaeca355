"""blockd-img amend, rebase, map --picture and terminal progress, against qemu-img.

Each case runs qemu-img on one copy of an image and blockd-img on another,
then compares what the tools printed and what they left behind: ``qemu-img
info`` (format-specific data, backing fields), ``qemu-img check`` and the
guest content (``qemu-img compare``).
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from harness import blockd_img, map_json, qemu_img, qemu_io_ok, same


ROOT = Path(__file__).parent.parent


def both(d: Path, args: list[str], name: str) -> None:
    """Run ``args`` (with ``X`` for the image) on q-``name`` and b-``name``; same output."""
    q = qemu_img(*[f"q-{name}" if a == "X" else a for a in args], cwd=d)
    b = blockd_img(*[f"b-{name}" if a == "X" else a for a in args], cwd=d)
    assert b == (q.stdout.replace(f"q-{name}", f"b-{name}"),
                 q.stderr.replace("qemu-img", "blockd-img").replace(f"q-{name}", f"b-{name}"),
                 q.returncode), args


def info(path: Path) -> dict:
    out = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    for key in ("filename", "actual-size", "backing-filename", "full-backing-filename"):
        out.pop(key, None)
    return out


def assert_clean(path: Path) -> None:
    res = qemu_img("check", str(path))
    assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout + res.stderr


def twins(d: Path, name: str) -> tuple[Path, Path]:
    shutil.copy(d / name, d / f"q-{name}")
    shutil.copy(d / name, d / f"b-{name}")
    return d / f"q-{name}", d / f"b-{name}"


# ---- amend -------------------------------------------------------------------------

AMEND = [
    ("", "-o lazy_refcounts=on"),
    ("lazy_refcounts=on", "-o lazy_refcounts=off"),
    ("", "-o compat=0.10"),
    ("compat=0.10", "-o compat=1.1"),
    ("compat=0.10", "-o compat=v3 -o lazy_refcounts=on"),
    ("", "-o refcount_bits=1"),
    ("", "-o refcount_bits=64"),
    ("refcount_bits=2", "-o refcount_bits=8"),
    ("", "-o compat=0.10,refcount_bits=8"),
    ("refcount_bits=8", "-o compat=0.10"),
    ("extended_l2=on", "-o compat=0.10"),
    ("compression_type=zstd", "-o compat=0.10"),
    ("", "-o refcount_bits=3"),
    ("", "-o cluster_size=4k"),
    ("", "-o foo=1"),
    ("", "-o lazy_refcounts=maybe"),
    ("", "-o compat=0.9"),
    ("", "-o backing_file=foo"),
    ("", "-o compat=0.10,lazy_refcounts=on"),
    ("", "-o data_file=foo"),
    ("", "-o size=96M"),
    ("", "-f raw -o size=1M"),
    ("", "-o help"),
    ("", "-q -o refcount_bits=32,lazy_refcounts=on"),
    ("", "-o encrypt.keyslot=1"),
]


@pytest.mark.parametrize("create,args", AMEND)
def test_amend_qcow2(tmp_path, create, args):
    d = tmp_path
    opts = ["-o", create] if create else []
    qemu_img("create", "-q", "-f", "qcow2", *opts, str(d / "a.qcow2"), "64M")
    qemu_io_ok("qcow2", d / "a.qcow2", "write -P 1 0 1M", "write -z 2M 128k",
               "write -P 2 40M 64k", "write -z -u 40M 64k", "write -c -P 3 50M 64k")
    q, b = twins(d, "a.qcow2")
    both(d, ["amend", *args.split(), "X"], "a.qcow2")
    assert info(b) == info(q)
    assert qemu_img("compare", str(q), str(b)).returncode == 0
    if "zstd" not in create:  # qemu-img leaves the compressed zstd image as it was
        assert_clean(b)


def test_amend_downgrade_zero_clusters(tmp_path):
    """v2 has no zero flag: zero clusters over a backing file become real zero data."""
    d = tmp_path
    qemu_img("create", "-q", "-f", "raw", str(d / "base.raw"), "1M")
    qemu_io_ok("raw", d / "base.raw", "write -P 7 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(d / "o.qcow2"))
    qemu_io_ok("qcow2", d / "o.qcow2", "write -z 0 64k", "write -P 3 64k 64k",
               "write -z -u 64k 64k", "write -P 5 512k 64k", "write -z 512k 64k")
    q, b = twins(d, "o.qcow2")
    both(d, ["amend", "-o", "compat=0.10", "X"], "o.qcow2")
    assert info(b) == info(q)
    strip = [{k: v for k, v in e.items() if k != "offset"} for e in map_json(q)]
    assert [{k: v for k, v in e.items() if k != "offset"} for e in map_json(b)] == strip
    assert qemu_img("compare", str(q), str(b)).returncode == 0
    assert_clean(b)


def test_amend_refcount_overflow(tmp_path):
    d = tmp_path
    qemu_img("create", "-q", "-f", "qcow2", str(d / "s.qcow2"), "1M")
    qemu_io_ok("qcow2", d / "s.qcow2", "write 0 64k")
    qemu_img("snapshot", "-c", "s", str(d / "s.qcow2"))
    twins(d, "s.qcow2")
    both(d, ["amend", "-o", "refcount_bits=1", "X"], "s.qcow2")
    both(d, ["amend", "-o", "refcount_bits=2", "X"], "s.qcow2")
    assert info(d / "b-s.qcow2") == info(d / "q-s.qcow2")
    assert_clean(d / "b-s.qcow2")


@pytest.mark.parametrize("args", [[], ["-o", "compat=1.1"], ["-o", "compat=1.1", "a", "b"],
                                  ["-f", "qcow2", "-o", "help"], ["-f", "luks", "-o", "help"],
                                  ["-f", "raw", "-o", "help", "x"],
                                  ["-o", "compat=1.1", "nonexist.qcow2"]])
def test_amend_usage(tmp_path, args):
    q = qemu_img("amend", *args, cwd=tmp_path)
    assert blockd_img("amend", *args, cwd=tmp_path) == (
        q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)


LUKS_OPEN = "driver=luks,key-secret={},file.filename={}"
KEYSLOT_STEPS = [
    ("s0", "state=active,new-secret=s1,iter-time=10"),
    ("s0", "state=active,new-secret=s1,keyslot=0,iter-time=10"),
    ("s1", "state=active,new-secret=s2,keyslot=5,iter-time=10"),
    ("s0", "keyslot=1"),
    ("s0", "state=foo"),
    ("s0", "state=inactive"),
    ("s0", "state=inactive,keyslot=0,iter-time=5"),
    ("s0", "state=inactive,old-secret=s1"),
    ("s2", "state=inactive,keyslot=3"),
    ("s2", "state=inactive,keyslot=0"),
]


def test_amend_luks_keyslots(tmp_path):
    """Key slots of a raw LUKS image, step by step on both tools' copies."""
    d = tmp_path
    secrets = ["--object", "secret,id=s0,data=abc", "--object", "secret,id=s1,data=xyz",
               "--object", "secret,id=s2,data=pqr"]
    assert blockd_img("create", "-q", "-f", "luks", *secrets, "-o", "key-secret=s0,iter-time=10",
                      "l.luks", "1M", cwd=d)[2] == 0
    q, b = twins(d, "l.luks")
    for key, opts in KEYSLOT_STEPS:
        both(d, ["amend", *secrets, "--image-opts", "-o", opts,
                 LUKS_OPEN.format(key, "X")], "l.luks")
    for key in ("s0", "s1", "s2"):
        views = [qemu_img("info", *secrets, "--image-opts", LUKS_OPEN.format(key, p))
                 for p in (q, b)]
        assert views[0].returncode == views[1].returncode, key
    states = [[s["active"] for s in info(p)["format-specific"]["data"]["slots"]]
              for p in (q, b)]
    assert states[0] == states[1]
    both(d, ["amend", *secrets, "--image-opts", "--force", "-o", "state=inactive,keyslot=5",
             LUKS_OPEN.format("s2", "X")], "l.luks")


# ---- rebase ------------------------------------------------------------------------

@pytest.fixture
def chain(tmp_path: Path) -> Path:
    d = tmp_path
    qemu_img("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "4M")
    qemu_io_ok("qcow2", d / "base.qcow2", "write -P 1 0 4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             str(d / "mid.qcow2"))
    qemu_io_ok("qcow2", d / "mid.qcow2", "write -P 2 1M 1M", "write -z 2M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             str(d / "top.qcow2"))
    qemu_io_ok("qcow2", d / "top.qcow2", "write -P 3 3M 64k")
    qemu_img("create", "-q", "-f", "qcow2", str(d / "nb.qcow2"), "2M")
    qemu_io_ok("qcow2", d / "nb.qcow2", "write -P 1 0 512k")
    qemu_img("create", "-q", "-f", "raw", str(d / "nb.raw"), "8M")
    qemu_io_ok("raw", d / "nb.raw", "write -P 2 1M 1M")
    return d


REBASE = ["-b nb.qcow2 -F qcow2", "-b nb.raw -F raw", "-b base.qcow2 -F qcow2", "-b ''",
          "-b nb.qcow2", "-u -b nb.qcow2 -F qcow2", "-u -b nope.qcow2 -F qcow2", "-u -b ''",
          "-u -b nb.qcow2", "-b nope.qcow2 -F qcow2", "-b nb.qcow2 -F foo", "", "-p -q -b ''"]


@pytest.mark.parametrize("args", REBASE)
def test_rebase(chain, args):
    d = chain
    q, b = twins(d, "top.qcow2")
    argv = [a.strip("'") for a in args.split()]
    both(d, ["rebase", *argv, "X"], "top.qcow2")
    assert info(b) == info(q)
    if "-u" not in argv:
        # Safe mode keeps the guest view; the layout matches qemu-img's run for run.
        assert qemu_img("compare", str(q), str(b)).returncode == 0
        strip = [{k: v for k, v in e.items() if k != "offset"} for e in map_json(q)]
        assert [{k: v for k, v in e.items() if k != "offset"} for e in map_json(b)] == strip
    if "nope.qcow2" not in argv:
        assert_clean(b)


def test_rebase_usage(chain):
    for args in (["-b", "x"], ["-b", "x", "a", "b"]):
        q = qemu_img("rebase", *args, cwd=chain)
        assert blockd_img("rebase", *args, cwd=chain) == (
            q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)


# ---- map --picture -----------------------------------------------------------------

def _png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB rows (filter bytes dropped) of an unfiltered PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        n, tag = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8:pos + 8 + n]
        assert zlib.crc32(tag + body) == struct.unpack_from(">I", data, pos + 8 + n)[0]
        if tag == b"IHDR":
            size = struct.unpack_from(">II", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    w, h = size
    return w, h, b"".join(raw[r * (w * 3 + 1) + 1:(r + 1) * (w * 3 + 1)] for r in range(h))


def test_map_picture(tmp_path):
    """The cells' kinds agree with the metadata as qemu-img reports it."""
    from blockd.img import picture

    d = tmp_path
    img = d / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "64M")
    qemu_io_ok("qcow2", img, "write 0 3M", "write -c 8M 1M", "write 20M 2M", "discard 1M 1M")
    qemu_img("snapshot", "-c", "s1", str(img))
    qemu_io_ok("qcow2", img, "write 0 512k")
    qemu_img("bitmap", "--add", str(img), "b0")
    # A leak: raise one free cluster's refcount behind qemu's back.
    assert blockd_img("map", "--picture=p.svg", "p.qcow2", cwd=d) == ("", "", 0)
    assert blockd_img("map", "--picture=p.png", "p.qcow2", cwd=d) == ("", "", 0)
    svg = (d / "p.svg").read_text()
    counts: dict[str, int] = {}
    for kind, n in re.findall(r'data-kind="([^"]+)" data-count="(\d+)"', svg):
        counts[kind] = counts.get(kind, 0) + int(n)
    cs = 65536
    assert sum(counts.values()) == -(-img.stat().st_size // cs)
    assert counts["header"] == 1 and counts["refcount table"] == 1
    assert counts["refcount block"] == 1 and counts["snapshot table"] == 1
    assert counts["L1 table"] == 2 and counts["L2 table"] == 2  # active and snapshot's
    assert counts["bitmap"] >= 2 and counts["compressed"] >= 1
    active = sum(e["length"] for e in map_json(img) if e["data"] and "offset" in e) // cs
    # Data clusters: the active ones plus the snapshot's 512k the overlay write replaced.
    assert counts["data"] == active + 8
    assert "leaked" not in counts
    w, h, rgb = _png_pixels((d / "p.png").read_bytes())
    cols, cell, gap = picture.grid(sum(counts.values()))
    # Cell 0 is the header; check its colour at its centre.
    x = y = gap + cell // 2
    assert rgb[y * w * 3 + x * 3:y * w * 3 + x * 3 + 3] == bytes(picture.COLOURS["header"])
    assert w >= cols * (cell + gap)


def test_map_picture_leaks(tmp_path):
    d = tmp_path
    qemu_img("create", "-q", "-f", "qcow2", str(d / "l.qcow2"), "16M")
    qemu_io_ok("qcow2", d / "l.qcow2", "write 0 1M")
    # Raise the refcounts of two clusters past the end of the data: leaks.
    raw = bytearray((d / "l.qcow2").read_bytes())
    rb = struct.unpack_from(">Q", raw, struct.unpack_from(">Q", raw, 48)[0])[0]
    size = len(raw) // 65536
    struct.pack_into(">HH", raw, rb + size * 2, 1, 1)
    raw += bytes(2 * 65536)
    (d / "l.qcow2").write_bytes(raw)
    leaks = json.loads(qemu_img("check", "--output=json", str(d / "l.qcow2")).stdout)["leaks"]
    assert blockd_img("map", "--picture=l.svg", "l.qcow2", cwd=d)[2] == 0
    assert (d / "l.svg").read_text().count('data-kind="leaked"') >= 1
    assert f"leaked ({leaks})" in (d / "l.svg").read_text()


def test_map_picture_errors(tmp_path):
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "r.raw"), "1M")
    assert blockd_img("map", "--picture=x.gif", "r.raw", cwd=tmp_path)[1:] == (
        "blockd-img: --picture needs a file name ending in .png or .svg\n", 1)
    assert blockd_img("map", "--picture=x.png", "r.raw", cwd=tmp_path)[1:] == (
        "blockd-img: --picture is not supported for format 'raw'\n", 1)


# ---- progress on a terminal ----------------------------------------------------------

def _on_tty(cmd: list[str], cwd: Path) -> str:
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, stdout=slave, stderr=subprocess.PIPE, cwd=cwd, env=env)
    os.close(slave)
    shown = b""
    while True:
        try:
            piece = os.read(master, 65536)
        except OSError:
            break
        if not piece:
            break
        shown += piece
    os.close(master)
    assert proc.returncode == 0, proc.stderr
    return shown.decode()


@pytest.mark.parametrize("argv", [["rebase", "-p", "-b", "", "X"],
                                  ["commit", "-p", "X"],
                                  ["convert", "-p", "-O", "qcow2", "X", "X.out"]])
def test_progress_like_qemu_on_a_terminal(chain, argv):
    """qemu-img's look on a pty: ``    (NN.NN/100%)`` redrawn in place, 100% twice."""
    d = chain
    shutil.copy(d / "top.qcow2", d / "q.qcow2")
    shutil.copy(d / "top.qcow2", d / "b.qcow2")
    shutil.copy(d / "mid.qcow2", d / "mid0.qcow2")
    q = _on_tty(["qemu-img", *[a.replace("X", "q.qcow2") for a in argv]], d)
    shutil.copy(d / "mid0.qcow2", d / "mid.qcow2")
    b = _on_tty([sys.executable, "-m", "blockd.img.cli",
                 *[a.replace("X", "b.qcow2") for a in argv]], d)
    pattern = r"(    \(\d+\.\d\d/100%\)\r)+\r\n(Image committed\.\r\n)?"
    assert re.fullmatch(pattern, q) and re.fullmatch(pattern, b), b
    # Where the redraws fall depends on each tool's request sizes (and for commit on
    # timing); the start, the end and a rising percentage are the same.
    values = [float(v) for v in re.findall(r"\((\d+\.\d\d)/100%\)", b)]
    assert values == sorted(values) and values[0] == 0.0 and values[-2:] == [100.0, 100.0]
    assert q.startswith("    (0.00/100%)\r") and b.endswith(q[q.rindex("    (100.00"):])
    if argv[0] == "rebase":  # the same accounting as qemu-img: equal to the character
        assert b == q
    piped = subprocess.run([sys.executable, "-m", "blockd.img.cli",
                            *[a.replace("X", "b.qcow2") for a in argv]],
                           capture_output=True, text=True, cwd=d,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    # Through a pipe as on the terminal, as qemu-img draws it (read as text: each CR a line).
    assert re.fullmatch(r"(    \(\d+\.\d\d/100%\)\n)+(Image committed\.\n)?", piped.stdout)


# ---- convert --bitmaps, -S ---------------------------------------------------------------

def _set_in_use(path: Path, index: int) -> None:
    """Mark one stored bitmap in use, as a crash would leave it (inconsistent)."""
    with open(path, "r+b") as f:
        head = f.read(65536)
        pos = struct.unpack_from(">I", head, 100)[0]
        while True:
            kind, length = struct.unpack_from(">II", head, pos)
            if kind == 0x23852875:
                off = struct.unpack_from(">Q", head, pos + 24)[0]
                f.seek(off)
                directory = f.read(65536)
                at = 0
                for _ in range(index):
                    name_len, extra = struct.unpack_from(">HI", directory, at + 18)
                    entry = 24 + extra + name_len
                    at += entry + (-entry % 8)
                flags = struct.unpack_from(">I", directory, at + 12)[0]
                f.seek(off + at + 12)
                f.write(struct.pack(">I", flags | 1))
                return
            pos += 8 + ((length + 7) & ~7)


@pytest.fixture
def bitmapped(tmp_path: Path) -> Path:
    d = tmp_path
    qemu_img("create", "-q", "-f", "qcow2", str(d / "bm.qcow2"), "4M")
    qemu_io_ok("qcow2", d / "bm.qcow2", "write 0 1M")
    qemu_img("bitmap", "--add", str(d / "bm.qcow2"), "b1")
    qemu_img("bitmap", "--add", "-g", "128k", str(d / "bm.qcow2"), "b2")
    qemu_img("bitmap", "--disable", str(d / "bm.qcow2"), "b2")
    qemu_io_ok("qcow2", d / "bm.qcow2", "write 2M 64k")
    qemu_img("create", "-q", "-f", "raw", str(d / "r.raw"), "1M")
    return d


@pytest.mark.parametrize("args", [
    "--bitmaps -O qcow2 bm.qcow2 OUT", "--bitmaps -O raw bm.qcow2 OUT",
    "--skip-broken-bitmaps -O qcow2 bm.qcow2 OUT", "--bitmaps -O qcow2 r.raw OUT",
    "--bitmaps -O qcow2 bm.qcow2 r.raw OUT", "--bitmaps -c -O qcow2 bm.qcow2 OUT",
    "--bitmaps -O qcow2 bad.qcow2 OUT", "--bitmaps --skip-broken-bitmaps -O qcow2 bad.qcow2 OUT"])
def test_convert_bitmaps(bitmapped, args):
    d = bitmapped
    shutil.copy(d / "bm.qcow2", d / "bad.qcow2")
    _set_in_use(d / "bad.qcow2", 1)
    q = qemu_img("convert", *args.replace("OUT", "q.out").split(), cwd=d)
    b = blockd_img("convert", *args.replace("OUT", "b.out").split(), cwd=d)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    if q.returncode == 0:
        assert info(d / "b.out") == info(d / "q.out")
        assert_clean(d / "b.out")
        assert _bitmap_hashes(d, "b.out") == _bitmap_hashes(d, "q.out")


def _bitmap_hashes(d: Path, name: str) -> dict[str, str]:
    """Each stored bitmap's SHA-256 as qemu-storage-daemon loads it (qemu reads the bits)."""
    from harness import Daemon

    out = {}
    with Daemon(str(d / f"{name}.sock"), "--blockdev",
                f"driver=qcow2,node-name=n,file.driver=file,file.filename={d / name}",
                qsd=True) as qsd:
        c = qsd.client()
        for bm in c.cmd("query-named-block-nodes")["return"][0].get("dirty-bitmaps", []):
            out[bm["name"]] = c.cmd("x-debug-block-dirty-bitmap-sha256", node="n",
                                    name=bm["name"])["return"]["sha256"]
    assert out
    return out


def test_convert_bitmaps_existing_target(bitmapped):
    d = bitmapped
    qemu_img("convert", "--bitmaps", "-O", "qcow2", "bm.qcow2", "t.qcow2", cwd=d)
    q = qemu_img("convert", "--bitmaps", "-n", "-O", "qcow2", "bm.qcow2", "t.qcow2", cwd=d)
    b = blockd_img("convert", "--bitmaps", "-n", "-O", "qcow2", "bm.qcow2", "t.qcow2", cwd=d)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)


@pytest.mark.parametrize("sparse", ["0", "4k", "64k", "1M"])
def test_convert_sparse_qcow2_target(tmp_path, sparse):
    """``-S``: which clusters the target allocates, run for run as qemu-img decides."""
    d = tmp_path
    qemu_img("create", "-q", "-f", "raw", str(d / "s.raw"), "8M")
    qemu_io_ok("raw", d / "s.raw", "write -P 1 0 4k", "write -P 2 1M 64k", "write -P 3 3M 1M",
               "write -P 0 3M 256k", "write -P 4 5M 512", "write -z 6M 1M")
    for tool, out in (("q", "q.qcow2"), ("b", "b.qcow2")):
        args = ["convert", "-S", sparse, "-O", "qcow2", "s.raw", out]
        if tool == "q":
            assert qemu_img(*args, cwd=d).returncode == 0
        else:
            assert blockd_img(*args, cwd=d)[2] == 0
    strip = [{k: v for k, v in e.items() if k != "offset"} for e in map_json(d / "q.qcow2")]
    assert [{k: v for k, v in e.items() if k != "offset"}
            for e in map_json(d / "b.qcow2")] == strip
    assert qemu_img("compare", "q.qcow2", "b.qcow2", cwd=d).returncode == 0


def test_info_many_bitmaps(tmp_path):
    """``info`` of an image with 64 bitmaps (lists of flags: scalars in lists) prints what
    qemu-img prints; the human dump once recursed into each flag's characters."""

    img = tmp_path / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "64M")
    for i in range(64):
        args = ["bitmap", "--add", str(img), f"b{i}"] + (["--disable"] if i % 3 else [])
        assert qemu_img(*args).returncode == 0
    same(tmp_path, "info", "bm.qcow2")
    same(tmp_path, "info", "--output=json", "bm.qcow2")


def test_human_dump_deep_nesting():
    """Nesting deeper than Python's recursion limit still prints, in QEMU's layout."""
    from blockd.img.common import human_dump

    top = node = {}
    for _ in range(3000):
        node["a-b"] = [{}]
        node = node["a-b"][0]
    lines = human_dump(top, 1)
    assert len(lines) == 6000 and lines[:2] == ["    a b:", "        [0]:"]
    assert human_dump({"x": [1, [True, "s"]], "y": {}}, 0) == [
        "x:", "    [0]: 1", "    [1]:", "        [0]: true", "        [1]: s", "y:"]


# Sizes no image can have: every tool refuses them at once, with qemu-img's words, and
# allocates nothing for them first (1E once built a 2^31-entry L1 table in memory).
L1_LIMIT = {512: 1 << 35, 4096: 1 << 41, 65536: 1 << 51, 2 << 20: 1 << 61}
HUGE = [
    "create -f qcow2 X 1E", "create -f qcow2 X 9223372036854775296",
    "create -f qcow2 X 9223372035781033984", "create -f qcow2 X 9223372035781034496",
    "create -f qcow2 X 8E", "create -f qcow2 -o size=1E X",
    "create -f qcow2 -o preallocation=metadata X 1E",
    "create -f qcow2 -o extended_l2=on X 1125899906843136",
    "measure --size 8E -O qcow2", "measure --size 1E -O qcow2",
    "measure --size 2251799813685760 -O qcow2",
    "resize Y 1E", "resize Y +1E", "resize Y 9223372036854775296", "resize Y 8E",
    "resize Y 17E", "resize -f raw R 9223372036854775296",
    "amend -o size=1E Y", "amend -o size=9223372036854775296 Y",
    "convert --image-opts driver=null-co,size=1152921504606846976 -O qcow2 X",
    "info --image-opts driver=null-co,size=9223372036854775296",
] + [f"create -f qcow2 -o cluster_size={cs} X {size + add}"
     for cs, size in L1_LIMIT.items() for add in (0, 512)]


@pytest.mark.parametrize("line", HUGE)
def test_huge_sizes(tmp_path, line):
    for name in ("q", "b"):
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / f"{name}-y.qcow2"), "1M")
        qemu_img("create", "-q", "-f", "raw", str(tmp_path / f"{name}-r.raw"), "1M")
    names = {"X": "x.qcow2", "Y": "y.qcow2", "R": "r.raw"}
    for name in ("q", "b"):
        args = [f"{name}-{names[a]}" if a in names else a for a in line.split()]
        if name == "q":
            q = qemu_img(*args, cwd=tmp_path)
        else:
            b = blockd_img(*args, cwd=tmp_path)
    assert b == (q.stdout.replace("q-", "b-"),
                 q.stderr.replace("qemu-img", "blockd-img").replace("q-", "b-"), q.returncode)
    for suffix in ("x.qcow2", "y.qcow2"):  # same files left behind, same sizes recorded
        qf, bf = tmp_path / f"q-{suffix}", tmp_path / f"b-{suffix}"
        assert qf.exists() == bf.exists()
        if qf.exists():
            assert info(qf)["virtual-size"] == info(bf)["virtual-size"]


def _name_features(img: Path, bits: list[int], table: list[tuple[int, int, str]]) -> None:
    """Replace the image's feature name table with ``table`` and set incompatible ``bits``."""
    data = bytearray(img.read_bytes()[:65536])
    pos = struct.unpack_from(">I", data, 100)[0]
    while True:
        kind, length = struct.unpack_from(">II", data, pos)
        assert kind, "no feature name table"
        if kind == 0x6803F857:
            body = b"".join(bytes([t, b]) + n.encode().ljust(46, b"\0") for t, b, n in table)
            rest = data[pos + 8 + (length + 7 & ~7):]
            data[pos:] = struct.pack(">II", kind, len(body)) + body + rest
            break
        pos += 8 + (length + 7 & ~7)
    features = struct.unpack_from(">Q", data, 72)[0]
    struct.pack_into(">Q", data, 72, features | sum(1 << b for b in bits))
    with open(img, "r+b") as f:
        f.write(bytes(data[:65536]))


@pytest.mark.parametrize("args", ["info", "check", "check -r all", "info --output=json"])
def test_unsupported_features_named_from_the_table(tmp_path, args):
    """Unknown incompatible bits are named as the image's own feature table names them,
    in the table's order, the unnamed rest as a hex mask."""

    img = tmp_path / "f.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    _name_features(img, [10, 12, 40], [(0, 12, "twelve"), (1, 10, "compat ten"),
                                       (0, 10, "ten"), (0, 11, "unset")])
    assert "twelve, ten, Unknown incompatible feature: 10000000000" in \
        same(tmp_path, *args.split(), "f.qcow2")[1]


@pytest.mark.parametrize("opt", ["refcount-cache-size=1152921504606846976",
                                 "cache-size=9223372036854775807",
                                 "l2-cache-size=1152921504606846976,l2-cache-entry-size=512"])
def test_huge_cache_sizes(tmp_path, opt):
    """Cache sizes past what QEMU counts are refused at open, with its message."""

    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "c.qcow2"), "1M")
    same(tmp_path, "info", "--image-opts", f"driver=qcow2,file.filename=c.qcow2,{opt}")
