"""The NBD server against real clients: qemu-io, qemu-img, nbdinfo, fio."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess

import pytest

from blockd.nbd import protocol as p
from harness import WAIT, Daemon, NBDClient, sh


def uri(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


@pytest.fixture
def served(tmp_path):
    """A daemon exporting a 4 MiB raw image writable as 'r0' and null-co read-only as 'n0'."""
    image = tmp_path / "a.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "4M"], check=True)
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", str(image))
    nbd = str(tmp_path / "nbd.sock")
    daemon = Daemon(str(tmp_path / "qmp.sock"),
                    "--blockdev", f"driver=file,node-name=f0,filename={image}",
                    "--blockdev", "driver=raw,node-name=r0,file=f0",
                    "--blockdev", "driver=null-co,node-name=n0,read-only=on,size=1048576",
                    "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                    "--export", "type=nbd,id=e0,node-name=r0,writable=on,description=hello",
                    "--export", "type=nbd,id=e1,node-name=n0")
    yield daemon, nbd, image
    daemon.stop()


def test_qemu_io_writes_reach_the_file(served):
    daemon, nbd, image = served
    out = sh("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "read -P 0xab 1M 64k",
             "-c", "write -z 2M 8k", "-c", "discard 3M 4k", "-c", "flush", uri(nbd, "r0"))
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout
    with open(image, "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\xab" * 65536


def test_nbdinfo_map_and_flags(served):
    daemon, nbd, image = served
    info = json.loads(sh("nbdinfo", "--json", uri(nbd, "r0")).stdout)["exports"][0]
    assert info["description"] == "hello" and info["export-size"] == 4 << 20
    assert info["can_zero"] and info["can_trim"] and info["can_fua"] and not info["is_read_only"]
    assert info["block_size_maximum"] == 32 << 20
    ro = json.loads(sh("nbdinfo", "--json", uri(nbd, "n0")).stdout)["exports"][0]
    assert ro["is_read_only"] and not ro["can_zero"]
    lines = sh("nbdinfo", "--map", uri(nbd, "r0")).stdout.split("\n")
    assert lines[0].split() == ["0", "65536", "0", "data"]
    assert lines[1].split()[2:] == ["3", "hole,zero"]
    names = sh("nbdinfo", "--list", "--json", f"nbd+unix://?socket={nbd}").stdout
    assert {e["export-name"] for e in json.loads(names)["exports"]} == {"r0", "n0"}


def test_qemu_img_convert_from_export(served, tmp_path):
    daemon, nbd, image = served
    out = tmp_path / "copy.raw"
    assert sh("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(nbd, "r0"), str(out)).returncode == 0
    assert sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), str(out)).returncode == 0


def test_read_only_export_refuses_writes(served):
    daemon, nbd, image = served
    out = sh("qemu-io", "-f", "raw", "-c", "write 0 4k", uri(nbd, "n0"))
    assert "Operation not permitted" in out.stdout + out.stderr or out.returncode != 0


def test_unknown_export_and_daemon_survives(served):
    daemon, nbd, image = served
    out = sh("nbdinfo", uri(nbd, "nosuch"))
    assert out.returncode != 0 and "nosuch" in out.stderr
    # A client that breaks the protocol is dropped; the server goes on.
    s = socket.socket(socket.AF_UNIX)
    s.connect(nbd)
    s.recv(18)
    s.sendall(b"\xff" * 64)
    s.close()
    assert sh("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 64k", uri(nbd, "r0")).returncode == 0
    assert daemon.client().cmd("query-block-exports")["return"][0]["id"] == "e1"


def test_many_requests_in_flight_and_structured_holes(served):
    daemon, nbd, image = served
    c = NBDClient.open(nbd, "r0", structured=True, contexts=[p.BASE_ALLOCATION])
    s, parser, events = c.s, c.parser, c.events
    # 32 reads sent back to back before reading any reply.
    for handle in range(32):
        parser.expect_read(handle, 2048)
        s.sendall(p.request(p.Cmd.READ, handle, handle * 2048, 2048))
    seen = set()
    while len(seen) < 32:
        chunk = events(1)[0]
        if chunk.type == p.Chunk.OFFSET_DATA:
            offset, data = p.parse_offset_data(chunk.payload)
            assert data == b"\x11" * 2048 and offset == chunk.handle * 2048
        if chunk.done:
            seen.add(chunk.handle)
    # A large read over a hole comes back as a hole chunk.
    s.sendall(p.request(p.Cmd.READ, 99, 1 << 20, 1 << 20))
    chunk = events(1)[0]
    assert chunk.type == p.Chunk.OFFSET_HOLE and p.parse_offset_hole(chunk.payload) == (1 << 20, 1 << 20)
    s.sendall(p.request(p.Cmd.BLOCK_STATUS, 100, 0, 4 << 20))
    chunk = events(1)[0]
    assert p.parse_block_status(chunk.payload) == (0, [(65536, 0), ((4 << 20) - 65536, 3)])
    # Out of range is EINVAL for this request only.
    s.sendall(p.request(p.Cmd.READ, 101, 4 << 20, 4096))
    chunk = events(1)[0]
    assert chunk.type == p.Chunk.ERROR and p.parse_error_chunk(chunk.payload)[0] == p.Err.EINVAL
    s.sendall(p.request(p.Cmd.DISC, 102))
    s.close()


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
def test_fio_nbd_engine_verifies(served, tmp_path):
    daemon, nbd, image = served
    out = sh("fio", "--name=v", "--ioengine=nbd", f"--uri={uri(nbd, 'r0')}", "--rw=randwrite",
             "--bs=4k", "--size=2M", "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
             "--output-format=json", timeout=2 * WAIT)
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] >= 2 << 20


def test_export_holds_the_node(served):
    daemon, nbd, image = served
    c = daemon.client()
    assert c.cmd("blockdev-del", **{"node-name": "r0"})["error"]["desc"] == "Node r0 is in use"
    reply = c.cmd("blockdev-reopen", options=[{"driver": "raw", "node-name": "r0", "file": "f0",
                                               "read-only": True}])
    assert reply["error"]["desc"] == "Read-only block node 'r0' cannot support read-write users"
    assert c.cmd("block-export-del", id="e0", mode="hard") == {"return": {}}
    assert c.cmd("blockdev-reopen", options=[{"driver": "raw", "node-name": "r0", "file": "f0",
                                              "read-only": True}]) == {"return": {}}
    assert c.cmd("blockdev-del", **{"node-name": "r0"}) == {"return": {}}
    assert not os.path.exists(nbd + "x")


def test_image_lock_keeps_qemu_io_out_until_blockdev_del(tmp_path):
    img = str(tmp_path / "l.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"], check=True)
    with Daemon(str(tmp_path / "qmp.sock")) as d:
        c = d.client()
        assert c.cmd("blockdev-add", driver="qcow2", **{"node-name": "q0"},
                     file={"driver": "file", "filename": img}) == {"return": {}}
        out = sh("qemu-io", "-f", "qcow2", "-c", "read 0 4k", img)
        assert out.returncode != 0 and 'Failed to get "write" lock' in out.stderr
        assert c.cmd("blockdev-del", **{"node-name": "q0"}) == {"return": {}}
        assert sh("qemu-io", "-f", "qcow2", "-c", "write 0 4k", img).returncode == 0


def test_read_only_reopen_turns_writes_off_and_back_on(served):
    """QEMU refuses a read-only reopen under a writable export; without one, the
    node's read-only state decides whether an export can take writes."""
    daemon, nbd, image = served
    c = daemon.client()
    reopen = {"driver": "raw", "node-name": "r0", "file": "f0"}
    assert "error" in c.cmd("blockdev-reopen", options=[{**reopen, "read-only": True}])
    assert c.export_del("e0") == {"return": {}}
    assert c.cmd("blockdev-reopen", options=[{**reopen, "read-only": True}]) == {"return": {}}
    reply = c.cmd("block-export-add", type="nbd", id="e2", **{"node-name": "r0"}, writable=True)
    assert reply["error"]["desc"] == "Cannot export read-only node as writable"
    assert c.cmd("block-export-add", type="nbd", id="e2", **{"node-name": "r0"}) == {"return": {}}
    out = sh("qemu-io", "-f", "raw", "-c", "write 0 4k", uri(nbd, "r0"))
    assert out.returncode != 0 or "Operation not permitted" in out.stdout + out.stderr
    assert c.export_del("e2") == {"return": {}}
    assert c.cmd("blockdev-reopen", options=[{**reopen, "read-only": False}]) == {"return": {}}
    assert c.cmd("block-export-add", type="nbd", id="e3", **{"node-name": "r0"},
                 writable=True) == {"return": {}}
    out = sh("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4k", uri(nbd, "r0"))
    assert out.returncode == 0 and "wrote 4096/4096" in out.stdout


def test_cache_direct_on_a_disk_file_system(tmp_path):
    """O_DIRECT with unaligned requests (bounced through aligned buffers)."""
    import asyncio
    from blockd.block.graph import BlockGraph

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".direct-test.raw")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    try:
        async def body():
            g = BlockGraph()
            try:
                node = await g.open_node({"driver": "file", "node-name": "d", "filename": path,
                                          "cache": {"direct": True}})
            except Exception as exc:  # file systems without O_DIRECT (tmpfs)
                pytest.skip(f"no O_DIRECT here: {exc}")
            await node.write(1000, b"\x42" * 5000)
            assert bytes(await node.read(990, 5020)) == bytes(10) + b"\x42" * 5000 + bytes(10)
            await g.close_all()
        asyncio.run(body())
        with open(path, "rb") as f:
            f.seek(1000)
            assert f.read(5000) == b"\x42" * 5000
    finally:
        os.unlink(path)


def test_request_that_waits_continues_as_a_task():
    """A request served inline until it waits is finished by a task: results,
    exceptions and cancellation reach the coroutine as a plain ``await`` would."""
    import asyncio

    from blockd.nbd.server import _finish

    async def body(fut: asyncio.Future, log: list) -> None:
        try:
            log.append(await fut)
            await asyncio.sleep(0)
            log.append(await fut)
            await asyncio.get_running_loop().create_future()  # waits until cancelled
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    async def main() -> list:
        loop = asyncio.get_running_loop()
        fut, log = loop.create_future(), []
        coro = body(fut, log)
        waiting = coro.send(None)
        assert waiting is fut
        task = loop.create_task(_finish(coro, waiting))
        fut.set_result("done")
        for _ in range(5):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return log

    assert asyncio.run(main()) == ["done", "done", "cancelled"]


def _null_server(tmp_path, qsd: bool, *args: str) -> tuple[Daemon, str]:
    """qsd or blockd, started in a folder of its own with ``args`` after its NBD server;
    the daemon and the server's socket."""
    work = tmp_path / ("qsd" if qsd else "blockd")
    work.mkdir()
    nbd = str(work / "nbd.sock")
    return Daemon(str(work / "qmp.sock"), "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                  *args, qsd=qsd, stderr=subprocess.DEVNULL), nbd


ONE_EXPORT = ("--blockdev", "driver=null-co,node-name=n0,size=1048576",
              "--export", "type=nbd,id=e0,node-name=n0,name=n0")


def _edge_session(tmp_path, qsd: bool) -> list:
    """What a client sees at the protocol's edges: long unknown names, unknown client
    flags, flags per reply mode, requests with flags their command does not take."""
    seen: list = []
    daemon, nbd = _null_server(tmp_path, qsd, *ONE_EXPORT)
    with daemon:
        for length in (79, 80, 4095, 4096):
            for opt in (p.Opt.GO, p.Opt.INFO):
                c = NBDClient(nbd)
                c.event()
                c.s.sendall(p.client_flags() + p.option_request(opt, p.info_request_data("x" * length)))
                reply = c.event()
                seen.append((length, opt, reply.reply, reply.data))
                c.s.close()
        for flags in (p.ClientFlag.FIXED_NEWSTYLE | 4, p.ClientFlag.FIXED_NEWSTYLE | 1 << 31):
            c = NBDClient(nbd)
            c.event()
            c.s.sendall(p.client_flags(flags) + p.option_request(p.Opt.GO, p.info_request_data("n0")))
            seen.append(("client flags", flags, c.event()))
            c.s.close()
        for structured in (False, True):
            c = NBDClient(nbd)
            c.event()
            seen.append(("transmission flags", structured, c.go("n0", structured)))
            for cmd, flags in ((p.Cmd.READ, p.CmdFlag.DF), (p.Cmd.READ, p.CmdFlag.REQ_ONE),
                               (p.Cmd.READ, 1 << 7), (p.Cmd.FLUSH, p.CmdFlag.FUA),
                               (p.Cmd.FLUSH, 1 << 9)):
                length = 512 if cmd == p.Cmd.READ else 0
                seen.append((structured, cmd, flags, c.ask(cmd, flags, 0, length)))
            c.s.close()
    return seen


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs qsd")
def test_protocol_edges_match_qsd(tmp_path):
    theirs = _edge_session(tmp_path, qsd=True)
    ours = _edge_session(tmp_path, qsd=False)
    assert ours == theirs
    unknown = [entry for entry in ours if entry[0] == 4096]
    assert unknown and all(e[2] == p.Rep.ERR_UNKNOWN for e in unknown)
    assert [e[2] for e in ours if e[0] == "client flags"] == ["closed", "closed"]
    df = {e[1]: bool(e[2] & p.TransmissionFlag.SEND_DF) for e in ours if e[0] == "transmission flags"}
    assert df == {False: False, True: True}


def _q(raw: bytes) -> bytes:
    """A length-prefixed string as option payloads carry them, whatever its bytes."""
    return struct.pack(">I", len(raw)) + raw


_SR = p.option_request(p.Opt.STRUCTURED_REPLY)
#: Malformed or unusual handshake options; each case is sent after the client flags.
OPTION_CASES = {
    "go-name-4097": p.option_request(p.Opt.GO, _q(b"x" * 4097) + b"\0\0"),
    "go-name-past-end": p.option_request(p.Opt.GO, struct.pack(">I", 100) + b"n0"),
    "go-no-count": p.option_request(p.Opt.GO, _q(b"n0")),
    "go-short-requests": p.option_request(p.Opt.GO, _q(b"n0") + b"\0\2\0\1"),
    "go-trailing": p.option_request(p.Opt.GO, p.info_request_data("n0") + b"zz"),
    "info-trailing": p.option_request(p.Opt.INFO, p.info_request_data("n0") + b"z"),
    "go-nul": p.option_request(p.Opt.GO, _q(b"n0\0x") + b"\0\0"),
    "go-not-utf8": p.option_request(p.Opt.GO, _q(b"\xff\xfe") + b"\0\0"),
    "go-not-utf8-long": p.option_request(p.Opt.GO, _q(b"\xc3" * 100) + b"\0\0"),
    "list-data": p.option_request(p.Opt.LIST, b"x"),
    "structured-data": p.option_request(p.Opt.STRUCTURED_REPLY, b"x"),
    "structured-twice": _SR + _SR,
    "starttls": p.option_request(p.Opt.STARTTLS),
    "starttls-data": p.option_request(p.Opt.STARTTLS, b"x"),
    "peek-export": p.option_request(p.Opt.PEEK_EXPORT),
    "unknown": p.option_request(99),
    "set-meta-unstructured": p.option_request(
        p.Opt.SET_META_CONTEXT, p.meta_context_data("n0", [p.BASE_ALLOCATION])),
    "list-meta-unstructured": p.option_request(p.Opt.LIST_META_CONTEXT, _q(b"n0") + bytes(4)),
    "meta-long-query": _SR + p.option_request(
        p.Opt.SET_META_CONTEXT, _q(b"n0") + struct.pack(">I", 2) + _q(b"a" * 5000)
        + _q(b"base:allocation")),
    "meta-nul-query": _SR + p.option_request(
        p.Opt.SET_META_CONTEXT, _q(b"n0") + struct.pack(">I", 1) + _q(b"base:\0allocation")),
    "meta-unknown-export-first": _SR + p.option_request(p.Opt.SET_META_CONTEXT, _q(b"zz") + b"\xff"),
    "meta-no-count": _SR + p.option_request(p.Opt.LIST_META_CONTEXT, _q(b"n0") + b"\0"),
    "meta-count-too-big": _SR + p.option_request(
        p.Opt.LIST_META_CONTEXT, _q(b"n0") + struct.pack(">I", 3) + _q(b"base:allocation")),
    "meta-name-nul": _SR + p.option_request(p.Opt.LIST_META_CONTEXT, _q(b"n\0") + bytes(4)),
    "meta-name-4097": _SR + p.option_request(p.Opt.LIST_META_CONTEXT, _q(b"x" * 4097) + bytes(4)),
    "meta-long-unknown": _SR + p.option_request(p.Opt.LIST_META_CONTEXT, _q(b"y" * 4000) + bytes(4)),
}


def _option_replies(tmp_path, qsd: bool) -> dict:
    """Every option reply each case gets; NBD_OPT_ABORT ends each case, so the server's
    hang-up, not a timeout, says that everything has come."""
    seen = {}
    daemon, nbd = _null_server(tmp_path, qsd, *ONE_EXPORT)
    with daemon:
        for case, payload in OPTION_CASES.items():
            c = NBDClient(nbd)
            c.event()
            c.s.sendall(p.client_flags() + payload + p.option_request(p.Opt.ABORT))
            replies = []
            while (reply := c.event()) != "closed":
                replies.append((reply.option, reply.reply, reply.data))
            seen[case] = replies
            c.s.close()
    return seen


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs qsd")
def test_option_errors_match_qsd(tmp_path):
    theirs = _option_replies(tmp_path, qsd=True)
    ours = _option_replies(tmp_path, qsd=False)
    for case in OPTION_CASES:
        assert ours[case] == theirs[case], case
    assert ours["go-name-4097"][0][1:] == (p.Rep.ERR_INVALID, b"Invalid name length: 4097")


#: Requests at the edges: (command, flags, offset, length), on a 1 MiB export.
REQUEST_CASES = [
    (p.Cmd.READ, 0, 1 << 20, 512), (p.Cmd.READ, 0, (1 << 20) - 256, 512),
    (p.Cmd.READ, 0, 0, 33 << 20), (p.Cmd.READ, 0, 0, 0), (p.Cmd.CACHE, 0, 0, 33 << 20),
    (p.Cmd.WRITE, 0, 0, 512), (p.Cmd.WRITE, 0, 1 << 20, 512),
    (p.Cmd.WRITE_ZEROES, 0, 0, 4096), (p.Cmd.WRITE_ZEROES, 0, 1 << 20, 4096),
    (p.Cmd.WRITE_ZEROES, p.CmdFlag.FAST_ZERO, 0, 4096),
    (p.Cmd.TRIM, 0, 0, 4096), (p.Cmd.TRIM, 0, 1 << 20, 4096),
    (p.Cmd.FLUSH, 0, 0, 0), (p.Cmd.FLUSH, 0, 5, 5),
    (p.Cmd.CACHE, 0, 0, 4096), (p.Cmd.CACHE, 0, 1 << 20, 4096),
    (p.Cmd.BLOCK_STATUS, 0, 0, 4096), (p.Cmd.BLOCK_STATUS, 0, 0, 0),
    (p.Cmd.RESIZE, 0, 0, 0), (77, 0, 0, 0), (77, 1 << 9, 0, 0),
]


def _request_replies(tmp_path, qsd: bool) -> list:
    """The reply to each request case on a read-only and a writable null-co export, with
    and without structured replies (errors carry QEMU's messages in error chunks)."""
    seen = []
    daemon, nbd = _null_server(tmp_path, qsd, "--blockdev",
                               "driver=null-co,node-name=n0,size=1048576",
                               "--blockdev", "driver=null-co,node-name=n1,size=1048576",
                               "--export", "type=nbd,id=e0,node-name=n0,name=ro",
                               "--export", "type=nbd,id=e1,node-name=n1,name=rw,writable=on")
    with daemon:
        for name in ("ro", "rw"):
            for structured in (False, True):
                c = NBDClient(nbd)
                c.event()
                c.go(name, structured)
                for cmd, flags, offset, length in REQUEST_CASES:
                    data = bytes(length) if cmd == p.Cmd.WRITE else b""
                    answer = c.ask(cmd, flags, offset, length, data)
                    seen.append((name, structured, cmd, flags, offset, length, answer))
                c.s.close()
    return seen


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs qsd")
def test_request_errors_match_qsd(tmp_path):
    theirs = _request_replies(tmp_path, qsd=True)
    ours = _request_replies(tmp_path, qsd=False)
    for mine, qsds in zip(ours, theirs):
        assert mine == qsds
    assert len(ours) == len(theirs) == 4 * len(REQUEST_CASES)
