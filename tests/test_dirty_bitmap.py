"""The dirty bitmap itself, checked against a naive model and against hashes qsd printed.

The hashes below are what qemu-storage-daemon 7.2 returned from
``x-debug-block-dirty-bitmap-sha256`` for the same bitmaps (see the
comment at each), so the serialised layout is QEMU's, not just ours.
"""

from __future__ import annotations

import hashlib
import random
import struct
import time

import pytest

from blockd.block.dirty_bitmap import DirtyBitmap
from blockd.errors import QMPError


class Model:
    """A bitmap as a plain list of booleans: slow and obviously right."""

    def __init__(self, size: int, granularity: int) -> None:
        self.g = granularity
        self.size = size
        self.bits = [False] * max(1, -(-size // granularity))

    def mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        for i in range(offset // self.g, (offset + length - 1) // self.g + 1):
            if i < len(self.bits):
                self.bits[i] = True

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        out: list[tuple[int, bool]] = []
        pos, end = offset, min(offset + length, self.size)
        while pos < end:
            n = min(end, (pos // self.g + 1) * self.g) - pos
            dirty = self.bits[pos // self.g]
            if out and out[-1][1] == dirty:
                out[-1] = (out[-1][0] + n, dirty)
            else:
                out.append((n, dirty))
            pos += n
        return out

    def sha256(self) -> str:
        words = []
        for w in range(0, len(self.bits), 64):
            words.append(sum(1 << j for j, b in enumerate(self.bits[w:w + 64]) if b))
        return hashlib.sha256(struct.pack(f"<{len(words)}Q", *words)).hexdigest()


def _random_writes(rng: random.Random, size: int, n: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(n):
        off = rng.randrange(size)
        out.append((off, rng.randrange(1, min(size - off, 40000) + 1)))
    return out


@pytest.mark.parametrize("granularity", [512, 4096, 65536])
def test_marks_extents_counts_and_hashes_match_the_model(granularity):
    rng = random.Random(granularity)
    size = 3 * 1024 * 1024 + 1536  # not a multiple of any granularity above 512
    bm, model = DirtyBitmap("b", size, granularity), Model(size, granularity)
    for off, length in _random_writes(rng, size, 60):
        bm.mark(off, length)
        model.mark(off, length)
    assert bm.sha256() == model.sha256()
    assert bm.count() == sum(model.bits) * granularity
    for _ in range(20):
        off = rng.randrange(size)
        length = rng.randrange(1, size - off + 1)
        assert bm.extents(off, length) == model.extents(off, length)
    assert bm.extents(0, size) == model.extents(0, size)


def test_marking_edges():
    bm = DirtyBitmap("b", 10 * 4096 + 100, 4096)
    bm.mark(4096, 0)
    assert bm.count() == 0
    bm.mark(4095, 2)                      # straddles granules 0 and 1
    assert bm.extents(0, 3 * 4096) == [(8192, True), (4096, False)]
    bm.mark(10 * 4096 + 99, 1)            # the partial last granule counts whole
    assert bm.count() == 3 * 4096
    assert bm.extents(10 * 4096, 100) == [(100, True)]
    bm.enabled = False
    bm.mark(5 * 4096, 4096)
    assert bm.count() == 3 * 4096
    bm.set_range(0, 10_000)               # clamped to the bitmap
    assert bm.count() == 11 * 4096
    bm.clear()
    assert bm.count() == 0 and bm.extents(0, bm.size) == [(bm.size, False)]


def test_extents_limit_and_past_the_end():
    """Past its size a bitmap reads clean (an export may serve a smaller node's bitmap)."""
    bm = DirtyBitmap("b", 1 << 20, 65536)
    for i in range(0, 16, 2):
        bm.mark(i * 65536, 1)
    assert bm.extents(0, 1 << 20, limit=3) == [(65536, True), (65536, False), (65536, True)]
    assert bm.extents(100, 65536) == [(65436, True), (100, False)]
    assert bm.extents((1 << 20) - 10, 100) == [(100, False)]
    assert bm.extents(1 << 20, 4096) == [(4096, False)]
    assert bm.extents((14 << 16) + 1, 4 << 16) == [(65535, True), ((3 << 16) + 1, False)]
    assert bm.extents(15 << 16, 2 << 16, limit=1) == [(2 << 16, False)]


def test_runs_cross_whole_bytes():
    bm = DirtyBitmap("b", 1000 * 512, 512)
    bm.set_range(3, 900)
    assert bm.runs(0, bm.nbits) == [(0, 3, False), (3, 900, True), (900, 1000, False)]
    assert bm.next_change(10, 1000, True) == 900
    assert bm.next_change(900, 1000, False) == 1000


@pytest.mark.parametrize("src_gran,dst_gran", [(4096, 65536), (65536, 512), (4096, 4096)])
def test_merge_maps_granules_by_offset(src_gran, dst_gran):
    rng = random.Random(src_gran + dst_gran)
    size = 2 * 1024 * 1024 + 512
    src, dst = DirtyBitmap("s", size, src_gran), DirtyBitmap("d", size, dst_gran)
    expected = Model(size, dst_gran)
    for off, length in _random_writes(rng, size, 15):
        src.mark(off, length)
        # Every byte of a dirty source granule dirties the target.
        start = off // src_gran * src_gran
        expected.mark(start, (off + length - 1) // src_gran * src_gran + src_gran - start)
    for off, length in _random_writes(rng, size, 5):
        dst.mark(off, length)
        expected.mark(off, length)
    dst.merge_from(src)
    assert dst.sha256() == expected.sha256()


def test_resize_follows_qemu():
    # qsd: raw node 1 MiB, bitmaps b (64 KiB) and fb (4 KiB, on the file node), 1 MiB
    # written, then block_resize to 3 MiB, 512 KiB and 2 MiB, hashing after each.
    b, fb = DirtyBitmap("b", 1 << 20, 65536), DirtyBitmap("fb", 1 << 20, 4096)
    for bm in (b, fb):
        bm.mark(0, 1 << 20)
    expected = {
        3 << 20: ("3d73c71ad63f39a8a47bee131c1705f2b8c446a26c36ce5a9b6e6e4162fc9f86",
                  "3501e53bd89143ad7e8ab22e87a648fc0a8c439dbe9b343d1f57a19c6d5aaf85", 1 << 20),
        512 << 10: ("159754eeb1b8e153388279fd7cdf7c3224b6052d1b93d07e03beb4375a3a59f7",
                    "5ac6a5945f16500911219129984ba8b387a06f24fe383ce4e81a73294065461b", 512 << 10),
        2 << 20: ("159754eeb1b8e153388279fd7cdf7c3224b6052d1b93d07e03beb4375a3a59f7",
                  "a59d987f728cf88a9914086132908fd7b8e28c150e05aac22d23bcd8c4767389", 512 << 10),
    }
    for size, (b_sha, fb_sha, count) in expected.items():
        b.resize(size)
        fb.resize(size)
        assert (b.sha256(), fb.sha256(), b.count(), fb.count()) == (b_sha, fb_sha, count, count)


def test_resize_to_a_partial_byte_forgets_cut_bits():
    bm = DirtyBitmap("b", 16 * 512, 512)
    bm.mark(0, bm.size)
    bm.resize(3 * 512)
    bm.resize(16 * 512)
    assert bm.extents(0, bm.size) == [(3 * 512, True), (13 * 512, False)]


def test_empty_bitmap_hashes_as_qemu():
    # qsd, fresh bitmaps: 16 MiB at 64 KiB (4 words), 4 MiB at 64 KiB (1 word),
    # 16 MiB at 4 KiB (64 words).
    assert DirtyBitmap("b", 16 << 20, 65536).sha256() == \
        "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925"
    assert DirtyBitmap("b", 4 << 20, 65536).sha256() == \
        "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
    assert DirtyBitmap("b", 16 << 20, 4096).sha256() == \
        "076a27c79e5ace2a3d47f9dd2e83e4ff6ea8872b3c2218f66c92b89b55f36560"
    # A zero-sized node still has one granule, as in QEMU.
    assert DirtyBitmap("b", 0, 65536).nbits == 1


def test_qcow2_data_layout_round_trip():
    bm = DirtyBitmap("b", 100 * 4096, 4096)
    bm.mark(0, 1)
    bm.mark(9 * 4096, 1)
    data = bm.to_bytes()
    assert len(data) == 13 and data[:2] == b"\x01\x02" and data[2:] == bytes(11)
    copy = DirtyBitmap("c", 100 * 4096, 4096)
    copy.load_bytes(data[:1])
    copy.load_bytes(data[1:], at=1)
    assert copy.to_bytes() == data
    # Padding bits of a stored last byte never become dirty granules.
    copy.load_bytes(b"\xff", at=12)
    assert copy.count() == (2 + 4) * 4096


def test_checks_in_qemu_order():
    bm = DirtyBitmap("b", 1 << 20, 65536)
    bm.busy = bm.readonly = bm.inconsistent = True
    with pytest.raises(QMPError, match="currently in use by another operation"):
        bm.check_usable(readonly=False, inconsistent=False)
    bm.busy = False
    with pytest.raises(QMPError, match="'b' is readonly and cannot be modified"):
        bm.check_usable()
    with pytest.raises(QMPError, match="'b' is inconsistent and cannot be used"):
        bm.check_usable(readonly=False)
    bm.check_usable(readonly=False, inconsistent=False)


def test_info_members():
    bm = DirtyBitmap("b", 1 << 20, 65536, persistent=True, enabled=False)
    bm.mark(0, 1)
    assert bm.info() == {"name": "b", "count": 0, "granularity": 65536, "recording": False,
                         "busy": False, "persistent": True}
    bm.inconsistent = True
    assert list(bm.info()) == ["name", "count", "granularity", "recording", "busy",
                               "persistent", "inconsistent"]


def test_large_bitmaps_stay_fast():
    # 1 TiB at 64 KiB granularity: 16 Mi bits, 2 MiB of bytes.
    bm = DirtyBitmap("b", 1 << 40, 65536)
    start = time.perf_counter()
    for i in range(20000):
        bm.mark(i * 800 * 65536, 4096)
    bm.mark((1 << 40) - (1 << 30), 1 << 30)
    assert len(bm.extents(0, 1 << 40)) == 2 * 20000 + 1
    window = bm.extents(1 << 38, 1 << 32)
    assert sum(n for n, _ in window) == 1 << 32 and len(window) == 2 * 82 + 1
    other = DirtyBitmap("o", 1 << 40, 1 << 20)
    other.merge_from(bm)
    assert other.count() > 0 and bm.count() == (20000 + 16384) * 65536
    assert time.perf_counter() - start < 5
