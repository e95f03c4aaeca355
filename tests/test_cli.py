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
from harness import ROOT, Daemon


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
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
        assert d.proc.wait(15) == 0
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
    deadline = time.monotonic() + 10
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists()
