"""blockdev-create for qcow2 and resize, judged by qemu-img check/info/compare."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from blockd.block.graph import BlockGraph
from blockd.drivers.qcow2.create import create
from blockd.errors import QMPError
from harness import qemu_img_ok, qemu_io_ok, sh

MiB = 1 << 20


def check_clean(image: str) -> dict:
    out = sh("qemu-img", "check", "--output=json", image)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    return report


def blockd_create(img: str, size: int, **extra) -> None:
    async def body() -> None:
        g = BlockGraph()
        if "data-file" in extra:
            open(extra["data-file"], "wb").close()
            extra["data-file"] = {"driver": "file", "filename": extra["data-file"]}
        await create(g, {"driver": "qcow2", "size": size,
                         "file": {"driver": "file", "filename": img}, **extra})
        assert not g.nodes, "create left nodes behind"

    open(img, "wb").close()
    asyncio.run(body())


VARIANTS = [
    {}, {"cluster-size": 512, "refcount-bits": 1}, {"cluster-size": 1024, "refcount-bits": 2},
    {"cluster-size": 4096, "refcount-bits": 4}, {"refcount-bits": 8}, {"refcount-bits": 32},
    {"cluster-size": 2 * MiB, "refcount-bits": 64, "lazy-refcounts": True},
    {"version": "v2"}, {"version": "v2", "cluster-size": 4096, "preallocation": "metadata"},
    {"extended-l2": True}, {"extended-l2": True, "cluster-size": 16384},
    {"preallocation": "metadata"}, {"preallocation": "falloc"},
    {"preallocation": "full", "cluster-size": 4096},
    {"preallocation": "metadata", "extended-l2": True, "cluster-size": 32768},
    {"compression-type": "zstd"}, {"data-file": "DATA"}, {"data-file": "DATA",
                                                          "data-file-raw": True},
]


@pytest.mark.parametrize("extra", VARIANTS, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()) or "default")
def test_created_images_pass_check_and_show_options(tmp_path, extra):
    img = str(tmp_path / "c.qcow2")
    extra = {k: (str(tmp_path / "c.data") if v == "DATA" else v) for k, v in extra.items()}
    size = 24 * MiB
    blockd_create(img, size, **extra)
    check_clean(img)
    info = json.loads(qemu_img_ok("info", "--output=json", img))
    assert info["virtual-size"] == size
    assert info["cluster-size"] == extra.get("cluster-size", 65536)
    data = info["format-specific"]["data"]
    assert data["compat"] == ("0.10" if extra.get("version") == "v2" else "1.1")
    assert data["refcount-bits"] == extra.get("refcount-bits", 16)
    assert data.get("lazy-refcounts", False) is extra.get("lazy-refcounts", False)
    assert data.get("extended-l2", False) is extra.get("extended-l2", False)
    assert data["compression-type"] == extra.get("compression-type", "zlib")
    if "data-file" in extra:
        assert data["data-file"] == extra["data-file"]
        assert data["data-file-raw"] is extra.get("data-file-raw", False)
    prealloc = extra.get("preallocation", "off")
    mapping = json.loads(qemu_img_ok("map", "--output=json", img))
    allocated = sum(e["length"] for e in mapping if e["data"] or e.get("offset") is not None)
    if prealloc != "off" or extra.get("data-file-raw"):
        assert allocated == size
    else:
        assert allocated == 0
    if prealloc == "full":
        assert os.stat(img).st_blocks * 512 >= size
    if extra.get("compression-type") != "zstd":
        qemu_io_ok("qcow2", img, "write -P 0x42 1M 64k", "write -P 0x43 23M 4k",
                   "read -P 0x42 1M 64k")
        check_clean(img)


@pytest.mark.parametrize("extra,option", [
    ({"cluster-size": 3000}, "cluster_size=3000"),
    ({"cluster-size": 4 * MiB}, "cluster_size=4M"),
    ({"refcount-bits": 3}, "refcount_bits=3"),
    ({"refcount-bits": 128}, "refcount_bits=128"),
    ({"version": "v2", "refcount-bits": 8}, "compat=0.10,refcount_bits=8"),
    ({"version": "v2", "lazy-refcounts": True}, "compat=0.10,lazy_refcounts=on"),
    ({"version": "v2", "extended-l2": True}, "compat=0.10,extended_l2=on"),
    ({"version": "v2", "compression-type": "zstd"}, "compat=0.10,compression_type=zstd"),
    ({"extended-l2": True, "cluster-size": 4096}, "extended_l2=on,cluster_size=4k"),
    ({"data-file-raw": True}, "data_file_raw=on"),
    ({"version": "v2", "data-file": "DATA"}, "compat=0.10,data_file=DATA"),
    ({"preallocation": "metadata", "backing-file": "BASE", "backing-fmt": "raw"},
     "preallocation=metadata,backing_file=BASE,backing_fmt=raw"),
])
def test_create_errors_match_qemu_img(tmp_path, extra, option):
    base = str(tmp_path / "base.raw")
    qemu_img_ok("create", "-q", "-f", "raw", base, "1M")
    subst = {"DATA": str(tmp_path / "d.data"), "BASE": base}
    extra = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in extra.items()}
    for key, val in subst.items():
        option = option.replace(key, val)
    img = str(tmp_path / "x.qcow2")
    out = sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", option, img, "1M")
    assert out.returncode != 0
    expected = out.stderr.strip().split(": ", 2)[-1]
    with pytest.raises(QMPError) as err:
        blockd_create(str(tmp_path / "y.qcow2"), MiB, **extra)
    assert err.value.desc == expected


def test_backing_file_and_format_recorded(tmp_path):
    base, img = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", base, "8M")
    qemu_io_ok("qcow2", base, "write -P 0x61 0 1M")
    blockd_create(img, 8 * MiB, **{"backing-file": base, "backing-fmt": "qcow2"})
    info = json.loads(qemu_img_ok("info", "--output=json", img))
    assert info["backing-filename"] == base and info["backing-filename-format"] == "qcow2"
    qemu_io_ok("qcow2", img, "read -P 0x61 0 1M", "write -P 0x62 512k 4k", "read -P 0x61 0 512k")
    check_clean(img)


async def _open(path: str, **opts):
    g = BlockGraph()
    node = await g.open_node({"driver": "qcow2", "node-name": "q",
                              "file": {"driver": "file", "filename": path}, **opts})
    return g, node


@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc", "full"])
def test_grow_with_preallocation(tmp_path, prealloc):
    img = str(tmp_path / "g.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "4M")
    qemu_io_ok("qcow2", img, "write -P 0x31 0 1M")

    async def body() -> None:
        g, node = await _open(img)
        await node.truncate(12 * MiB, prealloc=prealloc)
        await g.close_all()

    asyncio.run(body())
    check_clean(img)
    info = json.loads(qemu_img_ok("info", "--output=json", img))
    assert info["virtual-size"] == 12 * MiB
    mapping = json.loads(qemu_img_ok("map", "--output=json", img))
    grown = sum(max(0, e["start"] + e["length"] - max(e["start"], 4 * MiB))
                for e in mapping if e.get("offset") is not None)
    assert grown == (8 * MiB if prealloc != "off" else 0)
    qemu_io_ok("qcow2", img, "read -P 0x31 0 1M", "read -P 0 4M 8M")


@pytest.mark.parametrize("opts", ["cluster_size=4k", "cluster_size=64k,extended_l2=on",
                                  "cluster_size=512,refcount_bits=1"])
def test_shrink_frees_clusters_and_cuts_file(tmp_path, opts):
    img = str(tmp_path / "s.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", opts, img, "16M")
    qemu_io_ok("qcow2", img, "write -P 0x31 0 1M", "write -P 0x32 10M 4M")
    before = os.path.getsize(img)

    async def body() -> None:
        g, node = await _open(img)
        await node.truncate(2 * MiB)
        await g.close_all()

    asyncio.run(body())
    check_clean(img)
    assert os.path.getsize(img) < before - 3 * MiB
    assert json.loads(qemu_img_ok("info", "--output=json", img))["virtual-size"] == 2 * MiB
    qemu_io_ok("qcow2", img, "read -P 0x31 0 1M", "read -P 0 1M 1M")


def test_grow_beyond_one_l1_cluster(tmp_path):
    """Growing far enough to move the L1 table, then writing at the end."""
    img = str(tmp_path / "b.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M")
    qemu_io_ok("qcow2", img, "write -P 0x31 0 64k")

    async def body() -> None:
        g, node = await _open(img)
        await node.truncate(4096 * MiB)
        await node.write(4096 * MiB - 512, b"\x77" * 512)
        await g.close_all()

    asyncio.run(body())
    check_clean(img)
    qemu_io_ok("qcow2", img, "read -P 0x31 0 64k", f"read -P 0x77 {4096 * MiB - 512} 512")
