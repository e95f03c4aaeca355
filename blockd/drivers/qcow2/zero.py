"""Write zeroes and discard: zero flags and unmapped entries instead of data, where QEMU uses them."""

from __future__ import annotations

import errno

from blockd.block.node import Status, WriteFlags
from blockd.drivers.qcow2.cluster import ALL_ZERO, COPIED, SUBCLUSTERS, ZERO, Entry, Kind
from blockd.drivers.qcow2.write import Qcow2Write, sub_mask


class Qcow2Zero(Qcow2Write):
    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        """Zero a range as QEMU's block layer and qcow2 driver do together.

        The range is cut at subcluster boundaries into an unaligned head,
        an aligned middle and an unaligned tail; each piece becomes zero
        (sub)clusters where :meth:`_zero_piece` can, and is written as
        zeroes otherwise, so the resulting L2 entries are QEMU's.
        """
        self._writable()
        if self.data_raw:
            # The data file must stay a faithful raw image: zeroes are really written.
            for pos in range(offset, offset + length, 1 << 20):
                await self.write(pos, bytes(min(1 << 20, offset + length - pos)))
            return
        if self.image.header.version < 3 and flags & WriteFlags.NO_FALLBACK:
            raise OSError(errno.ENOTSUP, "Operation not supported")  # v2 has no zero flag
        sc = self._zero_granularity()
        unmap = bool(flags & WriteFlags.MAY_UNMAP)
        end = offset + length
        pos = offset
        while pos < end:
            if pos % sc:
                n = min(end - pos, sc - pos % sc)
            elif end % sc and end - pos > sc:
                n = end - end % sc - pos
            else:
                n = end - pos
            if not await self._zero_piece(pos, n, unmap):
                if flags & WriteFlags.NO_FALLBACK:
                    raise OSError(errno.ENOTSUP, "Operation not supported")
                for p in range(pos, pos + n, 1 << 20):
                    await self.write(p, bytes(min(1 << 20, pos + n - p)))
            pos += n
        if flags & WriteFlags.FUA:
            await self.flush()

    def _zero_granularity(self) -> int:
        """The unit zero flags cover: a subcluster with extended L2, else a cluster."""
        return self.cs // SUBCLUSTERS if self.map.ext else self.cs

    async def _zero_piece(self, offset: int, length: int, unmap: bool) -> bool:
        """Zero flags for one piece of :meth:`write_zeroes`; False where data must be written.

        A piece smaller than a subcluster still becomes a zero subcluster
        when the rest of it reads as zeroes already and it holds no data of
        its own (unallocated or zero), as QEMU decides.
        """
        sc = self._zero_granularity()
        head = offset % sc
        tail = 0 if offset + length == self.length() else -(offset + length) % sc
        if head or tail:
            if not (await self._reads_zero(offset - head, head)
                    and await self._reads_zero(offset + length, tail)):
                return False
            offset -= head
            async with self.image.lock:
                # A write may have come in since the check: look again, under the lock.
                guest = offset - offset % self.cs
                entry = await self.map.lookup(guest)
                kind = entry.kind(self.image.header.cluster_bits)
                if self.map.ext:
                    ok = self._sub_state(entry, kind, (offset - guest) // sc) in (
                        "zero", "unallocated")
                else:
                    ok = kind in (Kind.UNALLOCATED, Kind.ZERO_PLAIN, Kind.ZERO_ALLOC)
                return ok and await self._zeroize(offset, sc, unmap)
        async with self.image.lock:
            return await self._zeroize(offset, length, unmap)

    async def _reads_zero(self, offset: int, length: int) -> bool:
        """Whether the whole chain reads ``length`` bytes at ``offset`` as zeroes, by block
        status (no data is read).  Clamped to the image's end."""
        end = min(offset + length, self.length())
        while offset < end:
            ext = await self.block_status(offset, end - offset)
            if not ext.status & Status.ZERO or not ext.length:
                return False
            offset += ext.length
        return True

    async def _zeroize(self, offset: int, length: int, unmap: bool) -> bool:
        """Make a range read as zeroes through L2 entries alone (under the image lock).

        ``offset`` is subcluster aligned, and so is the end unless it is at
        or past the image's end.  Partial clusters (extended L2) get zero
        bits for the subclusters covered; whole clusters become zero
        clusters, keeping their host cluster unless ``unmap``.  A v2 image
        has no zero flag: without a backing file its clusters are unmapped
        instead; with one (or where a compressed cluster would have to be
        split) nothing is done and False returned.
        """
        cs = self.cs
        end = offset + length
        if self.image.header.version < 3:
            if self.backing is not None:
                return False
            for guest in range(offset, end, cs):
                await self._discard_cluster(guest, pass_down=False)
            return True
        head_end = min(end, -(-offset // cs) * cs)
        tail_start = end if end >= self.length() else max(head_end, end - end % cs)
        if head_end > offset and not await self._zero_subclusters(offset, head_end - offset):
            return False
        for guest in range(head_end, tail_start, cs):
            await self._zero_cluster(guest, unmap)
        if tail_start < end and not await self._zero_subclusters(tail_start, end - tail_start):
            return False
        return True

    async def _zero_subclusters(self, offset: int, length: int) -> bool:
        """Set the zero bits (and clear the allocation bits) of the subclusters of one
        cluster that ``[offset, offset + length)`` covers; False for a compressed cluster,
        which cannot be zeroed in part."""
        cs, sc = self.cs, self.cs // SUBCLUSTERS
        guest = offset - offset % cs
        entry = await self.map.lookup(guest)
        if entry.kind(self.image.header.cluster_bits) == Kind.COMPRESSED:
            return False
        first = (offset - guest) // sc
        mask = sub_mask(first, first + -(-length // sc) - 1)
        bitmap = (entry.bitmap | mask << 32) & ~mask
        if bitmap != entry.bitmap:
            await self.map.set(guest, Entry(entry.raw, bitmap))
        return True

    async def _zero_cluster(self, guest: int, unmap: bool) -> None:
        """A zero cluster at ``guest``: the entry keeps its host cluster (even a shared
        one) unless ``unmap`` lets it go; a compressed cluster is always let go."""
        entry = await self.map.lookup(guest)
        kind = entry.kind(self.image.header.cluster_bits)
        drop = kind == Kind.COMPRESSED or unmap and kind in (Kind.NORMAL, Kind.ZERO_ALLOC)
        raw = 0 if drop else entry.raw
        if self.map.ext:
            new = Entry(raw, ALL_ZERO)
        else:
            new = Entry(raw | ZERO)
        if new.raw == entry.raw and new.bitmap == entry.bitmap:
            return
        await self.map.set(guest, new)
        if drop:
            await self._release(entry, kind)

    async def discard(self, offset: int, length: int) -> None:
        if self.options.get("discard", "ignore") != "unmap":
            return
        self._writable()
        cs = self.cs
        first = -(-offset // cs) * cs
        last = (offset + length) // cs * cs
        if offset + length == self.length():
            last = -(-(offset + length) // cs) * cs
        if self.data_raw:
            # Whole clusters read as zeroes after a discard; the raw data file must agree.
            if last > first:
                await self.write_zeroes(first, min(last, self.length()) - first)
            return
        async with self.image.lock:
            for guest in range(first, last, cs):
                await self._discard_cluster(
                    guest, self.options.get("pass-discard-request", True))

    async def _discard_cluster(self, guest: int, pass_down: bool) -> None:
        """Unmap one cluster so it reads as zeroes (under the image lock).

        With a backing file it becomes a zero cluster (v2 has none: the
        backing file shows through).  ``pass_down`` gives the freed space
        to the file (``pass-discard-request``).
        """
        entry = await self.map.lookup(guest)
        kind = entry.kind(self.image.header.cluster_bits)
        if self.backing is not None or kind != Kind.UNALLOCATED:
            if self.map.ext:
                new = Entry(0, ALL_ZERO)
            else:
                new = Entry(ZERO if self.image.header.version >= 3 else 0)
        else:
            new = Entry(0)
        if new == Entry(entry.raw & ~COPIED if not entry.host else entry.raw, entry.bitmap):
            return
        await self.map.set(guest, new)
        await self._release(entry, kind, pass_down and bool(entry.host))
