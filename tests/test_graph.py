"""The block graph: its shape (``x-debug-query-block-graph``) and its rewiring.

Shapes and ``blockdev-reopen`` transcripts are compared with
qemu-storage-daemon's, step by step, through ``harness.graph_shape``.
``replace_node``/``insert_filter``/``remove_filter`` have no QMP command of
their own in QEMU 7.2, so they are driven in-process over real files, with
the graph checked unchanged after every refusal.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from typing import Any

import pytest

from blockd.block.backend import Backend
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode, Perm
from blockd.block.query import block_graph
from blockd.errors import QMPError
from harness import HAVE_QSD, WAIT, Daemon, graph_shape

needs_qsd = pytest.mark.skipif(not HAVE_QSD, reason="qemu-storage-daemon not installed")


def _images(d: str) -> None:
    os.makedirs(d)
    for args in (["-f", "raw", f"{d}/a.raw", "1M"], ["-f", "raw", f"{d}/b.raw", "1M"],
                 ["-f", "qcow2", f"{d}/base.qcow2", "1M"],
                 ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/top.qcow2"]):
        subprocess.run(["qemu-img", "create", "-q", *args], check=True)


def _fill(value: Any, d: str) -> Any:
    """Steps name files as ``{d}/...``; each daemon gets its own copy of the images."""
    return json.loads(json.dumps(value).replace("{d}", d))


def _transcript(tmp_path, qsd: bool, steps: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Replies to ``steps``; a step named ``graph`` records the normalized graph,
    one named ``nodes`` the named nodes' ``query-named-block-nodes`` entries by name
    (implicit nodes' names are random, and the daemons list nodes in different orders)."""
    d = str(tmp_path / ("qsd" if qsd else "blockd"))
    _images(d)
    out: list[Any] = []
    with Daemon(f"{d}/qmp.sock", qsd=qsd) as daemon:
        c = daemon.client()
        for cmd, args in steps:
            if cmd == "graph":
                reply = c.cmd("x-debug-query-block-graph")
                out.append(("graph", graph_shape(reply["return"])))
            elif cmd == "nodes":
                reply = json.loads(json.dumps(c.cmd("query-named-block-nodes"))
                                   .replace(d, "{d}"))
                out.append(("nodes", {n["node-name"]: n for n in reply["return"]
                                      if not n["node-name"].startswith("#")}))
            else:
                out.append((cmd, json.loads(json.dumps(c.cmd(cmd, **_fill(args, d)))
                                            .replace(d, "{d}"))))
    return out


def _compare(tmp_path, steps: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    ours = _transcript(tmp_path, False, steps)
    theirs = _transcript(tmp_path, True, steps)
    for step, mine, qemu in zip(steps, ours, theirs):
        assert mine == qemu, step
    return ours


def _add(node_name: str, **opts: Any) -> tuple[str, dict[str, Any]]:
    return ("blockdev-add", {"node-name": node_name, **opts})


def _reopen(**opts: Any) -> tuple[str, dict[str, Any]]:
    return ("blockdev-reopen", {"options": [opts]})


def _file(name: str, **opts: Any) -> dict[str, Any]:
    return {"driver": "file", "filename": "{d}/" + name, **opts}


GRAPH: tuple[str, dict[str, Any]] = ("graph", {})
NBD = ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "{d}/nbd.sock"}}})


def _export(node: str, ident: str, writable: bool = False) -> tuple[str, dict[str, Any]]:
    return ("block-export-add", {"type": "nbd", "id": ident, "node-name": node,
                                 "writable": writable})


SHAPES = {
    "raw-over-file": [_add("fmt", driver="raw", file=_file("a.raw")), GRAPH],
    "qcow2-with-backing": [_add("top", driver="qcow2", file=_file("top.qcow2")), GRAPH],
    "qcow2-backing-by-reference": [
        _add("basef", **_file("base.qcow2", **{"read-only": True})),
        _add("base", driver="qcow2", file="basef", backing=None, **{"read-only": True}),
        _add("top", driver="qcow2", file=_file("top.qcow2"), backing="base"), GRAPH],
    "nbd-exports": [
        _add("fmt", driver="raw", file=_file("a.raw")),
        _add("top", driver="qcow2", file=_file("top.qcow2")),
        NBD, _export("fmt", "e0", True), _export("top", "e1"), _export("fmt", "e2"), GRAPH],
    "blkdebug-filter": [
        _add("dbg", driver="blkdebug", image=_file("a.raw")),
        _add("fmt", driver="raw", file="dbg"), NBD, _export("fmt", "e0", True), GRAPH,
        _add("dbg2", driver="blkdebug", image=_file("b.raw"),
             **{"take-child-perms": ["resize"], "unshare-child-perms": ["write"]}), GRAPH],
}


@needs_qsd
@pytest.mark.parametrize("name", SHAPES)
def test_graph_shape_matches_qsd(tmp_path, name):
    _compare(tmp_path, SHAPES[name])


@needs_qsd
def test_reopen_changes_file_as_qsd_does(tmp_path):
    """A filter put under a raw node and taken out again by reopen, under a
    writable export, and every refusal QEMU has on the way."""
    steps = [
        _add("r", driver="raw", file=_file("a.raw", **{"node-name": "af"})),
        _add("bro", **_file("b.raw", **{"read-only": True})),
        _add("dbg", driver="blkdebug", image="af"),
        NBD, _export("r", "e0", True), GRAPH,
        _reopen(driver="raw", **{"node-name": "r"}, file="dbg"), GRAPH,
        ("blockdev-del", {"node-name": "dbg"}),
        _reopen(driver="raw", **{"node-name": "r"}, file="r"),
        _reopen(driver="raw", **{"node-name": "r"}, file="nosuch"),
        _reopen(driver="raw", **{"node-name": "r"}, file=_file("a.raw")),
        _reopen(driver="raw", **{"node-name": "r"}, file="bro"),  # a writer over a read-only node
        _reopen(driver="blkdebug", **{"node-name": "dbg"}, image="bro"),
        _reopen(driver="raw", **{"node-name": "r"}, file="af"), GRAPH,
        ("blockdev-del", {"node-name": "dbg"}), GRAPH,
        # Without a writer the read-only node will do.
        ("block-export-del", {"id": "e0"}),
        _reopen(driver="raw", **{"node-name": "r"}, file="bro"), GRAPH,
        # The inline child lost its only parent and is gone.
        _reopen(driver="raw", **{"node-name": "r"}, file="af"),
        _add("topf", **_file("top.qcow2")),
        _add("q", driver="qcow2", file="topf", backing=None),
        _reopen(driver="raw", **{"node-name": "r"}, file="topf", **{"read-only": True}), GRAPH,
    ]
    _compare(tmp_path, steps)


@needs_qsd
def test_reopen_changes_backing_as_qsd_does(tmp_path):
    steps = [
        _add("topf", **_file("top.qcow2")),
        _add("top", driver="qcow2", file="topf"), GRAPH,
        _reopen(driver="qcow2", **{"node-name": "top"}, file="topf"),
        _reopen(driver="qcow2", **{"node-name": "top"}, file="topf", backing={"driver": "null-co"}),
        _reopen(driver="qcow2", **{"node-name": "top"}, file="topf", backing=None), GRAPH,
        _add("basef", **_file("base.qcow2", **{"read-only": True})),
        _add("base", driver="qcow2", file="basef", backing=None, **{"read-only": True}),
        _reopen(driver="qcow2", **{"node-name": "top"}, file="topf", backing="base"), GRAPH,
        _reopen(driver="qcow2", **{"node-name": "base"}, file="basef", backing="top",
                **{"read-only": True}),
        _reopen(driver="qcow2", **{"node-name": "top"}, file="topf", backing="top"),
        _reopen(driver="qcow2", **{"node-name": "top"}, file="topf", backing="nosuch"),
        ("blockdev-del", {"node-name": "base"}),
        _reopen(driver="qcow2", **{"node-name": "top"}, file="topf", backing=None), GRAPH,
        ("blockdev-del", {"node-name": "base"}), GRAPH,
    ]
    _compare(tmp_path, steps)


@needs_qsd
def test_reopen_of_several_nodes_as_qsd_does(tmp_path):
    """Entries change links one after another (a cycle through an earlier entry's new
    link is refused), a node listed twice takes its last options, and a node left
    without its writer by the same reopen may go read-only."""
    def reopen(*entries: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return ("blockdev-reopen", {"options": list(entries)})

    steps = [
        _add("fa", **_file("a.raw")), _add("fb", **_file("b.raw")),
        _add("r", driver="raw", file="fa"), _add("r2", driver="raw", file="fb"),
        NBD, _export("r", "e0", True),
        reopen({"driver": "raw", "node-name": "r", "file": "fb", "read-only": True}),
        reopen({"driver": "raw", "node-name": "r", "file": "fb"},
               {"driver": "file", "node-name": "fb", "filename": "{d}/b.raw", "read-only": True}),
        reopen({"driver": "raw", "node-name": "r2", "file": "fa"},
               {"driver": "raw", "node-name": "r", "file": "fb"}), GRAPH,
        reopen({"driver": "raw", "node-name": "r2", "file": "fb"},
               {"driver": "raw", "node-name": "r2", "file": "fa"}), GRAPH,
        reopen({"driver": "raw", "node-name": "r", "file": "r2"},
               {"driver": "raw", "node-name": "r2", "file": "r"}),
        reopen({"driver": "raw", "node-name": "r", "file": "r2"}), GRAPH,
        reopen({"driver": "raw", "node-name": "r2", "file": "r"}),
        reopen({"driver": "raw", "node-name": "r", "file": "fb"},
               {"driver": "raw", "node-name": "r2", "file": "fa", "read-only": True}), GRAPH,
        _add("q", driver="qcow2", file=_file("top.qcow2"), backing=None),
        reopen({"driver": "qcow2", "node-name": "q", "file": _file("top.qcow2"), "backing": "r"}),
        GRAPH,
        reopen({"driver": "qcow2", "node-name": "q", "file": _file("top.qcow2"), "backing": "fa",
                "read-only": True}), GRAPH,
    ]
    _compare(tmp_path, steps)


@needs_qsd
def test_reopen_keeps_the_options_of_blkdebug_and_null_as_qsd_does(tmp_path):
    """Drivers whose reopen takes no options: each must be given again, unchanged,
    also inside an inline child; only the options every node has may change."""
    dbg = {"driver": "blkdebug", "image": _file("a.raw")}
    steps = [
        _add("fa", **_file("a.raw")),
        _add("d", driver="blkdebug", image="fa", align=512, **{"max-transfer": 65536}),
        _reopen(driver="blkdebug", **{"node-name": "d"}, image="nosuch"),
        _reopen(driver="blkdebug", **{"node-name": "d"}, image="fa"),
        _reopen(driver="blkdebug", **{"node-name": "d"}, image="fb", align=512,
                **{"max-transfer": 65536}),
        _reopen(driver="blkdebug", **{"node-name": "d"}, image="fa", align=1024,
                **{"max-transfer": 65536}),
        _reopen(driver="blkdebug", **{"node-name": "d"}, image="fa", align=512,
                **{"max-transfer": 65536, "read-only": True, "detect-zeroes": "on",
                   "discard": "unmap", "cache": {"no-flush": True}}),
        _reopen(driver="blkdebug", **{"node-name": "d"}, image="fa", align=512,
                **{"max-transfer": 65536, "inject-error": [{"event": "read_aio"}]}),
        _add("n", driver="null-co", size=1024),
        _reopen(driver="null-co", **{"node-name": "n"}),
        _reopen(driver="null-co", **{"node-name": "n"}, size=2048),
        _reopen(driver="null-co", **{"node-name": "n"}, size=1024, **{"read-zeroes": True}),
        _reopen(driver="null-co", **{"node-name": "n"}, size=1024, **{"read-only": True}),
        _add("r", driver="raw", file=dbg),
        _reopen(driver="raw", **{"node-name": "r"}, file=dbg),
        _reopen(driver="raw", **{"node-name": "r"}, file={**dbg, "image": _file("b.raw")}),
        _reopen(driver="raw", **{"node-name": "r"}, file={**dbg, "image": "nosuch"}),
        _reopen(driver="raw", **{"node-name": "r"}, file={**dbg, "align": 4096}),
        _reopen(driver="raw", **{"node-name": "r"}, file={"driver": "null-co"}),
    ]
    _compare(tmp_path, steps)


@needs_qsd
def test_reopen_puts_a_filter_under_qcow2_as_qsd_does(tmp_path):
    steps = [
        _add("topf", **_file("top.qcow2")),
        _add("top", driver="qcow2", file="topf", backing=None),
        _add("bro", **_file("b.raw", **{"read-only": True})),
        _add("basef", **_file("base.qcow2", **{"read-only": True})),
        _add("base", driver="qcow2", file="basef", backing=None, **{"read-only": True}),
        _add("dbg", driver="blkdebug", image="topf"),
        NBD, _export("top", "e0", True),
        _reopen(driver="qcow2", **{"node-name": "top"}, file="bro", backing=None),
        _reopen(driver="qcow2", **{"node-name": "top"}, file="basef", backing=None),
        _reopen(driver="qcow2", **{"node-name": "top"}, file="dbg", backing=None), GRAPH,
        _reopen(driver="qcow2", **{"node-name": "top"}, file="topf", backing="base"), GRAPH,
    ]
    _compare(tmp_path, steps)


def test_qcow2_reads_and_writes_through_a_filter_put_under_it(tmp_path):
    """The qcow2 node's image follows its new file link: data and metadata stay whole."""
    d = str(tmp_path)
    _images(d + "/i")
    img = d + "/i/top.qcow2"
    with Daemon(f"{d}/qmp.sock") as daemon:
        c = daemon.client()
        steps = [_add("f0", driver="file", filename=img),
                 _add("q", driver="qcow2", file="f0", backing=None),
                 _add("dbg", driver="blkdebug", image="f0"),
                 ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{d}/n.sock"}}}),
                 _export("q", "e0", True)]
        for cmd, args in steps:
            assert c.cmd(cmd, **args) == {"return": {}}
        uri = f"nbd+unix:///q?socket={d}/n.sock"
        for i, filt in enumerate(("dbg", "f0", "dbg")):
            reply = c.cmd("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "q",
                                                       "file": filt, "backing": None}])
            assert reply == {"return": {}}
            out = _qemu_io("-f", "raw", "-c", f"write -P {i + 1} {i * 65536} 64k",
                           "-c", f"read -P {i + 1} {i * 65536} 64k", uri)
            assert out.returncode == 0 and "error" not in out.stdout \
                and "Pattern verification failed" not in out.stdout, out
        assert c.cmd("block-export-del", id="e0", mode="hard") == {"return": {}}
        c.events(0.5)
        for node in ("q", "dbg", "f0"):
            assert c.cmd("blockdev-del", **{"node-name": node}) == {"return": {}}
    assert subprocess.run(["qemu-img", "check", "-q", img]).returncode == 0
    for i in range(3):
        out = _qemu_io("-f", "qcow2", "-c", f"read -P {i + 1} {i * 65536} 64k", img)
        assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_filter_in_and_out_under_fio_loses_no_request(tmp_path, fmt):
    """fio writes and verifies over NBD while reopen puts blkdebug under the node and
    takes it out again, over and over: every request completes, every block verifies."""
    d = str(tmp_path)
    img = f"{d}/disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, img, "8M"], check=True)
    with Daemon(f"{d}/qmp.sock") as daemon:
        c = daemon.client()
        extra = {"backing": None} if fmt == "qcow2" else {}
        steps = [_add("f0", driver="file", filename=img),
                 _add("n", driver=fmt, file="f0", **extra),
                 _add("dbg", driver="blkdebug", image="f0"),
                 ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{d}/n.sock"}}}),
                 _export("n", "e0", True)]
        for cmd, args in steps:
            assert c.cmd(cmd, **args) == {"return": {}}
        fio = subprocess.Popen(
            ["fio", "--name=v", "--ioengine=nbd", f"--uri=nbd+unix:///n?socket={d}/n.sock",
             "--rw=randwrite", "--bs=4k", "--size=8M", "--iodepth=16", "--verify=crc32c",
             "--do_verify=1", "--verify_state_save=0", "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        swaps = 0
        while fio.poll() is None or swaps < 2:
            target = "dbg" if swaps % 2 == 0 else "f0"
            reply = c.cmd("blockdev-reopen", options=[{"driver": fmt, "node-name": "n",
                                                       "file": target, **extra}])
            assert reply == {"return": {}}
            swaps += 1
        out, err = fio.communicate(timeout=WAIT)
        assert fio.returncode == 0, err
        job = json.loads(out[out.index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] == 8 << 20
        graph = graph_shape(c.cmd("x-debug-query-block-graph")["return"])
        file_edge = [e for e in graph["edges"] if e[0] == "n"]
        assert [e[1] for e in file_edge] == ["dbg" if swaps % 2 else "f0"]
    if fmt == "qcow2":
        assert subprocess.run(["qemu-img", "check", "-q", img]).returncode == 0


@needs_qsd
def test_queries_after_rewiring_match_qsd(tmp_path):
    """Names, backing files and chain depth once links changed: a backing file dropped
    and set again, a filter in the chain, a filter under a raw node."""
    nodes: tuple[str, dict[str, Any]] = ("nodes", {})
    steps = [
        _add("top", driver="qcow2", file=_file("top.qcow2")), nodes,
        _reopen(driver="qcow2", **{"node-name": "top"}, file=_file("top.qcow2"), backing=None),
        nodes,
        _add("basef", **_file("base.qcow2", **{"read-only": True})),
        _add("base", driver="qcow2", file="basef", backing=None, **{"read-only": True}),
        _add("dbg", driver="blkdebug", image="base"),
        _reopen(driver="qcow2", **{"node-name": "top"}, file=_file("top.qcow2"), backing="dbg"),
        nodes,
        _reopen(driver="qcow2", **{"node-name": "top"}, file=_file("top.qcow2"), backing="base"),
        nodes,
        _add("r", driver="raw", file=_file("a.raw", **{"node-name": "af"})),
        _add("rdbg", driver="blkdebug", image="af"),
        _reopen(driver="raw", **{"node-name": "r"}, file="rdbg"), nodes,
    ]
    _compare(tmp_path, steps)


def _qemu_io(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", *args], capture_output=True, text=True, check=False)


def test_filter_inserted_by_reopen_carries_the_exports_writes(tmp_path):
    """Writes through the export land in the file before, under and after the filter."""
    d = str(tmp_path)
    _images(d + "/i")
    img = d + "/i/a.raw"
    with Daemon(f"{d}/qmp.sock") as daemon:
        c = daemon.client()
        steps = [_add("f0", driver="file", filename=img), _add("r", driver="raw", file="f0"),
                 _add("dbg", driver="blkdebug", image="f0"),
                 ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{d}/n.sock"}}}),
                 _export("r", "e0", True)]
        for cmd, args in steps:
            assert c.cmd(cmd, **args) == {"return": {}}
        uri = f"nbd+unix:///r?socket={d}/n.sock"
        for i, filt in enumerate(("f0", "dbg", "f0")):
            reply = c.cmd("blockdev-reopen", options=[{"driver": "raw", "node-name": "r",
                                                       "file": filt}])
            assert reply == {"return": {}}
            out = _qemu_io("-f", "raw", "-c", f"write -P {i + 1} {i * 65536} 64k", uri)
            assert out.returncode == 0 and "error" not in out.stdout, out
        assert c.cmd("blockdev-del", **{"node-name": "dbg"}) == {"return": {}}
        assert c.cmd("block-export-del", id="e0", mode="hard") == {"return": {}}
        c.events(0.5)
        assert c.cmd("blockdev-del", **{"node-name": "r"}) == {"return": {}}
        assert c.cmd("blockdev-del", **{"node-name": "f0"}) == {"return": {}}
    for i in range(3):
        out = _qemu_io("-f", "raw", "-c", f"read -P {i + 1} {i * 65536} 64k", img)
        assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out


# ---- in-process: replace_node, insert_filter, remove_filter ------------------------------


def _snapshot(graph: BlockGraph) -> Any:
    """The whole graph with its permissions and every node's lock state."""
    return (block_graph(graph), [(n.node_name, n.cumulative_perm, n.cumulative_shared)
                                 for n in graph])


async def _chain(tmp_path) -> tuple[BlockGraph, BlockNode, BlockNode, Backend]:
    _images(str(tmp_path / "i"))
    g = BlockGraph()
    f0 = await g.open_node({"driver": "file", "node-name": "f0",
                            "filename": str(tmp_path / "i" / "a.raw")})
    raw = await g.open_node({"driver": "raw", "node-name": "r", "file": "f0"})
    user = Backend(g, raw, "an unnamed block device", Perm.CONSISTENT_READ | Perm.WRITE,
                   Perm.all() & ~Perm.RESIZE)
    return g, f0, raw, user


def test_insert_and_remove_filter_move_every_parent(tmp_path):
    async def body() -> None:
        g, f0, raw, user = await _chain(tmp_path)
        other = await g.open_node({"driver": "raw", "node-name": "r2", "file": "f0",
                                   "read-only": True})
        dbg = await g.insert_filter({"driver": "blkdebug", "node-name": "dbg"}, below=f0)
        assert raw.file is dbg and other.file is dbg and dbg.children["image"].child is f0
        assert [link.parent for link in f0.parents] == [dbg]
        edge = next(e for e in block_graph(g)["edges"] if e["name"] == "image")
        assert edge["perm"] == ["write", "consistent-read"]
        await user.write(0, b"\1" * 4096)
        assert bytes(await f0.read(0, 4096)) == b"\1" * 4096
        # A filter over the node a backend uses: the backend follows.
        top = await g.insert_filter({"driver": "blkdebug"}, below=raw)
        assert user.node is top and top.node_name in g.implicit
        assert await g.remove_filter(top) is raw and user.node is raw
        assert top.node_name not in g.nodes
        assert await g.remove_filter(dbg) is f0
        assert raw.file is f0 and other.file is f0 and "dbg" not in g.nodes
        await user.write(4096, b"\2" * 4096)
        assert bytes(await f0.read(4096, 4096)) == b"\2" * 4096
        with pytest.raises(QMPError, match="Node 'r' is not a filter"):
            await g.remove_filter(raw)
        user.close()
        await g.close_all()

    asyncio.run(body())


def test_replace_node_conflict_changes_nothing(tmp_path):
    """A move refused for permissions leaves every link, perm and lock as it was."""
    async def body() -> None:
        g, f0, raw, user = await _chain(tmp_path)
        f1 = await g.open_node({"driver": "file", "node-name": "f1",
                                "filename": str(tmp_path / "i" / "b.raw")})
        # A second user on f1 that lets nobody write: the raw node's writer cannot come.
        guard = Backend(g, f1, "an unnamed block device", Perm.CONSISTENT_READ,
                        Perm.CONSISTENT_READ)
        before = _snapshot(g)
        with pytest.raises(QMPError, match="Permission conflict on node 'f1': permissions "
                           "'write' are both required by node 'r'"):
            await g.replace_node(f0, f1)
        assert _snapshot(g) == before and raw.file is f0
        guard.close()
        await g.replace_node(f0, f1)
        assert raw.file is f1 and not f0.parents
        user.close()
        await g.close_all()

    asyncio.run(body())


def test_replace_node_refuses_a_driver_that_holds_its_child(tmp_path):
    """vmdk keeps its extents' files itself: blockd says so rather than move the link."""
    async def body() -> None:
        img = str(tmp_path / "a.vmdk")
        subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", img, "1M"], check=True)
        g = BlockGraph()
        f = await g.open_node({"driver": "file", "node-name": "vf", "filename": img})
        v = await g.open_node({"driver": "vmdk", "node-name": "v", "file": "vf"})
        before = _snapshot(g)
        with pytest.raises(QMPError, match="blockd cannot change the 'file' child of "
                           "'vmdk' node 'v'"):
            await g.insert_filter({"driver": "blkdebug", "node-name": "dbg"}, below=f)
        assert _snapshot(g) == before and "dbg" not in g.nodes and v.file is f
        await g.close_all()

    asyncio.run(body())


def test_reopen_looks_through_an_unnamed_filter_and_keeps_it(tmp_path):
    """A job's filter has no name: a reopen naming the node below it changes nothing,
    one naming another node is refused with QEMU's words."""
    from blockd.block.reopen import reopen

    async def body() -> None:
        g, f0, raw, user = await _chain(tmp_path)
        f1 = await g.open_node({"driver": "file", "node-name": "f1",
                                "filename": str(tmp_path / "i" / "b.raw")})
        top = await g.insert_filter({"driver": "blkdebug"}, below=f0)
        await reopen(g, [{"driver": "raw", "node-name": "r", "file": "f0"}])
        assert raw.file is top
        before = _snapshot(g)
        with pytest.raises(QMPError, match="^Cannot replace implicit file child of r$"):
            await reopen(g, [{"driver": "raw", "node-name": "r", "file": "f1"}])
        assert _snapshot(g) == before
        await g.remove_filter(top)
        await reopen(g, [{"driver": "raw", "node-name": "r", "file": "f1"}])
        assert raw.file is f1 and user.node is raw
        user.close()
        await g.close_all()

    asyncio.run(body())


def test_insert_filter_refuses_a_non_filter(tmp_path):
    async def body() -> None:
        g, f0, raw, user = await _chain(tmp_path)
        with pytest.raises(QMPError, match="'raw' is not a filter driver"):
            await g.insert_filter({"driver": "raw", "node-name": "x"}, below=f0)
        assert "x" not in g.nodes
        user.close()
        await g.close_all()

    asyncio.run(body())
