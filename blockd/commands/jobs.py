"""Job commands: blockdev-create and the generic job-* verbs."""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

from blockd.daemon import Daemon
from blockd.errors import QMPError
from blockd.jobs import Job, find_job, new_job
from blockd.qmp.registry import command

#: Image creators by driver: ``async def create(graph, options)``.
_CREATORS = {
    "file": "blockd.drivers.file:create",
    "qcow2": "blockd.drivers.qcow2.create:create",
    "luks": "blockd.drivers.luks:create",
}


@command("blockdev-create")
async def blockdev_create(daemon: Daemon, args: dict[str, Any]) -> dict:
    options = args["options"]
    module, _, attr = _CREATORS[options["driver"]].partition(":")
    try:
        creator = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        raise QMPError(f"Driver '{options['driver']}' does not support image creation") from None

    async def body(job: Job) -> None:
        await creator(daemon.graph, options)

    new_job(daemon, args["job-id"], "create", body)
    # QEMU enters the job at once: work that fails before its first wait
    # reports 'aborting'/'concluded' before this command's reply.
    await asyncio.sleep(0)
    return {}


@command("query-jobs")
async def query_jobs(daemon: Daemon, args: dict[str, Any]) -> list:
    return [job.info() for job in daemon.jobs.values()]


def _verb(daemon: Daemon, job_id: str, verb: str) -> Job:
    job = find_job(daemon, job_id)
    job.check_verb(verb)
    return job


@command("job-dismiss")
async def job_dismiss(daemon: Daemon, args: dict[str, Any]) -> dict:
    _verb(daemon, args["id"], "dismiss").dismiss()
    return {}


@command("job-cancel")
async def job_cancel(daemon: Daemon, args: dict[str, Any]) -> dict:
    _verb(daemon, args["id"], "cancel").cancel()
    return {}


@command("job-finalize")
async def job_finalize(daemon: Daemon, args: dict[str, Any]) -> dict:
    _verb(daemon, args["id"], "finalize").finalize()
    return {}


@command("job-complete")
async def job_complete(daemon: Daemon, args: dict[str, Any]) -> dict:
    """Only jobs that reach 'ready' complete; blockd's jobs never do, so this refuses."""
    _verb(daemon, args["id"], "complete")
    return {}
