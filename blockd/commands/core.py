"""Monitor-level commands: negotiation, version, introspection, quit."""

from __future__ import annotations

from typing import Any

import blockd
from blockd.daemon import Daemon
from blockd.jobs.job import cancel_all
from blockd.qmp import introspect
from blockd.qmp.session import SessionState
from blockd.qmp.registry import COMMANDS, command


@command("qmp_capabilities", wants_session=True)
async def qmp_capabilities(daemon: Daemon, args: dict[str, Any], *, session: SessionState) -> dict:
    session.oob_enabled = "oob" in args.get("enable", [])
    session.negotiated = True
    return {}


@command("query-version")
async def query_version(daemon: Daemon, args: dict[str, Any]) -> dict:
    major, minor, micro = blockd.QEMU_VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"blockd {blockd.__version__}"}


@command("query-commands")
async def query_commands(daemon: Daemon, args: dict[str, Any]) -> list:
    return [{"name": name} for name in COMMANDS]


@command("query-qmp-schema")
async def query_qmp_schema(daemon: Daemon, args: dict[str, Any]) -> list:
    return introspect.schema_info()


@command("quit")
async def quit_(daemon: Daemon, args: dict[str, Any]) -> dict:
    """End every job (qsd's events for that come before the reply), then reply; the
    session asks the daemon to shut down after sending."""
    await cancel_all(daemon)
    return {}
