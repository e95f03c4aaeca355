"""The ``luks`` format driver: a LUKS1 volume on any child node.

This is what libvirt uses for encrypted raw volumes: the child starts
with the LUKS header and key material, and the guest sees the payload
after it, decrypted.  The IV of a payload sector is its sector number
counted from the payload start, as in QEMU.

Encryption works on whole 512-byte sectors, so a request that does not
cover whole sectors reads (and for writes, rewrites) the sectors around
it; overlapping writes wait for each other while one of them does that.
Cipher work for anything but tiny requests runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from blockd.block.backend import Backend
from blockd.block.graph import BlockGraph, OpenContext
from blockd.block.node import BlockNode, Perm, WriteFlags
from blockd.crypto import luks
from blockd.crypto.cipher import SectorCipher
from blockd.drivers.sector_io import SECTOR, WriteGate, crypt_sectors, sector_span
from blockd.errors import QMPError


def secret_password(secret: Any, secret_id: str | None, prefix: str = "") -> bytes:
    """The password of secret ``secret_id``; ``prefix`` names the option in QEMU's message."""
    if secret_id is None:
        raise QMPError(f"Parameter '{prefix}key-secret' is required for cipher")
    return luks.password_from_secret(secret_id, secret(secret_id))


async def read_header(file: BlockNode) -> tuple[luks.LuksHeader, bytes]:
    """The parsed header and the bytes of the whole header region (key material included)."""
    flen = file.length()
    head = bytes(await file.read(0, min(luks.HEADER_SIZE, flen)))
    header = luks.LuksHeader.parse(head)
    region = min(max(header.region_bytes, luks.HEADER_SIZE), flen)
    return header, bytes(await file.read(0, region))


class LuksNode(BlockNode):
    driver = "luks"
    is_format = True
    strong_options = ("key-secret",)

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.header: luks.LuksHeader | None = None
        self.cipher: SectorCipher | None = None
        self.payload = 0
        self._gate = WriteGate()

    async def open(self, ctx: OpenContext) -> None:
        file = await ctx.open_child(self.options["file"], "file")
        secret_id = self.options.get("key-secret")
        # Opened only to be described (qemu-img info): the header is enough.
        describe_only = ctx.graph.no_io and secret_id is None
        password = None if describe_only else secret_password(ctx.secret, secret_id)
        try:
            header, region = await read_header(file)
        except OSError as exc:
            raise QMPError(f"Could not read encryption header: {exc.strerror}") from None
        if password is not None:
            self.cipher = await asyncio.to_thread(
                luks.unlock, header, lambda off, n: region[off:off + n], password)
        self.header = header
        self.payload = header.payload_bytes

    # ---- data path ----------------------------------------------------------

    def length(self) -> int:
        return max(self.file.length() - self.payload, 0)

    async def _read_sectors(self, start: int, end: int) -> bytes:
        """Plaintext of the whole sectors in payload bytes [start, end)."""
        raw = bytes(await self.file.read(self.payload + start, end - start))
        if len(raw) < end - start:
            raw += bytes(end - start - len(raw))
        return await crypt_sectors(self.cipher.decrypt, start // SECTOR, raw)

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        start, end = sector_span(offset, length)
        self.file.debug_event("read_aio")
        plain = await self._read_sectors(start, end)
        if start == offset and end == offset + length:
            return plain
        return memoryview(plain)[offset - start:offset - start + length]

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        start, end = sector_span(offset, len(data))
        rmw = start != offset or end != offset + len(data)
        entry = await self._gate.enter(start, end, rmw)
        try:
            if rmw:
                buf = bytearray(await self._read_sectors(start, end))
                buf[offset - start:offset - start + len(data)] = data
                data = buf
            cipher = await crypt_sectors(self.cipher.encrypt, start // SECTOR, data)
            self.file.debug_event("write_aio")
            await self.file.write(self.payload + start, cipher, flags)
        finally:
            self._gate.leave(entry)

    async def discard(self, offset: int, length: int) -> None:
        if self.options.get("discard", "ignore") == "unmap":
            await self.file.discard(self.payload + offset, length)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        await self.file.truncate(self.payload + size, exact, prealloc)

    # ---- queries ------------------------------------------------------------

    def encrypted(self) -> bool:
        return True

    def format_specific(self) -> dict[str, Any] | None:
        return {"type": "luks", "data": self.header.info()}

    def allocated_file_size(self) -> int | None:
        return self.file.allocated_file_size()

    async def amend(self, opts: dict[str, Any], secret: Any, force: bool = False) -> None:
        """Add or erase key slots (``blockdev-amend`` with ``QCryptoBlockAmendOptionsLUKS``)."""
        header, region = await read_header(self.file)
        writes = await asyncio.to_thread(
            luks.amend, header, lambda off, n: region[off:off + n], opts, secret,
            self.options.get("key-secret"), force)
        for off, data in writes:
            await self.file.write(off, data)
        await self.file.flush()
        self.header = header


async def create(graph: BlockGraph, options: dict[str, Any]) -> None:
    """``blockdev-create`` for ``luks``: header and key slot 0, then room for ``size`` bytes."""
    password = secret_password(graph.secrets, options.get("key-secret"))
    opts = luks.CreateOptions.from_qapi(options)
    ref = options["file"]
    file = graph.lookup(ref) if isinstance(ref, str) else await graph.open_node(ref, implicit=True)
    user: Backend | None = None
    try:
        user = Backend(graph, file, "an unnamed block device",
                       Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, Perm.all())
        header, writes = await asyncio.to_thread(luks.create, opts, password)
        try:
            await file.truncate(header.payload_bytes + options["size"], False,
                                options.get("preallocation", "off"))
            for off, data in writes:
                await file.write(off, data)
            await file.flush()
        except OSError as exc:
            if exc.errno == errno.ENOTSUP:
                raise QMPError(f"Could not resize image: {exc.strerror}") from None
            raise QMPError(f"Could not write encryption header: {exc.strerror}") from None
    finally:
        if user is not None:
            user.close()
        if not isinstance(ref, str):
            await graph.delete_node(file)
