"""NBD server and block export commands."""

from __future__ import annotations

import re
from typing import Any

from blockd.daemon import Daemon
from blockd.errors import QMPError
from blockd.exports import Export
from blockd.nbd.server import DEFAULT_MAX_CONNECTIONS, NBDServer
from blockd.qmp.registry import command

_EXPORT_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")


@command("nbd-server-start")
async def nbd_server_start(daemon: Daemon, args: dict[str, Any]) -> dict:
    if daemon.nbd is not None:
        raise QMPError("NBD server already running")
    if "tls-creds" in args:
        raise QMPError(f"No TLS credentials with id '{args['tls-creds']}'")
    if "tls-authz" in args:
        raise QMPError("'tls-authz' is not supported without 'tls-creds'")
    addr = args["addr"]
    server = NBDServer(daemon, args.get("max-connections", DEFAULT_MAX_CONNECTIONS))
    data = addr["data"]
    try:
        if addr["type"] == "unix":
            if data.get("abstract"):
                raise QMPError("Abstract unix sockets are not supported by blockd")
            await server.listen_unix(data["path"])
        else:  # inet: the schema lists only the address types blockd serves
            try:
                port = int(data["port"])
            except ValueError:
                raise QMPError(f"Service '{data['port']}' is not a valid port number") from None
            await server.listen_inet(data["host"], port)
    except OSError as exc:
        await server.stop()
        raise QMPError(f"Failed to bind socket: {exc.strerror}") from None
    daemon.nbd = server
    return {}


@command("nbd-server-stop")
async def nbd_server_stop(daemon: Daemon, args: dict[str, Any]) -> dict:
    if daemon.nbd is None:
        raise QMPError("NBD server not running")
    for export in reversed(list(daemon.exports.values())):
        await export.delete()
    await daemon.nbd.stop()
    daemon.nbd = None
    return {}


def add_export(daemon: Daemon, options: dict[str, Any]) -> Export:
    """Checks in QEMU's order, then the export (it takes its permissions on creation).

    Only NBD exports exist: the schema's ``BlockExportType`` lists no other.
    """
    if daemon.nbd is None:
        raise QMPError("NBD server not running")
    export_id = options["id"]
    if not _EXPORT_ID.match(export_id):
        raise QMPError("Invalid block export id")
    if export_id in daemon.exports:
        raise QMPError(f"Block export id '{export_id}' is already in use")
    name = options.get("name", options["node-name"])
    if len(name.encode()) > 4096:
        raise QMPError(f"export name '{name}' too long")
    if any(e.name == name for e in daemon.exports.values()):
        raise QMPError(f"NBD server already has export named '{name}'")
    if len(options.get("description", "").encode()) > 4096:
        raise QMPError(f"description '{options['description']}' too long")
    export = Export(daemon, options)
    daemon.exports[export_id] = export
    return export


@command("block-export-add")
async def block_export_add(daemon: Daemon, args: dict[str, Any]) -> dict:
    add_export(daemon, args)
    return {}


async def _delete(daemon: Daemon, export_id: str, mode: str) -> None:
    export = daemon.exports.get(export_id)
    if export is None or export.shutting_down:
        raise QMPError(f"Export '{export_id}' is not found")
    await export.delete(hard=mode == "hard")


@command("block-export-del")
async def block_export_del(daemon: Daemon, args: dict[str, Any]) -> dict:
    await _delete(daemon, args["id"], args.get("mode", "safe"))
    return {}


@command("query-block-exports")
async def query_block_exports(daemon: Daemon, args: dict[str, Any]) -> list:
    return [e.info() for e in reversed(list(daemon.exports.values()))]


@command("nbd-server-add")
async def nbd_server_add(daemon: Daemon, args: dict[str, Any]) -> dict:
    """The pre-5.2 way to export: the export id is its name."""
    name = args.get("name", args["device"])
    options: dict[str, Any] = {"type": "nbd", "id": name, "node-name": args["device"],
                               "name": name, "writable": args.get("writable", False)}
    if "description" in args:
        options["description"] = args["description"]
    if "bitmap" in args:
        options["bitmaps"] = [args["bitmap"]]
    add_export(daemon, options)
    return {}


@command("nbd-server-remove")
async def nbd_server_remove(daemon: Daemon, args: dict[str, Any]) -> dict:
    await _delete(daemon, args["name"], args.get("mode", "safe"))
    return {}
