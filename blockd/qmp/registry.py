"""The table of QMP commands: name -> handler, filled by decorators.

Handlers live in :mod:`blockd.commands` modules, one per concern.  Each
takes the :class:`blockd.daemon.Daemon` and the validated arguments dict
and returns the ``return`` value (``{}`` for commands without one).
Argument validation happens before the call, against ``schema/commands``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Awaitable, Callable, TypeVar

Handler = Callable[..., Awaitable[Any]]
H = TypeVar("H", bound=Handler)


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    allow_oob: bool = False
    #: Handlers that need the calling session (qmp_capabilities) get it as ``session=``.
    wants_session: bool = False


COMMANDS: dict[str, Command] = {}


def command(name: str, *, allow_oob: bool = False,
            wants_session: bool = False) -> Callable[[H], H]:
    """Register ``handler`` as the implementation of QMP command ``name``."""
    def register(handler: H) -> H:
        if name in COMMANDS:
            raise RuntimeError(f"command {name} registered twice")
        COMMANDS[name] = Command(name, handler, allow_oob, wants_session)
        return handler
    return register


def load_all() -> dict[str, Command]:
    """Import every handler module so their decorators run."""
    import blockd.commands  # noqa: F401  (imports its submodules)
    return COMMANDS
