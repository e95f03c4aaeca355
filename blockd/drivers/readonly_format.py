"""What the formats QEMU only reads (bochs, cloop, dmg) share.

Opened for writing they are refused with QEMU's message, or made
read-only when ``auto-read-only`` allows it, before their storage opens
(so it opens read-only too); reopening is refused, as QEMU refuses it
for drivers that cannot.  Reads reach the driver in whole sectors (the
request path pads them to ``request_alignment``); block status is QEMU's
default for drivers without one: data, allocated, at no known offset.
"""

from __future__ import annotations

from typing import Any

from blockd.block.graph import OpenContext
from blockd.block.node import BlockNode, ChildLink, WriteFlags
from blockd.errors import QMPError


class ReadOnlyFormatNode(BlockNode):
    """A format node that only reads; subclasses load the image in :meth:`load`."""

    is_format = True
    #: Reads reach the driver in whole sectors: the edge pads them (QEMU's limit too).
    request_alignment = 512

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.size = 0

    async def open(self, ctx: OpenContext) -> None:
        if not self.read_only:
            if not self.options.get("auto-read-only"):
                raise QMPError("Image is read-only")
            self.read_only = True
            self.options = {**self.options, "read-only": True}
        await ctx.open_child(self.options["file"], "file")
        file = self.file_child
        try:
            await self.load(file)
        except OSError as exc:
            raise QMPError(f"Could not open '{file.child.filename()}': "
                           f"{exc.strerror or 'Input/output error'}") from None

    async def load(self, file: ChildLink) -> None:
        """Read and check the image's tables; set ``size``."""
        raise NotImplementedError

    def length(self) -> int:
        return self.size

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        raise OSError(1, "Operation not permitted")

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        raise QMPError("Image format driver does not support resize")

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        raise not_reopenable(self)

    def has_info(self) -> bool:
        return False


def not_reopenable(node: BlockNode) -> QMPError:
    """QEMU's refusal to reopen a node whose driver cannot (these, and parallels)."""
    return QMPError(f"Block format '{node.driver}' used by node '{node.node_name}' does not "
                    "support reopening files")
