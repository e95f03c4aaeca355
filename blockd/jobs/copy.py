"""One copy engine for the daemon's jobs and for ``blockd-img``: extents in, requests out.

The caller says what each range of the source is (:data:`DATA` to copy,
:data:`ZERO` to zero on the target, :data:`SKIP` to leave alone) and how to
read, write and zero; the engine walks the ranges in order and keeps up to
``parallel`` requests of at most ``chunk`` bytes in flight, so one slow
request does not idle the rest.  With ``detect_zeroes`` a data chunk that
reads as zeroes is zeroed (or skipped, where the target needs no zeroing)
instead of written.

It limits its rate in one of two ways: a :class:`RateLimit` of its own
(``blockd-img``'s ``-r``), or the caller's ``gate``, awaited before each
request is issued, through which a job sleeps for its speed and stops at
its pause points.  Either way a request counts against the rate when it is
issued, so the requests in flight do not let the copy run ahead of it.  The first failure stops new requests; those in flight finish
(a request cut in the middle could leave a format's metadata half done),
then the failure is raised.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Awaitable, Callable

from blockd.jobs.ratelimit import RateLimit

#: What a range of the source asks of the copy.
DATA, ZERO, SKIP = "data", "zero", "skip"

#: What reads return and writes take.
Buffer = bytes | bytearray | memoryview

#: ``status(offset, length)``: the length (at most ``length``, at least 1) of the run
#: at ``offset`` and what it asks (DATA, ZERO or SKIP).
Status = Callable[[int, int], Awaitable[tuple[int, str]]]


@dataclasses.dataclass
class Copy:
    """One copy of ``[start, end)``; :meth:`run` does it."""

    status: Status
    read: Callable[[int, int], Awaitable[Buffer]]
    write: Callable[[int, Buffer], Awaitable[None]]
    #: Zeroes a range of the target; None when the target already reads as zeroes
    #: there, so zero runs are skipped.
    write_zeroes: Callable[[int, int], Awaitable[None]] | None
    end: int
    start: int = 0
    chunk: int = 2 << 20
    parallel: int = 8
    detect_zeroes: bool = False
    #: The engine's own rate limit (bytes/s): ignored when a ``gate`` is given.
    limit: RateLimit | None = None
    #: Awaited with its size before each request is issued: a job's pause point and
    #: rate limit (BlockJob.throttle).
    gate: Callable[[int], Awaitable[None]] | None = None
    #: Called with the byte count of every run done or skipped (progress).
    done: Callable[[int], None] | None = None
    #: How the engine's own rate limit waits (a test may record instead).
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def run(self) -> None:
        queue: asyncio.Queue[tuple[int, int, str] | None] = asyncio.Queue(self.parallel)
        failures: list[BaseException] = []

        async def walk() -> None:
            offset = self.start
            try:
                while offset < self.end and not failures:
                    n, kind = await self.status(offset, min(self.chunk, self.end - offset))
                    assert 0 < n <= self.end - offset
                    if kind == SKIP or (kind == ZERO and self.write_zeroes is None):
                        self._done(n)
                    else:
                        await self._wait_turn(n)
                        await queue.put((offset, n, kind))
                    offset += n
            except Exception as exc:
                failures.append(exc)
            finally:
                for _ in range(self.parallel):
                    await queue.put(None)

        async def work() -> None:
            while (item := await queue.get()) is not None:
                if failures:
                    continue
                try:
                    await self._request(*item)
                except Exception as exc:
                    failures.append(exc)

        await asyncio.gather(walk(), *(work() for _ in range(self.parallel)))
        if failures:
            raise failures[0]

    async def _wait_turn(self, n: int) -> None:
        """Wait until the rate allows a request of ``n`` bytes, and count them."""
        if self.gate is not None:
            await self.gate(n)
        elif self.limit is not None:
            delay = self.limit.delay(0)
            while delay > 0:
                await self.sleep(delay)
                delay = self.limit.delay(0)
            self.limit.delay(n)

    async def _request(self, offset: int, n: int, kind: str) -> None:
        if kind == DATA:
            data = await self.read(offset, n)
            if not (self.detect_zeroes and _is_zero(data)):
                await self.write(offset, data)
            elif self.write_zeroes is not None:
                await self.write_zeroes(offset, n)
        else:
            assert kind == ZERO and self.write_zeroes is not None
            await self.write_zeroes(offset, n)
        self._done(n)

    def _done(self, n: int) -> None:
        if self.done is not None:
            self.done(n)


_ZEROES = bytes(2 << 20)


def _is_zero(data: Buffer) -> bool:
    """Whether ``data`` is all zero bytes (a memory compare, chunk by chunk)."""
    view = memoryview(data)
    step = len(_ZEROES)
    return all(view[i:i + step] == _ZEROES[:len(view[i:i + step])]
               for i in range(0, len(view), step))
