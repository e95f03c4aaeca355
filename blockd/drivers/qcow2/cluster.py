"""Guest-to-host cluster mapping: the L1 table, L2 tables and their entries.

An L1 entry points to an L2 table; an L2 entry describes one guest
cluster: unallocated (read from backing), zero, normal data at a host
offset, or compressed data.  With extended L2 entries each entry also
carries a 64-bit bitmap: bits 0-31 say which of the 32 subclusters are
allocated, bits 32-63 which read as zeroes.

Bit 63 (``COPIED``) says the refcount is exactly one, so the cluster may
be written in place; without it (shared with a snapshot) a write must
copy first.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import struct
from typing import TYPE_CHECKING

from blockd.drivers.qcow2 import overlap
from blockd.drivers.qcow2.cache import CacheConfig, MetadataCache
from blockd.drivers.qcow2.header import MAX_L1_SIZE
from blockd.errors import TooLarge

#: QEMU's limit on L1 tables (32 MiB).
MAX_L1_ENTRIES = MAX_L1_SIZE // 8

if TYPE_CHECKING:
    from blockd.drivers.qcow2.image import Image

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
SUBCLUSTERS = 32
#: Changed L2 entries kept for the next flush before they are written anyway.
PENDING_MAX = 1024
#: Unchanged bytes of an L2 slice rewritten rather than split a flush write.
_MERGE_GAP = 4096
ALL_ALLOC = (1 << 32) - 1
ALL_ZERO = ALL_ALLOC << 32


class Kind(enum.Enum):
    UNALLOCATED = "unallocated"
    ZERO_PLAIN = "zero-plain"
    ZERO_ALLOC = "zero-alloc"
    NORMAL = "normal"
    COMPRESSED = "compressed"


@dataclasses.dataclass(slots=True)
class Entry:
    """One decoded L2 entry (and its subcluster bitmap with extended L2)."""

    raw: int
    bitmap: int = 0
    #: Read from an image with an external data file, where host offset 0 is valid
    #: data when ``COPIED`` says so.
    external: bool = dataclasses.field(default=False, compare=False)

    def kind(self, cluster_bits: int) -> Kind:
        if self.raw & COMPRESSED:
            return Kind.COMPRESSED
        host = self.raw & OFFSET_MASK
        if self.raw & ZERO:
            return Kind.ZERO_ALLOC if host else Kind.ZERO_PLAIN
        if host or (self.external and self.raw & COPIED):
            return Kind.NORMAL
        return Kind.UNALLOCATED

    @property
    def host(self) -> int:
        return self.raw & OFFSET_MASK

    @property
    def copied(self) -> bool:
        return bool(self.raw & COPIED)

    def compressed_span(self, cluster_bits: int) -> tuple[int, int]:
        """Host offset and byte length of compressed data."""
        x = 62 - (cluster_bits - 8)
        offset = self.raw & ((1 << x) - 1)
        sectors = (self.raw >> x) & ((1 << (cluster_bits - 8)) - 1)
        return offset, (sectors + 1) * 512 - (offset & 511)


def c_hex(n: int) -> str:
    """``n`` as C's ``%#x`` prints it: zero has no ``0x``."""
    return f"{n:#x}" if n else "0"


def compressed_entry(offset: int, length: int, cluster_bits: int) -> int:
    x = 62 - (cluster_bits - 8)
    sectors = (offset + length - 1) // 512 - offset // 512
    return COMPRESSED | (sectors << x) | offset


class L2Cache(MetadataCache):
    """L2 table slices keyed by their host offset."""

    def __init__(self, capacity: int, slice_size: int, cluster_size: int) -> None:
        super().__init__(capacity)
        self.slice_size = slice_size
        self.cluster_size = cluster_size

    def drop(self, key: int) -> None:
        """Forget every slice of the table at ``key`` (freed or rewritten behind our back)."""
        if self.slice_size == self.cluster_size:
            super().drop(key)
        else:
            self.drop_where(lambda k: key <= k < key + self.cluster_size)


def continuing(entries: tuple[int, ...], start: int, first: int, cs: int) -> int:
    """How many of ``entries`` from index ``start`` on continue the run whose previous
    entry is ``first`` (standard L2 entries): the same unallocated or plain zero
    entry, or normal entries at the following host clusters (the COPIED flag may
    differ)."""
    j = start
    if first in (0, ZERO):
        while j < len(entries) and entries[j] == first:
            j += 1
    else:
        want = (first & ~COPIED) + cs
        while j < len(entries) and entries[j] & ~COPIED == want:
            j += 1
            want += cs
    return j - start


class Mapping:
    """L1 in memory, L2 through the cache; entries written through to the file."""

    def __init__(self, image: "Image", config: CacheConfig) -> None:
        self.image = image
        self.cb = image.header.cluster_bits
        self.cs = image.cluster_size
        self.ext = image.header.extended_l2
        self.entry_size = 16 if self.ext else 8
        self.l2_entries = self.cs // self.entry_size
        self.l1: list[int] = []
        self.slice_size = config.l2_entry_size
        self.cache = L2Cache(config.l2_entries, config.l2_entry_size, self.cs)
        #: Changed entries not written yet, by file offset (see :meth:`set`).
        self.pending: dict[int, bytes] = {}
        #: Slices holding pending entries, kept out of the cache's reach until written.
        self.pinned: dict[int, bytearray] = {}

    async def load(self) -> None:
        h = self.image.header
        if h.l1_size:
            raw = await self.image.file.read(h.l1_table_offset, h.l1_size * 8)
            self.l1 = list(struct.unpack(f">{h.l1_size}Q", raw))
        self.image.metadata.track_active_l2(self.l1)

    def index(self, guest: int) -> tuple[int, int]:
        cluster = guest >> self.cb
        return cluster // self.l2_entries, cluster % self.l2_entries

    async def _slice(self, l2_offset: int, pos: int) -> tuple[bytearray, int]:
        """The cached slice holding byte ``pos`` of the table, and ``pos`` within it."""
        start = pos - pos % self.slice_size
        key = l2_offset + start
        piece = self.pinned.get(key) or self.cache.get(key)
        if piece is None:
            piece = await self._load_slice(key)
        return piece, pos - start

    async def _load_slice(self, key: int) -> bytearray:
        self.image.debug_event("l2_load")
        piece = bytearray(await self.image.file.read(key, self.slice_size))
        self.cache.put(key, piece)
        return piece

    async def lookup(self, guest: int, write_at: int = -1) -> Entry:
        """The entry for ``guest``; corrupt entries stop the image (EIO) instead of being used.

        ``write_at`` is the guest offset of a write that will use the entry
        (QEMU words the report differently for writes).
        """
        l1i, l2i = self.index(guest)
        if l1i >= len(self.l1):
            return Entry(0)
        l2_offset = self.l1[l1i] & L1_OFFSET_MASK
        if not l2_offset:
            return Entry(0)
        if l2_offset % self.cs:
            await self._corrupt(-1, f"L2 table offset {c_hex(l2_offset)} unaligned "
                                    f"(L1 index: {c_hex(l1i)})")
        # :meth:`_slice`, with no coroutine of its own when cached: every request looks up.
        pos = l2i * self.entry_size
        key = l2_offset + pos - pos % self.slice_size
        pos -= key - l2_offset
        piece = self.pinned.get(key) or self.cache.get(key)
        if piece is None:
            piece = await self._load_slice(key)
        external = self.image.external_data
        if self.ext:
            raw, bitmap = struct.unpack_from(">QQ", piece, pos)
            entry = Entry(raw, bitmap, external)
        else:
            entry = Entry(struct.unpack_from(">Q", piece, pos)[0], 0, external)
        if not entry.raw & COMPRESSED:
            if entry.raw & OFFSET_MASK & (self.cs - 1):
                if write_at >= 0:
                    await self._corrupt(-1, f"Data cluster offset {c_hex(entry.host)} unaligned "
                                            f"(guest offset: {c_hex(write_at)})")
                await self._corrupt(-1, f"Cluster allocation offset {c_hex(entry.host)} "
                                        f"unaligned (L2 offset: {c_hex(l2_offset)}, "
                                        f"L2 index: {c_hex(l2i)})")
            if self.ext and (entry.bitmap >> 32 & entry.bitmap
                             if entry.kind(self.cb) == Kind.NORMAL
                             else entry.bitmap & ALL_ALLOC):
                await self._corrupt(-1, f"Invalid cluster entry found (L2 offset: "
                                        f"{c_hex(l2_offset)}, L2 index: {c_hex(l2i)})")
        return entry

    async def slice_entries(self, guest: int, limit: int) -> tuple[int, ...] | None:
        """The raw standard entries from ``guest``'s on, at most ``limit``, to the end of
        its table slice (all zero to the end of the table where it has none); None
        for a table at an unaligned offset (left to :meth:`lookup` to report)."""
        l1i, l2i = self.index(guest)
        l2_offset = self.l1[l1i] & L1_OFFSET_MASK if l1i < len(self.l1) else 0
        if not l2_offset:
            return (0,) * min(limit, self.l2_entries - l2i)
        if l2_offset % self.cs:
            return None
        piece, pos = await self._slice(l2_offset, l2i * 8)
        count = min(limit, (len(piece) - pos) // 8, self.l2_entries - l2i)
        return struct.unpack_from(f">{count}Q", piece, pos)

    def left_in_slice(self, guest: int) -> int:
        """Entries from ``guest``'s to the end of its L2 table slice."""
        per_slice = self.slice_size // self.entry_size
        return per_slice - (guest >> self.cb) % per_slice

    async def run_after(self, guest: int, first: int, limit: int) -> int:
        """How many clusters from ``guest`` on (at most ``limit``) continue the run whose
        previous entry is ``first``: unallocated entries within the L2 table (counted by
        :meth:`unallocated_run`), plain zero entries within one table slice, or normal
        ones at the following host clusters within one slice (the COPIED flag may
        differ).  Standard L2 entries only.

        One unpack per slice instead of a lookup per cluster: block status of a large
        image asks this for every run.  Entries that do not continue the run, and
        tables at unaligned offsets, are left for :meth:`lookup` and its corruption
        checks.
        """
        # An unallocated run is counted by unallocated_run, across slices: one entry
        # is enough here to learn whether the table is aligned.
        entries = await self.slice_entries(guest, 1 if first == 0 else limit)
        if entries is None:
            return 0
        if first == 0:
            return await self.unallocated_run(guest, limit)
        return continuing(entries, 0, first, self.cs)

    async def _corrupt(self, offset: int, msg: str) -> None:
        await self.image.signal_corruption(True, offset, -1, msg)
        raise OSError(5, "Input/output error")

    async def set(self, guest: int, entry: Entry) -> None:
        """Change an L2 entry, creating or un-sharing the L2 table first if needed.

        The entry changes in memory at once and reaches the file at the next
        :meth:`write_pending` (a flush): with eager refcounts the counts it
        relies on are synced first, so the file never holds an entry whose
        cluster is not counted, even after a power loss.
        """
        l1i, l2i = self.index(guest)
        l2_offset = await self._writable_table(l1i)
        pos = l2i * self.entry_size
        piece, in_slice = await self._slice(l2_offset, pos)
        if self.ext:
            data = struct.pack(">QQ", entry.raw, entry.bitmap)
        else:
            data = struct.pack(">Q", entry.raw)
        piece[in_slice:in_slice + len(data)] = data
        self.pinned[l2_offset + pos - in_slice] = piece
        self.pending[l2_offset + pos] = data
        if len(self.pending) >= PENDING_MAX:
            await self.write_pending()

    async def write_pending(self) -> None:
        """Store changed L2 entries, then apply the frees that waited for them.

        Eager refcounts: the counts of new clusters (written here if
        allocation held them back) are synced before the entries that use
        them are written, and the entries are synced before
        the counts of clusters they stopped using drop: QEMU's cache
        dependencies.  Lazy refcounts need neither sync.
        """
        rc = self.image.refcounts
        file = self.image.file
        if rc.held:
            await rc.write_held()  # the counts of the new clusters the entries use
        if self.pending:
            if not rc.lazy:
                await file.flush()
            # Entries near each other in one table slice go in one write, the
            # unchanged ones between them rewritten from the slice (equal to the
            # file): a sparse copy changes every few entries, and a write each
            # was a large share of a convert's time.
            keys = sorted(self.pinned)
            offsets = sorted(self.pending)
            i = 0
            while i < len(offsets):
                key = keys[bisect.bisect_right(keys, offsets[i]) - 1]
                piece = self.pinned[key]
                j = i + 1
                while j < len(offsets) and offsets[j] < key + len(piece) \
                        and offsets[j] - offsets[j - 1] <= _MERGE_GAP:
                    j += 1
                lo, hi = offsets[i], offsets[j - 1] + len(self.pending[offsets[j - 1]])
                self.image.debug_event("l2_update")
                await self.image.write_meta(lo, bytes(piece[lo - key:hi - key]),
                                            overlap.ACTIVE_L2)
                for off in offsets[i:j]:
                    del self.pending[off]
                i = j
            for key, piece in self.pinned.items():
                self.cache.put(key, piece)
            self.pinned.clear()
        if rc.deferred_frees:
            if not rc.lazy:
                await file.flush()
            await rc.apply_deferred_frees()

    async def unallocated_run(self, guest: int, limit: int) -> int:
        """How many clusters from ``guest`` on (at most ``limit``, within its L2 table) have
        all-zero standard entries: scanned a slice at a time, not entry by entry."""
        l1i, l2i = self.index(guest)
        limit = min(limit, self.l2_entries - l2i)
        l2_offset = self.l1[l1i] & L1_OFFSET_MASK if l1i < len(self.l1) else 0
        if not l2_offset:
            return limit
        n = 0
        while n < limit:
            piece, pos = await self._slice(l2_offset, (l2i + n) * 8)
            seg = bytes(piece[pos:min(len(piece), pos + (limit - n) * 8)])
            zero = (len(seg) - len(seg.lstrip(b"\0"))) // 8
            n += zero
            if zero < len(seg) // 8:
                break
        return n

    async def set_run(self, guest: int, raws: list[int]) -> None:
        """Change consecutive standard L2 entries from ``guest`` on, as :meth:`set` does.

        The caller keeps the run inside one L2 table, made writable by :meth:`prepare`.
        """
        l1i, l2i = self.index(guest)
        l2_offset = await self._writable_table(l1i)
        done = 0
        while done < len(raws):
            pos = (l2i + done) * 8
            piece, in_slice = await self._slice(l2_offset, pos)
            n = min(len(raws) - done, (len(piece) - in_slice) // 8)
            for k in range(n):
                data = struct.pack(">Q", raws[done + k])
                piece[in_slice + 8 * k:in_slice + 8 * k + 8] = data
                self.pending[l2_offset + pos + 8 * k] = data
            self.pinned[l2_offset + pos - in_slice] = piece
            done += n
        if len(self.pending) >= PENDING_MAX:
            await self.write_pending()

    async def prepare(self, guest: int) -> None:
        """Make the L2 table for ``guest`` private and present before data is allocated.

        QEMU allocates the table first, so a run of new data clusters stays
        contiguous instead of being split by a table placed among them.
        """
        await self._writable_table(self.index(guest)[0])

    async def _writable_table(self, l1i: int) -> int:
        if l1i >= len(self.l1):
            await self.grow_l1(l1i + 1)
        entry = self.l1[l1i]
        l2_offset = entry & L1_OFFSET_MASK
        if l2_offset and entry & COPIED:
            return l2_offset
        # A new table, or a private copy of one shared with a snapshot.
        if l2_offset:
            # Tables are written through, so the file has the current content.
            self.image.debug_event("l2_alloc_cow_read")
            old = bytes(await self.image.file.read(l2_offset, self.cs))
        else:
            old = bytes(self.cs)
        rc = self.image.refcounts
        new_offset = await rc.alloc(1)
        if rc.dirty:
            # Like QEMU, counts deferred so far (the new table's included) are stored
            # before a table is linked: a new table is never counted lazily.
            await rc.write_dirty()
            await self.image.file.flush()
        self.image.debug_event("l2_alloc_write")
        try:
            await self.image.write_meta(new_offset, old, overlap.ACTIVE_L2)
            await self.set_l1(l1i, new_offset | COPIED)
        except OSError:
            # Not linked: give the cluster back so a failed write leaks nothing.
            await self.image.refcounts.free(new_offset)
            raise
        # The table is known: cache it rather than reading it back on first use.
        for start in range(0, self.cs, self.slice_size):
            self.cache.put(new_offset + start, bytearray(old[start:start + self.slice_size]))
        if l2_offset:
            self.cache.drop(l2_offset)
            await self.image.refcounts.free(l2_offset)
        return new_offset

    async def set_l1(self, l1i: int, value: int) -> None:
        self.image.debug_event("l1_update")
        await self.image.write_meta(self.image.header.l1_table_offset + l1i * 8,
                                    struct.pack(">Q", value), overlap.ACTIVE_L1)
        self.image.metadata.remove(self.l1[l1i] & L1_OFFSET_MASK, overlap.ACTIVE_L2)
        self.image.metadata.add(value & L1_OFFSET_MASK, overlap.ACTIVE_L2)
        self.l1[l1i] = value

    async def grow_l1(self, min_size: int) -> None:
        """Move the L1 table to a bigger place (QEMU grows by half again)."""
        if min_size > MAX_L1_ENTRIES:  # before anything is allocated for it
            raise TooLarge("Failed to grow the L1 table: File too large")
        h = self.image.header
        new_size = max(min_size, (len(self.l1) * 3 + 1) // 2) if len(self.l1) else min_size
        new_size = min(max(new_size, min_size), MAX_L1_ENTRIES)
        self.image.debug_event("l1_grow_alloc_table")
        clusters = -(-(new_size * 8) // self.cs)
        new_offset = await self.image.refcounts.alloc(clusters)
        table = self.l1 + [0] * (new_size - len(self.l1))
        self.image.debug_event("l1_grow_write_table")
        await self.image.write_meta(new_offset, struct.pack(f">{new_size}Q", *table), 0)
        await self.image.file.flush()
        old_offset, old_size = h.l1_table_offset, h.l1_size
        self.image.debug_event("l1_grow_activate_table")
        await self.image.file.write(36, struct.pack(">IQ", new_size, new_offset))
        h.l1_size, h.l1_table_offset = new_size, new_offset
        self.l1 = table
        if old_size:
            await self.image.refcounts.free(old_offset, -(-(old_size * 8) // self.cs))
