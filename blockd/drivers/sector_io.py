"""Shared pieces of the drivers that encrypt whole 512-byte sectors (luks, qcow2).

Small requests are ciphered on the event loop, mid-sized ones in a worker
thread, large ones by helper processes in pieces (see
:mod:`blockd.crypto.workers`).  Requests reach these drivers in whole
sectors: their ``request_alignment`` makes the request path pad (and
serialise) partial ones.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the cipher code (and ``cryptography``) loads with the first cipher
    from blockd.crypto.cipher import SectorCipher

SECTOR = 512
#: Requests up to this size are ciphered on the loop: a thread hop costs more.
INLINE_MAX = 16 << 10


async def crypt_sectors(cipher: SectorCipher, encrypt: bool, sector: int,
                        data: bytes | bytearray | memoryview) -> bytes | bytearray:
    """Whole sectors ciphered, the first numbered ``sector``: where depends on the size."""
    run = cipher.encrypt if encrypt else cipher.decrypt
    if len(data) <= INLINE_MAX:
        return run(sector, data)
    from blockd.crypto import workers

    if len(data) >= workers.MIN_BYTES:
        return await workers.crypt_in_helpers(cipher, encrypt, sector, data)
    return await asyncio.to_thread(run, sector, data)
