"""qcow2 reads of every image variant qemu-img makes, compared byte for byte with qemu-img.

Each image gets data from qemu-io (patterns, zero writes, discards, partial
clusters), then the driver's reads, block status and format-specific info
are checked against `qemu-img convert -O raw`, `qemu-img map` and
`qemu-img info`.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from blockd.block.graph import BlockGraph
from blockd.block.node import Status
from blockd.errors import QMPError
from harness import qemu_img_ok, qemu_io_ok, sh

MiB = 1 << 20
SIZE = 9 * MiB



async def open_qcow2(path: str, **opts) -> tuple[BlockGraph, object]:
    g = BlockGraph()
    node = await g.open_node({"driver": "qcow2", "node-name": "q",
                              "file": {"driver": "file", "filename": path}, **opts})
    return g, node


def raw_of(tmp_path, img: str) -> bytes:
    raw = str(tmp_path / "out.raw")
    qemu_img_ok("convert", "-O", "raw", img, raw)
    with open(raw, "rb") as f:
        return f.read()


async def _read_all(node, size: int) -> bytes:
    out = bytearray()
    step = 3 * MiB + 4096 + 512  # deliberately unaligned to clusters
    for off in range(0, size, step):
        out += await node.read(off, min(step, size - off))
    return bytes(out)


async def _status_map(node, size: int, grain: int) -> list[tuple[bool, bool]]:
    """(data, zero) per grain-sized block, from the driver's block status."""
    out: list[tuple[bool, bool]] = []
    off = 0
    while off < size:
        ext = await node.block_status(off, size - off)
        assert ext.length > 0
        flags = (bool(ext.status & Status.DATA), bool(ext.status & Status.ZERO))
        out += [flags] * (ext.length // grain)
        off += ext.length
    return out


def _per_grain(extents, grain: int) -> list[tuple[int, int | None]]:
    """(status bits, host offset or None) for every grain the extents cover."""
    out: list[tuple[int, int | None]] = []
    for ext in extents:
        assert ext.length > 0 and ext.length % grain == 0
        out += [(ext.status, None if ext.offset is None else ext.offset + k * grain)
                for k in range(ext.length // grain)]
    return out


async def _extents_agree(node, size: int, grain: int) -> None:
    """``extents`` (a slice at a time) says what ``block_status`` (a run at a time) says,
    for the whole image and for unaligned windows of it."""
    runs = []
    off = 0
    while off < size:
        runs.append(await node.block_status(off, size - off))
        off += runs[-1].length
    whole = _per_grain(runs, grain)
    assert _per_grain(await node.extents(0, size), grain) == whole
    step = 3 * MiB + 7 * 512  # windows that start and end inside clusters and slices
    for off in range(0, size, step):
        n = min(step, size - off)
        got = _per_grain(await node.extents(off, n), grain)
        assert got == whole[off // grain:(off + n) // grain]


def _qemu_map(img: str, size: int, grain: int) -> list[tuple[bool, bool]]:
    out: list[tuple[bool, bool]] = []
    for ext in json.loads(qemu_img_ok("map", "--output=json", img)):
        out += [(ext["data"], ext["zero"])] * (ext["length"] // grain)
    return out


def check_image(tmp_path, img: str, size: int = SIZE, **opts) -> None:
    async def body() -> tuple[bytes, list, dict, int]:
        g, node = await open_qcow2(img, read_only=True, **opts)
        try:
            data = await _read_all(node, size)
            status = await _status_map(node, size, 512)
            await _extents_agree(node, size, 512)
            return data, status, node.format_specific(), node.cluster_size()
        finally:
            await g.close_all()

    data, status, specific, cs = asyncio.run(body())
    assert data == raw_of(tmp_path, img)
    info = json.loads(qemu_img_ok("info", "--output=json", img))
    assert cs == info["cluster-size"]
    assert specific == info["format-specific"]
    # The options are cache settings: small L2 slices make status runs cross slices.
    assert status == _qemu_map(img, size, 512)


DATA_CMDS = ["write -P 0x11 0 64k", "write -P 0x22 1M 5k", "write -z 2M 128k",
             "write -P 0x33 3M 1536", "discard 1M 4k", "write -P 0x44 7M 1M",
             "write -P 0x55 8M 700", "write -z 8M 512", "write -P 0x66 5M 33k"]


VARIANTS = (
    [f"cluster_size={cs}" for cs in
     ("512", "1k", "2k", "4k", "8k", "16k", "32k", "128k", "256k", "512k", "1M", "2M")]
    + [f"cluster_size=4k,refcount_bits={b}" for b in (1, 2, 4, 8, 16, 32, 64)]
    + ["compat=0.10", "compat=0.10,cluster_size=1k", "lazy_refcounts=on",
       "extended_l2=on", "extended_l2=on,cluster_size=16k", "extended_l2=on,cluster_size=2M",
       "extended_l2=on,refcount_bits=1,cluster_size=32k",
       "preallocation=metadata", "preallocation=falloc", "preallocation=full",
       "preallocation=metadata,extended_l2=on", "preallocation=metadata,cluster_size=512",
       "compat=0.10,preallocation=metadata"]
)


@pytest.mark.parametrize("opts", VARIANTS)
def test_variant_reads_status_and_info_match_qemu(tmp_path, opts):
    img = str(tmp_path / "a.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", opts, img, str(SIZE))
    qemu_io_ok("qcow2", img, *DATA_CMDS)
    check_image(tmp_path, img)


@pytest.mark.parametrize("opts", ["cluster_size=512", "cluster_size=4k", "cluster_size=64k",
                                  "cluster_size=2M", "extended_l2=on,cluster_size=32k",
                                  "compat=0.10"])
def test_compressed_images_read_like_qemu(tmp_path, opts):
    src, img = str(tmp_path / "src.raw"), str(tmp_path / "c.qcow2")
    qemu_img_ok("create", "-q", "-f", "raw", src, str(SIZE))
    qemu_io_ok("raw", src, "write -P 0x5a 0 1M", "write -P 0x6b 2M 300k", "write -P 0x11 4M 5k",
               "write -P 0x00 6M 64k", "write -P 0x7c 9215k 1k")
    # Incompressible data stays uncompressed: mixes both kinds of cluster.
    with open(src, "r+b") as f:
        import os
        f.seek(5 * MiB)
        f.write(os.urandom(200 * 1024))
    qemu_img_ok("convert", "-c", "-O", "qcow2", "-o", opts, src, img)
    # Overwrite part of a compressed cluster afterwards (copy-on-write of a compressed cluster).
    qemu_io_ok("qcow2", img, "write -P 0x99 4100 600")
    check_image(tmp_path, img)


def test_backing_chain_raw_and_qcow2_shorter_backings(tmp_path):
    base = str(tmp_path / "base.raw")
    mid, top = str(tmp_path / "mid.qcow2"), str(tmp_path / "top.qcow2")
    qemu_img_ok("create", "-q", "-f", "raw", base, "3M")  # shorter than the overlay
    qemu_io_ok("raw", base, "write -P 0xb1 0 3M")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", "-b", base, "-F", "raw",
                mid, "6M")
    qemu_io_ok("qcow2", mid, "write -P 0xc2 1M 7k", "write -z 2M 32k", "discard 2500k 16k")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", mid, "-F", "qcow2",
                top, str(SIZE))
    qemu_io_ok("qcow2", top, "write -P 0xd3 1030k 4k", "write -z 2050k 2k", "write -P 0xe4 8M 9k")
    check_image(tmp_path, top)


def test_backing_without_format_is_probed_and_relative(tmp_path):
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", base, str(SIZE))
    qemu_io_ok("qcow2", base, "write -P 0x31 0 2M")
    # A relative name and no backing format extension: resolved next to the overlay, probed.
    qemu_img_ok("create", "-q", "-f", "qcow2", top, str(SIZE))
    name = b"base.qcow2"
    with open(top, "r+b") as f:
        f.seek(8)
        f.write((1024).to_bytes(8, "big") + len(name).to_bytes(4, "big"))
        f.seek(1024)
        f.write(name)
    qemu_io_ok("qcow2", top, "write -P 0x42 1M 4k")
    check_image(tmp_path, top)


def test_backing_null_and_backing_option(tmp_path):
    base, top = str(tmp_path / "base.raw"), str(tmp_path / "top.qcow2")
    other = str(tmp_path / "other.raw")
    qemu_img_ok("create", "-q", "-f", "raw", base, "2M")
    qemu_io_ok("raw", base, "write -P 0x31 0 2M")
    qemu_img_ok("create", "-q", "-f", "raw", other, "2M")
    qemu_io_ok("raw", other, "write -P 0x77 0 2M")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top, "2M")
    qemu_io_ok("qcow2", top, "write -P 0x42 64k 4k")

    async def body() -> tuple[bytes, bytes]:
        g, node = await open_qcow2(top, backing=None)
        alone = bytes(await node.read(0, 128 * 1024))
        await g.close_all()
        g, node = await open_qcow2(top, backing={"driver": "raw", "file": {
            "driver": "file", "filename": other}})
        swapped = bytes(await node.read(0, 128 * 1024))
        await g.close_all()
        return alone, swapped

    alone, swapped = asyncio.run(body())
    # The 4k write copied the rest of its 64k cluster up from the original backing file.
    assert alone == bytes(64 * 1024) + b"\x42" * 4096 + b"\x31" * (60 * 1024)
    assert swapped == b"\x77" * 65536 + b"\x42" * 4096 + b"\x31" * (60 * 1024)


@pytest.mark.parametrize("named", [False, True])
def test_unknown_incompatible_features_named_like_qemu(tmp_path, named):
    img = str(tmp_path / "a.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", img, "1M")
    with open(img, "r+b") as f:
        head = f.read(4096)
        if named:  # the image's feature table names bit 9 (as a newer QEMU's would)
            f.seek(head.index(b"\x00\x03compression type"))
            f.write(b"\x00\x09future feature".ljust(48, b"\0"))
        f.seek(72)
        f.write(((1 << 40) | (1 << 9)).to_bytes(8, "big"))
    expected = sh("qemu-img", "info", img).stderr.strip()
    with pytest.raises(QMPError) as err:
        asyncio.run(open_qcow2(img))
    assert expected.endswith(err.value.desc), (expected, err.value.desc)


def test_unknown_autoclear_bits_cleared_on_read_write_open(tmp_path):
    img = str(tmp_path / "a.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", img, "1M")
    with open(img, "r+b") as f:
        f.seek(88)
        f.write((1 << 7).to_bytes(8, "big"))

    async def body() -> None:
        g, _ = await open_qcow2(img)
        await g.close_all()

    asyncio.run(body())
    with open(img, "rb") as f:
        f.seek(88)
        assert int.from_bytes(f.read(8), "big") == 0


CACHE_ERRORS = [
    {"l2-cache-entry-size": 100}, {"l2-cache-entry-size": 131072},
    {"cache-size": 1 << 20, "l2-cache-size": 1 << 19, "refcount-cache-size": 1 << 19},
    {"cache-size": 1 << 20, "l2-cache-size": 2 << 20},
    {"cache-size": 1 << 20, "refcount-cache-size": 2 << 20},
    {"cache-clean-interval": 5000000000},
    {"cache-size": 1 << 20, "l2-cache-size": 2 << 20, "l2-cache-entry-size": 100},
]


@pytest.mark.parametrize("opts", CACHE_ERRORS)
def test_cache_option_errors_match_qemu(tmp_path, opts):
    img = str(tmp_path / "a.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", img, "1G")
    keyval = ",".join(f"{k}={v}" for k, v in opts.items())
    out = sh("qemu-io", "-c", "quit", "--image-opts",
             f"driver=qcow2,file.filename={img},{keyval}")
    expected = out.stderr.strip().removeprefix("qemu-io: can't open: ")
    with pytest.raises(QMPError) as err:
        asyncio.run(open_qcow2(img, **opts))
    assert err.value.desc == expected


@pytest.mark.parametrize("opts", [
    {"l2-cache-entry-size": 512, "l2-cache-size": 1024},
    {"l2-cache-entry-size": 4096, "cache-size": 300000},
    {"cache-size": 65536 * 4},
    {"l2-cache-size": 0, "refcount-cache-size": 0},
])
def test_small_caches_and_slices_read_correctly(tmp_path, opts):
    img = str(tmp_path / "a.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, str(SIZE))
    qemu_io_ok("qcow2", img, *DATA_CMDS)
    check_image(tmp_path, img, **opts)


def test_cache_clean_interval_frees_unused_entries(tmp_path):
    img = str(tmp_path / "a.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, str(SIZE))
    qemu_io_ok("qcow2", img, *DATA_CMDS)

    async def body() -> tuple[int, int]:
        g, node = await open_qcow2(img, **{"cache-clean-interval": 1,
                                           "l2-cache-entry-size": 1024})
        await node.read(0, SIZE)
        loaded = len(node.map.cache)
        await asyncio.sleep(2.3)
        left = len(node.map.cache)
        await g.close_all()
        return loaded, left

    loaded, left = asyncio.run(body())
    assert loaded > 1 and left == 0


@pytest.mark.parametrize("opts", ["data_file=d.data", "data_file=d.data,data_file_raw=on",
                                  "data_file=d.data,extended_l2=on,cluster_size=16k"])
def test_external_data_file_images(tmp_path, opts):
    img = str(tmp_path / "a.qcow2")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", opts.replace("d.data", str(tmp_path / "d.data")),
                img, str(SIZE))
    qemu_io_ok("qcow2", img, *DATA_CMDS)
    check_image(tmp_path, img)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_count_used_matches_the_counts(tmp_path, bits: int) -> None:
    """The used-cluster count behind the metadata-preallocation guess, a block at a time,
    equals counting the decoded refcounts one by one, and may stop early."""
    img = str(tmp_path / "t.qcow2")
    # 512-byte clusters: with 1-bit counts one refcount block covers only 4096
    # clusters, so the image spans several blocks.
    qemu_img_ok("create", "-f", "qcow2", "-o", f"cluster_size=512,refcount_bits={bits}", img,
                "8M")
    qemu_io_ok("qcow2", img, "write -P 1 0 3M", "write -P 2 5M 1M")

    async def body() -> None:
        g, node = await open_qcow2(img, read_only=True)
        rc = node.image.refcounts
        counts = await rc.counts(rc.alloc_end)
        used = sum(1 for c in counts if c)
        assert rc.alloc_end > rc.entries and used > 8192
        assert await rc.count_used(rc.alloc_end, 1 << 40) == used
        assert await rc.count_used(rc.alloc_end - 1, 1 << 40) == used - (counts[-1] != 0)
        assert used > await rc.count_used(rc.alloc_end, 10) > 10
        await g.close_all()

    asyncio.run(body())
