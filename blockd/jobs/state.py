"""QEMU's job state machine: which state may follow which, and which verb each state takes.

Both tables are facts of QEMU's job interface (``qapi/job.json``): a client
that drives QEMU's jobs gets the same transitions and the same refusals here.
"""

from __future__ import annotations

from blockd.errors import QMPError

#: QEMU's JobStatus, in its order.
STATES = ("undefined", "created", "running", "paused", "ready", "standby",
          "waiting", "pending", "aborting", "concluded", "null")

#: State -> states it may move to.
TRANSITIONS: dict[str, frozenset[str]] = {
    "undefined": frozenset({"created"}),
    "created": frozenset({"running", "aborting", "null"}),
    "running": frozenset({"paused", "ready", "waiting", "aborting"}),
    "paused": frozenset({"running"}),
    "ready": frozenset({"standby", "waiting", "aborting"}),
    "standby": frozenset({"ready"}),
    "waiting": frozenset({"pending", "aborting"}),
    "pending": frozenset({"aborting", "concluded"}),
    "aborting": frozenset({"aborting", "concluded"}),
    "concluded": frozenset({"null"}),
    "null": frozenset(),
}

_ACTIVE = frozenset({"created", "running", "paused", "ready", "standby"})

#: Verb -> states that accept it (QEMU's JobVerb table).
VERBS: dict[str, frozenset[str]] = {
    "cancel": _ACTIVE | {"waiting", "pending"},
    "pause": _ACTIVE,
    "resume": _ACTIVE,
    "set-speed": _ACTIVE,
    # QEMU 7.2 takes complete on standby too (a paused ready job).
    "complete": frozenset({"ready", "standby"}),
    "finalize": frozenset({"pending"}),
    "dismiss": frozenset({"concluded"}),
}

#: States in which the job's work is over (QEMU's job_is_completed).
COMPLETED = frozenset({"waiting", "pending", "aborting", "concluded", "null"})
#: States in which the job waits for ``complete`` (QEMU's job_is_ready).
READY = frozenset({"ready", "standby"})


def check_transition(job_id: str | None, old: str, new: str) -> None:
    """A transition QEMU's table forbids is a bug in blockd, never a client error."""
    if new not in TRANSITIONS[old]:
        raise AssertionError(f"job {job_id!r}: no transition from {old} to {new}")


def check_verb(job_id: str | None, status: str, verb: str) -> None:
    """Refuse a verb the job's state does not take, with QEMU's message."""
    if status not in VERBS[verb]:
        raise QMPError(f"Job '{job_id}' in state '{status}' cannot accept command verb '{verb}'")
