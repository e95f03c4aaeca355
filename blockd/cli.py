"""``blockd``: the daemon's command line, a drop-in for qemu-storage-daemon's.

Options are processed in the order given, each through the same schema
validation and handler as the equivalent QMP command, so a bad
``--blockdev`` fails with the text ``blockdev-add`` would return.  A
``--qmp unix:PATH`` / ``--qmp stdio`` shortcut saves the
``--chardev``/``--monitor`` pair.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import sys
from typing import Any, Callable, Coroutine, NoReturn

import blockd
from blockd.daemon import Daemon
from blockd.errors import QMPError
from blockd.keyval import parse as parse_keyval, typed
from blockd.qmp.dispatch import Dispatcher
from blockd.qmp.server import Monitor

PROG = "blockd"

USAGE = f"""Usage: {PROG} [options]
blockd: a block-storage daemon speaking QMP (compatible with qemu-storage-daemon {'.'.join(map(str, blockd.QEMU_VERSION))})

  -h, --help             display this help and exit
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]   (or a JSON object)
                         configure a block node
  --chardev socket,id=<id>,path=<path>[,server=on][,wait=off]
  --chardev socket,id=<id>,host=<host>,port=<port>[,server=on][,wait=off]
  --chardev stdio,id=<id>
                         configure a character device for a monitor
  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete
  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)
  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor
  --qmp unix:<path> | tcp:<host>:<port> | stdio
                         shortcut for a --chardev and --monitor pair
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
                         start an NBD server for exporting block nodes
  --object secret,id=<id>[,data=<data>|,file=<path>][,format=raw|base64]
           [,keyid=<id>,iv=<base64>]
                         create a new object (blockd supports 'secret')
  --pidfile <path>       write process ID to a file after startup
"""

_WITH_ARG = {"--blockdev", "--chardev", "--export", "--monitor", "--nbd-server",
             "--object", "--pidfile", "--qmp", "-T", "--trace"}
_NO_ARG = {"-h", "--help", "-V", "--version", "--daemonize"}


class UsageError(Exception):
    pass


def parse_argv(argv: list[str]) -> list[tuple[str, str | None]]:
    """Split argv into (option, value) pairs in order; accepts ``--opt=value``."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        opt, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if opt in _NO_ARG and not eq:
            out.append((opt, None))
        elif opt in _WITH_ARG:
            if eq:
                out.append((opt, inline))
            elif i + 1 < len(argv):
                i += 1
                out.append((opt, argv[i]))
            else:
                raise UsageError(f"option '{opt}' requires an argument")
        elif arg.startswith("-"):
            raise UsageError(f"unrecognized option '{arg}'")
        else:
            raise UsageError(f"Unexpected argument: {arg}")
        i += 1
    return out


class Launcher:
    """Applies command line options to a fresh daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.dispatcher = Dispatcher(daemon)
        self.chardevs: dict[str, dict[str, Any]] = {}
        self.monitors: list[Monitor] = []

    async def execute(self, command: str, args: dict[str, Any]) -> Any:
        """Run a QMP command's validation and handler; raise QMPError on failure."""
        self.dispatcher.schema.validate(command, args)
        return await self.dispatcher.commands[command].handler(self.daemon, args)

    def _options(self, text: str, command: str, implied: str | None) -> dict[str, Any]:
        if text.lstrip().startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise QMPError(f"JSON parse error, {exc.msg}") from None
            if not isinstance(value, dict):
                raise QMPError("JSON option must be an object")
            return value
        doc = self.dispatcher.schema.commands[command]
        return typed(self.dispatcher.schema, doc, parse_keyval(text, implied))

    async def apply(self, opt: str, value: str) -> None:
        if opt == "--object":
            if value in ("help", "secret,help"):
                print("secret" if value == "help" else "secret options: data, file, format, keyid, iv, loaded")
                raise SystemExit(0)
            await self.execute("object-add", self._options(value, "object-add", "qom-type"))
        elif opt == "--blockdev":
            await self.execute("blockdev-add", self._options(value, "blockdev-add", "driver"))
        elif opt == "--nbd-server":
            args = self._options(value, "nbd-server-start", None)
            await self.execute("nbd-server-start", _legacy_addr(args))
        elif opt == "--export":
            await self.execute("block-export-add", self._options(value, "block-export-add", "type"))
        elif opt == "--chardev":
            self._chardev(value)
        elif opt == "--monitor":
            await self._monitor(value)
        elif opt == "--qmp":
            await self._qmp_shortcut(value)
        elif opt in ("-T", "--trace"):
            logging.getLogger("blockd").setLevel(logging.DEBUG)

    def _chardev(self, text: str) -> None:
        opts = parse_keyval(text, "backend")
        cid = opts.get("id")
        if cid is None:
            raise QMPError("chardev: no id specified")
        if cid in self.chardevs:
            raise QMPError(f"attempt to add duplicate property '{cid}' to object (type 'container')")
        backend = opts.get("backend")
        if backend not in ("socket", "stdio"):
            raise QMPError(f"'{backend}' is not a valid char driver name")
        if backend == "socket" and "path" not in opts and "port" not in opts:
            raise QMPError("chardev: socket: no host given")
        self.chardevs[cid] = opts

    async def _monitor(self, text: str) -> None:
        opts = parse_keyval(text, "chardev")
        cid = opts.get("chardev")
        if cid not in self.chardevs:
            raise QMPError(f"chardev \"{cid}\" not found")
        if opts.get("mode", "control") != "control":
            raise QMPError("Only QMP monitors are supported")
        pretty = opts.get("pretty", "off") in ("on", "yes", "true", "y", "")
        await self._listen(self.chardevs[cid], pretty)

    async def _listen(self, chardev: dict[str, Any], pretty: bool) -> None:
        monitor = Monitor(self.dispatcher, pretty=pretty)
        if chardev.get("backend") == "stdio":
            await monitor.attach_stdio()
        elif "path" in chardev:
            await monitor.listen_unix(chardev["path"])
        else:
            await monitor.listen_tcp(chardev.get("host", "localhost"), int(chardev["port"]))
        self.monitors.append(monitor)

    async def _qmp_shortcut(self, spec: str) -> None:
        if spec == "stdio":
            await self._listen({"backend": "stdio"}, False)
        elif spec.startswith("unix:"):
            await self._listen({"backend": "socket", "path": spec[5:]}, False)
        elif spec.startswith("tcp:"):
            host, _, port = spec[4:].rpartition(":")
            await self._listen({"backend": "socket", "host": host or "localhost", "port": port}, False)
        else:
            raise QMPError(f"--qmp expects unix:PATH, tcp:HOST:PORT or stdio, not '{spec}'")


def _legacy_addr(args: dict[str, Any]) -> dict[str, Any]:
    """--nbd-server takes a flat SocketAddress; the QMP command the legacy form."""
    addr = args.get("addr")
    if isinstance(addr, dict) and "data" not in addr and "type" in addr:
        data = {k: v for k, v in addr.items() if k != "type"}
        args = dict(args, addr={"type": addr["type"], "data": data})
    return args


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr)
    raise SystemExit(1)


async def run(options: list[tuple[str, str | None]], ready_fd: int | None = None) -> int:
    daemon = Daemon()
    launcher = Launcher(daemon)
    pidfile = None
    for opt, value in options:
        if opt == "--pidfile":
            pidfile = value
            continue
        if opt == "--daemonize" or value is None:
            continue
        try:
            await launcher.apply(opt, value)
        except QMPError as exc:
            await daemon.shutdown()
            _fail(f"{opt} {value}: {exc.desc}")
    if pidfile is not None:
        try:
            with open(pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as exc:
            _fail(f"cannot create PID file: {exc.strerror}")
    daemon.finish_startup()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, daemon.request_quit)
    if ready_fd is not None:
        # Start-up is done: let the parent exit and detach from its terminal.
        os.write(ready_fd, b"\0")
        os.close(ready_fd)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
    await daemon.quit_requested.wait()
    for monitor in launcher.monitors:
        await monitor.close()
    await daemon.shutdown()
    if pidfile is not None:
        try:
            os.unlink(pidfile)
        except OSError:
            pass
    return 0


def _daemonize() -> int:
    """Fork; the parent exits when the child reports start-up done."""
    rfd, wfd = os.pipe()
    if os.fork():
        os.close(wfd)
        ok = os.read(rfd, 1)
        os._exit(0 if ok else 1)
    os.close(rfd)
    os.setsid()
    return wfd


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    try:
        options = parse_argv(argv)
    except UsageError as exc:
        _fail(str(exc))
    flags = {opt for opt, _ in options}
    if flags & {"-h", "--help"}:
        print(USAGE, end="")
        return 0
    if flags & {"-V", "--version"}:
        print(f"{PROG} version {blockd.__version__} (QMP compatible with QEMU "
              f"{'.'.join(map(str, blockd.QEMU_VERSION))})")
        return 0
    ready_fd = _daemonize() if "--daemonize" in flags else None
    # Secrets and key material live in this process's memory: no core dump may copy them.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(run(options, ready_fd))


if __name__ == "__main__":
    sys.exit(main())
