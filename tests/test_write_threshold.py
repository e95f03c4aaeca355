"""block-set-write-threshold and BLOCK_WRITE_THRESHOLD, the same QMP lines and writes
against blockd and qemu-storage-daemon."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from harness import HAVE_QSD, Daemon

MiB = 1 << 20


def _session(d: Path, qsd: bool) -> list[Any]:
    """Replies, query results and events (timestamps dropped) in the order they came."""
    image = d / "a.raw"
    image.write_bytes(bytes(4 * MiB))
    nbd = d / f"n{int(qsd)}.sock"
    out: list[Any] = []
    with Daemon(str(d / f"q{int(qsd)}.sock"), qsd=qsd) as daemon:
        c = daemon.client()

        def cmd(name: str, **args: Any) -> None:
            out.append(c.cmd(name, **args))

        def thresholds() -> None:
            nodes = c.cmd("query-named-block-nodes", flat=True)["return"]
            out.append(sorted((n["node-name"], n["write_threshold"]) for n in nodes))

        def write(*cmds: str) -> None:
            args = ["qemu-io", "-f", "raw"]
            for one in cmds:
                args += ["-c", one]
            done = subprocess.run(args + [f"nbd+unix:///r?socket={nbd}"], capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout
            out.append([{k: v for k, v in e.items() if k != "timestamp"}
                        for e in c.events(0.5) if "event" in e])

        cmd("blockdev-add", driver="file", filename=str(image), **{"node-name": "f"})
        cmd("blockdev-add", driver="raw", file="f", **{"node-name": "r"})
        cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}})
        cmd("block-export-add", type="nbd", id="e", **{"node-name": "r"}, writable=True)
        cmd("block-set-write-threshold", **{"node-name": "nosuch", "write-threshold": 1})
        cmd("block-set-write-threshold", **{"node-name": "r", "write-threshold": MiB})
        cmd("block-set-write-threshold", **{"node-name": "f", "write-threshold": 2 * MiB})
        thresholds()
        write("write 0 64k", "write -z 512k 64k")          # below both: nothing
        write("write 1020k 8k")                            # past r's: one event, r clears
        thresholds()
        write("write 1M 64k", "write 2044k 16k", "write 3M 4k")  # past f's, once only
        thresholds()
        cmd("block-set-write-threshold", **{"node-name": "r", "write-threshold": 3 * MiB})
        cmd("block-set-write-threshold", **{"node-name": "r", "write-threshold": 0})
        write("discard 3M 1M")                             # disarmed: nothing
        thresholds()
    return out


def test_write_threshold_like_qsd(tmp_path):
    blockd = _session(tmp_path, False)
    assert blockd[4] == {"error": {"class": "GenericError", "desc": "Device 'nosuch' not found"}}
    assert blockd[7] == [("f", 2 * MiB), ("r", MiB)]
    assert blockd[8] == []
    assert blockd[9] == [{"event": "BLOCK_WRITE_THRESHOLD",
                          "data": {"node-name": "r", "amount-exceeded": 4096,
                                   "write-threshold": MiB}}]
    assert [e["data"]["node-name"] for e in blockd[11]] == ["f"]
    assert blockd[-1] == [("f", 0), ("r", 0)]
    if HAVE_QSD:
        assert _session(tmp_path, True) == blockd
