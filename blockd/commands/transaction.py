"""The ``transaction`` command: its actions come from one table, and apply all or none.

Each action module registers its actions with :func:`action`.  As in QEMU,
every action takes effect at once, in order, and when one fails those
before it are undone in reverse order; the commits of every action run
only once all have succeeded.  ``completion-mode: grouped`` ties the jobs
the actions start into one job transaction (they finish, or fail, together);
an action that starts no job refuses it, with QEMU's message.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Awaitable, Callable

from blockd.daemon import Daemon
from blockd.errors import QMPError
from blockd.jobs.job import JobTxn
from blockd.qmp.registry import command

#: Puts things back as they were before an action, when a later one fails.
Undo = Callable[[], Awaitable[None] | None]
#: Finishes an action once every action has succeeded.
Commit = Callable[[], Awaitable[None]]


@dataclasses.dataclass
class Transaction:
    """What the actions of one transaction share."""

    daemon: Daemon
    grouped: bool
    #: The job transaction the actions' jobs join when grouped (else each job is alone).
    jobs: JobTxn | None


#: An action's prepare: does its visible part now (raise to fail the transaction).
Prepare = Callable[[Transaction, dict[str, Any]], Awaitable[tuple[Undo, Commit]]]


@dataclasses.dataclass(frozen=True)
class Action:
    prepare: Prepare
    #: Whether the action takes ``completion-mode: grouped`` (those that start jobs).
    grouped: bool


ACTIONS: dict[str, Action] = {}


def action(kind: str, *, grouped: bool = False) -> Callable[[Prepare], Prepare]:
    """Register ``prepare`` as transaction action ``kind``."""
    def register(prepare: Prepare) -> Prepare:
        if kind in ACTIONS:
            raise RuntimeError(f"transaction action {kind} registered twice")
        ACTIONS[kind] = Action(prepare, grouped)
        return prepare
    return register


async def nothing() -> None:
    """The commit of an action that has nothing left to do."""


@action("abort", grouped=True)
async def _abort(txn: Transaction, data: dict[str, Any]) -> tuple[Undo, Commit]:
    raise QMPError("Transaction aborted using Abort action")


async def _undo(undos: list[Undo]) -> None:
    for undo in reversed(undos):
        pending = undo()
        if inspect.isawaitable(pending):
            await pending


@command("transaction")
async def transaction(daemon: Daemon, args: dict[str, Any]) -> dict:
    """All actions or none: each applies in order; a failure undoes those before it."""
    grouped = args.get("properties", {}).get("completion-mode") == "grouped"
    txn = Transaction(daemon, grouped, JobTxn() if grouped else None)
    undos: list[Undo] = []
    commits: list[Commit] = []
    try:
        # TransactionActionKind lists only the registered actions, so others never get here.
        for item in args["actions"]:
            kind = item["type"]
            act = ACTIONS[kind]
            if grouped and not act.grouped:
                raise QMPError(f"Action '{kind}' does not support Transaction property "
                               "completion-mode = grouped")
            undo, commit = await act.prepare(txn, item["data"])
            undos.append(undo)
            commits.append(commit)
    except QMPError:
        await _undo(undos)
        raise
    for commit in commits:
        await commit()
    return {}
