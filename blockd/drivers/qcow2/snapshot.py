"""Internal snapshots: the snapshot table, and taking, deleting and reverting to snapshots.

A snapshot is a copy of the L1 table plus a table entry naming it.  It
shares every L2 table and data cluster with the active image, which is
what the refcounts record: a cluster reachable from N L1 tables (the
active one and N-1 snapshots) has a count of N, exactly as ``check``
walks them.  Taking a snapshot raises the count of everything the active
L1 reaches; deleting one lowers the count of everything its L1 reaches,
freeing clusters that drop to zero.  ``COPIED`` in the active tables is
then set again wherever a count is back to one, so writes that no longer
need to copy do not.

The table entry is 40 bytes, extra data (64-bit VM state size, virtual
disk size, icount; anything past those is kept verbatim), the id and
the name, padded to 8 bytes.  The table is always rewritten to fresh
clusters and switched in the header by one write, so a crash leaves
either the old or the new table.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import struct
import time
from typing import TYPE_CHECKING, Any

from blockd.drivers.qcow2.cluster import COMPRESSED, COPIED, L1_OFFSET_MASK, OFFSET_MASK, Entry
from blockd.errors import QMPError

if TYPE_CHECKING:
    from blockd.drivers.qcow2.node import Qcow2Base
    from blockd.drivers.qcow2.image import Image

_HEAD = struct.Struct(">QIHHIIQII")  # 40 bytes
_EXTRA = struct.Struct(">QQQ")  # the extra data fields blockd writes
#: QEMU's limits on the table (entry count and bytes).
MAX_SNAPSHOTS = 65536
MAX_TABLE_SIZE = 64 << 20
MAX_L1_SIZE = (32 << 20) // 8
MAX_EXTRA = 1024


@dataclasses.dataclass
class Snapshot:
    """One snapshot table entry."""

    id: str
    name: str
    l1_table_offset: int = 0
    l1_size: int = 0
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int = 0
    #: Instruction count at the snapshot; -1 when none was recorded.
    icount: int = -1
    #: Extra data past the fields blockd knows, kept as found.
    unknown_extra: bytes = b""

    def encode(self) -> bytes:
        ident, name = self.id.encode(), self.name.encode()
        extra = _EXTRA.pack(self.vm_state_size, self.disk_size,
                            self.icount & 0xFFFFFFFFFFFFFFFF) + self.unknown_extra
        raw = _HEAD.pack(self.l1_table_offset, self.l1_size, len(ident), len(name),
                         self.date_sec, self.date_nsec, self.vm_clock_nsec,
                         min(self.vm_state_size, 0xFFFFFFFF), len(extra)) + extra + ident + name
        return raw + bytes(-len(raw) % 8)

    def info(self) -> dict[str, Any]:
        """``SnapshotInfo``, members in declaration order; icount only when recorded."""
        out: dict[str, Any] = {
            "id": self.id, "name": self.name, "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec, "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000}
        if self.icount != -1:
            out["icount"] = self.icount
        return out


def parse_table(buf: bytes, count: int, disk_size: int) -> list[Snapshot]:
    """Decode ``count`` entries; entries without a disk size get the image's (as QEMU does)."""
    snaps, pos = [], 0
    for _ in range(count):
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra_len) = _HEAD.unpack_from(buf, pos)
        start = pos + _HEAD.size
        extra = bytes(buf[start:start + extra_len])
        sn = Snapshot(id="", name="", l1_table_offset=l1_off, l1_size=l1_size,
                      date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=vm_clock,
                      vm_state_size=vm_state, disk_size=disk_size)
        if len(extra) >= 8:
            sn.vm_state_size = int.from_bytes(extra[0:8], "big")
        if len(extra) >= 16:
            sn.disk_size = int.from_bytes(extra[8:16], "big")
        if len(extra) >= 24:
            icount = int.from_bytes(extra[16:24], "big")
            sn.icount = -1 if icount == 0xFFFFFFFFFFFFFFFF else icount
        sn.unknown_extra = extra[24:]
        start += extra_len
        sn.id = bytes(buf[start:start + id_len]).decode(errors="replace")
        start += id_len
        sn.name = bytes(buf[start:start + name_len]).decode(errors="replace")
        length = _HEAD.size + extra_len + id_len + name_len
        pos += length + (-length % 8)
        snaps.append(sn)
    return snaps


async def load(image: "Image") -> list[Snapshot]:
    """Read the table (QEMU's open-time checks); its size is remembered for freeing it."""
    h = image.header
    image.snapshot_table_size = 0
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise QMPError("Snapshot table too large")
    if h.snapshots_offset % image.cluster_size:
        raise QMPError("Snapshot table offset invalid")
    if not h.nb_snapshots:
        return []
    # Entries are variable-sized: read the fixed parts first to learn the total.
    pos, size = h.snapshots_offset, 0
    for i in range(h.nb_snapshots):
        head = await image.file.read(pos + size, _HEAD.size)
        if len(head) < _HEAD.size:
            break
        _, _, id_len, name_len, _, _, _, _, extra_len = _HEAD.unpack_from(head)
        if extra_len > MAX_EXTRA:
            raise QMPError(f"Too much extra metadata in snapshot table entry {i}")
        length = _HEAD.size + extra_len + id_len + name_len
        size += length + (-length % 8)
    raw = bytes(await image.file.read(pos, size))
    image.snapshot_table_size = size
    return parse_table(raw, h.nb_snapshots, h.size)


def find(snaps: list[Snapshot], snap_id: str | None, name: str | None) -> Snapshot | None:
    """The first snapshot matching every given key (QMP's id-and/or-name lookup)."""
    for sn in snaps:
        if (snap_id is None or sn.id == snap_id) and (name is None or sn.name == name):
            return sn
    return None


def find_id_or_name(snaps: list[Snapshot], key: str) -> Snapshot | None:
    """An id match wins over a name match, as ``qemu-img snapshot -a`` resolves."""
    return find(snaps, key, None) or find(snaps, None, key)


def new_id(snaps: list[Snapshot]) -> str:
    """One above the highest numeric id (ids are decimal strings; others count as 0)."""
    highest = 0
    for sn in snaps:
        digits = ""
        for ch in sn.id:
            if not ch.isdigit():
                break
            digits += ch
        highest = max(highest, int(digits) if digits else 0)
    return str(highest + 1)


def now_qmp() -> tuple[int, int, int]:
    """(date_sec, date_nsec, vm_clock_nsec) as qemu-storage-daemon stamps a snapshot.

    It has no guest, so its VM clock is the same millisecond wall clock.
    """
    ms = time.time_ns() // 1_000_000
    return ms // 1000, ms % 1000 * 1_000_000, ms * 1_000_000


def now_img() -> tuple[int, int, int]:
    """(date_sec, date_nsec, vm_clock_nsec) as ``qemu-img snapshot -c`` stamps one."""
    us = time.time_ns() // 1000
    return us // 1_000_000, us % 1_000_000 * 1000, 0


async def write_table(image: "Image", snaps: list[Snapshot], discard: bool = False) -> None:
    """Store ``snaps`` in new clusters, point the header at them, free the old table
    (discarding it when ``discard``)."""
    h = image.header
    cs = image.cluster_size
    raw = b"".join(sn.encode() for sn in snaps)
    if len(raw) > MAX_TABLE_SIZE:
        raise OSError(errno.EFBIG, "Snapshot table too large")
    old_off, old_size = h.snapshots_offset, image.snapshot_table_size if h.nb_snapshots else 0
    offset = 0
    if snaps:
        offset = await image.refcounts.alloc(-(-len(raw) // cs))
        try:
            # Fresh clusters: any live metadata there means the refcounts are broken.
            await image.write_meta(offset, raw, 0)
            await image.file.flush()
        except OSError:
            if not image.stopped:  # a fatal corruption stops every write, as in QEMU
                await image.refcounts.free(offset, -(-len(raw) // cs))
            raise
    try:
        await image.file.write(60, struct.pack(">IQ", len(snaps), offset))
        await image.file.flush()
    except OSError:
        if snaps:
            await image.refcounts.free(offset, -(-len(raw) // cs))
        raise
    h.nb_snapshots, h.snapshots_offset = len(snaps), offset
    image.snapshots = list(snaps)
    image.snapshot_table_size = len(raw)
    if old_size:
        await image.refcounts.free(old_off, -(-old_size // cs), discard)


def validate_l1(image: "Image", sn: Snapshot) -> None:
    """A snapshot's L1 table must be sane before it is used (loaded or reverted to)."""
    if sn.l1_size > MAX_L1_SIZE:
        raise OSError(errno.EFBIG, "Snapshot L1 table too large")
    if sn.l1_table_offset % image.cluster_size:
        raise OSError(errno.EINVAL, "Snapshot L1 table offset invalid")


async def _read_l1(image: "Image", offset: int, size: int) -> list[int]:
    if not size:
        return []
    raw = await image.file.read(offset, size * 8)
    return list(struct.unpack(f">{size}Q", raw))


def _entry_clusters(node: "Qcow2Base", raw: int) -> list[int]:
    """Host clusters whose refcount one L2 entry holds (none for external data)."""
    cs = node.image.cluster_size
    entry = Entry(raw)
    if raw & COMPRESSED:
        off, length = entry.compressed_span(node.image.header.cluster_bits)
        return list(range(off // cs, (off + length - 1) // cs + 1))
    if entry.host and not node.image.external_data:
        return [entry.host // cs]
    return []


async def _tree_clusters(node: "Qcow2Base", l1: list[int]) -> list[int]:
    """Every cluster (with repeats) the tables under ``l1`` hold a reference on."""
    image, m = node.image, node.map
    cs = image.cluster_size
    out: list[int] = []
    for entry in l1:
        l2 = entry & L1_OFFSET_MASK
        if not l2:
            continue
        out.append(l2 // cs)
        table = await image.file.read(l2, cs)
        for pos in range(0, cs, m.entry_size):
            out += _entry_clusters(node, struct.unpack_from(">Q", table, pos)[0])
    return out


async def _add_refs(image: "Image", clusters: list[int]) -> None:
    """Raise each count by one per mention; all or nothing.

    QEMU reports a refcount that would overflow its width as EINVAL.
    """
    try:
        await image.refcounts.update_batch(collections.Counter(clusters))
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise OSError(errno.EINVAL, "Invalid argument") from None
        raise


async def _drop_refs(image: "Image", clusters: list[int], discard: bool) -> None:
    """Lower each count by one per mention; with ``discard`` the file gets freed clusters back."""
    cs = image.cluster_size
    counts = collections.Counter(clusters)
    freed = await image.refcounts.update_batch({c: -n for c, n in counts.items()})
    for c in freed:
        image.debug_event("cluster_free")
        if discard:
            try:
                await image.file.discard(c * cs, cs)
            except OSError:
                pass


def _discard_snapshot(node: "Qcow2Base") -> bool:
    """Whether clusters a snapshot operation frees are discarded (``pass-discard-snapshot``,
    on by default, for nodes opened with ``discard=unmap``, as in QEMU)."""
    return (node.options.get("discard", "ignore") == "unmap"
            and node.options.get("pass-discard-snapshot", True))


async def fix_copied(node: "Qcow2Base") -> None:
    """Make ``COPIED`` in the active L1 and L2 tables say exactly "count is one"."""
    image, m = node.image, node.map
    cs = image.cluster_size
    rc = image.refcounts
    for i, entry in enumerate(list(m.l1)):
        l2 = entry & L1_OFFSET_MASK
        if not l2:
            continue
        want = (entry | COPIED) if await rc.get(l2 // cs) == 1 else (entry & ~COPIED)
        if want != entry:
            await m.set_l1(i, want)
        if image.external_data:
            continue
        table = bytearray(await image.file.read(l2, cs))
        changed = False
        for pos in range(0, cs, m.entry_size):
            e = struct.unpack_from(">Q", table, pos)[0]
            host = e & OFFSET_MASK
            if e & COMPRESSED or not host:
                continue
            fixed = (e | COPIED) if await rc.get(host // cs) == 1 else (e & ~COPIED)
            if fixed != e:
                struct.pack_into(">Q", table, pos, fixed)
                changed = True
        if changed:
            await image.file.write(l2, bytes(table))
    m.cache.clear()


async def create(node: "Qcow2Base", sn: Snapshot) -> Snapshot:
    """Take a snapshot of the active image (the caller holds the image exclusively).

    Order for crash safety: the L1 copy is written and every count raised
    before the table names the snapshot, so a crash leaks at worst.
    """
    image = node.image
    h = image.header
    cs = image.cluster_size
    if len(image.snapshots) >= MAX_SNAPSHOTS:
        raise OSError(errno.EFBIG, "File too large")
    if image.external_data:
        raise OSError(errno.ENOTSUP, "Operation not supported")
    l1 = list(node.map.l1)
    sn.l1_size = len(l1)
    sn.disk_size = h.size
    clusters = -(-(len(l1) * 8) // cs)
    sn.l1_table_offset = await image.refcounts.alloc(clusters) if clusters else 0
    try:
        if l1:
            await image.file.write(sn.l1_table_offset, struct.pack(f">{len(l1)}Q", *l1))
        await _add_refs(image, await _tree_clusters(node, l1))
        try:
            await image.file.flush()
            await write_table(image, image.snapshots + [sn])
        except OSError:
            await _drop_refs(image, await _tree_clusters(node, l1), False)
            raise
    except OSError:
        if clusters:
            await image.refcounts.free(sn.l1_table_offset, clusters)
        raise
    await fix_copied(node)
    await image.file.flush()
    return sn


async def delete(node: "Qcow2Base", sn: Snapshot) -> None:
    """Remove a snapshot: out of the table first, then its references are dropped."""
    image = node.image
    cs = image.cluster_size
    validate_l1(image, sn)
    await write_table(image, [s for s in image.snapshots if s is not sn])
    l1 = await _read_l1(image, sn.l1_table_offset, sn.l1_size)
    await _drop_refs(image, await _tree_clusters(node, l1), _discard_snapshot(node))
    if sn.l1_size:
        await image.refcounts.free(sn.l1_table_offset, -(-(sn.l1_size * 8) // cs))
    await fix_copied(node)
    await image.file.flush()


async def revert(node: "Qcow2Base", sn: Snapshot) -> None:
    """Make the active image the snapshot's content (its size was restored by the caller).

    The snapshot's tree gains its active reference before the old active
    tree loses its own, so nothing both still needs is freed in between.
    """
    image = node.image
    m = node.map
    validate_l1(image, sn)
    snap_l1 = await _read_l1(image, sn.l1_table_offset, sn.l1_size)
    await _add_refs(image, await _tree_clusters(node, snap_l1))
    old_l1 = list(m.l1)
    if len(snap_l1) > len(m.l1):
        await m.grow_l1(len(snap_l1))
    new_l1 = snap_l1 + [0] * (len(m.l1) - len(snap_l1))
    await image.file.write(image.header.l1_table_offset,
                           struct.pack(f">{len(new_l1)}Q", *new_l1))
    await image.file.flush()
    m.l1 = new_l1
    m.cache.clear()
    await _drop_refs(image, await _tree_clusters(node, old_l1), _discard_snapshot(node))
    await fix_copied(node)
    await image.file.flush()


async def load_view(node: "Qcow2Base", sn: Snapshot) -> None:
    """Show a snapshot's content instead of the active image (read-only nodes)."""
    validate_l1(node.image, sn)
    node.map.l1 = await _read_l1(node.image, sn.l1_table_offset, sn.l1_size)
    node.map.cache.clear()
