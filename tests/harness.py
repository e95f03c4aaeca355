"""What tests share: QEMU's tools, blockd-img, the daemons and raw clients.

- running QEMU's tools and blockd-img (:func:`sh`, :func:`qemu_img`,
  :func:`qemu_io`, :func:`blockd_img`, :func:`same`...);
- blockd or qemu-storage-daemon with a raw QMP client (:class:`Daemon`,
  :class:`Client`), other NBD servers (:class:`Server`);
- a raw NBD client on blockd's protocol module (:class:`NBDClient`, and the
  socket-level helpers hostile-client tests need).

Shared by the pytest suite and the iotests so both drive the daemon the
same way.  The QMP client reads reply lines verbatim, so tests can compare
bytes with QEMU's, not just parsed values.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import resource
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from blockd.nbd import protocol as p

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


#: Seconds a tool run by :func:`sh` may take before the test fails.
TOOL_TIMEOUT = 10 * WAIT


def sh(*cmd: str | os.PathLike, cwd: Any = None,
       timeout: float | None = TOOL_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a command with its output captured as text; the caller checks the result."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False,
                          cwd=cwd, timeout=timeout)


def sh_ok(*cmd: str | os.PathLike, cwd: Any = None, timeout: float | None = TOOL_TIMEOUT) -> str:
    """A command's stdout; the test fails if the command does."""
    out = sh(*cmd, cwd=cwd, timeout=timeout)
    assert out.returncode == 0, (cmd, out.stdout, out.stderr)
    return out.stdout


def qemu_img(*args: str | os.PathLike, cwd: Any = None) -> subprocess.CompletedProcess:
    """qemu-img, again while it fails only through its PBKDF2 calibration."""
    return qemu_tool("qemu-img", *[str(a) for a in args], cwd=cwd)


def qemu_img_ok(*args: str | os.PathLike, cwd: Any = None) -> str:
    """qemu-img's stdout; the test fails if qemu-img does."""
    out = qemu_img(*args, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def qemu_io(fmt: str | None, target: str | os.PathLike, *cmds: str, pre: Sequence[str] = (),
            timeout: float | None = TOOL_TIMEOUT) -> subprocess.CompletedProcess:
    """qemu-io running ``cmds`` on ``target`` (with ``-f fmt`` unless None; ``pre``: options
    before them, such as ``--object`` and ``--image-opts``)."""
    args = ["qemu-io", *pre, *(["-f", fmt] if fmt is not None else [])]
    for c in cmds:
        args += ["-c", c]
    return sh(*args, target, timeout=timeout)


def qemu_io_ok(fmt: str | None, target: str | os.PathLike, *cmds: str,
               pre: Sequence[str] = ()) -> None:
    """qemu-io as :func:`qemu_io`, 100 commands per run; the test fails if it fails or
    says "error" or "fail" (in any case)."""
    for i in range(0, max(1, len(cmds)), 100):
        out = qemu_io(fmt, target, *cmds[i:i + 100], pre=pre)
        low = out.stdout.lower()
        assert out.returncode == 0 and "error" not in low and "fail" not in low, \
            out.stdout + out.stderr


def luks_io(path: str | os.PathLike, *cmds: str, secret: str = "pw") -> subprocess.CompletedProcess:
    """qemu-io on a LUKS image whose passphrase is ``secret``."""
    return qemu_io(None, f"driver=luks,key-secret=s0,file.filename={path}", *cmds,
                   pre=["--object", f"secret,id=s0,data={secret}", "--image-opts"])


def blockd_img(*args: str, cwd: Path) -> tuple[str, str, int]:
    """(stdout, stderr, status) of blockd-img run in-process in ``cwd``."""
    from blockd.img.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(old)
    return out.getvalue(), err.getvalue(), code


def blockd_img_run(*args: str | os.PathLike, cwd: Any = ROOT, timeout: float | None = TOOL_TIMEOUT,
                   fsize: int | None = None) -> subprocess.CompletedProcess:
    """blockd-img of this checkout in a child process, for what must not touch pytest's
    process: exits, signals, a file size limit (``fsize`` bytes)."""
    limit = None if fsize is None else \
        functools.partial(resource.setrlimit, resource.RLIMIT_FSIZE, (fsize, fsize))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "blockd.img.cli", *[str(a) for a in args]],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
                          preexec_fn=limit)


def same(cwd: Path, *args: str) -> tuple[str, str, int]:
    """Run qemu-img and blockd-img on the same arguments and assert identical results."""
    q = qemu_img(*args, cwd=cwd)
    b = blockd_img(*args, cwd=cwd)
    assert b == (q.stdout, q.stderr.replace("qemu-img", "blockd-img"), q.returncode), args
    return b


def map_json(path: Path) -> list[dict]:
    """``qemu-img map --output=json`` of an image."""
    return json.loads(qemu_img("map", "--output=json", str(path)).stdout)


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

    def export_del(self, export_id: str, timeout: float = WAIT) -> dict[str, Any]:
        """``block-export-del`` in safe mode, once the export's last client is gone: an NBD
        client that just exited may not have been seen to disconnect yet (by either
        daemon, on a busy machine), and safe mode refuses an export still in use."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self.cmd("block-export-del", id=export_id)
            if "still in use" not in reply.get("error", {}).get("desc", "") \
                    or time.monotonic() > deadline:
                return reply
            time.sleep(0.05)

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


def graph_shape(graph: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]:
    """An ``x-debug-query-block-graph`` reply with its opaque ids replaced by names.

    Node names stand for themselves; QEMU's random implicit ``#blockN`` names become
    "<parent>/<edge>", an anonymous backend "block-backend:<its node>", so the same
    graph built in qsd and in blockd gives equal shapes.  Sorted, since the order
    of nodes follows each daemon's creation order.
    """
    nodes = {n["id"]: n for n in graph["nodes"]}
    edges = graph["edges"]

    def name(node_id: int) -> str:
        node = nodes[node_id]
        if node["type"] == "block-driver" and node["name"].startswith("#block"):
            up = next(e for e in edges if e["child"] == node_id
                      and nodes[e["parent"]]["type"] == "block-driver")
            return f"{name(up['parent'])}/{up['name']}"
        if node["type"] == "block-backend" and not node["name"]:
            below = [name(e["child"]) for e in edges if e["parent"] == node_id]
            return "block-backend:" + ",".join(below)
        return node["name"]

    return {"nodes": sorted((n["type"], name(i)) for i, n in nodes.items()),
            "edges": sorted((name(e["parent"]), name(e["child"]), e["name"],
                             tuple(e["perm"]), tuple(e["shared-perm"])) for e in edges)}


# ---- the same QMP bytes to qemu-storage-daemon and to blockd ------------------------


def qmp_normalise(line: bytes, tmp: str) -> str:
    """Mask version and time; sort qom-list output (QEMU's order is a GLib hash order)."""
    text = line.decode("utf-8")
    if text.startswith('{"return": [{"name": "type", "type": "string"}'):
        entries = json.loads(text)["return"]
        text = json.dumps(sorted(entries, key=lambda e: e["name"])) + "\r\n"
    text = re.sub(r'\{"micro": \d+, "minor": \d+, "major": \d+\}, "package": "[^"]*"', "VERSION", text)
    text = re.sub(r'"seconds": \d+, "microseconds": \d+', "TIME", text)
    # Implicit node names carry two random digits in QEMU.
    text = re.sub(r"#block\d+", "#blockN", text)
    return text.replace(tmp, "TMP")


#: Sent after a session: an invalid byte ends whatever JSON is pending, then a command
#: whose reply marks the end of the output.  Both daemons get it, so its replies are
#: compared too; it makes the session's tail independent of how fast replies come.
QMP_SYNC = b'\n\xff\n{"execute":"query-version","id":"sync"}\n'


def qmp_transcript(daemon: Daemon, writes: list[bytes | str], tmp: str) -> list[str]:
    """The daemon's normalised lines: its greeting, then what each write got back."""
    client = daemon.client(negotiate=False)
    out = [qmp_normalise(json.dumps(client.greeting).encode(), tmp)]
    for data in writes:
        client.send(data)
        lines = client.lines_until_quiet(0.25)
        if daemon.qsd:
            # qsd 7.2 has been seen (once, on a loaded machine) to send its greeting a
            # second time on the same connection; that is the oracle's noise, not a reply.
            lines = [line for line in lines if not line.startswith(b'{"QMP": ')]
        out += [qmp_normalise(line, tmp) for line in lines]
    try:
        client.send(QMP_SYNC)
    except OSError:
        return out  # the session ended the connection (quit)
    while True:
        try:
            line = client.recv_line()
        except (EOFError, ConnectionResetError):
            return out
        out.append(qmp_normalise(line, tmp))
        if b'"id": "sync"' in line:
            return out


def qsd_and_blockd(tmp_path: Path, writes: list[bytes | str],
                   setup: Callable[[Path], None] | None = None) -> tuple[list[str], list[str]]:
    """(qsd's, blockd's) transcripts of the same session, each daemon in a folder of its
    own (``TMP`` in the writes names it) that ``setup`` prepares first."""
    results = []
    for qsd in (True, False):
        work = tmp_path / ("qsd" if qsd else "blockd")
        work.mkdir()
        if setup:
            setup(work)
        text = [w.replace("TMP", str(work)) if isinstance(w, str) else w for w in writes]
        with Daemon(str(work / "qmp.sock"), qsd=qsd) as daemon:
            results.append(qmp_transcript(daemon, text, str(work)))
    return results[0], results[1]


# ---- a raw NBD client -----------------------------------------------------------------


def nbd_connect(path: str) -> socket.socket:
    """A connection to an NBD server's unix socket, nothing read yet."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(WAIT)
    s.connect(path)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def nbd_negotiate_simple(path: str, name: str) -> socket.socket:
    """Fixed newstyle, NBD_OPT_GO without structured replies, read without the parser:
    a socket in transmission that gets simple replies only."""
    s = nbd_connect(path)
    recv_exact(s, 18)
    s.sendall(p.client_flags())
    s.sendall(p.option_request(p.Opt.GO, p.info_request_data(name)))
    while True:
        _, _, rep, length = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, length)
        if rep == p.Rep.ACK:
            return s
        assert rep < 1 << 31, f"GO refused: {rep:#x}"


def simple_reply(s: socket.socket, n: int = 0) -> tuple[int, int, bytes]:
    """(error, handle, data) of a simple reply carrying ``n`` bytes when it succeeds."""
    magic, error, handle = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == 0x67446698
    return error, handle, recv_exact(s, n) if not error else b""


def peer_closed(s: socket.socket, timeout: float = WAIT) -> bool:
    """Whether the server closed the connection (EOF or reset) within ``timeout``."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (socket.timeout, TimeoutError):
        return False


class NBDClient:
    """A raw NBD client on the protocol module's parser, one event at a time."""

    def __init__(self, path: str) -> None:
        self.s = nbd_connect(path)
        self.parser = p.ClientParser()
        self.pending: list = []
        self.handle = 0

    @classmethod
    def open(cls, path: str, name: str, structured: bool = False,
             contexts: Sequence[str] = ()) -> "NBDClient":
        """A client past the handshake, in transmission on export ``name``."""
        client = cls(path)
        assert isinstance(client.event(), p.Greeting)
        client.go(name, structured, contexts)
        return client

    def event(self) -> Any:
        """The next event, or "closed" once the server hung up."""
        while not self.pending:
            self.pending.extend(self.parser.events())
            if self.pending:
                break
            try:
                data = self.s.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return "closed"
            self.parser.receive_data(data)
        return self.pending.pop(0)

    def events(self, n: int) -> list:
        """The next ``n`` events; ConnectionError if the server hangs up first."""
        out = []
        for _ in range(n):
            ev = self.event()
            if ev == "closed":
                raise ConnectionError("server went away")
            out.append(ev)
        return out

    def go(self, name: str, structured: bool = False, contexts: Sequence[str] = ()) -> int:
        """Handshake (after the greeting) to transmission; the export's transmission flags.

        ``contexts``: metadata contexts to set first (with structured replies).
        """
        self.s.sendall(p.client_flags())
        if structured:
            self.s.sendall(p.option_request(p.Opt.STRUCTURED_REPLY))
            assert self.event().reply == p.Rep.ACK
        if contexts:
            self.s.sendall(p.option_request(p.Opt.SET_META_CONTEXT,
                                            p.meta_context_data(name, list(contexts))))
            replies = self.events(len(contexts) + 1)
            assert [r.reply for r in replies] == [p.Rep.META_CONTEXT] * len(contexts) + [p.Rep.ACK]
        self.s.sendall(p.option_request(p.Opt.GO, p.info_request_data(name)))
        flags = 0
        while (reply := self.events(1)[0]).reply != p.Rep.ACK:
            kind, value = p.parse_rep_info(reply.data)
            if kind == p.Info.EXPORT:
                flags = value[1]
        self.parser.start_transmission()
        return flags

    def call(self, cmd: int, offset: int = 0, data: bytes = b"", length: int = 0,
             flags: int = 0) -> int:
        """One request without a payload to read back; the error of its simple reply."""
        self.handle += 1
        self.s.sendall(p.request(cmd, self.handle, offset, length or len(data), flags, data))
        reply = self.events(1)[0]
        assert reply.handle == self.handle
        return reply.error

    def ask(self, cmd: int, flags: int, offset: int, length: int, data: bytes = b"") -> Any:
        """Send one request (handle 1); its error as the reply mode gives it (the
        chunk type and error of a structured reply, which is read to its end)."""
        if cmd == p.Cmd.READ:
            self.parser.expect_read(1, length)
        self.s.sendall(p.request(cmd, 1, offset, length, flags, data))
        reply = self.event()
        if not isinstance(reply, p.StructuredChunk):
            return ("simple", reply.error)
        answer = (reply.type, p.parse_error_chunk(reply.payload)[:2]
                  if reply.type & 0x8000 else b"")
        while not reply.done:
            reply = self.event()
        return answer

    def write(self, offset: int, data: bytes, fua: bool = False) -> int:
        return self.call(p.Cmd.WRITE, offset, data, flags=p.CmdFlag.FUA if fua else 0)

    def flush(self) -> int:
        return self.call(p.Cmd.FLUSH)

    def close(self) -> None:
        self.s.close()


async def open_user(graph: Any, options: dict[str, Any], writable: bool = True) -> Any:
    """Open a node and hold it as qemu-io does, through a user's edge: its requests
    take the request path (bounds, permissions, padding, dirty bitmaps) and the
    permissions it takes flow down to filters and their children."""
    from blockd.block.backend import Backend
    from blockd.block.node import Perm

    node = await graph.open_node(options)
    perm = Perm.CONSISTENT_READ | (Perm.WRITE | Perm.RESIZE if writable else Perm(0))
    return Backend(graph, node, "an unnamed block device", perm, Perm.all())
