"""The ``qed`` node: guest I/O on QED images, as QEMU 7.2 does it.

A write to clusters without data takes new clusters at the end of the
file (contiguous for one request), fills what the guest did not write
from the backing file (or zeroes), writes the data and then links the
clusters into their L2 table, making a new table (after the data) where
the L1 entry was empty.  Writes are serialised, as QEMU serialises
allocating ones.

The need-check flag: without a backing file, the first allocating write
sets it in the header; it is cleared when the image has been idle for
five seconds, and on a clean close.  An image opened read-write with the
flag set is checked and repaired first (QEMU's automatic check); read-only,
it opens as it is.  (QEMU 7.2 does not report the flag as ``dirty-flag``.)
"""

from __future__ import annotations

import array
import asyncio
import errno
import logging
from typing import Any, Callable

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, ChildLink, Extent, Perm, Status, WriteFlags
from blockd.drivers.backing import open_backing
from blockd.drivers.qed import header as hdr
from blockd.drivers.qed.table import Kind, Tables, decode
from blockd.errors import QMPError

log = logging.getLogger(__name__)

#: Idle seconds after the last allocating write before the need-check flag is cleared.
NEED_CHECK_TIMEOUT = 5.0


class QedNode(BlockNode):
    driver = "qed"
    is_format = True
    supports_backing = True

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        # Set by open().
        self.header: hdr.Header
        self.tables: Tables
        self.backing_name: str | None = None
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._cleaner: asyncio.Task | None = None

    # ---- open ---------------------------------------------------------------

    async def open(self, ctx: OpenContext) -> None:
        await ctx.open_child(self.options["file"], "file")
        try:
            await self._load(self.file_child)
        except OSError as exc:
            raise QMPError(f"Could not open '{self.file_node.filename()}': "
                           f"{exc.strerror or 'Input/output error'}") from None
        await open_backing(ctx, self, self.backing_name, self.backing_format())

    async def _load(self, file: ChildLink) -> None:
        try:
            h = hdr.parse(bytes(await file.read(0, min(hdr.SIZE, file.length()))))
        except OSError:
            raise QMPError("Failed to read QED header") from None
        layout = hdr.check_open(h, file.length())
        self.header = h
        if h.features & hdr.F_BACKING_FILE:
            try:
                raw = bytes(await file.read(h.backing_filename_offset,
                                            h.backing_filename_size))
            except OSError:
                raise QMPError("Failed to read backing filename") from None
            self.backing_name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if h.autoclear_features and not self.read_only:
            h.autoclear_features = 0
            try:
                await file.write(0, h.encode())
            except OSError:
                raise QMPError("Failed to update header") from None
            await file.flush()
        try:
            l1 = decode(bytes(await file.read(h.l1_table_offset, h.table_bytes)))
        except OSError:
            raise QMPError("Failed to read L1 table") from None
        self.tables = Tables(file, layout, l1)
        if h.features & hdr.F_NEED_CHECK and not self.read_only and \
                not self.options.get("x-check"):
            from blockd.drivers.qed.check import check

            res = await check(self, True, None)
            if res.error:
                raise QMPError("Image corrupted")
        if h.features & hdr.F_NEED_CHECK and not self.read_only:
            self._start_timer()

    async def close(self) -> None:
        self._cancel_timer()
        if self._cleaner is not None:
            await asyncio.gather(self._cleaner, return_exceptions=True)
            self._cleaner = None
        if self.read_only:
            return
        try:
            await self.file_child.flush()
            if self.header.features & hdr.F_NEED_CHECK:
                self.header.features &= ~hdr.F_NEED_CHECK
                await self.file_child.write(0, self.header.encode())
                await self.file_child.flush()
        except OSError as exc:
            log.error("Failed to mark node '%s' clean on close: %s", self.node_name, exc)

    async def reopen_commit(self, state: Any, options: dict[str, Any], read_only: bool) -> None:
        if read_only and not self.read_only:
            # QEMU drains the node first, which fires the clean-up timer at once.
            self._cancel_timer()
            async with self._lock:
                await self._mark_clean()
        await super().reopen_commit(state, options, read_only)

    # ---- the need-check flag --------------------------------------------------

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """When the last writer goes (an export deleted, say), QEMU drains the node, which
        fires a pending clean-up timer at once; so does this."""
        if not perm & Perm.WRITE and self._timer is not None:
            self._cancel_timer()
            self._timer_fired()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start_timer(self) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(NEED_CHECK_TIMEOUT, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._cleaner = asyncio.ensure_future(self._clean_when_idle())

    async def _clean_when_idle(self) -> None:
        if self._lock.locked():
            return  # an allocating write is running; it restarts the timer when done
        async with self._lock:
            try:
                await self._mark_clean()
            except OSError as exc:
                log.error("Failed to mark node '%s' clean: %s", self.node_name, exc)

    async def _mark_clean(self) -> None:
        if not self.header.features & hdr.F_NEED_CHECK:
            return
        await self.file_child.flush()
        self.header.features &= ~hdr.F_NEED_CHECK
        await self._write_header()
        await self.file_child.flush()

    async def _write_header(self) -> None:
        """The header's fields over the first sector, the rest of it kept (QEMU's way)."""
        sector = bytearray(await self.file_child.read(0, min(512, self.file_child.length())))
        sector[:hdr.SIZE] = self.header.encode()
        await self.file_child.write(0, sector)

    async def _set_need_check(self) -> None:
        if self.backing is None and not self.header.features & hdr.F_NEED_CHECK:
            self.header.features |= hdr.F_NEED_CHECK
            await self._write_header()

    # ---- reads ----------------------------------------------------------------

    def length(self) -> int:
        return self.header.image_size

    async def _backing_read(self, pos: int, length: int) -> bytes:
        backing = self.backing_child
        if backing is None:
            return bytes(length)
        n = max(0, min(length, backing.length() - pos))
        data = bytes(await backing.read(pos, n)) if n else b""
        return data + bytes(length - n)

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        t = self.tables
        out = bytearray()
        end = offset + length
        while offset < end:
            kind, host, n = await t.find(offset, end - offset)
            if kind is Kind.FOUND:
                within = offset & (self.header.cluster_size - 1)
                out += await self.file_child.read(host + within, n)
            elif kind is Kind.ZERO:
                out += bytes(n)
            else:
                out += await self._backing_read(offset, n)
            offset += n
        return out

    async def block_status(self, offset: int, length: int) -> Extent:
        kind, host, n = await self.tables.find(offset, length)
        if kind is Kind.FOUND:
            within = offset & (self.header.cluster_size - 1)
            return Extent(n, Status.DATA | Status.ALLOCATED, host + within, self.file_node)
        if kind is Kind.ZERO:
            return Extent(n, Status.ZERO | Status.ALLOCATED)
        backing = self.backing_child
        if backing is None or offset >= backing.length():
            return Extent(n, Status.ZERO)
        sub = await backing.block_status(offset, min(n, backing.length() - offset))
        return Extent(sub.length, sub.status & ~Status.ALLOCATED, sub.offset, sub.child)

    # ---- writes ---------------------------------------------------------------

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        view = memoryview(data).cast("B")
        async with self._lock:
            allocated = False
            try:
                pos = 0
                while pos < len(view):
                    kind, host, n = await self.tables.find(offset + pos, len(view) - pos)
                    piece = view[pos:pos + n]
                    if kind is Kind.FOUND:
                        within = (offset + pos) & (self.header.cluster_size - 1)
                        await self.file_child.write(host + within, piece)
                    else:
                        await self._allocate(kind, offset + pos, piece)
                        allocated = True
                    pos += n
            finally:
                if allocated and self.header.features & hdr.F_NEED_CHECK:
                    self._start_timer()
        if flags & WriteFlags.FUA:
            await self.flush()

    async def _allocate(self, kind: Kind, pos: int, data: memoryview | None,
                        length: int = 0) -> None:
        """New clusters for ``[pos, pos + len(data))`` (``data`` None: zero clusters for
        ``length`` bytes), linked into their L2 table."""
        t = self.tables
        cs = self.header.cluster_size
        self._cancel_timer()
        within = pos & (cs - 1)
        n = len(data) if data is not None else length
        count = -(-(within + n) // cs)
        if data is None:
            cluster = hdr.ZERO_CLUSTER
        else:
            cluster = t.layout.file_size
            t.layout.file_size += count * cs
        await self._set_need_check()
        if data is not None:
            start = pos - within
            end = pos + n
            tail = -(-end // cs) * cs - end
            head = await self._backing_read(start, within) if within else b""
            back = await self._backing_read(end, tail) if tail else b""
            if head or back:
                await self.file_child.write(cluster, b"".join((head, data, back)))
            else:
                await self.file_child.write(cluster, data)
            if self.backing is not None:
                await self.file_child.flush()
        await self._link(kind, pos, count, cluster)

    async def _link(self, kind: Kind, pos: int, count: int, cluster: int) -> None:
        t = self.tables
        cs = self.header.cluster_size
        index = (pos >> t.l2_shift) & (t.nelems - 1)
        l1_index = pos >> t.l1_shift
        step = 0 if cluster == hdr.ZERO_CLUSTER else cs
        entries = [cluster + i * step for i in range(count)]
        if kind is Kind.L1:
            l2_offset = t.layout.file_size
            t.layout.file_size += self.header.table_size * cs
            table = array.array("Q", bytes(self.header.table_bytes))
            table[index:index + count] = array.array("Q", entries)
            await t.write_entries(l2_offset, table, 0, t.nelems)
            await self.file_child.flush()
            t.remember(l2_offset, table)
            t.l1[l1_index] = l2_offset
            await t.write_entries(self.header.l1_table_offset, t.l1, l1_index, 1)
            return
        # On disk first, then in the cached table: a reader that loads the table
        # meanwhile (or after it left the cache) finds the new entries either way.
        l2_offset = t.l1[l1_index]
        table = array.array("Q", await t.l2(l2_offset))
        table[index:index + count] = array.array("Q", entries)
        await t.write_entries(l2_offset, table, index, count)
        (await t.l2(l2_offset))[index:index + count] = array.array("Q", entries)

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        """Whole clusters become zero clusters (allocated ones are overwritten with
        zeroes, as in QEMU); the unaligned head and tail are written as zeroes.  A
        request that must be fast is refused whole: QEMU's qed has no fast zeroing."""
        if flags & WriteFlags.NO_FALLBACK:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        cs = self.header.cluster_size
        lo, hi = -(-offset // cs) * cs, (offset + length) // cs * cs
        if lo >= hi:
            await self._fallback_zeroes(offset, length, flags)
            return
        if offset < lo:
            await self._fallback_zeroes(offset, lo - offset, flags)
        async with self._lock:
            allocated = False
            try:
                pos = lo
                while pos < hi:
                    kind, host, n = await self.tables.find(pos, hi - pos)
                    if kind is Kind.FOUND:
                        await self._zero_in_place(host, n)
                    elif kind is not Kind.ZERO:
                        await self._allocate(kind, pos, None, n)
                        allocated = True
                    pos += n
            finally:
                if allocated and self.header.features & hdr.F_NEED_CHECK:
                    self._start_timer()
        if hi < offset + length:
            await self._fallback_zeroes(hi, offset + length - hi, flags)
        if flags & WriteFlags.FUA:
            await self.flush()

    async def _zero_in_place(self, host: int, n: int) -> None:
        step = 1 << 20
        for at in range(0, n, step):
            await self.file_child.write(host + at, bytes(min(step, n - at)))

    async def _fallback_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        if flags & WriteFlags.NO_FALLBACK:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        await super().write_zeroes(offset, length, flags & WriteFlags.FUA)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        if prealloc != "off":
            raise QMPError(f"Unsupported preallocation mode '{prealloc}'")
        h = self.header
        if not hdr.image_size_valid(size, h.cluster_size, h.table_size):
            raise QMPError("Invalid image size specified")
        if size < h.image_size:
            raise QMPError("Shrinking images is currently not supported")
        old = h.image_size
        h.image_size = size
        try:
            await self.file_child.write(0, h.encode())
        except OSError as exc:
            h.image_size = old
            raise QMPError(f"Failed to update the image size: {exc.strerror}") from None

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """A new backing file name (and raw-or-probed format) in the header cluster, as
        QEMU rewrites it: header and name from the start, the rest left as it was."""
        h = self.header
        if name and h.compat_features:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        features = h.features & ~(hdr.F_BACKING_FILE | hdr.F_BACKING_FORMAT_NO_PROBE)
        raw_name = (name or "").encode()
        if name:
            features |= hdr.F_BACKING_FILE
            if fmt == "raw":
                features |= hdr.F_BACKING_FORMAT_NO_PROBE
        if hdr.SIZE + len(raw_name) > h.header_size * h.cluster_size:
            raise OSError(errno.ENOSPC, "No space left on device")
        new = hdr.Header(**{**vars(h), "features": features,
                            "backing_filename_offset": hdr.SIZE,
                            "backing_filename_size": len(raw_name)})
        await self.file_child.write(0, new.encode() + raw_name)
        await self.file_child.flush()
        self.header = new
        self.tables.h = self.tables.layout.h = new
        self.backing_name = name

    # ---- check and queries ----------------------------------------------------

    async def check(self, fix: int = 0, sink: Callable[[str], None] | None = None) -> Any:
        from blockd.drivers.qed.check import check

        async with self._lock:
            return await check(self, bool(fix), sink)

    def has_zero_init(self) -> bool:
        return self.backing is None

    def cluster_size(self) -> int | None:
        return self.header.cluster_size

    def backing_filename(self) -> str | None:
        return self.backing_name

    def backing_format(self) -> str | None:
        if self.backing_name and self.header.features & hdr.F_BACKING_FORMAT_NO_PROBE:
            return "raw"
        return None
