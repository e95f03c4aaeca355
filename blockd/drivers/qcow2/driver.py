"""The qcow2 node: guest reads and writes on top of the mapping and refcounts.

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

import asyncio
import contextlib
import errno
import logging
import os
from typing import Any, AsyncIterator, Callable

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, Claim, Extent, Status, WriteFlags, check_length
from blockd.drivers.backing import open_backing_file
from blockd.drivers.qcow2 import bitmaps as qbitmaps
from blockd.drivers.qcow2 import compress, crypt
from blockd.drivers.qcow2 import header as hdr
from blockd.drivers.qcow2 import snapshot as qsnap
from blockd.drivers.qcow2 import overlap
from blockd.drivers.qcow2.cache import cache_config
from blockd.drivers.qcow2.cluster import (ALL_ALLOC, ALL_ZERO, COPIED, L1_OFFSET_MASK, SUBCLUSTERS,
                                          OFFSET_MASK, ZERO, Entry, Kind, Mapping,
                                          compressed_entry, continuing)
from blockd.drivers.qcow2.image import Image
from blockd.drivers.sector_io import WriteGate, sector_span
from blockd.errors import QMPError

log = logging.getLogger(__name__)


class Qcow2Node(BlockNode):
    driver = "qcow2"
    is_format = True
    supports_backing = True

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.image: Image | None = None
        self.map: Mapping | None = None
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
        self._gate = WriteGate()

    # ---- open -----------------------------------------------------------------

    async def open(self, ctx: OpenContext) -> None:
        opts = self.options
        file = await ctx.open_child(opts["file"], "file")
        head = bytes(await file.read(0, min(file.length(), 65536)))
        # A repair (blockd-img check -r) is the one writer a corrupt image admits.
        may_be_corrupt = self.read_only or bool(opts.get("x-repair"))
        h = hdr.parse(head, may_be_corrupt, bool(opts.get("x-check")))
        if h.cluster_size > len(head) and file.length() > len(head):
            head = bytes(await file.read(0, min(file.length(), h.cluster_size)))
            h = hdr.parse(head, may_be_corrupt, bool(opts.get("x-check")))
        if opts.get("lazy-refcounts") and h.version < 3:
            raise QMPError("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                           "compatibility level")
        caches = cache_config(opts, h)
        self.image = Image(file, h, opts.get("pass-discard-other", False), caches,
                           overlap.parse_option(opts.get("overlap-check")), self.node_name,
                           ctx.graph.emit, lambda: not self.read_only)
        self.map = Mapping(self.image, caches)
        self.encryption = await crypt.open_encryption(
            self.image, opts.get("encrypt"), ctx.secret, not ctx.graph.no_io)
        if self.encryption is not None:
            self.image.crypto = self.encryption.data
        await self._open_data_file(ctx, h)
        try:
            await self.map.load()
        except OSError as exc:
            raise QMPError(f"Could not read L1 table: {os.strerror(exc.errno or errno.EIO)}") \
                from None
        try:
            await self.image.refcounts.load()
        except OSError as exc:
            raise QMPError("Could not initialize refcount handling: "
                           f"{os.strerror(exc.errno or errno.EIO)}") from None
        # A check reads the table itself, so that it can repair it (QEMU's check mode).
        self.image.snapshots = [] if opts.get("x-check") else await qsnap.load(self.image)
        await self.image.metadata.load_snapshots()
        if opts.get("snapshot") is not None:
            await self._load_snapshot(opts["snapshot"])
        # blockd-img check -r repairs a dirty image itself, as qemu-img check -r does.
        if h.incompatible_features & hdr.INCOMPAT_DIRTY and not self.read_only \
                and not opts.get("x-repair"):
            await self._repair_dirty()
        # The runtime option overrides what the image was created with, as in QEMU.
        self.image.refcounts.lazy = not self.read_only and opts.get(
            "lazy-refcounts", bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS))
        if not self.read_only and h.version >= 3 and h.autoclear_features & ~hdr.AUTOCLEAR_KNOWN:
            h.autoclear_features &= hdr.AUTOCLEAR_KNOWN
            await self.image.write_features()
        await self._open_backing(ctx, h)
        self.stored_bitmaps = await qbitmaps.load_directory(self.image)
        self.bitmaps = await qbitmaps.load(self.image, h.size, not self.read_only)
        if not self.read_only:
            self.stored_bitmaps = await qbitmaps.load_directory(self.image)
        if caches.clean_interval:
            self._cleaner = asyncio.get_running_loop().create_task(
                self._clean_caches(caches.clean_interval))

    async def _load_snapshot(self, key: str) -> None:
        """The ``snapshot`` option: by id, else by name, as ``qemu-img convert -l`` finds it."""
        sn = qsnap.find_id_or_name(self.image.snapshots, key)
        if not self.read_only:
            raise QMPError("Device is not readonly")
        if sn is None:
            raise QMPError("Can't find snapshot")
        await self.show_snapshot(sn, own_size=True)

    async def show_snapshot(self, sn: qsnap.Snapshot, own_size: bool) -> None:
        """Show a snapshot's content instead of the active image (read-only nodes only).

        qemu-img's ``-l`` keeps the active image's virtual size (past the
        snapshot's tables reads as unallocated); the ``snapshot`` option of
        blockdev-add shows the snapshot's own size, as reverting to it would.
        """
        if not self.read_only:
            raise QMPError("Device is not readonly")
        try:
            await qsnap.load_view(self, sn)
        except OSError as exc:
            raise QMPError(exc.strerror) from None
        self.loaded_snapshot = sn
        self._shown_size = sn.disk_size if own_size else None
        self._last_inflated = None

    async def _open_data_file(self, ctx: OpenContext, h: hdr.Header) -> None:
        """Attach the external data file named by the option or by the header extension."""
        ref = self.options.get("data-file")
        if not h.incompatible_features & hdr.INCOMPAT_DATA_FILE:
            if ref is not None:
                raise QMPError("'data-file' can only be set for images with an external data file")
            if h.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW:
                raise QMPError("data-file-raw requires a data file")
            return
        if ref is None and h.data_file:
            path = h.data_file
            if not os.path.isabs(path):
                path = os.path.join(os.path.dirname(self.image.file.filename()), path)
            ref = {"driver": "file", "filename": path}
        if ref is None:
            raise QMPError("'data-file' is required for this image")
        self.image.data = await ctx.open_child(ref, "data-file")
        self.image.external_data = True

    @property
    def data_raw(self) -> bool:
        """The data file alone is a valid raw image (``data-file-raw``)."""
        return bool(self.image.header.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW)

    async def _data_read(self, host: int, guest: int, n: int) -> bytes | bytearray | memoryview:
        """Guest data at ``host`` in the data file (deciphered when encrypted).

        ``guest`` is the guest offset of the same byte: legacy AES derives
        IVs from it.  Encrypted data is read in whole sectors.
        """
        crypto = self.image.crypto
        if crypto is None:
            return await self.image.data.read(host, n)
        start, end = sector_span(host, n)
        raw = bytes(await self.image.data.read(start, end - start))
        raw += bytes(end - start - len(raw))
        plain = await crypto.decrypt_sectors(start, guest - (host - start), raw)
        if start == host and end == host + n:
            return plain
        return memoryview(plain)[host - start:host - start + n]

    async def _data_write(self, host: int, guest: int, buf: bytes | bytearray | memoryview) -> None:
        if not self.image.external_data:
            hit = self.image.metadata.check(host, len(buf))
            if hit:
                await self.image.refuse_overlap(host, len(buf), hit)
        crypto = self.image.crypto
        if crypto is None:
            await self.image.data.write(host, buf)
            return
        # Sectors are encrypted whole: a partial one is read, patched and rewritten,
        # and no other write may touch it meanwhile.
        start, end = sector_span(host, len(buf))
        rmw = start != host or end != host + len(buf)
        entry = await self._gate.enter(start, end, rmw)
        try:
            if rmw:
                plain = bytearray(await self._data_read(start, guest - (host - start),
                                                        end - start))
                plain[host - start:host - start + len(buf)] = buf
                buf = plain
            cipher = await crypto.encrypt_sectors(start, guest - (host - start), bytes(buf))
            await self.image.data.write(start, cipher)
        finally:
            self._gate.leave(entry)

    async def _alloc_data(self, guest: int) -> int:
        """A host cluster for guest cluster ``guest``: identity in an external data file."""
        if self.image.external_data:
            return guest
        return await self.image.refcounts.alloc(1, hold=True)

    async def _clean_caches(self, interval: int) -> None:
        """Give back memory of metadata nobody used for a whole interval."""
        while True:
            await asyncio.sleep(interval)
            self.map.cache.clean()
            self.image.refcounts.blocks.clean()

    async def _repair_dirty(self) -> None:
        """A dirty image (lazy refcounts, not closed cleanly) is repaired before use, as QEMU does."""
        from blockd.drivers.qcow2.check import FIX_ERRORS, FIX_LEAKS, check

        res = await check(self, FIX_LEAKS | FIX_ERRORS)
        if res.corruptions or res.check_errors:
            raise QMPError("Could not repair dirty image: "
                           f"{res.corruptions} corruptions remain")
        self.image.header.incompatible_features &= ~hdr.INCOMPAT_DIRTY
        await self.image.write_features()
        await self.image.file.flush()

    async def check(self, fix: int = 0, sink: Callable[[str], None] | None = None) -> Any:
        """``qemu-img check`` for this image (see :mod:`.check`); ``sink`` gets each message.

        A full repair that leaves no corruption clears the corrupt bit, so
        the image can be opened read-write again.
        """
        from blockd.drivers.qcow2.check import FIX_ERRORS, check

        if not self.read_only:
            async with self.image.lock:
                await self.map.write_pending()  # the check reads tables from the file
        res = await check(self, fix, sink)
        h = self.image.header
        if (fix & FIX_ERRORS and h.incompatible_features & hdr.INCOMPAT_CORRUPT
                and not res.corruptions and not res.check_errors):
            await self.image.file.flush()
            h.incompatible_features &= ~hdr.INCOMPAT_CORRUPT
            await self.image.write_features()
            await self.image.file.flush()
            self.image.corrupt = False
        return res

    async def _open_backing(self, ctx: OpenContext, h: hdr.Header) -> None:
        opts = self.options
        if "backing" in opts:
            if opts["backing"] is not None:
                await ctx.open_child(opts["backing"], "backing")
            return
        if not h.backing_file:
            return
        await open_backing_file(ctx, self.image.file, h.backing_file, h.backing_format)

    async def close(self) -> None:
        if self._cleaner is not None:
            self._cleaner.cancel()
            self._cleaner = None
        if self.image is None or self.image.stopped:
            return
        if not self.read_only:
            try:
                async with self.image.lock:
                    await self.map.write_pending()
                await self._store_bitmaps(in_use=False)
                await self.image.mark_clean()
                await self.image.file.flush()
            except OSError as exc:
                # Closing goes on regardless, as in QEMU; the data is as safe as the
                # failed flush left it.
                log.error("Failed to flush node '%s' on close: %s", self.node_name, exc)
        elif any(bm.persistent and not bm.inconsistent for bm in self.bitmaps.values()
                 if bm.name not in {e.name for e in self.stored_bitmaps}):
            log.warning("Lost persistent bitmaps of node '%s': it was never writable",
                        self.node_name)

    async def _store_bitmaps(self, in_use: bool, stored_only: bool = False) -> None:
        """Write the persistent bitmaps (``stored_only``: only those already in the file)."""
        # Newest first on disk, as QEMU writes them.
        persistent = [bm for bm in self.bitmaps.values() if bm.persistent and not bm.inconsistent]
        if stored_only:
            names = {e.name for e in self.stored_bitmaps}
            persistent = [bm for bm in persistent if bm.name in names]
        keep = {bm.name for bm in self.bitmaps.values() if bm.inconsistent}
        if persistent or self.stored_bitmaps:
            async with self.image.lock:
                self.stored_bitmaps = await qbitmaps.store(self.image, persistent, in_use, keep)

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        if not read_only and self.loaded_snapshot is not None:
            raise QMPError("Device is not readonly")
        # The image stays unlocked with its key; only the format is checked again.
        if self.options.get("encrypt") is not None and options.get("encrypt") is None:
            raise QMPError("Option 'encrypt.format' cannot be reset to its default value")
        crypt.check_options(self.image.header, options.get("encrypt"))
        if read_only and not self.read_only:
            # Going read-only: table changes, bitmaps and deferred refcounts are
            # saved now, while the file can be written.
            async with self.image.lock:
                await self.map.write_pending()
            await self._store_bitmaps(in_use=False)
            await self.image.mark_clean()
            await self.flush()
        return await super().reopen_prepare(options, read_only)

    async def reopen_commit(self, state: Any, options: dict[str, Any], read_only: bool) -> None:
        was_read_only = self.read_only
        await super().reopen_commit(state, options, read_only)
        for bitmap in self.bitmaps.values():
            bitmap.readonly = read_only
        h = self.image.header
        rc = self.image.refcounts
        rc.lazy = not read_only and options.get(
            "lazy-refcounts", bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS))
        if not rc.lazy and not read_only and rc.dirty:
            # Lazy refcounts switched off: from now on the file must hold exact counts.
            async with self.image.lock:
                await self.map.write_pending()
                await self.image.mark_clean()
        if was_read_only and not read_only and self.image.file.read_only is False:
            # Writable again: the bitmaps loaded once are marked in use, not reloaded,
            # and any added meanwhile are stored.
            await self._store_bitmaps(in_use=True)

    def check_bitmap_storable(self, name: str, granularity: int) -> None:
        count = sum(1 for bm in self.bitmaps.values() if bm.persistent)
        qbitmaps.check_storable(self.image, name, granularity, count)

    async def remove_stored_bitmap(self, name: str) -> None:
        # QEMU drops the one entry; bitmaps added since are stored at close, after the rest.
        if any(e.name == name for e in self.stored_bitmaps):
            await self._store_bitmaps(in_use=True, stored_only=True)

    # ---- helpers ----------------------------------------------------------------

    @property
    def cs(self) -> int:
        return self.image.cluster_size

    def length(self) -> int:
        if self._shown_size is not None:
            return self._shown_size
        return self.image.header.size

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

    async def _backing_read(self, offset: int, length: int) -> bytes:
        backing = self.backing
        if backing is None:
            return bytes(length)
        self.image.debug_event("read_backing_aio")
        blen = backing.length()
        if offset >= blen:
            return bytes(length)
        n = min(length, blen - offset)
        data = bytes(await backing.read(offset, n))
        return data + bytes(length - n)

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

    def _sub_state(self, entry: Entry, kind: Kind, index: int) -> str:
        """What subcluster ``index`` of an extended-L2 cluster reads as."""
        if kind == Kind.COMPRESSED:
            return "compressed"
        if entry.bitmap & (1 << (32 + index)):
            return "zero"
        if entry.bitmap & (1 << index):
            return "data"
        return "unallocated"

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

    # ---- reads ------------------------------------------------------------------

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
                n = await self._host_run(guest, entry, n, end - offset - n, owned=False)
                self.image.debug_event("read_aio")
                parts.append(await self._data_read(entry.host + start, offset, n))
            else:
                parts.append(await self._read_in_cluster(guest, entry, start, n))
            offset += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # ---- writes -----------------------------------------------------------------

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
                run = n if self.map.ext else \
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
        if WriteFlags.FUA in flags:  # cheaper than ``&``, which builds a new flag value
            await self.flush()

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
        need = _sub_mask(start // sc, (start + n - 1) // sc)
        return entry.bitmap & need == need and not entry.bitmap >> 32 & need

    async def _cluster_content(self, guest: int, entry: Entry) -> bytearray:
        return bytearray(await self._read_in_cluster(guest, entry, 0, self.cs))

    async def _allocating_write(self, guest: int, start: int, chunk: memoryview) -> None:
        entry = await self.map.lookup(guest, guest + start)  # again, under the lock
        cb = self.image.header.cluster_bits
        kind = entry.kind(cb)
        n = len(chunk)
        if self._in_place(entry, start, n):
            await self._data_write(entry.host + start, guest + start, chunk)
            return
        sc = self.cs // SUBCLUSTERS
        touched = _sub_mask(start // sc, (start + n - 1) // sc) if self.map.ext else 0
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
        buf: bytearray | memoryview
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
        mask = _sub_mask(first, first + -(-length // sc) - 1)
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

    async def flush(self) -> None:
        self._live()
        # Writing the tables is the "to the OS" part of a flush, as in QEMU.
        self.image.debug_event("flush_to_os")
        async with self.image.lock:
            await self.map.write_pending()
        self.image.debug_event("flush_to_disk")
        await self.image.file.flush()

    # ---- status and size --------------------------------------------------------

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
                    return Extent(n, Status.ZERO, host, self.image.data)
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
        return Extent(n, Status.ZERO | Status.ALLOCATED, host, self.image.data)

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
                             host + pos - (guest + i * cs), self.image.data)
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
        return Extent(n, status, host, file)

    async def _preallocated_metadata(self) -> bool:
        """Guess, like QEMU, whether clusters were allocated without data being written.

        Asking the file about every data cluster costs a syscall each, so it is
        done only when the file holds clearly less than the refcounts claim.
        """
        if self._metadata_prealloc is None:
            real = self.image.file.allocated_file_size()
            if real is None:
                self._metadata_prealloc = False
            else:
                threshold = max(real * 11 // 10, real + 2 * self.cs) // self.cs
                rc = self.image.refcounts
                self._metadata_prealloc = await rc.count_used(rc.alloc_end, threshold) > threshold
        return self._metadata_prealloc

    async def _unallocated_status(self, offset: int, n: int) -> Extent:
        backing = self.backing
        if backing is None:
            return Extent(n, Status.ZERO)
        if offset >= backing.length():
            return Extent(n, Status.ZERO)
        ext = await backing.block_status(offset, min(n, backing.length() - offset))
        return Extent(ext.length, ext.status & ~Status.ALLOCATED, ext.offset, ext.child)

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

    # ---- internal snapshots -----------------------------------------------------

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """The image to ourselves: metadata lock held and no write in place running."""
        self._quiescing = True
        try:
            async with self.image.lock:
                await self._writes_idle.wait()
                self._generation += 1
                # Snapshot code works on the tables in the file: changes held
                # in memory go there first, and what it moved is noted after.
                await self.map.write_pending()
                try:
                    yield
                finally:
                    await self.image.metadata.load_snapshots()
                    self.image.metadata.track_active_l2(self.map.l1)
        finally:
            self._quiescing = False

    async def snapshot_create(self, name: str, stamp: tuple[int, int, int],
                              icount: int = -1) -> qsnap.Snapshot:
        """Take an internal snapshot; ``stamp`` is (date sec, date nsec, VM clock ns)."""
        self._writable()
        date_sec, date_nsec, vm_clock = stamp
        async with self._exclusive():
            sn = qsnap.Snapshot(id=qsnap.new_id(self.image.snapshots), name=name,
                                date_sec=date_sec, date_nsec=date_nsec,
                                vm_clock_nsec=vm_clock, icount=icount)
            return await qsnap.create(self, sn)

    async def snapshot_delete(self, sn: qsnap.Snapshot) -> None:
        self._writable()
        async with self._exclusive():
            await qsnap.delete(self, sn)

    async def snapshot_revert(self, sn: qsnap.Snapshot) -> None:
        """Go back to a snapshot, its virtual size included (``qemu-img snapshot -a``).

        Bitmaps would no longer describe the content, so QEMU refuses while any exist.
        """
        self._writable()
        if self.bitmaps:
            raise QMPError("Device has active dirty bitmaps")
        if sn.disk_size != self.length():
            await self.truncate(sn.disk_size)
        async with self._exclusive():
            await qsnap.revert(self, sn)
            self._last_inflated = None

    def snapshots(self) -> list[dict[str, Any]]:
        return [sn.info() for sn in self.image.snapshots]

    # ---- queries ----------------------------------------------------------------

    def cluster_size(self) -> int | None:
        return self.cs

    def encrypted(self) -> bool:
        return self.encryption is not None

    def has_zero_init(self) -> bool:
        """QEMU's rule: without a backing file, an image whose tables were not
        preallocated (no first L2 table) reads as zeroes; a preallocated one only
        unencrypted, as far as its data file does (its clusters read the file)."""
        if self.backing is not None:
            return False
        if not (self.map.l1 and self.map.l1[0]):
            return True
        return self.encryption is None and self.image.data.has_zero_init()

    def _key_secret(self) -> str | None:
        return (self.options.get("encrypt") or {}).get("key-secret")

    def exact_filename(self) -> str | None:
        """The key secret is needed to reopen the image, so it makes the name ``json:``."""
        if self._key_secret() is not None:
            return None
        return super().exact_filename()

    def full_options(self) -> dict[str, Any]:
        opts = super().full_options()
        key = self._key_secret()
        if key is not None:
            # QEMU names the option flattened, and lists it first.
            opts = {"encrypt.key-secret": key, **opts}
        return opts

    async def amend(self, opts: dict[str, Any], secret: Any, force: bool = False) -> None:
        """Change the encryption key slots (``blockdev-amend`` ``encrypt`` options).

        Same interface as :meth:`blockd.drivers.luks.LuksNode.amend`.
        """
        enc = self.encryption
        if enc is None:
            raise QMPError("image is not encrypted, can't amend")
        if opts.get("format", "luks") != "luks":
            raise QMPError("Amend can't be used to change the qcow2 encryption format")
        if enc.format != "luks":
            raise QMPError("Only LUKS encryption options can be amended for qcow2 with "
                           "blockdev-amend")
        opts = {k: v for k, v in opts.items() if k != "format"}
        await crypt.amend_luks(self.image, enc, opts, secret,
                               (self.options.get("encrypt") or {}).get("key-secret"), force)
    def ejected(self) -> bool:
        return self.image is not None and self.image.stopped

    def is_dirty(self) -> bool:
        return bool(self.image.header.incompatible_features & hdr.INCOMPAT_DIRTY)

    def backing_filename(self) -> str | None:
        return self.image.header.backing_file

    def backing_format(self) -> str | None:
        return self.image.header.backing_format

    def format_specific(self) -> dict[str, Any] | None:
        h = self.image.header
        if h.version < 3:
            data: dict[str, Any] = {"compat": "0.10", "compression-type": "zlib",
                                    "refcount-bits": h.refcount_bits}
            if self.encryption is not None:
                data["encrypt"] = self.encryption.info()
        else:
            data = {"compat": "1.1",
                    "compression-type": "zstd" if h.compression_type else "zlib",
                    "lazy-refcounts": bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS),
                    "refcount-bits": h.refcount_bits}
            if h.data_file is not None:
                data["data-file"] = h.data_file
            if self.image.external_data:
                data["data-file-raw"] = self.data_raw
            if self.encryption is not None:
                data["encrypt"] = self.encryption.info()
            data["corrupt"] = bool(h.incompatible_features & hdr.INCOMPAT_CORRUPT)
            data["extended-l2"] = h.extended_l2
            if self.stored_bitmaps:
                data["bitmaps"] = qbitmaps.info(self.stored_bitmaps)
        return {"type": "qcow2", "data": data}


def _sub_mask(first: int, last: int) -> int:
    """Bits ``first``..``last`` (inclusive) set: the subclusters a range touches."""
    return ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
