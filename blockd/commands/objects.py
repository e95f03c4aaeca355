"""QOM commands for user-creatable objects (secrets)."""

from __future__ import annotations

from typing import Any

from blockd.daemon import Daemon
from blockd.qmp.registry import command


@command("object-add")
async def object_add(daemon: Daemon, args: dict[str, Any]) -> dict:
    daemon.objects.add(args)
    return {}


@command("object-del")
async def object_del(daemon: Daemon, args: dict[str, Any]) -> dict:
    daemon.objects.delete(args["id"])
    return {}


@command("qom-list")
async def qom_list(daemon: Daemon, args: dict[str, Any]) -> list:
    return daemon.objects.qom_list(args["path"])


@command("qom-list-types")
async def qom_list_types(daemon: Daemon, args: dict[str, Any]) -> list:
    return daemon.objects.list_types(args.get("implements"), args.get("abstract", False))
