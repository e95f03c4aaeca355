"""LUKS1: the on-disk header, key slots, and unlocking the master key.

The layout and every derived number follow cryptsetup's LUKS1 format as
QEMU writes it, so images move freely between blockd, QEMU and
cryptsetup:

- a 592-byte big-endian header at offset 0 (cipher/mode/hash names,
  master key digest, eight key slots);
- the header region rounded to 4 KiB, then eight key material areas of
  ``key_len * stripes`` bytes each, every one rounded up to 4 KiB;
- the payload right after the last area.

A key slot stores the master key split into ``stripes`` anti-forensic
stripes (so erasing a small part of it destroys the key), encrypted with
a key derived from the password by PBKDF2.  A password is right when the
master key it yields matches the PBKDF2 digest in the header.

The functions here never do I/O: callers read the header region into
memory (``read_fn``) and write back what :func:`amend` and friends
return, so the same code serves raw LUKS and LUKS inside qcow2.  Key
material, keys and passwords never appear in exception texts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import time
import uuid as uuidlib
from typing import Any, Callable

from blockd.crypto import cipher as cc
from blockd.crypto.cipher import SectorCipher
from blockd.errors import QMPError

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
SECTOR = 512
NUM_SLOTS = 8
STRIPES = 4000
SALT_LEN = 32
DIGEST_LEN = 20
#: Where key material may start; also the unit key material areas are rounded to.
KEY_SLOT_OFFSET = 4096
HEADER_SECTORS = KEY_SLOT_OFFSET // SECTOR
SLOT_ENABLED = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD
MIN_SLOT_ITERS = 1000
MIN_MASTER_ITERS = 1000
DEFAULT_ITER_TIME = 2000
#: How often an erased key slot's material is overwritten with random bytes.
ERASE_PASSES = 40

_HEAD = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
HEADER_SIZE = _HEAD.size + NUM_SLOTS * _SLOT.size  # 592

ReadFn = Callable[[int, int], bytes]


@dataclasses.dataclass
class KeySlot:
    active: int = SLOT_DISABLED
    iterations: int = 0
    salt: bytes = bytes(SALT_LEN)
    key_offset: int = 0  # in sectors
    stripes: int = STRIPES

    @property
    def enabled(self) -> bool:
        return self.active == SLOT_ENABLED


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1")


def _lookup(name: str, choices: Any, what: str) -> str:
    if name not in choices:
        raise QMPError(f"{what} '{name}' not supported")
    return name


@dataclasses.dataclass
class LuksHeader:
    """A LUKS1 header, plus the QEMU names its strings stand for."""

    cipher_name: str
    cipher_mode_spec: str
    hash_spec: str
    payload_offset: int  # in sectors
    key_bytes: int
    mk_digest: bytes
    mk_salt: bytes
    mk_iterations: int
    uuid: str
    slots: list[KeySlot]
    version: int = VERSION
    # Parsed from the strings above by :meth:`parse_names`.
    cipher_alg: str = ""
    cipher_mode: str = ""
    ivgen_alg: str = ""
    ivgen_hash_alg: str | None = None
    hash_alg: str = ""

    # ---- encoding -----------------------------------------------------------

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview) -> "LuksHeader":
        """Decode and validate a header as QEMU does when opening, with its messages."""
        buf = bytes(buf[:HEADER_SIZE])
        if len(buf) < HEADER_SIZE:
            buf += bytes(HEADER_SIZE - len(buf))
        (magic, version, name, mode, hspec, payload, key_bytes, digest, salt,
         iters, uuid) = _HEAD.unpack_from(buf)
        slots = [KeySlot(*_SLOT.unpack_from(buf, _HEAD.size + i * _SLOT.size))
                 for i in range(NUM_SLOTS)]
        if magic != MAGIC:
            raise QMPError("Volume is not in LUKS format")
        if version != VERSION:
            raise QMPError(f"LUKS version {version} is not supported")
        for raw, what in ((name, "cipher name"), (mode, "cipher mode"), (hspec, "hash spec")):
            if b"\0" not in raw:
                raise QMPError(f"LUKS header {what} is not NUL terminated")
        hdr = cls(_cstr(name), _cstr(mode), _cstr(hspec), payload, key_bytes, digest, salt,
                  iters, _cstr(uuid), slots, version)
        hdr.check()
        hdr.parse_names()
        hdr.check_bounds()
        return hdr

    def encode(self) -> bytes:
        """The 592 header bytes as stored on disk."""
        out = bytearray(_HEAD.pack(
            MAGIC, self.version, self.cipher_name.encode(), self.cipher_mode_spec.encode(),
            self.hash_spec.encode(), self.payload_offset, self.key_bytes, self.mk_digest,
            self.mk_salt, self.mk_iterations, self.uuid.encode()))
        for s in self.slots:
            out += _SLOT.pack(s.active, s.iterations, s.salt, s.key_offset, s.stripes)
        return bytes(out)

    # ---- validation ---------------------------------------------------------

    def split_sectors(self, stripes: int) -> int:
        """Sectors of one key material area, rounded as cryptsetup does."""
        sectors = -(-self.key_bytes * stripes // SECTOR)
        return -(-sectors // HEADER_SECTORS) * HEADER_SECTORS

    def check(self) -> None:
        """QEMU's header checks, in its order and with its 32-bit sector arithmetic.

        QEMU adds and compares sector numbers as 32-bit unsigned ints, so a
        key slot near 2^32 or a huge key length can wrap around and pass;
        matching that keeps the first error reported the same as QEMU's.
        :meth:`check_bounds` afterwards refuses what only passed by wrapping.
        """
        u32 = 0xFFFFFFFF
        if self.payload_offset < HEADER_SECTORS:
            raise QMPError("LUKS payload is overlapping with the header")
        if self.mk_iterations == 0:
            raise QMPError("LUKS key iteration count is zero")
        for i, s in enumerate(self.slots):
            if s.stripes != STRIPES:
                # QEMU prints the count as a signed int.
                stripes = s.stripes - (1 << 32) if s.stripes >= 1 << 31 else s.stripes
                raise QMPError(f"Keyslot {i} is corrupted (stripes {stripes} != {STRIPES})")
            if s.active not in (SLOT_ENABLED, SLOT_DISABLED):
                raise QMPError(f"Keyslot {i} state (active/disable) is corrupted")
            if s.enabled and s.iterations == 0:
                raise QMPError(f"Keyslot {i} iteration count is zero")
            if s.key_offset < HEADER_SECTORS:
                raise QMPError(f"Keyslot {i} is overlapping with the LUKS header")
            end = (s.key_offset + self._split_sectors_u32(s.stripes)) & u32
            if end > self.payload_offset:
                raise QMPError(f"Keyslot {i} is overlapping with the encrypted payload")
            for j in range(i + 1, NUM_SLOTS):
                t = self.slots[j]
                t_end = (t.key_offset + self._split_sectors_u32(t.stripes)) & u32
                if end > t.key_offset and t_end > s.key_offset:
                    raise QMPError(f"Keyslots {i} and {j} are overlapping in the header")

    def _split_sectors_u32(self, stripes: int) -> int:
        """:meth:`split_sectors` as QEMU computes it: the byte count in 32 bits too."""
        sectors = -(-((self.key_bytes * stripes) & 0xFFFFFFFF) // SECTOR)
        return -(-sectors // HEADER_SECTORS) * HEADER_SECTORS

    def check_bounds(self) -> None:
        """The slot checks again without wrapping: every key slot lies before the payload.

        Stricter than QEMU, which accepts a (disabled) slot whose end wraps
        past 2^32 sectors; run once the cipher check has bounded the key length.
        """
        for i, s in enumerate(self.slots):
            if s.key_offset + self.split_sectors(s.stripes) > self.payload_offset:
                raise QMPError(f"Keyslot {i} is overlapping with the encrypted payload")

    def parse_names(self) -> None:
        """Turn the header's cipher/mode/hash strings into QEMU algorithm names."""
        mode, sep, ivgen = self.cipher_mode_spec.partition("-")
        if not sep:
            raise QMPError(f"Unexpected cipher mode string format '{self.cipher_mode_spec}'")
        ivgen, colon, ivhash = ivgen.partition(":")
        self.ivgen_hash_alg = _lookup(ivhash, cc.HASH_ALGS, "Hash algorithm") if colon else None
        self.cipher_mode = _lookup(mode, cc.CIPHER_MODES, "Cipher mode")
        self.cipher_alg = cipher_from_name(self.cipher_name, self.cipher_mode, self.key_bytes)
        self.hash_alg = _lookup(self.hash_spec, cc.HASH_ALGS, "Hash algorithm")
        self.ivgen_alg = _lookup(ivgen, cc.IVGEN_ALGS, "IV generator")
        if self.ivgen_alg == "essiv":
            if self.ivgen_hash_alg is None:  # no ":hash" in the mode string
                raise QMPError("Missing IV generator hash specification")
            cc.essiv_cipher(self.cipher_alg, self.ivgen_hash_alg)

    # ---- queries ------------------------------------------------------------

    @property
    def payload_bytes(self) -> int:
        return self.payload_offset * SECTOR

    @property
    def region_bytes(self) -> int:
        """Bytes from the header start to the end of the last key material area."""
        end = max(s.key_offset + self.split_sectors(s.stripes) for s in self.slots)
        return max(end, HEADER_SECTORS) * SECTOR

    def active_count(self) -> int:
        return sum(1 for s in self.slots if s.enabled)

    def info(self) -> dict[str, Any]:
        """``QCryptoBlockInfoLUKS`` as QEMU 7.2 reports it (no key material)."""
        out: dict[str, Any] = {"cipher-alg": self.cipher_alg, "cipher-mode": self.cipher_mode,
                               "ivgen-alg": self.ivgen_alg}
        if self.ivgen_alg == "essiv":
            out["ivgen-hash-alg"] = self.ivgen_hash_alg
        out["hash-alg"] = self.hash_alg
        out["payload-offset"] = self.payload_bytes
        out["master-key-iters"] = self.mk_iterations
        out["uuid"] = self.uuid
        slots = []
        for s in self.slots:
            entry: dict[str, Any] = {"active": s.enabled}
            if s.enabled:
                entry["iters"] = s.iterations
                entry["stripes"] = s.stripes
            entry["key-offset"] = s.key_offset * SECTOR
            slots.append(entry)
        out["slots"] = slots
        return out


def cipher_from_name(name: str, mode: str, key_bytes: int) -> str:
    """QEMU's cipher for a LUKS cipher name and key size (XTS keys count double)."""
    if mode == "xts":
        key_bytes //= 2
    for alg in cc.CIPHER_ALGS.values():
        if alg.family == name and alg.key_len == key_bytes and alg.family in _LUKS_FAMILIES:
            return alg.name
    raise QMPError(f"Algorithm '{name}' with key size {key_bytes} bytes not supported")


#: Cipher families LUKS headers may name (cryptsetup's names).
_LUKS_FAMILIES = ("aes", "cast5", "serpent", "twofish")


# ---- key derivation ---------------------------------------------------------

def password_from_secret(secret_id: str, data: bytes) -> bytes:
    """The password bytes QEMU uses: valid UTF-8, up to the first NUL."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise QMPError(f"Data from secret {secret_id} is not valid UTF-8") from None
    return data.split(b"\0", 1)[0]


#: Iteration counts the PBKDF2 implementation takes (a C int); a header asking more
#: would keep a thread busy for hours anyway.
MAX_PBKDF_ITERATIONS = (1 << 31) - 1


def pbkdf2(hash_alg: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC; hashlib's releases the GIL for the whole derivation, so a slot asking
    for millions of iterations costs a thread, never the event loop."""
    if iterations > MAX_PBKDF_ITERATIONS:
        raise QMPError(f"PBKDF iterations {iterations} must be less than "
                       f"{MAX_PBKDF_ITERATIONS + 1}")
    cc.cryptography_hash(hash_alg)  # the supported hashes, with QEMU's error for others
    return hashlib.pbkdf2_hmac(hash_alg, password, salt, iterations, length)


def count_iters(hash_alg: str, password: bytes, salt: bytes, length: int,
                window_ms: float = 500.0) -> int:
    """PBKDF2 iterations per second of this thread's CPU time.

    Like QEMU, time a run long enough to be measured reliably (at least
    ``window_ms``) and scale; a short window keeps small ``iter-time``
    values cheap to calibrate.
    """
    iterations = 1 << 10
    while True:
        start = time.thread_time()
        pbkdf2(hash_alg, password, salt, iterations, length)
        delta = (time.thread_time() - start) * 1000.0
        if delta > window_ms:
            break
        if delta < window_ms / 5:
            iterations *= 10
        else:
            iterations = int(iterations * 2 * window_ms / delta)
    return int(iterations * 1000 / delta)


def _scaled_iters(per_second: int, iter_time: int) -> int:
    iters = per_second * iter_time // 1000
    if iters > 0xFFFFFFFF:
        raise QMPError(f"PBKDF iterations {iters} larger than {0xFFFFFFFF}: "
                       "Numerical result out of range")
    return iters


def _window(iter_time: int) -> float:
    return float(min(500, max(20, iter_time // 2)))


# ---- anti-forensic split ----------------------------------------------------

def _xor(a: bytes, b: bytes | bytearray) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


def _diffuse(block: bytes, hash_alg: str) -> bytes:
    """Hash each digest-sized piece with its index, keeping the piece's length."""
    size = hashlib.new(hash_alg).digest_size
    out = bytearray()
    for i in range(0, len(block), size):
        piece = block[i:i + size]
        out += hashlib.new(hash_alg, struct.pack(">I", i // size) + piece).digest()[:len(piece)]
    return bytes(out)


def af_split(key: bytes, stripes: int, hash_alg: str) -> bytes:
    """Spread ``key`` over ``stripes`` blocks: all but the last random, the last fixes it up."""
    n = len(key)
    randoms = os.urandom(n * (stripes - 1))
    acc = bytes(n)
    for i in range(stripes - 1):
        acc = _diffuse(_xor(acc, randoms[i * n:(i + 1) * n]), hash_alg)
    return randoms + _xor(acc, key)


def af_merge(material: bytes | bytearray, key_len: int, stripes: int, hash_alg: str) -> bytes:
    """Recover the key from its stripes (inverse of :func:`af_split`)."""
    n = key_len
    acc = bytes(n)
    for i in range(stripes - 1):
        acc = _diffuse(_xor(acc, material[i * n:(i + 1) * n]), hash_alg)
    return _xor(acc, material[(stripes - 1) * n:stripes * n])


# ---- key slots --------------------------------------------------------------

def _cipher(header: LuksHeader, key: bytes) -> SectorCipher:
    return SectorCipher(header.cipher_alg, header.cipher_mode, key, header.ivgen_alg,
                        header.ivgen_hash_alg)


def _material_len(header: LuksHeader, slot: KeySlot) -> int:
    return header.key_bytes * slot.stripes


def try_slot(header: LuksHeader, index: int, read_fn: ReadFn, password: bytes) -> bytes | None:
    """The master key if ``password`` opens slot ``index``, else None."""
    slot = header.slots[index]
    if not slot.enabled:
        return None
    slot_key = pbkdf2(header.hash_alg, password, slot.salt, slot.iterations, header.key_bytes)
    length = _material_len(header, slot)
    padded = -(-length // SECTOR) * SECTOR
    raw = bytes(read_fn(slot.key_offset * SECTOR, length))
    # The material is encrypted in whole sectors; the tail of the last one is padding.
    plain = _cipher(header, slot_key).decrypt(0, raw + bytes(padded - len(raw)))
    key = af_merge(plain[:length], header.key_bytes, slot.stripes, header.hash_alg)
    digest = pbkdf2(header.hash_alg, key, header.mk_salt, header.mk_iterations, DIGEST_LEN)
    return key if digest == header.mk_digest else None


def find_master_key(header: LuksHeader, read_fn: ReadFn, password: bytes) -> bytes:
    for i in range(NUM_SLOTS):
        key = try_slot(header, i, read_fn, password)
        if key is not None:
            return key
    raise QMPError("Invalid password, cannot unlock any keyslot")


def payload_cipher(header: LuksHeader, master_key: bytes) -> SectorCipher:
    """The cipher of the payload sectors, keyed with the master key."""
    return _cipher(header, master_key)


def unlock(header: LuksHeader, read_fn: ReadFn, password: bytes) -> SectorCipher:
    """Open the volume: find the master key with ``password`` and build the payload cipher.

    ``read_fn(offset, length)`` returns bytes of the LUKS region
    (offsets relative to the header start).  CPU-heavy: call it from a
    worker thread.
    """
    return payload_cipher(header, find_master_key(header, read_fn, password))


def store_key(header: LuksHeader, index: int, password: bytes, master_key: bytes,
              iter_time: int) -> bytes:
    """Fill slot ``index`` for ``password``; return the encrypted material to write.

    The caller writes the material at ``slot.key_offset * 512`` and then
    the header, in that order, so a crash leaves the old header valid.
    """
    slot = header.slots[index]
    slot.salt = os.urandom(SALT_LEN)
    per_sec = count_iters(header.hash_alg, password, slot.salt, header.key_bytes,
                          _window(iter_time))
    slot.iterations = max(_scaled_iters(per_sec, iter_time), MIN_SLOT_ITERS)
    slot_key = pbkdf2(header.hash_alg, password, slot.salt, slot.iterations, header.key_bytes)
    split = af_split(master_key, slot.stripes, header.hash_alg)
    padded = -(-len(split) // SECTOR) * SECTOR
    material = _cipher(header, slot_key).encrypt(0, split + bytes(padded - len(split)))
    slot.active = SLOT_ENABLED
    return bytes(material[:len(split)])


def erase_key(header: LuksHeader, index: int) -> list[tuple[int, bytes]]:
    """Disable slot ``index``; return the writes: the header, then random overwrites."""
    slot = header.slots[index]
    slot.salt = bytes(SALT_LEN)
    slot.iterations = 0
    slot.active = SLOT_DISABLED
    writes = [(0, header.encode())]
    length = _material_len(header, slot)
    for _ in range(ERASE_PASSES):
        writes.append((slot.key_offset * SECTOR, os.urandom(length)))
    return writes


# ---- creation ---------------------------------------------------------------

@dataclasses.dataclass
class CreateOptions:
    """``QCryptoBlockCreateOptionsLUKS`` with QEMU's defaults filled in."""

    cipher_alg: str = "aes-256"
    cipher_mode: str = "xts"
    ivgen_alg: str = "plain64"
    ivgen_hash_alg: str | None = None
    hash_alg: str = "sha256"
    iter_time: int = DEFAULT_ITER_TIME

    @classmethod
    def from_qapi(cls, opts: dict[str, Any]) -> "CreateOptions":
        out = cls(opts.get("cipher-alg", "aes-256"), opts.get("cipher-mode", "xts"),
                  opts.get("ivgen-alg", "plain64"), opts.get("ivgen-hash-alg"),
                  opts.get("hash-alg", "sha256"), opts.get("iter-time", DEFAULT_ITER_TIME))
        if out.ivgen_alg == "essiv" and out.ivgen_hash_alg is None:
            out.ivgen_hash_alg = "sha256"
        return out


def _luks_cipher_name(alg: str) -> str:
    family = cc.CIPHER_ALGS[alg].family
    if family not in _LUKS_FAMILIES:
        raise QMPError(f"Algorithm '{alg}' not supported")
    return family


def _new_header(opts: CreateOptions) -> LuksHeader:
    """The header of a new volume with ``opts``: key slots laid out, none in use, no
    key yet.  Refuses options QEMU refuses (not ciphers only this build lacks)."""
    name = _luks_cipher_name(opts.cipher_alg)
    mode_spec = f"{opts.cipher_mode}-{opts.ivgen_alg}"
    if opts.ivgen_hash_alg is not None:
        mode_spec += f":{opts.ivgen_hash_alg}"
    if opts.ivgen_alg == "essiv":
        assert opts.ivgen_hash_alg is not None  # the option parser defaults it
        cc.essiv_cipher(opts.cipher_alg, opts.ivgen_hash_alg)
    key_bytes = cc.key_length(opts.cipher_alg, opts.cipher_mode)
    header = LuksHeader(name, mode_spec, opts.hash_alg, 0, key_bytes, bytes(DIGEST_LEN),
                        bytes(SALT_LEN), 0, "", [])
    header.cipher_alg, header.cipher_mode = opts.cipher_alg, opts.cipher_mode
    header.ivgen_alg, header.ivgen_hash_alg = opts.ivgen_alg, opts.ivgen_hash_alg
    header.hash_alg = opts.hash_alg
    split = header.split_sectors(STRIPES)
    header.slots = [KeySlot(SLOT_DISABLED, 0, bytes(SALT_LEN), HEADER_SECTORS + i * split,
                            STRIPES) for i in range(NUM_SLOTS)]
    header.payload_offset = HEADER_SECTORS + NUM_SLOTS * split
    return header


def payload_bytes(opts: CreateOptions) -> int:
    """Where the payload of a new volume with ``opts`` starts: the header region's size
    (``measure`` counts it)."""
    return _new_header(opts).payload_bytes


def create(opts: CreateOptions, password: bytes) -> tuple[LuksHeader, list[tuple[int, bytes]]]:
    """A new volume with ``password`` in slot 0.

    Returns the header and the writes that store it (key material, then
    header); the payload starts at ``header.payload_bytes``.  CPU-heavy
    (PBKDF2 calibration): call from a worker thread.
    """
    header = _new_header(opts)
    header.mk_salt, header.uuid = os.urandom(SALT_LEN), str(uuidlib.uuid4())
    master_key = os.urandom(header.key_bytes)
    payload_cipher(header, master_key)  # refuses ciphers this build cannot run
    per_sec = count_iters(opts.hash_alg, master_key, header.mk_salt, DIGEST_LEN,
                          _window(opts.iter_time))
    iters = _scaled_iters(per_sec, opts.iter_time) // 8
    header.mk_iterations = max(iters, MIN_MASTER_ITERS)
    header.mk_digest = pbkdf2(opts.hash_alg, master_key, header.mk_salt,
                              header.mk_iterations, DIGEST_LEN)
    material = store_key(header, 0, password, master_key, opts.iter_time)
    return header, [(header.slots[0].key_offset * SECTOR, material), (0, header.encode())]


# ---- keyslot management (blockdev-amend) -----------------------------------

def amend(header: LuksHeader, read_fn: ReadFn, opts: dict[str, Any],
          secret: Callable[[str], bytes], open_secret: str | None,
          force: bool = False) -> list[tuple[int, bytes]]:
    """Apply ``QCryptoBlockAmendOptionsLUKS`` to ``header``; return the writes to do in order.

    ``secret(id)`` returns a secret object's bytes; ``open_secret`` is the
    ``key-secret`` the image was opened with.  CPU-heavy: run in a thread.
    """
    def password(secret_id: str | None) -> bytes:
        assert secret_id is not None  # an open LUKS volume always has its key-secret
        return password_from_secret(secret_id, secret(secret_id))

    if opts["state"] == "active":
        if opts.get("new-secret") is None:
            raise QMPError("'new-secret' is required to activate a keyslot")
        if opts.get("old-secret") is not None:
            raise QMPError("'old-secret' must not be given when activating keyslots")
        if "keyslot" in opts:
            index = opts["keyslot"]
            if index < 0 or index >= NUM_SLOTS:
                raise QMPError(f"Invalid keyslot {index & 0xFFFFFFFF} specified, "
                               f"must be between 0 and {NUM_SLOTS - 1}")
        else:
            free = [i for i, s in enumerate(header.slots) if not s.enabled]
            if not free:
                raise QMPError("Can't add a keyslot - all keyslots are in use")
            index = free[0]
        if not force and header.slots[index].enabled:
            raise QMPError(f"Refusing to overwrite active keyslot {index} - "
                           "please erase it first")
        master_key = find_master_key(header, read_fn, password(opts.get("secret") or open_secret))
        new = password(opts["new-secret"])
        material = store_key(header, index, new, master_key,
                             opts.get("iter-time", DEFAULT_ITER_TIME))
        return [(header.slots[index].key_offset * SECTOR, material), (0, header.encode())]

    if opts.get("new-secret") is not None:
        raise QMPError("'new-secret' must not be given when erasing keyslots")
    if "iter-time" in opts:
        raise QMPError("'iter-time' must not be given when erasing keyslots")
    if opts.get("secret") is not None:
        raise QMPError("'secret' must not be given when erasing keyslots")
    old = password(opts["old-secret"]) if opts.get("old-secret") is not None else None
    if "keyslot" in opts:
        index = opts["keyslot"]
        if index < 0 or index >= NUM_SLOTS:
            raise QMPError(f"Invalid keyslot {index} specified, "
                           f"must be between 0 and {NUM_SLOTS - 1}")
        if old is not None and try_slot(header, index, read_fn, old) is None:
            raise QMPError(f"Given keyslot {index} doesn't contain the given old password "
                           "for erase operation")
        if not force and not header.slots[index].enabled:
            raise QMPError(f"Given keyslot {index} is already erased (inactive) ")
        if not force and header.active_count() == 1:
            raise QMPError(f"Attempt to erase the only active keyslot {index} which will "
                           "erase all the data in the image irreversibly - refusing operation")
        return erase_key(header, index)
    if old is None:
        raise QMPError("To erase keyslot(s), either explicit keyslot index or the password "
                       "currently contained in them must be given")
    matching = [i for i in range(NUM_SLOTS) if try_slot(header, i, read_fn, old) is not None]
    if not matching:
        raise QMPError("No keyslots match given (old) password for erase operation")
    if not force and len(matching) == header.active_count():
        raise QMPError("All the active keyslots match the (old) password that was given and "
                       "erasing them will erase all the data in the image irreversibly - "
                       "refusing operation")
    writes: list[tuple[int, bytes]] = []
    for i in matching:
        writes += erase_key(header, i)
    return writes
