"""The state every part of the qcow2 node shares, and guest data in the data file.

The node is built in layers, one module per concern, each a subclass of
the one below (see :mod:`.driver`); this is the bottom one.  Guest data
goes through :meth:`Qcow2Base._data_read` and :meth:`Qcow2Base._data_write`
so encryption and the external data file are handled in one place.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any, Awaitable

from blockd.block.node import BlockNode
from blockd.drivers.qcow2 import bitmaps as qbitmaps
from blockd.drivers.qcow2 import crypt
from blockd.drivers.qcow2 import header as hdr
from blockd.drivers.qcow2 import snapshot as qsnap
from blockd.drivers.qcow2.cluster import Mapping
from blockd.drivers.qcow2.image import Image


class Qcow2Base(BlockNode):
    driver = "qcow2"
    is_format = True
    supports_backing = True
    #: The backing file is read through the link; the image object holds the
    #: file, and is told when it changes (a filter put under the node).
    relinkable = ("backing", "file")

    #: The image's metadata and its guest-to-host mapping, set by ``open``.
    image: Image
    map: Mapping

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.compress_pos = 0
        self.stored_bitmaps: list[qbitmaps.DirEntry] = []
        self._last_inflated: tuple[int, bytes] | None = None
        #: Whether data clusters may be file holes (metadata preallocation); decided once.
        self._metadata_prealloc: bool | None = None
        self._cleaner: asyncio.Task | None = None
        #: The snapshot shown instead of the active image (``snapshot`` option).
        self.loaded_snapshot: qsnap.Snapshot | None = None
        #: The virtual size shown while a snapshot is loaded (``None``: the active one).
        self._shown_size: int | None = None
        #: Writes in place run without the lock; snapshot operations must wait for
        #: them and make new ones take the lock (see :meth:`_exclusive`).
        self._in_place_writes = 0
        self._writes_idle = asyncio.Event()
        self._writes_idle.set()
        self._quiescing = False
        self._generation = 0
        #: Encryption state of an encrypted image (see :mod:`.crypt`).
        self.encryption: crypt.Encryption | None = None

    @property
    def cs(self) -> int:
        return self.image.cluster_size

    def length(self) -> int:
        # QEMU counts a qcow2's size in whole sectors: a header's odd tail is not shown
        # (an encrypted node takes whole sectors only).
        size = self.image.header.size if self._shown_size is None else self._shown_size
        return size - size % 512

    def _live(self) -> None:
        """After a fatal corruption the node has no driver any more: nothing is served."""
        if self.image.stopped:
            raise OSError(errno.ENOMEDIUM, "No medium found")

    def _writable(self) -> None:
        self._live()
        if self.read_only:
            raise OSError(errno.EPERM, "Operation not permitted")
        if self.image.corrupt:
            raise OSError(errno.EIO, "Image is corrupt")

    @property
    def data_raw(self) -> bool:
        """The data file alone is a valid raw image (``data-file-raw``)."""
        return bool(self.image.header.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW)

    def _data_read(self, host: int, guest: int,
                   n: int) -> Awaitable[bytes | bytearray | memoryview]:
        """Guest data at ``host`` in the data file (deciphered when encrypted).

        ``guest`` is the guest offset of the same byte: legacy AES derives
        IVs from it.  Plain data is the data file edge's own read, returned
        to be awaited: every guest read passes here, and a coroutine of our
        own around it would cost as much as the edge itself.
        """
        if self.image.crypto is None:
            return self.image.data.read(host, n)
        return self._decrypted_read(host, guest, n)

    async def _decrypted_read(self, host: int, guest: int, n: int) -> bytes | bytearray:
        # An encrypted node takes only whole sectors (its ``request_alignment``).
        assert self.image.crypto is not None
        raw = bytes(await self.image.data.read(host, n))
        return await self.image.crypto.decrypt_sectors(host, guest, raw + bytes(n - len(raw)))

    def _data_write(self, host: int, guest: int,
                    buf: bytes | bytearray | memoryview) -> Awaitable[None]:
        """Write guest data at ``host`` in the data file (ciphered when encrypted), unless
        it would overwrite metadata.  Like :meth:`_data_read`, the common case is the
        edge's own write."""
        if self.image.crypto is None and (self.image.external_data or
                                          not self.image.metadata.check(host, len(buf))):
            return self.image.data.write(host, buf)
        return self._checked_write(host, guest, buf)

    async def _checked_write(self, host: int, guest: int,
                             buf: bytes | bytearray | memoryview) -> None:
        if not self.image.external_data:
            hit = self.image.metadata.check(host, len(buf))
            if hit:
                await self.image.refuse_overlap(host, len(buf), hit)
        crypto = self.image.crypto
        if crypto is not None:
            # Whole sectors only (``request_alignment``): the edge into this node pads
            # and serialises partial ones.
            buf = await crypto.encrypt_sectors(host, guest, bytes(buf))
        await self.image.data.write(host, buf)

    async def _alloc_data(self, guest: int) -> int:
        """A host cluster for guest cluster ``guest``: identity in an external data file."""
        if self.image.external_data:
            return guest
        return await self.image.refcounts.alloc(1, hold=True)
