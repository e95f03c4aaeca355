"""Block job commands: query-block-jobs and the block-job-* verbs, which name jobs by ``device``.

They find only block jobs: a create or amend job is "not found" here, as in QEMU.
"""

from __future__ import annotations

from typing import Any

from blockd.daemon import Daemon
from blockd.errors import QMPError
from blockd.jobs.blockjob import BlockJob, find_block_job
from blockd.jobs.job import list_jobs
from blockd.qmp.registry import command


@command("query-block-jobs")
async def query_block_jobs(daemon: Daemon, args: dict[str, Any]) -> list:
    return [job.block_info() for job in list_jobs(daemon)
            if isinstance(job, BlockJob) and job.id is not None]


@command("block-job-set-speed")
async def block_job_set_speed(daemon: Daemon, args: dict[str, Any]) -> dict:
    find_block_job(daemon, args["device"]).set_speed(args["speed"])
    return {}


@command("block-job-cancel")
async def block_job_cancel(daemon: Daemon, args: dict[str, Any]) -> dict:
    device = args["device"]
    job = find_block_job(daemon, device)
    force = args.get("force", False)
    if job.user_paused and not force:
        raise QMPError(f"The block job for device '{device}' is currently paused")
    await job.user_cancel(force)
    return {}


@command("block-job-pause")
async def block_job_pause(daemon: Daemon, args: dict[str, Any]) -> dict:
    find_block_job(daemon, args["device"]).user_pause()
    return {}


@command("block-job-resume")
async def block_job_resume(daemon: Daemon, args: dict[str, Any]) -> dict:
    find_block_job(daemon, args["device"]).user_resume()
    return {}


@command("block-job-complete")
async def block_job_complete(daemon: Daemon, args: dict[str, Any]) -> dict:
    find_block_job(daemon, args["device"]).complete()
    return {}


@command("block-job-finalize")
async def block_job_finalize(daemon: Daemon, args: dict[str, Any]) -> dict:
    await find_block_job(daemon, args["id"]).finalize()
    return {}


@command("block-job-dismiss")
async def block_job_dismiss(daemon: Daemon, args: dict[str, Any]) -> dict:
    find_block_job(daemon, args["id"]).dismiss()
    return {}
