"""The ``qcow`` node: guest I/O on qcow version 1 images, as QEMU 7.2 does it.

Lookups go through the L1 table (in memory) and L2 tables (a small
cache).  Requests reach the driver in whole sectors: its
``request_alignment`` is a sector, as QEMU's, so the request path reads
and rewrites a partial one.  A write to an unallocated cluster puts it at
the end of the file, which is grown over it first (so it reads as zeroes
around what the guest wrote: QEMU copies nothing from the backing file,
and with the 512-byte clusters it gives images that have one nothing is
lost); a new L2 table also goes at the end, its L1 entry written before
it.  Encrypted images (legacy AES, the key-secret's password as the key)
fill the rest of a new cluster with encrypted zeroes.  A partial write to
a compressed cluster first stores it decompressed at the end.
"""

from __future__ import annotations

import array
import asyncio
import collections
import errno
import sys
import zlib
from typing import Any

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, ChildLink, Extent, Status, WriteFlags
from blockd.drivers.backing import open_backing
from blockd.drivers.qcow import header as hdr
from blockd.errors import QMPError

SECTOR = 512
#: L2 tables kept in memory (QEMU keeps 16).
CACHE_TABLES = 16
#: How far an L1 table may reach past the end of the file (read as zeroes, as QEMU
#: does); beyond that the header is refused instead of costing memory.
L1_PAST_EOF = 1 << 20


def _eio() -> OSError:
    return OSError(errno.EIO, "Input/output error")


def _table(raw: bytes) -> array.array:
    table = array.array("Q", raw)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def _raw(table: array.array) -> bytes:
    if sys.byteorder == "little":
        table = array.array("Q", table)
        table.byteswap()
    return table.tobytes()


class QcowNode(BlockNode):
    driver = "qcow"
    is_format = True
    supports_backing = True
    request_alignment = SECTOR

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        # Set by open().
        self.header: hdr.Header
        self.l1 = array.array("Q")
        self.backing_name: str | None = None
        self.cipher: Any = None
        self._l2: collections.OrderedDict[int, array.array] = collections.OrderedDict()
        self._inflated: tuple[int, bytes] | None = None
        self._lock = asyncio.Lock()

    # ---- open ---------------------------------------------------------------

    async def open(self, ctx: OpenContext) -> None:
        await ctx.open_child(self.options["file"], "file")
        try:
            await self._load(ctx, self.file_child)
        except OSError as exc:
            raise QMPError(f"Could not open '{self.file_node.filename()}': "
                           f"{exc.strerror or 'Input/output error'}") from None
        await open_backing(ctx, self, self.backing_name, None)

    async def _load(self, ctx: OpenContext, file: ChildLink) -> None:
        flen = file.length()
        h = hdr.parse(bytes(await file.read(0, min(hdr.SIZE, flen))))
        hdr.check(h)
        encrypt = self.options.get("encrypt")
        fmt = (encrypt or {}).get("format")
        if h.crypt_method != hdr.CRYPT_NONE:
            if h.crypt_method != hdr.CRYPT_AES:
                raise QMPError("invalid encryption method in qcow header")
            if fmt is not None and fmt != "aes":
                raise QMPError(f"Header reported 'aes' encryption format but options specify "
                               f"'{fmt}'")
            secret_id = (encrypt or {}).get("key-secret")
            if not (ctx.graph.no_io and secret_id is None):
                from blockd.crypto.qcow import qcow_cipher
                from blockd.drivers.luks import secret_password

                self.cipher = qcow_cipher(secret_password(ctx.secret, secret_id, "encrypt."))
        elif fmt is not None:
            raise QMPError(f"No encryption in image header, but options specified format "
                           f"'{fmt}'")
        hdr.check_size(h)
        want = h.l1_size * 8
        have = max(0, min(want, flen - h.l1_table_offset))
        if want - have > L1_PAST_EOF:
            raise QMPError(f"unsupported qcow image (L1 table of {h.l1_size} entries at "
                           f"0x{h.l1_table_offset:x} extends past the end of the file)")
        raw = bytes(await file.read(h.l1_table_offset, have)) if have else b""
        self.l1 = _table(raw + bytes(want - len(raw)))
        if h.backing_file_offset:
            if h.backing_file_size > hdr.MAX_BACKING_NAME:
                raise QMPError("Backing file name too long")
            raw = bytes(await file.read(h.backing_file_offset, h.backing_file_size))
            self.backing_name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        self.header = h

    # ---- lookup ---------------------------------------------------------------

    @property
    def _cs(self) -> int:
        return 1 << self.header.cluster_bits

    def _l2_index(self, offset: int) -> tuple[int, int]:
        h = self.header
        return offset >> (h.cluster_bits + h.l2_bits), \
            (offset >> h.cluster_bits) & ((1 << h.l2_bits) - 1)

    async def _l2_table(self, l2_offset: int) -> array.array:
        table = self._l2.get(l2_offset)
        if table is None:
            n = 8 << self.header.l2_bits
            if l2_offset + n > (1 << 63) - 1:
                raise OSError(errno.EINVAL, "Invalid argument")
            flen = self.file_child.length()
            have = max(0, min(n, flen - l2_offset))
            raw = bytes(await self.file_child.read(l2_offset, have)) if have else b""
            # A table another request loaded (and a writer may have changed) meanwhile wins.
            if l2_offset in self._l2:
                return self._l2[l2_offset]
            table = _table(raw + bytes(n - len(raw)))
            self._l2[l2_offset] = table
            while len(self._l2) > CACHE_TABLES:
                self._l2.popitem(last=False)
        else:
            self._l2.move_to_end(l2_offset)
        return table

    async def _entry(self, offset: int) -> int:
        """The L2 entry of the cluster holding guest ``offset`` (0: unallocated)."""
        i1, i2 = self._l2_index(offset)
        l2_offset = self.l1[i1]
        if not l2_offset:
            return 0
        return (await self._l2_table(l2_offset))[i2]

    async def _inflate(self, entry: int) -> bytes:
        h = self.header
        cs = self._cs
        coffset = entry & ((1 << (63 - h.cluster_bits)) - 1)
        if self._inflated is not None and self._inflated[0] == coffset:
            return self._inflated[1]
        csize = (entry >> (63 - h.cluster_bits)) & (cs - 1)
        flen = self.file_child.length()
        have = max(0, min(csize, flen - coffset))
        raw = bytes(await self.file_child.read(coffset, have)) if have else b""
        raw += bytes(csize - len(raw))
        try:
            d = zlib.decompressobj(-12)
            out = d.decompress(raw, cs)
        except zlib.error:
            raise _eio() from None
        if len(out) != cs:
            raise _eio()
        self._inflated = (coffset, out)
        return out

    # ---- reads ----------------------------------------------------------------

    def length(self) -> int:
        return self.header.size // SECTOR * SECTOR

    async def _backing_read(self, offset: int, length: int) -> bytes:
        backing = self.backing_child
        if backing is None:
            return bytes(length)
        n = max(0, min(length, backing.length() - offset))
        data = bytes(await backing.read(offset, n)) if n else b""
        return data + bytes(length - n)

    async def _read_file(self, host: int, n: int) -> bytes:
        flen = self.file_child.length()
        have = max(0, min(n, flen - host))
        data = bytes(await self.file_child.read(host, have)) if have else b""
        return data + bytes(n - len(data))

    async def read(self, offset: int, length: int) -> bytearray:
        cs = self._cs
        out = bytearray()
        end = offset + length
        while offset < end:
            within = offset & (cs - 1)
            n = min(end - offset, cs - within)
            entry = await self._entry(offset)
            if not entry:
                out += await self._backing_read(offset, n)
            elif entry & hdr.COMPRESSED:
                out += (await self._inflate(entry))[within:within + n]
            else:
                if entry & (SECTOR - 1):
                    raise _eio()
                data = await self._read_file(entry + within, n)
                if self.cipher is not None:
                    data = await self._crypt(False, offset, data)
                out += data
            offset += n
        return out

    async def _crypt(self, encrypt: bool, offset: int, data: bytes) -> bytes:
        from blockd.drivers.sector_io import crypt_sectors

        return bytes(await crypt_sectors(self.cipher, encrypt, offset // SECTOR, data))

    async def block_status(self, offset: int, length: int) -> Extent:
        cs = self._cs
        entry = await self._entry(offset)
        within = offset & (cs - 1)
        n = min(length, cs - within)
        if not entry:
            backing = self.backing_child
            n = await self._run(offset, length, lambda e, prev: not e)
            if backing is None:
                return Extent(n, Status.ZERO)
            if offset >= backing.length():
                return Extent(n, Status.ZERO)
            sub = await backing.block_status(offset, min(n, backing.length() - offset))
            return Extent(sub.length, sub.status & ~Status.ALLOCATED, sub.offset, sub.child)
        if entry & hdr.COMPRESSED or self.cipher is not None or self.header.crypt_method \
                or entry & (SECTOR - 1):
            # No offset to copy from: the data must come through read() (which fails
            # on an unaligned one, as QEMU's does).
            return Extent(n, Status.DATA | Status.ALLOCATED)
        n = await self._run(offset, length,
                            lambda e, prev: not e & hdr.COMPRESSED and e == prev + cs)
        return Extent(n, Status.DATA | Status.ALLOCATED, entry + within, self.file_node)

    async def _run(self, offset: int, length: int, same: Any) -> int:
        """Bytes from ``offset`` (at most ``length``) whose clusters continue the first
        one's status: ``same(entry, previous entry)``."""
        cs = self._cs
        h = self.header
        prev = await self._entry(offset)
        pos = (offset | (cs - 1)) + 1
        end = offset + length
        span = 1 << (h.cluster_bits + h.l2_bits)
        while pos < end:
            if not prev and not self.l1[pos >> (h.cluster_bits + h.l2_bits)]:
                pos = (pos | (span - 1)) + 1  # a whole missing L2 table
                continue
            entry = await self._entry(pos)
            if not same(entry, prev):
                break
            prev = entry
            pos += cs
        return min(pos, end) - offset

    # ---- writes ---------------------------------------------------------------

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        async with self._lock:
            await self._write_sectors(offset, memoryview(data).cast("B"))
        if flags & WriteFlags.FUA:
            await self.flush()

    async def _write_sectors(self, offset: int, view: memoryview) -> None:
        cs = self._cs
        self._inflated = None
        pos = 0
        while pos < len(view):
            within = (offset + pos) & (cs - 1)
            n = min(len(view) - pos, cs - within)
            if self.cipher is None:
                done = await self._write_new_run(offset + pos, view[pos:])
                if done:
                    pos += done
                    continue
            host = await self._cluster_for_write(offset + pos, within, within + n)
            piece: bytes | memoryview = view[pos:pos + n]
            if self.cipher is not None:
                piece = await self._crypt(True, offset + pos, bytes(piece))
            await self.file_child.write(host + within, piece)
            pos += n

    async def _write_new_run(self, offset: int, view: memoryview) -> int:
        """Write the start of ``view`` into the run of unallocated clusters of one L2 table
        at ``offset``, allocated at once; the bytes written (0: the first cluster has data).

        The file ends up as QEMU leaves it allocating the clusters one by one: each at the
        end of the file (grown over it), its L2 entry pointing there.
        """
        cs = self._cs
        h = self.header
        l2_offset, table = await self._l2_for_write(offset)
        i2 = self._l2_index(offset)[1]
        within = offset & (cs - 1)
        count = 0
        limit = min(-(-(within + len(view)) // cs), (1 << h.l2_bits) - i2)
        while count < limit and not table[i2 + count]:
            count += 1
        if not count:
            return 0
        n = min(len(view), count * cs - within)
        cluster = -(-self.file_child.length() // cs) * cs
        if cluster + count * cs > (1 << 63) - 1:
            raise OSError(errno.E2BIG, "Argument list too long")
        await self.file_child.truncate(cluster + count * cs)
        await self.file_child.write(cluster + within, view[:n])
        entries = array.array("Q", range(cluster, cluster + count * cs, cs))
        await self.file_child.write(l2_offset + 8 * i2, _raw(entries))
        await self.file_child.flush()
        (await self._l2_table(l2_offset))[i2:i2 + count] = entries
        return n

    async def _l2_for_write(self, offset: int) -> tuple[int, array.array]:
        """The L2 table of guest ``offset`` and where it is, made (at the end of the file,
        its L1 entry written first, as QEMU does) if there is none."""
        h = self.header
        cs = self._cs
        i1 = self._l2_index(offset)[0]
        l2_offset = self.l1[i1]
        if l2_offset:
            return l2_offset, await self._l2_table(l2_offset)
        l2_offset = -(-self.file_child.length() // cs) * cs
        self.l1[i1] = l2_offset
        await self.file_child.write(h.l1_table_offset + 8 * i1, l2_offset.to_bytes(8, "big"))
        await self.file_child.flush()
        table = array.array("Q", bytes(8 << h.l2_bits))
        await self.file_child.write(l2_offset, bytes(8 << h.l2_bits))
        await self.file_child.flush()
        self._l2[l2_offset] = table
        return l2_offset, table

    async def _cluster_for_write(self, offset: int, n_start: int, n_end: int) -> int:
        """The host cluster of guest ``offset``, allocated (QEMU's get_cluster_offset with
        allocate=1)."""
        cs = self._cs
        i2 = self._l2_index(offset)[1]
        l2_offset, table = await self._l2_for_write(offset)
        entry = table[i2]
        if entry and not entry & hdr.COMPRESSED:
            if entry & (SECTOR - 1):
                raise _eio()
            return entry
        if entry & hdr.COMPRESSED and n_end - n_start < cs:
            plain = await self._inflate(entry)
            cluster = -(-self.file_child.length() // cs) * cs
            await self.file_child.write(cluster, plain)
        else:
            cluster = -(-self.file_child.length() // cs) * cs
            if cluster + cs > (1 << 63) - 1:
                raise OSError(errno.E2BIG, "Argument list too long")
            await self.file_child.truncate(cluster + cs)
            if self.cipher is not None and n_end - n_start < cs:
                start = offset - (offset & (cs - 1))
                for i in range(0, cs, SECTOR):
                    if i < n_start or i >= n_end:
                        await self.file_child.write(cluster + i,
                                              await self._crypt(True, start + i, bytes(SECTOR)))
        # On disk first, then in the cached table (reloaded from disk if it left the cache).
        await self.file_child.write(l2_offset + 8 * i2, cluster.to_bytes(8, "big"))
        await self.file_child.flush()
        (await self._l2_table(l2_offset))[i2] = cluster
        return cluster

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        raise QMPError("Image format driver does not support resize")

    # ---- queries --------------------------------------------------------------

    def encrypted(self) -> bool:
        return self.header.crypt_method != hdr.CRYPT_NONE

    def has_zero_init(self) -> bool:
        return self.backing is None

    def cluster_size(self) -> int | None:
        return self._cs

    def backing_filename(self) -> str | None:
        return self.backing_name
