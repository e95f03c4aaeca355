"""The file node a format's ``blockdev-create`` writes to.

The options name it (an existing node) or describe it inline, in which
case it is opened for the job alone and closed again when it ends.  The
job writes it through the edge of an unnamed user holding ``perm``,
sharing everything, as QEMU's creators do; it may write past the node's
end, which grows it.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

from blockd.block.backend import Backend
from blockd.block.graph import BlockGraph
from blockd.block.node import ChildLink, Perm


@contextlib.asynccontextmanager
async def creation_file(graph: BlockGraph, ref: str | dict[str, Any],
                        perm: Perm) -> AsyncIterator[ChildLink]:
    """The edge to the node ``ref`` names or describes, held with ``perm`` while the
    job writes it."""
    file = graph.lookup(ref) if isinstance(ref, str) else await graph.open_node(ref, implicit=True)
    user: Backend | None = None
    try:
        user = Backend(graph, file, "an unnamed block device", perm, Perm.all())
        yield user.link
    finally:
        if user is not None:
            user.close()
        if not isinstance(ref, str):
            await graph.delete_node(file)
