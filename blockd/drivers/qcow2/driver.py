"""The qcow2 node that the rest of blockd opens and imports.

It is built in layers, one module per concern, each subclassing the one
below so it may call what they provide:

========================  ============================================
:mod:`.node`              shared state, guest data in the data file
:mod:`.read`              reads
:mod:`.status`            block status
:mod:`.write`             writes, copy on write, allocation
:mod:`.zero`              write zeroes, discard
:mod:`.compressed`        compressed writes
:mod:`.resize`            truncate, preallocation
:mod:`.bitmap_store`      storing persistent bitmaps
:mod:`.open`              open, close, check
:mod:`.reopen`            reopen
this module               internal snapshots, queries, amend
========================  ============================================
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

from blockd.drivers.qcow2 import bitmaps as qbitmaps
from blockd.drivers.qcow2 import crypt
from blockd.drivers.qcow2 import header as hdr
from blockd.drivers.qcow2 import snapshot as qsnap
from blockd.drivers.qcow2.reopen import Qcow2Reopen
from blockd.errors import QMPError


class Qcow2Node(Qcow2Reopen):
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
        return self.encryption is None and self.image.data.child.has_zero_init()

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

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        from blockd.drivers.qcow2.amend import change_backing_file

        await change_backing_file(self, name, fmt)

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
        return getattr(self, "image", None) is not None and self.image.stopped

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
