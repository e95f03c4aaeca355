"""Shared pieces of the drivers that encrypt whole 512-byte sectors (luks, qcow2).

Small requests are ciphered on the event loop, mid-sized ones in a worker
thread, large ones by helper processes in pieces (see
:mod:`blockd.crypto.workers`); writes that must read-modify-write a
partial sector are kept from interleaving with other writes to the same
sectors.
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


def sector_span(offset: int, length: int) -> tuple[int, int]:
    """The whole sectors [start, end) covering ``length`` bytes at ``offset``."""
    return offset - offset % SECTOR, -(-(offset + length) // SECTOR) * SECTOR


class WriteGate:
    """Orders writes whose sectors overlap when one of them is a read-modify-write.

    A read-modify-write must not race any write to its sectors; a plain
    whole-sector write only has to wait for read-modify-writes.
    """

    def __init__(self) -> None:
        self._writes: list[tuple[int, int, asyncio.Event, bool]] = []

    async def enter(self, start: int, end: int, rmw: bool) -> tuple[int, int, asyncio.Event, bool]:
        while True:
            for s, e, done, other_rmw in self._writes:
                if s < end and start < e and (rmw or other_rmw):
                    await done.wait()
                    break
            else:
                break
        entry = (start, end, asyncio.Event(), rmw)
        self._writes.append(entry)
        return entry

    def leave(self, entry: tuple[int, int, asyncio.Event, bool]) -> None:
        self._writes.remove(entry)
        entry[2].set()
