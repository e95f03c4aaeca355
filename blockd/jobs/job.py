"""Background jobs run as QEMU runs them (``job.c``).

A job is a task whose ``run`` does the work and calls :meth:`Job.pause_point`
(or :meth:`Job.sleep`) where it may stop: a pause, whether a client's or
internal, takes effect only there, as in QEMU, and a cancel is seen there.
When ``run`` returns, the job moves through QEMU's states (waiting, pending,
concluded, or aborting) together with the other jobs of its transaction,
calling the phase hooks ``prepare``, ``commit`` or ``abort``, then ``clean``.
Every state change is a ``JOB_STATUS_CHANGE`` event, in QEMU's order.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Callable, ClassVar, Protocol

from blockd.errors import QMPError
from blockd.jobs.state import COMPLETED, READY, check_transition, check_verb

log = logging.getLogger(__name__)

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")


class JobHost(Protocol):
    """What a job needs of the daemon: its job table and its event channel."""

    jobs: dict[str, Any]

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None: ...


def error_text(exc: BaseException) -> str:
    """The message QEMU would put in a job's ``error`` for this failure."""
    if isinstance(exc, QMPError):
        return exc.desc
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    log.error("job failed", exc_info=exc)
    return f"Internal error: {type(exc).__name__}"


class JobTxn:
    """Jobs that finish together: none is finalized until all are done, one failure cancels all."""

    def __init__(self) -> None:
        #: Newest first, as QEMU walks them.
        self.jobs: list[Job] = []
        self.aborting = False

    def add(self, job: "Job") -> None:
        job.txn = self
        self.jobs.insert(0, job)

    def remove(self, job: "Job") -> None:
        if job.txn is self:
            self.jobs.remove(job)
            job.txn = None


class Job:
    """One job. Subclasses set :attr:`job_type` and implement :meth:`run`."""

    #: QEMU's JobType name.
    job_type: ClassVar[str] = ""
    #: Whether the job takes ``complete`` once ready (QEMU's driver ``complete``).
    supports_complete: ClassVar[bool] = False

    def __init__(self, host: JobHost, job_id: str | None, *, auto_finalize: bool = True,
                 auto_dismiss: bool = True, txn: JobTxn | None = None) -> None:
        """Create the job (state ``created``); ``job_id`` None makes an internal job."""
        if job_id is not None:
            if not _ID.match(job_id):
                raise QMPError(f"Invalid job ID '{job_id}'")
            if job_id in host.jobs:
                raise QMPError(f"Job ID '{job_id}' already in use")
        self.host = host
        self.id = job_id
        self.status = "undefined"
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        # Not started counts as one internal pause, dropped by start().
        self.pause_count = 1
        self.paused = True
        self.busy = False
        self.user_paused = False
        self.cancelled = False
        self.force_cancel = False
        #: Set once run() has returned: the rest happens outside the job's loop.
        self.deferred = False
        #: The failure message (QEMU's job->err); None while the job has not failed.
        self.error: str | None = None
        self.progress_current = 0
        self.progress_total = 0
        self.txn: JobTxn | None = None
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._timer_pending = False
        self._completed = asyncio.Event()
        self._transition("created")
        if job_id is not None:
            host.jobs[job_id] = self
        (txn if txn is not None else JobTxn()).add(self)

    # ---- the driver's hooks --------------------------------------------------------

    async def run(self) -> None:
        """The job's work; raise to fail it. Call pause_point() where it may stop."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Before commit, for every job of the transaction; raise to abort them all."""

    def commit(self) -> None:
        """The job (and its transaction) succeeded."""

    def abort(self) -> None:
        """The job failed or was cancelled, or another in its transaction did."""

    def clean(self) -> None:
        """After commit or abort, either way."""

    def on_pause(self) -> None:
        """The job is about to stop at a pause point."""

    def on_resume(self) -> None:
        """The job goes on after a pause point."""

    def on_user_resume(self) -> None:
        """A client's pause ends (resume, or cancel of a paused job)."""

    def on_cancel(self, force: bool) -> bool:
        """A cancel request; returns whether it is a hard cancel (soft cancel is the job's own)."""
        return True

    def on_complete(self) -> None:
        """``complete`` for a ready job; only jobs with supports_complete get here."""

    def on_ready(self) -> None:
        """The job entered ``ready``."""

    def on_pending(self) -> None:
        """The job entered ``pending`` and waits for a finalize."""

    def on_finalized(self) -> None:
        """The job was finalized (after commit or abort, and clean)."""

    def free(self) -> None:
        """The job is dismissed: let go of what it holds."""

    # ---- state ---------------------------------------------------------------------

    def _transition(self, new: str) -> None:
        old = self.status
        check_transition(self.id, old, new)
        self.status = new
        if new in COMPLETED:
            self._completed.set()
        if self.id is not None and new != old:
            self.host.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": new})

    @property
    def started(self) -> bool:
        return self.task is not None

    def is_completed(self) -> bool:
        return self.status in COMPLETED

    def is_ready(self) -> bool:
        return self.status in READY

    def is_cancelled(self) -> bool:
        """A hard cancel was requested: the job must stop at its next pause point."""
        return self.cancelled and self.force_cancel

    def should_pause(self) -> bool:
        return self.pause_count > 0

    def progress_update(self, done: int) -> None:
        self.progress_current += done

    def progress_set_remaining(self, remaining: int) -> None:
        self.progress_total = self.progress_current + remaining

    # ---- running -------------------------------------------------------------------

    def start(self) -> None:
        """Leave ``created`` and run (the work begins on the loop's next turn)."""
        assert not self.started and self.paused
        self.pause_count -= 1
        self.busy = True
        self.paused = False
        self._transition("running")
        self.task = asyncio.get_running_loop().create_task(self._entry())

    async def _entry(self) -> None:
        # Every job may be paused before it does anything.
        await self.pause_point()
        try:
            await self.run()
        except Exception as exc:
            self.error = error_text(exc)
        self.deferred = True
        # QEMU finishes the job outside its coroutine, no longer busy.
        self.busy = False
        await self._job_completed()

    def enter(self, cond: Callable[["Job"], bool] | None = None) -> None:
        """Wake the job where it waits (not where it is paused by count: resume does that)."""
        if not self.started or self.deferred or self.busy:
            return
        if cond is not None and not cond(self):
            return
        self.busy = True
        self._wake.set()

    async def _do_yield(self, timeout: float | None) -> None:
        self._wake.clear()
        self.busy = False
        self._timer_pending = timeout is not None
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._timer_pending = False
            self.busy = True

    async def pause_point(self) -> None:
        """Stop here while the job is paused (state ``paused``, or ``standby`` when ready)."""
        if not self.should_pause() or self.is_cancelled():
            return
        self.on_pause()
        if self.should_pause() and not self.is_cancelled():
            status = self.status
            self._transition("standby" if status == "ready" else "paused")
            self.paused = True
            while self.should_pause() and not self.is_cancelled():
                await self._do_yield(None)
            self.paused = False
            self._transition(status)
        self.on_resume()

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (less if woken), then pass a pause point."""
        if self.is_cancelled():
            return
        if not self.should_pause():
            await self._do_yield(seconds)
        await self.pause_point()

    async def wait(self) -> None:
        """Wait until woken by enter(), then pass a pause point (QEMU's job_yield)."""
        if self.is_cancelled():
            return
        if not self.should_pause():
            await self._do_yield(None)
        await self.pause_point()

    def transition_to_ready(self) -> None:
        self._transition("ready")
        self.on_ready()

    # ---- pause and resume ----------------------------------------------------------

    def pause(self) -> None:
        """An internal pause; counted, so pauses nest."""
        self.pause_count += 1

    def resume(self) -> None:
        assert self.pause_count > 0
        self.pause_count -= 1
        if not self.pause_count:
            self.enter(lambda job: not job._timer_pending)

    def user_pause(self) -> None:
        check_verb(self.id, self.status, "pause")
        if self.user_paused:
            raise QMPError("Job is already paused")
        self.user_paused = True
        self.pause()

    def user_resume(self) -> None:
        if not self.user_paused or self.pause_count <= 0:
            raise QMPError("Can't resume a job that was not paused")
        check_verb(self.id, self.status, "resume")
        self.on_user_resume()
        self.user_paused = False
        self.resume()

    # ---- the end: completion, finalization, dismissal -------------------------------

    def _update_rc(self) -> None:
        if self.error is None and self.is_cancelled():
            self.error = "Operation canceled"
        if self.error is not None:
            self._transition("aborting")

    async def _job_completed(self) -> None:
        assert self.txn is not None and not self.is_completed()
        self._update_rc()
        if self.error is not None:
            await self._txn_abort()
        else:
            await self._txn_success()

    async def _txn_success(self) -> None:
        assert self.txn is not None
        self._transition("waiting")
        jobs = list(self.txn.jobs)
        if not all(job.is_completed() for job in jobs):
            return
        for job in jobs:
            job._transition("pending")
            if not job.auto_finalize:
                job.on_pending()
        if all(job.auto_finalize for job in jobs):
            await self._do_finalize()

    def _prepare(self) -> bool:
        if self.error is None:
            try:
                self.prepare()
            except Exception as exc:
                self.error = error_text(exc)
            self._update_rc()
        return self.error is not None

    async def _do_finalize(self) -> None:
        assert self.txn is not None
        jobs = list(self.txn.jobs)
        if any(job._prepare() for job in jobs):
            await self._txn_abort()
        else:
            for job in jobs:
                job._finalize_single()

    def _finalize_single(self) -> None:
        assert self.is_completed()
        self._update_rc()
        for hook in (self.commit if self.error is None else self.abort, self.clean):
            try:
                hook()
            except Exception:
                log.exception("job %s: %s failed", self.id, hook.__name__)
        if self.started:
            self.on_finalized()
        if self.txn is not None:
            self.txn.remove(self)
        self._conclude()

    async def _txn_abort(self) -> None:
        txn = self.txn
        assert txn is not None
        if txn.aborting:
            return      # the job that failed first finalizes every job of the transaction
        txn.aborting = True
        for job in list(txn.jobs):
            if job is not self:
                job._cancel_async(False)
        while txn.jobs:
            job = txn.jobs[0]
            if not job.is_completed():
                assert job.cancelled
                job.enter()
                await job._completed.wait()
            job._finalize_single()

    def _conclude(self) -> None:
        self._transition("concluded")
        if self.auto_dismiss or not self.started:
            self._dismiss()

    def _dismiss(self) -> None:
        self.busy = False
        self.paused = False
        self.deferred = True
        if self.txn is not None:
            self.txn.remove(self)
        self._transition("null")
        if self.id is not None:
            self.host.jobs.pop(self.id, None)
        self.free()

    def early_fail(self) -> None:
        """Drop a job that could not be set up before it started."""
        assert self.status == "created"
        self._dismiss()

    def dismiss(self) -> None:
        check_verb(self.id, self.status, "dismiss")
        self._dismiss()

    async def finalize(self) -> None:
        check_verb(self.id, self.status, "finalize")
        await self._do_finalize()

    def complete(self) -> None:
        check_verb(self.id, self.status, "complete")
        if self.cancelled or not self.supports_complete:
            raise QMPError(f"The active block job '{self.id}' cannot be completed")
        self.on_complete()

    def _cancel_async(self, force: bool) -> None:
        force = self.on_cancel(force)
        if self.user_paused:
            self.on_user_resume()
            self.user_paused = False
            assert self.pause_count > 0
            self.pause_count -= 1
        # A soft cancel of a job whose work is over changes nothing.
        if force or not self.deferred:
            self.cancelled = True
            self.force_cancel |= force

    async def cancel(self, force: bool) -> None:
        """Cancel (a concluded job is just dismissed); the job stops at its next pause point."""
        if self.status == "concluded":
            self._dismiss()
            return
        self._cancel_async(force)
        if not self.started:
            await self._job_completed()
        elif self.deferred:
            if self.is_cancelled():
                await self._txn_abort()
        else:
            self.enter()

    async def user_cancel(self, force: bool) -> None:
        check_verb(self.id, self.status, "cancel")
        await self.cancel(force)

    def info(self) -> dict[str, Any]:
        """The job's query-jobs entry."""
        out: dict[str, Any] = {"id": self.id, "type": self.job_type, "status": self.status,
                               "current-progress": self.progress_current,
                               "total-progress": self.progress_total}
        if self.error is not None:
            out["error"] = self.error
        return out


def find_job(host: JobHost, job_id: str) -> Job:
    job: Job | None = host.jobs.get(job_id)
    if job is None:
        raise QMPError("Job not found")
    return job


def list_jobs(host: JobHost) -> list[Job]:
    """Newest first, as QEMU lists them."""
    return list(reversed(host.jobs.values()))


async def cancel_all(host: JobHost) -> None:
    """Cancel every job and wait for each to end, as qemu-storage-daemon does on exit."""
    for job in list_jobs(host):
        if host.jobs.get(job.id or "") is not job:
            continue
        await job.cancel(False)
        if not job.is_completed():
            job.enter()
            await job._completed.wait()
        if job.task is not None and job.task is not asyncio.current_task():
            await asyncio.wait([job.task])
        if job.status == "concluded":
            job._dismiss()
