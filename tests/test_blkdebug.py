"""blkdebug: injected errors at format-driver events, states, and NBD clients seeing EIO."""

from __future__ import annotations

import asyncio
import errno
import subprocess

import pytest

from blockd.block.graph import BlockGraph
from harness import Daemon


def _image(tmp_path, fmt: str = "raw") -> str:
    path = str(tmp_path / f"a.{fmt}")
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, "4M"], check=True)
    subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x66 0 64k", path], check=True,
                   capture_output=True)
    return path


def _open(path: str, fmt: str, **blkdebug):
    g = BlockGraph()
    opts = {"driver": fmt, "node-name": "top",
            "file": {"driver": "blkdebug", "node-name": "dbg",
                     "image": {"driver": "file", "filename": path}, **blkdebug}}
    return g, opts


def test_read_error_once_then_success(tmp_path):
    path = _image(tmp_path)

    async def body():
        g, opts = _open(path, "raw", **{"inject-error": [{"event": "read_aio", "once": True}]})
        node = await g.open_node(opts)
        with pytest.raises(OSError) as err:
            await node.read(0, 4096)
        assert err.value.errno == errno.EIO
        assert bytes(await node.read(0, 4096)) == b"\x66" * 4096

    asyncio.run(body())


def test_sector_filter_iotype_and_errno(tmp_path):
    path = _image(tmp_path)

    async def body():
        g, opts = _open(path, "raw", **{"inject-error": [
            {"event": "write_aio", "sector": 16, "errno": errno.ENOSPC, "iotype": "write"}]})
        node = await g.open_node(opts)
        await node.write(0, b"x" * 4096)            # sector 0-7: not hit
        with pytest.raises(OSError) as err:
            await node.write(8192, b"y" * 512)      # sector 16
        assert err.value.errno == errno.ENOSPC
        assert bytes(await node.read(8192, 512)) == b"\x66" * 512  # reads unaffected

    asyncio.run(body())


def test_states_aim_at_the_second_l2_update(tmp_path):
    """qcow2 writes into two fresh L2 tables; only the second update fails."""
    path = _image(tmp_path, "qcow2")

    async def body():
        g, opts = _open(path, "qcow2", **{
            "set-state": [{"event": "l2_update", "state": 1, "new_state": 2}],
            "inject-error": [{"event": "l2_update", "state": 2, "once": True, "immediately": True}]})
        node = await g.open_node(opts)
        await node.write(1 << 20, b"a" * 65536)      # first L2 update: state 1 -> 2
        with pytest.raises(OSError):
            await node.write(2 << 20, b"b" * 65536)  # second: injected
        await node.write(3 << 20, b"c" * 65536)      # once: the image goes on working
        await g.close_all()

    asyncio.run(body())
    out = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    # A failed L2 update may leak the new cluster, never corrupt the image.
    assert out.returncode in (0, 3) and "ERROR" not in out.stdout


def test_nbd_client_sees_eio_and_daemon_keeps_serving(tmp_path):
    path = _image(tmp_path)
    nbd = str(tmp_path / "nbd.sock")
    node = ('{"driver":"raw","node-name":"r0","file":{"driver":"blkdebug","image":'
            '{"driver":"file","filename":"%s"},"inject-error":[{"event":"read_aio",'
            '"sector":0,"once":true}]}}' % path)
    with Daemon(str(tmp_path / "qmp.sock"), "--blockdev", node,
                "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                "--export", "type=nbd,id=e0,node-name=r0") as d:
        uri = f"nbd+unix:///r0?socket={nbd}"
        out = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", uri],
                             capture_output=True, text=True)
        assert "Input/output error" in out.stdout + out.stderr
        out = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x66 0 4k", uri],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "verification failed" not in out.stdout
        assert d.client().cmd("query-block-exports")["return"][0]["id"] == "e0"


def test_config_file_rules(tmp_path):
    path = _image(tmp_path)
    conf = tmp_path / "blkdebug.conf"
    conf.write_text('[inject-error]\nevent = "read_aio"\nerrno = "1"\nonce = "on"\n')

    async def body():
        g, opts = _open(path, "raw", config=str(conf))
        node = await g.open_node(opts)
        with pytest.raises(OSError) as err:
            await node.read(0, 512)
        assert err.value.errno == errno.EPERM
        assert node.file.filename() == f"blkdebug:{conf}:{path}"

    asyncio.run(body())
