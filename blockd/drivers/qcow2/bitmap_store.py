"""Persistent dirty bitmaps: when the node writes them into the image (format in :mod:`.bitmaps`)."""

from __future__ import annotations

from blockd.drivers.qcow2 import bitmaps as qbitmaps
from blockd.drivers.qcow2.resize import Qcow2Resize


class Qcow2BitmapStore(Qcow2Resize):
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

    def check_bitmap_storable(self, name: str, granularity: int) -> None:
        count = sum(1 for bm in self.bitmaps.values() if bm.persistent)
        qbitmaps.check_storable(self.image, name, granularity, count)

    async def remove_stored_bitmap(self, name: str) -> None:
        # QEMU drops the one entry; bitmaps added since are stored at close, after the rest.
        if any(e.name == name for e in self.stored_bitmaps):
            await self._store_bitmaps(in_use=True, stored_only=True)
