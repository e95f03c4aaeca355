"""Reopen: switching between read-only and read-write, and lazy refcounts."""

from __future__ import annotations

from typing import Any

from blockd.drivers.qcow2 import crypt
from blockd.drivers.qcow2 import header as hdr
from blockd.drivers.qcow2.open import Qcow2Open
from blockd.errors import QMPError


class Qcow2Reopen(Qcow2Open):
    #: A reopen made the node writable: its bitmaps are stored once the file's edge is.
    _made_writable = False

    def child_changed(self, role: str) -> None:
        link = self.children.get(role)
        if role == "file" and link is not None:
            self.image.file = link
            self.image.debug_event = link.debug_event

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
        self._made_writable = was_read_only and not read_only

    async def reopen_commit_post(self) -> None:
        if self._made_writable and self.image.file.child.read_only is False:
            # Writable again, through the file's edge too: the bitmaps loaded once are
            # marked in use, not reloaded, and any added meanwhile are stored.
            self._made_writable = False
            await self._store_bitmaps(in_use=True)
