"""The ``null-co``/``null-aio`` drivers: a device that stores nothing.

Writes are dropped and reads return zeroes, so benchmarks over it
measure blockd itself (QMP, NBD, the graph) rather than storage.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, Extent, Status, WriteFlags


class NullNode(BlockNode):
    driver = "null-co"
    reopen_mutable = ()
    is_protocol = True
    strong_options = ("size", "read-zeroes")

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.size = options.get("size", 1 << 30)
        self.latency = options.get("latency-ns", 0) / 1e9
        self.read_zeroes = options.get("read-zeroes", False)

    async def open(self, ctx: OpenContext) -> None:
        """Nothing to open: the options are all there is."""

    async def _delay(self) -> None:
        if self.latency:
            await asyncio.sleep(self.latency)

    def length(self) -> int:
        return self.size

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        await self._delay()
        return bytes(length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        await self._delay()

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        if flags & WriteFlags.NO_FALLBACK:
            # QEMU's null drivers have no zeroing of their own, so a fast one fails.
            raise OSError(errno.ENOTSUP, "Operation not supported")
        await self._delay()

    async def flush(self) -> None:
        await self._delay()

    async def block_status(self, offset: int, length: int) -> Extent:
        # Like QEMU: only with read-zeroes does the device promise zeroes.
        status = Status.ALLOCATED | (Status.ZERO if self.read_zeroes else Status.NONE)
        return Extent(length, status, offset, self)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        raise OSError(95, "Operation not supported")

    def exact_filename(self) -> str | None:
        if any(key in self.options for key in self.strong_options):
            return None
        return f"{self.driver}://"

    def has_info(self) -> bool:
        return False

    def allocated_file_size(self) -> int | None:
        return 0


class NullAioNode(NullNode):
    """``null-aio``: the same device under its other name."""

    driver = "null-aio"
