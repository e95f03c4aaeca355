"""``x-blockdev-change``: add a child to a node, or remove one, while it runs.

Only drivers that manage a list of children (quorum) take part; the
checks run in QEMU's order so the first failing one decides the message.
"""

from __future__ import annotations

from typing import Any

from blockd.daemon import Daemon
from blockd.errors import QMPError
from blockd.qmp.registry import command


@command("x-blockdev-change")
async def x_blockdev_change(daemon: Daemon, args: dict[str, Any]) -> dict:
    graph = daemon.graph
    parent = graph.lookup(args["parent"])
    child_name: str | None = args.get("child")
    node_name: str | None = args.get("node")
    if (child_name is None) == (node_name is None):
        raise QMPError("The parameters child and node are in conflict" if child_name
                       else "Either child or node must be specified")
    if child_name is not None:
        link = parent.children.get(child_name)
        if link is None:
            raise QMPError(f"Node '{parent.node_name}' does not have child '{child_name}'")
        await parent.del_child(graph, link)
        return {}
    node = graph.nodes.get(node_name or "")
    if node is None:
        raise QMPError(f"Node '{node_name}' not found")
    await parent.add_child(graph, node)
    return {}
