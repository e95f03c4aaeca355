"""change-backing-file: the same session against blockd and qemu-storage-daemon, replies,
the nodes afterwards and the image headers compared."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from harness import HAVE_QSD, Daemon, qemu_img, qemu_img_ok


def _chain(d: Path) -> None:
    qemu_img_ok("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "1M")
    for name, back in (("mid", "base"), ("top", "mid")):
        qemu_img_ok("create", "-q", "-f", "qcow2", "-b", f"{back}.qcow2", "-F", "qcow2",
                    str(d / f"{name}.qcow2"))
    qemu_img_ok("create", "-q", "-f", "qcow2", str(d / "lbase.qcow2"), "1M")
    qemu_img_ok("create", "-q", "-f", "qcow2", "-b", "lbase.qcow2", "-F", "qcow2",
                str(d / "lone.qcow2"))


def _session(d: Path, qsd: bool) -> list[Any]:
    _chain(d)
    out: list[Any] = []
    with Daemon(str(d / f"s{int(qsd)}.sock"), qsd=qsd) as daemon:
        c = daemon.client()
        c.cmd("blockdev-add", driver="qcow2", **{"node-name": "top"},
              file={"driver": "file", "filename": str(d / "top.qcow2")})
        c.cmd("blockdev-add", driver="qcow2", **{"node-name": "lone"},
              file={"driver": "file", "filename": str(d / "lone.qcow2")})
        nodes = c.cmd("query-named-block-nodes")["return"]
        by_file = {n["image"]["filename"].rsplit("/", 1)[-1]: n["node-name"]
                   for n in nodes if n["drv"] == "qcow2"}
        mid, base = by_file["mid.qcow2"], by_file["base.qcow2"]

        def change(device: str, image: str, name: str) -> None:
            out.append(c.cmd("change-backing-file", device=device,
                             **{"image-node-name": image, "backing-file": name}))

        change("nosuch", mid, "x")
        change(mid, mid, "x")                 # not a root
        change("top", "nosuch", "x")
        change("top", base, "x")              # no backing file
        change("top", "lone", "x")            # another chain
        change("top", mid, "new-base.qcow2")  # read-only backing image: reopened for it
        change("top", "top", "new-mid.qcow2")
        nodes = c.cmd("query-named-block-nodes")["return"]
        out.append(sorted(((n["node-name"] if not n["node-name"].startswith("#") else "#",
                            n["ro"], n["image"].get("backing-filename"),
                            n["image"].get("backing-filename-format"), n.get("backing_file"))
                           for n in nodes if n["drv"] == "qcow2"), key=repr))
    for name in ("mid", "top"):
        info = json.loads(qemu_img("info", "-U", "--output=json", str(d / f"{name}.qcow2")).stdout)
        out.append((info.get("backing-filename"), info.get("backing-filename-format")))
    return json.loads(re.sub(r"#block\d+", "#block", json.dumps(out).replace(str(d), "TMP")))


def test_change_backing_file_like_qsd(tmp_path):
    (tmp_path / "b").mkdir()
    blockd = _session(tmp_path / "b", False)
    assert blockd[0]["error"]["desc"] == "Cannot find device='nosuch' nor node-name='nosuch'"
    assert blockd[1]["error"]["desc"] == "Need a root block node"
    assert blockd[3]["error"]["desc"] == \
        "not allowing backing file change on an image without a backing file"
    assert blockd[4]["error"]["desc"] == "'top' and image file are not in the same chain"
    assert blockd[5:7] == [{"return": {}}, {"return": {}}]
    assert blockd[-2:] == [["new-base.qcow2", "qcow2"], ["new-mid.qcow2", "qcow2"]]
    if HAVE_QSD:
        (tmp_path / "q").mkdir()
        assert _session(tmp_path / "q", True) == blockd
