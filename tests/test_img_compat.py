"""blockd-img accepts what qemu-img 7.2 accepts and refuses what it refuses (issue 19).

Each case runs both tools on the same command line and compares stdout,
stderr (``qemu-img`` read as ``blockd-img``), the exit status and the files
left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_img import needs_qcow2
from test_img import test_create as create_case
from harness import blockd_img, qemu_img, qemu_io_ok, same

pytestmark = needs_qcow2
ROOT = Path(__file__).parent.parent

BACKING_CREATE = [
    "-f raw -b base.qcow2 x 1M", "-f raw -b '' x 1M", "-f raw -F raw x 1M",
    "-f qcow2 -F raw x 1M", "-f qcow2 -b base.qcow2 x", "-f qcow2 -b '' x 1M",
    "-f qcow2 -b '' x", "-f qcow2 -b '' -F qcow2 x 1M",
    "-f qcow2 -o backing_file=,backing_fmt=qcow2 x 1M", "-f qcow2 -o backing_file= x 1M",
    "-f qcow2 -b x x", "-f qcow2 -u -b x -F qcow2 x 1M", "-f qcow2 -b x -o size=1x x",
    "-f qcow2 -o backing_file=x,cluster_size=3 x",
]


@pytest.mark.parametrize("args", BACKING_CREATE)
def test_create_backing_checks(d, args):
    """``-b`` without ``-F``, ``-b ''``, a backing file named as the image: qemu-img's refusals."""
    create_case(d, args)


def _convert_same(d: Path, args: list[str]) -> None:
    """Both tools convert to a target of their own; same output, same target content."""
    q = qemu_img("convert", *[a if a != "T" else "q.out" for a in args], cwd=d)
    b = blockd_img("convert", *[a if a != "T" else "b.out" for a in args], cwd=d)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img").replace("q.out", "b.out"),
                 q.returncode)
    assert (d / "q.out").exists() == (d / "b.out").exists()
    if q.returncode == 0:
        assert qemu_img("compare", str(d / "q.out"), str(d / "b.out")).returncode == 0
        qi = qemu_img("info", str(d / "q.out")).stdout.replace("q.out", "b.out")
        bi = qemu_img("info", str(d / "b.out")).stdout
        assert [ln for ln in qi.splitlines() if "disk size" not in ln] == \
            [ln for ln in bi.splitlines() if "disk size" not in ln]


@pytest.mark.parametrize("args", [
    "-O qcow2 -B base.qcow2", "-O qcow2 -B ''", "-O qcow2 -o backing_file=base.qcow2",
    "-O raw -B base.qcow2", "-O raw -F qcow2", "-O qcow2 -F qcow2",
    "-O qcow2 -o backing_fmt=qcow2",
    "-c -O qcow2 -B base.qcow2 -o encryption=on",
    "-O qcow2 -o backing_file=base.qcow2,backing_fmt=qcow2", "-O qcow2 -B base.qcow2 -F qcow2"])
def test_convert_backing_checks(d, args):
    _convert_same(d, [a if a != "''" else "" for a in args.split()] + ["top.qcow2", "T"])


@pytest.mark.parametrize("args", ["-b base.qcow2", "-u -b base.qcow2", "-b '' -F qcow2",
                                  "-u -b ''"])
def test_rebase_backing_checks(d, args):
    for name in ("q.qcow2", "b.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / name))
    argv = [a if a != "''" else "" for a in args.split()]
    q = qemu_img("rebase", *argv, "q.qcow2", cwd=d)
    b = blockd_img("rebase", *argv, "b.qcow2", cwd=d)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    assert qemu_img("info", str(d / "q.qcow2")).stdout.replace("q.qcow2", "b.qcow2") \
        .split("disk size")[0] == qemu_img("info", str(d / "b.qcow2")).stdout.split("disk size")[0]


@pytest.fixture
def locked(d):
    """``lk.qcow2`` (backing ``base.qcow2``) held open read-write by qemu-io."""
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "lk.qcow2"))
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 600000", "lk.qcow2"], cwd=d,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    # Watched in /proc/locks: polling with a tool would hold locks qemu-io may trip on.
    try:
        # The same locks seen twice in a row: qemu-io has taken them all.
        inode = f":{os.stat(d / 'lk.qcow2').st_ino} "
        deadline = time.monotonic() + 60
        before: list[str] = []
        while True:
            now = [ln for ln in Path("/proc/locks").read_text().splitlines() if inode in ln]
            if now and now == before:
                break
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-io took no locks"
            before = now
            time.sleep(0.2)
        yield d
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("args", [
    "info lk.qcow2", "check lk.qcow2", "map --output=json lk.qcow2", "convert -O raw lk.qcow2 o",
    "compare lk.qcow2 base.qcow2", "resize lk.qcow2 2M", "snapshot -l lk.qcow2",
    "amend -o lazy_refcounts=on lk.qcow2", "commit lk.qcow2", "rebase -u -b '' lk.qcow2",
    "measure -O qcow2 lk.qcow2", "bitmap --add lk.qcow2 b0", "create -f qcow2 lk.qcow2 1M",
    "create -f raw lk.qcow2 1M", "convert -O raw base.qcow2 lk.qcow2",
    "convert -n -O qcow2 base.qcow2 lk.qcow2"])
def test_lock_errors(locked, args):
    """qemu's second line, ``Is another process using the image [...]?``, follows the error."""
    _, err, _ = same(locked, *[a if a != "''" else "" for a in args.split()])
    assert "Is another process using the image [lk.qcow2]?\n" in err


@pytest.mark.parametrize("args", ["info nonexist", "bogus", "info --output=xml base.qcow2",
                                  "create -f qcow2 -b base.qcow2 x 1M",
                                  "convert -S 100 base.qcow2 o", "compare base.qcow2 top.qcow2"])
def test_named_qemu_img(d, args):
    """Run through a symlink named ``qemu-img``, the messages say ``qemu-img`` as qemu-img's do;
    through one named ``blockd-img``, ``blockd-img``."""
    bindir = d / "bin"
    bindir.mkdir()
    script = bindir / "blockd-img"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                      "from blockd.img.cli import entry\nentry()\n")
    script.chmod(0o755)
    (bindir / "qemu-img").symlink_to("blockd-img")
    q = qemu_img(*args.split(), cwd=d)
    for name in ("qemu-img", "blockd-img"):
        b = subprocess.run([str(bindir / name), *args.split()], capture_output=True, text=True,
                           cwd=d)
        assert (b.stdout, b.stderr, b.returncode) == \
            (q.stdout, q.stderr.replace("qemu-img", name), q.returncode)


@pytest.mark.parametrize("args", [
    "info --image-opts driver=qcow2,file.filename=dfi.qcow2,data-file.filename=df.raw",
    "compare --image-opts driver=qcow2,file.filename=dfi.qcow2,data-file.filename=df.raw "
    "driver=qcow2,file.filename=dfi.qcow2",
    "compare --image-opts driver=qcow2,file.filename=top.qcow2,backing.file.filename=base.qcow2 "
    "file.filename=base.qcow2",
    "compare --image-opts file.filename=top.qcow2,backing.driver=qcow2,"
    "backing.file.filename=base.qcow2 file.filename=base.qcow2",
    "map --output=json --image-opts file.filename=top.qcow2,backing.file.filename=base.qcow2",
    "convert --image-opts -O raw file.filename=dfi.qcow2,data-file.filename=df.raw o.raw",
    "info --image-opts driver=qcow2,file.aio=threads"])
def test_image_opts_children_without_driver(d, args):
    """A child given by its filename (or its ``file`` child) needs no ``driver``, at any depth."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=df.raw", "dfi.qcow2", "1M", cwd=d)
    subprocess.run(["qemu-io", "-c", "write -P 3 0 64k", "dfi.qcow2"], check=True,
                   capture_output=True, cwd=d)
    same(d, *args.split())


SECRET = ["--object", "secret,id=s0,data=abc"]


@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
def test_convert_encrypted_quietly(tmp_path, fmt):
    """The cipher helpers end quietly when blockd-img exits: stderr as empty as qemu-img's."""
    opts = "key-secret=s0,iter-time=10" if fmt == "luks" else \
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"
    r = qemu_img("create", "-q", "-f", fmt, *SECRET, "-o", opts, "e.img", "12M", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    key = "key-secret=s0" if fmt == "luks" else "encrypt.key-secret=s0"
    image = f"driver={fmt},{key},file.filename=e.img"
    subprocess.run(["qemu-io", *SECRET, "--image-opts", "-c", "write -P 5 0 12M", image],
                   check=True, capture_output=True, cwd=tmp_path)
    q = qemu_img("convert", *SECRET, "--image-opts", image, "-O", "raw", "q.raw", cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(3):  # the helpers' race with the exit is not lost every time
        b = subprocess.run([sys.executable, "-m", "blockd.img.cli", "convert", *SECRET,
                            "--image-opts", image, "-O", "raw", "b.raw"], capture_output=True,
                           text=True, cwd=tmp_path, env=env)
        assert (b.stdout, b.stderr, b.returncode) == (q.stdout, q.stderr, q.returncode)
        assert (tmp_path / "q.raw").read_bytes() == (tmp_path / "b.raw").read_bytes()


@pytest.mark.parametrize("args", [
    "convert -p -O raw r2.raw T", "convert -p -O qcow2 r2.raw T", "convert -p -O raw base.qcow2 T",
    "convert -p -O qcow2 -S 0 r2.raw T", "convert -p -q -O raw r2.raw T",
    "convert -p -c -O qcow2 r2.raw T", "compare -p r2.raw r2.raw", "compare -p r.raw r2.raw",
    "compare -p -s r.raw r2.raw"])
def test_progress_through_a_pipe(d, args):
    """``-p`` draws through a pipe too, exactly as qemu-img does for these images (where
    the steps fall depends on each tool's block status runs, the same for raw images)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    q = qemu_img(*args.replace("T", "q.out").split(), cwd=d)
    b = subprocess.run([sys.executable, "-m", "blockd.img.cli",
                        *args.replace("T", "b.out").split()], capture_output=True, text=True,
                       cwd=d, env=env)
    assert (b.stdout, b.stderr, b.returncode) == (q.stdout, q.stderr, q.returncode)
    assert "(0.00/100%)" in b.stdout or "-q" in args


@pytest.mark.parametrize("output", ["--output=json", "--output=human"])
@pytest.mark.parametrize("create,writes", [
    ("preallocation=metadata", ["write -P 1 0 64k", "write -z 0 128k", "write -z 256k 64k"]),
    ("cluster_size=4k", ["write -P 1 0 1M", "write -z 0 128k", "write -z 256k 4k"]),
    ("cluster_size=4k", ["write -P 1 0 1M", "write -z 512k 8k", "write -P 2 520k 4k"]),
    ("preallocation=metadata,extended_l2=on",
     ["write -P 1 0 64k", "write -z 0 128k", "write -z 256k 4k"]),
    ("extended_l2=on", ["write -P 1 0 4k", "write -z 8k 4k", "write -P 2 70k 2k"])])
def test_map_zero_clusters_keep_offset(d, output, create, writes):
    """Zero clusters that keep their host clusters show where those are, as in qemu-img."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", create, "z.qcow2", "1M", cwd=d)
    qemu_io_ok(None, d / "z.qcow2", *writes)
    same(d, "map", output, "z.qcow2")
    # Such clusters read as zeroes whatever their host clusters hold, written in full too.
    assert blockd_img("convert", "-S", "0", "-O", "raw", "z.qcow2", "z.raw", cwd=d)[2] == 0
    assert qemu_img("compare", "z.qcow2", "z.raw", cwd=d).returncode == 0


@pytest.mark.parametrize("size", [10001, 5000, 4096, 12289])
@pytest.mark.parametrize("opts", [",file.cache.direct=on", ""])
def test_map_raw_tail(d, size, opts):
    """A raw file ending in a partial block, with and without O_DIRECT: the same runs."""
    (d / "odd.raw").write_bytes(os.urandom(size))
    same(d, "map", "--output=json", "--image-opts",
         f"driver=raw,file.driver=file,file.filename=odd.raw{opts}")


OPTION_LISTS = [
    "create -f qcow2 -o backing_file=a,,b,backing_fmt=raw x 1M",
    "create -f qcow2 -o backing_file=b,,1.qcow2,backing_fmt=qcow2 x",
    "create -f qcow2 -o backing_file=b,,1.qcow2,,,backing_fmt=qcow2 x",
    "create -f qcow2 -o help,,x x", "create -f qcow2 -o backing_fmt=qcow2,,help x",
    "create -f qcow2 -o cluster_size=4k,help x 1M", "create -f qcow2 -o ?,x x",
    "create -f qcow2 -o cluster_size=4k,, x 1M", "create -f qcow2 -o cluster_size=4k,,,, x 1M",
    "create -f qcow2 -o '' x 1M", "create -f qcow2 -o cluster_size=4k -o ,help x 1M",
    "amend -o ,help base.qcow2", "convert -o cluster_size=4k, r2.raw x",
    "convert -o ,, r2.raw x", "convert -O qcow2 -o help r2.raw x", "convert -O qcow2 -o help",
    "convert -O qcow2 -o help r2.raw", "convert -O qcow2 -o backing_file=b,,1.qcow2,"
    "backing_fmt=qcow2 r2.raw x", "measure -O qcow2 -o help --size 1M",
    "measure -O qcow2 -o help r2.raw", "measure -o help --size 1M",
    "measure -O qcow2 -o bogus=1 --size 1M", "measure -O qcow2 -o cluster_size=x --size 1M"]


@pytest.mark.parametrize("args", OPTION_LISTS)
def test_option_lists(d, args):
    """``,,`` escapes, ``help`` among other options, malformed lists: as qemu-img has them."""
    qemu_img("create", "-q", "-f", "qcow2", "b,1.qcow2", "1M", cwd=d)
    argv = [a if a != "''" else "" for a in args.split()]
    q = qemu_img(*argv, cwd=d)
    made = (d / "x").exists()
    if made:
        info_q = qemu_img("info", "x", cwd=d).stdout.split("disk size")[0]
        os.unlink(d / "x")
    b = blockd_img(*argv, cwd=d)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    assert (d / "x").exists() == made
    if made:
        assert qemu_img("info", "x", cwd=d).stdout.split("disk size")[0] == info_q


@pytest.mark.parametrize("flags", [[], ["-W"], ["-o", "cluster_size=4k"]])
def test_zstd_both_ways(tmp_path, flags):
    """zstd-compressed qcow2: blockd-img's read back by qemu-img, qemu-img's by blockd-img."""
    d = tmp_path
    qemu_img("create", "-q", "-f", "raw", "src.raw", "4M", cwd=d)
    qemu_io_ok(None, d / "src.raw", "write -P 7 0 1M", "write -P 9 2M 100k", "write -P 3 3000k 5k")
    opts = ["-o", "compression_type=zstd"]
    assert qemu_img("convert", "-c", *flags, "-O", "qcow2", *opts, "src.raw", "q.qcow2",
                    cwd=d).returncode == 0
    assert blockd_img("convert", "-c", *flags, "-O", "qcow2", *opts, "src.raw", "b.qcow2",
                      cwd=d) == ("", "", 0)
    check = qemu_img("check", "--output=json", "b.qcow2", cwd=d)
    assert check.returncode == 0 and json.loads(check.stdout).get("compressed-clusters", 0) > 0
    assert "compression type: zstd" in qemu_img("info", "b.qcow2", cwd=d).stdout
    assert qemu_img("compare", "src.raw", "b.qcow2", cwd=d).returncode == 0
    for args in (["compare", "src.raw", "q.qcow2"], ["map", "--output=json", "q.qcow2"],
                 ["convert", "-O", "raw", "q.qcow2", "o.raw"]):
        same(d, *args)
    assert (d / "o.raw").read_bytes() == (d / "src.raw").read_bytes()


@pytest.mark.parametrize("image", ["loop.qcow2", "l2.qcow2", "miss.qcow2", "t3.qcow2",
                                   "./t3.qcow2", "ABS/t3.qcow2"])
@pytest.mark.parametrize("flags", ["", "--output=json", "--backing-chain",
                                   "--backing-chain --output=json"])
def test_info_chains(d, image, flags):
    """Each image described alone, as qemu-img opens it: a missing backing file is no
    error, and a chain looping back is refused with qemu-img's message."""
    def create(name: str, backing: str) -> None:
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", name, "1M",
                 cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", "loop.qcow2", "1M", cwd=d)
    qemu_img("rebase", "-u", "-b", "loop.qcow2", "-F", "qcow2", "loop.qcow2", cwd=d)
    create("l1.qcow2", "l2.qcow2")
    create("l2.qcow2", "l1.qcow2")
    create("miss.qcow2", "nonexist.qcow2")
    create("t3.qcow2", "top.qcow2")
    _, err, code = same(d, "info", *flags.split(), image.replace("ABS", str(d)))
    if "loop" in image or image == "l2.qcow2":
        assert code == (1 if "chain" in flags else 0)


@pytest.mark.parametrize("args", [
    "create -f qcow2 -b /dev/null -F raw x", "create -f qcow2 -b /dev/null -F raw x 1M",
    "create -f qcow2 -b /dev/null x 1M", "convert -O qcow2 -B /dev/null -F raw top.qcow2 x",
    "rebase -b /dev/null -F raw T", "rebase -u -b /dev/null -F raw T", "info N",
    "info --backing-chain N", "map --output=json N", "convert -O raw N x", "compare N top.qcow2",
    "check N", "info -f raw /dev/null", "map --output=json -f raw /dev/null"])
def test_dev_null_backing(d, args):
    """``/dev/null`` as a backing file is an empty raw image (QEMU's ``host_device``)."""
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/dev/null", "-F", "raw", "n.qcow2", "1M",
             cwd=d)
    qemu_io_ok(None, d / "n.qcow2", "write -P 1 0 64k")
    argv = args.replace("N", "n.qcow2").split()
    results = []
    for tool, name in ((qemu_img, "q"), (blockd_img, "b")):
        subprocess.run(["cp", "top.qcow2", f"{name}.qcow2"], check=True, cwd=d)
        (d / "x").unlink(missing_ok=True)
        out = tool(*[a.replace("T", f"{name}.qcow2") for a in argv], cwd=d)
        if tool is qemu_img:
            out = (out.stdout, out.stderr.replace("qemu-img", "blockd-img"), out.returncode)
        files = [qemu_img("info", f, cwd=d).stdout.split("disk size")[0]
                 for f in ("x", f"{name}.qcow2") if (d / f).exists()]
        results.append((out[0].replace("q.qcow2", "b.qcow2"), out[1], out[2],
                        [f.replace("q.qcow2", "b.qcow2") for f in files]))
    assert results[1] == results[0]


@pytest.mark.parametrize("args", ["map --output=json e.raw", "map --output=json e.qcow2",
                                  "map e.qcow2", "map --output=json --start-offset=64M base.qcow2",
                                  "map --output=json --max-length=0 base.qcow2"])
def test_map_empty(d, args):
    qemu_img("create", "-q", "-f", "raw", "e.raw", "0", cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", "e.qcow2", "0", cwd=d)
    same(d, *args.split())


@pytest.mark.parametrize("flags", ["", "--salvage", "--salvage -q", "--salvage -O qcow2",
                                   "--salvage -c -O qcow2", "-c -O qcow2",
                                   "--salvage -O qcow2 -S 0", "--salvage -m 1"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_salvage(d, flags, fmt):
    """Read errors injected by blkdebug: refused, or with --salvage zeroes and qemu-img's
    warnings (none with -q); the same output image either way."""
    (d / "bd.conf").write_text('[inject-error]\nevent = "read_aio"\nerrno = "5"\n'
                               'sector = "100"\n')
    qemu_img("create", "-q", "-f", fmt, "src", "1M", cwd=d)
    qemu_io_ok(None, d / "src", "write -P 5 0 1M")
    image = f"driver={fmt},file.driver=blkdebug,file.config=bd.conf,file.image.filename=src"
    q = qemu_img("convert", *flags.split(), "--image-opts", image, "q.out", cwd=d)
    b = blockd_img("convert", *flags.split(), "--image-opts", image, "b.out", cwd=d)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    if q.returncode == 0:
        assert qemu_img("compare", "q.out", "b.out", cwd=d).returncode == 0
