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
import contextvars
import errno
import logging
import os
from typing import Any

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, Extent, Status, WriteFlags
from blockd.drivers.qcow2 import bitmaps as qbitmaps
from blockd.drivers.qcow2 import compress
from blockd.drivers.qcow2 import header as hdr
from blockd.drivers.qcow2.cache import cache_config
from blockd.drivers.qcow2.cluster import (ALL_ALLOC, ALL_ZERO, COPIED, SUBCLUSTERS, ZERO, Entry,
                                          Kind, Mapping, compressed_entry)
from blockd.drivers.qcow2.image import Image
from blockd.errors import QMPError
from blockd.paths import os_path

log = logging.getLogger(__name__)


#: Files of the images whose backing files are being opened, in this open call.
_BACKING_CHAIN: contextvars.ContextVar[frozenset[tuple[int, int] | None]] = \
    contextvars.ContextVar("backing_chain", default=frozenset())


def _file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of a file, to recognise it under any name; None if it cannot be stat'ed."""
    try:
        st = os.stat(os_path(path))
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def probe_format(head: bytes) -> str:
    """What a backing file is when the image does not say: qcow2 by magic, else raw."""
    return "qcow2" if head[:4] == b"QFI\xfb" else "raw"


class Qcow2Node(BlockNode):
    driver = "qcow2"
    is_format = True

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

    # ---- open -----------------------------------------------------------------

    async def open(self, ctx: OpenContext) -> None:
        opts = self.options
        file = await ctx.open_child(opts["file"], "file")
        head = bytes(await file.read(0, min(file.length(), 65536)))
        h = hdr.parse(head, self.read_only)
        if h.cluster_size > len(head) and file.length() > len(head):
            head = bytes(await file.read(0, min(file.length(), h.cluster_size)))
            h = hdr.parse(head, self.read_only)
        if h.crypt_method:
            raise QMPError("Encrypted qcow2 images are not supported by this blockd build yet")
        if opts.get("lazy-refcounts") and h.version < 3:
            raise QMPError("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                           "compatibility level")
        caches = cache_config(opts, h)
        self.image = Image(file, h, opts.get("pass-discard-other", False), caches)
        self.map = Mapping(self.image, caches)
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
        if h.incompatible_features & hdr.INCOMPAT_DIRTY and not self.read_only:
            await self._repair_dirty()
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

    async def _data_read(self, host: int, n: int) -> bytes | bytearray | memoryview:
        """Guest data at ``host`` in the data file (deciphered when encrypted)."""
        data = await self.image.data.read(host, n)
        if self.image.crypto is not None:
            data = await self.image.crypto.decrypt_sectors(host, bytes(data))
        return data

    async def _data_write(self, host: int, buf: bytes | bytearray | memoryview) -> None:
        if self.image.crypto is not None:
            buf = await self.image.crypto.encrypt_sectors(host, bytes(buf))
        await self.image.data.write(host, buf)

    async def _alloc_data(self, guest: int) -> int:
        """A host cluster for guest cluster ``guest``: identity in an external data file."""
        if self.image.external_data:
            return guest
        return await self.image.refcounts.alloc(1)

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

    async def check(self, fix: int = 0) -> Any:
        """``qemu-img check`` for this image (see :mod:`.check`)."""
        from blockd.drivers.qcow2.check import check

        return await check(self, fix)

    async def _open_backing(self, ctx: OpenContext, h: hdr.Header) -> None:
        opts = self.options
        if "backing" in opts:
            if opts["backing"] is not None:
                await ctx.open_child(opts["backing"], "backing")
            return
        if not h.backing_file:
            return
        path = h.backing_file
        if not os.path.isabs(path) and not path.startswith("json:"):
            path = os.path.join(os.path.dirname(self.image.file.filename()), path)
        chain = _BACKING_CHAIN.get() | {_file_id(self.image.file.filename())}
        if _file_id(path) in chain - {None}:
            # QEMU would open the chain forever; a file naming itself is refused.
            raise QMPError(f"Could not open backing file: Backing chain loops back to '{path}'")
        fmt = h.backing_format
        if fmt is None:
            try:
                with open(path, "rb") as f:
                    fmt = probe_format(f.read(4))
            except OSError as exc:
                raise QMPError(f"Could not open backing file: Could not open '{path}': "
                               f"{exc.strerror}") from None
        token = _BACKING_CHAIN.set(chain)
        try:
            await ctx.open_child({"driver": fmt, "file": {"driver": "file", "filename": path}},
                                 "backing")
        except QMPError as exc:
            raise QMPError(f"Could not open backing file: {exc.desc}") from None
        finally:
            _BACKING_CHAIN.reset(token)

    async def close(self) -> None:
        if self._cleaner is not None:
            self._cleaner.cancel()
            self._cleaner = None
        if self.image is None:
            return
        if not self.read_only:
            try:
                await self._store_bitmaps(in_use=False)
                await self.image.file.flush()
            except OSError as exc:
                # Closing goes on regardless, as in QEMU; the data is as safe as the
                # failed flush left it.
                log.error("Failed to flush node '%s' on close: %s", self.node_name, exc)
        elif any(bm.persistent and not bm.inconsistent for bm in self.bitmaps.values()
                 if bm.name not in {e.name for e in self.stored_bitmaps}):
            log.warning("Lost persistent bitmaps of node '%s': it was never writable",
                        self.node_name)

    async def _store_bitmaps(self, in_use: bool) -> None:
        # Newest first on disk, as QEMU writes them.
        persistent = [bm for bm in self.bitmaps.values() if bm.persistent and not bm.inconsistent]
        keep = {bm.name for bm in self.bitmaps.values() if bm.inconsistent}
        if persistent or self.stored_bitmaps:
            async with self.image.lock:
                self.stored_bitmaps = await qbitmaps.store(self.image, persistent, in_use, keep)

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        if read_only and not self.read_only:
            # Going read-only: the bitmaps are saved now, while the file can be written.
            await self._store_bitmaps(in_use=False)
            await self.flush()
        return await super().reopen_prepare(options, read_only)

    async def reopen_commit(self, state: Any, options: dict[str, Any], read_only: bool) -> None:
        was_read_only = self.read_only
        await super().reopen_commit(state, options, read_only)
        for bitmap in self.bitmaps.values():
            bitmap.readonly = read_only
        if was_read_only and not read_only and self.image.file.read_only is False:
            # Writable again: the bitmaps loaded once are marked in use, not reloaded,
            # and any added meanwhile are stored.
            await self._store_bitmaps(in_use=True)

    def check_bitmap_storable(self, name: str, granularity: int) -> None:
        count = sum(1 for bm in self.bitmaps.values() if bm.persistent)
        qbitmaps.check_storable(self.image, name, granularity, count)

    async def remove_stored_bitmap(self, name: str) -> None:
        if any(e.name == name for e in self.stored_bitmaps):
            await self._store_bitmaps(in_use=True)

    # ---- helpers ----------------------------------------------------------------

    @property
    def cs(self) -> int:
        return self.image.cluster_size

    def length(self) -> int:
        return self.image.header.size

    def _writable(self) -> None:
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
                return bytes(await self._data_read(entry.host + start, n))
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
                out += await self._data_read(entry.host + pos, m)
            elif state == "unallocated":
                out += await self._backing_read(guest + pos, m)
            else:
                out += bytes(m)
            pos += m
        return bytes(out)

    # ---- reads ------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
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
                # Coalesce host-contiguous clusters into one read.
                host = entry.host + start
                next_guest, expect = guest + cs, entry.host + cs
                while offset + n < end:
                    nxt = await self.map.lookup(next_guest)
                    if nxt.kind(self.image.header.cluster_bits) != Kind.NORMAL or nxt.host != expect:
                        break
                    n += min(end - offset - n, cs)
                    next_guest, expect = next_guest + cs, expect + cs
                self.image.debug_event("read_aio")
                parts.append(await self._data_read(host, n))
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
            chunk = view[pos:pos + n]
            entry = await self.map.lookup(guest)
            if self._in_place(entry, start, n):
                self.image.debug_event("write_aio")
                await self._data_write(entry.host + start, chunk)
            else:
                async with self.image.lock:
                    await self._allocating_write(guest, start, chunk)
            pos += n
        if flags & WriteFlags.FUA:
            await self.flush()

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
        entry = await self.map.lookup(guest)  # again, under the lock
        cb = self.image.header.cluster_bits
        kind = entry.kind(cb)
        n = len(chunk)
        if self._in_place(entry, start, n):
            await self._data_write(entry.host + start, chunk)
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
            await self._data_write(entry.host + lo, bytes(buf))
            bitmap = (entry.bitmap | touched) & ~(touched << 32)
            await self.map.set(guest, Entry(entry.raw, bitmap))
            return
        buf: bytearray | memoryview
        whole = start == 0 and n == self.cs
        if whole:
            buf = chunk  # the guest wrote the whole cluster: nothing to copy
        else:
            self.image.debug_event("cow_read")
            buf = await self._cluster_content(guest, entry)
            buf[start:start + n] = chunk
        await self.map.prepare(guest)
        host = await self._alloc_data(guest)
        self.image.debug_event("write_aio" if whole else "cow_write")
        try:
            await self._data_write(host, buf)
        except OSError:
            if not self.image.external_data:
                await self.image.refcounts.free(host)
            raise
        if self.map.ext:
            if kind in (Kind.COMPRESSED, Kind.NORMAL):
                bitmap = ALL_ALLOC
            else:
                bitmap = (entry.bitmap | touched) & ~(touched << 32)
            new = Entry(host | COPIED, bitmap)
        else:
            new = Entry(host | COPIED)
        await self.map.set(guest, new)
        await self._release(entry, kind)

    async def _release(self, entry: Entry, kind: Kind) -> None:
        """Drop the reference an old L2 entry held on its host cluster(s)."""
        if kind == Kind.COMPRESSED:
            off, n = entry.compressed_span(self.image.header.cluster_bits)
            first, last = off // self.cs, (off + n - 1) // self.cs
            await self.image.refcounts.free(first * self.cs, last - first + 1)
        elif entry.host and not self.image.external_data:
            await self.image.refcounts.free(entry.host)

    async def compress_cluster(self, data: bytes) -> bytes:
        """Compress one cluster in a worker thread (callers may run many at once)."""
        return await compress.compress(bytes(data), self.image.header.compression_type)

    async def write_compressed(self, offset: int, data: bytes, packed: bytes | None = None) -> None:
        """Store one whole cluster compressed (blockd-img convert -c)."""
        self._writable()
        cs = self.cs
        if offset % cs or len(data) != cs:
            raise OSError(errno.EINVAL, "Compressed writes must cover whole clusters")
        if self.image.external_data or self.image.crypto is not None:
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
            await self.image.file.write(pos, packed)
            self.compress_pos = pos + len(packed)
            cb = self.image.header.cluster_bits
            await self.map.set(offset, Entry(compressed_entry(pos, len(packed), cb)))
            await self._release(old, old.kind(cb))

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        self._writable()
        if self.data_raw:
            # The data file must stay a faithful raw image: zeroes are really written.
            for pos in range(offset, offset + length, 1 << 20):
                await self.write(pos, bytes(min(1 << 20, offset + length - pos)))
            return
        cs = self.cs
        end = offset + length
        head_end = min(end, -(-offset // cs) * cs)
        tail_start = max(head_end, end - end % cs) if end != self.length() else end
        if end == self.length() and end % cs:
            tail_start = end  # the last, partial cluster can be zeroed whole
        partial = [(offset, head_end - offset)] if offset % cs else []
        full_start = offset if not offset % cs else head_end
        if tail_start < end:
            partial.append((tail_start, end - tail_start))
        if self.image.header.version < 3:
            partial = [(offset, length)]
            full_start = tail_start = offset
        if partial and flags & WriteFlags.NO_FALLBACK:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        for off, n in partial:
            if n > 0:
                await self.write(off, bytes(n))
        if tail_start > full_start:
            async with self.image.lock:
                for guest in range(full_start, tail_start, cs):
                    await self._zero_cluster(guest, bool(flags & WriteFlags.MAY_UNMAP))
        if flags & WriteFlags.FUA:
            await self.flush()

    async def _zero_cluster(self, guest: int, unmap: bool) -> None:
        entry = await self.map.lookup(guest)
        kind = entry.kind(self.image.header.cluster_bits)
        keep = (not unmap and entry.copied and kind in (Kind.NORMAL, Kind.ZERO_ALLOC))
        if self.map.ext:
            new = Entry(entry.host | COPIED if keep else 0, ALL_ZERO)
        else:
            new = Entry(entry.host | COPIED | ZERO if keep else ZERO)
        await self.map.set(guest, new)
        if not keep:
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
                entry = await self.map.lookup(guest)
                kind = entry.kind(self.image.header.cluster_bits)
                # With a backing file the cluster must read as zeroes afterwards, so it
                # becomes a zero cluster (v2 has none: the backing file shows through).
                if self.backing is not None or kind != Kind.UNALLOCATED:
                    if self.map.ext:
                        new = Entry(0, ALL_ZERO)
                    else:
                        new = Entry(ZERO if self.image.header.version >= 3 else 0)
                else:
                    new = Entry(0)
                if new == Entry(entry.raw & ~COPIED if not entry.host else entry.raw,
                                entry.bitmap):
                    continue
                await self.map.set(guest, new)
                if self.options.get("pass-discard-request", True) and entry.host:
                    self.image.discard_other, saved = True, self.image.discard_other
                    try:
                        await self._release(entry, kind)
                    finally:
                        self.image.discard_other = saved
                else:
                    await self._release(entry, kind)

    async def flush(self) -> None:
        self.image.debug_event("flush_to_os")
        self.image.debug_event("flush_to_disk")
        await self.image.file.flush()

    # ---- status and size --------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
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
            if status is None:
                return await self._unallocated_status(offset, n)
            host = entry.host + offset - guest if state == "data" else None
            if host is None:
                return Extent(n, status)
            return await self._data_status(n, status, host)
        # Extend over following clusters of the same kind.
        while offset + n < offset + length:
            nxt = await self.map.lookup(guest + cs)
            if nxt.kind(cb) != kind or (kind == Kind.NORMAL and nxt.host != entry.host + cs):
                break
            guest += cs
            entry = nxt
            n = min(length, guest + cs - offset)
        if kind == Kind.NORMAL:
            first = await self.map.lookup(offset - offset % cs)
            return await self._data_status(n, Status.DATA | Status.ALLOCATED,
                                           first.host + offset % cs)
        if kind == Kind.COMPRESSED:
            return Extent(n, Status.DATA | Status.ALLOCATED)
        if kind in (Kind.ZERO_PLAIN, Kind.ZERO_ALLOC):
            return Extent(n, Status.ZERO | Status.ALLOCATED)
        return await self._unallocated_status(offset, n)

    async def _data_status(self, n: int, status: Status, host: int) -> Extent:
        """Status of allocated data: with metadata preallocation the file's holes read as zero."""
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
                threshold = max(real * 11 // 10, real + 2 * self.cs)
                rc, used = self.image.refcounts, 0
                self._metadata_prealloc = False
                for c in range(rc.alloc_end):
                    if await rc.get(c):
                        used += self.cs
                        if used > threshold:
                            self._metadata_prealloc = True
                            break
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
        if size % 512:
            raise OSError(errno.EINVAL, "The new size must be a multiple of 512")
        h = self.image.header
        cs = self.cs
        async with self.image.lock:
            if size < h.size:
                for guest in range(-(-size // cs) * cs, h.size, cs):
                    entry = await self.map.lookup(guest)
                    kind = entry.kind(h.cluster_bits)
                    if kind != Kind.UNALLOCATED or entry.bitmap:
                        await self.map.set(guest, Entry(0))
                        await self._release(entry, kind)
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
            if self.data_raw:
                await self.image.data.truncate(size, exact=True)
            h.size = size
            await self.image.file.write(24, size.to_bytes(8, "big"))
            if prealloc in ("metadata", "falloc", "full") and size > 0:
                await self._preallocate(prealloc)
        await self.image.file.flush()

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

    async def _preallocate(self, mode: str) -> None:
        """Allocate every cluster (metadata: mapping only; falloc/full: the file too)."""
        cs = self.cs
        runs: list[list[int]] = []  # [host, length] of newly mapped data, merged
        for guest in range(0, self.length(), cs):
            entry = await self.map.lookup(guest)
            if entry.kind(self.image.header.cluster_bits) != Kind.UNALLOCATED:
                continue
            host = await self._alloc_data(guest)
            bitmap = ALL_ALLOC if self.map.ext else 0
            await self.map.set(guest, Entry(host | COPIED, bitmap))
            if runs and runs[-1][0] + runs[-1][1] == host:
                runs[-1][1] += cs
            else:
                runs.append([host, cs])
        data = self.image.data
        end = self.length() if self.image.external_data else self.image.refcounts.alloc_end * cs
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

    # ---- queries ----------------------------------------------------------------

    def cluster_size(self) -> int | None:
        return self.cs

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
        else:
            data = {"compat": "1.1",
                    "compression-type": "zstd" if h.compression_type else "zlib",
                    "lazy-refcounts": bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS),
                    "refcount-bits": h.refcount_bits}
            if h.data_file is not None:
                data["data-file"] = h.data_file
            if self.image.external_data:
                data["data-file-raw"] = self.data_raw
            data["corrupt"] = bool(h.incompatible_features & hdr.INCOMPAT_CORRUPT)
            data["extended-l2"] = h.extended_l2
            if self.stored_bitmaps:
                data["bitmaps"] = qbitmaps.info(self.stored_bitmaps)
        return {"type": "qcow2", "data": data}


def _sub_mask(first: int, last: int) -> int:
    """Bits ``first``..``last`` (inclusive) set: the subclusters a range touches."""
    return ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
