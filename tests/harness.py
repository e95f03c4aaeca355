"""Start blockd or qemu-storage-daemon and talk raw QMP to it.

Shared by the pytest suite and the iotests so both drive the daemon the
same way.  The client reads reply lines verbatim, so tests can compare
bytes with QEMU's, not just parsed values.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HAVE_QSD = shutil.which("qemu-storage-daemon") is not None

# QEMU 7.2 calibrates PBKDF2 by the CPU time its thread used; where that clock is
# coarse it sometimes reads zero and gives up with this message, however short
# the iter-time.  A failed try costs milliseconds, so tests simply try again.
CALIBRATION_FLAKE = "Unable to get accurate CPU usage"
CALIBRATION_TRIES = 200

#: Seconds any wait for a daemon (start, reply, event, exit) may take.  Generous: the
#: suite runs on busy 2-core machines where a reply can take many seconds.
WAIT = 120.0


def qemu_tool(*argv: str, cwd: Any = None) -> subprocess.CompletedProcess:
    """Run a QEMU tool, again while it fails only through its PBKDF2 calibration."""
    for _ in range(CALIBRATION_TRIES):
        r = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)
        if r.returncode == 0 or CALIBRATION_FLAKE not in r.stderr:
            break
    return r


def without_module_notes(stderr: str) -> str:
    """A QEMU tool's stderr without the notes Debian's build prints on every dmg open about
    its missing dmg modules (bzip2, lzfse): noise of the oracle, not part of its answer."""
    return "".join(line for line in stderr.splitlines(keepends=True)
                   if not line.startswith("qemu: module block-block-dmg-")
                   and "dmg-bzip2 module is missing" not in line)


def past_calibration(attempt: Callable[[int], T]) -> T:
    """Call attempt(n) until its result no longer mentions QEMU's calibration flake."""
    for n in range(CALIBRATION_TRIES):
        result = attempt(n)
        if CALIBRATION_FLAKE not in json.dumps(result, default=str):
            break
    return result


class Daemon:
    """A daemon process with a QMP monitor on a unix socket."""

    def __init__(self, sock_path: str, *args: str, qsd: bool = False, pretty: bool = False,
                 stderr: Any = None, monitor_first: bool = False, root: str = ROOT) -> None:
        """``root``: the checkout whose blockd runs (another one for before/after figures)."""
        self.sock_path = sock_path
        self.qsd = qsd
        cmd = ["qemu-storage-daemon"] if qsd else [sys.executable, "-m", "blockd.cli"]
        monitor = ["--chardev", f"socket,id=m,path={sock_path},server=on,wait=off",
                   "--monitor", "chardev=m" + (",pretty=on" if pretty else "")]
        # The monitor normally comes last: its socket appearing means every other option
        # is applied.  monitor_first puts it before them, to test start-up itself.
        cmd += [*monitor, *args] if monitor_first else [*args, *monitor]
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stderr=stderr)
        deadline = time.monotonic() + WAIT
        while not os.path.exists(sock_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("daemon did not create its socket")
            time.sleep(0.02)
        self.clients: list[Client] = []

    def client(self, negotiate: bool = True) -> "Client":
        # The socket file appears at bind(), a moment before listen(): retry briefly.
        deadline = time.monotonic() + WAIT
        while True:
            try:
                c = Client(self.sock_path)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        if negotiate:
            c.cmd("qmp_capabilities")
        self.clients.append(c)
        return c

    def stop(self) -> int:
        for c in self.clients:
            c.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def connect_unix(path: str, timeout: float = WAIT) -> socket.socket:
    """Connect, retrying while the socket exists but is not listening yet.

    A daemon binds (the path appears) a moment before it listens; on a busy
    machine a client can fall into that gap and be refused.
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(path)
            return sock
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Client:
    """A raw QMP connection."""

    def __init__(self, path: str) -> None:
        self.sock = connect_unix(path)
        self.buf = b""
        self.greeting = self.recv()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def recv_line(self, timeout: float = WAIT) -> bytes:
        """One reply line, including its CRLF."""
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def recv(self, timeout: float = WAIT) -> dict[str, Any]:
        return json.loads(self.recv_line(timeout))

    def reply_lines(self, quiet: float = 0.3) -> list[bytes]:
        """The lines a complete request brings: the first waited for as long as any
        reply, then whatever follows it until ``quiet``."""
        return [self.recv_line(), *self.lines_until_quiet(quiet)]

    def lines_until_quiet(self, quiet: float = 0.3) -> list[bytes]:
        """Every line that arrives until nothing comes for ``quiet`` seconds."""
        out = []
        while True:
            try:
                out.append(self.recv_line(quiet))
            except (socket.timeout, TimeoutError, EOFError, ConnectionResetError):
                return out

    def cmd(self, command: str, /, **args: Any) -> dict[str, Any]:
        """Run a command and return its reply, skipping events."""
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        self.send(json.dumps(msg))
        while True:
            reply = self.recv()
            if "event" not in reply:
                return reply

    def events_until(self, done: Callable[[dict[str, Any]], bool],
                     timeout: float = WAIT) -> list[dict[str, Any]]:
        """Events as they come, up to and including the first for which ``done`` holds."""
        out: list[dict[str, Any]] = []
        while not out or not done(out[-1]):
            msg = self.recv(timeout)
            if "event" in msg:
                out.append(msg)
        return out

    def events(self, timeout: float = 0.3) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines_until_quiet(timeout)]

    def create_job(self, job_id: str, options: dict[str, Any]) -> dict[str, Any]:
        """Run blockdev-create to its end and dismiss it; its concluded query-jobs entry."""
        assert self.cmd("blockdev-create", **{"job-id": job_id}, options=options) == \
            {"return": {}}
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            jobs = [j for j in self.cmd("query-jobs")["return"] if j["id"] == job_id]
            if jobs and jobs[0]["status"] == "concluded":
                assert self.cmd("job-dismiss", id=job_id) == {"return": {}}
                return jobs[0]
            self.events(0.05)
        raise AssertionError(f"job {job_id} did not conclude")

    def close(self) -> None:
        self.sock.close()


class Server:
    """An NBD server process (qemu-nbd, nbdkit...): ready once ``sock_path`` exists
    (its unix socket, or a pid file it writes after listening)."""

    def __init__(self, sock_path: str, *argv: str) -> None:
        self.sock_path = sock_path
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited: {self.proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[0]} did not create its socket")
            time.sleep(0.02)
        if stat.S_ISSOCK(os.stat(sock_path).st_mode):
            connect_unix(sock_path).close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        if os.path.exists(self.sock_path):
            os.unlink(self.sock_path)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
