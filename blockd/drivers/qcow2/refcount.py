"""Refcounts: the table, the blocks, and cluster allocation.

Every host cluster has a reference count; zero means free.  Counts live
in refcount blocks of ``cluster_size * 8 / refcount_bits`` entries whose
offsets are listed in the refcount table.  Widths below 8 bits pack
entries least significant bit first within a byte; wider ones are
big-endian integers.

Ordering for crash safety: a new refcount block is written before the
table entry that points to it, and a cluster's count is raised before
any L2 entry uses it, so a crash can leak a cluster but never leave one
in use with a zero count.

With lazy refcounts, changed counts stay in memory (the blocks are
pinned, not cached) and reach the file only when the image is closed or
goes read-only; the image's dirty bit, set before the first deferred
change, tells the next read-write open to rebuild them.  An allocating
write then costs no refcount block write at all.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Sequence

from blockd.drivers.qcow2 import overlap
from blockd.drivers.qcow2.cache import MetadataCache
from blockd.drivers.qcow2.cluster import c_hex

if TYPE_CHECKING:
    from blockd.drivers.qcow2.image import Image


def get_entry(block: bytes | bytearray | memoryview, index: int, order: int) -> int:
    if order < 3:
        bits = 1 << order
        per_byte = 8 // bits
        return (block[index // per_byte] >> (bits * (index % per_byte))) & ((1 << bits) - 1)
    width = 1 << (order - 3)
    return int.from_bytes(block[index * width:(index + 1) * width], "big")


def set_entry(block: bytearray, index: int, order: int, value: int) -> tuple[int, int]:
    """Store a count; returns the changed byte range ``(start, end)`` for a partial write."""
    if order < 3:
        bits = 1 << order
        per_byte = 8 // bits
        pos, shift = index // per_byte, bits * (index % per_byte)
        mask = ((1 << bits) - 1) << shift
        block[pos] = (block[pos] & ~mask) | (value << shift)
        return pos, pos + 1
    width = 1 << (order - 3)
    block[index * width:(index + 1) * width] = value.to_bytes(width, "big")
    return index * width, (index + 1) * width


def encode_block(counts: Sequence[int], order: int, cluster_size: int) -> bytes:
    """A refcount block holding ``counts`` (zero past their end): the inverse of ``_decode``."""
    e = cluster_size * 8 >> order
    values = list(counts[:e]) + [0] * (e - len(counts[:e]))
    fmt = {3: "B", 4: "H", 5: "I", 6: "Q"}.get(order)
    if fmt is not None:
        return struct.pack(f">{e}{fmt}", *values)
    block = bytearray(cluster_size)
    for i, value in enumerate(values):
        if value:
            set_entry(block, i, order, value)
    return bytes(block)


class Refcounts:
    """The image's refcount structure, cached in memory and written through."""

    def __init__(self, image: "Image", cache_blocks: int) -> None:
        self.image = image
        self.order = image.header.refcount_order
        self.max_value = (1 << (1 << self.order)) - 1
        self.cluster_size = image.cluster_size
        self.entries = self.cluster_size * 8 // (1 << self.order)
        self.table: list[int] = []
        #: Refcount blocks by index in the table (written through, so evicting is free).
        self.blocks = MetadataCache(cache_blocks)
        #: No cluster below this index is free (a search starts here).
        self.free_hint = 0
        #: One past the highest cluster handed out (it may not be written yet).
        self.alloc_end = 0
        #: Index of the last non-empty table entry (-1: none): walks of the blocks stop here.
        self.last_used = -1
        #: Defer count changes (lazy refcounts); set once the image is open read-write.
        self.lazy = False
        #: Blocks changed in memory only (lazy refcounts), by table index.
        self.dirty: dict[int, bytearray] = {}
        #: (offset, clusters, discard) freed by L2 changes not yet written (see
        #: ``Mapping.write_pending``): the clusters stay in use until then.
        self.deferred_frees: list[tuple[int, int, bool]] = []
        #: Raised counts of new data clusters held back (eager refcounts): block index ->
        #: (block, first changed byte, end).  See :meth:`alloc`.
        self.held: dict[int, tuple[bytearray, int, int]] = {}

    async def load(self) -> None:
        h = self.image.header
        raw = await self.image.file.read(h.refcount_table_offset,
                                         h.refcount_table_clusters * self.cluster_size)
        n = len(raw) // 8
        self.table = list(struct.unpack(f">{n}Q", raw))
        self.alloc_end = -(-self.image.file.length() // self.cluster_size)
        self.last_used = max((i for i, e in enumerate(self.table) if e), default=-1)
        for entry in self.table[:self.last_used + 1]:
            self.image.metadata.add(entry & ~0x1FF & ((1 << 63) - 1), overlap.REFCOUNT_BLOCK)

    async def adopt(self, table_offset: int, table_clusters: int) -> None:
        """Switch to a refcount structure written from scratch (check's rebuild); the
        caller has already pointed the header in the file at the new table."""
        for entry in self.table[:self.last_used + 1]:
            self.image.metadata.remove(entry & ~0x1FF & ((1 << 63) - 1), overlap.REFCOUNT_BLOCK)
        self.blocks.clear()
        self.dirty.clear()
        self.held.clear()
        self.image.header.refcount_table_offset = table_offset
        self.image.header.refcount_table_clusters = table_clusters
        await self.load()
        self.free_hint = 0

    def _set_table(self, index: int, offset: int) -> None:
        """Record a table entry in memory (the caller writes it) and in the metadata map."""
        self.image.metadata.remove(self.table[index] & ~0x1FF & ((1 << 63) - 1),
                                   overlap.REFCOUNT_BLOCK)
        self.table[index] = offset
        self.image.metadata.add(offset, overlap.REFCOUNT_BLOCK)
        if offset and index > self.last_used:
            self.last_used = index
        while self.last_used >= 0 and not self.table[self.last_used]:
            self.last_used -= 1

    async def _block(self, block_index: int) -> bytearray | None:

        if block_index >= len(self.table):
            return None
        offset = self.table[block_index] & ~0x1FF & ((1 << 63) - 1)
        if offset == 0:
            return None
        if offset % self.cluster_size:
            # Fatal only where the image can be written, as in QEMU.
            await self.image.signal_corruption(
                not self.image.file.child.read_only, -1, -1,
                f"Refblock offset {offset:#x} unaligned (reftable index: {c_hex(block_index)})")
            raise OSError(5, "Input/output error")
        block = self.dirty.get(block_index) or self.blocks.get(block_index)
        if block is None and block_index in self.held:
            block = self.held[block_index][0]  # evicted from the cache, not written yet
            self.blocks.put(block_index, block)
        if block is None:
            self.image.debug_event("refblock_load")
            block = bytearray(await self.image.file.read(offset, self.cluster_size))
            self.blocks.put(block_index, block)
        return block

    async def _defer(self, block_index: int, block: bytearray) -> None:
        """Lazy refcounts: ``block`` is about to change in memory only.

        The image is marked dirty before its first deferred change, so a
        crash leaves an image that is known to need a repair.
        """
        if not self.dirty:
            await self.image.mark_dirty()
        self.dirty[block_index] = block

    async def get(self, cluster_index: int) -> int:
        block = await self._block(cluster_index // self.entries)
        if block is None:
            return 0
        return get_entry(block, cluster_index % self.entries, self.order)

    async def counts(self, nb: int) -> list[int]:
        """The stored counts of clusters ``0..nb-1``, decoded a block at a time."""
        out: list[int] = []
        for bi in range(-(-nb // self.entries)):
            out += await self.block_counts(bi)
        del out[nb:]
        return out

    async def block_counts(self, block_index: int) -> Sequence[int]:
        """Every stored count in one refcount block's range, decoded at once (for check)."""
        return self._decode(await self._block(block_index))

    async def count_used(self, nb: int, above: int) -> int:
        """How many of clusters ``0..nb-1`` have a nonzero count, a block at a time;
        counting may stop once the number exceeds ``above``."""
        used = 0
        e = self.entries
        for bi in range(-(-nb // e)):
            counts = self._decode(await self._block(bi))
            if bi == (nb - 1) // e:
                counts = counts[:nb - bi * e]
            used += len(counts) - counts.count(0)
            if used > above:
                break
        return used

    def _decode(self, block: bytearray | None) -> Sequence[int]:
        """Every count in a refcount block (an absent block counts zero throughout)."""
        order, e = self.order, self.entries
        if block is None:
            return [0] * e
        fmt = {3: "B", 4: "H", 5: "I", 6: "Q"}.get(order)
        if fmt is not None:
            return struct.unpack(f">{e}{fmt}", block)
        bits = 1 << order
        mask = (1 << bits) - 1
        shifts = range(0, 8, bits)
        return [(byte >> sh) & mask for byte in block for sh in shifts]

    async def update(self, cluster_index: int, delta: int) -> int:
        """Change one count; the block is written at once (write-through)."""
        bi = cluster_index // self.entries
        block = await self._block(bi)
        if block is None:
            # alloc() creates blocks before counting; reaching here means the
            # caller counted a cluster nothing allocated.
            self.image.mark_corrupt(f"cluster {cluster_index} has no refcount block")
            raise OSError(5, "Input/output error")
        idx = cluster_index % self.entries
        value = get_entry(block, idx, self.order) + delta
        if value < 0:
            self.image.mark_corrupt(f"Refcount of cluster {cluster_index} went negative")
            raise OSError(5, "Input/output error")
        if value > self.max_value:
            raise OSError(27, f"Refcount overflow for cluster {cluster_index}")
        if self.lazy:
            await self._defer(bi, block)
            set_entry(block, idx, self.order, value)
            if value == 0 and cluster_index < self.free_hint:
                self.free_hint = cluster_index
            return value
        start, end = set_entry(block, idx, self.order, value)
        try:
            await self._store(bi, block, start, end)
        except OSError:
            # Memory must say what the file says: a count we failed to store is undone.
            set_entry(block, idx, self.order, value - delta)
            raise
        if value == 0 and cluster_index < self.free_hint:
            self.free_hint = cluster_index
        return value

    async def _new_block(self, block_index: int, pos: int) -> None:
        """Create a refcount block for ``block_index`` in the free cluster ``pos``.

        Blocks go to the first free cluster, as in QEMU, so that blocks made
        for a long run pile up in front of it instead of splitting it.  A
        block inside its own range counts itself; elsewhere it is counted
        (first) by the block of the range it sits in.
        """
        if block_index >= len(self.table):
            # Growing places new blocks and the table after everything; the
            # caller searches again afterwards.
            await self._grow_table(block_index + 1)
            return
        start = block_index * self.entries
        block = bytearray(self.cluster_size)
        counted_elsewhere = not start <= pos < start + self.entries
        if not counted_elsewhere:
            set_entry(block, pos - start, self.order, 1)
        else:
            host_block = pos // self.entries
            if host_block >= len(self.table) or self.table[host_block] == 0:
                await self._new_block(host_block, pos)
                return  # the caller retries; this block will go elsewhere
            await self.update(pos, 1)
        self.image.debug_event("refblock_alloc")
        offset = pos * self.cluster_size
        try:
            self.image.debug_event("refblock_alloc_write")
            await self.image.write_meta(offset, bytes(block), overlap.REFCOUNT_BLOCK)
            self.blocks.put(block_index, block)
            self.image.debug_event("refblock_alloc_hookup")
            await self.image.write_meta(self.image.header.refcount_table_offset + block_index * 8,
                                        struct.pack(">Q", offset), overlap.REFCOUNT_TABLE)
        except OSError:
            # The block was never hooked up: its cluster goes back rather than leak.
            self.blocks.drop(block_index)
            if counted_elsewhere:
                await self.update(pos, -1)
            raise
        self._set_table(block_index, offset)
        self.alloc_end = max(self.alloc_end, pos + 1)
        self.free_hint = max(self.free_hint, pos + 1) if self.free_hint == pos else self.free_hint

    async def _grow_table(self, min_blocks: int) -> None:
        """A bigger table placed after everything, with new blocks covering it."""
        cs, e = self.cluster_size, self.entries
        start = max(self.alloc_end, -(-self.image.file.length() // cs))
        new_blocks, table_clusters = 0, 0
        while True:
            end = start + new_blocks + table_clusters
            covering = range(start // e, (end - 1) // e + 1) if end > start else range(0)
            missing = [b for b in covering if b >= len(self.table) or self.table[b] == 0]
            total_blocks = max(min_blocks, (end - 1) // e + 1 if end else 0, len(self.table))
            need_table = -(-(total_blocks * 8) // cs)
            if len(missing) == new_blocks and need_table == table_clusters:
                break
            new_blocks, table_clusters = len(missing), need_table
        table = self.table + [0] * (table_clusters * cs // 8 - len(self.table))
        blocks: dict[int, bytearray] = {}
        for i, b in enumerate(missing):
            blocks[b] = bytearray(cs)
            table[b] = (start + i) * cs
        # Every new cluster (blocks and table) gets its count in the new or existing blocks.
        updates_existing = []
        for c in range(start, start + new_blocks + table_clusters):
            b = c // e
            if b in blocks:
                set_entry(blocks[b], c % e, self.order, 1)
            else:
                updates_existing.append(c)
        self.image.debug_event("refblock_alloc_switch_table")
        for b, block in blocks.items():
            await self.image.write_meta(table[b], bytes(block), overlap.REFCOUNT_BLOCK)
        table_offset = (start + new_blocks) * cs
        self.image.debug_event("refblock_alloc_write_table")
        await self.image.write_meta(table_offset, struct.pack(f">{len(table)}Q", *table), 0)
        old_offset, old_clusters = (self.image.header.refcount_table_offset,
                                    self.image.header.refcount_table_clusters)
        self.table = table
        for b, block in blocks.items():
            self.blocks.put(b, block)
            self.image.metadata.add(table[b], overlap.REFCOUNT_BLOCK)
            self.last_used = max(self.last_used, b)
        self.alloc_end = start + new_blocks + table_clusters
        for c in updates_existing:
            await self.update(c, 1)
        await self.image.file.flush()
        self.image.header.refcount_table_offset = table_offset
        self.image.header.refcount_table_clusters = table_clusters
        await self.image.file.write(48, struct.pack(">QI", table_offset, table_clusters))
        for i in range(old_clusters):
            await self.update(old_offset // cs + i, -1)

    async def alloc(self, count: int, hold: bool = False) -> int:
        """Allocate ``count`` contiguous free clusters; returns the host offset.

        ``hold``: only L2 entries waiting in memory will point at the clusters
        (guest data), so their raised counts may wait in memory too, and
        ``Mapping.write_pending`` writes them before those entries: an
        allocating write then costs no refcount write of its own.
        """
        self.image.debug_event("cluster_alloc")
        while True:
            start = await self._find_free(count)
            # Make sure every block that will count the run exists first:
            # creating one takes a cluster, which may be inside the run.
            created = False
            for bi in range(start // self.entries, (start + count - 1) // self.entries + 1):
                if bi >= len(self.table) or self.table[bi] == 0:
                    await self._new_block(bi, start)
                    created = True
                    break
            if not created:
                break
        await self._raise_run(start, count, hold)
        self.alloc_end = max(self.alloc_end, start + count)
        self.free_hint = start + count
        return start * self.cluster_size

    async def _raise_run(self, first: int, count: int, hold: bool = False) -> None:
        """Count one more reference to each cluster of a run: one write per refcount block
        (none when ``hold``: see :meth:`alloc`).

        Only fresh runs come here (every count 0 before), so no count can overflow.
        """
        c, end = first, first + count
        while c < end:
            bi = c // self.entries
            stop = min(end, (bi + 1) * self.entries)
            block = await self._block(bi)
            if block is None:
                self.image.mark_corrupt(f"cluster {c} has no refcount block")
                raise OSError(5, "Input/output error")
            indexes = range(c - bi * self.entries, stop - bi * self.entries)
            if self.lazy:
                await self._defer(bi, block)
                self._shift_counts(block, indexes, 1)
                c = stop
                continue
            lo, hi = self._shift_counts(block, indexes, 1)
            if hold:
                held = self.held.get(bi)
                if held is not None:
                    lo, hi = min(lo, held[1]), max(hi, held[2])
                self.held[bi] = (block, lo, hi)
                c = stop
                continue
            try:
                await self._store(bi, block, lo, hi)
            except OSError:
                # Memory must say what the file says (earlier blocks of the run leak).
                self._shift_counts(block, indexes, -1)
                raise
            c = stop

    def _shift_counts(self, block: bytearray, indexes: range, delta: int) -> tuple[int, int]:
        """Add ``delta`` to consecutive entries of a block; returns the changed byte range."""
        code = {3: "B", 4: "H", 5: "I", 6: "Q"}.get(self.order)
        if code is None:  # sub-byte widths: entry by entry
            lo = hi = 0
            for idx in indexes:
                a, hi = set_entry(block, idx, self.order, get_entry(block, idx, self.order) + delta)
                lo = a if idx == indexes[0] else lo
            return lo, hi
        width = 1 << (self.order - 3)
        fmt = f">{len(indexes)}{code}"
        lo = indexes[0] * width
        values = struct.unpack_from(fmt, block, lo)
        struct.pack_into(fmt, block, lo, *[v + delta for v in values])
        return lo, lo + len(indexes) * width

    async def _find_free(self, count: int) -> int:
        c = self.free_hint
        run_start, run = c, 0
        while run < count:
            if c >= self.alloc_end or await self.get(c) == 0:
                if run == 0:
                    run_start = c
                run += 1
            else:
                run = 0
            c += 1
        return run_start

    async def drop_unused_blocks(self) -> None:
        """Remove refcount blocks that count nothing but themselves (after a shrink).

        The table entry is cleared before the block's own cluster is freed,
        so a crash in between leaks the block at worst.
        """
        h = self.image.header
        for bi, entry in enumerate(self.table):
            offset = entry & ~0x1FF & ((1 << 63) - 1)
            if not offset:
                continue
            block = await self._block(bi)
            assert block is not None  # its table entry is set
            own = offset // self.cluster_size
            inside = bi * self.entries <= own < (bi + 1) * self.entries
            probe = bytearray(block)
            if inside:
                set_entry(probe, own - bi * self.entries, self.order, 0)
            if probe.count(0) != len(probe):
                continue
            self.blocks.drop(bi)
            self.dirty.pop(bi, None)
            await self.image.write_meta(h.refcount_table_offset + bi * 8, bytes(8),
                                        overlap.REFCOUNT_TABLE)
            self._set_table(bi, 0)
            if not inside:
                await self.update(own, -1)
            elif own < self.free_hint:
                self.free_hint = own
            await self.image.discard_host(offset, self.cluster_size)

    async def update_batch(self, deltas: dict[int, int]) -> list[int]:
        """Apply many count changes writing each refcount block once; returns the
        clusters that became free.

        Every new value is checked before anything is written, so an overflow
        (which taking a snapshot can hit) changes nothing.
        """
        by_block: dict[int, list[tuple[int, int]]] = {}
        for cluster, delta in deltas.items():
            if delta:
                by_block.setdefault(cluster // self.entries, []).append((cluster, delta))
        for bi, items in by_block.items():
            block = await self._block(bi)
            for cluster, delta in items:
                if block is None:
                    self.image.mark_corrupt(f"cluster {cluster} has no refcount block")
                    raise OSError(5, "Input/output error")
                value = get_entry(block, cluster % self.entries, self.order) + delta
                if value < 0:
                    self.image.mark_corrupt(f"Refcount of cluster {cluster} went negative")
                    raise OSError(5, "Input/output error")
                if value > self.max_value:
                    raise OSError(27, f"Refcount overflow for cluster {cluster}")
        freed = []
        for bi, items in by_block.items():
            block = await self._block(bi)
            assert block is not None  # checked in the loop above
            new = bytearray(block)
            for cluster, delta in items:
                idx = cluster % self.entries
                value = get_entry(new, idx, self.order) + delta
                set_entry(new, idx, self.order, value)
                if value == 0:
                    freed.append(cluster)
            self.image.debug_event("refblock_update")
            await self.image.write_meta(self.table[bi], bytes(new), overlap.REFCOUNT_BLOCK)
            block[:] = new
        if freed:
            self.free_hint = min(self.free_hint, min(freed))
        return freed

    async def write_dirty(self) -> None:
        """Store the counts lazy refcounts kept in memory (whole blocks, one write each)."""
        for bi in sorted(self.dirty):
            block = self.dirty[bi]
            await self._store(bi, block, 0, len(block))
            del self.dirty[bi]
            self.blocks.put(bi, block)

    async def write_held(self) -> None:
        """Store the counts :meth:`alloc` held back (the changed bytes of each block)."""
        for bi in sorted(self.held):
            await self._store(bi, *self.held[bi])
            del self.held[bi]

    async def _store(self, bi: int, block: bytearray, lo: int, hi: int) -> None:
        """Write bytes [lo, hi) of refcount block ``bi`` to its place in the file."""
        self.image.debug_event("refblock_update_part")
        await self.image.write_meta(self.table[bi] + lo, bytes(block[lo:hi]),
                                    overlap.REFCOUNT_BLOCK)

    def free_later(self, offset: int, count: int = 1, discard: bool = False) -> None:
        """Free once the L2 change that dropped the clusters is in the file."""
        for i in range(count):  # one by one, so a failure part way retries nothing twice
            self.deferred_frees.append((offset + i * self.cluster_size, 1, discard))

    async def apply_deferred_frees(self) -> None:
        image = self.image
        while self.deferred_frees:
            offset, count, discard = self.deferred_frees[0]
            saved = image.discard_other
            image.discard_other = saved or discard
            try:
                await self.free(offset, count)
            finally:
                image.discard_other = saved
            self.deferred_frees.pop(0)

    async def free(self, offset: int, count: int = 1, discard: bool = False) -> None:
        """Drop one reference from each of ``count`` clusters at ``offset`` (``discard``:
        what becomes free is discarded whatever pass-discard-other says)."""
        first = offset // self.cluster_size
        for c in range(first, first + count):
            if await self.update(c, -1) == 0:
                self.image.debug_event("cluster_free")
                await self.image.discard_host(c * self.cluster_size, self.cluster_size, discard)
