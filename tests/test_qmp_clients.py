"""Real QMP clients from the qemu.qmp package against blockd."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading

import pytest
from qemu.qmp import EventListener, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from harness import WAIT, Daemon


@pytest.fixture
def daemon(tmp_path):
    with Daemon(str(tmp_path / "qmp.sock")) as d:
        yield d


def test_async_client_commands_and_events(daemon, tmp_path):
    async def run() -> None:
        qmp = QMPClient("test")
        await qmp.connect(daemon.sock_path)
        version = await qmp.execute("query-version")
        assert version["qemu"]["major"] == 7
        assert "blockd" in version["package"]
        names = {c["name"] for c in await qmp.execute("query-commands")}
        assert {"blockdev-add", "query-qmp-schema", "object-add"} <= names
        schema = await qmp.execute("query-qmp-schema")
        commands = {e["name"] for e in schema if e["meta-type"] == "command"}
        assert names <= commands | {"query-qmp-schema"}
        listener = EventListener()
        with qmp.listen(listener):
            await qmp.execute("blockdev-create", {"job-id": "j0", "options": {
                "driver": "file", "filename": str(tmp_path / "new.raw"), "size": 1 << 20}})
            statuses = []
            async for event in listener:
                assert event["event"] == "JOB_STATUS_CHANGE"
                statuses.append(event["data"]["status"])
                if statuses[-1] == "concluded":
                    break
        assert statuses == ["created", "running", "waiting", "pending", "concluded"]
        await qmp.execute("job-dismiss", {"id": "j0"})
        assert (tmp_path / "new.raw").stat().st_size == 1 << 20
        await qmp.disconnect()

    asyncio.run(run())


def test_legacy_sync_client(daemon):
    qmp = QEMUMonitorProtocol(daemon.sock_path)
    greeting = qmp.connect(negotiate=True)
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert qmp.cmd_obj({"execute": "query-version"})["return"]["qemu"]["minor"] == 2
    reply = qmp.cmd_obj({"execute": "object-add", "arguments": {
        "qom-type": "secret", "id": "s0", "data": "hunter2"}})
    assert reply == {"return": {}}
    listing = qmp.cmd_obj({"execute": "qom-list", "arguments": {"path": "/objects/s0"}})["return"]
    assert {"name": "data", "type": "string"} in listing
    assert "hunter2" not in json.dumps(listing)
    qmp.close()


def test_many_clients_and_events_broadcast(daemon, tmp_path):
    clients = [daemon.client() for _ in range(5)]
    clients[0].cmd("blockdev-create", **{"job-id": "j1", "options": {
        "driver": "file", "filename": str(tmp_path / "b.raw"), "size": 4096}})
    for c in clients:
        seen = c.events_until(lambda e: e["event"] == "JOB_STATUS_CHANGE"
                              and e["data"]["status"] == "concluded")
        assert seen[-1]["data"] == {"id": "j1", "status": "concluded"}


def test_bad_clients_do_not_harm_others(daemon):
    good = daemon.client()
    # A client that never negotiates and floods garbage.
    flood = socket.socket(socket.AF_UNIX)
    flood.connect(daemon.sock_path)
    flood.sendall(b"{" * 5000 + b"\xff\xfe" * 1000 + b'"' + b"x" * 100000)
    # A client that sends half a command and vanishes.
    half = socket.socket(socket.AF_UNIX)
    half.connect(daemon.sock_path)
    half.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-ver')
    half.close()
    # A client that stops reading while replies pile up.
    stall = socket.socket(socket.AF_UNIX)
    stall.connect(daemon.sock_path)
    stall.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stall.sendall(b'{"execute":"qmp_capabilities"}' + b'{"execute":"query-qmp-schema"}' * 50)

    done = []

    def work() -> None:
        for _ in range(50):
            assert good.cmd("query-version")["return"]["qemu"]["major"] == 7
        done.append(True)

    t = threading.Thread(target=work)
    t.start()
    t.join(WAIT)
    assert done == [True]
    for s in (flood, stall):
        s.close()
    assert daemon.proc.poll() is None


def test_qmp_shell(daemon):
    shell = shutil.which("qmp-shell")
    if shell is None:
        pytest.skip("qmp-shell not installed")
    script = "query-version\nobject-add qom-type=secret id=s0 data=abc\nqom-list path=/objects\n"
    out = subprocess.run([shell, daemon.sock_path], input=script, capture_output=True,
                         text=True, timeout=WAIT).stdout
    assert '"package": "blockd' in out
    assert '{"name": "s0", "type": "child<secret>"}' in out
    assert "abc" not in out.replace("data=abc", "")


def test_host_errors_are_not_internal_errors(monkeypatch):
    """An OSError no handler expected reaches the client as its text, never as
    "Internal error" (in process: no command is known to leak one today)."""
    import dataclasses
    import errno

    from blockd.daemon import Daemon as State
    from blockd.qmp.dispatch import Dispatcher, Request
    from blockd.qmp.session import SessionState

    async def failing(daemon, args):
        raise OSError(errno.EIO, "Input/output error")

    async def body() -> dict:
        dispatcher = Dispatcher(State())
        cmd = dispatcher.commands["query-version"]
        dispatcher.commands["query-version"] = dataclasses.replace(cmd, handler=failing)
        return await dispatcher.run(Request("query-version", {}, False, True, 7), SessionState())

    assert asyncio.run(body()) == {"id": 7, "error": {"class": "GenericError",
                                                      "desc": "Input/output error"}}
