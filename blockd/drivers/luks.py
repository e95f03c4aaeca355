"""The ``luks`` format driver: a LUKS1 volume on any child node.

This is what libvirt uses for encrypted raw volumes: the child starts
with the LUKS header and key material, and the guest sees the payload
after it, decrypted.  The IV of a payload sector is its sector number
counted from the payload start, as in QEMU.

Encryption works on whole 512-byte sectors, the node's request
alignment: the request path (:mod:`blockd.block.io`) reads and rewrites
the sectors around a request that does not cover whole ones.
Cipher work for anything but tiny requests runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from typing import Any

from blockd.block.graph import BlockGraph, OpenContext
from blockd.block.node import BlockNode, ChildLink, Perm, WriteFlags
from blockd.crypto import luks
from blockd.crypto.cipher import SectorCipher
from blockd.drivers.create_target import creation_file
from blockd.drivers.sector_io import SECTOR, crypt_sectors
from blockd.errors import QMPError

#: Unlocking runs PBKDF2 for as many iterations as the header asks, which a hostile
#: image can make hours.  At most this many run at once, each in a daemon thread of
#: its own: file I/O never waits behind them and shutdown never waits for them.
_KDF_SLOTS = asyncio.Semaphore(2)


async def kdf_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` (key derivation) in a daemon thread; the caller awaits the result."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is None:
            done.set_result(result)
        else:
            done.set_exception(exc)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    async with _KDF_SLOTS:
        threading.Thread(target=run, name="blockd-kdf", daemon=True).start()
        return await done


def secret_password(secret: Any, secret_id: str | None, prefix: str = "") -> bytes:
    """The password of secret ``secret_id``; ``prefix`` names the option in QEMU's message."""
    if secret_id is None:
        raise QMPError(f"Parameter '{prefix}key-secret' is required for cipher")
    return luks.password_from_secret(secret_id, secret(secret_id))


class KeyMaterial:
    """The parts of the header region a volume's key slots use, read once at open.

    Only the header and the eight key material areas are read (at most
    8 x 64 bytes x 4000 stripes), so a header whose slots point far into a
    big file cannot make us read the gap between them.  Slicing returns
    what the file holds there, zeros elsewhere.
    """

    def __init__(self, pieces: dict[int, bytes]) -> None:
        self.pieces = pieces

    def __getitem__(self, where: slice) -> bytes:
        start, stop = where.start, where.stop
        for off, data in self.pieces.items():
            if off <= start and stop <= off + len(data):
                return data[start - off:stop - off]
        out = bytearray(stop - start)
        for off, data in self.pieces.items():
            lo, hi = max(start, off), min(stop, off + len(data))
            if lo < hi:
                out[lo - start:hi - start] = data[lo - off:hi - off]
        return bytes(out)


async def read_header(file: ChildLink) -> tuple[luks.LuksHeader, KeyMaterial]:
    """The parsed header and the bytes of its key material areas."""
    flen = file.length()
    head = bytes(await file.read(0, min(luks.HEADER_SIZE, flen)))
    header = luks.LuksHeader.parse(head)
    pieces = {0: head}
    for slot in header.slots:
        off = slot.key_offset * SECTOR
        n = max(0, min(header.key_bytes * slot.stripes, flen - off))
        pieces[off] = bytes(await file.read(off, n)) if n else b""
    return header, KeyMaterial(pieces)


class LuksNode(BlockNode):
    driver = "luks"
    is_format = True
    strong_options = ("key-secret",)
    #: Ciphers work on whole sectors; the request path pads the rest.
    request_alignment = SECTOR

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.header: luks.LuksHeader  # set by open
        #: The unlocked volume key; none when the node is opened only to be described.
        self.cipher: SectorCipher | None = None
        self.payload = 0

    async def open(self, ctx: OpenContext) -> None:
        await ctx.open_child(self.options["file"], "file")
        file = self.file_child
        secret_id = self.options.get("key-secret")
        # Opened only to be described (qemu-img info): the header is enough.
        describe_only = ctx.graph.no_io and secret_id is None
        password = None if describe_only else secret_password(ctx.secret, secret_id)
        try:
            header, region = await read_header(file)
        except OSError as exc:
            raise QMPError(f"Could not read encryption header: {exc.strerror}") from None
        if password is not None:
            self.cipher = await kdf_thread(
                luks.unlock, header, lambda off, n: region[off:off + n], password)
        self.header = header
        self.payload = header.payload_bytes
        if self.payload > file.length():
            # The volume would have a negative size; QEMU fails sizing it.
            raise QMPError("Could not refresh total sector count: Input/output error")

    # ---- data path ----------------------------------------------------------

    def length(self) -> int:
        return max(self.file_node.length() - self.payload, 0)

    @property
    def _key(self) -> SectorCipher:
        """The volume key, for I/O (a node opened only to be described does none)."""
        assert self.cipher is not None, "luks node opened without its key"
        return self.cipher

    async def _read_sectors(self, start: int, end: int) -> bytes | bytearray:
        """Plaintext of the whole sectors in payload bytes [start, end)."""
        raw = bytes(await self.file_child.read(self.payload + start, end - start))
        if len(raw) < end - start:
            raw += bytes(end - start - len(raw))
        return await crypt_sectors(self._key, False, start // SECTOR, raw)

    # Requests come in whole sectors (``request_alignment``) but for the last,
    # partial one of a volume whose size is not a multiple of a sector.

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self.file_child.debug_event("read_aio")
        plain = await self._read_sectors(offset, -(-(offset + length) // SECTOR) * SECTOR)
        return plain if len(plain) == length else memoryview(plain)[:length]

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        if len(data) % SECTOR:
            data = bytes(data) + bytes(-len(data) % SECTOR)
        cipher = await crypt_sectors(self._key, True, offset // SECTOR, data)
        self.file_child.debug_event("write_aio")
        await self.file_child.write(self.payload + offset, cipher, flags)

    async def discard(self, offset: int, length: int) -> None:
        await self.file_child.discard(self.payload + offset, length)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        await self.file_child.truncate(self.payload + size, exact, prealloc)

    # ---- queries ------------------------------------------------------------

    def encrypted(self) -> bool:
        return True

    def format_specific(self) -> dict[str, Any] | None:
        return {"type": "luks", "data": self.header.info()}

    def allocated_file_size(self) -> int | None:
        return self.file_node.allocated_file_size()

    async def amend(self, opts: dict[str, Any], secret: Any, force: bool = False) -> None:
        """Add or erase key slots (``blockdev-amend`` with ``QCryptoBlockAmendOptionsLUKS``)."""
        header, region = await read_header(self.file_child)
        writes = await asyncio.to_thread(
            luks.amend, header, lambda off, n: region[off:off + n], opts, secret,
            self.options.get("key-secret"), force)
        for off, data in writes:
            await self.file_child.write(off, data)
        await self.file_child.flush()
        self.header = header


async def create(graph: BlockGraph, options: dict[str, Any]) -> None:
    """``blockdev-create`` for ``luks``: header and key slot 0, then room for ``size`` bytes."""
    password = secret_password(graph.secrets, options.get("key-secret"))
    opts = luks.CreateOptions.from_qapi(options)
    async with creation_file(graph, options["file"],
                             Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE) as file:
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
