"""quorum and blkverify: the same QMP lines against blockd and qemu-storage-daemon, with
data read and written through an NBD export by qemu-io, and the events compared."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from harness import HAVE_QSD, Daemon, blockd_img, qemu_img

KIB = 1024
SIZE = 1 << 20
DAEMONS = [False, True] if HAVE_QSD else [False]


def _child(d: Path, name: str) -> dict[str, Any]:
    """A named raw child over a file (names make events comparable)."""
    return {"driver": "raw", "node-name": name,
            "file": {"driver": "file", "filename": str(d / f"{name}.raw")}}


def _images(d: Path, *names: str, pattern: int = 0x11) -> None:
    for name in names:
        (d / f"{name}.raw").write_bytes(bytes([pattern]) * SIZE)


def _qemu_io(sock: Path, *cmds: str, export: str = "q0") -> subprocess.CompletedProcess:
    args = ["qemu-io", "-f", "raw"]
    for cmd in cmds:
        args += ["-c", cmd]
    return subprocess.run(args + [f"nbd+unix:///{export}?socket={sock}"],
                          capture_output=True, text=True, timeout=120)


def _events(c: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "timestamp"} for e in c.events(1.0)
            if "event" in e]


def _session(d: Path, qsd: bool, quorum: dict[str, Any],
             io: list[str]) -> tuple[list[Any], list[dict[str, Any]], str]:
    """Add ``quorum`` as node q0, export it, run qemu-io's commands: replies, events,
    qemu-io's output."""
    sock = d / ("q.sock" if qsd else "b.sock")
    nbd = d / ("qn.sock" if qsd else "bn.sock")
    with Daemon(str(sock), qsd=qsd) as daemon:
        c = daemon.client()
        replies = [c.cmd("blockdev-add", **{"node-name": "q0"}, **quorum)]
        replies.append(c.cmd("nbd-server-start",
                             addr={"type": "unix", "data": {"path": str(nbd)}}))
        replies.append(c.cmd("block-export-add", type="nbd", id="e0",
                             **{"node-name": "q0"}, writable=True))
        out = _qemu_io(nbd, *io)
        events = _events(c)
    text = re.sub(r".* ops; .*\n", "", out.stdout + out.stderr)  # timings differ
    return replies, events, text


def _both(d: Path, setup: Any, quorum: dict[str, Any],
          io: list[str]) -> tuple[list[Any], list[dict[str, Any]], str, dict[str, bytes]]:
    """Run the session on each daemon from the same starting files; blockd's results,
    after asserting qsd's are the same (files included)."""
    results = []
    for qsd in DAEMONS:
        setup(d)
        replies, events, text = _session(d, qsd, quorum, io)
        files = {p.name: p.read_bytes() for p in sorted(d.glob("*.raw"))}
        results.append((replies, events, text, files))
    for other in results[1:]:
        assert other[:3] == results[0][:3]
        assert other[3] == results[0][3]
    return results[0]


def test_vote_outvotes_a_corrupt_replica_and_reports_it(tmp_path):
    def setup(d: Path) -> None:
        _images(d, "a", "b", "c")
        with open(d / "b.raw", "r+b") as f:
            f.seek(8 * KIB)
            f.write(b"\x99" * 4 * KIB)

    quorum = {"driver": "quorum", "vote-threshold": 2,
              "children": [_child(tmp_path, n) for n in "abc"]}
    replies, events, text, _ = _both(tmp_path, setup, quorum,
                                     ["read -P 0x11 0 64k", "read -P 0x11 1020k 4k"])
    assert replies == [{"return": {}}] * 3
    assert "Pattern verification failed" not in text and "read 65536/65536" in text
    assert events == [{"event": "QUORUM_REPORT_BAD",
                       "data": {"type": "read", "node-name": "b", "sector-num": 0,
                                "sectors-count": 128}}]


def test_rewrite_corrupted_repairs_the_replica(tmp_path):
    def setup(d: Path) -> None:
        _images(d, "a", "b", "c")
        with open(d / "c.raw", "r+b") as f:
            f.write(b"\x55" * 512)

    quorum = {"driver": "quorum", "vote-threshold": 2, "rewrite-corrupted": True,
              "children": [_child(tmp_path, n) for n in "abc"]}
    _, events, text, files = _both(tmp_path, setup, quorum, ["read -P 0x11 0 4k"])
    assert files["c.raw"] == files["a.raw"] == bytes([0x11]) * SIZE
    assert [e["data"]["node-name"] for e in events] == ["c"]


def test_no_quorum_fails_the_read(tmp_path):
    def setup(d: Path) -> None:
        for i, name in enumerate("abc"):
            (d / f"{name}.raw").write_bytes(bytes([i + 1]) * SIZE)

    quorum = {"driver": "quorum", "vote-threshold": 2,
              "children": [_child(tmp_path, n) for n in "abc"]}
    _, events, text, _ = _both(tmp_path, setup, quorum, ["read 4k 4k"])
    assert "Input/output error" in text
    assert events == [{"event": "QUORUM_FAILURE",
                       "data": {"reference": "q0", "sector-num": 8, "sectors-count": 8}}]


def _failing(d: Path, name: str, iotype: str) -> dict[str, Any]:
    """A raw child whose file fails every request of ``iotype`` with EIO (blkdebug) from
    the first one on (flushes are left alone: QEMU skips flushing a node nothing was
    written to, so when they fail differs between the daemons)."""
    return {"driver": "raw", "node-name": name,
            "file": {"driver": "blkdebug", "inject-error": [{"event": f"{iotype}_aio",
                                                             "iotype": iotype, "errno": 5}],
                     "image": {"driver": "file", "filename": str(d / f"{name}.raw")}}}


def test_failed_write_below_threshold_is_reported_not_fatal(tmp_path):
    quorum = {"driver": "quorum", "vote-threshold": 2,
              "children": [_child(tmp_path, "a"), _failing(tmp_path, "b", "write"),
                           _child(tmp_path, "c")]}
    _, events, text, files = _both(tmp_path, lambda d: _images(d, "a", "b", "c"), quorum,
                                   ["write -P 0x22 64k 4k"])
    assert "wrote 4096/4096" in text
    assert files["a.raw"][64 * KIB:68 * KIB] == b"\x22" * 4 * KIB
    assert files["b.raw"] == bytes([0x11]) * SIZE
    assert events == [{"event": "QUORUM_REPORT_BAD",
                       "data": {"type": "write", "error": "Input/output error",
                                "node-name": "b", "sector-num": 128, "sectors-count": 8}}]


def test_failed_writes_above_threshold_fail_the_request(tmp_path):
    quorum = {"driver": "quorum", "vote-threshold": 2,
              "children": [_failing(tmp_path, "a", "write"), _failing(tmp_path, "b", "write"),
                           _child(tmp_path, "c")]}
    _, events, text, _ = _both(tmp_path, lambda d: _images(d, "a", "b", "c"), quorum,
                               ["write -P 0x22 0 4k"])
    assert "Input/output error" in text
    assert [e["event"] for e in events] == ["QUORUM_REPORT_BAD", "QUORUM_REPORT_BAD",
                                           "QUORUM_FAILURE"]


def test_fifo_reads_the_next_child_after_a_failure(tmp_path):
    def setup(d: Path) -> None:
        _images(d, "a")
        _images(d, "b", pattern=0x33)

    quorum = {"driver": "quorum", "vote-threshold": 1, "read-pattern": "fifo",
              "children": [_failing(tmp_path, "a", "read"), _child(tmp_path, "b")]}
    _, events, text, _ = _both(tmp_path, setup, quorum, ["read -P 0x33 0 4k"])
    assert "read 4096/4096" in text and "verification failed" not in text
    assert events == [{"event": "QUORUM_REPORT_BAD",
                       "data": {"type": "read", "error": "Input/output error",
                                "node-name": "a", "sector-num": 0, "sectors-count": 8}}]


def test_blockdev_change_and_refusals_match_qsd(tmp_path):
    """The same session on both daemons gives the same replies: every open-time refusal,
    x-blockdev-change adding and removing replicas, and what nodes remain."""
    _images(tmp_path, "a", "b", "c", "d")
    (tmp_path / "big.raw").write_bytes(bytes(2 * SIZE))
    ch = [_child(tmp_path, n) for n in "abc"]
    lines = [
        ("blockdev-add", {"driver": "quorum", "node-name": "q0", "vote-threshold": 2,
                          "children": []}),
        ("blockdev-add", {"driver": "quorum", "node-name": "q0", "vote-threshold": 0,
                          "children": ch[:1]}),
        ("blockdev-add", {"driver": "quorum", "node-name": "q0", "vote-threshold": 2,
                          "children": ch[:1]}),
        ("blockdev-add", {"driver": "quorum", "node-name": "q0", "vote-threshold": 2,
                          "blkverify": True, "children": ch}),
        ("blockdev-add", {"driver": "quorum", "node-name": "q0", "vote-threshold": 2,
                          "blkverify": True, "rewrite-corrupted": True, "children": ch[:2]}),
        ("blockdev-add", {"driver": "quorum", "node-name": "q0", "vote-threshold": 1,
                          "children": [ch[0], {"driver": "file",
                                               "filename": str(tmp_path / "big.raw")}]}),
        ("blockdev-add", {"driver": "quorum", "node-name": "q0", "vote-threshold": 2,
                          "children": ch}),
        ("x-blockdev-change", {"parent": "q0"}),
        ("x-blockdev-change", {"parent": "q0", "child": "children.1", "node": "x"}),
        ("x-blockdev-change", {"parent": "nosuch", "child": "children.1"}),
        ("x-blockdev-change", {"parent": "q0", "child": "children.7"}),
        ("blockdev-add", {"driver": "raw", "node-name": "d", "file": {
            "driver": "file", "filename": str(tmp_path / "d.raw")}}),
        ("x-blockdev-change", {"parent": "q0", "node": "nosuch"}),
        ("x-blockdev-change", {"parent": "d", "node": "q0"}),
        ("x-blockdev-change", {"parent": "q0", "node": "q0"}),
        ("x-blockdev-change", {"parent": "q0", "child": "children.0"}),
        ("x-blockdev-change", {"parent": "q0", "node": "d"}),
        ("x-blockdev-change", {"parent": "q0", "node": "b"}),
        ("x-blockdev-change", {"parent": "q0", "child": "children.3"}),
        ("x-blockdev-change", {"parent": "q0", "child": "children.1"}),
        ("x-blockdev-change", {"parent": "q0", "child": "children.2"}),
        ("blockdev-reopen", {"options": [{"driver": "quorum", "node-name": "q0",
                                          "vote-threshold": 1, "children": ["d"]}]}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-del", {"node-name": "q0"}),
        ("query-named-block-nodes", {"flat": True}),
    ]
    transcripts = []
    for qsd in DAEMONS:
        with Daemon(str(tmp_path / f"s{int(qsd)}.sock"), qsd=qsd) as daemon:
            c = daemon.client()
            got = [c.cmd(name, **args) for name, args in lines]
        text = re.sub(r"#block\d+", "#block", json.dumps(got, indent=1))
        transcripts.append(json.loads(text))
    for other in transcripts[1:]:
        assert other == transcripts[0]
    got = transcripts[0]
    assert got[6] == {"return": {}}
    assert got[14]["error"]["desc"] == \
        "Making 'q0' a children.3 child of 'q0' would create a cycle"
    assert got[16:18] == [{"return": {}}, {"error": {
        "class": "GenericError", "desc": "The node b already has a parent"}}]
    names = [n["node-name"] for n in got[-1]["return"]]
    assert "q0" not in names and "d" in names


def test_blkverify_reads_both_and_refuses_a_mismatch(tmp_path):
    """Equal copies read through; a difference fails the read with EIO and says where
    on stderr (QEMU exits there; blockd keeps serving)."""
    _images(tmp_path, "ref", "img")
    with open(tmp_path / "img.raw", "r+b") as f:
        f.seek(5000)
        f.write(b"\x01")
    nbd = tmp_path / "n.sock"
    with Daemon(str(tmp_path / "b.sock")) as daemon:
        c = daemon.client()
        assert c.cmd("blockdev-add", driver="blkverify", **{"node-name": "q0"},
                     test=_child(tmp_path, "img"),
                     raw={"driver": "file", "filename": str(tmp_path / "ref.raw")}) == \
            {"return": {}}
        c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}})
        c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, writable=True)
        good = _qemu_io(nbd, "read -P 0x11 0 4k", "write -P 0x44 64k 4k",
                        "read -P 0x44 64k 4k")
        assert "verification failed" not in good.stdout and good.stdout.count("4096/4096") == 3
        bad = _qemu_io(nbd, "read 4k 4k")
        assert "Input/output error" in bad.stdout + bad.stderr
        assert c.cmd("query-version")["return"]
        assert daemon.stop() == 0
    assert (tmp_path / "ref.raw").read_bytes()[64 * KIB:68 * KIB] == b"\x44" * 4 * KIB
    assert (tmp_path / "img.raw").read_bytes()[64 * KIB:68 * KIB] == b"\x44" * 4 * KIB


def test_blkverify_filename_in_blockd_img(tmp_path):
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "img.qcow2"), "1M")
    subprocess.run(["qemu-io", "-c", "write -P 7 0 64k", str(tmp_path / "img.qcow2")],
                   check=True, capture_output=True)
    qemu_img("convert", "-O", "raw", str(tmp_path / "img.qcow2"), str(tmp_path / "ref.raw"))
    name = f"blkverify:{tmp_path}/ref.raw:{tmp_path}/img.qcow2"
    out, err, code = blockd_img("convert", "-O", "raw", name, "out.raw", cwd=tmp_path)
    assert (code, err) == (0, "")
    assert (tmp_path / "out.raw").read_bytes() == (tmp_path / "ref.raw").read_bytes()
    q = qemu_img("info", name, cwd=tmp_path)
    assert blockd_img("info", name, cwd=tmp_path) == (q.stdout, "", 0)
    for bad in ("blkverify:only-one", ):
        q = qemu_img("info", bad, cwd=tmp_path)
        assert blockd_img("info", bad, cwd=tmp_path) == \
            ("", q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
