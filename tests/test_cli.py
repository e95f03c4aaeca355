"""The qemu-storage-daemon-compatible command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from blockd.errors import QMPError
from blockd.keyval import parse
from blockd.nbd import protocol as p
from harness import HAVE_QSD, ROOT, WAIT, Daemon, connect_unix, qemu_tool


def _run(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockd", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_keyval_parsing():
    assert parse("file,node-name=f0,cache.direct=on,filename=/a,,b", "driver") == {
        "driver": "file", "node-name": "f0", "cache": {"direct": "on"}, "filename": "/a,b"}
    assert parse("addr.type=unix,addr.path=/s") == {"addr": {"type": "unix", "path": "/s"}}
    assert parse("a.0=x,a.1=y") == {"a": ["x", "y"]}
    with pytest.raises(QMPError):
        parse("a=1,a.b=2")


def test_version_and_help():
    out = _run("-V")
    assert out.returncode == 0 and "blockd" in out.stdout
    out = _run("--help")
    assert out.returncode == 0 and "--blockdev" in out.stdout and "--nbd-server" in out.stdout


def test_unknown_option():
    out = _run("--bogus")
    assert out.returncode == 1
    assert out.stderr.strip() == "blockd: unrecognized option '--bogus'"


@pytest.mark.parametrize("option, message", [
    ("driver=file,node-name=x,filename=/nonexist",
     "Could not open '/nonexist': No such file or directory"),
    ("driver=file,node-name=x,filename=/etc/hostname,read-only=maybe",
     "Parameter 'read-only' expects 'on' or 'off'"),
    ('{"driver":"file","node-name":"x","filename":"/etc/hostname","read-only":"x"}',
     "Invalid parameter type for 'read-only', expected: boolean"),
    ("driver=nosuch,node-name=x", "Parameter 'driver' does not accept value 'nosuch'"),
])
def test_blockdev_errors_match_qmp(option, message):
    out = _run("--blockdev", option)
    assert out.returncode == 1
    assert out.stderr.strip() == f"blockd: --blockdev {option}: {message}"


def test_options_build_a_graph_and_sigterm_shuts_down(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * (1 << 20))
    pidfile = tmp_path / "pid"
    d = Daemon(str(tmp_path / "qmp.sock"),
               "--object", "secret,id=s0,data=pw",
               "--blockdev", f"driver=file,node-name=file0,filename={image}",
               "--blockdev", '{"driver":"raw","node-name":"disk0","file":"file0"}',
               "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
               "--export", "type=nbd,id=exp0,node-name=disk0,writable=on",
               "--pidfile", str(pidfile))
    try:
        c = d.client()
        names = [n["node-name"] for n in c.cmd("query-named-block-nodes")["return"]]
        assert names == ["disk0", "file0"]
        exports = c.cmd("query-block-exports")["return"]
        assert [e["id"] for e in exports] == ["exp0"]
        assert int(pidfile.read_text()) == d.proc.pid
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(WAIT) == 0
        assert not pidfile.exists()
    finally:
        d.stop()


def test_qmp_shortcut_and_daemonize(tmp_path):
    sock = tmp_path / "q.sock"
    pidfile = tmp_path / "pid"
    out = _run("--qmp", f"unix:{sock}", "--daemonize", "--pidfile", str(pidfile))
    assert out.returncode == 0
    pid = int(pidfile.read_text())
    try:
        assert sock.exists() and oct(sock.stat().st_mode & 0o777) == "0o600"
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + WAIT
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists()


def _go_reply(sock) -> int:
    """The final reply type of the NBD_OPT_GO a client sent (after the greeting)."""
    parser = p.ClientParser()
    while True:
        for event in parser.events():
            if isinstance(event, p.OptionReply) and event.reply != p.Rep.INFO:
                return event.reply
        data = sock.recv(65536)
        assert data, "the NBD server hung up"
        parser.receive_data(data)


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
@pytest.mark.parametrize("qsd", [True, False], ids=["qsd", "blockd"])
def test_monitor_serves_only_after_the_command_line(tmp_path, qsd):
    """A monitor given first greets at once but answers only once every option is applied;
    the NBD server, given early too, lets no client in before its export exists.

    A LUKS image whose key takes a while to derive keeps start-up busy after both
    sockets exist; ``quit`` sent meanwhile must still end the daemon.
    """
    image = str(tmp_path / "slow.luks")
    made = qemu_tool("qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=s0,data=pw",
                     "-o", "key-secret=s0,iter-time=1000", image, "1M")
    assert made.returncode == 0, made.stderr
    nbd = tmp_path / "nbd.sock"
    d = Daemon(str(tmp_path / "qmp.sock"), "--nbd-server", f"addr.type=unix,addr.path={nbd}",
               "--object", "secret,id=s0,data=pw",
               "--blockdev", f"driver=file,node-name=f0,filename={image}",
               "--blockdev", "driver=luks,node-name=l0,file=f0,key-secret=s0",
               "--export", "type=nbd,id=e0,node-name=l0", qsd=qsd, monitor_first=True,
               stderr=subprocess.DEVNULL)
    try:
        c = d.client(negotiate=False)
        assert "QMP" in c.greeting
        deadline = time.monotonic() + WAIT
        while not nbd.exists():
            assert time.monotonic() < deadline and d.proc.poll() is None
            time.sleep(0.02)
        client = connect_unix(str(nbd))
        client.settimeout(WAIT)
        # Sent at once, before any greeting: answered before the export exists, it fails.
        client.sendall(p.client_flags() + p.option_request(p.Opt.GO, p.info_request_data("l0")))
        c.send('{"execute": "qmp_capabilities"}')
        assert c.recv() == {"return": {}}
        assert [e["id"] for e in c.cmd("query-block-exports")["return"]] == ["e0"]
        assert _go_reply(client) == p.Rep.ACK
        client.close()
        c.send('{"execute": "quit"}')
        assert d.proc.wait(WAIT) == 0
    finally:
        d.stop()
