"""The vmdk node: a list of extents behind one guest address space.

A monolithic sparse or streamOptimized image is one sparse extent in the
``file`` child itself; otherwise ``file`` is a descriptor and each extent
is a child of its own (``extents.0``, ``extents.1``...), opened from the
names the descriptor gives, relative to it.  Every write takes the
node's lock, as QEMU serialises them: a new grain goes at the end of its
extent, is written whole (with the backing file's data or zeroes around
the guest's bytes) and only then linked into the grain tables.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import errno
import os
import random
import sys
from typing import Any, Callable, NoReturn

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, ChildLink, Status, WriteFlags
from blockd.block.node import Extent as Run
from blockd.drivers.qcow2.check import CheckResult
from blockd.drivers.vmdk import MAGIC_COWD, MAGIC_KDMV
from blockd.drivers.vmdk import descriptor as desc
from blockd.drivers.vmdk.extent import (SECTOR, Extent, Grain, Lookup, MAX_SECTORS, SparseExtent,
                                        embedded_descriptor, open_sparse)
from blockd.drivers.vmdk.stream import GRAIN_MARKER, compress_grain, read_grain, read_padded
from blockd.errors import QMPError

#: QEMU's largest image: INT64_MAX aligned down to its largest alignment (1 GiB).
MAX_LENGTH = (1 << 63) - (1 << 30)


def _einval() -> OSError:
    return OSError(errno.EINVAL, "Invalid argument")


async def read_head(file: ChildLink, offset: int = 0) -> bytes:
    """The start of a file as QEMU reads it to open a vmdk (at most 1 MiB)."""
    size = file.length()
    if size < 4:
        raise QMPError("File is too small, not a valid image")
    try:
        return await read_padded(file, offset, min(size, desc.MAX_DESC_READ))
    except OSError as exc:
        raise QMPError(f"Could not read from file: {os.strerror(exc.errno or errno.EIO)}") \
            from None


@dataclasses.dataclass
class VmdkNode(BlockNode):
    driver = "vmdk"
    is_format = True
    supports_backing = True

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.vmdk_extents: list[Extent] = []
        self._starts: list[int] = []
        self.create_type = ""
        #: Where the descriptor is in ``file``: 0x200 in a sparse file, 0 in a descriptor file.
        self.desc_offset = 0
        self.cid = 0
        self.parent_cid = 0
        self.parent_hint: str | None = None
        self.cid_updated = False
        self.cid_checked = False
        self.lock = asyncio.Lock()

    # ---- open -----------------------------------------------------------------

    async def open(self, ctx: OpenContext) -> None:
        await ctx.open_child(self.options["file"], "file")
        file = self.file_child
        head = await read_head(file)
        if head[:4] in (MAGIC_COWD, MAGIC_KDMV):
            inner = embedded_descriptor(head)
            if inner is not None:
                await self._open_descriptor(ctx, await read_head(file, inner))
            else:
                ext = await open_sparse(file, head, "", not self.read_only)
                self.create_type = "streamOptimized" if ext.compressed else "monolithicSparse"
                self._add(ext)
            self.desc_offset = 0x200
        else:
            await self._open_descriptor(ctx, head)
        text = desc.c_string(await self._desc_bytes())
        try:
            self.parent_hint = desc.parent_hint(text)
        except OSError:
            self._open_failed()
        cid, parent_cid = desc.read_cid(text, False), desc.read_cid(text, True)
        if cid is None or parent_cid is None:
            self._open_failed()
        self.cid, self.parent_cid = cid, parent_cid
        if self.length() > MAX_LENGTH:
            raise QMPError("Could not refresh total sector count: File too large")
        await self._open_backing(ctx)

    def _open_failed(self) -> NoReturn:
        raise QMPError(f"Could not open '{self.file_node.filename()}': Invalid argument")

    async def _desc_bytes(self) -> bytes:
        return await read_padded(self.file_child, self.desc_offset, desc.DESC_SIZE)

    def _add(self, ext: Extent) -> None:
        ext.start = self.vmdk_extents[-1].end if self.vmdk_extents else 0
        self.vmdk_extents.append(ext)
        self._starts.append(ext.start)

    async def _open_descriptor(self, ctx: OpenContext, raw: bytes) -> None:
        text = desc.c_string(raw)
        ct = desc.create_type(text)
        lines = desc.parse_extents(text)
        base = None
        for i, line in enumerate(lines):
            path = line.filename
            if not os.path.isabs(path):
                if base is None:
                    name = self.file_node.exact_filename()
                    if name is None:
                        raise QMPError("Cannot use relative paths with VMDK descriptor file "
                                       f"'{self.file_node.filename()}'")
                    base = os.path.dirname(name)
                path = os.path.join(base, path)
            await ctx.open_child({"driver": "file", "filename": path}, f"extents.{i}")
            child = self.children[f"extents.{i}"]
            if line.type in ("FLAT", "VMFS"):
                ext = Extent(child, line.sectors, line.type, flat=True,
                             flat_offset=line.offset * SECTOR)
            elif line.type in ("SPARSE", "VMFSSPARSE"):
                ext = await open_sparse(child, await read_head(child), line.type,
                                        not self.read_only)
                if ext.compressed:
                    ct = "streamOptimized"
            else:
                raise QMPError(f"Unsupported extent type '{line.type}'")
            self._add(ext)
        self.create_type = ct
        self.desc_offset = 0

    async def _open_backing(self, ctx: OpenContext) -> None:
        opts = self.options
        if "backing" in opts:
            if opts["backing"] is not None:
                await ctx.open_child(opts["backing"], "backing")
            return
        if not self.parent_hint:
            return
        path = self.parent_hint
        if not os.path.isabs(path):
            name = self.file_node.exact_filename() or ""
            path = os.path.join(os.path.dirname(name), path)
        try:
            await ctx.open_child({"driver": "vmdk", "file": {"driver": "file", "filename": path}},
                                 "backing")
        except QMPError as exc:
            raise QMPError(f"Could not open backing file: {exc.desc}") from None

    # ---- helpers --------------------------------------------------------------

    def length(self) -> int:
        return self.vmdk_extents[-1].end if self.vmdk_extents else 0

    def _find(self, offset: int) -> Extent:
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0 or offset >= self.vmdk_extents[i].end:
            raise OSError(errno.EIO, "Input/output error")
        return self.vmdk_extents[i]

    async def _cid_valid(self) -> bool:
        """Whether the backing file is still the one this image was made on (same CID)."""
        if self.cid_checked or self.backing is None:
            self.cid_checked = True
            return True
        parent = self.backing
        if not isinstance(parent, VmdkNode):
            return False
        try:
            current = desc.read_cid(desc.c_string(await parent._desc_bytes()), False)
        except OSError:
            return False
        if current != self.parent_cid:
            return False
        self.cid_checked = True
        return True

    async def _backing_read(self, offset: int, length: int) -> bytes:
        backing = self.backing_child
        assert backing is not None, "called for images with a backing file only"
        blen = backing.length()
        n = max(0, min(length, blen - offset))
        data = bytes(await backing.read(offset, n)) if n else b""
        return data + bytes(length - n)

    # ---- reads ----------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        parts: list[bytes] = []
        end = offset + length
        while offset < end:
            ext = self._find(offset)
            if ext.flat:
                n = min(end, ext.end) - offset
                parts.append(await read_padded(ext.file, ext.flat_offset + offset - ext.start, n))
                offset += n
                continue
            assert isinstance(ext, SparseExtent)
            within = (offset - ext.start) % ext.grain
            n = min(end - offset, ext.grain - within, ext.end - offset)
            where = await ext.lookup(offset)
            if where.state == Grain.ALLOCATED and not ext.compressed or \
                    where.state == Grain.UNALLOCATED and self.backing is None:
                n = await ext.run(offset, where, end - offset)  # one read for a run
            if where.state == Grain.ALLOCATED:
                if ext.compressed:
                    grain = await read_grain(ext.file, where.host, ext.grain, ext.has_marker)
                    if within + n > len(grain):
                        raise _einval()
                    parts.append(grain[within:within + n])
                else:
                    ext.file.debug_event("read_aio")
                    parts.append(await read_padded(ext.file, where.host + within, n))
            elif self.backing is not None and where.state == Grain.UNALLOCATED:
                if not await self._cid_valid():
                    raise _einval()
                parts.append(await self._backing_read(offset, n))
            else:
                parts.append(bytes(n))
            offset += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def block_status(self, offset: int, length: int) -> Run:
        ext = self._find(offset)
        if ext.flat:
            n = min(length, ext.end - offset)
            return await self._flat_status(ext, ext.flat_offset + offset - ext.start, n)
        assert isinstance(ext, SparseExtent)
        within = (offset - ext.start) % ext.grain
        where = await ext.lookup(offset)
        if where.state == Grain.ALLOCATED and ext.compressed or \
                where.state == Grain.UNALLOCATED and self.backing is not None:
            n = min(length, ext.grain - within, ext.end - offset)
        else:  # runs of grains alike are answered at once (QEMU: one grain per call)
            n = await ext.run(offset, where, length)
        if where.state == Grain.ZEROED:
            return Run(n, Status.ZERO | Status.ALLOCATED)
        if where.state == Grain.UNALLOCATED:
            backing = self.backing_child
            if backing is None or offset >= backing.length():
                return Run(n, Status.ZERO)
            if not await self._cid_valid():
                # The backing file changed since this image was made on it: reads here
                # fail (EINVAL, as in QEMU), so copies must come through this node.
                return Run(n, Status.DATA | Status.ALLOCATED)
            sub = await backing.block_status(offset, min(n, backing.length() - offset))
            return Run(sub.length, sub.status & ~Status.ALLOCATED, sub.offset, sub.child)
        if ext.compressed:
            return Run(n, Status.DATA | Status.ALLOCATED)
        return Run(n, Status.DATA | Status.ALLOCATED, where.host + within, ext.file.child)

    @staticmethod
    async def _flat_status(ext: Extent, host: int, n: int) -> Run:
        """Data in a flat extent, zero where its file has holes (QEMU asks the file)."""
        status = Status.DATA | Status.ALLOCATED
        flen = ext.file.length()
        if host >= flen:
            return Run(n, status | Status.ZERO, host, ext.file.child)
        sub = await ext.file.block_status(host, min(n, flen - host))
        if sub.status & Status.ZERO:
            status |= Status.ZERO
            if host + sub.length < flen:
                n = sub.length
        else:
            n = sub.length
        return Run(n, status, host, ext.file.child)

    # ---- writes ---------------------------------------------------------------

    def _writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, "Operation not permitted")

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        self._writable()
        view = memoryview(data)
        async with self.lock:
            pos = 0
            while pos < len(view):
                cur = offset + pos
                ext = self._find(cur)
                if ext.flat:
                    n = min(len(view) - pos, ext.end - cur)
                    ext.file.debug_event("write_aio")
                    await ext.file.write(ext.flat_offset + cur - ext.start, view[pos:pos + n])
                else:
                    assert isinstance(ext, SparseExtent)
                    n = await self._write_sparse(ext, cur, view[pos:])
                pos += n
                await self._update_cid()
        if WriteFlags.FUA in flags:
            await self.flush()

    async def _write_sparse(self, ext: SparseExtent, cur: int, view: memoryview,
                            packed: bytes | None = None) -> int:
        within = (cur - ext.start) % ext.grain
        n = min(len(view), ext.grain - within, ext.end - cur)
        where = await ext.lookup(cur)
        if ext.compressed:
            if where.state == Grain.ALLOCATED:
                sys.stderr.write("Could not write to allocated cluster for streamOptimized\n")
                raise OSError(errno.EIO, "Input/output error")
            host = await self._allocate(ext, cur, where, 0, 0)
            # Only whole grains, or the last one of the extent, go into a stream.
            if within or n < ext.grain and cur + n != ext.end or not ext.has_marker:
                raise _einval()
            ext.file.debug_event("write_compressed")
            if packed is None or len(view) != n:
                packed = await compress_grain(view[:n])
            record = GRAIN_MARKER.pack(cur // SECTOR, len(packed)) + packed
            await ext.file.write(host, record)
            ext.next_sector = -(-(host + len(record)) // SECTOR)
            await ext.set_entry(where, host // SECTOR)
            return n
        if where.state == Grain.ALLOCATED:
            ext.file.debug_event("write_aio")
            await ext.file.write(where.host + within, view[:n])
            return n
        host = await self._allocate(ext, cur, where, within, within + n)
        ext.file.debug_event("write_aio")
        await ext.file.write(host + within, view[:n])
        ext.next_sector = max(ext.next_sector, -(-(host + within + n) // SECTOR))
        await ext.set_entry(where, host // SECTOR)
        return n

    async def compress_cluster(self, data: bytes) -> bytes:
        """A grain's compressed bytes, made in a worker thread (``convert`` runs many)."""
        return await compress_grain(data)

    async def write_compressed(self, offset: int, data: bytes, packed: bytes | None = None) -> None:
        """One grain written compressed where the extent is a stream, plainly elsewhere
        (``convert -c`` and streamOptimized targets); padding past the end is dropped."""
        self._writable()
        data = data[:self.length() - offset]
        ext = self._find(offset)
        if not isinstance(ext, SparseExtent) or not ext.compressed:
            await self.write(offset, data)
            return
        async with self.lock:
            await self._write_sparse(ext, offset, memoryview(data), packed)
            await self._update_cid()

    async def _allocate(self, ext: SparseExtent, cur: int, where: Lookup,
                        skip_start: int, skip_end: int) -> int:
        """A new grain at the end of the extent, filled outside ``[skip_start, skip_end)``
        with the backing file's data (zeroes for a zeroed grain or without one)."""
        if not where.l2_offset:
            # QEMU preallocates every grain table; an image without one here is not
            # something it writes to either.
            raise OSError(errno.ENOTSUP, "Operation not supported")
        if ext.next_sector >= MAX_SECTORS:
            raise _einval()
        host = ext.next_sector * SECTOR
        ext.next_sector += ext.grain_sectors
        grain = ext.grain
        base = cur - cur % grain
        from_backing = self.backing is not None and where.state != Grain.ZEROED
        if self.backing is not None and not await self._cid_valid():
            raise _einval()
        for lo, hi in ((0, skip_start), (skip_end, grain)):
            if lo >= hi:
                continue
            fill = await self._backing_read(base + lo, hi - lo) if from_backing else bytes(hi - lo)
            ext.file.debug_event("cow_write")
            await ext.file.write(host + lo, fill)
        return host

    async def _update_cid(self) -> None:
        """The first write after opening gives the image a new CID, as QEMU does."""
        if self.cid_updated:
            return
        new = desc.with_cid(await self._desc_bytes(), random.getrandbits(32))
        if new is None:
            raise _einval()
        # QEMU's write stops at the end of the file's last sector.
        room = -(-self.file_child.length() // SECTOR) * SECTOR - self.desc_offset
        await self.file_child.write(self.desc_offset, new[:max(0, min(len(new), room))])
        await self.file_child.flush()
        self.cid_updated = True

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        """Whole grains of extents with zeroed-grain entries become such entries; the
        rest is written as zeroes (QEMU's block layer falls back the same way)."""
        self._writable()
        end = offset + length
        while offset < end:
            ext = self._find(offset)
            stop = min(end, ext.end)
            if isinstance(ext, SparseExtent) and ext.zero_grain:
                g = ext.grain
                lo, hi = -(-offset // g) * g, stop - stop % g
                if lo < hi and await self._zero_grains(ext, lo, hi):
                    if offset < lo:
                        await self._fallback_zeroes(offset, lo - offset, flags)
                    offset = hi
                    continue
            await self._fallback_zeroes(offset, stop - offset, flags)
            offset = stop
        if WriteFlags.FUA in flags:
            await self.flush()

    async def _fallback_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        if flags & WriteFlags.NO_FALLBACK:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        await super().write_zeroes(offset, length, flags & WriteFlags.FUA)

    async def _zero_grains(self, ext: SparseExtent, lo: int, hi: int) -> bool:
        """Mark the grains in ``[lo, hi)`` zeroed; False (nothing changed) if one has no table."""
        async with self.lock:
            found = [await ext.lookup(pos) for pos in range(lo, hi, ext.grain)]
            if any(not w.l2_offset for w in found):
                return False
            await self._update_cid()
            for where in found:
                if where.state != Grain.ZEROED:
                    await ext.set_entry(where, 1)
        return True

    # ---- check ----------------------------------------------------------------

    #: ``qemu-img check -r`` is refused: QEMU's vmdk check cannot repair.
    async def check(self, fix: int = 0, sink: Callable[[str], None] | None = None) -> Any:
        """QEMU's vmdk check: every allocated grain must start inside its file.

        The first one that does not ends the check with one corruption and a failure.
        Nothing can be repaired (``-r`` is refused as unsupported, like QEMU).
        """
        if fix:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        res = CheckResult(sink=sink)
        for ext in self.vmdk_extents:
            if not isinstance(ext, SparseExtent):
                continue
            per_table = ext.gt_entries * ext.grain
            for i in range(ext.l1_size):
                lo = ext.start + i * per_table
                if lo >= ext.end:
                    break
                if not ext._entry(ext.gd, i):
                    continue
                for pos in range(lo, min(ext.end, lo + per_table), ext.grain):
                    where = await ext.lookup(pos)
                    if where.state == Grain.ALLOCATED and where.host >= ext.file.length():
                        res.corruptions += 1
                        res.say(f"ERROR: cluster offset for sector {pos // SECTOR} "
                                "points after EOF")
                        res.error = errno.EINVAL
                        return res
        return res

    # ---- queries --------------------------------------------------------------

    def has_zero_init(self) -> bool:
        """Sparse extents start with no grain; flat ones read their files (QEMU's rule)."""
        return all(ext.file.child.has_zero_init() for ext in self.vmdk_extents if ext.flat)

    def cluster_size(self) -> int | None:
        first = self.vmdk_extents[0]
        for ext in self.vmdk_extents[1:]:
            if ext.flat != first.flat or getattr(ext, "compressed", False) != \
                    getattr(first, "compressed", False) or (not first.flat and ext.grain !=
                                                            first.grain):
                return None
        return None if first.flat else first.grain

    @property
    def needs_compressed_writes(self) -> bool:  # type: ignore[override]  # per image
        return bool(getattr(self.vmdk_extents[0], "compressed", False))

    def allocated_file_size(self) -> int | None:
        total = self.file_node.allocated_file_size()
        if total is None:
            return None
        for ext in self.vmdk_extents:
            if ext.file.child is not self.file:
                size = ext.file.child.allocated_file_size()
                if size is None:
                    return None
                total += size
        return total

    def full_options(self) -> dict[str, Any]:
        # Only ``file`` and ``backing`` can be given; extents follow from the descriptor.
        opts: dict[str, Any] = {"driver": self.driver, "file": self.file_node.full_options()}
        if "backing" in self.options:
            backing = self.backing
            opts["backing"] = backing.full_options() if backing is not None else None
        return opts

    def backing_filename(self) -> str | None:
        return self.parent_hint

    def backing_format(self) -> str | None:
        return "vmdk" if self.parent_hint else None

    def format_specific(self) -> dict[str, Any] | None:
        return {"type": "vmdk", "data": {
            "create-type": self.create_type, "cid": self.cid, "parent-cid": self.parent_cid,
            "extents": [ext.info() for ext in self.vmdk_extents]}}
