"""Optional node capabilities: what each driver declares, and QEMU's refusal where it has none."""

from __future__ import annotations

import asyncio
import errno

import pytest

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.drivers import driver_class
from blockd.errors import QMPError
from harness import HAVE_QSD, Daemon

CAPABILITIES = [BlockNode.check, BlockNode.amend, BlockNode.make_empty,
                BlockNode.compress_cluster, BlockNode.write_compressed,
                BlockNode.snapshot_create, BlockNode.snapshot_delete,
                BlockNode.snapshot_revert, BlockNode.show_snapshot]

#: What each driver implements, as QEMU 7.2's drivers have the callbacks.
EXPECTED = {
    "qcow2": {"check", "amend", "make_empty", "compress_cluster", "write_compressed",
              "snapshot_create", "snapshot_delete", "snapshot_revert", "show_snapshot"},
    "luks": {"amend"},
    "vmdk": {"check", "compress_cluster", "write_compressed"},
    "vdi": {"check"},
    "vpc": set(),
    "raw": set(),
    "file": set(),
    "null-co": set(),
    "null-aio": set(),
}


@pytest.mark.parametrize("driver", sorted(EXPECTED))
def test_declared_capabilities(driver):
    node = driver_class(driver)("n", {"driver": driver, "filename": "x"}, True)
    assert node.driver == driver
    assert {c.__name__ for c in CAPABILITIES if node.supports(c)} == EXPECTED[driver]


def test_defaults_refuse_as_qemu_does():
    async def main() -> None:
        g = BlockGraph()
        node = await g.open_node({"driver": "null-co", "node-name": "n"})
        for call in (node.check(), node.make_empty(), node.compress_cluster(bytes(512)),
                     node.write_compressed(0, bytes(512)),
                     node.snapshot_create("s", (0, 0, 0))):
            with pytest.raises(OSError) as exc:
                await call
            assert exc.value.errno == errno.ENOTSUP
        with pytest.raises(QMPError, match="Driver does not support x-blockdev-amend"):
            await node.amend({}, None)
    asyncio.run(main())


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
def test_amend_refused_and_null_aio_named_as_qsd_does(tmp_path):
    """x-blockdev-amend on a driver without amend fails before any job exists."""
    replies = []
    for qsd in (True, False):
        sock = str(tmp_path / f"m{int(qsd)}.sock")
        with Daemon(sock, "--blockdev", "null-aio,node-name=n0", qsd=qsd) as d:
            c = d.client()
            amend = c.cmd("x-blockdev-amend", **{"job-id": "j", "node-name": "n0",
                                                  "options": {"driver": "null-aio"}})
            nodes = [(n["node-name"], n["drv"], n["file"])
                     for n in c.cmd("query-named-block-nodes")["return"]]
            jobs = c.cmd("query-jobs")
            replies.append((amend, nodes, jobs))
    assert replies[0] == replies[1]
    assert replies[1][0]["error"]["desc"] == "Driver does not support x-blockdev-amend"
