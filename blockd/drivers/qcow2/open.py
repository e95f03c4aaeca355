"""Open and close: header, tables, encryption, data file, backing chain, bitmaps."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any, Callable

from blockd.block.graph import OpenContext
from blockd.drivers.backing import open_backing_file
from blockd.drivers.qcow2 import bitmaps as qbitmaps
from blockd.drivers.qcow2 import crypt
from blockd.drivers.qcow2 import header as hdr
from blockd.drivers.qcow2 import snapshot as qsnap
from blockd.drivers.qcow2 import overlap
from blockd.drivers.qcow2.bitmap_store import Qcow2BitmapStore
from blockd.drivers.qcow2.cache import cache_config
from blockd.drivers.qcow2.cluster import Mapping
from blockd.drivers.qcow2.image import Image
from blockd.drivers.sector_io import SECTOR
from blockd.errors import QMPError

log = logging.getLogger(__name__)


class Qcow2Open(Qcow2BitmapStore):
    async def open(self, ctx: OpenContext) -> None:
        opts = self.options
        await ctx.open_child(opts["file"], "file")
        file = self.file_child
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
            # Data is ciphered in whole sectors: the request path pads partial ones.
            self.request_alignment = SECTOR
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
            raise QMPError(exc.strerror or str(exc)) from None
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
                path = os.path.join(os.path.dirname(self.image.file.child.filename()), path)
            ref = {"driver": "file", "filename": path}
        if ref is None:
            raise QMPError("'data-file' is required for this image")
        await ctx.open_child(ref, "data-file")
        self.image.data = self.children["data-file"]
        self.image.external_data = True

    async def _open_backing(self, ctx: OpenContext, h: hdr.Header) -> None:
        opts = self.options
        if "backing" in opts:
            if opts["backing"] is not None:
                await ctx.open_child(opts["backing"], "backing")
            return
        if not h.backing_file:
            return
        await open_backing_file(ctx, self.file_node, h.backing_file, h.backing_format)

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

    async def close(self) -> None:
        if self._cleaner is not None:
            self._cleaner.cancel()
            self._cleaner = None
        if getattr(self, "image", None) is None or self.image.stopped:
            return  # never opened, or no driver any more
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
