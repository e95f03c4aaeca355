"""The qcow (version 1) driver against qemu-img and qemu-io, both ways.

Images qemu-img makes (plain, with a backing file, compressed, AES
encrypted) read as qemu-img reads them; the same writes by QEMU and
through blockd leave identical files; ``create`` and ``blockdev-create``
make qemu-img's and qemu-storage-daemon's files with their messages;
hostile headers fail as qemu-img does or with a clear message.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import Daemon, blockd_img, qemu_img, qemu_io_ok, same
from test_qed import FUZZ_CASES, fuzz_image
from test_vpc import WRITES, check_nbd_read, check_same_writes, check_views

MiB = 1 << 20
SECRET = ["--object", "secret,id=s0,data=hunter2"]


def _qemu_image(d: Path, size: str = "11M", name: str = "a.qcow", *opts: str) -> Path:
    r = qemu_img("create", "-q", "-f", "qcow", *opts, name, size, cwd=d)
    assert r.returncode == 0, r.stderr
    return d / name


def test_qemu_images_read_alike(tmp_path):
    image = _qemu_image(tmp_path)
    qemu_io_ok("qcow", str(image), *WRITES)
    check_views(tmp_path, "qcow", "a.qcow")
    same(tmp_path, "check", "-f", "qcow", "a.qcow")
    check_nbd_read(tmp_path, "qcow", image)


def test_compressed_clusters(tmp_path):
    # (qemu-img 7.2's convert -c -O qcow fails without a message; qemu-io compresses.)
    image = _qemu_image(tmp_path, "3M", "c.qcow")
    qemu_io_ok("qcow", str(image), "write -c -P 0x21 0 4k", "write -c -P 0x22 4k 4k",
            "write -c -P 0x24 2M 4k", "write -P 0x23 1M 4k")
    check_views(tmp_path, "qcow", "c.qcow")
    check_nbd_read(tmp_path, "qcow", tmp_path / "c.qcow")
    # Partial writes into compressed clusters store them decompressed first.
    check_same_writes(tmp_path, "qcow", tmp_path / "c.qcow",
                      ["write -P 0x31 1k 1k", "write -P 0x32 4k 4k", "write -P 0x33 2M 100"])


def test_writes_match_qemu(tmp_path):
    image = _qemu_image(tmp_path, "300M")
    qemu_io_ok("qcow", str(image), "write -P 0x99 2M 8k")
    check_same_writes(tmp_path, "qcow", image, WRITES + [
        "write -P 0x66 2M 512", "write -P 0x77 10M 3M", "write -P 0x78 200M 4k",
        "write -P 0x79 127M 5", "write -z 250M 1M"])


def test_backing_file(tmp_path):
    base = tmp_path / "base.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(base), "8M").returncode == 0
    qemu_io_ok("raw", str(base), "write -P 0xb1 0 8M")
    top = _qemu_image(tmp_path, "11M", "top.qcow", "-b", "base.raw", "-F", "raw")
    qemu_io_ok("qcow", str(top), "write -P 0xc1 1M 3k")
    check_views(tmp_path, "qcow", "top.qcow")
    check_same_writes(tmp_path, "qcow", top, ["write -P 0x12 100k 1k", "write -P 0x13 3M 7",
                                               "write -P 0x14 7M 2M"])
    check_views(tmp_path, "qcow", "ours.qcow")


def _opts(image: Path) -> str:
    return f"driver=qcow,file.filename={image},encrypt.key-secret=s0"


def test_encrypted(tmp_path):
    """Legacy AES: qemu-img's image read by blockd and blockd's writes read by QEMU; the
    same file for the same writes; without the key, qemu-img's messages."""
    image = _qemu_image(tmp_path, "4M", "e.qcow", *SECRET, "-o",
                        "encrypt.format=aes,encrypt.key-secret=s0")
    r = qemu_img("convert", *SECRET, "--image-opts", _opts(image), "-O", "raw", "q.raw",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert blockd_img("convert", *SECRET, "--image-opts", _opts(image), "-O", "raw", "b.raw",
                      cwd=tmp_path)[2] == 0
    assert (tmp_path / "q.raw").read_bytes() == (tmp_path / "b.raw").read_bytes()
    for cmd in (["info"], ["info", "--output=json"], ["map", "--output=json"],
                ["convert", "-O", "raw", "x.raw"]):
        same(tmp_path, *cmd, "-f", "qcow", "e.qcow")
    same(tmp_path, "map", "--output=json", *SECRET, "--image-opts", _opts(image))
    theirs = tmp_path / "t.qcow"
    theirs.write_bytes(image.read_bytes())
    ours = tmp_path / "o.qcow"
    ours.write_bytes(image.read_bytes())
    writes = ["write -P 0x41 0 4k", "write -P 0x42 1M 1k", "write -P 0x43 2M 7"]
    for target, tool in ((theirs, "qemu-io"), (ours, "blockd")):
        if tool == "qemu-io":
            args = ["qemu-io", *SECRET, "--image-opts"]
            for w in writes:
                args += ["-c", w]
            import subprocess
            assert subprocess.run(args + [_opts(target)], capture_output=True).returncode == 0
        else:
            nbd = str(tmp_path / "nbd.sock")
            with Daemon(str(tmp_path / "qmp.sock"), "--object", "secret,id=s0,data=hunter2",
                        "--blockdev", f"driver=file,node-name=f0,filename={target}",
                        "--blockdev", "driver=qcow,node-name=img,file=f0,"
                                      "encrypt.format=aes,encrypt.key-secret=s0",
                        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                        "--export", "type=nbd,id=e0,node-name=img,writable=on"):
                qemu_io_ok("raw", f"nbd+unix:///img?socket={nbd}", *writes)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("opts,size", [
    ("", "10M"), ("", "1000"), ("", "0"), ("", "1T"), ("help", "1M"),
    ("backing_file=base.raw,backing_fmt=raw", "5M"),
    ("encryption=on,encrypt.key-secret=s0", "1M"), ("encrypt.format=aes,encrypt.key-secret=s0",
                                                    "1M"),
    ("encryption=on", "1M"), ("encrypt.format=luks,encrypt.key-secret=s0", "1M"),
    ("encrypt.format=bogus", "1M"), ("encrypt.format=aes,encrypt.key-secret=nosuch", "1M"),
    ("encryption=on,encrypt.format=aes", "1M"), ("encrypt.key-secret=s0", "1M"),
    ("encryption=off,encrypt.key-secret=s0", "1M"), ("encryption=off", "1M"),
    ("preallocation=full", "1M"), ("preallocation=metadata", "1M"),
])
def test_create_like_qemu(tmp_path, opts, size):
    assert qemu_img("create", "-q", "-f", "raw", str(tmp_path / "base.raw"),
                    "5M").returncode == 0
    argv = ["create", *SECRET, "-f", "qcow"] + (["-o", opts] if opts else []) + ["x.qcow", size]
    q = qemu_img(*argv, cwd=tmp_path)
    path = tmp_path / "x.qcow"
    theirs = path.read_bytes() if q.returncode == 0 and path.exists() else None
    path.unlink(missing_ok=True)
    b = blockd_img(*argv, cwd=tmp_path)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    if theirs is not None:
        assert path.read_bytes() == theirs
        same(tmp_path, "info", "--output=json", "x.qcow")


def test_convert_into_qcow(tmp_path):
    src = tmp_path / "src.raw"
    assert qemu_img("create", "-q", "-f", "raw", str(src), "11M").returncode == 0
    qemu_io_ok("raw", str(src), *WRITES)
    assert blockd_img("convert", "-O", "qcow", "src.raw", "o.qcow", cwd=tmp_path)[2] == 0
    r = qemu_img("compare", "-f", "raw", "-F", "qcow", "src.raw", "o.qcow", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert qemu_img("convert", "-O", "qcow", "src.raw", "q.qcow", cwd=tmp_path).returncode == 0
    assert (tmp_path / "o.qcow").read_bytes() == (tmp_path / "q.qcow").read_bytes()


def test_blockdev_create_like_qsd(tmp_path):
    results = []
    for qsd in (False, True):
        d = tmp_path / ("qsd" if qsd else "blockd")
        d.mkdir()
        with Daemon(str(d / "qmp.sock"), "--object", "secret,id=s0,data=pw", qsd=qsd) as daemon:
            c = daemon.client()
            replies = []
            for i, extra in enumerate([{}, {"backing-file": "base.raw"},
                                       {"encrypt": {"format": "qcow", "key-secret": "s0"}},
                                       {"encrypt": {"format": "qcow"}},
                                       {"encrypt": {"format": "qcow", "key-secret": "no"}},
                                       {"encrypt": {"format": "luks", "key-secret": "s0"}},
                                       {"size": 0}]):
                path = d / f"c{i}.qcow"
                c.create_job(f"f{i}", {"driver": "file", "filename": str(path), "size": 0})
                opts = {"driver": "qcow", "file": {"driver": "file", "filename": str(path)},
                        "size": 5 * MiB, **extra}
                replies.append(c.create_job(f"q{i}", opts))
            replies.append(c.cmd("blockdev-add", driver="qcow", **{"node-name": "n2"},
                                 file={"driver": "file", "filename": str(d / "c2.qcow")},
                                 encrypt={"format": "aes", "key-secret": "s0"}))
            replies.append(c.cmd("blockdev-add", driver="qcow", **{"node-name": "n3"},
                                 file={"driver": "file", "filename": str(d / "c2.qcow")}))
            replies.append(c.cmd("blockdev-add", driver="qcow", **{"node-name": "n4"},
                                 file={"driver": "file", "filename": str(d / "c0.qcow")},
                                 encrypt={"format": "aes", "key-secret": "s0"}))
        files = sorted(p.name for p in d.glob("c*.qcow"))
        results.append((replies, [(n, (d / n).read_bytes()) for n in files]))
    assert results[0] == results[1]


HOSTILE = {
    "magic": (0, ">I", 0x12345678),
    "version 2": (4, ">I", 2),
    "version 9": (4, ">I", 9),
    "size one": (24, ">Q", 1),
    "size huge": (24, ">Q", (1 << 64) - 10),
    "size big": (24, ">Q", 1 << 62),
    "size odd": (24, ">Q", MiB + 1),
    "cluster bits": (32, ">B", 17),
    "cluster bits small": (32, ">B", 8),
    "l2 bits": (33, ">B", 14),
    "l2 bits small": (33, ">B", 5),
    "crypt method": (36, ">I", 2),
    "backing name long": (16, ">I", 1024),
    "l1 past eof": (40, ">Q", 1 << 40),
    "l1 entry past eof": (48, ">Q", 1 << 40),
    "l1 entry unaligned": (48, ">Q", 4097),
    "l2 entry unaligned": (4096, ">Q", 8193),
    "l2 entry past eof": (4096, ">Q", 1 << 40),
    "l2 entry compressed junk": (4096, ">Q", (1 << 63) | (100 << 51) | 8192),
    "l2 entry huge": (4096, ">Q", (1 << 62)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers(tmp_path, case):
    """qemu-img's message and exit status for the same damage, never a traceback."""
    image = _qemu_image(tmp_path, "1M", "h.qcow")
    qemu_io_ok("qcow", str(image), "write -P 1 0 8k")
    data = bytearray(image.read_bytes())
    off, fmt, value = HOSTILE[case]
    if case == "backing name long":
        struct.pack_into(">Q", data, 8, 48)
    if case == "l1 past eof":  # an L1 table of 16 MiB, almost all of it past the end
        struct.pack_into(">Q", data, 24, 1 << 42)
    struct.pack_into(fmt, data, off, value)
    image.write_bytes(bytes(data))
    # An unaligned data cluster: qemu-img maps it at its offset but cannot read it;
    # blockd maps it without one, so copies read it through the driver and fail alike.
    maps = [] if case == "l2 entry unaligned" else [["map", "--output=json"], ["map"]]
    for cmd in (["info"], *maps):
        q = qemu_img(*cmd, "-f", "qcow", "h.qcow", cwd=tmp_path)
        b = blockd_img(*cmd, "-f", "qcow", "h.qcow", cwd=tmp_path)
        assert "Traceback" not in b[1]
        if case == "l1 past eof":  # QEMU reads zeroes there; blockd refuses
            assert b[2] == 1 and "extends past the end of the file" in b[1], b
            return
        assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    outs = []
    for tool in ("qemu-img", "blockd-img"):
        out = tmp_path / f"{tool}.raw"
        run = qemu_img if tool == "qemu-img" else blockd_img
        r = run("convert", "-f", "qcow", "-O", "raw", "h.qcow", str(out), cwd=tmp_path)
        code = r.returncode if tool == "qemu-img" else r[2]
        outs.append((code, out.read_bytes() if code == 0 else b""))
    assert outs[0] == outs[1]


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("qcowfuzz")
    image = _qemu_image(d, "8M", "f.qcow")
    qemu_io_ok("qcow", str(image), "write -P 1 0 12k", "write -c -P 2 3M 4k", "write -P 3 5M 8k")
    return image.read_bytes()


@settings(max_examples=FUZZ_CASES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False))
def test_fuzz(tmp_path, fuzz_base, rng):
    """Header fields and table entries of a qcow image with plain and compressed
    clusters, mutated: a clear error or a working image, in bounded memory."""
    l1 = struct.unpack_from(">Q", fuzz_base, 40)[0]
    l2 = struct.unpack_from(">Q", fuzz_base, l1)[0]
    fuzz_image(tmp_path / "f.qcow", fuzz_base, "qcow", rng,
               [(4, ">I"), (8, ">Q"), (16, ">I"), (24, ">Q"), (32, ">B"), (33, ">B"),
                (36, ">I"), (40, ">Q")], [l1, l2, l2 + 8 * 760])


def test_compare_qcow_with_qed(tmp_path):
    """compare across qcow and qed, same and differing content, as qemu-img reports it."""
    a = _qemu_image(tmp_path, "11M", "a.qcow")
    qemu_io_ok("qcow", str(a), *WRITES)
    assert qemu_img("create", "-q", "-f", "qed", "b.qed", "11M", cwd=tmp_path).returncode == 0
    qemu_io_ok("qed", str(tmp_path / "b.qed"), *WRITES)
    same(tmp_path, "compare", "-f", "qcow", "-F", "qed", "a.qcow", "b.qed")
    qemu_io_ok("qed", str(tmp_path / "b.qed"), "write -P 0x12 6M 512")
    for flags in ([], ["-s"]):
        same(tmp_path, "compare", *flags, "-f", "qcow", "-F", "qed", "a.qcow", "b.qed")


def test_hostile_headers_over_qmp(tmp_path):
    """blockdev-add of each damaged image: the same reply as qemu-storage-daemon's (but
    for an L1 table mostly past the end of the file, which blockd refuses)."""
    answers = []
    for qsd in (False, True):
        with Daemon(str(tmp_path / "qmp.sock"), qsd=qsd) as daemon:
            c = daemon.client()
            got = []
            for i, case in enumerate(sorted(set(HOSTILE) - {"l1 past eof"})):
                d = tmp_path / f"{case.replace(' ', '_')}-{qsd}"
                d.mkdir()
                image = _qemu_image(d, "1M", "h.qcow")
                qemu_io_ok("qcow", str(image), "write -P 1 0 8k")
                data = bytearray(image.read_bytes())
                off, fmt, value = HOSTILE[case]
                if case == "backing name long":
                    struct.pack_into(">Q", data, 8, 48)
                struct.pack_into(fmt, data, off, value)
                image.write_bytes(bytes(data))
                reply = c.cmd("blockdev-add", driver="qcow", **{"node-name": f"n{i}"},
                              file={"driver": "file", "filename": str(image)})
                got.append((case, reply))
                if "return" in reply:
                    c.cmd("blockdev-del", **{"node-name": f"n{i}"})
        answers.append(got)
    assert answers[0] == answers[1]
