"""Guest writes: in place, copy on write, and cluster allocation.

Writes to a cluster that is already allocated and private (``COPIED``)
go straight to the file without the metadata lock, so they run
concurrently.  Everything that changes metadata (allocation, copy on
write, zeroing, discard, resize) holds the image lock and looks the
cluster up again under it, so two writers racing for one new cluster
allocate it once.

An allocating write builds the whole new cluster (old content around
the guest's bytes) and writes it once, then points the L2 entry at it;
the refcount was raised before, so a crash leaks at worst.
"""

from __future__ import annotations

from blockd.block.node import Claim, WriteFlags
from blockd.drivers.qcow2.cluster import ALL_ALLOC, COPIED, L1_OFFSET_MASK, SUBCLUSTERS, Entry, \
    Kind
from blockd.drivers.qcow2.status import Qcow2Status


class Qcow2Write(Qcow2Status):
    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        self._writable()
        cs = self.cs
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            cur = offset + pos
            guest = cur - cur % cs
            start = cur - guest
            n = min(len(view) - pos, cs - start)
            generation = self._generation
            turns = self.image.lock.turns
            entry = await self.map.lookup(guest, cur)
            in_place = self._in_place(entry, start, n)
            if in_place:
                run = n if self.map.ext or len(view) - pos == n else \
                    await self._host_run(guest, entry, n, len(view) - pos - n, owned=True)
            # A snapshot taken while looking up makes the entries stale: the clusters
            # may be shared now, so only the locked path (which looks again) is safe.
            if in_place and not self._quiescing and generation == self._generation:
                n = run
                chunk = view[pos:pos + n]
                self._in_place_writes += 1
                self._writes_idle.clear()
                try:
                    self.image.debug_event("write_aio")
                    await self._data_write(entry.host + start, cur, chunk)
                finally:
                    self._in_place_writes -= 1
                    if not self._in_place_writes:
                        self._writes_idle.set()
            elif start == 0 and len(view) - pos >= cs and self._batchable(entry):
                async with self.image.lock:
                    # Nobody held the lock since the lookup: ``entry`` is still current.
                    current = self.image.lock.turns == turns + 1
                    n = await self._allocate_run(guest, view[pos:], current)
            else:
                async with self.image.lock:
                    await self._allocating_write(guest, start, view[pos:pos + n])
            pos += n
        # Identity first: plain writes pass NONE, and ``in`` is a Python-level call.
        if flags is not WriteFlags.NONE and WriteFlags.FUA in flags:
            await self.flush()

    def _batchable(self, entry: Entry) -> bool:
        """A whole-cluster write here may go through :meth:`_allocate_run`."""
        return (not self.map.ext and self.image.crypto is None and not self.image.external_data
                and entry.raw == 0)

    async def _allocate_run(self, guest: int, view: memoryview, current: bool = False) -> int:
        """Write whole, unallocated clusters as one run: one allocation, one data write and
        one L2 update for as many clusters as stay unallocated within the L2 table.

        ``current``: the caller saw the first cluster unallocated and nobody
        held the lock since, so it is not looked up again (the common
        single-cluster case is the cheaper for it).  Returns the bytes written
        (at least one cluster, when the first one still qualifies).
        """
        cs = self.cs
        if not current:
            first = await self.map.lookup(guest, guest)
            if not self._batchable(first):
                await self._allocating_write(guest, 0, view[:cs])
                return cs
        host, count = await self._alloc_run(guest, len(view))
        self.image.debug_event("write_aio")
        try:
            await self._data_write(host, guest, view[:count * cs])
        except OSError:
            await self.image.refcounts.free(host, count)
            raise
        await self._link_run(guest, host, count)
        return count * cs

    async def _alloc_run(self, guest: int, length: int) -> tuple[int, int]:
        """(host offset, count): new host clusters for as many of the ``length // cs``
        clusters from ``guest`` as stay unallocated within one L2 table (at least one).
        Called under the image lock; the caller links them with :meth:`_link_run`."""
        cs = self.cs
        per_table = self.map.l2_entries * cs
        limit = min(length // cs, (per_table - guest % per_table) // cs, 512)
        count = 1 if limit == 1 else max(1, await self.map.unallocated_run(guest, limit))
        await self.map.prepare(guest)
        return await self.image.refcounts.alloc(count, hold=True), count

    async def _link_run(self, guest: int, host: int, count: int) -> None:
        cs = self.cs
        await self.map.set_run(guest, [(host + i * cs) | COPIED for i in range(count)])

    async def claim(self, offset: int, length: int) -> Claim | None:
        """Whole unallocated clusters from ``offset``, as one host run that commit links
        into the L2 table: the :meth:`_allocate_run` path with the data written by the
        caller.  Anything else (partial, allocated, encrypted, external data, extended
        L2) is left to :meth:`write`."""
        self._writable()
        cs = self.cs
        if offset % cs or length < cs or self._quiescing:
            return None
        async with self.image.lock:
            if not self._batchable(await self.map.lookup(offset, offset)):
                return None
            host, count = await self._alloc_run(offset, length)
            inner = await self.image.data.claim(host, count * cs)
            if inner is None or inner.length < count * cs:
                await self.image.refcounts.free(host, count)
                return None
        hit = self.image.metadata.check(host, count * cs)
        if hit:
            await self.image.refuse_overlap(host, count * cs, hit)

        async def commit() -> None:
            await inner.commit()
            async with self.image.lock:
                await self._link_run(offset, host, count)

        async def abort() -> None:
            async with self.image.lock:
                await self.image.refcounts.free(host, count)

        return Claim(inner.file, host, count * cs, commit, abort)

    def _in_place(self, entry: Entry, start: int, n: int) -> bool:
        if entry.kind(self.image.header.cluster_bits) != Kind.NORMAL or not entry.copied:
            return False
        if not self.map.ext:
            return True
        sc = self.cs // SUBCLUSTERS
        need = sub_mask(start // sc, (start + n - 1) // sc)
        return entry.bitmap & need == need and not entry.bitmap >> 32 & need

    async def _cluster_content(self, guest: int, entry: Entry) -> bytearray:
        return bytearray(await self._read_in_cluster(guest, entry, 0, self.cs))

    async def _allocating_write(self, guest: int, start: int, chunk: memoryview) -> None:
        entry = await self.map.lookup(guest, guest + start)  # again, under the lock
        cb = self.image.header.cluster_bits
        kind = entry.kind(cb)
        n = len(chunk)
        buf: bytearray | memoryview
        if self._in_place(entry, start, n):
            await self._data_write(entry.host + start, guest + start, chunk)
            return
        sc = self.cs // SUBCLUSTERS
        touched = sub_mask(start // sc, (start + n - 1) // sc) if self.map.ext else 0
        if self.map.ext and kind == Kind.NORMAL and entry.copied:
            # Allocate subclusters inside a cluster we own: copy around the write
            # within the touched subclusters only.
            lo, hi = (start // sc) * sc, -(-(start + n) // sc) * sc
            if lo == start and hi == start + n:
                buf = bytearray(chunk)
                self.image.debug_event("write_aio")
            else:
                self.image.debug_event("cow_read")
                buf = bytearray(await self._read_in_cluster(guest, entry, lo, hi - lo))
                buf[start - lo:start - lo + n] = chunk
                self.image.debug_event("cow_write")
            await self._data_write(entry.host + lo, guest + lo, bytes(buf))
            bitmap = (entry.bitmap | touched) & ~(touched << 32)
            await self.map.set(guest, Entry(entry.raw, bitmap))
            return
        whole = start == 0 and n == self.cs
        # Around the guest's bytes there is nothing to read when the cluster reads
        # as zeroes anyway; QEMU then reports allocation, not copy on write.
        zeroes = not self.map.ext and (kind in (Kind.ZERO_PLAIN, Kind.ZERO_ALLOC) or (
            kind == Kind.UNALLOCATED and self.backing is None))
        if whole:
            buf = chunk  # the guest wrote the whole cluster: nothing to copy
        elif zeroes:
            buf = bytearray(self.cs)
            buf[start:start + n] = chunk
        else:
            self.image.debug_event("cow_read")
            buf = await self._cluster_content(guest, entry)
            buf[start:start + n] = chunk
        await self.map.prepare(guest)
        host = await self._alloc_data(guest)
        if zeroes and not whole:
            self.image.debug_event("cluster_alloc_space")
        self.image.debug_event("write_aio" if whole or zeroes else "cow_write")
        if self.map.ext:
            if kind in (Kind.COMPRESSED, Kind.NORMAL):
                bitmap = ALL_ALLOC
            else:
                bitmap = (entry.bitmap | touched) & ~(touched << 32)
            new = Entry(host | COPIED, bitmap)
        else:
            new = Entry(host | COPIED)
        try:
            await self._data_write(host, guest, buf)
            await self.map.set(guest, new)
        except OSError:
            # The new cluster is not linked (a failed L2 write is undone in memory):
            # give it back, so a failed request leaks nothing.
            if not self.image.external_data:
                await self.image.refcounts.free(host)
            raise
        await self._release(entry, kind)

    async def _release(self, entry: Entry, kind: Kind, discard: bool = False) -> None:
        """Drop the reference an old L2 entry held on its host cluster(s).

        The count drops only after the new entry is written (at the next
        flush): until then the file may still point at the cluster, so it
        must not be handed out again.  ``discard`` passes the freed space
        down to the file (``pass-discard-request``).
        """
        rc = self.image.refcounts
        if kind == Kind.COMPRESSED:
            off, n = entry.compressed_span(self.image.header.cluster_bits)
            first, last = off // self.cs, (off + n - 1) // self.cs
            rc.free_later(first * self.cs, last - first + 1, discard)
        elif entry.host and not self.image.external_data:
            rc.free_later(entry.host, 1, discard)

    async def make_empty(self) -> None:
        """Unmap every guest cluster so the backing file shows through (after a commit).

        The L2 tables stay (QEMU keeps them too); the data clusters are freed.
        """
        self._writable()
        cs = self.cs
        async with self.image.lock:
            for l1i, l1e in enumerate(self.map.l1):
                if not l1e & L1_OFFSET_MASK:
                    continue
                first = l1i * self.map.l2_entries * cs
                for guest in range(first, min(first + self.map.l2_entries * cs, self.length()),
                                   cs):
                    entry = await self.map.lookup(guest)
                    kind = entry.kind(self.image.header.cluster_bits)
                    if kind != Kind.UNALLOCATED or entry.bitmap:
                        await self.map.set(guest, Entry(0))
                        await self._release(entry, kind)
        await self.flush()

    async def flush(self) -> None:
        self._live()
        # Writing the tables is the "to the OS" part of a flush, as in QEMU.
        self.image.debug_event("flush_to_os")
        async with self.image.lock:
            await self.map.write_pending()
        self.image.debug_event("flush_to_disk")
        await self.image.file.flush()


def sub_mask(first: int, last: int) -> int:
    """Bits ``first``..``last`` (inclusive) set: the subclusters a range touches."""
    return ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
