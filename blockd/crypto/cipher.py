"""Sector ciphers: a block cipher, a mode and an IV generator, applied per 512-byte sector.

This is the layer QEMU calls ``QCryptoBlock`` encrypt/decrypt helpers:
every sector is encrypted on its own with an IV derived from its sector
number, so any sector can be read or rewritten independently.  The
caller picks the sector numbering (host sectors for LUKS in qcow2,
payload sectors for raw LUKS, guest sectors for legacy qcow AES).

The primitives come from ``cryptography``.  The methods are pure CPU
work on immutable state, so several worker threads may use one
:class:`SectorCipher` at the same time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import types
from typing import Any, Callable, Iterator, overload

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from blockd.errors import QMPError

_old_algorithms: types.ModuleType
try:  # CAST5 and DES moved to the "decrepit" module in newer releases.
    from cryptography.hazmat.decrepit.ciphers import algorithms as _old_algorithms
except ImportError:  # pragma: no cover - older cryptography
    _old_algorithms = algorithms

try:
    # Building a context through the public Cipher object costs more than the
    # cipher work on one sector; the function it wraps is the same.
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl

    _create_encryption_ctx: Callable[[Any, Any], Any] = \
        _rust_openssl.ciphers.create_encryption_ctx
    _create_decryption_ctx: Callable[[Any, Any], Any] = \
        _rust_openssl.ciphers.create_decryption_ctx
except (ImportError, AttributeError):  # pragma: no cover - other cryptography layouts
    def _encryptor(alg: Any, mode: Any) -> Any:
        return Cipher(alg, mode).encryptor()

    def _decryptor(alg: Any, mode: Any) -> Any:
        return Cipher(alg, mode).decryptor()

    _create_encryption_ctx, _create_decryption_ctx = _encryptor, _decryptor

SECTOR_SIZE = 512


def _sector_modes(cls: Any, attr: str) -> Callable[[list[bytes]], Iterator[Any]]:
    """Mode objects for a run of sectors, one IV each, built as cheaply as possible.

    The public constructors check their argument's type through an ABC,
    which costs several times the cipher work on a sector, and a context
    reads the IV when it is created.  So one object serves a whole run,
    its IV attribute replaced before each sector's context is made.  The
    shortcut is used only if an object filled this way equals one the
    constructor builds (checked once here); a ``cryptography`` with a
    different layout gets a fresh object per sector.
    """
    def reuse(ivs: list[bytes]) -> Iterator[Any]:
        mode = cls.__new__(cls)
        for iv in ivs:
            setattr(mode, attr, iv)
            yield mode

    def construct(ivs: list[bytes]) -> Iterator[Any]:
        return map(cls, ivs)

    probe = bytes(range(16))
    try:
        fast, slow = next(reuse([probe])), cls(probe)
        same = all(getattr(fast, a) == getattr(slow, a) for a in vars(slow))
    except Exception:  # pragma: no cover - a layout we do not know
        same = False
    return reuse if same else construct


@dataclasses.dataclass(frozen=True)
class CipherAlg:
    """One QEMU cipher algorithm (``QCryptoCipherAlgorithm``)."""

    name: str
    family: str
    key_len: int
    block_size: int
    #: Builds the cryptography algorithm from a key; None if OpenSSL lacks it.
    make: Callable[[bytes], Any] | None


def _aes(key: bytes) -> Any:
    return algorithms.AES(key)


def _cast5(key: bytes) -> Any:
    return _old_algorithms.CAST5(key)


def _des3(key: bytes) -> Any:
    return _old_algorithms.TripleDES(key)


CIPHER_ALGS: dict[str, CipherAlg] = {a.name: a for a in (
    CipherAlg("aes-128", "aes", 16, 16, _aes),
    CipherAlg("aes-192", "aes", 24, 16, _aes),
    CipherAlg("aes-256", "aes", 32, 16, _aes),
    CipherAlg("des", "des", 8, 8, _des3),
    CipherAlg("3des", "3des", 24, 8, _des3),
    CipherAlg("cast5-128", "cast5", 16, 8, _cast5),
    # Serpent and Twofish are not in OpenSSL, hence not in cryptography.
    CipherAlg("serpent-128", "serpent", 16, 16, None),
    CipherAlg("serpent-192", "serpent", 24, 16, None),
    CipherAlg("serpent-256", "serpent", 32, 16, None),
    CipherAlg("twofish-128", "twofish", 16, 16, None),
    CipherAlg("twofish-192", "twofish", 24, 16, None),
    CipherAlg("twofish-256", "twofish", 32, 16, None),
)}

CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
#: Per-sector mode objects, built without the constructors' type checks.
_SECTOR_MODES: dict[str, Callable[[list[bytes]], Iterator[Any]]] = {
    "cbc": _sector_modes(modes.CBC, "_initialization_vector"),
    "xts": _sector_modes(modes.XTS, "_tweak"),
    "ctr": _sector_modes(modes.CTR, "_nonce"),
}
IVGEN_ALGS = ("plain", "plain64", "essiv")
#: QCryptoHashAlgorithm names and their digest sizes.
HASH_ALGS: dict[str, int] = {
    "md5": 16, "sha1": 20, "sha224": 28, "sha256": 32,
    "sha384": 48, "sha512": 64, "ripemd160": 20,
}


def hash_digest(name: str, data: bytes) -> bytes:
    """Digest with a QEMU hash name (hashlib is OpenSSL's digests too)."""
    try:
        return hashlib.new(name, data).digest()
    except ValueError:
        raise QMPError(f"Hash algorithm {name} not supported") from None


def cryptography_hash(name: str) -> Any:
    """The ``cryptography`` hash object for PBKDF2 and friends."""
    from cryptography.hazmat.primitives import hashes

    cls: Callable[[], Any] | None = {"md5": hashes.MD5, "sha1": hashes.SHA1, "sha224": hashes.SHA224,
           "sha256": hashes.SHA256, "sha384": hashes.SHA384,
           "sha512": hashes.SHA512}.get(name)
    if cls is None:
        raise QMPError(f"Hash algorithm {name} not supported")
    return cls()


def key_length(alg: str, mode: str) -> int:
    """Bytes of key the algorithm takes in ``mode`` (XTS needs two keys)."""
    n = CIPHER_ALGS[alg].key_len
    return 2 * n if mode == "xts" else n


def essiv_cipher(alg: str, hash_alg: str) -> str:
    """The cipher ESSIV uses: same family, key as long as the hash digest (dm-crypt's rule)."""
    digest = HASH_ALGS[hash_alg]
    info = CIPHER_ALGS[alg]
    if info.key_len == digest:
        return alg
    label = {"aes": "AES", "serpent": "Serpent", "twofish": "Twofish"}.get(info.family)
    if label is None:
        raise QMPError(f"Cipher {alg} not supported with essiv")
    for cand in CIPHER_ALGS.values():
        if cand.family == info.family and cand.key_len == digest:
            return cand.name
    raise QMPError(f"No {label} cipher with key size {digest} available")


def _algorithm(alg: str, key: bytes) -> Any:
    info = CIPHER_ALGS.get(alg)
    if info is None or info.make is None:
        raise QMPError(f"Unsupported cipher algorithm {alg}")
    return info.make(key)


class SectorCipher:
    """Encrypts and decrypts runs of whole sectors with per-sector IVs."""

    def __init__(self, alg: str, mode: str, key: bytes, ivgen: str = "plain64",
                 ivgen_hash: str | None = None, sector_size: int = SECTOR_SIZE) -> None:
        info = CIPHER_ALGS.get(alg)
        if info is None or info.make is None:
            raise QMPError(f"Unsupported cipher algorithm {alg}")
        if mode not in CIPHER_MODES:
            raise QMPError(f"Unsupported cipher mode {mode}")
        want = key_length(alg, mode)
        if len(key) != want:
            raise QMPError(f"Cipher key length {len(key)} should be {want}")
        if mode == "xts" and (info.block_size != 16 or info.family != "aes"
                              or info.key_len == 24):
            # OpenSSL offers XTS for AES-128 and AES-256 only.
            raise QMPError(f"Unsupported cipher algorithm {alg} with mode xts")
        self.alg, self.mode = alg, mode
        self.ivgen, self.ivgen_hash = ivgen, ivgen_hash
        #: The constructor's arguments: helper processes rebuild the cipher from them.
        self.spec = (alg, mode, bytes(key), ivgen, ivgen_hash, sector_size)
        self.sector_size = sector_size
        self.block_size = info.block_size
        self.niv = 0 if mode == "ecb" else info.block_size
        self._alg_obj = _algorithm(alg, key)
        self._sector_modes = _SECTOR_MODES.get(mode)
        self._essiv: Any = None
        if ivgen == "essiv":
            if ivgen_hash is None:
                raise QMPError("Missing IV generator hash specification")
            ealg = essiv_cipher(alg, ivgen_hash)
            self._essiv = _algorithm(ealg, hash_digest(ivgen_hash, key))
        elif ivgen not in ("plain", "plain64"):
            raise QMPError(f"IV generator {ivgen} not supported")

    def _ivs(self, sector: int, count: int) -> bytes:
        """IVs of ``count`` consecutive sectors, concatenated.

        Each IV is the sector number as a little-endian word (32 bits for
        ``plain``, 64 for ``plain64`` and ``essiv``) padded with zero words
        to the cipher's block size, so all of them pack in one call.
        """
        if self.ivgen == "plain":
            code, mask = "I", 0xFFFFFFFF
        else:
            code, mask = "Q", 0xFFFFFFFFFFFFFFFF
        per_iv = self.niv // struct.calcsize(code)
        words = [0] * (count * per_iv)
        numbers = range(sector, sector + count)
        words[::per_iv] = numbers if sector + count <= mask else [n & mask for n in numbers]
        ivs = struct.pack(f"<{len(words)}{code}", *words)
        if self._essiv is not None:
            enc = _create_encryption_ctx(self._essiv, modes.ECB())
            ivs = enc.update(ivs) + enc.finalize()
        return ivs

    @overload
    def _run(self, sector: int, data: bytes | bytearray | memoryview,
             encrypt: bool) -> bytes | bytearray: ...

    @overload
    def _run(self, sector: int, data: bytes | bytearray | memoryview, encrypt: bool,
             into: memoryview) -> bytes | bytearray | memoryview: ...

    def _run(self, sector: int, data: bytes | bytearray | memoryview, encrypt: bool,
             into: memoryview | None = None) -> bytes | bytearray | memoryview:
        if into is not None and self.mode != "xts":
            into[:] = self._run(sector, data, encrypt)
            return into
        view = memoryview(data).cast("B")
        size = self.sector_size
        if len(view) % size:
            raise ValueError("encryption length must be a multiple of the sector size")
        make = _create_encryption_ctx if encrypt else _create_decryption_ctx
        if self._sector_modes is None:
            # ECB has no IV: every sector is encrypted the same way.
            ctx = make(self._alg_obj, modes.ECB())
            return ctx.update(view) + ctx.finalize()
        count = len(view) // size
        ivs = self._ivs(sector, count)
        niv = self.niv
        if not encrypt and self.mode == "cbc":
            return self._cbc_decrypt(view, ivs, count)
        out = bytearray(len(view)) if into is None else into
        alg = self._alg_obj
        per_sector = zip(self._sector_modes([ivs[i:i + niv] for i in range(0, len(ivs), niv)]),
                         range(0, len(view), size))
        if self.mode == "xts":
            # XTS has no block slack, so each sector goes straight into place.
            dest = memoryview(out)
            for mode, pos in per_sector:
                make(alg, mode).update_into(view[pos:pos + size], dest[pos:pos + size])
        else:
            for mode, pos in per_sector:
                out[pos:pos + size] = make(alg, mode).update(view[pos:pos + size])
        return out

    def _cbc_decrypt(self, view: memoryview, ivs: bytes, count: int) -> bytes:
        """CBC decryption of many sectors without a context per sector.

        Unlike encryption, CBC decryption has no chain to follow: every
        plaintext block is the block cipher's decryption of its
        ciphertext block XOR the ciphertext block before it (the sector's
        IV for its first block).  So one ECB pass covers all sectors, and
        one XOR with the shifted ciphertext finishes the job.
        """
        size, niv = self.sector_size, self.niv
        ctx = _create_decryption_ctx(self._alg_obj, modes.ECB())
        raw = ctx.update(view) + ctx.finalize()
        prev = b"".join(piece for i in range(count)
                        for piece in (ivs[i * niv:(i + 1) * niv],
                                      view[i * size:(i + 1) * size - niv]))
        return (int.from_bytes(raw, "little") ^ int.from_bytes(prev, "little")).to_bytes(
            len(view), "little")

    def __repr__(self) -> str:
        # Never the key: a cipher may end up in a log line or a traceback.
        return f"SectorCipher({self.alg}-{self.mode}, ivgen={self.ivgen})"

    def encrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes | bytearray:
        """Ciphertext of whole sectors, the first of which is number ``sector``."""
        return self._run(sector, data, True)

    def decrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes | bytearray:
        """Plaintext of whole sectors, the first of which is number ``sector``."""
        return self._run(sector, data, False)

    def crypt_into(self, sector: int, data: memoryview, encrypt: bool, into: memoryview) -> None:
        """Encrypt or decrypt into ``into`` (as long as ``data``, not overlapping it).

        The cipher helpers write straight into shared memory this way; XTS then
        needs no intermediate buffer at all.
        """
        self._run(sector, data, encrypt, into)
