"""A user's handle on a node: QEMU's BlockBackend, as exports and jobs use it.

It holds the user's permissions on the node as a :class:`ChildLink`,
checks that requests lie inside the node (nodes below may be written
past their end, a user's node may not) and keeps the
``query-blockstats`` counters.  Everything else (permissions, padding,
dirty bitmaps, draining) is the link's request path, the same for every
edge (:mod:`blockd.block.io`).
"""

from __future__ import annotations

import errno
import time

from blockd.block.graph import BlockGraph, User
from blockd.block.node import BlockNode, ChildLink, Extent, Perm, WriteFlags
from blockd.block.stats import Stats


def _bad_range() -> OSError:
    return OSError(errno.EIO, "Request out of range")


class Backend(User):
    """Permissioned, bounds-checked, counted access to one node."""

    def __init__(self, graph: BlockGraph, node: BlockNode, desc: str,
                 perm: Perm = Perm.CONSISTENT_READ, shared: Perm = Perm.all()) -> None:
        super().__init__(desc)
        self.graph = graph
        #: Counters live on the node so query-blockstats sees every user's I/O.
        self.stats: Stats = node.stats
        self.link: ChildLink = graph.attach(self, node, "root", perm, shared)

    @property
    def node(self) -> BlockNode:
        """The node the user reaches now: a graph change may move the link."""
        return self.link.child

    def close(self) -> None:
        self.graph.detach(self.link)

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        self.graph.update_user(self.link, perm, shared)

    def _check(self, offset: int, length: int) -> None:
        # Negative ranges are the edge's to refuse (EIO too).
        if offset + length > self.node.length():
            raise _bad_range()

    def _done(self, start: int) -> int:
        now = time.monotonic_ns()
        self.stats.last_access_ns = now
        return now - start

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self._check(offset, length)
        start = time.monotonic_ns()
        try:
            data = await self.link.read(offset, length)
        except OSError:
            self.stats.failed_rd_operations += 1
            raise
        self.stats.rd_total_time_ns += self._done(start)
        self.stats.rd_operations += 1
        self.stats.rd_bytes += length
        return data

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        length = len(data)
        self._check(offset, length)
        start = time.monotonic_ns()
        try:
            await self.link.write(offset, data, flags)
        except OSError:
            self.stats.failed_wr_operations += 1
            raise
        self._wrote(start, offset, length)

    def _wrote(self, start: int, offset: int, length: int) -> None:
        self.stats.wr_total_time_ns += self._done(start)
        self.stats.wr_operations += 1
        self.stats.wr_bytes += length
        self.stats.wr_highest_offset = max(self.stats.wr_highest_offset, offset + length)

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        self._check(offset, length)
        start = time.monotonic_ns()
        try:
            await self.link.write_zeroes(offset, length, flags)
        except OSError:
            self.stats.failed_wr_operations += 1
            raise
        self._wrote(start, offset, length)

    async def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        start = time.monotonic_ns()
        try:
            await self.link.discard(offset, length)
        except OSError:
            self.stats.failed_unmap_operations += 1
            raise
        self.stats.unmap_total_time_ns += self._done(start)
        self.stats.unmap_operations += 1
        self.stats.unmap_bytes += length

    async def flush(self) -> None:
        start = time.monotonic_ns()
        try:
            await self.link.flush()
        except OSError:
            self.stats.failed_flush_operations += 1
            raise
        self.stats.flush_total_time_ns += self._done(start)
        self.stats.flush_operations += 1

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        await self.link.truncate(size, exact, prealloc)

    async def block_status(self, offset: int, length: int) -> Extent:
        self._check(offset, length)
        return await self.link.block_status(offset, length)

    def length(self) -> int:
        return self.node.length()
