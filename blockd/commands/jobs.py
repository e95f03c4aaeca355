"""Job commands: blockdev-create, x-blockdev-amend, query-jobs and the generic job-* verbs."""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

from blockd.block.node import BlockNode
from blockd.daemon import Daemon
from blockd.errors import QMPError
from blockd.jobs.create import AmendJob, CreateJob, OneStepJob
from blockd.jobs.job import find_job, list_jobs
from blockd.qmp.registry import command

#: Image creators by driver: ``async def create(graph, options)``.
_CREATORS = {
    "file": "blockd.drivers.file:create",
    "qcow2": "blockd.drivers.qcow2.create:create",
    "luks": "blockd.drivers.luks:create",
    "vpc": "blockd.drivers.vpc.create:create",
    "vdi": "blockd.drivers.vdi.create:create",
    "vhdx": "blockd.drivers.vhdx.create:create",
    "vmdk": "blockd.drivers.vmdk.create:create",
    "qed": "blockd.drivers.qed.create:create",
    "qcow": "blockd.drivers.qcow.create:create",
    "parallels": "blockd.drivers.parallels.create:create",
}


async def _start(job: OneStepJob) -> None:
    job.start()
    # QEMU enters the job at once: work that fails before its first wait
    # reports 'aborting'/'concluded' before this command's reply.
    await asyncio.sleep(0)


@command("blockdev-create")
async def blockdev_create(daemon: Daemon, args: dict[str, Any]) -> dict:
    options = args["options"]
    module, _, attr = _CREATORS[options["driver"]].partition(":")
    try:
        creator = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        raise QMPError(f"Driver '{options['driver']}' does not support image creation") from None

    async def work() -> None:
        await creator(daemon.graph, options)

    await _start(CreateJob(daemon, args["job-id"], work))
    return {}


@command("x-blockdev-amend")
async def x_blockdev_amend(daemon: Daemon, args: dict[str, Any]) -> dict:
    """Change an open image's format options in a job of type ``amend`` (LUKS key slots)."""
    node = daemon.graph.lookup_node(args["node-name"])
    options = args["options"]
    if options["driver"] != node.driver:
        raise QMPError("x-blockdev-amend doesn't support changing the block driver")
    if not node.supports(BlockNode.amend):
        raise QMPError("Driver does not support x-blockdev-amend")
    if node.driver == "luks":
        # QEMU's luks driver takes write permission before its job starts; qcow2 fails
        # later, inside the job (see the qcow2 node's amend).
        if node.read_only:
            raise QMPError("Block node is read-only")
        opts = {k: v for k, v in options.items() if k != "driver"}
    else:
        opts = options.get("encrypt")
    force = args.get("force", False)

    async def work() -> None:
        if opts is not None:
            await node.amend(opts, daemon.graph.secrets, force)

    await _start(AmendJob(daemon, args["job-id"], work))
    return {}


@command("query-jobs")
async def query_jobs(daemon: Daemon, args: dict[str, Any]) -> list:
    return [job.info() for job in list_jobs(daemon) if job.id is not None]


@command("job-pause")
async def job_pause(daemon: Daemon, args: dict[str, Any]) -> dict:
    find_job(daemon, args["id"]).user_pause()
    return {}


@command("job-resume")
async def job_resume(daemon: Daemon, args: dict[str, Any]) -> dict:
    find_job(daemon, args["id"]).user_resume()
    return {}


@command("job-cancel")
async def job_cancel(daemon: Daemon, args: dict[str, Any]) -> dict:
    await find_job(daemon, args["id"]).user_cancel(True)
    return {}


@command("job-complete")
async def job_complete(daemon: Daemon, args: dict[str, Any]) -> dict:
    find_job(daemon, args["id"]).complete()
    return {}


@command("job-finalize")
async def job_finalize(daemon: Daemon, args: dict[str, Any]) -> dict:
    await find_job(daemon, args["id"]).finalize()
    return {}


@command("job-dismiss")
async def job_dismiss(daemon: Daemon, args: dict[str, Any]) -> dict:
    find_job(daemon, args["id"]).dismiss()
    return {}
