"""Consistency check and repair: refcounts recomputed from every structure that uses clusters.

The walk counts references from the header, the active L1/L2 tables,
internal snapshots' tables, the snapshot table, the refcount table and
blocks, the LUKS header of an encrypted image and persistent bitmaps (in
QEMU's order, which is the order of the messages), then compares with
the stored counts.  A stored count above the computed one is a leak
(harmless), below it a corruption (a cluster could be handed out twice).
Messages, numbers and the repair flow are those of QEMU 7.2's
``qemu-img check``, so scripts can compare the two.

Repair ``leaks`` lowers leaked counts; ``all`` also raises counts that
are too low, zeroes misaligned preallocated L2 entries and fixes
``COPIED`` flags.  A used cluster whose stored count is zero, or a broken
refcount block, cannot be repaired in place (the count may have no block
to live in): ``all`` then writes a new refcount structure from the
computed counts and frees the old one as a leak; ``leaks`` fails.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from blockd.drivers.qcow2 import crypt, overlap
from blockd.drivers.qcow2 import header as hdr
from blockd.drivers.qcow2 import snapshot as qsnap
from blockd.drivers.qcow2.cluster import COMPRESSED, COPIED, L1_OFFSET_MASK, OFFSET_MASK
from blockd.drivers.qcow2.refcount import encode_block
from blockd.drivers.qcow2.snapshot import MAX_L1_SIZE
from blockd.errors import QMPError

if TYPE_CHECKING:
    from blockd.drivers.qcow2.node import Qcow2Base

FIX_LEAKS = 1
FIX_ERRORS = 2


@dataclasses.dataclass
class CheckResult:
    """``ImageCheck`` counters plus the lines QEMU prints while checking."""

    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    #: An errno where the check itself failed (qemu-img: "Check failed: ...").
    error: int = 0
    #: What failed, for qemu-img's line before "Check failed" (empty: no such line).
    failure: str = ""
    messages: list[str] = dataclasses.field(default_factory=list)
    #: Called with each message as it is found, so they interleave with other
    #: output (corruption reports) in QEMU's order.
    sink: Callable[[str], None] | None = dataclasses.field(default=None, repr=False)

    def say(self, message: str) -> None:
        self.messages.append(message)
        if self.sink is not None:
            self.sink(message)

    def as_dict(self) -> dict[str, Any]:
        """The members ``qemu-img check --output=json`` prints: counters only when non-zero."""
        out: dict[str, Any] = {"check-errors": self.check_errors}
        if self.image_end_offset:
            out["image-end-offset"] = self.image_end_offset
        for key, value in (("corruptions", self.corruptions), ("leaks", self.leaks),
                           ("corruptions-fixed", self.corruptions_fixed),
                           ("leaks-fixed", self.leaks_fixed),
                           ("total-clusters", self.total_clusters),
                           ("allocated-clusters", self.allocated_clusters),
                           ("fragmented-clusters", self.fragmented_clusters),
                           ("compressed-clusters", self.compressed_clusters)):
            if value:
                out[key] = value
        return out


#: Bits of a standard (not compressed) L2 entry that must be zero.
L2_STD_RESERVED = 0x3F000000000001FE
#: Bits of an L1 entry that must be zero.
L1_RESERVED = 0x7F000000000001FF
#: Bits of a refcount table entry that must be zero.
REFT_RESERVED = 0x1FF
#: The low half of a subcluster bitmap: which subclusters are allocated.
ALL_ALLOC = 0xFFFFFFFF


class _Walker:
    """QEMU's in-memory refcount table: what every structure says each cluster is used by."""

    def __init__(self, node: "Qcow2Base", res: CheckResult, fix: int = 0) -> None:
        self.node = node
        self.image = node.image
        self.file = node.image.file
        self.cs = node.image.cluster_size
        self.cb = node.image.header.cluster_bits
        self.res = res
        self.fix = fix
        self.nb_clusters = -(-self.file.length() // self.cs)
        #: Computed counts; grows past the file's end like QEMU's (a region may end there).
        self.refs = [0] * self.nb_clusters
        self.max_ref = node.image.refcounts.max_value
        self.next_contiguous = 0
        #: When set, the kind of structure that first claimed each host cluster.
        self.owners: dict[int, str] | None = None

    def inc(self, offset: int, length: int, kind: str = "data") -> None:
        if length <= 0:
            return
        if offset + length - self.file.length() >= self.cs:
            self.res.say(
                f"ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset 0x{offset:x} size 0x{length:x}")
            self.res.corruptions += 1
            return
        first, last = offset // self.cs, (offset + length - 1) // self.cs
        refs = self.refs
        if last >= len(refs):
            refs.extend([0] * (last + 1 - len(refs)))
        for c in range(first, last + 1):
            if refs[c] == self.max_ref:
                self.res.say(f"ERROR: overflow cluster offset=0x{c * self.cs:x}")
                self.res.say(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img "
                    "convert to create a clean copy if the image cannot be opened for writing")
                self.res.corruptions += 1
                continue
            refs[c] += 1
            if self.owners is not None:
                self.owners.setdefault(c, kind)

    async def walk_l1(self, l1_offset: int, l1_size: int, active: bool) -> None:
        self.inc(l1_offset, l1_size * 8, "L1 table")
        if not l1_size:
            return
        raw = await self.file.read(l1_offset, l1_size * 8)
        for entry in struct.unpack(f">{l1_size}Q", raw):
            if entry & L1_RESERVED:
                self.res.say(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                self.res.corruptions += 1
            l2 = entry & L1_OFFSET_MASK
            if not l2:
                continue
            self.inc(l2, self.cs, "L2 table")
            if l2 % self.cs:
                self.res.say(f"ERROR l2_offset={l2:x}: Table is not cluster aligned; "
                             "L1 entry corrupted")
                self.res.corruptions += 1
            await self.walk_l2(l2, active)

    async def walk_l2(self, l2_offset: int, active: bool) -> None:
        ext = self.node.map.ext
        size = 16 if ext else 8
        table = await self.file.read(l2_offset, self.cs)
        self.next_contiguous = 0  # QEMU measures fragmentation within each L2 table
        words = struct.unpack(f">{self.cs // 8}Q", table)
        entries = words[::size // 8]
        external = self.node.image.external_data
        cs, nb, refs, res = self.cs, self.nb_clusters, self.refs, self.res
        plain = self.owners is None
        for i, entry in enumerate(entries):
            if not entry and not (ext and words[2 * i + 1]):
                continue
            host = entry & OFFSET_MASK
            if (plain and not entry & (COMPRESSED | L2_STD_RESERVED) and host
                    and not host % cs and host < nb * cs and not (ext and words[2 * i + 1] >> 32)
                    and (ext or not entry & 1) and refs[host // cs] < self.max_ref):
                # The common case, kept short: a normal cluster inside the file.
                if active:
                    res.allocated_clusters += 1
                    if self.next_contiguous and host != self.next_contiguous:
                        res.fragmented_clusters += 1
                    self.next_contiguous = host + cs
                if not external:
                    refs[host // cs] += 1
                continue
            await self._l2_entry(l2_offset, i, entry, words[2 * i + 1] if ext else 0, active)

    async def _l2_entry(self, l2_offset: int, i: int, entry: int, bitmap: int,
                        active: bool) -> None:
        """One L2 entry off the fast path, checked as QEMU 7.2's check_refcounts_l2 does."""
        res, cs = self.res, self.cs
        ext = self.node.map.ext
        external = self.image.external_data
        if not entry & COMPRESSED and entry & L2_STD_RESERVED:
            res.say(f"ERROR found l2 entry with reserved bits set: {entry:x}")
            res.corruptions += 1
        if entry & COMPRESSED:
            x = 62 - (self.cb - 8)
            coffset = entry & ((1 << x) - 1)
            if entry & COPIED:
                res.say(f"ERROR: coffset=0x{coffset:x}: copied flag must never be "
                        "set for compressed clusters")
                entry &= ~COPIED
                res.corruptions += 1
            if external:
                res.say(f"ERROR compressed cluster {i} with data file, "
                        f"entry=0x{entry:x}")
                res.corruptions += 1
                return
            if bitmap:
                res.say(f"ERROR compressed cluster {i} with non-zero subcluster "
                        f"allocation bitmap, entry=0x{entry:x}")
                res.corruptions += 1
                return
            sectors = ((entry >> x) & ((1 << (self.cb - 8)) - 1)) + 1
            self.inc(coffset, sectors * 512 - (coffset & 511), "compressed")
            if active:
                res.allocated_clusters += 1
                res.compressed_clusters += 1
                res.fragmented_clusters += 1
            return
        host = entry & OFFSET_MASK
        zero_flag = bool(entry & 1) and not ext
        if not host and not (external and entry & COPIED and not zero_flag):
            if ext and bitmap & ALL_ALLOC:
                res.say("ERROR: Unallocated cluster has non-zero subcluster "
                        "allocation map")
                res.corruptions += 1
            return
        # Normal and preallocated-zero clusters both hold their cluster.
        if (bitmap >> 32) & bitmap:
            res.corruptions += 1
            res.say(f"ERROR offset={host:x}: Allocated cluster has corrupted "
                    "subcluster allocation bitmap")
        if host % cs:
            res.corruptions += 1
            if not (bitmap & ALL_ALLOC if ext else not zero_flag):
                fixing = bool(self.fix & FIX_ERRORS)
                res.say(f"{'Repairing' if fixing else 'ERROR'} offset={host:x}: "
                        "Preallocated cluster is not properly aligned; "
                        "L2 entry corrupted.")
                if fixing:
                    size = 16 if ext else 8
                    new = struct.pack(">QQ", 0, bitmap) if ext else struct.pack(">Q", 1)
                    try:
                        await self.image.write_meta(l2_offset + i * size, new,
                                                    overlap.ACTIVE_L2 if active
                                                    else overlap.INACTIVE_L2)
                        await self.file.flush()
                    except OSError as exc:
                        res.say("ERROR: Failed to overwrite L2 table entry: "
                                f"{os.strerror(exc.errno or errno.EIO)}")
                        res.check_errors += 1
                    else:
                        self.node.map.cache.drop(l2_offset)
                        res.corruptions -= 1
                        res.corruptions_fixed += 1
                        return
            else:
                res.say(f"ERROR offset={host:x}: Data cluster is not properly "
                        "aligned; L2 entry corrupted.")
        if active:
            res.allocated_clusters += 1
            if self.next_contiguous and host != self.next_contiguous:
                res.fragmented_clusters += 1
            self.next_contiguous = host + cs
        if not external:  # clusters of an external data file have no refcounts
            self.inc(host, cs)

    async def walk_snapshots(self) -> None:
        h = self.image.header
        if not h.nb_snapshots:
            return
        for sn in self.image.snapshots:
            if sn.l1_table_offset % self.cs:
                self.res.say(
                    f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: "
                    "L1 table is not cluster aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            if sn.l1_size > MAX_L1_SIZE:
                self.res.say(
                    f"ERROR snapshot {sn.id} ({sn.name}) l1_size={sn.l1_size:#x}: "
                    "L1 table is too large; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            await self.walk_l1(sn.l1_table_offset, sn.l1_size, active=False)
        self.inc(h.snapshots_offset, self.image.snapshot_table_size, "snapshot table")

    async def walk_bitmaps(self) -> None:
        h = self.image.header
        ext = h.extension(hdr.EXT_BITMAPS)
        if ext is None or not h.autoclear_features & hdr.AUTOCLEAR_BITMAPS or len(ext.data) < 24:
            return
        nb, _, dir_size, dir_off = struct.unpack_from(">IIQQ", ext.data)
        self.inc(dir_off, dir_size, "bitmap")
        directory = await self.file.read(dir_off, dir_size)
        pos = 0
        for _ in range(nb):
            table_off, table_size, _flags, _type, _gran, name_len, extra = \
                struct.unpack_from(">QIIBBHI", directory, pos)
            self.inc(table_off, table_size * 8, "bitmap")
            table = await self.file.read(table_off, table_size * 8)
            for (entry,) in struct.iter_unpack(">Q", table):
                if entry & OFFSET_MASK:
                    self.inc(entry & OFFSET_MASK, self.cs, "bitmap")
            entry_len = 24 + extra + name_len
            pos += entry_len + (-entry_len % 8)

    async def walk_refblocks(self) -> bool:
        """Count the refcount blocks; True when the structure must be rebuilt."""
        rebuild = False
        res = self.res
        for i, entry in enumerate(self.image.refcounts.table):
            if entry & REFT_RESERVED:
                res.say(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            off = entry & OFFSET_MASK
            if off % self.cs:
                res.say(f"ERROR refcount block {i} is not cluster aligned; "
                        "refcount table entry corrupted")
                res.corruptions += 1
                rebuild = True
                continue
            c = off // self.cs
            if c >= len(self.refs):
                fixing = bool(self.fix & FIX_ERRORS)
                res.say(f"{'Repairing' if fixing else 'ERROR'} refcount block {i} "
                        "is outside image")
                if fixing:
                    try:
                        await self.file.truncate(off + self.cs)
                    except OSError as exc:
                        res.corruptions += 1
                        rebuild = True
                        res.say("ERROR could not resize image: "
                                f"{os.strerror(exc.errno or errno.EIO)}")
                        continue
                    self.refs.extend([0] * (-(-self.file.length() // self.cs) - len(self.refs)))
                    res.corruptions_fixed += 1
                    self.inc(off, self.cs, "refcount block")
                else:
                    res.corruptions += 1
                continue
            if off:
                self.inc(off, self.cs, "refcount block")
                if self.refs[c] != 1:
                    res.say(f"ERROR refcount block {i} refcount={self.refs[c]}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild


async def walk(w: _Walker) -> bool:
    """Count every reference the image's structures make, in QEMU's order (which decides
    the order of the messages); True when the refcount structure must be rebuilt."""
    h = w.image.header
    w.inc(0, w.cs, "header")
    await w.walk_l1(h.l1_table_offset, h.l1_size, active=True)
    await w.walk_snapshots()
    w.inc(h.refcount_table_offset, len(w.image.refcounts.table) * 8, "refcount table")
    luks_header = crypt.fde_extent(h)
    if luks_header is not None:
        w.inc(*luks_header, "luks header")
    await w.walk_bitmaps()
    return await w.walk_refblocks()


async def cluster_kinds(node: "Qcow2Base") -> list[str]:
    """What each host cluster of the image file holds, by walking the metadata.

    Clusters no structure uses are ``leaked`` when their refcount says they are
    in use and ``free`` otherwise (``map --picture`` draws this).
    """
    image = node.image
    async with image.lock:
        w = _Walker(node, CheckResult())
        w.owners = {}
        await walk(w)
        kinds = []
        for c in range(w.nb_clusters):
            kind = w.owners.get(c)
            if kind is None:
                kind = "leaked" if await image.refcounts.get(c) else "free"
            kinds.append(kind)
    return kinds


async def _stored(rc: Any, n: int) -> list[int | None]:
    """The stored counts of clusters ``0..n-1``; None where the refcount block cannot be read."""
    out: list[int | None] = []
    for bi in range(-(-n // rc.entries)):
        try:
            out += await rc.block_counts(bi)
        except OSError:
            out += [None] * rc.entries
    del out[n:]
    return out


async def _compare(w: _Walker, res: CheckResult, fix: int) -> tuple[bool, int]:
    """Stored counts against computed ones, fixing what ``fix`` allows.

    Returns whether a stored zero was found (only a rebuild repairs that: the
    cluster may have no refcount block at all) and the highest cluster in use.
    """
    rc = w.image.refcounts
    refs = w.refs
    counts = await _stored(rc, len(refs))
    rebuild, highest = False, 0
    for c in range(len(refs) - 1, -1, -1):
        if counts[c] is not None and (counts[c] or refs[c]):
            highest = c
            break
    for c in [c for c, (a, b) in enumerate(zip(counts, refs)) if a != b]:
        stored, computed = counts[c], refs[c]
        if stored is None:
            res.say(f"Can't get refcount for cluster {c}: {os.strerror(errno.EIO)}")
            res.check_errors += 1
            continue
        fixing = False
        if stored == 0:
            rebuild = True
        else:
            fixing = bool(fix & FIX_LEAKS if stored > computed else fix & FIX_ERRORS)
        word = "Repairing" if fixing else ("ERROR" if stored < computed else "Leaked")
        res.say(f"{word} cluster {c} refcount={stored} reference={computed}")
        if fixing:
            try:
                await rc.update(c, computed - stored)
            except OSError:
                pass
            else:
                if stored > computed:
                    res.leaks_fixed += 1
                    if not computed:  # QEMU discards whatever a repair frees
                        try:
                            await w.file.discard(c * w.cs, w.cs)
                        except OSError:
                            pass
                else:
                    res.corruptions_fixed += 1
                continue
        if stored < computed:
            res.corruptions += 1
        else:
            res.leaks += 1
    return rebuild, highest


def _alloc(refs: list[int], count: int, first_free: int) -> tuple[int, int]:
    """``count`` free clusters in the computed counts, at or after ``first_free``, now
    counted once; returns their first cluster and where the first gap was (QEMU's
    alloc_clusters_imrt: free clusters past the end are appended)."""
    cluster, run, first_gap = first_free, 0, True
    while cluster < len(refs) and run < count:
        if not refs[cluster]:
            run += 1
            if first_gap:
                first_free, first_gap = cluster, False
        else:
            run = 0
        cluster += 1
    if run < count:
        refs.extend([0] * (cluster + count - run - len(refs)))
    cluster -= run
    for c in range(cluster, cluster + count):
        refs[c] = 1
    return cluster, first_free


async def _write_refblocks(w: _Walker, first: int, end: int, table: list[int]) -> bool:
    """Write the refcount blocks covering clusters ``first..end-1`` that count anything,
    placing the ones ``table`` lacks; True when the table had to grow."""
    image, cs, refs = w.image, w.cs, w.refs
    e = image.refcounts.entries
    order = image.refcounts.order
    grown, first_free = False, 0
    c = first
    while c < end:
        if c >= len(refs) or not refs[c]:
            c += 1
            continue
        bi = c // e
        start = bi * e
        if bi < len(table) and table[bi]:
            offset = table[bi]
        else:
            first_free = max(first_free, start)
            cluster, first_free = _alloc(refs, 1, first_free)
            end = max(end, cluster + 1)  # the block holding this block's own count
            if len(table) <= bi:
                table.extend([0] * (-(-(bi + 1) * 8 // cs) * cs // 8 - len(table)))
                grown = True
            offset = table[bi] = cluster * cs
        await _step("ERROR writing refblock",
                    image.write_meta(offset, encode_block(refs[start:start + e], order, cs), 0))
        c = start + e
    return grown


async def _rebuild(w: _Walker) -> None:
    """A new refcount structure from the computed counts alone (QEMU's
    rebuild_refcount_structure); the old one is left behind as leaks."""
    image, cs, refs = w.image, w.cs, w.refs
    table: list[int] = []
    await _write_refblocks(w, 0, len(refs), table)
    while True:
        clusters = -(-len(table) * 8 // cs)
        first, _ = _alloc(refs, clusters, 0)
        # The table's own clusters are counted in blocks that may need writing again.
        if not await _write_refblocks(w, first, first + clusters, table):
            break
    offset = first * cs
    await _step("ERROR writing reftable",
                image.write_meta(offset, struct.pack(f">{len(table)}Q", *table), 0))
    await _step("ERROR setting reftable", _write_header_table(image, offset, clusters))
    await image.refcounts.adopt(offset, clusters)


async def _write_header_table(image: Any, offset: int, clusters: int) -> None:
    await image.file.write(48, struct.pack(">QI", offset, clusters))
    await image.file.flush()


class _RebuildError(Exception):
    """A rebuild step failed: ``what`` is QEMU's prefix for the error line."""

    def __init__(self, what: str, errno_: int) -> None:
        super().__init__(what)
        self.what, self.errno = what, errno_


async def _step(what: str, io: Awaitable[None]) -> None:
    try:
        await io
    except OSError as exc:
        raise _RebuildError(what, exc.errno or errno.EIO) from None


async def _read_snapshots(node: "Qcow2Base", res: CheckResult, fix: int) -> bool:
    """Read the snapshot table afresh, as QEMU's check does (an open for checking skips
    it, so a broken table can be repaired); False when it cannot be read.

    ``-r all`` drops what cannot be kept: snapshots past QEMU's limits (their
    clusters then leak, which the refcount check repairs) and extra data
    past 1024 bytes; the table is written anew after the refcount check.
    """
    image = node.image
    h = image.header
    repair = bool(fix & FIX_ERRORS)
    nb, offset = struct.unpack(">IQ", bytes(await image.file.read(60, 12)))
    reduced, dropped = 0, False

    def unreadable(error: int, message: str) -> bool:
        res.check_errors += 1
        res.error = error
        res.failure = message
        return False

    if nb > qsnap.MAX_SNAPSHOTS and repair:
        res.say(f"Discarding {nb - qsnap.MAX_SNAPSHOTS} overhanging snapshots")
        reduced, nb = nb - qsnap.MAX_SNAPSHOTS, qsnap.MAX_SNAPSHOTS
    try:
        hdr.validate_table(h, offset, nb, hdr.SNAPSHOT_HEADER_SIZE,
                           hdr.SNAPSHOT_HEADER_SIZE * qsnap.MAX_SNAPSHOTS, "snapshot table")
    except QMPError as exc:
        message = f"ERROR {exc.desc}"
        if nb > qsnap.MAX_SNAPSHOTS:
            message += (f"\nYou can force-remove all {nb - qsnap.MAX_SNAPSHOTS} "
                        "overhanging snapshots with {prog} check -r all")
        return unreadable(errno.EFBIG if exc.desc.endswith("too large") else errno.EINVAL,
                          message)
    # One read for the whole table as far as it can be (entries are small and many).
    end = image.file.length()
    window = bytes(await image.file.read(offset, max(0, min(end - offset,
                                                            qsnap.MAX_TABLE_SIZE + 8))))

    async def read(at: int, n: int) -> bytes:
        if at - offset + n <= len(window):
            return window[at - offset:at - offset + n]
        if at >= end:
            return bytes(n)
        return bytes(await image.file.read(at, n)).ljust(n, b"\0")

    raw, extra_sizes, pos, length = bytearray(), [], offset, 0
    for i in range(nb):
        pos += -pos % 8
        length += -length % 8
        head = bytearray(await read(pos, 40))
        id_len, name_len = struct.unpack_from(">HH", head, 12)
        extra_len, = struct.unpack_from(">I", head, 36)
        pos += 40
        kept = extra_len
        if extra_len > qsnap.MAX_EXTRA:
            if not repair:
                return unreadable(errno.EFBIG, "ERROR failed to read the snapshot table: Too "
                                  f"much extra metadata in snapshot table entry {i}\nYou can "
                                  "force-remove this extra metadata with {prog} check -r all")
            res.say(f"Discarding too much extra metadata in snapshot table entry {i} "
                    f"({extra_len} > {qsnap.MAX_EXTRA})")
            dropped, kept = True, qsnap.MAX_EXTRA
        rest = await read(pos, kept)
        pos += extra_len
        names = await read(pos, id_len + name_len)
        pos += id_len + name_len
        # QEMU keeps both as C strings: whatever follows a NUL is lost on rewriting.
        ident, name = (part.split(b"\0")[0] for part in (names[:id_len], names[id_len:]))
        length += 40 + kept + id_len + name_len
        if length > qsnap.MAX_TABLE_SIZE or pos - offset > 0x7FFFFFFF:
            if not repair:
                return unreadable(errno.EFBIG, "ERROR failed to read the snapshot table: "
                                  "Snapshot table is too big\nYou can force-remove all "
                                  f"{nb - i} overhanging snapshots with " "{prog} check -r all")
            res.say(f"Discarding {nb - i} overhanging snapshots (snapshot table is too big)")
            reduced += nb - i
            nb = i
            break
        struct.pack_into(">HH", head, 12, len(ident), len(name))
        struct.pack_into(">I", head, 36, kept)
        entry = bytes(head) + rest + ident + name
        raw += entry + bytes(-len(entry) % 8)
        extra_sizes.append(kept)
    snaps = qsnap.parse_table(bytes(raw), nb, h.size)
    res.corruptions += reduced + dropped
    if reduced:
        # Leaks the dropped snapshots' clusters, which the refcount check repairs.
        await image.file.write(60, struct.pack(">I", nb))
        await image.file.flush()
        res.corruptions_fixed += reduced
        res.corruptions -= reduced
    if h.version >= 3:
        for i, size in enumerate(extra_sizes):
            if size < 16:
                res.corruptions += 1
                res.say(f"{'Repairing' if repair else 'ERROR'} snapshot table entry {i} "
                        "is incomplete")
    h.nb_snapshots, h.snapshots_offset = nb, offset
    image.snapshots = snaps
    image.snapshot_table_size = pos - offset if nb else 0
    await image.metadata.load_snapshots()
    return True


async def check(node: "Qcow2Base", fix: int = 0,
                sink: Callable[[str], None] | None = None) -> CheckResult:
    """Walk the image, compare counts, optionally repair: QEMU 7.2's qcow2_check_refcounts,
    with its numbers and messages.  ``error`` is set where QEMU's check fails outright."""
    image = node.image
    rc = image.refcounts
    async with image.lock:
        await node.map.write_pending()  # the walk reads the tables in the file
        # Repairs are written through, as QEMU's are: lazy refcounts would set the dirty bit.
        lazy, rc.lazy = rc.lazy, False
        try:
            return await _check_locked(node, fix, sink)
        finally:
            rc.lazy = lazy


async def _check_locked(node: "Qcow2Base", fix: int,
                        sink: Callable[[str], None] | None) -> CheckResult:
    """The snapshot table first, then the refcounts; then the table is rewritten if it
    had to be repaired (QEMU's qcow2_co_check_locked)."""
    image = node.image
    snap = CheckResult(sink=sink)
    if not await _read_snapshots(node, snap, fix):
        return snap
    res = await _check_refcounts(node, fix, sink)
    if snap.corruptions and fix & FIX_ERRORS and not res.error:
        try:
            await qsnap.write_table(image, image.snapshots, discard=True)
        except OSError as exc:
            snap.check_errors += 1
            snap.error = exc.errno or errno.EIO  # the check fails as a whole, as in QEMU
            snap.say(f"ERROR failed to update snapshot table: {os.strerror(snap.error)}")
        else:
            snap.corruptions_fixed += snap.corruptions
            snap.corruptions = 0
    for counter in ("check_errors", "corruptions", "leaks", "corruptions_fixed", "leaks_fixed"):
        total = getattr(res, counter) + getattr(snap, counter)
        # QEMU's counters are C ints: billions of dropped snapshots wrap around.
        setattr(res, counter, (total + (1 << 31)) % (1 << 32) - (1 << 31))
    res.error = res.error or snap.error
    res.messages[:0] = snap.messages
    if fix and not res.corruptions and not res.check_errors and not res.error:
        await image.mark_clean()
    return res


async def _check_refcounts(node: "Qcow2Base", fix: int,
                           sink: Callable[[str], None] | None) -> CheckResult:
    """QEMU's qcow2_check_refcounts."""
    image = node.image
    res = CheckResult(total_clusters=-(-image.header.size // image.cluster_size), sink=sink)
    w = _Walker(node, res, fix)
    rebuild = await walk(w)
    before = dataclasses.replace(res)
    found, highest = await _compare(w, res, 0)
    rebuild = rebuild or found
    if rebuild and fix & FIX_ERRORS:
        old = dataclasses.replace(res)
        res.say("Rebuilding refcount structure")
        try:
            await _rebuild(w)
        except _RebuildError as exc:
            res.error = exc.errno
            res.failure = f"{exc.what}: {os.strerror(exc.errno)}"
            return res
        res.corruptions = res.leaks = 0
        w = _Walker(node, res)
        await walk(w)
        fresh_leaks = 0
        if fix & FIX_LEAKS:
            # The old structure is leaked now; only leaks the rebuild made count.
            scratch = CheckResult(messages=res.messages, sink=res.sink)
            still, highest = await _compare(w, scratch, FIX_LEAKS)
            if still:
                res.say("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = scratch.leaks
        res.corruptions_fixed += max(0, old.corruptions - res.corruptions)
        res.leaks_fixed += max(0, old.leaks - res.leaks)
        res.leaks += fresh_leaks
    elif fix:
        if rebuild:
            res.say("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            res.error = errno.EIO
            return res
        if res.leaks or res.corruptions:
            messages = res.messages
            res = dataclasses.replace(before, messages=messages)
            _, highest = await _compare(w, res, fix)
    counts = await _stored(image.refcounts, len(w.refs))
    await _check_copied(node, res, fix, counts)
    res.image_end_offset = (highest + 1) * image.cluster_size
    return res


async def _check_copied(node: "Qcow2Base", res: CheckResult, fix: int,
                        counts: list[int | None]) -> None:
    """``COPIED`` must be set exactly where the count is one (active tables only).

    ``counts`` are the stored counts of the clusters inside the file; a count
    that cannot be read is skipped without a word, as QEMU does (the
    comparison already reported it).
    """
    m = node.map
    rc = node.image.refcounts
    cs = node.image.cluster_size

    async def count_of(c: int) -> int | None:
        if c < len(counts):
            return counts[c]
        try:
            return await rc.get(c)
        except OSError:
            return None

    for i, entry in enumerate(list(m.l1)):
        l2 = entry & L1_OFFSET_MASK
        if not l2:
            continue
        count = await count_of(l2 // cs)
        if count is not None and (count == 1) != bool(entry & COPIED):
            word = "Repairing" if fix & FIX_ERRORS else "ERROR"
            res.say(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} "
                    f"l1_entry={entry:x} refcount={count}")
            if fix & FIX_ERRORS:
                await m.set_l1(i, (entry | COPIED) if count == 1 else (entry & ~COPIED))
                res.corruptions_fixed += 1
            else:
                res.corruptions += 1
        if node.image.external_data:
            continue  # data clusters of an external file have no refcounts to agree with
        table = await node.image.file.read(l2, cs)
        step = m.entry_size // 8
        for index, e in enumerate(struct.unpack(f">{cs // 8}Q", table)[::step]):
            host = e & OFFSET_MASK
            if e & COMPRESSED or not host:
                continue
            c = host // cs
            count = await count_of(c)
            if count is not None and (count == 1) != bool(e & COPIED):
                pos = index * step * 8
                word = "Repairing" if fix & FIX_ERRORS else "ERROR"
                res.say(f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} "
                        f"refcount={count}")
                if fix & FIX_ERRORS:
                    fixed = (e | COPIED) if count == 1 else (e & ~COPIED)
                    data = struct.pack(">Q", fixed)
                    await node.image.file.write(l2 + pos, data)
                    m.cache.drop(l2)
                    res.corruptions_fixed += 1
                else:
                    res.corruptions += 1
