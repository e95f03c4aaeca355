"""Resize: shrinking frees clusters and tables, growing zeroes and preallocates as QEMU does."""

from __future__ import annotations

import errno

from blockd.block.node import check_length
from blockd.drivers.qcow2.cluster import ALL_ALLOC, COPIED, Entry, Kind
from blockd.drivers.qcow2.compressed import Qcow2Compressed
from blockd.errors import QMPError


class Qcow2Resize(Qcow2Compressed):
    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        self._writable()
        check_length(size)
        if size % 512:
            raise OSError(errno.EINVAL, "The new size must be a multiple of 512")
        h = self.image.header
        if h.version < 3 and self.image.snapshots:
            # A v2 snapshot table entry need not record its disk size.
            raise QMPError("Can't resize a v2 image which has snapshots")
        cs = self.cs
        async with self.image.lock:
            old = h.size
            # Where a backing file would show through the grown part, QEMU zeroes it.
            zero_new = size > old and self.backing is not None and self.backing.length() > old
            if zero_new and h.version < 3:
                raise QMPError("Failed to zero out new clusters: Operation not supported")
            if size < old:
                for guest in range(-(-size // cs) * cs, old, cs):
                    entry = await self.map.lookup(guest)
                    kind = entry.kind(h.cluster_bits)
                    if kind != Kind.UNALLOCATED or entry.bitmap:
                        await self.map.set(guest, Entry(0))
                        await self._release(entry, kind)
                # Tables are freed below: nothing may still be waiting to be written into them.
                await self.map.write_pending()
                keep = -(-size // (cs * self.map.l2_entries))
                for i in range(keep, len(self.map.l1)):
                    l2 = self.map.l1[i] & 0x00FFFFFFFFFFFE00
                    if l2:
                        await self.map.set_l1(i, 0)
                        self.map.cache.drop(l2)
                        await self.image.refcounts.free(l2)
                await self.image.refcounts.drop_unused_blocks()
                await self._cut_tail()
            else:
                need = -(-size // (cs * self.map.l2_entries))
                if need > len(self.map.l1):
                    await self.map.grow_l1(need)
                if self.data_raw and prealloc == "off":
                    prealloc = "metadata"  # the raw data file must map cluster for cluster
            if prealloc == "off":
                if self.image.external_data:
                    await self.image.data.truncate(size, exact=exact)
            elif size > old:
                await self._preallocate(prealloc, old, size)
            if zero_new and (prealloc in ("off", "metadata") or self.image.external_data):
                await self._zero_grown(old, size)
            h.size = size
            await self.image.file.write(24, size.to_bytes(8, "big"))
            await self.map.write_pending()
        await self.image.file.flush()

    async def _zero_grown(self, old: int, size: int) -> None:
        """Make the grown part ``[old, size)`` read as zeroes, not as the backing file:
        zero (sub)clusters from the first boundary on, zeroes written before it."""
        sc = self._zero_granularity()
        zero_start = -(-old // sc) * sc
        if size > zero_start and not await self._zeroize(zero_start, size - zero_start, False):
            raise QMPError("Failed to zero out new clusters: Operation not supported")
        if zero_start > old:
            cs = self.cs
            n = min(zero_start, size) - old
            await self._allocating_write(old - old % cs, old % cs, memoryview(bytes(n)))

    async def _cut_tail(self) -> None:
        """Shorten the file to its last used cluster, as QEMU does after shrinking."""
        rc = self.image.refcounts
        last = rc.alloc_end - 1
        while last > 0 and await rc.get(last) == 0:
            last -= 1
        new_len = (last + 1) * self.cs
        if new_len < self.image.file.length():
            await self.image.file.truncate(new_len, exact=True)
            rc.alloc_end = last + 1
            rc.free_hint = min(rc.free_hint, last + 1)

    async def _preallocate(self, mode: str, old: int, size: int) -> None:
        """Allocate the clusters of the grown part ``[old, size)`` as QEMU does (metadata:
        the mapping only; falloc/full: the file's room too).

        Clusters already allocated and private stay, except that falloc and full
        give every cluster from ``old`` on new room.  A new cluster holding
        ``old`` gets the bytes before it copied (from the image, or its backing
        file) and zeroes after them.  With an external data file only the
        mapping is made here; the data file is grown, with the mode, to the end
        of the last (sub)cluster mapped.
        """
        cs = self.cs
        cb = self.image.header.cluster_bits
        external = self.image.external_data
        replace = mode in ("falloc", "full") and not external
        runs: list[list[int]] = []  # [host, length] of newly mapped data, merged
        last: tuple[int, int] | None = None  # host and guest offset of the last cluster mapped
        for guest in range(old - old % cs, size, cs):
            entry = await self.map.lookup(guest)
            kind = entry.kind(cb)
            if kind == Kind.NORMAL and entry.copied and not replace:
                continue
            head = max(0, old - guest)
            if not head and kind != Kind.UNALLOCATED and not replace:
                continue
            content = await self._read_in_cluster(guest, entry, 0, head) if head else b""
            await self.map.prepare(guest)
            host = await self._alloc_data(guest)
            bitmap = 0
            if self.map.ext:
                # Preallocation maps room without saying its subclusters hold data:
                # they still read from the backing file, or as zeroes (falloc and
                # full without a data file do say so, the room being zeroed).
                bitmap = entry.bitmap if kind == Kind.UNALLOCATED and not replace else ALL_ALLOC
            if head:
                await self._data_write(host, guest, content + bytes(cs - head))
            elif runs and runs[-1][0] + runs[-1][1] == host:
                runs[-1][1] += cs
            else:
                runs.append([host, cs])
            await self.map.set(guest, Entry(host | COPIED, bitmap))
            if kind != Kind.UNALLOCATED:
                await self._release(entry, kind)
            last = (host, guest)
        data = self.image.data
        # The file must hold what was mapped: up to the image's end in the last
        # cluster, rounded up to a subcluster with extended L2 entries.
        gran = self._zero_granularity()
        host, guest = last or ((size if external else 0), size)
        end = host + -(-(size - guest) // gran) * gran
        if external:
            if data.length() < end:
                await data.truncate(end, prealloc="off" if mode == "metadata" else mode)
            return
        if mode != "metadata":
            end = self.image.refcounts.alloc_end * cs
        if data.length() < end:
            await data.truncate(end, exact=True, prealloc="off")
        if mode == "metadata":
            return
        # Metadata written after the data clusters already extended the file over
        # them, so the space is reserved (falloc) or written (full) explicitly.
        for host, length in runs:
            if mode == "falloc":
                await data.write_zeroes(host, length)
                continue
            for pos in range(host, host + length, 1 << 20):
                await data.write(pos, bytes(min(1 << 20, host + length - pos)))
