"""blockd-img against qemu-img: same stdout, stderr, exit codes and resulting files.

Most runs call blockd-img's ``main`` in this process (fast); a few go
through ``python3 -m blockd.img.cli`` to cover the entry point and the
terminal-only progress output.
"""

from __future__ import annotations

import json
import os
import pty
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from blockd.drivers import driver_names
from harness import blockd_img, map_json, qemu_img, qemu_io_ok, same

HAVE_QCOW2 = (Path(__file__).parent.parent / "blockd/drivers/qcow2/driver.py").exists()
needs_qcow2 = pytest.mark.skipif(not HAVE_QCOW2, reason="qcow2 driver not written yet")
SECRET = ["--object", "secret,id=s0,data=abc"]


RAW_VIEWS = [["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"],
             ["map", "--output=json", "--start-offset=4k", "--max-length=1M"], ["check"],
             ["check", "--output=json"], ["info", "-f", "raw"]]


@pytest.mark.parametrize("cmd", RAW_VIEWS)
def test_raw_views(d, cmd):
    for img in ("r.raw", "r2.raw"):
        same(d, *cmd, img)


@needs_qcow2
@pytest.mark.parametrize("cmd", RAW_VIEWS + [
    ["info", "--backing-chain"], ["info", "--output=json", "--backing-chain"], ["check", "-q"],
    ["info", "-U"], ["check", "-f", "raw"]])
def test_qcow2_views(d, cmd):
    for img in ("base.qcow2", "top.qcow2", str(d / "top.qcow2")):
        same(d, *cmd, img)


@needs_qcow2
def test_image_opts(d):
    same(d, "info", "--image-opts", "driver=qcow2,file.filename=top.qcow2")
    same(d, "map", "--output=json", "--image-opts", "file.filename=top.qcow2")
    same(d, "info", "--backing-chain", "--image-opts", "file.filename=top.qcow2")


def test_help_lists_the_drivers_as_qemu_img_does(tmp_path):
    """Every driver blockd has, protocols too, in the order and words qemu-img's list has."""
    theirs = qemu_img("--help").stdout.splitlines()
    ours = blockd_img("--help", cwd=tmp_path)[0].splitlines()
    prefix = "Supported formats: "
    theirs = next(line for line in theirs if line.startswith(prefix))[len(prefix):].split()
    ours = next(line for line in ours if line.startswith(prefix))[len(prefix):].split()
    assert ours == [name for name in theirs if name in driver_names()]
    assert set(ours) == set(driver_names())


USAGE_ERRORS = [
    [], ["bogus"], ["create", "-z"], ["create"], ["info"], ["info", "a", "b"], ["info", "-f"],
    ["info", "--bogus", "r.raw"], ["info", "--output=xml", "r.raw"], ["info", "nonexist"],
    ["map"], ["compare", "r.raw"], ["convert", "r.raw"], ["resize", "r.raw"], ["check"],
    ["check", "-r", "bogus", "r.raw"], ["map", "--start-offset=x", "r.raw"], ["measure"],
    ["measure", "--size", "1G", "r.raw"], ["measure", "--size", "1Q"],
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=lambda a: " ".join(a) or "none")
def test_usage_errors(d, args):
    assert same(d, *args)[2] == 1


CREATE = [
    "-f foo x 1M", "-f raw x", "-f raw x 1Q", "-f raw x -- -1", "-f qcow2 -o bogus=1 x 1M",
    "-f qcow2 -o cluster_size=3 x 1M", "-f raw -o help", "-f qcow2 -o help", "-f luks -o help",
    "-f qcow2 -o help x", "-f raw -o help x", "-f qcow2 -o lazy_refcounts=maybe x 1M",
    "-f qcow2 -o cluster_size=abc x 1M", "-f qcow2 -o iter-time=x x 1M",
    "-f qcow2 -o preallocation=bogus x 1M", "-f raw -o preallocation=bogus x 1M",
    "-f qcow2 -o compat=2 x 1M", "-f qcow2 -b r.raw x 1M", "-f luks x 1M",
    "-f qcow2 -b nonexist -F qcow2 x 1M", "-f raw -o size=2M x 1M",
    "-f raw -o size=2M x", "-f raw x 1.5k", "-f raw -q x 1G",
    "-f raw -o preallocation=full,nocow=on,extent_size_hint=1M x 1M",
    "-f qcow2 -o refcount_bits=0x10,lazy_refcounts=yes x 1M", "-f qcow2 x 1000",
    "-f qcow2 -o cluster_size=4k -o compat=0.10,preallocation=metadata x 32M",
    "-f qcow2 -o extended_l2=on,refcount_bits=8 x 32M", "-f qcow2 -b r2.raw -F raw x",
    "-f qcow2 -u -b nonexist -F qcow2 x 1M",
]


@pytest.mark.parametrize("args", CREATE)
def test_create(d, args):
    """Same messages; the images qemu-img and blockd-img make look the same to qemu-img."""
    argv = ["create", *(a if a != "''" else "" for a in args.split())]
    if not args.endswith("help") and "-o help" not in args:
        q = qemu_img(*argv, cwd=d)
        if (d / "x").exists():
            os.rename(d / "x", d / "qx")
        b = blockd_img(*argv, cwd=d)
        assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
        assert (d / "x").exists() == (d / "qx").exists()
        if q.returncode == 0:
            qi = json.loads(qemu_img("info", "--output=json", "-U", str(d / "qx")).stdout)
            bi = json.loads(qemu_img("info", "--output=json", "-U", str(d / "x")).stdout)
            for info in (qi, bi):
                del info["filename"], info["actual-size"]
                info.get("format-specific", {}).get("data", {}).pop("uuid", None)
            assert qi == bi
            if "-u" in argv:  # the backing file does not exist: nothing more to open
                return
            if qi["format"] == "qcow2":
                assert qemu_img("check", str(d / "x")).returncode == 0
            if "preallocation=metadata" not in args:  # the driver lays metadata out its own way
                assert map_json(d / "x") == map_json(d / "qx")
    else:
        same(d, *argv)


def test_create_luks(d):
    out = blockd_img("create", "-f", "luks", *SECRET, "-o", "key-secret=s0,iter-time=10",
                     "l", "1M", cwd=d)
    assert out == ("Formatting 'l', fmt=luks size=1048576 key-secret=s0 iter-time=10\n", "", 0)
    opts = "driver=luks,key-secret=s0,file.filename=l"
    qemu_io_args = ["qemu-io", *SECRET, "--image-opts", "-c", "write -P 5 0 64k", opts]
    subprocess.run(qemu_io_args, check=True, capture_output=True, cwd=d)
    same(d, "map", "--output=json", *SECRET, "--image-opts", opts)
    assert blockd_img("convert", *SECRET, "--image-opts", opts, "-O", "raw", "o.raw",
                      cwd=d)[2] == 0
    same(d, "compare", *SECRET, "--image-opts", opts, "driver=raw,file.filename=o.raw")


RESIZE = ["r.raw +1M", "r.raw -- -1M", "r.raw -1M", "-f raw r.raw -1k", "--shrink r.raw -1M",
          "-f raw --shrink r.raw 100k", "-f raw r.raw 1Q", "--preallocation=full r.raw 3M",
          "--preallocation=bogus r.raw 4M", "r.raw", "r.raw 1M 2M", "-q -f raw r.raw 2M"]
RESIZE_QCOW2 = ["top.qcow2 64M", "--shrink top.qcow2 1M", "--shrink top.qcow2 1000",
                "top.qcow2 +1000", "-q top.qcow2 +1M",
                "--shrink --preallocation=full top.qcow2 -1M", "top.qcow2 -1M"]


def _sparse_copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


def _resize_case(d: Path, args: str) -> None:
    """qemu-img and blockd-img each resize their own identical copy of the image."""
    img = next(t for t in args.split() if t.endswith((".raw", ".qcow2")))
    mine = d / ("b_" + img)
    _sparse_copy(d / img, mine)
    _sparse_copy(d / img, d / "tmp")
    os.rename(d / "tmp", d / img)
    q = qemu_img("resize", *args.split(), cwd=d)
    os.rename(d / img, d / "q_result")
    os.rename(mine, d / img)
    b = blockd_img("resize", *args.split(), cwd=d)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    assert os.path.getsize(d / img) == os.path.getsize(d / "q_result")
    assert qemu_img("compare", str(d / img), str(d / "q_result")).returncode == 0
    assert map_json(d / img) == map_json(d / "q_result")


@pytest.mark.parametrize("args", RESIZE)
def test_resize_raw(d, args):
    _sparse_copy(d / "r2.raw", d / "r.raw")
    _resize_case(d, args)


@needs_qcow2
@pytest.mark.parametrize("args", RESIZE_QCOW2)
def test_resize_qcow2(d, args):
    _resize_case(d, args)
    assert qemu_img("check", str(d / "top.qcow2")).returncode == 0


COMPARE = ["r.raw r2.raw", "r2.raw r.raw", "-s r.raw r2.raw", "r.raw r.raw", "-s r.raw r.raw",
           "-q r.raw r2.raw", "nonexist r.raw", "-f qcow2 r.raw r.raw", "-f raw -F raw r.raw r.raw"]
COMPARE_QCOW2 = ["top.qcow2 base.qcow2", "-s top.qcow2 base.qcow2", "top.qcow2 r2.raw",
                 "-f qcow2 -F qcow2 top.qcow2 top.qcow2", "-s base.qcow2 base.qcow2"]


@pytest.mark.parametrize("args", COMPARE)
def test_compare_raw(d, args):
    qemu_io_ok("raw", d / "r.raw", "write -P 0 8k 4k")
    same(d, "compare", *args.split())


@needs_qcow2
@pytest.mark.parametrize("args", COMPARE_QCOW2)
def test_compare_qcow2(d, args):
    same(d, "compare", *args.split())


CONVERT_ERRORS = ["-m 17 r.raw o", "-S 100 r.raw o", "-c -O raw r.raw o", "-n r.raw nonexist",
                  "--target-is-zero r.raw o", "-O bogus r.raw o", "-O qcow2 -o help",
                  "-B r.raw -O raw r.raw o", "r.raw", "nonexist o", "-n r2.raw r.raw"]


@pytest.mark.parametrize("args", CONVERT_ERRORS)
def test_convert_errors(d, args):
    same(d, "convert", *args.split())


CONVERT = ["-O raw r2.raw", "-O raw -S 64k r2.raw", "-O raw -S 0 r2.raw", "-O raw r.raw r2.raw",
           "-O raw -m 1 r2.raw"]
CONVERT_QCOW2 = ["-O raw top.qcow2", "-O qcow2 top.qcow2", "-O qcow2 -S 0 top.qcow2",
                 "-O qcow2 -o cluster_size=4k r2.raw", "-O qcow2 -B base.qcow2 -F qcow2 top.qcow2",
                 "-O qcow2 -W -m 16 top.qcow2", "-O qcow2 -o compat=0.10 base.qcow2"]


def _convert_case(d: Path, args: str) -> None:
    q = qemu_img("convert", *args.split(), "q.out", cwd=d)
    b = blockd_img("convert", *args.split(), "b.out", cwd=d)
    assert q.returncode == 0 and b == ("", "", 0)
    assert qemu_img("compare", "-q", str(d / "q.out"), str(d / "b.out")).returncode == 0
    if "-W" not in args:  # out-of-order writes place clusters in no fixed order
        assert map_json(d / "q.out") == map_json(d / "b.out")


@pytest.mark.parametrize("args", CONVERT)
def test_convert_raw(d, args):
    _convert_case(d, args)


@needs_qcow2
@pytest.mark.parametrize("args", CONVERT_QCOW2)
def test_convert_qcow2(d, args):
    _convert_case(d, args)
    if "-O qcow2" in args:
        assert qemu_img("check", str(d / "b.out")).returncode == 0


@needs_qcow2
@pytest.mark.parametrize("flags", [["-c"], ["-c", "-W"], ["-c", "-m", "1"],
                                   ["-c", "-o", "cluster_size=4k"]])
def test_convert_compressed(d, flags):
    """Compressed output differs in layout from qemu-img's but holds the same content."""
    assert blockd_img("convert", *flags, "-O", "qcow2", "top.qcow2", "c.qcow2", cwd=d)[2] == 0
    assert qemu_img("compare", str(d / "top.qcow2"), str(d / "c.qcow2")).returncode == 0
    check = json.loads(qemu_img("check", "--output=json", str(d / "c.qcow2")).stdout)
    assert check["check-errors"] == 0 and check.get("compressed-clusters", 0) > 0


@needs_qcow2
def test_convert_no_create(d):
    qemu_img("create", "-q", "-f", "qcow2", str(d / "t.qcow2"), "64M")
    qemu_io_ok("qcow2", d / "t.qcow2", "write -P 0x77 0 64M")
    assert blockd_img("convert", "-n", "-O", "qcow2", "top.qcow2", "t.qcow2", cwd=d)[2] == 0
    assert qemu_img("compare", str(d / "top.qcow2"), str(d / "t.qcow2")).returncode == 0


MEASURE = ["--size 1G -O qcow2", "--output=json --size 1G -O qcow2", "-O raw r2.raw",
           "--output=json -O raw r2.raw", "-O qcow2 -o cluster_size=4k,extended_l2=on --size 100G",
           "-O qcow2 -o preallocation=metadata --size 1G",
           "-O qcow2 -o preallocation=full --size 1G",
           "-O qcow2 -o refcount_bits=1 r2.raw", "--size 1G -O bogus",
           "-O qcow2 -o cluster_size=512,refcount_bits=64 --size 3T",
           "-O qcow2 -o extended_l2=on --size 1000", "--size 1000 -O raw",
           "-O qcow2 -o backing_file=x r2.raw"]
MEASURE_QCOW2 = ["-O qcow2 top.qcow2", "--output=json -O qcow2 top.qcow2", "-O raw top.qcow2",
                 "-O qcow2 -o compat=0.10 top.qcow2", "-O qcow2 -o cluster_size=2M base.qcow2"]


@pytest.mark.parametrize("args", MEASURE)
def test_measure(d, args):
    same(d, "measure", *args.split())


@needs_qcow2
@pytest.mark.parametrize("args", MEASURE_QCOW2)
def test_measure_qcow2(d, args):
    same(d, "measure", *args.split())


@needs_qcow2
def test_check_leaks_repair(d):
    q = d / "base.qcow2"
    size = os.path.getsize(q)
    end = size // 4096 + 1
    with open(q, "r+b") as f:  # a refcount for a cluster past the end: one leak
        f.seek(2 * 4096 + 2 * end)
        f.write(struct.pack(">H", 1))
        f.truncate((end + 1) * 4096)
    assert same(d, "check", "base.qcow2")[2] == 3
    same(d, "check", "--output=json", "base.qcow2")
    out, _, code = blockd_img("check", "-r", "leaks", "base.qcow2", cwd=d)
    assert code == 0 and "1 leaked clusters" in out
    assert qemu_img("check", str(q)).returncode == 0


def test_entry_point_and_progress(d):
    """The module runs as a program; ``-p`` draws on a terminal and through a pipe alike."""
    cmd = [sys.executable, "-m", "blockd.img.cli", "convert", "-p", "-O", "raw", "r2.raw"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    piped = subprocess.run(cmd + ["p1.raw"], capture_output=True, text=True, cwd=d, env=env)
    q = qemu_img("convert", "-p", "-O", "raw", "r2.raw", "q1.raw", cwd=d)
    assert (piped.stdout, piped.returncode) == (q.stdout, 0)
    master, slave = pty.openpty()
    proc = subprocess.run(cmd + ["p2.raw"], stdout=slave, stderr=subprocess.PIPE, cwd=d,
                          env=env)
    os.close(slave)
    shown = os.read(master, 65536).decode()
    os.close(master)
    assert proc.returncode == 0
    assert shown.startswith("    (0.00/100%)\r") and shown.endswith("    (100.00/100%)\r\r\n")


DD = ["if=r2.raw of=X bs=64k count=3 skip=1", "-O qcow2 if=r2.raw of=X",
      "if=r2.raw of=X bs=1536 count=1000",
      "if=r2.raw of=X skip=100000", "if=r2.raw of=X skip=4095"]


@pytest.mark.parametrize("args", DD)
def test_dd(d, args):
    """Same messages and an output image with the same size and content."""
    if "qcow2" in args and not HAVE_QCOW2:
        pytest.skip("qcow2 driver not written yet")
    q = qemu_img("dd", *args.replace("of=X", "of=qX").split(), cwd=d)
    b = blockd_img("dd", *args.split(), cwd=d)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    assert qemu_img("compare", "-s", str(d / "qX"), str(d / "X")).returncode == 0


@pytest.mark.parametrize("args", ["dd if=r2.raw", "dd foo=1", "dd if=r2.raw of=X osize=1",
                                  "dd if=r2.raw of=X bs=0", "dd if=r2.raw of=X bs=x",
                                  "dd if=r2.raw of=X count=-1", "commit r2.raw",
                                  "commit -r abc r2.raw", "commit -r -1 r2.raw",
                                  "commit -f raw r2.raw", "commit"])
def test_dd_commit_errors(d, args):
    same(d, *args.split())


@needs_qcow2
@pytest.mark.parametrize("flags", [["-b", "base.qcow2"], ["-d"], ["-d", "-q"],
                                   ["-r", "64M", "-d"]])
def test_commit(d, flags):
    """Both tools commit their own copy of the chain; the bases end up equal."""
    for prefix in ("q", "b"):
        _sparse_copy(d / "base.qcow2", d / f"{prefix}base.qcow2")
        _sparse_copy(d / "top.qcow2", d / f"{prefix}top.qcow2")
        subprocess.run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", f"{prefix}base.qcow2",
                        f"{prefix}top.qcow2"], check=True, cwd=d)
    flags_q = [f if f != "base.qcow2" else "qbase.qcow2" for f in flags]
    flags_b = [f if f != "base.qcow2" else "bbase.qcow2" for f in flags]
    q = qemu_img("commit", *flags_q, "qtop.qcow2", cwd=d)
    b = blockd_img("commit", *flags_b, "btop.qcow2", cwd=d)
    assert b == (q.stdout, q.stderr, q.returncode)
    assert qemu_img("compare", str(d / "qbase.qcow2"), str(d / "bbase.qcow2")).returncode == 0
    assert map_json(d / "qbase.qcow2") == map_json(d / "bbase.qcow2")
    assert map_json(d / "qtop.qcow2") == map_json(d / "btop.qcow2")
    assert qemu_img("check", str(d / "bbase.qcow2")).returncode == 0


BITMAP_STEPS = ["--add FILE b0", "--add FILE b0", "--add -g 128k --disable FILE b1",
                "--remove FILE nope", "FILE b0", "--add FILE", "-g 64k --clear FILE b0",
                "--merge b1 FILE b0", "--add -g 100 FILE b5", "--add --enable FILE b6 --remove",
                "--add FILE b7", "--disable FILE b7", "--add -f raw r.raw b0"]


@needs_qcow2
def test_bitmap(d):
    """A sequence of bitmap operations: same messages, and the same bitmaps in the end."""
    for name in ("q.qcow2", "b.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", str(d / name), "64M")
    for step in BITMAP_STEPS:
        q = qemu_img("bitmap", *step.replace("FILE", "q.qcow2").split(), cwd=d)
        b = blockd_img("bitmap", *step.replace("FILE", "b.qcow2").split(), cwd=d)
        q_err = q.stderr.replace("qemu-img", "blockd-img").replace("#block", "#")
        assert b[0] == q.stdout and b[2] == q.returncode, step
        if "r.raw" not in step:  # the raw node's implicit name differs
            assert b[1] == q_err, step
    infos = [json.loads(qemu_img("info", "--output=json", str(d / n)).stdout)
             for n in ("q.qcow2", "b.qcow2")]
    q_maps, b_maps = (sorted(i["format-specific"]["data"]["bitmaps"], key=lambda b: b["name"])
                      for i in infos)
    assert q_maps == b_maps
    assert qemu_img("check", str(d / "b.qcow2")).returncode == 0
