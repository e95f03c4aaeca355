"""The ``raw`` format driver: the child's bytes as they are, optionally a window of them.

With ``offset``/``size`` the node exposes only part of its child, which
is how a partition or an embedded image is served.  Without them it is
a thin pass-through, and QEMU treats it as one for permissions: the
parents' needs go straight to the child, except that nobody may resize
the file under a raw node whose size was fixed.
"""

from __future__ import annotations

from typing import Any

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, Claim, Extent, Perm, WriteFlags
from blockd.errors import QMPError
from blockd.qjson import qdict_keys


class RawNode(BlockNode):
    driver = "raw"
    is_format = True
    strong_options = ("offset", "size")
    relinkable = ("file",)

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.offset = 0
        self.size: int | None = None

    async def open(self, ctx: OpenContext) -> None:
        # QEMU opens a format's file child before reading the format's own options.
        await ctx.open_child(self.options["file"], "file")
        self.offset, self.size = _window(self.options)
        self._check_window(self.file_node.length())

    def _check_window(self, file_len: int) -> None:
        if self.offset > file_len:
            raise QMPError(f"Offset ({self.offset}) cannot be greater than size of the "
                           f"containing file ({file_len})")
        if self.size is not None and self.offset + self.size > file_len:
            raise QMPError("The sum of offset (%d) and size (%d) has to be smaller or equal "
                           "to the  actual size of the containing file (%d)"
                           % (self.offset, self.size, file_len))
        if self.size is not None and self.size % 512:
            raise QMPError("Specified size is not multiple of 512")

    def child_perm(self, role: str) -> tuple[Perm, Perm]:
        perm, shared = self.cumulative_perm, self.cumulative_shared
        if self.offset or self.size is not None:
            # A window into the file must not move under us.
            shared &= ~Perm.RESIZE
        return perm, shared

    def length(self) -> int:
        if self.size is not None:
            return self.size
        return self.file_node.length() - self.offset

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self.file_child.debug_event("read_aio")
        return await self.file_child.read(self.offset + offset, length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        self.file_child.debug_event("write_aio")
        await self.file_child.write(self.offset + offset, data, flags)

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        await self.file_child.write_zeroes(self.offset + offset, length, flags)

    async def discard(self, offset: int, length: int) -> None:
        await self.file_child.discard(self.offset + offset, length)

    async def block_status(self, offset: int, length: int) -> Extent:
        ext = await self.file_child.block_status(self.offset + offset, length)
        return Extent(ext.length, ext.status, ext.offset, ext.child)

    async def claim(self, offset: int, length: int) -> Claim | None:
        return await self.file_child.claim(self.offset + offset, length)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        if self.offset or self.size is not None:
            raise OSError(95, "The new size must be a multiple of 512") if size % 512 else \
                OSError(95, "Cannot resize a raw node with offset or size")
        await self.file_child.truncate(size, exact, prealloc)

    def has_info(self) -> bool:
        # QEMU's raw driver answers image-info questions by asking its file.
        return self.file_node.has_info()

    def allocated_file_size(self) -> int | None:
        return self.file_node.allocated_file_size()

    def has_zero_init(self) -> bool:
        return self.file_node.has_zero_init()

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        return _window(options)

    async def reopen_commit(self, state: Any, options: dict[str, Any], read_only: bool) -> None:
        self.offset, self.size = state
        await super().reopen_commit(state, options, read_only)


def _window(options: dict[str, Any]) -> tuple[int, int | None]:
    """``offset`` and ``size``; QemuOpts refuses a negative one, the first in QDict order."""
    for key in qdict_keys(options):
        if key in ("offset", "size") and options[key] < 0:
            raise QMPError(f"Parameter '{key}' expects a non-negative number below 2^64")
    return options.get("offset", 0), options.get("size")
