"""State shared by the parts of one open qcow2 image.

The mapping, refcount and driver modules each own one structure; this
object ties them to the edge to the file, the header and the metadata lock
so none of them needs to know the others' internals.  Every request to the
file or the data file goes through its edge (:mod:`blockd.block.io`), so it
is checked and recorded like any parent's; what concerns the node itself
(its name, its size on disk) is asked of ``edge.child``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import struct
import sys
from typing import Any, Callable, Literal, Protocol

from blockd.block.node import ChildLink
from blockd.drivers.qcow2 import header as hdr
from blockd.drivers.qcow2 import overlap
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
                              data: bytes) -> bytes | bytearray: ...

    async def encrypt_sectors(self, host_offset: int, guest_offset: int,
                              data: bytes) -> bytes | bytearray: ...


class MetadataLock(asyncio.Lock):
    """The image's metadata lock, counting how often it was taken and given back.

    Every metadata change happens under it, so a caller that reads the
    count before looking at metadata and finds it just one higher once it
    holds the lock knows nobody changed anything in between.
    """

    def __init__(self) -> None:
        super().__init__()
        self.turns = 0

    async def acquire(self) -> Literal[True]:
        await super().acquire()
        self.turns += 1
        return True

    def release(self) -> None:
        self.turns += 1
        super().release()


#: Receives ``BLOCK_IMAGE_CORRUPTED`` data (the daemon's event emitter, or nothing).
EventSink = Callable[[str, dict[str, Any]], None]


class Image:
    def __init__(self, file: ChildLink, header: hdr.Header, discard_other: bool,
                 caches: CacheConfig, overlap_mask: int = overlap.CACHED,
                 node_name: str = "", emit: EventSink | None = None,
                 writable: Callable[[], bool] = lambda: True) -> None:
        self.file = file
        #: Whether the node is open read-write now (it may be reopened either way).
        self.writable = writable
        #: Tells the file a blkdebug event was reached: its own method, bound once,
        #: since allocating writes reach several.
        self.debug_event: Callable[[str], None] = file.debug_event
        self.header = header
        self.cluster_size = header.cluster_size
        #: Serialises metadata changes; data I/O to allocated clusters runs without it.
        self.lock = MetadataLock()
        self.discard_other = discard_other
        from blockd.drivers.qcow2.refcount import Refcounts

        self.refcounts = Refcounts(self, caches.refcount_entries)
        self.corrupt = bool(header.incompatible_features & hdr.INCOMPAT_CORRUPT)
        #: Where guest data lives: the image file itself or an external data file,
        #: in which a cluster's host offset equals its guest offset and has no refcount.
        self.data: ChildLink = file
        self.external_data = False
        #: Set by encryption support; ``None`` stores data as is.
        self.crypto: DataCipher | None = None
        #: Internal snapshots (see :mod:`.snapshot`) and their table's size on disk.
        self.snapshots: list[Snapshot] = []
        self.snapshot_table_size = 0
        self.metadata = overlap.MetadataMap(self, overlap_mask)
        self.node_name = node_name
        self.emit = emit
        #: A corruption was reported (events after the first are suppressed, as in QEMU).
        self.signaled_corruption = False
        #: A fatal corruption stopped the image: every request fails from now on.
        self.stopped = False

    def mark_corrupt(self, why: str) -> None:
        """Stop writing to an image found inconsistent, as QEMU does."""
        log.error("qcow2 image is corrupt: %s", why)
        self.corrupt = True

    async def signal_corruption(self, fatal: bool, offset: int, size: int, msg: str) -> None:
        """Report corrupt metadata: on stderr, as ``BLOCK_IMAGE_CORRUPTED``, and if fatal
        by setting the corrupt bit and stopping the image.

        Only the first report goes out, so a guest hammering a broken
        cluster cannot flood the monitor; a fatal one still gets through
        after non-fatal ones, as in QEMU.  On a read-only node nothing is
        fatal, as in QEMU: a read-only open writes nothing, and only the
        request that met the corruption fails.
        """
        fatal = fatal and self.writable()
        if self.signaled_corruption and (not fatal or self.corrupt):
            return
        if fatal:
            sys.stderr.write(f"qcow2: Marking image as corrupt: {msg}; further corruption "
                             "events will be suppressed\n")
        else:
            sys.stderr.write(f"qcow2: Image is corrupt: {msg}; further non-fatal corruption "
                             "events will be suppressed\n")
        if self.emit is not None:
            data: dict[str, Any] = {"device": "", "node-name": self.node_name, "msg": msg}
            if offset >= 0:
                data["offset"] = offset
            if size >= 0:
                data["size"] = size
            data["fatal"] = fatal
            self.emit("BLOCK_IMAGE_CORRUPTED", data)
        if fatal:
            self.corrupt = True
            self.stopped = True
            if self.header.version >= 3:
                self.header.incompatible_features |= hdr.INCOMPAT_CORRUPT
                try:
                    await self.write_features()
                    await self.file.flush()
                except OSError as exc:
                    log.error("Could not set the corrupt bit: %s", exc)
        self.signaled_corruption = True

    async def refuse_overlap(self, offset: int, size: int, hit: int) -> None:
        """Refuse (EIO, image marked corrupt) a write that ``metadata.check`` found overlapping.

        The check itself is a plain call at each write site, so the common
        case costs no coroutine.
        """
        await self.signal_corruption(
            True, offset, size,
            f"Preventing invalid write on metadata (overlaps with {overlap.lowest_name(hit)})")
        raise OSError(errno.EIO, "Input/output error")

    async def write_meta(self, offset: int, data: bytes | bytearray | memoryview,
                         ign: int) -> None:
        """Write metadata of the kind ``ign`` (whose own place is not a conflict)."""
        hit = self.metadata.check(offset, len(data), ign)
        if hit:
            await self.refuse_overlap(offset, len(data), hit)
        await self.file.write(offset, data)

    async def mark_dirty(self) -> None:
        """Set the dirty bit before the first refcount change is deferred (lazy refcounts).

        Everything written so far is flushed first, so the bit never covers
        an earlier state it does not describe.
        """
        h = self.header
        if h.incompatible_features & hdr.INCOMPAT_DIRTY:
            return
        await self.file.flush()
        h.incompatible_features |= hdr.INCOMPAT_DIRTY
        await self.write_features()
        await self.file.flush()

    async def mark_clean(self) -> None:
        """Store deferred refcounts, then clear the dirty bit (clean close, read-only reopen)."""
        rc = self.refcounts
        if not rc.dirty and not self.header.incompatible_features & hdr.INCOMPAT_DIRTY:
            return
        await rc.write_dirty()
        await self.file.flush()
        self.header.incompatible_features &= ~hdr.INCOMPAT_DIRTY
        await self.write_features()
        await self.file.flush()

    async def discard_host(self, offset: int, length: int, always: bool = False) -> None:
        """Give a freed cluster back to the file system (pass-discard-other, or ``always``)."""
        if self.discard_other or always:
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
