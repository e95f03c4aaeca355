"""The ``create`` and ``amend`` jobs of ``blockdev-create`` and ``x-blockdev-amend``.

Neither has a pause point inside its work (QEMU's do not either): a pause
or cancel asked while it runs takes effect when the work is over, so a
cancelled create still leaves its image, as QEMU's does.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from blockd.jobs.job import Job, JobHost

Work = Callable[[], Awaitable[None]]


class OneStepJob(Job):
    """A job that does one piece of work, counted as one unit of progress."""

    def __init__(self, host: JobHost, job_id: str, work: Work) -> None:
        # QEMU makes these jobs with manual dismiss and automatic finalize.
        super().__init__(host, job_id, auto_finalize=True, auto_dismiss=False)
        self.work = work

    async def run(self) -> None:
        self.progress_set_remaining(1)
        try:
            await self.work()
        finally:
            self.progress_update(1)


class CreateJob(OneStepJob):
    job_type = "create"


class AmendJob(OneStepJob):
    job_type = "amend"
