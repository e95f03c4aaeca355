"""Turning a parsed QMP request into a reply, as QEMU's dispatcher does.

The checks run in QEMU's order and with its texts: the request's shape
(members visited in QDict order), capabilities negotiation, command
lookup, out-of-band permission, then argument validation against the
schema and finally the handler.  Everything here is independent of
sockets; :mod:`blockd.qmp.server` feeds it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from blockd.errors import QMPError
from blockd.qjson import qdict_keys
from blockd.qmp import registry
from blockd.qmp.schema import load as load_schema
from blockd.qmp.session import SessionState

if TYPE_CHECKING:
    from blockd.daemon import Daemon

log = logging.getLogger(__name__)

_NEGOTIATE = "Expecting capabilities negotiation with 'qmp_capabilities'"


@dataclasses.dataclass
class Request:
    """A request that passed the shape checks."""

    name: str
    arguments: dict[str, Any]
    oob: bool
    has_id: bool
    id: Any = None


def error_reply(desc: str, cls: str = "GenericError", *, has_id: bool = False,
                id: Any = None) -> dict[str, Any]:
    reply: dict[str, Any] = {}
    if has_id:
        reply["id"] = id
    reply["error"] = {"class": cls, "desc": desc}
    return reply


def parse_request(msg: Any, state: SessionState) -> Request | dict[str, Any]:
    """Check a message's shape; returns a Request or the error reply."""
    if not isinstance(msg, dict):
        return error_reply("QMP input must be a JSON object")
    has_id = "id" in msg
    ident = msg.get("id")

    def fail(desc: str) -> dict[str, Any]:
        return error_reply(desc, has_id=has_id, id=ident)

    for key in qdict_keys(msg):
        value = msg[key]
        if key in ("execute", "exec-oob"):
            if key == "exec-oob" and not state.oob_enabled:
                return fail("QMP input member 'exec-oob' is unexpected")
            if not isinstance(value, str):
                return fail(f"QMP input member '{key}' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                return fail("QMP input member 'arguments' must be an object")
        elif key != "id":
            return fail(f"QMP input member '{key}' is unexpected")
    if "execute" in msg and "exec-oob" in msg:
        return fail("QMP input member 'execute' clashes with 'exec-oob'")
    if "execute" not in msg and "exec-oob" not in msg:
        return fail("QMP input lacks member 'execute'")
    oob = "exec-oob" in msg
    name = msg["exec-oob"] if oob else msg["execute"]
    return Request(name, msg.get("arguments", {}), oob, has_id, ident)


class Dispatcher:
    """Runs requests for all sessions of one daemon."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.commands = registry.load_all()
        self.schema = load_schema()

    def precheck(self, req: Request, state: SessionState) -> dict[str, Any] | None:
        """The checks that do not need the handler: lookup, negotiation, OOB."""
        if not state.negotiated and req.name != "qmp_capabilities":
            return error_reply(_NEGOTIATE, "CommandNotFound", has_id=req.has_id, id=req.id)
        cmd = self.commands.get(req.name)
        if cmd is None:
            return error_reply(f"The command {req.name} has not been found", "CommandNotFound",
                               has_id=req.has_id, id=req.id)
        if state.negotiated and req.name == "qmp_capabilities":
            return error_reply("Capabilities negotiation is already complete, command ignored",
                               "CommandNotFound", has_id=req.has_id, id=req.id)
        if req.oob and not cmd.allow_oob:
            return error_reply(f"The command {req.name} does not support OOB",
                               has_id=req.has_id, id=req.id)
        return None

    async def run(self, req: Request, state: SessionState) -> dict[str, Any]:
        """Execute a request that passed :meth:`precheck`."""
        cmd = self.commands[req.name]
        try:
            self.schema.validate(req.name, req.arguments)
            kwargs = {"session": state} if cmd.wants_session else {}
            result = await cmd.handler(self.daemon, req.arguments, **kwargs)
        except QMPError as exc:
            return error_reply(exc.desc, exc.cls, has_id=req.has_id, id=req.id)
        except (KeyboardInterrupt, SystemExit, asyncio.CancelledError):
            raise
        except OSError as exc:
            # The host said no where no handler expected it: still the host's answer,
            # so the client gets its text, never "Internal error" (the log keeps where).
            log.warning("command %s failed", req.name, exc_info=True)
            return error_reply(exc.strerror or str(exc), has_id=req.has_id, id=req.id)
        except BaseException as exc:  # a bug must not take the daemon down
            # BaseException: Rust extensions (cryptography) raise their panics as one.
            log.exception("command %s failed", req.name)
            return error_reply(f"Internal error in {req.name}: {type(exc).__name__}",
                               has_id=req.has_id, id=req.id)
        reply: dict[str, Any] = {"return": {} if result is None else result}
        if req.has_id:
            reply["id"] = req.id
        return reply
