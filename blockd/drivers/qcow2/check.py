"""Consistency check and repair: refcounts recomputed from every structure that uses clusters.

The walk counts references from the header, the active L1/L2 tables,
internal snapshots' tables, the snapshot table, the refcount table and
blocks, persistent bitmaps and the LUKS header of an encrypted image;
then compares with the stored counts.
A stored count above the computed one is a leak (harmless), below it a
corruption (a cluster could be handed out twice).  Messages and the
numbers in the result are those ``qemu-img check`` prints for the same
image, so scripts can compare the two.

Repair ``leaks`` lowers leaked counts; ``all`` also raises counts that
are too low and fixes ``COPIED`` flags that disagree with the counts.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import TYPE_CHECKING, Any

from blockd.drivers.qcow2 import crypt
from blockd.drivers.qcow2 import header as hdr
from blockd.drivers.qcow2.cluster import COMPRESSED, COPIED, L1_OFFSET_MASK, OFFSET_MASK
from blockd.drivers.qcow2.snapshot import MAX_L1_SIZE

if TYPE_CHECKING:
    from blockd.drivers.qcow2.driver import Qcow2Node

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
    messages: list[str] = dataclasses.field(default_factory=list)

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


class _Walker:
    def __init__(self, node: "Qcow2Node", res: CheckResult) -> None:
        self.node = node
        self.image = node.image
        self.file = node.image.file
        self.cs = node.image.cluster_size
        self.cb = node.image.header.cluster_bits
        self.res = res
        self.nb_clusters = -(-self.file.length() // self.cs)
        self.refs = [0] * self.nb_clusters
        self.next_contiguous = 0
        #: When set, the kind of structure that first claimed each host cluster.
        self.owners: dict[int, str] | None = None

    def inc(self, offset: int, length: int, kind: str = "data") -> None:
        if length <= 0:
            return
        first, last = offset // self.cs, (offset + length - 1) // self.cs
        for c in range(first, last + 1):
            if c >= self.nb_clusters:
                self.res.messages.append(
                    f"ERROR: counting reference for region exceeding the end of the file by one "
                    f"cluster or more: offset 0x{c * self.cs:x} size 0x{self.cs:x}")
                self.res.corruptions += 1
                continue
            self.refs[c] += 1
            if self.owners is not None:
                self.owners.setdefault(c, kind)

    async def walk_l1(self, l1_offset: int, l1_size: int, active: bool) -> None:
        self.inc(l1_offset, l1_size * 8, "L1 table")
        if not l1_size:
            return
        raw = await self.file.read(l1_offset, l1_size * 8)
        for i, entry in enumerate(struct.unpack(f">{l1_size}Q", raw)):
            l2 = entry & L1_OFFSET_MASK
            if not l2:
                continue
            if l2 % self.cs:
                self.res.messages.append(f"ERROR l2_offset={l2:x}: Table is not cluster aligned; "
                                         "L1 entry corrupted")
                self.res.corruptions += 1
                continue
            self.inc(l2, self.cs, "L2 table")
            await self.walk_l2(l2, active)

    async def walk_l2(self, l2_offset: int, active: bool) -> None:
        ext = self.node.map.ext
        size = 16 if ext else 8
        table = await self.file.read(l2_offset, self.cs)
        self.next_contiguous = 0  # QEMU measures fragmentation within each L2 table
        entries = struct.unpack(f">{self.cs // 8}Q", table)[::size // 8]
        external = self.node.image.external_data
        cs, nb, refs, res = self.cs, self.nb_clusters, self.refs, self.res
        plain = self.owners is None
        for entry in entries:
            if not entry:
                continue
            host = entry & OFFSET_MASK
            if plain and not entry & COMPRESSED and host and not host % cs and host < nb * cs:
                # The common case, kept short: a normal cluster inside the file.
                if active:
                    res.allocated_clusters += 1
                    if self.next_contiguous and host != self.next_contiguous:
                        res.fragmented_clusters += 1
                    self.next_contiguous = host + cs
                if not external:
                    refs[host // cs] += 1
                continue
            if entry & COMPRESSED:
                x = 62 - (self.cb - 8)
                off = entry & ((1 << x) - 1)
                sectors = (entry >> x) & ((1 << (self.cb - 8)) - 1)
                if active:
                    self.res.allocated_clusters += 1
                    self.res.compressed_clusters += 1
                    self.res.fragmented_clusters += 1
                self.inc(off & ~511, (sectors + 1) * 512, "compressed")
                continue
            if not host and not (external and entry & COPIED and not entry & 1):
                continue
            # Normal and preallocated-zero clusters both hold their cluster.
            if active:
                self.res.allocated_clusters += 1
                if self.next_contiguous and host != self.next_contiguous:
                    self.res.fragmented_clusters += 1
                self.next_contiguous = host + self.cs
            if host % self.cs:
                self.res.messages.append(f"ERROR offset={host:x}: Data cluster is not properly "
                                         "aligned; L2 entry corrupted.")
                self.res.corruptions += 1
                continue
            if not external:  # clusters of an external data file have no refcounts
                self.inc(host, self.cs)

    async def walk_snapshots(self) -> None:
        h = self.image.header
        if not h.nb_snapshots:
            return
        for sn in self.image.snapshots:
            if sn.l1_table_offset % self.cs:
                self.res.messages.append(
                    f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: "
                    "L1 table is not cluster aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            if sn.l1_size > MAX_L1_SIZE:
                self.res.messages.append(
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

    async def walk_refcounts(self) -> None:
        rc = self.image.refcounts
        h = self.image.header
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * self.cs,
                 "refcount table")
        for i, entry in enumerate(rc.table):
            if entry & 0x1FF:
                self.res.messages.append(f"ERROR refcount table entry {i} has reserved bits set")
                self.res.corruptions += 1
                continue
            off = entry & OFFSET_MASK
            if not off:
                continue
            if off // self.cs >= self.nb_clusters:
                self.res.messages.append(f"ERROR refcount block {i} is outside image")
                self.res.corruptions += 1
                continue
            self.inc(off, self.cs, "refcount block")


async def walk(w: _Walker) -> None:
    """Count every reference the image's structures make, header first."""
    w.inc(0, w.cs, "header")
    luks_header = crypt.fde_extent(w.image.header)
    if luks_header is not None:
        w.inc(*luks_header, "luks header")
    await w.walk_l1(w.image.header.l1_table_offset, w.image.header.l1_size, active=True)
    await w.walk_snapshots()
    await w.walk_bitmaps()
    await w.walk_refcounts()


async def cluster_kinds(node: "Qcow2Node") -> list[str]:
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


async def check(node: "Qcow2Node", fix: int = 0) -> CheckResult:
    """Walk the image, compare counts, optionally repair; QEMU's numbers and messages."""
    image = node.image
    h = image.header
    res = CheckResult(total_clusters=-(-h.size // image.cluster_size))
    async with image.lock:
        await node.map.write_pending()  # the walk reads the tables in the file
        w = _Walker(node, res)
        await walk(w)
        rc = image.refcounts
        nb = w.nb_clusters
        counts = await rc.counts(nb)
        highest = nb - 1
        while highest >= 0 and not (counts[highest] or w.refs[highest]):
            highest -= 1
        for c in [c for c, (a, b) in enumerate(zip(counts, w.refs)) if a != b]:
            stored, computed = counts[c], w.refs[c]
            fixing = ((stored > computed and fix & FIX_LEAKS)
                      or (stored < computed and fix & FIX_ERRORS))
            word = "Repairing" if fixing else ("ERROR" if stored < computed else "Leaked")
            res.messages.append(f"{word} cluster {c} refcount={stored} reference={computed}")
            if fixing and computed <= rc.max_value:
                try:
                    await rc.update(c, computed - stored)
                except OSError:
                    res.check_errors += 1
                    continue
                if stored > computed:
                    res.leaks_fixed += 1
                else:
                    res.corruptions_fixed += 1
            elif stored < computed:
                res.corruptions += 1
            else:
                res.leaks += 1
        if res.leaks_fixed or res.corruptions_fixed:
            counts = await rc.counts(nb)
        await _check_copied(node, res, fix, counts)
        res.image_end_offset = (highest + 1) * image.cluster_size
    return res


async def _check_copied(node: "Qcow2Node", res: CheckResult, fix: int,
                        counts: list[int]) -> None:
    """``COPIED`` must be set exactly where the count is one (active tables only).

    ``counts`` are the stored counts of the clusters inside the file.
    """
    m = node.map
    rc = node.image.refcounts
    cs = node.image.cluster_size

    async def count_of(c: int) -> int:
        return counts[c] if c < len(counts) else await rc.get(c)

    for i, entry in enumerate(list(m.l1)):
        l2 = entry & L1_OFFSET_MASK
        if not l2:
            continue
        count = await count_of(l2 // cs)
        if (count == 1) != bool(entry & COPIED):
            word = "Repairing" if fix & FIX_ERRORS else "ERROR"
            res.messages.append(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} "
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
            count = counts[c] if c < len(counts) else await rc.get(c)
            if (count == 1) != bool(e & COPIED):
                pos = index * step * 8
                word = "Repairing" if fix & FIX_ERRORS else "ERROR"
                res.messages.append(f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} "
                                    f"refcount={count}")
                if fix & FIX_ERRORS:
                    fixed = (e | COPIED) if count == 1 else (e & ~COPIED)
                    data = struct.pack(">Q", fixed)
                    await node.image.file.write(l2 + pos, data)
                    m.cache.drop(l2)
                    res.corruptions_fixed += 1
                else:
                    res.corruptions += 1
