"""Background jobs with QEMU's job state machine and events.

A job moves through created -> running -> waiting -> pending ->
concluded -> null (or through aborting when it fails or is cancelled),
emitting ``JOB_STATUS_CHANGE`` at each step.  Which verbs are allowed in
which state follows QEMU's table, so clients get the same errors.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from blockd.errors import QMPError

if TYPE_CHECKING:
    from blockd.daemon import Daemon

log = logging.getLogger(__name__)

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")

#: Verbs each state accepts (QEMU's JobVerb table).
_VERBS: dict[str, set[str]] = {
    "created": {"cancel"},
    "running": {"cancel"},
    "waiting": {"cancel"},
    "pending": {"cancel", "finalize"},
    "aborting": set(),
    "concluded": {"dismiss"},
    "null": set(),
}


class Job:
    """One job; ``body`` does the work and may update progress."""

    def __init__(self, daemon: "Daemon", job_id: str, job_type: str,
                 body: Callable[["Job"], Awaitable[None]], *,
                 auto_finalize: bool = True, auto_dismiss: bool = False) -> None:
        self.daemon = daemon
        self.id = job_id
        self.type = job_type
        self.body = body
        self.status = "undefined"
        self.current = 0
        self.total = 1
        self.error: str | None = None
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False

    def _set(self, status: str) -> None:
        self.status = status
        self.daemon.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": status})

    def start(self) -> None:
        # QEMU reports 'running' before the command that started the job returns.
        self._set("created")
        self._set("running")
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.body(self)
            self.current = self.total
        except asyncio.CancelledError:
            self.error = "Operation canceled" if self.error is None else self.error
        except QMPError as exc:
            self.error = exc.desc
            self.current = self.total
        except OSError as exc:
            self.error = exc.strerror or str(exc)
            self.current = self.total
        except Exception as exc:
            log.exception("job %s failed", self.id)
            self.error = f"Internal error: {type(exc).__name__}"
        if self.error is None and not self.cancelled:
            self._set("waiting")
            self._set("pending")
            if not self.auto_finalize:
                return
        else:
            self._set("aborting")
        self._conclude()

    def _conclude(self) -> None:
        self._set("concluded")
        if self.auto_dismiss:
            self.dismiss()

    def check_verb(self, verb: str) -> None:
        if verb not in _VERBS.get(self.status, set()):
            raise QMPError(f"Job '{self.id}' in state '{self.status}' cannot accept command verb '{verb}'")

    def dismiss(self) -> None:
        self._set("null")
        self.daemon.jobs.pop(self.id, None)

    def finalize(self) -> None:
        self._conclude()

    def cancel(self) -> None:
        self.cancelled = True
        if self.status in ("waiting", "pending"):
            self.error = "Operation canceled"
            self._set("aborting")
            self._conclude()
        elif self.task is not None:
            self.task.cancel()

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": self.type, "status": self.status,
                               "current-progress": self.current, "total-progress": self.total}
        if self.error is not None:
            out["error"] = self.error
        return out


def new_job(daemon: "Daemon", job_id: str, job_type: str,
            body: Callable[[Job], Awaitable[None]], **kwargs: Any) -> Job:
    """Register and start a job, refusing bad or duplicate ids as QEMU does."""
    if not _ID.match(job_id):
        raise QMPError(f"Invalid job ID '{job_id}'")
    if job_id in daemon.jobs:
        raise QMPError(f"Job ID '{job_id}' already in use")
    job = Job(daemon, job_id, job_type, body, **kwargs)
    daemon.jobs[job_id] = job
    job.start()
    return job


def find_job(daemon: "Daemon", job_id: str) -> Job:
    job = daemon.jobs.get(job_id)
    if job is None:
        raise QMPError("Job not found")
    return job
