"""Encryption inside qcow2: LUKS (``crypt_method`` 2) and legacy AES (1).

LUKS: the header extension 0x0537be77 holds the offset and length of a
run of clusters that contains a whole LUKS1 header with its key
material (the same bytes a raw LUKS volume starts with).  The payload
offset inside that header is unused; guest data lives in ordinary data
clusters, and every sector is encrypted with the master key and an IV
from its *host* sector number (its offset in the image file / 512), so
two clusters never share IVs even when snapshots share guest data.

AES: no extension; the key is the password itself (see
:mod:`blockd.crypto.qcow`) and the IV is the *guest* sector number.

Both plug into :class:`~blockd.drivers.qcow2.image.DataCipher`; the
driver hands over host and guest offsets and this module picks the
sector number its scheme wants.

The ciphers and the LUKS code are imported when an image is encrypted,
not with the driver: they pull in ``cryptography``, a seventh of
``blockd-img``'s start-up on plain images.
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING, Any, Callable

from blockd.drivers.qcow2 import header as hdr
from blockd.drivers.qcow2.image import Image
from blockd.drivers.sector_io import SECTOR, crypt_sectors
from blockd.errors import QMPError

if TYPE_CHECKING:
    from blockd.crypto import luks
    from blockd.crypto.cipher import SectorCipher

_FDE = struct.Struct(">QQ")
_FORMATS = {hdr.CRYPT_AES: "aes", hdr.CRYPT_LUKS: "luks"}
_PREFIX = "encrypt."

SecretFn = Callable[[str], bytes]


class SectorData:
    """A :class:`DataCipher` over a sector cipher, numbering sectors by host or guest offset."""

    def __init__(self, cipher: SectorCipher, by_guest: bool) -> None:
        self.cipher = cipher
        self.by_guest = by_guest

    def _sector(self, host: int, guest: int) -> int:
        return (guest if self.by_guest else host) // SECTOR

    async def decrypt_sectors(self, host: int, guest: int, data: bytes) -> bytes | bytearray:
        return await crypt_sectors(self.cipher, False, self._sector(host, guest), data)

    async def encrypt_sectors(self, host: int, guest: int, data: bytes) -> bytes | bytearray:
        return await crypt_sectors(self.cipher, True, self._sector(host, guest), data)


def fde_extent(h: hdr.Header) -> tuple[int, int] | None:
    """(offset, length) of the LUKS header clusters, from the header extension."""
    ext = h.extension(hdr.EXT_CRYPTO)
    if ext is None:
        return None
    if len(ext.data) != _FDE.size:
        raise QMPError(f"CRYPTO header extension size {len(ext.data)}, but expected size "
                       f"{_FDE.size}")
    offset, length = _FDE.unpack(ext.data)
    if offset % h.cluster_size:
        raise QMPError(f"Encryption header offset '{offset}' is not a multiple of cluster "
                       f"size '{h.cluster_size}'")
    return offset, length


def check_options(h: hdr.Header, encrypt: dict[str, Any] | None) -> None:
    """QEMU's checks of ``encrypt`` options against what the header says."""
    if h.crypt_method not in (hdr.CRYPT_NONE, hdr.CRYPT_AES, hdr.CRYPT_LUKS):
        raise QMPError(f"Unsupported encryption method: {h.crypt_method}")
    # QMP requires the format; qemu-img's --image-opts may leave it to the header.
    fmt = (encrypt or {}).get("format")
    if fmt is None:
        return
    if h.crypt_method == hdr.CRYPT_NONE:
        raise QMPError(f"No encryption in image header, but options specified format '{fmt}'")
    have = _FORMATS[h.crypt_method]
    if fmt != have:
        raise QMPError(f"Header reported '{have}' encryption format but options "
                       f"specify '{fmt}'")


class Encryption:
    """What an open encrypted image knows: the scheme, the LUKS header, the data cipher."""

    def __init__(self, fmt: str, header: luks.LuksHeader | None, extent: tuple[int, int] | None,
                 data: SectorData | None) -> None:
        self.format = fmt
        self.header = header
        self.extent = extent
        self.data = data

    def info(self) -> dict[str, Any]:
        """The ``encrypt`` member of qcow2's format-specific info (never key material)."""
        out: dict[str, Any] = {"format": self.format}
        if self.header is not None:
            out.update(self.header.info())
        return out


async def read_luks_region(image: Image, extent: tuple[int, int]) -> tuple[luks.LuksHeader, bytes]:
    """The LUKS header stored in the image and the bytes of its clusters."""
    from blockd.crypto import luks

    offset, length = extent
    try:
        raw = bytes(await image.file.read(offset, length))
    except OSError as exc:
        raise QMPError(f"Could not read encryption header: {exc.strerror}") from None
    raw += bytes(length - len(raw))
    header = luks.LuksHeader.parse(raw)
    if header.region_bytes > length:
        raise QMPError("Request for data outside of extension header")
    return header, raw


async def open_encryption(image: Image, encrypt: dict[str, Any] | None, secret: SecretFn,
                          unlock: bool = True) -> Encryption | None:
    """Set up decryption for an image whose header asks for it.

    With ``unlock`` false (``qemu-img info``), only the LUKS header is
    read, so the image can be described without its password.
    """
    h = image.header
    check_options(h, encrypt)
    if h.crypt_method == hdr.CRYPT_NONE:
        return None
    from blockd.crypto import luks, qcow
    from blockd.drivers.luks import kdf_thread, secret_password

    secret_id = (encrypt or {}).get("key-secret")
    if not unlock and secret_id is None:
        if h.crypt_method == hdr.CRYPT_AES:
            return Encryption("aes", None, None, None)
        extent = _require_extent(h)
        header, _ = await read_luks_region(image, extent)
        return Encryption("luks", header, extent, None)
    password = secret_password(secret, secret_id, _PREFIX)
    if h.crypt_method == hdr.CRYPT_AES:
        return Encryption("aes", None, None, SectorData(qcow.qcow_cipher(password), True))
    extent = _require_extent(h)
    header, region = await read_luks_region(image, extent)
    cipher = await kdf_thread(luks.unlock, header, lambda off, n: region[off:off + n], password)
    return Encryption("luks", header, extent, SectorData(cipher, False))


def _require_extent(h: hdr.Header) -> tuple[int, int]:
    extent = fde_extent(h)
    if extent is None:
        raise QMPError(f"Missing CRYPTO header for crypt method {h.crypt_method}")
    return extent


async def create_luks(image: Image, opts: dict[str, Any], secret: SecretFn) -> None:
    """Write a new LUKS header into freshly allocated clusters and point the header at it.

    Called on a just-created (and already resized) image, like QEMU,
    so the key material lands after the L1 table.
    """
    from blockd.crypto import luks
    from blockd.drivers.luks import secret_password

    password = secret_password(secret, opts.get("key-secret"), _PREFIX)
    create_opts = luks.CreateOptions.from_qapi(opts)
    header, writes = await asyncio.to_thread(luks.create, create_opts, password)
    length = header.payload_bytes
    cs = image.cluster_size
    h = image.header
    # QEMU writes this extension before the feature table and bitmaps, and leaves
    # the feature table out when cluster 0 has no room for it (512-byte clusters).
    later = [i for i, e in enumerate(h.extensions)
             if e.type in (hdr.EXT_FEATURE_TABLE, hdr.EXT_BITMAPS)]
    ext = hdr.Extension(hdr.EXT_CRYPTO, _FDE.pack(0, length))
    h.extensions.insert(later[0] if later else len(h.extensions), ext)
    try:
        h.encode()
    except QMPError:
        h.set_extension(hdr.EXT_FEATURE_TABLE, None)
    async with image.lock:
        offset = await image.refcounts.alloc(-(-length // cs))
        # The clusters are zeroed first, so nothing stale lies between the key slots.
        await image.file.write(offset, bytes(-(-length // cs) * cs))
        for off, data in writes:
            await image.file.write(offset + off, data)
        h.crypt_method = hdr.CRYPT_LUKS
        ext.data = _FDE.pack(offset, length)
        await image.write_header()


async def amend_luks(image: Image, enc: Encryption, opts: dict[str, Any], secret: SecretFn,
                     open_secret: str | None, force: bool) -> None:
    """Add or erase key slots of the LUKS header inside the image."""
    from blockd.crypto import luks

    assert enc.extent is not None  # LUKS encryption always has its header extent
    header, region = await read_luks_region(image, enc.extent)
    writes = await asyncio.to_thread(luks.amend, header, lambda off, n: region[off:off + n],
                                     opts, secret, open_secret, force)
    offset = enc.extent[0]
    if image.file.child.read_only:
        raise QMPError("Could not read encryption header: Operation not permitted")  # QEMU's
    async with image.lock:
        for off, data in writes:
            await image.file.write(offset + off, data)
        await image.file.flush()
    enc.header = header
