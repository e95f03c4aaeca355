"""Block status: what a range of the guest reads as, and where its data is."""

from __future__ import annotations

from blockd.block.node import Extent, Status
from blockd.drivers.qcow2.cluster import COPIED, OFFSET_MASK, SUBCLUSTERS, ZERO, Entry, Kind, \
    continuing
from blockd.drivers.qcow2.read import Qcow2Read


class Qcow2Status(Qcow2Read):
    async def block_status(self, offset: int, length: int) -> Extent:
        self._live()
        cs = self.cs
        cb = self.image.header.cluster_bits
        guest = offset - offset % cs
        entry = await self.map.lookup(guest)
        kind = entry.kind(cb)
        n = min(length, guest + cs - offset)
        if self.map.ext and kind != Kind.COMPRESSED:
            sc = cs // SUBCLUSTERS
            i = (offset - guest) // sc
            state = self._sub_state(entry, kind, i)
            j = i + 1
            while j < SUBCLUSTERS and self._sub_state(entry, kind, j) == state:
                j += 1
            n = min(length, guest + j * sc - offset)
            status = {"data": Status.DATA | Status.ALLOCATED, "zero": Status.ZERO | Status.ALLOCATED,
                      "unallocated": None}[state]
            host = entry.host + offset - guest if entry.host else None
            if status is None:
                if host is not None and self.backing is None and self.encryption is None:
                    # Room kept for it: QEMU shows where, and it reads as zeroes.
                    return Extent(n, Status.ZERO, host, self.image.data.child)
                return await self._unallocated_status(offset, n)
            if host is None:
                return Extent(n, status)
            if state == "zero":  # room kept for zeroes: its place is shown, as QEMU shows it
                return self._zero_alloc_status(n, host)
            return await self._data_status(n, status, host)
        # Extend over following clusters of the same kind: whole slices of entries
        # at a time where run_after can tell, entry by entry (through lookup's
        # checks) where it cannot.
        first = entry
        stopped = False  # run_after met an entry that does not continue the run
        while n < length:
            if not stopped and (entry.raw in (0, ZERO) or kind == Kind.NORMAL and not
                                entry.raw & ~(OFFSET_MASK | COPIED)):
                limit = -(-(offset + length - guest - cs) // cs)
                more = await self.map.run_after(guest + cs, entry.raw, limit)
                # Fewer than the rest of the slice: the entry after the run does
                # not continue it, so asking again would only find that out anew.
                stopped = more < min(limit, self.map.left_in_slice(guest + cs))
                if more:
                    guest += more * cs
                    if kind == Kind.NORMAL:
                        entry = Entry(entry.raw + more * cs)
                    n = min(length, guest + cs - offset)
                    continue
            nxt = await self.map.lookup(guest + cs)
            if nxt.kind(cb) != kind or (kind in (Kind.NORMAL, Kind.ZERO_ALLOC)
                                        and nxt.host != entry.host + cs):
                break
            guest += cs
            entry = nxt
            stopped = False
            n = min(length, guest + cs - offset)
        if kind == Kind.NORMAL:
            return await self._data_status(n, Status.DATA | Status.ALLOCATED,
                                           first.host + offset % cs)
        if kind == Kind.COMPRESSED:
            return Extent(n, Status.DATA | Status.ALLOCATED)
        if kind == Kind.ZERO_ALLOC:
            return self._zero_alloc_status(n, first.host + offset % cs)
        if kind == Kind.ZERO_PLAIN:
            return Extent(n, Status.ZERO | Status.ALLOCATED)
        return await self._unallocated_status(offset, n)

    def _zero_alloc_status(self, n: int, host: int) -> Extent:
        """Zero clusters that keep their host clusters: QEMU reports where they are
        (though the file there need not hold zeroes), except for encrypted images."""
        if self.encryption is not None:
            return Extent(n, Status.ZERO | Status.ALLOCATED)
        return Extent(n, Status.ZERO | Status.ALLOCATED, host, self.image.data.child)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Block status of a range, a table slice at a time: one unpack of the slice's
        entries and one pass over them instead of a :meth:`block_status` call
        (several lookups) per run.

        Only plain entries of standard L2 tables of a plain image are taken this
        way; any other entry (compressed, or one :meth:`~Mapping.lookup` would
        call corrupt), and any image with encryption, extended L2, an external
        data file or preallocated metadata, goes through :meth:`block_status`.
        """
        if self.map.ext or self.encryption is not None or self.image.external_data \
                or await self._preallocated_metadata():
            return await super().extents(offset, length)
        self._live()
        out: list[Extent] = []
        end = offset + length
        while offset < end:
            got = await self._slice_extents(offset, end - offset)
            if not got:
                got = [await self.block_status(offset, end - offset)]
            for ext in got:
                last = out[-1] if out else None
                if last is not None and last.status == ext.status and last.child is ext.child \
                        and (last.offset is None) == (ext.offset is None) \
                        and (last.offset is None or last.offset + last.length == ext.offset):
                    last.length += ext.length  # a run that went on into the next slice
                else:
                    out.append(ext)
                offset += ext.length
        return out

    async def _slice_extents(self, offset: int, length: int) -> list[Extent] | None:
        """The runs from ``offset`` (at most ``length`` bytes) to the end of its table
        slice, as long as their entries are plain: unallocated, zero, or data at
        following aligned host clusters.  They stop before the first entry
        :meth:`block_status` must decide (None or empty if that is the first)."""
        cs, within = self.cs, offset % self.cs
        guest = offset - within
        entries = await self.map.slice_entries(guest, -(-(within + length) // cs))
        if entries is None:
            return None
        out: list[Extent] = []
        end = offset + length
        pos, i, count = offset, 0, len(entries)
        while i < count:
            first = entries[i]
            host = first & OFFSET_MASK
            if first & ~(OFFSET_MASK | COPIED | ZERO) or host % cs or first == COPIED:
                break  # compressed, reserved bits, unaligned or COPIED alone: lookup's
            j = i + 1 + continuing(entries, i + 1, first, cs)
            stop = min(end, guest + j * cs)
            if first & ZERO and host:  # zero clusters that keep their room
                ext = self._zero_alloc_status(stop - pos, host + pos - (guest + i * cs))
            elif first & ZERO:
                ext = Extent(stop - pos, Status.ZERO | Status.ALLOCATED)
            elif host:
                ext = Extent(stop - pos, Status.DATA | Status.ALLOCATED,
                             host + pos - (guest + i * cs), self.image.data.child)
            else:
                ext = await self._unallocated_status(pos, stop - pos)
                if ext.length < stop - pos:  # the backing file's status changes here
                    out.append(ext)
                    break
            out.append(ext)
            pos, i = stop, j
        return out

    async def _data_status(self, n: int, status: int, host: int) -> Extent:
        """Status of allocated data: with metadata preallocation the file's holes read as zero.

        Encrypted data has no offset to show: the file does not hold the guest's bytes.
        """
        if self.encryption is not None:
            return Extent(n, status)
        file = self.image.data
        if not self.image.external_data and await self._preallocated_metadata() \
                and host < file.length():
            ext = await file.block_status(host, min(n, file.length() - host))
            n = ext.length
            if ext.status & Status.ZERO:
                status |= Status.ZERO
        return Extent(n, status, host, file.child)

    async def _preallocated_metadata(self) -> bool:
        """Guess, like QEMU, whether clusters were allocated without data being written.

        Asking the file about every data cluster costs a syscall each, so it is
        done only when the file holds clearly less than the refcounts claim.
        """
        if self._metadata_prealloc is None:
            real = self.image.file.child.allocated_file_size()
            if real is None:
                self._metadata_prealloc = False
            else:
                threshold = max(real * 11 // 10, real + 2 * self.cs) // self.cs
                rc = self.image.refcounts
                self._metadata_prealloc = await rc.count_used(rc.alloc_end, threshold) > threshold
        return self._metadata_prealloc

    async def _unallocated_status(self, offset: int, n: int) -> Extent:
        backing = self.backing_child
        if backing is None:
            return Extent(n, Status.ZERO)
        if offset >= backing.length():
            return Extent(n, Status.ZERO)
        ext = await backing.block_status(offset, min(n, backing.length() - offset))
        return Extent(ext.length, ext.status & ~Status.ALLOCATED, ext.offset, ext.child)
