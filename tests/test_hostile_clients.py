"""Hostile clients: malformed QMP and NBD traffic must not hurt the daemon or other clients.

One daemon serves a writable and a read-only export.  While qemu-io
writes and verifies data over NBD and a QMP client keeps asking
questions, other connections send broken handshakes, bad magic,
oversized and out-of-range requests, unknown commands, floods of
requests whose replies they never read, half messages and early
disconnects.  The good clients' work must complete, the daemon must
answer, the read-only image must be untouched, and the daemon's file
descriptors must come back to what they were.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import stat
import struct
import subprocess
import threading
import time

import pytest

from blockd.nbd import protocol as p
from blockd.nbd import server as nbd_server
from harness import (HAVE_QSD, WAIT, Daemon, connect_unix, nbd_connect, nbd_negotiate_simple,
                     peer_closed, qemu_tool, recv_exact, simple_reply)

MiB = 1 << 20


def uri(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _wait_fds(pid: int, baseline: int, timeout: float = WAIT) -> int:
    """Descriptor count once closes have settled (or the last count seen)."""
    deadline = time.monotonic() + timeout
    while True:
        n = _fds(pid)
        if n <= baseline or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


@pytest.fixture
def served(tmp_path):
    """blockd exporting a writable raw image as 'w' and a read-only one as 'ro'."""
    w, ro = tmp_path / "w.raw", tmp_path / "ro.raw"
    for path in (w, ro):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", str(ro)], check=True,
                   capture_output=True)
    nbd = str(tmp_path / "nbd.sock")
    daemon = Daemon(str(tmp_path / "qmp.sock"),
                    "--blockdev", f"driver=file,node-name=fw,filename={w}",
                    "--blockdev", f"driver=file,node-name=fr,filename={ro},read-only=on",
                    "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                    "--export", "type=nbd,id=ew,node-name=fw,name=w,writable=on",
                    "--export", "type=nbd,id=er,node-name=fr,name=ro")
    yield daemon, nbd, str(ro)
    daemon.stop()


def _hostile_nbd(nbd: str) -> list[socket.socket]:
    """Every kind of bad NBD client; returns the sockets still open (stalled ones)."""
    keep = []
    # Handshake garbage: wrong client flags, wrong option magic, oversized option.
    for junk in (b"\x00\x00\x00\x00", p.client_flags() + b"\x00" * 16,
                 p.client_flags() + struct.pack(">QII", 0x49484156454F5054, 7, 1 << 30)):
        s = nbd_connect(nbd)
        recv_exact(s, 18)
        s.sendall(junk)
        assert peer_closed(s)
        s.close()
    # Early disconnects at every stage.
    s = nbd_connect(nbd)
    s.close()
    s = nbd_connect(nbd)
    recv_exact(s, 18)
    s.sendall(p.client_flags() + p.option_request(p.Opt.GO, p.info_request_data("w"))[:10])
    s.close()
    # Unknown export, unknown option: errors, connection stays usable.
    s = nbd_connect(nbd)
    recv_exact(s, 18)
    s.sendall(p.client_flags() + p.option_request(p.Opt.GO, p.info_request_data("nope")))
    _, _, rep, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert rep == p.Rep.ERR_UNKNOWN
    recv_exact(s, length)
    s.sendall(p.option_request(0x7777))
    _, _, rep, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert rep == p.Rep.ERR_UNSUP
    s.close()
    # A client that connects and never says anything.
    keep.append(nbd_connect(nbd))
    # Transmission: out of range, oversized, unknown command, write to read-only (EINVAL
    # too, as qsd answers every request it refuses before running it).
    s = nbd_negotiate_simple(nbd, "ro")
    s.sendall(p.request(p.Cmd.READ, 1, 8 * MiB, 4096))
    assert simple_reply(s)[:2] == (p.Err.EINVAL, 1)
    s.sendall(p.request(p.Cmd.READ, 2, (1 << 64) - 4096, 8192))
    assert simple_reply(s)[:2] == (p.Err.EINVAL, 2)
    s.sendall(p.request(p.Cmd.READ, 3, 0, 64 * MiB))
    assert simple_reply(s)[:2] == (p.Err.EINVAL, 3)
    s.sendall(p.request(0x55, 4, 0, 512))
    assert simple_reply(s)[:2] == (p.Err.EINVAL, 4)
    s.sendall(p.request(p.Cmd.WRITE, 5, 0, 512, data=b"\xee" * 512))
    assert simple_reply(s)[:2] == (p.Err.EINVAL, 5)
    s.sendall(p.request(p.Cmd.TRIM, 6, 0, 1 * MiB))
    assert simple_reply(s)[:2] == (p.Err.EINVAL, 6)
    s.sendall(p.request(p.Cmd.CACHE, 7, 0, 8 * MiB))
    assert simple_reply(s)[:2] == (0, 7)
    s.sendall(p.request(p.Cmd.READ, 8, 0, 4096))
    assert simple_reply(s, 4096) == (0, 8, b"\x5a" * 4096)
    # Then bad request magic: the connection is dropped.
    s.sendall(b"\x12\x34\x56\x78" + b"\x00" * 24)
    assert peer_closed(s)
    s.close()
    # An oversized write is a protocol error too.
    s = nbd_negotiate_simple(nbd, "w")
    s.sendall(p.request(p.Cmd.WRITE, 9, 0, 64 * MiB)[:28])
    assert peer_closed(s)
    s.close()
    # A flood of reads whose replies are never read, then a write that never ends.
    s = nbd_negotiate_simple(nbd, "ro")
    s.setblocking(False)
    flood = b"".join(p.request(p.Cmd.READ, h, 0, 1 * MiB) for h in range(4000))
    try:
        s.sendall(flood)
    except (BlockingIOError, socket.timeout):
        pass  # the server stopped reading: what it should do
    keep.append(s)
    s = nbd_negotiate_simple(nbd, "w")
    s.sendall(p.request(p.Cmd.WRITE, 10, 0, 1 * MiB)[:28] + b"\x01" * 1000)
    keep.append(s)
    return keep


def _hostile_qmp(qmp: str) -> list[socket.socket]:
    keep = []
    for junk in (b"{" * 5000, b"[" * 2000 + b"]" * 2000, b'"' + b"x" * 200000,
                 b"\xff\xfe\x00" * 1000, b'{"execute":' * 3000,
                 b'{"execute":"qmp_capabilities"}' + b'{"execute":"query-version"}' * 2000):
        s = socket.socket(socket.AF_UNIX)
        s.connect(qmp)
        s.sendall(junk)
        keep.append(s)  # none of them reads a reply
    s = socket.socket(socket.AF_UNIX)
    s.connect(qmp)
    s.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-ver')
    s.close()
    return keep


def test_malformed_traffic_does_not_stop_good_clients(served, tmp_path):
    daemon, nbd, ro_image = served
    with open(ro_image, "rb") as f:
        ro_before = f.read()
    good = daemon.client()
    baseline = _fds(daemon.proc.pid)
    rss_before = _rss(daemon.proc.pid)
    results: dict[str, object] = {}

    def nbd_worker() -> None:
        cmds = []
        for i in range(6):
            cmds += ["-c", f"write -P {i + 1} {i}M 1M", "-c", f"read -P {i + 1} {i}M 1M"]
        out = subprocess.run(["qemu-io", "-f", "raw", *cmds, uri(nbd, "w")],
                             capture_output=True, text=True, timeout=WAIT)
        results["nbd"] = (out.returncode, out.stdout + out.stderr)

    def qmp_worker() -> None:
        for _ in range(100):
            assert good.cmd("query-version")["return"]["qemu"]["major"] == 7
        results["qmp"] = True

    workers = [threading.Thread(target=nbd_worker), threading.Thread(target=qmp_worker)]
    for t in workers:
        t.start()
    stalled = _hostile_nbd(nbd) + _hostile_qmp(daemon.sock_path)
    for t in workers:
        t.join(WAIT)
    code, output = results["nbd"]
    assert code == 0 and "Pattern verification failed" not in output, output
    assert results["qmp"] is True
    assert good.cmd("query-block-exports")["return"][0]["id"] in ("ew", "er")
    assert daemon.proc.poll() is None
    # 4000 one-MiB reads were asked for and never collected: only a bounded part ran.
    assert _rss(daemon.proc.pid) - rss_before < 256 * MiB
    for s in stalled:
        s.close()
    assert _wait_fds(daemon.proc.pid, baseline) == baseline
    assert good.cmd("query-version")["return"]["qemu"]["major"] == 7
    with open(ro_image, "rb") as f:
        assert f.read() == ro_before


def _greeted(s: socket.socket, timeout: float) -> bool:
    """Whether the server's greeting arrives within ``timeout``."""
    s.settimeout(timeout)
    try:
        return len(recv_exact(s, 18)) == 18
    except (socket.timeout, TimeoutError):
        return False


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
@pytest.mark.parametrize("qsd", [True, False], ids=["qsd", "blockd"])
@pytest.mark.parametrize("limit", [None, 2])
def test_max_connections(tmp_path, qsd, limit):
    """Clients over the limit (100 unless max-connections says) wait unanswered in the
    backlog until a connection ends, as in QEMU 7.2's stable releases."""
    image = tmp_path / "a.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "1M"], check=True)
    nbd = str(tmp_path / "nbd.sock")
    opt = "" if limit is None else f",max-connections={limit}"
    with Daemon(str(tmp_path / "qmp.sock"),
                "--blockdev", f"driver=file,node-name=f0,filename={image}",
                "--nbd-server", f"addr.type=unix,addr.path={nbd}{opt}",
                "--export", "type=nbd,id=e0,node-name=f0,name=a", qsd=qsd,
                stderr=subprocess.DEVNULL) as d:
        served = [nbd_negotiate_simple(nbd, "a") for _ in range(limit or 100)]
        waiting = nbd_connect(nbd)
        # Absence can only be checked for a while; a late greeting would fail below.
        assert not _greeted(waiting, 1.0)
        served[0].sendall(p.request(p.Cmd.DISC, 1))
        assert peer_closed(served[0])
        assert _greeted(waiting, WAIT)
        served[1].sendall(p.request(p.Cmd.READ, 2, 0, 512))
        assert simple_reply(served[1], 512) == (0, 2, bytes(512))
        for s in [*served, waiting]:
            s.close()
        assert d.proc.poll() is None


def test_sockets_are_private(served):
    daemon, nbd, _ = served
    for path in (daemon.sock_path, nbd):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_qmp_client_limit(tmp_path):
    with Daemon(str(tmp_path / "qmp.sock")) as d:
        socks = []
        for _ in range(80):
            socks.append(connect_unix(d.sock_path))
        # The first 64 get a greeting; the rest are closed without one.
        greeted = 0
        for s in socks:
            s.settimeout(WAIT)
            try:
                greeted += s.recv(1).startswith(b"{")
            except (ConnectionResetError, socket.timeout):
                pass
        assert greeted == 64
        for s in socks:
            s.close()
        time.sleep(0.2)
        assert d.client().cmd("query-version")["return"]["qemu"]["major"] == 7


def test_nbd_handshake_timeout(tmp_path, monkeypatch):
    """A client that never finishes the handshake is dropped (in process, short timeout)."""
    monkeypatch.setattr(nbd_server, "HANDSHAKE_TIMEOUT", 0.3)

    class NoDaemon:
        exports: dict = {}

    async def body() -> bool:
        daemon = NoDaemon()
        daemon.started = asyncio.Event()
        daemon.started.set()
        server = nbd_server.NBDServer(daemon)  # type: ignore[arg-type]
        path = str(tmp_path / "n.sock")
        await server.listen_unix(path)
        reader, writer = await asyncio.open_unix_connection(path)
        await reader.readexactly(18)
        writer.write(p.client_flags())
        closed = await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()
        await server.stop()
        return closed and not server.connections

    assert asyncio.run(body())


def _send_ignoring_close(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:
        pass  # the test hung up first


def test_json_burst_does_not_stall_others(tmp_path):
    """Megabytes of well-formed JSON tokens are parsed a slice at a time between other
    clients' commands, so a query answers quickly while the burst is still being parsed.

    "Quickly" is relative to the burst, so a busy machine slows both alike: parsed
    in one go, the burst would hold the first query for nearly all of its time.
    """
    with Daemon(str(tmp_path / "qmp.sock")) as d:
        good = d.client()
        burst = connect_unix(d.sock_path)
        burst.settimeout(WAIT)
        start = time.monotonic()
        payload = b"[" + b"1," * 600_000 + b'1]{"execute":"query-version","id":"end"}'
        sender = threading.Thread(target=_send_ignoring_close, args=(burst, payload))
        sender.start()
        time.sleep(0.2)
        worst = 0.0
        for _ in range(20):
            asked = time.monotonic()
            assert good.cmd("query-version")["return"]["qemu"]["major"] == 7
            worst = max(worst, time.monotonic() - asked)
        seen = b""
        while b'"id": "end"' not in seen:
            chunk = burst.recv(65536)
            assert chunk, seen[-200:]
            seen += chunk
        whole = time.monotonic() - start
        assert b"QMP input must be a JSON object" in seen
        assert worst < whole / 4, (worst, whole)
        sender.join(WAIT)
        burst.close()
        assert d.proc.poll() is None


def test_secrets_stay_out_of_replies_and_logs(tmp_path):
    """Wrong passwords, bad secret objects and failed opens: no reply, event or log line
    carries a secret's bytes."""
    secret, wrong = "Sup3r-Secret-Passw0rd", "Wr0ng-Secret-Guess"
    vol = str(tmp_path / "v.luks")
    made = qemu_tool("qemu-img", "create", "-q", "--object", f"secret,id=s,data={secret}",
                     "-f", "luks", "-o", "key-secret=s,iter-time=50", vol, "1M")
    assert made.returncode == 0, made.stderr
    secret_file = tmp_path / "s.txt"
    secret_file.write_text(secret)
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as log, \
            Daemon(str(tmp_path / "qmp.sock"), "--object", f"secret,id=s0,file={secret_file}",
                   stderr=log) as d:
        c = d.client()
        secret_file.write_text("changed after start")  # files holding secrets are read once
        replies = [
            c.cmd("object-add", **{"qom-type": "secret", "id": "s1", "data": wrong}),
            c.cmd("object-add", **{"qom-type": "secret", "id": "s1", "data": secret}),
            c.cmd("object-add", **{"qom-type": "secret", "id": "s2", "data": secret + "!!",
                                   "format": "base64"}),
            c.cmd("object-add", **{"qom-type": "secret", "id": "s3", "data": secret,
                                   "keyid": "s1"}),
            c.cmd("blockdev-add", **{"driver": "luks", "node-name": "bad", "key-secret": "s1",
                                     "file": {"driver": "file", "filename": vol}}),
            c.cmd("blockdev-add", **{"driver": "luks", "node-name": "good", "key-secret": "s0",
                                     "file": {"driver": "file", "filename": vol}}),
            c.cmd("query-named-block-nodes"),
            c.cmd("query-block"),
            c.cmd("blockdev-del", **{"node-name": "good"}),
        ]
        events = c.events(0.3)
    assert "return" in replies[5], replies[5]  # opened with the secret as first read
    assert "error" in replies[4]
    text = repr(replies) + repr(events) + log_path.read_text(errors="replace")
    for needle in (secret, wrong):
        assert needle not in text


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
def test_nul_in_file_names_is_a_name_like_qemus(tmp_path):
    """U+0000 in a QMP string reaches the OS as QEMU's C0 80 pair: an error, not a crash."""
    requests = [
        '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"x",'
        '"filename":"%s/a\\u0000b"}}' % tmp_path,
        '{"execute":"object-add","arguments":{"qom-type":"secret","id":"s",'
        '"file":"%s/a\\u0000b"}}' % tmp_path,
    ]
    replies = {}
    for who, qsd in (("blockd", False), ("qsd", True)):
        with Daemon(str(tmp_path / f"{who}.sock"), qsd=qsd) as d:
            c = d.client()
            replies[who] = []
            for req in requests:
                c.send(req)
                replies[who].append(c.recv_line())
            assert c.cmd("query-version")["return"]["qemu"]["major"] == 7
    assert replies["blockd"] == replies["qsd"]


def test_random_nbd_traffic(tmp_path):
    """Seeded random bytes at every stage of the protocol: the daemon logs no internal
    error, keeps serving, and gives back every descriptor."""
    rng = random.Random(5)
    image = tmp_path / "a.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "4M"], check=True)
    nbd = str(tmp_path / "nbd.sock")
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as log, \
            Daemon(str(tmp_path / "qmp.sock"),
                   "--blockdev", f"driver=file,node-name=f0,filename={image}",
                   "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                   "--export", "type=nbd,id=e0,node-name=f0,name=a,writable=on",
                   stderr=log) as d:
        c = d.client()
        baseline = _fds(d.proc.pid)
        cmds = [p.Cmd.READ, p.Cmd.WRITE, p.Cmd.DISC, p.Cmd.FLUSH, p.Cmd.TRIM, p.Cmd.CACHE,
                p.Cmd.WRITE_ZEROES, p.Cmd.BLOCK_STATUS, 9, 0xFFFF]
        for i in range(60):
            if i % 3 == 0:
                s = nbd_connect(nbd)
                recv_exact(s, 18)
                s.sendall(p.client_flags() + p.option_request(
                    rng.choice([1, 2, 3, 5, 6, 7, 8, 9, 10, 99]),
                    bytes(rng.getrandbits(8) for _ in range(rng.randrange(40)))))
            else:
                s = nbd_negotiate_simple(nbd, "a")
                for _ in range(rng.randrange(1, 20)):
                    cmd = rng.choice(cmds)
                    length = rng.choice([0, 1, 512, 4096, 1 << 20, 1 << 31, (1 << 32) - 1])
                    offset = rng.choice([0, 511, 4 << 20, (4 << 20) - 1, 1 << 62, (1 << 64) - 1])
                    flags = rng.getrandbits(16)
                    data = bytes(min(length, 8192)) if cmd == p.Cmd.WRITE else b""
                    try:
                        s.sendall(p.request(cmd, rng.getrandbits(64), offset, length, flags,
                                            data)[:rng.choice([28, 28, 28, 13])])
                    except (BrokenPipeError, ConnectionResetError):
                        break  # the server hung up on a protocol error: fine
            peer_closed(s, 0.05)  # give the server time to answer before hanging up
            s.close()
        assert c.cmd("query-version")["return"]["qemu"]["major"] == 7
        assert _wait_fds(d.proc.pid, baseline) == baseline
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]
