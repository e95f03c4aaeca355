"""The ``blkverify`` driver: check an image driver against a raw reference copy.

Every write goes to both the image under ``test`` and the ``raw`` copy;
every read is done on both and compared, so a driver bug shows up at the
first request that returns different data.  QEMU ends the process on a
mismatch; blockd prints the same line on stderr and fails the request
with ``EIO``, so the daemon and its other nodes stay up.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
from typing import Any, Awaitable, Callable

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, ChildLink, Perm, WriteFlags
from blockd.errors import QMPError


class BlkverifyNode(BlockNode):
    driver = "blkverify"
    is_protocol = True

    async def open(self, ctx: OpenContext) -> None:
        await ctx.open_child(self.options["raw"], "raw")
        await ctx.open_child(self.options["test"], "test")

    @property
    def raw(self) -> ChildLink:
        return self.children["raw"]

    @property
    def test(self) -> ChildLink:
        return self.children["test"]

    def child_perm(self, role: str) -> tuple[Perm, Perm]:
        """The reference copy is passed what the parents need; the image under test
        may not be resized by anyone else either."""
        perm, shared = self.cumulative_perm, self.cumulative_shared
        return (perm, shared) if role == "raw" else (perm, shared & ~Perm.RESIZE)

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        raise QMPError(f"Block format 'blkverify' used by node '{self.node_name}' does not "
                       "support reopening files")

    def length(self) -> int:
        return self.test.length()

    def exact_filename(self) -> str | None:
        raw, test = self.raw.child.exact_filename(), self.test.child.exact_filename()
        if raw is None or test is None:
            return None
        return f"blkverify:{raw}:{test}"

    def full_options(self) -> dict[str, Any]:
        return {"driver": self.driver, "raw": self.raw.child.full_options(),
                "test": self.test.child.full_options()}

    def allocated_file_size(self) -> int | None:
        return None

    def _mismatch(self, op: str, offset: int, length: int, what: str) -> OSError:
        print(f"blkverify: {op} offset={offset} bytes={length} {what}", file=sys.stderr,
              flush=True)
        return OSError(errno.EIO, os.strerror(errno.EIO))

    async def _both(self, op: str, offset: int, length: int,
                    run: Callable[[ChildLink], Awaitable[Any]]) -> tuple[Any, Any]:
        """Run a request on the image under test and on the reference; they must end
        the same way."""
        outcomes = await asyncio.gather(run(self.test), run(self.raw), return_exceptions=True)
        for r in outcomes:
            if isinstance(r, BaseException) and not isinstance(r, OSError):
                raise r
        codes = [-(r.errno or errno.EIO) if isinstance(r, OSError) else 0 for r in outcomes]
        if codes[0] != codes[1]:
            raise self._mismatch(op, offset, length,
                                 f"return value mismatch {codes[0]} != {codes[1]}")
        if isinstance(outcomes[0], OSError):
            raise outcomes[0]
        return outcomes[0], outcomes[1]

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        got = await self._both("read", offset, length, lambda child: child.read(offset, length))
        a, b = bytes(got[0]), bytes(got[1])
        if a != b:
            at = next(i for i in range(length) if a[i] != b[i])
            raise self._mismatch("read", offset, length,
                                 f"contents mismatch at offset {offset + at}")
        return a

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        await self._both("write", offset, len(data),
                         lambda child: child.write(offset, data, flags))

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        await self._both("write", offset, length,
                         lambda child: child.write_zeroes(offset, length, flags))

    async def flush(self) -> None:
        """Only the image under test: the reference copy's durability does not matter."""
        await self.test.flush()
