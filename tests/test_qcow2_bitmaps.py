"""Persistent bitmaps in qcow2 files, exchanged both ways with qemu-storage-daemon."""

from __future__ import annotations

import json
import subprocess

import pytest

from harness import HAVE_QSD, WAIT, Daemon

pytestmark = pytest.mark.skipif(not HAVE_QSD, reason="qemu-storage-daemon not installed")


def _write_session(tmp_path, img: str, qsd: bool) -> str:
    nbd = str(tmp_path / "nbd.sock")
    with Daemon(str(tmp_path / "qmp.sock"),
                "--blockdev", f"driver=qcow2,node-name=q0,file.driver=file,file.filename={img}",
                "--nbd-server", f"addr.type=unix,addr.path={nbd}", qsd=qsd) as d:
        c = d.client()
        assert c.cmd("block-dirty-bitmap-add", node="q0", name="p1", persistent=True) == {"return": {}}
        c.cmd("block-dirty-bitmap-add", node="q0", name="p2", persistent=True, disabled=True,
              granularity=65536)
        c.cmd("block-dirty-bitmap-add", node="q0", name="tmp")
        c.cmd("block-export-add", type="nbd", id="e", **{"node-name": "q0"}, writable=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 100k", "-c", "write 7M 1M",
                        f"nbd+unix:///q0?socket={nbd}"], check=True, capture_output=True)
        sha = c.cmd("x-debug-block-dirty-bitmap-sha256", node="q0", name="p1")["return"]["sha256"]
        c.cmd("block-export-del", id="e")
        c.cmd("quit")
        d.proc.wait(WAIT)
    return sha


def _read_session(tmp_path, img: str, qsd: bool) -> tuple[str, list]:
    with Daemon(str(tmp_path / "qmp2.sock"),
                "--blockdev", f"driver=qcow2,node-name=q0,file.driver=file,file.filename={img}",
                qsd=qsd) as d:
        c = d.client()
        sha = c.cmd("x-debug-block-dirty-bitmap-sha256", node="q0", name="p1")["return"]["sha256"]
        node = [n for n in c.cmd("query-named-block-nodes")["return"] if n["node-name"] == "q0"][0]
        return sha, node["dirty-bitmaps"]


@pytest.mark.parametrize("writer,reader", [("blockd", "qsd"), ("qsd", "blockd"), ("blockd", "blockd")])
def test_bitmaps_survive_restarts_across_implementations(tmp_path, writer, reader):
    img = str(tmp_path / "b.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "32M"], check=True)
    sha = _write_session(tmp_path, img, writer == "qsd")
    check = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", img],
                                     capture_output=True, text=True).stdout)
    stored = info["format-specific"]["data"]["bitmaps"]
    assert [b["name"] for b in stored] == ["p2", "p1"]
    assert {b["name"]: b["flags"] for b in stored} == {"p1": ["auto"], "p2": []}
    got, bitmaps = _read_session(tmp_path, img, reader == "qsd")
    assert got == sha
    assert [(b["name"], b["recording"], b["persistent"]) for b in bitmaps] == \
        [("p1", True, True), ("p2", False, True)]


def test_remove_persistent_bitmap_drops_it_from_the_file(tmp_path):
    img = str(tmp_path / "r.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"], check=True)
    with Daemon(str(tmp_path / "qmp.sock"),
                "--blockdev", f"driver=qcow2,node-name=q0,file.driver=file,file.filename={img}") as d:
        c = d.client()
        c.cmd("block-dirty-bitmap-add", node="q0", name="a", persistent=True)
        c.cmd("block-dirty-bitmap-add", node="q0", name="b", persistent=True)
        c.cmd("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "q0",
                                           "file": c.cmd("query-named-block-nodes")["return"][1]["node-name"],
                                           "read-only": True}])
        c.cmd("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "q0",
                                           "file": c.cmd("query-named-block-nodes")["return"][1]["node-name"],
                                           "read-only": False}])
        assert c.cmd("block-dirty-bitmap-remove", node="q0", name="a") == {"return": {}}
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", img],
                                     capture_output=True, text=True).stdout)
    assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == ["b"]
    assert subprocess.run(["qemu-img", "check", img], capture_output=True).returncode == 0


def test_qemu_img_bitmaps_load_with_flags_and_counts(tmp_path):
    img = str(tmp_path / "q.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "128k", img, "on"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "--disable", img, "off"], check=True)
    with Daemon(str(tmp_path / "qmp.sock"),
                "--blockdev", f"driver=qcow2,node-name=q0,file.driver=file,file.filename={img}") as d:
        node = d.client().cmd("query-named-block-nodes")["return"][0]
        assert [(b["name"], b["recording"], b["granularity"], b["count"])
                for b in node["dirty-bitmaps"]] == [("off", False, 65536, 0), ("on", True, 131072, 0)]
        flags = {b["name"]: b["flags"] for b in node["image"]["format-specific"]["data"]["bitmaps"]}
        assert flags == {"on": ["in-use", "auto"], "off": ["in-use"]}


def test_killed_daemon_leaves_bitmaps_inconsistent(tmp_path):
    img = str(tmp_path / "k.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", img, "b"], check=True)
    args = ("--blockdev", f"driver=qcow2,node-name=q0,file.driver=file,file.filename={img}")
    d = Daemon(str(tmp_path / "qmp.sock"), *args)
    d.client().cmd("query-version")
    d.proc.kill()
    d.proc.wait()
    d.stop()
    for qsd in (True, False):  # QEMU agrees; then blockd removes it
        with Daemon(str(tmp_path / f"qmp{qsd}.sock"), *args, qsd=qsd) as d2:
            c = d2.client()
            bitmaps = c.cmd("query-named-block-nodes")["return"][0]["dirty-bitmaps"]
            assert bitmaps[0]["name"] == "b" and bitmaps[0].get("inconsistent") is True
            reply = c.cmd("block-dirty-bitmap-clear", node="q0", name="b")
            assert reply["error"]["desc"].startswith("Bitmap 'b' is inconsistent")
    with Daemon(str(tmp_path / "qmp-last.sock"), *args) as d3:
        assert d3.client().cmd("block-dirty-bitmap-remove", node="q0", name="b") == {"return": {}}
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", img],
                                     capture_output=True, text=True).stdout)
    assert "bitmaps" not in info["format-specific"]["data"]
    assert subprocess.run(["qemu-img", "check", img], capture_output=True).returncode == 0


def test_qemu_img_map_reads_dirty_extents_over_nbd(tmp_path):
    img = str(tmp_path / "m.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", img, "4M"], check=True)
    nbd = str(tmp_path / "nbd.sock")
    with Daemon(str(tmp_path / "qmp.sock"),
                "--blockdev", f"driver=file,node-name=f0,filename={img}",
                "--nbd-server", f"addr.type=unix,addr.path={nbd}") as d:
        c = d.client()
        c.cmd("block-dirty-bitmap-add", node="f0", name="inc", granularity=65536)
        c.cmd("block-export-add", type="nbd", id="w", **{"node-name": "f0", "name": "w"},
              writable=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write 1M 4k", f"nbd+unix:///w?socket={nbd}"],
                       check=True, capture_output=True)
        c.cmd("block-dirty-bitmap-disable", node="f0", name="inc")
        assert c.cmd("block-export-add", type="nbd", id="r", **{"node-name": "f0", "name": "r"},
                     bitmaps=["inc"]) == {"return": {}}
        out = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts",
                              f"driver=nbd,server.type=unix,server.path={nbd},export=r,"
                              "x-dirty-bitmap=qemu:dirty-bitmap:inc"],
                             capture_output=True, text=True)
        entries = json.loads(out.stdout)
        # With x-dirty-bitmap, qemu-img reports dirty areas as "data": false.
        dirty = [e for e in entries if not e["data"]]
        assert [(e["start"], e["length"]) for e in dirty] == [(1 << 20, 65536)]


def test_bitmap_added_read_only_is_stored_once_writable(tmp_path):
    img = str(tmp_path / "ro.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"], check=True)
    with Daemon(str(tmp_path / "qmp.sock"), "--blockdev",
                f"driver=file,node-name=f0,filename={img},read-only=on",
                "--blockdev", "driver=qcow2,node-name=q0,file=f0,read-only=on") as d:
        c = d.client()
        assert c.cmd("block-dirty-bitmap-add", node="q0", name="p", persistent=True) == {"return": {}}
        assert c.cmd("blockdev-reopen", options=[
            {"driver": "file", "node-name": "f0", "filename": img, "read-only": False},
            {"driver": "qcow2", "node-name": "q0", "file": "f0", "read-only": False}]) == {"return": {}}
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", img],
                                     capture_output=True, text=True).stdout)
    assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == ["p"]
