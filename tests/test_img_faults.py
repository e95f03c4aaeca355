"""blockd-img against failing storage (blkdebug): the same messages, warnings, exit codes
and resulting images as qemu-img, including what ``--salvage`` copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import blockd_img, qemu_img, qemu_io_ok, same


def _failing(path: Path, iotype: str, **rule: object) -> str:
    """A json: name of ``path`` read as raw through blkdebug failing every ``iotype``
    request from the open on (the ``none`` event is raised as blkdebug opens)."""
    inject = {"event": "none", "iotype": iotype, "errno": 5, "immediately": True, **rule}
    return "json:" + json.dumps({"driver": "raw", "file": {
        "driver": "blkdebug", "inject-error": [inject],
        "image": {"driver": "file", "filename": str(path)}}})


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "1M")
    qemu_io_ok("qcow2", path, "write -P 3 0 64k", "write -P 4 200k 8k")
    return path


@pytest.mark.parametrize("iotype", ["read", "block-status"])
@pytest.mark.parametrize("salvage", [[], ["--salvage"]])
@pytest.mark.parametrize("compress", [[], ["-c"]])
def test_convert_of_failing_source(tmp_path, src, iotype, salvage, compress):
    """Each tool writes its own copy: same messages, then the same image content."""
    name = _failing(src, iotype)
    fmt = "qcow2" if compress else "raw"
    q = qemu_img("convert", *salvage, *compress, "-O", fmt, name, "q.out", cwd=tmp_path)
    b = blockd_img("convert", *salvage, *compress, "-O", fmt, name, "b.out", cwd=tmp_path)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode)
    if q.returncode == 0:
        assert qemu_img("compare", str(tmp_path / "q.out"),
                        str(tmp_path / "b.out")).returncode == 0
        assert qemu_img("check", "-q", str(tmp_path / "b.out")).returncode in (0, 63)


@pytest.mark.parametrize("output", ["json", "human"])
@pytest.mark.parametrize("rule", [{}, {"sector": 300}])
def test_map_of_failing_source(tmp_path, src, output, rule):
    out, err, code = same(tmp_path, "map", f"--output={output}",
                          _failing(src, "block-status", **rule))
    assert code == 1 and "Could not read file metadata: Input/output error" in err


def test_none_event_arms_rules_in_the_daemon_too(tmp_path, src):
    """qemu-io through an export of a node whose rule names the ``none`` event fails at
    once, in blockd as in qemu-storage-daemon."""
    import subprocess

    from harness import HAVE_QSD, Daemon

    outs = []
    for qsd in ([False, True] if HAVE_QSD else [False]):
        nbd = tmp_path / f"n{int(qsd)}.sock"
        with Daemon(str(tmp_path / f"d{int(qsd)}.sock"), qsd=qsd) as daemon:
            c = daemon.client()
            assert c.cmd("blockdev-add", **{"node-name": "r"}, **json.loads(
                _failing(src, "read")[5:])) == {"return": {}}
            c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}})
            c.cmd("block-export-add", type="nbd", id="e", **{"node-name": "r"})
            r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k",
                                f"nbd+unix:///r?socket={nbd}"], capture_output=True,
                               text=True, timeout=120)
            outs.append(r.stdout + r.stderr)
    assert "read failed: Input/output error" in outs[0]
    assert len(set(outs)) == 1
