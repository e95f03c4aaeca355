"""Legacy qcow/qcow2 AES encryption (``encrypt.format=aes``).

The scheme is weak and kept only to read and convert old images: the
password itself, cut or zero-padded to 16 bytes, is the AES-128 key;
sectors are encrypted with CBC and an IV that is the guest sector
number (little-endian, zero-padded).
"""

from __future__ import annotations

from blockd.crypto.cipher import SectorCipher

KEY_LEN = 16


def qcow_key(password: bytes) -> bytes:
    """The AES key QEMU derives from a qcow password."""
    return password[:KEY_LEN].ljust(KEY_LEN, b"\0")


def qcow_cipher(password: bytes) -> SectorCipher:
    """The cipher for guest sectors; pass ``guest_offset // 512`` as the sector number."""
    return SectorCipher("aes-128", "cbc", qcow_key(password), "plain64")
