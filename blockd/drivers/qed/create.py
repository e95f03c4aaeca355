"""``blockdev-create`` for qed: header (with the backing file name), then an empty L1 table.

The header takes the first cluster and the L1 table the ``table_size``
clusters after it; the file is cut to nothing first, as QEMU does.  A
raw backing file is recorded (no probing), any other format is not: QED
has no field for it.
"""

from __future__ import annotations

from typing import Any

from blockd.block.graph import BlockGraph
from blockd.block.node import Perm
from blockd.drivers.create_target import creation_file
from blockd.drivers.qed import header as hdr
from blockd.errors import QMPError


async def create(graph: BlockGraph, options: dict[str, Any]) -> None:
    cs = options.get("cluster-size", hdr.DEFAULT_CLUSTER_SIZE)
    ts = options.get("table-size", hdr.DEFAULT_TABLE_SIZE)
    size = options["size"]
    if not hdr.cluster_size_valid(cs):
        raise QMPError(f"QED cluster size must be within range [{hdr.MIN_CLUSTER_SIZE}, "
                       f"{hdr.MAX_CLUSTER_SIZE}] and power of 2")
    if not hdr.table_size_valid(ts):
        raise QMPError(f"QED table size must be within range [{hdr.MIN_TABLE_SIZE}, "
                       f"{hdr.MAX_TABLE_SIZE}] and power of 2")
    if not hdr.image_size_valid(size, cs, ts):
        raise QMPError("QED image size must be a non-zero multiple of cluster size and less "
                       f"than {hdr.max_image_size(cs, ts)} bytes")
    async with creation_file(graph, options["file"], Perm.WRITE | Perm.RESIZE) as file:
        head = hdr.build(cs, ts, size, options.get("backing-file"),
                         options.get("backing-fmt") == "raw")
        try:
            await file.truncate(0, exact=True)
            await file.write(0, head)
            await file.write(cs, bytes(cs * ts))
            await file.flush()
        except OSError as exc:
            raise QMPError(f"Could not write image: {exc.strerror}") from None
