"""Changing an existing qcow2 image's options in place (``qemu-img amend``).

Supported: the compatibility level both ways, lazy refcounts, the
refcount width, the virtual size, ``data_file_raw``.  The steps run in
QEMU's order (upgrade first, downgrade last) and refuse what QEMU
refuses with the same messages, so a script sees the same outcome on
either tool.

A new refcount width means a new refcount structure: it is built
complete in free space past the end of the file, counting itself,
flushed, and only then made current by one header write.  A crash
before that write leaves the old structure valid and the new clusters
unreferenced; after it, the old table and blocks read as free.

A downgrade to version 2 must leave nothing a v2 reader misunderstands:
zero clusters (a v3 flag) become unallocated clusters, or explicit
zero-filled clusters when a backing file could show through them.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Callable

from blockd.drivers.qcow2 import header as hdr
from blockd.drivers.qcow2.cluster import COMPRESSED, COPIED, L1_OFFSET_MASK, OFFSET_MASK, ZERO
from blockd.drivers.qcow2.refcount import Refcounts, get_entry, set_entry
from blockd.errors import QMPError

if TYPE_CHECKING:
    from blockd.drivers.qcow2.driver import Qcow2Node

#: Called with (operations done, operations in total) as the steps complete.
Status = Callable[[int, int], None]

#: The refusal to change the backing file; the tool adds a hint to its ``rebase``.
BACKING_REFUSED = "Cannot amend the backing file"

_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}


def _parse(node: "Qcow2Node", opts: dict[str, Any]) -> dict[str, Any]:
    """Validate in QEMU's option order (table order), before anything is changed."""
    h = node.image.header
    want: dict[str, Any] = {"version": h.version}
    if "compat" in opts:
        if opts["compat"] not in _VERSIONS:
            raise QMPError(f"Unknown compatibility level {opts['compat']}")
        want["version"] = _VERSIONS[opts["compat"]]
    if "data_file" in opts and not node.image.external_data:
        raise QMPError("data-file can only be set for images that use an external data file")
    if "refcount_bits" in opts:
        bits = opts["refcount_bits"]
        if bits <= 0 or bits > 64 or bits & (bits - 1):
            raise QMPError("Refcount width must be a power of two and may not exceed 64 bits")
        want["refcount_order"] = bits.bit_length() - 1
    return want


async def amend_options(node: "Qcow2Node", opts: dict[str, Any],
                        status: Status | None = None) -> None:
    """Apply qemu-img amend's ``-o`` options (already type-checked) to an open image.

    ``lazy_refcounts`` and ``data_file_raw`` are booleans, ``refcount_bits``
    and ``size`` integers; ``backing_file``/``backing_fmt`` may only repeat
    the current values.  Encryption options are the caller's business.
    """
    image = node.image
    h = image.header
    want = _parse(node, opts)
    old_version, new_version = h.version, want["version"]
    total = (new_version != old_version) + ("refcount_order" in want)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if status is not None:
            status(done, max(total, 1))

    async with image.lock:
        if new_version > old_version:
            _to_v3(h)
            await image.write_header()
            step()
        if "refcount_order" in want:
            if new_version < 3 and want["refcount_order"] != 4:
                raise QMPError("Refcount widths other than 16 bits require compatibility level "
                               "1.1 or above (use compat=1.1 or greater)")
            await change_refcount_order(node, want["refcount_order"])
            step()
        if "data_file_raw" in opts and node.image.external_data:
            if opts["data_file_raw"]:
                h.autoclear_features |= hdr.AUTOCLEAR_DATA_FILE_RAW
            else:
                h.autoclear_features &= ~hdr.AUTOCLEAR_DATA_FILE_RAW
            await image.write_features()
        if "data_file" in opts and opts["data_file"] != h.data_file:
            h.set_extension(hdr.EXT_DATA_FILE, opts["data_file"].encode())
            h.extensions = _ordered(h.extensions)
            await image.write_header()
        for key, current in (("backing_file", h.backing_file),
                             ("backing_fmt", h.backing_format)):
            if key in opts and opts[key] != current:
                raise QMPError(BACKING_REFUSED)
        lazy = bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS)
        if "lazy_refcounts" in opts and opts["lazy_refcounts"] != lazy:
            if opts["lazy_refcounts"]:
                if new_version < 3:
                    raise QMPError("Lazy refcounts only supported with compatibility level 1.1 "
                                   "and above (use compat=1.1 or greater)")
                h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
            else:
                h.compatible_features &= ~hdr.COMPAT_LAZY_REFCOUNTS
            await image.write_features()
    if opts.get("size"):
        try:
            await node.truncate(opts["size"], exact=True)
        except OSError as exc:
            raise QMPError(exc.strerror or str(exc)) from None
    if new_version < old_version:
        async with image.lock:
            await _downgrade(node)
        step()
    await image.file.flush()


def _ordered(extensions: list[hdr.Extension]) -> list[hdr.Extension]:
    """Known extensions in the order QEMU writes them, unknown ones after, as read."""
    rank = {hdr.EXT_BACKING_FORMAT: 0, hdr.EXT_DATA_FILE: 1, hdr.EXT_CRYPTO: 2,
            hdr.EXT_FEATURE_TABLE: 3, hdr.EXT_BITMAPS: 4}
    return sorted(extensions, key=lambda e: rank.get(e.type, 5))


def _to_v3(h: hdr.Header) -> None:
    h.version = 3
    h.header_length = hdr.V3_WRITE_LENGTH
    h.refcount_order = 4
    h.set_extension(hdr.EXT_FEATURE_TABLE, hdr.feature_table_bytes())
    h.extensions = _ordered(h.extensions)


async def _downgrade(node: "Qcow2Node") -> None:
    image = node.image
    h = image.header
    if h.refcount_order != 4:
        raise QMPError("compat=0.10 requires refcount_bits=16")
    if image.external_data:
        raise QMPError("Cannot downgrade an image with a data file")
    if await _snapshots_need_v3(node):
        raise QMPError("Internal snapshots prevent downgrade of image")
    blocking = h.incompatible_features & ~hdr.INCOMPAT_COMPRESSION
    if blocking:
        raise QMPError(f"Cannot downgrade an image with incompatible features 0x{blocking:x} set")
    h.compatible_features = 0
    h.autoclear_features = 0
    await _expand_zero_clusters(node)
    if h.incompatible_features & hdr.INCOMPAT_COMPRESSION:
        if await _has_compressed(node):
            raise QMPError("Cannot downgrade an image with zstd compression type and existing "
                           "compressed clusters")
        h.incompatible_features &= ~hdr.INCOMPAT_COMPRESSION
        h.compression_type = hdr.COMPRESSION_ZLIB
    h.version = 2
    h.header_length = hdr.V2_LENGTH
    h.set_extension(hdr.EXT_FEATURE_TABLE, None)
    await image.write_header()
    # A v2 header has no autoclear bits, so bitmaps cannot be kept consistent:
    # like QEMU, leave the directory alone and stop tracking them here.
    node.bitmaps = {}
    node.stored_bitmaps = []


async def _snapshots_need_v3(node: "Qcow2Node") -> bool:
    """Whether a snapshot records what only v3's extra data can say (size, big VM state)."""
    h = node.image.header
    pos = h.snapshots_offset
    for _ in range(h.nb_snapshots):
        head = await node.image.file.read(pos, 40)
        _, _, id_len, name_len = struct.unpack_from(">QIHH", head)
        extra = struct.unpack_from(">I", head, 36)[0]
        data = bytes(await node.image.file.read(pos + 40, extra))
        if len(data) >= 8 and struct.unpack_from(">Q", data)[0] > 0xFFFFFFFF:
            return True
        if len(data) >= 16 and struct.unpack_from(">Q", data, 8)[0] != h.size:
            return True
        entry_len = 40 + extra + id_len + name_len
        pos += entry_len + (-entry_len % 8)
    return False


async def _l2_tables(node: "Qcow2Node") -> list[int]:
    """Offsets of every L2 table, active and in snapshots, each once."""
    image = node.image
    h = image.header
    l1s = [(h.l1_table_offset, h.l1_size)]
    pos = h.snapshots_offset
    for _ in range(h.nb_snapshots):
        head = await image.file.read(pos, 40)
        l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", head)
        extra = struct.unpack_from(">I", head, 36)[0]
        l1s.append((l1_off, l1_size))
        entry_len = 40 + extra + id_len + name_len
        pos += entry_len + (-entry_len % 8)
    seen: dict[int, None] = {}
    for off, size in l1s:
        if not size:
            continue
        raw = await image.file.read(off, size * 8)
        for entry in struct.unpack(f">{size}Q", raw):
            if entry & L1_OFFSET_MASK:
                seen[entry & L1_OFFSET_MASK] = None
    return list(seen)


async def _expand_zero_clusters(node: "Qcow2Node") -> None:
    image = node.image
    cs = image.cluster_size
    rc = image.refcounts
    for l2 in await _l2_tables(node):
        table = bytearray(await image.file.read(l2, cs))
        changed = False
        for pos in range(0, cs, 8):
            (entry,) = struct.unpack_from(">Q", table, pos)
            if entry & COMPRESSED or not entry & ZERO:
                continue
            host = entry & OFFSET_MASK
            if host:
                await image.file.write(host, bytes(cs))
                entry &= ~ZERO
            elif node.backing is None:
                entry = 0
            else:
                # The backing file would show through: the zeroes must be real data.
                host = await rc.alloc(1)
                shared = await rc.get(l2 // cs)
                if shared > 1:
                    await rc.update(host // cs, shared - 1)
                await image.file.write(host, bytes(cs))
                entry = host | (COPIED if shared == 1 else 0)
            struct.pack_into(">Q", table, pos, entry)
            changed = True
        if changed:
            await image.file.flush()
            await image.file.write(l2, bytes(table))
            node.map.cache.drop(l2)


async def _has_compressed(node: "Qcow2Node") -> bool:
    image = node.image
    for l2 in await _l2_tables(node):
        table = await image.file.read(l2, image.cluster_size)
        if any(e & COMPRESSED for (e,) in struct.iter_unpack(">Q", table)):
            return True
    return False


async def change_refcount_order(node: "Qcow2Node", order: int) -> None:
    """Rewrite the refcount table and blocks with ``2**order``-bit entries."""
    image = node.image
    h = image.header
    cs = image.cluster_size
    old = image.refcounts
    if order == old.order:
        return
    # Every count as it is now, then what the switch itself changes.
    nb = max(old.alloc_end, -(-image.file.length() // cs))
    counts = [0] * nb
    for bi, entry in enumerate(old.table):
        offset = entry & OFFSET_MASK
        if not offset:
            continue
        block = await image.file.read(offset, cs)
        first = bi * old.entries
        for i in range(min(old.entries, nb - first)):
            counts[first + i] = get_entry(block, i, old.order)
    new_max = (1 << (1 << order)) - 1
    for c, value in enumerate(counts):
        if value > new_max:
            raise QMPError(f"Cannot decrease refcount entry width to {1 << order} bits: Cluster "
                           f"at offset 0x{c * cs:x} has a refcount of {value}")
    for c in range(h.refcount_table_offset // cs,
                   h.refcount_table_offset // cs + h.refcount_table_clusters):
        counts[c] -= 1
    for entry in old.table:
        if entry & OFFSET_MASK:
            counts[(entry & OFFSET_MASK) // cs] -= 1
    # The new structure goes past everything; find how big it is with itself counted.
    entries = cs * 8 >> order
    start = nb
    blocks, table_clusters = 0, 1
    while True:
        end = start + blocks + table_clusters
        need_blocks = -(-end // entries)
        used = [b for b in range(need_blocks)
                if (b * entries < end and (b + 1) * entries > start)
                or any(counts[b * entries:(b + 1) * entries])]
        need_table = max(1, -(-(need_blocks * 8) // cs))
        if len(used) == blocks and need_table == table_clusters:
            break
        blocks, table_clusters = len(used), need_table
    counts += [1] * (blocks + table_clusters)
    table = [0] * (table_clusters * cs // 8)
    for i, b in enumerate(used):
        table[b] = (start + i) * cs
        block = bytearray(cs)
        for j, value in enumerate(counts[b * entries:(b + 1) * entries]):
            if value:
                set_entry(block, j, order, value)
        await image.file.write(table[b], bytes(block))
    table_offset = (start + blocks) * cs
    await image.file.write(table_offset, struct.pack(f">{len(table)}Q", *table))
    await image.file.flush()
    h.refcount_order = order
    h.refcount_table_offset = table_offset
    h.refcount_table_clusters = table_clusters
    await image.write_header()
    image.refcounts = Refcounts(image, old.blocks.capacity)
    await image.refcounts.load()


async def change_backing_file(node: "Qcow2Node", name: str | None, fmt: str | None) -> None:
    """Point the header at another backing file (``None`` for none); the data is untouched.

    Used by ``rebase``: the caller has already made the guest view independent
    of the change (safe mode) or takes responsibility for it (``-u``).
    """
    image = node.image
    h = image.header
    async with image.lock:
        h.backing_file = name or None
        h.set_extension(hdr.EXT_BACKING_FORMAT, fmt.encode() if name and fmt else None)
        h.extensions = _ordered(h.extensions)
        await image.write_header()
