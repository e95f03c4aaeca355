"""The ``nbd`` client driver against real servers, compared with QEMU's client.

Sources: qemu-nbd, qemu-storage-daemon's and blockd's own NBD exports,
nbdkit.  ``blockd-img`` and ``qemu-img`` run the same ``--image-opts``
command lines on them; the daemon's QMP replies are compared with qsd's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from harness import Daemon, Server, qemu_img, qemu_io, same

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd missing")
HAVE_NBDKIT = shutil.which("nbdkit") is not None


def make_image(path: Path) -> None:
    """4 MiB: data at the start, in the middle and in the last sector; zeroes written
    in between (allocated) and holes elsewhere."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), "4M"], check=True)
    qemu_io("raw", str(path), "write -P 0x11 0 64k", "write -P 0x22 1M 96k", "write -z 2M 64k",
            "write -P 0x33 4095k 1k")


def opts(sock: Path, export: str | None = "exp", **extra: str) -> str:
    text = f"driver=nbd,server.type=unix,server.path={sock}"
    if export is not None:
        text += f",export={export}"
    return text + "".join(f",{k}={v}" for k, v in extra.items())


def uri(sock: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def daemon_args(image: Path, sock: Path, *, writable: bool = False) -> list[str]:
    return ["--blockdev", f"driver=file,node-name=f0,filename={image}",
            "--blockdev", "driver=raw,node-name=r0,file=f0",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", f"type=nbd,id=e0,node-name=r0,name=exp,writable={'on' if writable else 'off'}"]


def wait_for(path: Path) -> None:
    """Wait (generously) until a daemon's NBD socket exists."""
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(kind: str, image: Path, sock: Path, tmp: Path) -> Iterator[str]:
    """Serve ``image`` as ``kind``; yields the ``--image-opts`` that open it."""
    if kind == "qemu-nbd":
        with Server(str(sock), "qemu-nbd", "-t", "-e", "8", "-f", "raw", "-k", str(sock),
                    "-x", "exp", str(image)):
            yield opts(sock)
    elif kind == "qemu-nbd-tcp":
        port, pidfile = str(free_port()), tmp / "qemu-nbd.pid"
        with Server(str(pidfile), "qemu-nbd", "-t", "-e", "8", "-f", "raw", "-b", "127.0.0.1",
                    "-p", port, "--pid-file", str(pidfile), "-x", "exp", str(image)):
            yield f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=exp"
    elif kind in ("qsd", "blockd"):
        with Daemon(str(tmp / f"{kind}.qmp"), *daemon_args(image, sock), qsd=kind == "qsd"):
            wait_for(sock)
            yield opts(sock)
    elif kind == "nbdkit-file":
        with Server(str(sock), "nbdkit", "-f", "-U", str(sock), "file", f"file={image}"):
            yield opts(sock, None)
    else:  # nbdkit-memory, filled with the image's bytes through the client
        with Server(str(sock), "nbdkit", "-f", "-U", str(sock), "memory", "4M"):
            out = subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                                  str(image), f"nbd+unix://?socket={sock}"],
                                 capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            yield opts(sock, None)


SOURCES = ["qemu-nbd", "qemu-nbd-tcp", "qsd", "blockd"] + (["nbdkit-file", "nbdkit-memory"] if HAVE_NBDKIT else [])


@pytest.mark.parametrize("kind", SOURCES)
def test_img_commands_match_qemu_img(kind, tmp_path):
    image = tmp_path / "a.raw"
    make_image(image)
    sock = tmp_path / "nbd.sock"
    with serve(kind, image, sock, tmp_path) as o:
        for cmd in (["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"],
                    ["compare", "--image-opts", o, f"driver=file,filename={image}"]):
            args = [*cmd, "--image-opts", o] if cmd[0] != "compare" else cmd
            same(tmp_path, *args)
        for fmt in ("raw", "qcow2"):
            ours, theirs = tmp_path / f"b.{fmt}", tmp_path / f"q.{fmt}"
            same(tmp_path, "convert", "-O", fmt, "--image-opts", o, str(ours))
            assert qemu_img("convert", "-O", fmt, "--image-opts", o, str(theirs)).returncode == 0
            assert qemu_img("compare", str(ours), str(theirs)).returncode == 0
            assert qemu_img("map", "--output=json", str(ours)).stdout == \
                qemu_img("map", "--output=json", str(theirs)).stdout
            if fmt == "qcow2":
                assert qemu_img("check", str(ours)).returncode == 0


@pytest.mark.parametrize("bad", [
    opts(Path("/nonexistent/nbd.sock")),
    "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=1,export=exp",
    "driver=nbd,export=exp",
])
def test_connection_errors_match_qemu_img(bad, tmp_path):
    same(tmp_path, "info", "--image-opts", bad)


def test_handshake_errors_match_qemu_img(tmp_path):
    image = tmp_path / "a.raw"
    make_image(image)
    sock = tmp_path / "nbd.sock"
    with serve("qemu-nbd", image, sock, tmp_path):
        for bad in (opts(sock, "nosuch"), opts(sock, None),
                    opts(sock, **{"x-dirty-bitmap": "qemu:dirty-bitmap:b0"}),
                    opts(sock, **{"tls-creds": "t0"})):
            same(tmp_path, "info", "--image-opts", bad)


def test_dirty_bitmap_shows_through_map_as_qemu_does(tmp_path):
    """With ``x-dirty-bitmap`` the bitmap's context replaces base:allocation: dirty
    runs read as holes, so ``map`` draws the bitmap."""
    image = tmp_path / "a.raw"
    make_image(image)
    sock = tmp_path / "nbd.sock"
    with Daemon(str(tmp_path / "qsd.qmp"), "--blockdev", f"driver=file,node-name=f0,filename={image}",
                "--blockdev", "driver=raw,node-name=r0,file=f0", qsd=True) as qsd:
        c = qsd.client()
        assert c.cmd("block-dirty-bitmap-add", node="r0", name="b0", granularity=65536) == {"return": {}}
        assert c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}}) == {"return": {}}
        assert c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "r0"}, name="exp",
                     writable=True, bitmaps=["b0"]) == {"return": {}}
        assert qemu_io("raw", uri(sock, "exp"), "write -P 0x44 512k 100k", "write -P 0x55 3M 4k").returncode == 0
        o = opts(sock, **{"x-dirty-bitmap": "qemu:dirty-bitmap:b0"})
        same(tmp_path, "map", "--output=json", "--image-opts", o)
        same(tmp_path, "map", "--image-opts", o)


# ---- the daemon ---------------------------------------------------------------

def _nbd_node(sock: Path, name: str = "n0", **extra) -> dict:
    return {"driver": "nbd", "node-name": name, "server": {"type": "unix", "path": str(sock)},
            "export": "exp", **extra}


def _replies(daemon: Daemon, session: list[tuple[str, dict]]) -> list[dict]:
    c = daemon.client()
    return [c.cmd(cmd, **args) for cmd, args in session]


def test_blockdev_add_replies_match_qsd(tmp_path):
    port = str(free_port())
    image = tmp_path / "a.raw"
    make_image(image)
    sock, ro = tmp_path / "nbd.sock", tmp_path / "ro.sock"
    ov = tmp_path / "ov.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", uri(sock, "exp"),
                    "-F", "raw", str(ov), "4M"], check=True)
    # QEMU refuses inline nbd backing options when the header names a backing file
    # (it hands the name to the nbd driver too), so the inline case has none.
    bare = tmp_path / "bare.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(bare), "4M"], check=True)
    session = [
        ("blockdev-add", _nbd_node(sock)),
        ("blockdev-add", _nbd_node(sock, "n1", **{"read-only": True, "detect-zeroes": "on"})),
        ("blockdev-add", {"driver": "nbd", "node-name": "n2", "export": "exp",
                          "server": {"type": "inet", "host": "127.0.0.1", "port": "1"}}),
        ("blockdev-add", _nbd_node(sock, "n3", export="nosuch")),
        ("blockdev-add", _nbd_node(tmp_path / "nosuch.sock", "n4")),
        ("blockdev-add", _nbd_node(sock, "n5", **{"tls-creds": "s0"})),
        ("object-add", {"qom-type": "secret", "id": "s0", "data": "x"}),
        ("blockdev-add", _nbd_node(sock, "n5", **{"tls-creds": "s0"})),
        ("blockdev-add", _nbd_node(sock, "n6", **{"x-dirty-bitmap": "qemu:dirty-bitmap:b0"})),
        ("blockdev-add", _nbd_node(sock, "n7", **{"reconnect-delay": -1})),
        ("blockdev-add", {"driver": "nbd", "node-name": "n8", "export": "exp"}),
        ("blockdev-add", _nbd_node(sock, "n9", server={"type": "unix", "path": str(sock), "x": 1})),
        ("blockdev-add", {"driver": "nbd", "node-name": "n10", "export": "exp",
                          "server": {"type": "inet", "host": "127.0.0.1", "port": port, "ipv4": True}}),
        ("blockdev-add", {"driver": "nbd", "node-name": "n11",
                          "server": {"type": "inet", "host": "127.0.0.1", "port": port}}),
        # A read-only export: refused read-write, taken read-only with auto-read-only.
        ("blockdev-add", {**_nbd_node(ro), "node-name": "o0"}),
        ("blockdev-add", {**_nbd_node(ro), "node-name": "o1", "auto-read-only": True}),
        ("blockdev-add", {**_nbd_node(ro), "node-name": "o2", "read-only": True}),
        ("blockdev-reopen", {"options": [{**_nbd_node(ro), "node-name": "o2", "read-only": False}]}),
        ("blockdev-reopen", {"options": [{**_nbd_node(ro), "node-name": "o2", "export": "x",
                                          "read-only": True}]}),
        ("block-resize", {"node-name": "o2", "size": 1 << 20}),
        ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "o1"}),
        # A qcow2 overlay on an nbd node, by reference and inline.
        ("blockdev-add", {"driver": "qcow2", "node-name": "q0", "backing": "n1",
                          "file": {"driver": "file", "filename": str(ov)}}),
        ("query-named-block-nodes", {"flat": True}),
        ("query-named-block-nodes", {}),
        # Not queried: blockd lists an inline backing node and names its parent
        # (json: with the backing options) differently from QEMU.
        ("blockdev-add", {"driver": "qcow2", "node-name": "q1", "read-only": True,
                          "backing": {"driver": "nbd", "server": {"type": "unix", "path": str(sock)},
                                      "export": "exp"},
                          "file": {"driver": "file", "filename": str(bare)}}),
        ("blockdev-del", {"node-name": "q1"}),
        ("blockdev-del", {"node-name": "q0"}),
        ("blockdev-del", {"node-name": "n1"}),
        ("blockdev-del", {"node-name": "n0"}),
        ("blockdev-del", {"node-name": "n10"}),
        ("query-named-block-nodes", {}),
    ]
    with serve("qemu-nbd", image, sock, tmp_path), \
            Server(str(ro), "qemu-nbd", "-r", "-t", "-e", "8", "-f", "raw", "-k", str(ro), "-x", "exp",
                   str(image)), \
            Server(str(tmp_path / "tcp.pid"), "qemu-nbd", "-t", "-e", "8", "-f", "raw", "-b", "127.0.0.1",
                   "-p", port, "--pid-file", str(tmp_path / "tcp.pid"), str(image)):
        with Daemon(str(tmp_path / "qsd.qmp"), qsd=True) as qsd:
            theirs = _replies(qsd, session)
        with Daemon(str(tmp_path / "blockd.qmp")) as blockd:
            ours = _replies(blockd, session)
    for (cmd, args), a, b in zip(session, ours, theirs):
        assert _masked(a) == _masked(b), (cmd, args)


def _masked(reply: dict) -> dict:
    """Implicit node names are random in both daemons; blank them."""
    text = json.dumps(reply)
    import re
    return json.loads(re.sub(r'#block\d+', '#block', text))


def test_open_timeout_waits_for_the_server(tmp_path):
    image = tmp_path / "a.raw"
    make_image(image)
    sock = tmp_path / "nbd.sock"
    with Daemon(str(tmp_path / "blockd.qmp")) as d:
        c = d.client()
        c.send(json.dumps({"execute": "blockdev-add",
                           "arguments": _nbd_node(sock, **{"open-timeout": 120})}))
        with serve("qemu-nbd", image, sock, tmp_path):
            assert c.recv(timeout=120) == {"return": {}}
            nodes = c.cmd("query-named-block-nodes", flat=True)["return"]
            assert nodes[0]["image"]["virtual-size"] == 4 << 20


def test_reexported_node_reads_and_writes_reach_the_file(tmp_path):
    image = tmp_path / "a.raw"
    make_image(image)
    sock, out = tmp_path / "nbd.sock", tmp_path / "out.sock"
    with serve("qemu-nbd", image, sock, tmp_path), Daemon(str(tmp_path / "blockd.qmp")) as d:
        c = d.client()
        assert c.cmd("blockdev-add", **_nbd_node(sock)) == {"return": {}}
        assert c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(out)}}) == {"return": {}}
        assert c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "n0"},
                     writable=True) == {"return": {}}
        r = qemu_io("raw", uri(out, "n0"), "read -P 0x11 0 64k", "read -P 0x22 1M 96k",
                    "read -P 0 2M 64k", "read -P 0x33 4095k 1k",
                    "write -P 0x66 300k 200k", "write -z 1M 4k", "aio_write -P 0x77 3M 64k",
                    "aio_write -P 0x78 3200k 64k", "aio_flush", "discard 64k 64k", "flush")
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
        data = image.read_bytes()
        assert data[300 << 10:500 << 10] == b"\x66" * (200 << 10)
        assert data[1 << 20:(1 << 20) + 4096] == bytes(4096)
        assert data[3 << 20:(3 << 20) + 65536] == b"\x77" * 65536
        assert data[3200 << 10:3264 << 10] == b"\x78" * 65536
        # qemu-img on blockd's export sees what it sees on qemu-nbd's.
        assert qemu_img("map", "--output=json", "-f", "raw", uri(out, "n0")).stdout == \
            qemu_img("map", "--output=json", "-f", "raw", uri(sock, "exp")).stdout


@pytest.mark.skipif(not HAVE_NBDKIT, reason="nbdkit missing")
def test_block_size_limits_are_kept(tmp_path):
    """A server that fails every request not aligned to 4 KiB or above 64 KiB:
    the driver aligns (read-modify-write) and splits."""
    sock, out = tmp_path / "nbd.sock", tmp_path / "out.sock"
    with Server(str(sock), "nbdkit", "-f", "-U", str(sock), "--filter=blocksize-policy", "memory",
                "4M", "blocksize-minimum=4096", "blocksize-preferred=4096",
                "blocksize-maximum=65536", "blocksize-error-policy=error"), \
            Daemon(str(tmp_path / "blockd.qmp")) as d:
        c = d.client()
        node = _nbd_node(sock, export="")
        assert c.cmd("blockdev-add", **node) == {"return": {}}
        assert c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(out)}}) == {"return": {}}
        assert c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "n0"},
                     writable=True) == {"return": {}}
        r = qemu_io("raw", uri(out, "n0"), "write -P 0x11 0 1M", "write -P 0x22 1000 3000",
                    "write -z 70000 200000", "read -P 0x11 0 1000", "read -P 0x22 1000 3000",
                    "read -P 0x11 4000 66000", "read -P 0 70000 200000",
                    "read -P 0x11 270000 778576")
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
        direct = qemu_io("raw", f"nbd+unix://?socket={sock}", "read -P 0x22 0 4096")
        assert "verification failed" in direct.stdout  # only 1000..4000 were written


@pytest.mark.skipif(not HAVE_NBDKIT, reason="nbdkit missing")
def test_server_errors_map_to_errno(tmp_path):
    sock = tmp_path / "nbd.sock"
    with Server(str(sock), "nbdkit", "-f", "-U", str(sock), "--filter=error", "memory", "1M",
                "error-pwrite=ENOSPC", "error-pwrite-rate=100%", "error-pread=EPERM",
                "error-pread-rate=100%"):
        o = opts(sock, None)
        for cmd in ("read 0 4k", "write 0 4k"):
            ours = _qemu_io_via_blockd(tmp_path, o, cmd)
            theirs = subprocess.run(["qemu-io", "--image-opts", "-c", cmd, o],
                                    capture_output=True, text=True).stdout
            assert ours.split(": ", 1)[-1] == theirs.split(": ", 1)[-1], (ours, theirs)


def _qemu_io_via_blockd(tmp_path: Path, o: str, cmd: str) -> str:
    """Run ``cmd`` with qemu-io on a blockd export of an nbd node opened from ``o``."""
    out = tmp_path / "out.sock"
    server = dict(kv.split("=", 1) for kv in o.split(",") if kv.startswith("server."))
    with Daemon(str(tmp_path / "blockd.qmp")) as d:
        c = d.client()
        assert c.cmd("blockdev-add", driver="nbd", **{"node-name": "n0"},
                     server={"type": server["server.type"], "path": server["server.path"]}) == {"return": {}}
        assert c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(out)}}) == {"return": {}}
        assert c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "n0"},
                     writable=True) == {"return": {}}
        return qemu_io("raw", uri(out, "n0"), cmd).stdout


def test_disconnect_fails_requests_then_reconnects(tmp_path):
    """Without reconnect-delay a lost server means EIO at once; a reconnect happens in
    the background.  With a delay, a request waits for the server to return, for as
    long as the delay allows."""
    image = tmp_path / "a.raw"
    make_image(image)
    sock, out = tmp_path / "nbd.sock", tmp_path / "out.sock"
    argv = ["qemu-nbd", "-t", "-e", "8", "-f", "raw", "-k", str(sock), "-x", "exp", str(image)]
    server = Server(str(sock), *argv)
    try:
        with Daemon(str(tmp_path / "blockd.qmp")) as d:
            c = d.client()
            assert c.cmd("blockdev-add", **_nbd_node(sock)) == {"return": {}}
            assert c.cmd("blockdev-add", **_nbd_node(sock, "n1", **{"reconnect-delay": 60})) == {"return": {}}
            assert c.cmd("blockdev-add", **_nbd_node(sock, "n2", **{"reconnect-delay": 1})) == {"return": {}}
            assert c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(out)}}) == {"return": {}}
            for n in ("n0", "n1", "n2"):
                assert c.cmd("block-export-add", type="nbd", id=n, **{"node-name": n},
                             writable=True) == {"return": {}}
            server.stop()
            for n in ("n0", "n2"):  # n2 gives up once its second has passed
                r = qemu_io("raw", uri(out, n), "read -P 0x11 0 4k")
                assert "Input/output error" in r.stdout + r.stderr
            # n1 waits: its read is answered once the server is back.
            waiting = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "read -P 0x22 1M 4k",
                                        uri(out, "n1")], stdout=subprocess.PIPE, text=True)
            server = Server(str(sock), *argv)
            assert "verification failed" not in waiting.communicate(timeout=120)[0]
            assert waiting.returncode == 0
            deadline = time.monotonic() + 60
            while True:  # n0 reconnects in the background
                r = qemu_io("raw", uri(out, "n0"), "read -P 0x11 0 4k")
                if r.returncode == 0 and "Input/output error" not in r.stdout:
                    break
                assert time.monotonic() < deadline, r.stdout
                time.sleep(0.5)
    finally:
        server.stop()


def test_qcow2_stored_on_an_nbd_export(tmp_path):
    """A qcow2 image read and written through the nbd driver: its metadata travels over
    NBD.  blockd-img and qemu-img agree on it, and the file stays clean."""
    image = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    qemu_io("qcow2", str(image), "write -P 0x5a 1M 256k", "write -z 3M 64k")
    # An export cannot grow: room for new clusters must be there already.
    os.truncate(image, 16 << 20)
    sock, out = tmp_path / "nbd.sock", tmp_path / "out.sock"
    qcow2_on_nbd = f"driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path={sock},file.export=exp"
    with serve("qemu-nbd", image, sock, tmp_path):
        for cmd in (["info"], ["map", "--output=json"], ["map"], ["check"], ["check", "--output=json"]):
            same(tmp_path, *cmd, "--image-opts", qcow2_on_nbd)
        with Daemon(str(tmp_path / "blockd.qmp")) as d:
            c = d.client()
            assert c.cmd("blockdev-add", driver="qcow2", **{"node-name": "q0"},
                         file=_nbd_node(sock, "n0")) == {"return": {}}
            assert c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(out)}}) == {"return": {}}
            assert c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"},
                         writable=True) == {"return": {}}
            r = qemu_io("raw", uri(out, "q0"), "read -P 0x5a 1M 256k", "write -P 0x6b 5M 300k",
                        "write -z 1M 64k", "flush")
            assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
            assert c.export_del("e0") == {"return": {}}
            assert c.cmd("blockdev-del", **{"node-name": "q0"}) == {"return": {}}
    assert qemu_img("check", str(image)).returncode == 0
    r = qemu_io("qcow2", str(image), "read -P 0x6b 5M 300k", "read -P 0 1M 64k", "read -P 0x5a 1088k 192k")
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout


@pytest.mark.skipif(not HAVE_NBDKIT, reason="nbdkit missing")
def test_convert_into_an_nbd_target(tmp_path):
    image = tmp_path / "a.raw"
    make_image(image)
    sock = tmp_path / "nbd.sock"
    with Server(str(sock), "nbdkit", "-f", "-U", str(sock), "memory", "4M"):
        same(tmp_path, "convert", "-n", "-f", "raw", str(image), "--target-image-opts", opts(sock, None))
        assert qemu_img("compare", "-f", "raw", "-F", "raw", str(image),
                        f"nbd+unix://?socket={sock}").returncode == 0


@pytest.mark.parametrize("greeting", [b"", b"NBDMAGIC", b"NOTMAGIC" + bytes(10),
                                      b"NBDMAGICNOTOPTS!" + bytes(2)])
def test_bad_greetings_match_qemu_img(greeting, tmp_path):
    """A server that is not an NBD server: qemu-img's messages, no hang."""
    import threading

    sock = tmp_path / "bad.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.listen(8)
    listener.settimeout(0.1)
    done = threading.Event()

    def answer() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            with conn:
                conn.sendall(greeting)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        same(tmp_path, "info", "--image-opts", opts(sock))
    finally:
        done.set()
        thread.join(30)
        listener.close()


@pytest.mark.skipif(not HAVE_NBDKIT, reason="nbdkit missing")
def test_sixteen_requests_in_flight(tmp_path):
    """Requests go out without waiting for earlier replies, at most 16 at a time (QEMU's
    number); the server's log shows how many were outstanding at once."""
    import asyncio

    from blockd.block.graph import BlockGraph

    sock, log = tmp_path / "nbd.sock", tmp_path / "nbdkit.log"
    with Server(str(sock), "nbdkit", "-f", "-U", str(sock), "--filter=log", "--filter=delay",
                "memory", "4M", "delay-read=100ms", f"logfile={log}"):
        async def body() -> None:
            g = BlockGraph()
            node = await g.open_node({"driver": "nbd", "node-name": "n",
                                      "server": {"type": "unix", "path": str(sock)}})
            datas = await asyncio.gather(*(node.read(i << 16, 1 << 16) for i in range(40)))
            assert all(bytes(d) == bytes(1 << 16) for d in datas)
            await g.close_all()
        asyncio.run(body())
    outstanding = most = 0
    for line in log.read_text().splitlines():
        if " Read id=" in line:
            outstanding += 1
        elif "...Read id=" in line:
            outstanding -= 1
        most = max(most, outstanding)
    assert most == 16


@pytest.mark.parametrize("kind", ["qsd", "blockd"])
def test_allocation_depth_through_x_dirty_bitmap(kind, tmp_path):
    """``x-dirty-bitmap=qemu:allocation-depth``: depths above 2 count as 2, as in QEMU."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"], check=True)
    qemu_io("qcow2", str(base), "write -P 1 0 1M")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    qemu_io("qcow2", str(top), "write -P 2 512k 1M")
    sock = tmp_path / "nbd.sock"
    with Daemon(str(tmp_path / "d.qmp"), "--blockdev",
                f"driver=qcow2,node-name=t,file.driver=file,file.filename={top}",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=e,node-name=t,name=exp,allocation-depth=on",
                qsd=kind == "qsd"):
        wait_for(sock)
        same(tmp_path, "map", "--output=json", "--image-opts",
             opts(sock, **{"x-dirty-bitmap": "qemu:allocation-depth"}))


@pytest.mark.skipif(not HAVE_NBDKIT, reason="nbdkit missing")
def test_export_size_not_a_sector_multiple(tmp_path):
    """QEMU counts whole sectors: a 1000-byte export is 1024 bytes, the tail zeroes."""
    sock = tmp_path / "nbd.sock"
    with Server(str(sock), "nbdkit", "-f", "-U", str(sock), "memory", "1000"):
        assert qemu_io("raw", f"nbd+unix://?socket={sock}", "write -P 0x41 0 1000").returncode == 0
        o = opts(sock, None)
        for cmd in (["info"], ["map", "--output=json"], ["map"]):
            same(tmp_path, *cmd, "--image-opts", o)
        same(tmp_path, "convert", "-O", "raw", "--image-opts", o, str(tmp_path / "b.raw"))
        assert qemu_img("convert", "-O", "raw", "--image-opts", o, str(tmp_path / "q.raw")).returncode == 0
        assert (tmp_path / "b.raw").read_bytes() == (tmp_path / "q.raw").read_bytes() == \
            b"\x41" * 1000 + bytes(24)


def test_open_timeout_bounds_a_silent_server(tmp_path):
    """A server that accepts and never speaks: open-timeout ends the wait."""
    sock = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.listen(8)
    try:
        with Daemon(str(tmp_path / "blockd.qmp")) as d:
            reply = d.client().cmd("blockdev-add", **_nbd_node(sock, **{"open-timeout": 1}))
            assert reply["error"]["desc"] == f"Failed to connect to '{sock}': Connection timed out"
    finally:
        listener.close()
