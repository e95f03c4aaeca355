"""Job commands: blockdev-create, x-blockdev-amend and the generic job-* verbs."""

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
    "vpc": "blockd.drivers.vpc.create:create",
    "vdi": "blockd.drivers.vdi.create:create",
    "vmdk": "blockd.drivers.vmdk.create:create",
    "parallels": "blockd.drivers.parallels.create:create",
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


@command("x-blockdev-amend")
async def x_blockdev_amend(daemon: Daemon, args: dict[str, Any]) -> dict:
    """Change an open image's format options in a job of type ``amend`` (LUKS key slots)."""
    node = daemon.graph.lookup_node(args["node-name"])
    options = args["options"]
    if options["driver"] != node.driver:
        raise QMPError("x-blockdev-amend doesn't support changing the block driver")
    amend = getattr(node, "amend", None)
    if amend is None:
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

    async def body(job: Job) -> None:
        if opts is not None:
            await amend(opts, daemon.graph.secrets, force)

    new_job(daemon, args["job-id"], "amend", body)
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
