"""Compressed writes: whole clusters packed into shared host clusters (``convert -c``)."""

from __future__ import annotations

import errno

from blockd.drivers.qcow2 import compress
from blockd.drivers.qcow2.cluster import Entry, compressed_entry
from blockd.drivers.qcow2.zero import Qcow2Zero


class Qcow2Compressed(Qcow2Zero):
    async def compress_cluster(self, data: bytes) -> bytes:
        """Compress one cluster in a worker thread (callers may run many at once)."""
        return await compress.compress(bytes(data), self.image.header.compression_type)

    async def write_compressed(self, offset: int, data: bytes, packed: bytes | None = None) -> None:
        """Store one whole cluster compressed (blockd-img convert -c)."""
        self._writable()
        cs = self.cs
        if offset % cs or len(data) != cs:
            raise OSError(errno.EINVAL, "Compressed writes must cover whole clusters")
        if self.image.crypto is not None:
            # QEMU would store such a cluster unencrypted; blockd never writes plaintext
            # into an encrypted image.
            raise OSError(errno.ENOTSUP, "Compression and encryption not supported at the "
                          "same time")
        if self.image.external_data:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        if packed is None:
            packed = await self.compress_cluster(data)
        if len(packed) >= cs:
            await self.write(offset, data)
            return
        async with self.image.lock:
            old = await self.map.lookup(offset)
            pos = self.compress_pos
            self.image.debug_event("cluster_alloc_bytes")
            if pos % cs == 0 or pos % cs + len(packed) > cs:
                clusters = -(-len(packed) // cs)
                pos = await self.image.refcounts.alloc(clusters)
            else:
                await self.image.refcounts.update(pos // cs, 1)
            self.image.debug_event("write_compressed")
            hit = self.image.metadata.check(pos, len(packed))
            if hit:
                await self.image.refuse_overlap(pos, len(packed), hit)
            await self.image.file.write(pos, packed)
            self.compress_pos = pos + len(packed)
            cb = self.image.header.cluster_bits
            await self.map.set(offset, Entry(compressed_entry(pos, len(packed), cb)))
            await self._release(old, old.kind(cb))
