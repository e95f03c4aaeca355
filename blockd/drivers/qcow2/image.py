"""State shared by the parts of one open qcow2 image.

The mapping, refcount and driver modules each own one structure; this
object ties them to the file node, the header and the metadata lock so
none of them needs to know the others' internals.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Protocol

from blockd.block.node import BlockNode
from blockd.drivers.qcow2 import header as hdr
from blockd.drivers.qcow2.cache import CacheConfig
from blockd.drivers.qcow2.snapshot import Snapshot

log = logging.getLogger(__name__)


class DataCipher(Protocol):
    """What an encrypted image plugs in: guest data is (de)ciphered in whole sectors.

    The qcow2 driver calls these around every read and write of data
    clusters, with the data's offset in the data file and in the guest
    (LUKS numbers sectors by the one, legacy AES by the other); nothing
    else in the driver knows about encryption.
    """

    async def decrypt_sectors(self, host_offset: int, guest_offset: int,
                              data: bytes) -> bytes: ...

    async def encrypt_sectors(self, host_offset: int, guest_offset: int,
                              data: bytes) -> bytes: ...


class Image:
    def __init__(self, file: BlockNode, header: hdr.Header, discard_other: bool,
                 caches: CacheConfig) -> None:
        self.file = file
        self.header = header
        self.cluster_size = header.cluster_size
        #: Serialises metadata changes; data I/O to allocated clusters runs without it.
        self.lock = asyncio.Lock()
        self.discard_other = discard_other
        from blockd.drivers.qcow2.refcount import Refcounts

        self.refcounts = Refcounts(self, caches.refcount_entries)
        self.corrupt = bool(header.incompatible_features & hdr.INCOMPAT_CORRUPT)
        #: Where guest data lives: the image file itself or an external data file,
        #: in which a cluster's host offset equals its guest offset and has no refcount.
        self.data: BlockNode = file
        self.external_data = False
        #: Set by encryption support; ``None`` stores data as is.
        self.crypto: DataCipher | None = None
        #: Internal snapshots (see :mod:`.snapshot`) and their table's size on disk.
        self.snapshots: list[Snapshot] = []
        self.snapshot_table_size = 0

    def debug_event(self, event: str) -> None:
        self.file.debug_event(event)

    def mark_corrupt(self, why: str) -> None:
        """Stop writing to an image found inconsistent, as QEMU does."""
        log.error("qcow2 image is corrupt: %s", why)
        self.corrupt = True

    async def discard_host(self, offset: int, length: int) -> None:
        """Give a freed cluster back to the file system (pass-discard-other)."""
        if self.discard_other:
            try:
                await self.file.discard(offset, length)
            except OSError:
                pass

    async def write_features(self) -> None:
        """Rewrite the three feature words (v3 only)."""
        h = self.header
        await self.file.write(72, struct.pack(">QQQ", h.incompatible_features,
                                              h.compatible_features, h.autoclear_features))

    async def write_header(self) -> None:
        """Rewrite the header and its extensions (cluster 0) after they changed."""
        raw = self.header.encode()
        await self.file.write(0, raw)
        await self.file.flush()
