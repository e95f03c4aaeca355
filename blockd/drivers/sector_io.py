"""Shared pieces of the drivers that encrypt whole 512-byte sectors (luks, qcow2).

Cipher work runs in worker threads in batches, and writes that must
read-modify-write a partial sector are kept from interleaving with
other writes to the same sectors.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

SECTOR = 512
#: Requests up to this size are ciphered on the loop: a thread hop costs more.
INLINE_MAX = 16 << 10
#: Cipher work is done in batches of this size so one huge request cannot hog a thread.
BATCH = 1 << 20

CipherFn = Callable[[int, Any], bytes]


async def crypt_sectors(fn: CipherFn, sector: int, data: bytes | bytearray | memoryview) -> bytes:
    """``fn(sector, data)`` over whole sectors, in worker threads for anything but tiny data."""
    if len(data) <= INLINE_MAX:
        return fn(sector, data)
    view = memoryview(data)
    jobs = [asyncio.to_thread(fn, sector + pos // SECTOR, view[pos:pos + BATCH])
            for pos in range(0, len(view), BATCH)]
    return b"".join(await asyncio.gather(*jobs))


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
