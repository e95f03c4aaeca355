"""Guest reads: normal, compressed and zero clusters, subclusters, the backing file."""

from __future__ import annotations

from blockd.drivers.qcow2 import compress
from blockd.drivers.qcow2.cluster import SUBCLUSTERS, Entry, Kind
from blockd.drivers.qcow2.node import Qcow2Base


class Qcow2Read(Qcow2Base):
    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self._live()
        cs = self.cs
        parts: list[bytes | bytearray | memoryview] = []
        end = offset + length
        while offset < end:
            guest = offset - offset % cs
            start = offset - guest
            entry = await self.map.lookup(guest)
            n = min(end - offset, cs - start)
            kind = entry.kind(self.image.header.cluster_bits)
            if kind == Kind.NORMAL and not self.map.ext:
                if end - offset > n:  # a run of clusters may follow (no coroutine otherwise)
                    n = await self._host_run(guest, entry, n, end - offset - n, owned=False)
                self.image.debug_event("read_aio")
                parts.append(await self._data_read(entry.host + start, offset, n))
            else:
                parts.append(await self._read_in_cluster(guest, entry, start, n))
            offset += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_in_cluster(self, guest: int, entry: Entry, start: int, n: int) -> bytes:
        """``n`` bytes at ``start`` within the cluster at ``guest`` (cluster aligned)."""
        kind = entry.kind(self.image.header.cluster_bits)
        if kind == Kind.COMPRESSED:
            data = await self._inflate(entry)
            return data[start:start + n]
        if not self.map.ext:
            if kind == Kind.NORMAL:
                self.image.debug_event("read_aio")
                return bytes(await self._data_read(entry.host + start, guest + start, n))
            if kind == Kind.UNALLOCATED:
                return await self._backing_read(guest + start, n)
            return bytes(n)
        sc = self.cs // SUBCLUSTERS
        out = bytearray()
        pos, end = start, start + n
        while pos < end:
            i = pos // sc
            state = self._sub_state(entry, kind, i)
            j = i + 1
            while j * sc < end and self._sub_state(entry, kind, j) == state:
                j += 1
            m = min(end, j * sc) - pos
            if state == "data" and kind == Kind.NORMAL:
                self.image.debug_event("read_aio")
                out += await self._data_read(entry.host + pos, guest + pos, m)
            elif state == "unallocated":
                out += await self._backing_read(guest + pos, m)
            else:
                out += bytes(m)
            pos += m
        return bytes(out)

    async def _host_run(self, guest: int, entry: Entry, n: int, left: int, owned: bool) -> int:
        """``n`` (bytes in the normal cluster at ``guest``) grown by up to ``left`` bytes
        of the following clusters, while they are normal (and, for ``owned``, not
        shared) and lie right after it in the file.

        A large request then costs one data read or write (and, encrypted,
        one batch of cipher work), not one per cluster.  Without extended L2.
        """
        cs = self.cs
        expect, nxt = entry.host + cs, guest + cs
        while left > 0:
            following = await self.map.lookup(nxt)
            if (following.host != expect or following.kind(self.image.header.cluster_bits)
                    != Kind.NORMAL or owned and not following.copied):
                break
            step = min(left, cs)
            n, left, expect, nxt = n + step, left - step, expect + cs, nxt + cs
        return n

    async def _inflate(self, entry: Entry) -> bytes:
        off, n = entry.compressed_span(self.image.header.cluster_bits)
        if self._last_inflated and self._last_inflated[0] == entry.raw:
            return self._last_inflated[1]
        self.image.debug_event("read_compressed")
        # Bytes past the end of the file read as zeros (and then fail to inflate).
        raw = bytes(await self.image.file.read(off, max(0, min(n, self.image.file.length() - off))))
        data = await compress.decompress(raw, self.cs, self.image.header.compression_type)
        self._last_inflated = (entry.raw, data)
        return data

    async def _backing_read(self, offset: int, length: int) -> bytes:
        backing = self.backing_child
        if backing is None:
            return bytes(length)
        self.image.debug_event("read_backing_aio")
        blen = backing.length()
        if offset >= blen:
            return bytes(length)
        n = min(length, blen - offset)
        data = bytes(await backing.read(offset, n))
        return data + bytes(length - n)

    def _sub_state(self, entry: Entry, kind: Kind, index: int) -> str:
        """What subcluster ``index`` of an extended-L2 cluster reads as."""
        if kind == Kind.COMPRESSED:
            return "compressed"
        if entry.bitmap & (1 << (32 + index)):
            return "zero"
        if entry.bitmap & (1 << index):
            return "data"
        return "unallocated"
