"""Block jobs: jobs that work on nodes, with a speed, error policies and ``BLOCK_JOB_*`` events.

A block job owns its nodes while it exists: every operation on them is
blocked ("Node 'X' is busy: block device is in use by block job: TYPE")
until the job is dismissed.  It limits its own rate (``speed``, bytes/s, in
QEMU's 100 ms slices), decides what an I/O error does by its
``on-source-error``/``on-target-error`` policy (report, ignore, stop,
enospc), showing a stop in ``io-status``, and reports its end and its
readiness with QEMU's ``BLOCK_JOB_*`` events alongside ``JOB_STATUS_CHANGE``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from blockd.block import op_blockers
from blockd.errors import QMPError
from blockd.jobs.job import Job, JobHost, JobTxn
from blockd.jobs.ratelimit import RateLimit
from blockd.jobs.state import check_verb

if TYPE_CHECKING:
    from blockd.block.node import BlockNode

#: QEMU's BlockdevOnError values.
ON_ERROR = ("report", "ignore", "enospc", "stop", "auto")


def check_speed(speed: int) -> None:
    if speed < 0:
        raise QMPError("Parameter 'speed' expects a non-negative value")


class BlockJob(Job):
    """A job on block nodes; subclasses add their nodes with :meth:`add_node` and implement run()."""

    def __init__(self, host: JobHost, job_id: str | None, *, speed: int = 0,
                 auto_finalize: bool = True, auto_dismiss: bool = True,
                 txn: JobTxn | None = None) -> None:
        super().__init__(host, job_id, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss, txn=txn)
        self.nodes: list[BlockNode] = []
        self.blocker = op_blockers.Blocker(
            f"block device is in use by block job: {self.job_type}")
        try:
            check_speed(speed)
        except QMPError:
            # QEMU refuses the speed of a job it has already created (created, then null).
            self.early_fail()
            raise
        self.speed = speed
        self.limit = RateLimit(speed)
        self.iostatus = "ok"

    # ---- nodes -------------------------------------------------------------------

    def add_node(self, node: "BlockNode", allow: tuple[str, ...] = ()) -> None:
        """Own ``node``: block every operation on it but those in ``allow``."""
        op_blockers.block_all(node, self.blocker)
        for op in ("dataplane", *allow):
            op_blockers.unblock(node, op, self.blocker)
        self.nodes.append(node)

    def release_nodes(self) -> None:
        for node in self.nodes:
            op_blockers.unblock_all(node, self.blocker)
        self.nodes.clear()

    def free(self) -> None:
        self.release_nodes()

    # ---- speed -------------------------------------------------------------------

    def set_speed(self, speed: int) -> None:
        """A client's new speed; takes effect at the job's next wait."""
        check_verb(self.id, self.status, "set-speed")
        check_speed(speed)
        old = self.speed
        self.limit.set_speed(speed)
        self.speed = speed
        if speed and speed <= old:
            return
        # Faster now: cut short a wait that the old speed imposed.
        self.enter(lambda job: job._timer_pending)

    def ratelimit_processed(self, n: int) -> None:
        """Account ``n`` bytes of work against the speed."""
        self.limit.delay(n)

    async def ratelimit_sleep(self) -> None:
        """Wait as long as the speed requires (and pass a pause point at least once)."""
        while True:
            delay = self.limit.delay(0)
            await self.sleep(delay)
            if not delay or self.is_cancelled():
                return

    async def throttle(self, n: int) -> None:
        """Wait for the speed, then count ``n`` bytes against it (the copy engine's gate)."""
        await self.ratelimit_sleep()
        self.ratelimit_processed(n)

    # ---- errors ------------------------------------------------------------------

    def error_action(self, on_error: str, is_read: bool, err: int) -> str:
        """What an I/O error does under policy ``on_error``: 'report', 'ignore' or 'stop'.

        A stop pauses the job as a client's pause would (block-job-resume
        goes on) and shows the error in ``io-status`` until then.
        """
        assert on_error in ON_ERROR, on_error
        if on_error in ("enospc", "auto"):
            action = "stop" if err == errno.ENOSPC else "report"
        else:
            action = on_error
        if self.id is not None:
            self.host.emit("BLOCK_JOB_ERROR", {"device": self.id,
                                               "operation": "read" if is_read else "write",
                                               "action": action})
        if action == "stop":
            if not self.user_paused:
                self.pause()
                self.user_paused = True
            if self.iostatus == "ok":
                self.iostatus = "nospace" if err == errno.ENOSPC else "failed"
        return action

    def on_user_resume(self) -> None:
        self.iostatus = "ok"

    # ---- events ------------------------------------------------------------------

    def _progress(self) -> dict[str, Any]:
        return {"type": self.job_type, "device": self.id, "len": self.progress_total,
                "offset": self.progress_current, "speed": self.speed}

    def on_ready(self) -> None:
        if self.id is not None:
            self.host.emit("BLOCK_JOB_READY", self._progress())

    def on_pending(self) -> None:
        if self.id is not None:
            self.host.emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})

    def on_finalized(self) -> None:
        if self.id is None:
            return
        data = self._progress()
        if self.is_cancelled():
            self.host.emit("BLOCK_JOB_CANCELLED", data)
            return
        if self.error is not None:
            data["error"] = self.error
        self.host.emit("BLOCK_JOB_COMPLETED", data)

    def block_info(self) -> dict[str, Any]:
        """The job's query-block-jobs entry."""
        out: dict[str, Any] = {
            "type": self.job_type, "device": self.id, "len": self.progress_total,
            "offset": self.progress_current, "busy": self.busy,
            "paused": self.pause_count > 0, "speed": self.speed, "io-status": self.iostatus,
            "ready": self.is_ready(), "status": self.status,
            "auto-finalize": self.auto_finalize, "auto-dismiss": self.auto_dismiss}
        if self.error is not None:
            out["error"] = self.error
        return out


def find_block_job(host: JobHost, job_id: str) -> BlockJob:
    """The block job ``job_id`` (other jobs are not found), with QEMU's error class."""
    job = host.jobs.get(job_id)
    if not isinstance(job, BlockJob):
        raise QMPError(f"Block job '{job_id}' not found", "DeviceNotActive")
    return job
