"""Jobs as QEMU runs them: the state machine, pause points, finalization, block jobs.

The first part drives blockd's job classes in-process with a small job
whose every step is a pause point, so pause, cancel, ready/complete and
transactions are deterministic: the job only moves when the test lets the
event loop turn.  The second part runs ``blockdev-create`` and
``x-blockdev-amend`` jobs against qemu-storage-daemon and blockd and
compares replies and ``JOB_STATUS_CHANGE`` sequences.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from typing import Any

import pytest

from blockd.daemon import Daemon as BlockdDaemon
from blockd.errors import QMPError
from blockd.jobs import state
from blockd.jobs.blockjob import BlockJob, find_block_job
from blockd.jobs.job import JobTxn, find_job, list_jobs
from blockd.jobs.ratelimit import RateLimit
from blockd.qmp.registry import load_all
from harness import HAVE_QSD, Daemon, Server, connect_unix, past_calibration

# ---- the tables ------------------------------------------------------------------------

#: QEMU 7.2's verb table, written out verb by verb (complete on standby seen with qsd's mirror).
QEMU_VERBS = {
    "cancel": "created running paused ready standby waiting pending",
    "pause": "created running paused ready standby",
    "resume": "created running paused ready standby",
    "set-speed": "created running paused ready standby",
    "complete": "ready standby",
    "finalize": "pending",
    "dismiss": "concluded",
}


@pytest.mark.parametrize("verb", sorted(QEMU_VERBS))
def test_verb_table_is_qemus(verb):
    for status in state.STATES:
        allowed = status in QEMU_VERBS[verb].split()
        if allowed:
            state.check_verb("j", status, verb)
        else:
            with pytest.raises(QMPError) as err:
                state.check_verb("j", status, verb)
            assert err.value.desc == \
                f"Job 'j' in state '{status}' cannot accept command verb '{verb}'"


def test_transition_table_is_qemus():
    expected = {
        "undefined": "created", "created": "running aborting null",
        "running": "paused ready waiting aborting", "paused": "running",
        "ready": "standby waiting aborting", "standby": "ready", "waiting": "pending aborting",
        "pending": "aborting concluded", "aborting": "aborting concluded",
        "concluded": "null", "null": "",
    }
    assert {s: set(t) for s, t in state.TRANSITIONS.items()} == \
        {s: set(t.split()) for s, t in expected.items()}


def test_ratelimit_slices():
    """100 ms slices: free within the quota, then a wait that pays for the excess."""
    limit = RateLimit(1000)          # 100 bytes a slice
    assert limit.delay(60, now=10.0) == 0
    assert limit.delay(30, now=10.01) == 0
    assert limit.delay(60, now=10.02) == pytest.approx(0.15 - 0.02)
    assert limit.delay(0, now=10.05) == pytest.approx(0.10)
    assert limit.delay(0, now=10.2) == 0          # the stretched slice is over
    limit.set_speed(0)
    assert limit.delay(10 ** 9, now=10.2) == 0
    assert RateLimit(1).quota == 1                # at least a byte a slice


# ---- in-process jobs -------------------------------------------------------------------


class Host:
    """What a job needs of the daemon: a job table and an event channel, recorded."""

    def __init__(self) -> None:
        self.jobs: dict[str, Any] = {}
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((event, data or {}))

    def take(self) -> list[tuple[str, Any]]:
        """Events since the last take, JOB_STATUS_CHANGE shortened to its status."""
        out = [(e, d["status"]) if e == "JOB_STATUS_CHANGE" else (e, d) for e, d in self.events]
        self.events.clear()
        return out


class StepJob(BlockJob):
    """``steps`` units of 1 KiB, each after a pause point; then ready if ``mirror``."""

    job_type = "backup"

    def __init__(self, host: Host, job_id: str, steps: int = 3, *, fail_at: int | None = None,
                 fail_prepare: bool = False, mirror: bool = False, **kw: Any) -> None:
        super().__init__(host, job_id, **kw)
        self.steps, self.fail_at, self.fail_prepare = steps, fail_at, fail_prepare
        self.mirror = mirror
        self.supports_complete = mirror     # type: ignore[misc]
        self.completing = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.hooks: list[str] = []

    async def run(self) -> None:
        self.progress_set_remaining(self.steps * 1024)
        for i in range(self.steps):
            await self.gate.wait()
            await self.pause_point()
            if self.is_cancelled():
                return
            if i == self.fail_at:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            self.progress_update(1024)
        if self.mirror:
            self.transition_to_ready()
            while not self.completing and not self.is_cancelled():
                await self.wait()

    def on_complete(self) -> None:
        self.completing = True
        self.enter()

    def prepare(self) -> None:
        self.hooks.append("prepare")
        if self.fail_prepare:
            raise QMPError("prepare failed")

    def commit(self) -> None:
        self.hooks.append("commit")

    def abort(self) -> None:
        self.hooks.append("abort")

    def clean(self) -> None:
        self.hooks.append("clean")


async def turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_success_runs_prepare_commit_clean_and_reports_in_qemus_order():
    async def go():
        host = Host()
        job = StepJob(host, "j")
        job.start()
        await turns()
        assert host.take() == [
            ("JOB_STATUS_CHANGE", "created"), ("JOB_STATUS_CHANGE", "running"),
            ("JOB_STATUS_CHANGE", "waiting"), ("JOB_STATUS_CHANGE", "pending"),
            ("BLOCK_JOB_COMPLETED", {"type": "backup", "device": "j", "len": 3072,
                                     "offset": 3072, "speed": 0}),
            ("JOB_STATUS_CHANGE", "concluded"), ("JOB_STATUS_CHANGE", "null")]
        assert job.hooks == ["prepare", "commit", "clean"]
        assert host.jobs == {}
    run(go())


def test_pause_takes_effect_at_the_pause_point_and_nests_with_internal_pauses():
    async def go():
        host = Host()
        job = StepJob(host, "j", auto_dismiss=False)
        job.gate.clear()
        job.start()
        await turns()
        host.take()
        job.user_pause()
        assert job.status == "running"           # not at a pause point yet
        with pytest.raises(QMPError, match="^Job is already paused$"):
            job.user_pause()
        job.gate.set()
        await turns()
        assert job.status == "paused" and host.take() == [("JOB_STATUS_CHANGE", "paused")]
        assert job.block_info()["paused"] and not job.block_info()["busy"]
        job.pause()                               # an internal pause as well
        job.user_resume()
        await turns()
        assert job.status == "paused" and job.progress_current == 0
        with pytest.raises(QMPError, match="^Can't resume a job that was not paused$"):
            job.user_resume()
        job.resume()
        await turns()
        assert job.status == "concluded" and job.progress_current == 3072
        assert host.take()[0] == ("JOB_STATUS_CHANGE", "running")
    run(go())


def test_manual_finalize_and_dismiss():
    async def go():
        host = Host()
        job = StepJob(host, "j", auto_finalize=False, auto_dismiss=False)
        job.start()
        await turns()
        assert job.status == "pending" and job.hooks == []
        events = host.take()
        assert events[-2:] == [("JOB_STATUS_CHANGE", "pending"),
                               ("BLOCK_JOB_PENDING", {"type": "backup", "id": "j"})]
        for verb in (job.dismiss, job.complete, job.user_pause):
            with pytest.raises(QMPError, match="in state 'pending' cannot accept"):
                verb()
        await job.finalize()
        assert job.hooks == ["prepare", "commit", "clean"]
        assert [e for e, _ in host.take()] == ["BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE"]
        assert job.status == "concluded" and find_job(host, "j") is job
        with pytest.raises(QMPError, match="in state 'concluded' cannot accept command verb "
                                           "'finalize'"):
            await job.finalize()
        job.dismiss()
        assert host.take() == [("JOB_STATUS_CHANGE", "null")] and host.jobs == {}
        with pytest.raises(QMPError, match="^Job not found$"):
            find_job(host, "j")
    run(go())


def test_cancel_running_paused_and_pending_jobs():
    async def go():
        host = Host()
        running = StepJob(host, "r", auto_dismiss=False)
        running.gate.clear()
        running.start()
        await turns()
        await running.user_cancel(True)
        running.gate.set()
        await turns()
        assert running.status == "concluded" and running.error == "Operation canceled"
        assert running.hooks == ["abort", "clean"]
        assert ("BLOCK_JOB_CANCELLED", {"type": "backup", "device": "r", "len": 3072,
                                        "offset": 0, "speed": 0}) in host.take()

        paused = StepJob(host, "p", auto_dismiss=False)
        paused.start()
        paused.user_pause()
        await turns()
        assert paused.status == "paused"
        host.take()
        await paused.user_cancel(True)
        await turns()
        assert not paused.user_paused and paused.status == "concluded"
        assert [s for e, s in host.take() if e == "JOB_STATUS_CHANGE"] == \
            ["running", "aborting", "concluded"]

        pending = StepJob(host, "d", auto_finalize=False, auto_dismiss=False)
        pending.start()
        await turns()
        host.take()
        await pending.user_cancel(True)
        assert pending.status == "concluded" and pending.hooks == ["abort", "clean"]
        assert [e if e != "JOB_STATUS_CHANGE" else s for e, s in host.take()] == \
            ["aborting", "BLOCK_JOB_CANCELLED", "concluded"]
        # Cancelling a concluded job dismisses it (QEMU's job_cancel).
        await pending.cancel(False)
        assert pending.status == "null"
        # Newest first, as qsd lists them.
        assert [j.id for j in list_jobs(host)] == ["p", "r"]
    run(go())


def test_failure_reports_the_error():
    async def go():
        host = Host()
        job = StepJob(host, "j", fail_at=1, auto_dismiss=False)
        job.start()
        await turns()
        assert job.status == "concluded" and job.hooks == ["abort", "clean"]
        assert job.info() == {"id": "j", "type": "backup", "status": "concluded",
                              "current-progress": 1024, "total-progress": 3072,
                              "error": "Input/output error"}
        assert ("BLOCK_JOB_COMPLETED", {"type": "backup", "device": "j", "len": 3072,
                                        "offset": 1024, "speed": 0,
                                        "error": "Input/output error"}) in host.take()
    run(go())


def test_ready_standby_and_complete():
    async def go():
        host = Host()
        job = StepJob(host, "m", mirror=True)
        other = StepJob(host, "o")
        with pytest.raises(QMPError, match="in state 'created' cannot accept command verb "
                                           "'complete'"):
            job.complete()
        job.start()
        other.start()
        await turns()
        assert job.status == "ready" and job.block_info()["ready"]
        assert ("BLOCK_JOB_READY", {"type": "backup", "device": "m", "len": 3072,
                                    "offset": 3072, "speed": 0}) in host.take()
        job.user_pause()
        job.enter()
        await turns()
        assert job.status == "standby"
        job.complete()              # taken on standby; the job goes on once resumed
        await turns()
        assert job.status == "standby"
        job.user_resume()
        await turns()
        assert "m" not in host.jobs and job.hooks == ["prepare", "commit", "clean"]
    run(go())


def test_complete_refused_by_a_job_that_cannot():
    async def go():
        host = Host()
        job = StepJob(host, "j")
        job.status = "ready"            # only the verb check is under test here
        with pytest.raises(QMPError, match="^The active block job 'j' cannot be completed$"):
            job.complete()
    run(go())


def test_transaction_waits_for_all_and_one_failure_cancels_the_rest():
    async def go():
        host = Host()
        txn = JobTxn()
        fast = StepJob(host, "fast", steps=1, txn=txn, auto_dismiss=False)
        slow = StepJob(host, "slow", txn=txn, auto_dismiss=False)
        slow.gate.clear()
        fast.start()
        slow.start()
        await turns()
        assert fast.status == "waiting" and slow.status == "running"
        slow.gate.set()
        await turns()
        assert fast.status == slow.status == "concluded"
        assert fast.hooks == slow.hooks == ["prepare", "commit", "clean"]

        txn = JobTxn()
        good = StepJob(host, "good", txn=txn, auto_dismiss=False)
        bad = StepJob(host, "bad", fail_at=0, txn=txn, auto_dismiss=False)
        good.gate.clear()
        good.start()
        bad.start()
        await turns()
        good.gate.set()
        await turns()
        assert bad.error == "Input/output error" and good.error == "Operation canceled"
        assert good.hooks == bad.hooks == ["abort", "clean"]
        assert good.status == bad.status == "concluded"

        txn = JobTxn()
        a = StepJob(host, "a", txn=txn, auto_dismiss=False)
        b = StepJob(host, "b", txn=txn, fail_prepare=True, auto_dismiss=False)
        a.start()
        b.start()
        await turns()
        assert b.error == "prepare failed" and a.error == "Operation canceled"
        assert a.hooks[-2:] == b.hooks[-2:] == ["abort", "clean"]
    run(go())


def test_speed_and_error_policies():
    async def go():
        host = Host()
        job = StepJob(host, "j", speed=4096)
        assert job.block_info()["speed"] == 4096
        with pytest.raises(QMPError, match="^Parameter 'speed' expects a non-negative value$"):
            job.set_speed(-1)
        host.take()
        with pytest.raises(QMPError, match="^Parameter 'speed' expects a non-negative value$"):
            StepJob(host, "k", speed=-1)
        assert host.take() == [("JOB_STATUS_CHANGE", "created"), ("JOB_STATUS_CHANGE", "null")]
        assert "k" not in host.jobs
        assert job.error_action("report", True, errno.EIO) == "report"
        assert job.error_action("ignore", False, errno.EIO) == "ignore"
        assert job.error_action("enospc", False, errno.EIO) == "report"
        assert job.iostatus == "ok" and not job.user_paused
        assert job.error_action("enospc", False, errno.ENOSPC) == "stop"
        assert job.user_paused and job.block_info()["io-status"] == "nospace"
        assert job.error_action("stop", True, errno.EIO) == "stop"
        assert job.iostatus == "nospace"        # the first error stays shown
        assert [d for e, d in host.take() if e == "BLOCK_JOB_ERROR"] == [
            {"device": "j", "operation": o, "action": a} for o, a in
            [("read", "report"), ("write", "ignore"), ("write", "report"),
             ("write", "stop"), ("read", "stop")]]
        job.user_resume()
        assert job.iostatus == "ok" and not job.user_paused
    run(go())


def test_ratelimited_job_sleeps_and_a_faster_speed_wakes_it():
    async def go():
        host = Host()

        class Slow(StepJob):
            async def run(self) -> None:
                self.progress_set_remaining(2048)
                for _ in range(2):
                    self.ratelimit_processed(1024)
                    self.progress_update(1024)
                    await self.ratelimit_sleep()

        job = Slow(host, "s", speed=1)      # a byte a slice: 1024 bytes take ~100 s
        job.start()
        await turns()
        assert job.status == "running" and job._timer_pending
        job.set_speed(0)
        await turns()
        assert job.status == "null"
    run(go())


# ---- block jobs on real nodes: blockers ---------------------------------------------------


def test_a_block_job_makes_its_node_busy(tmp_path):
    img = str(tmp_path / "a.qcow2")
    os.system(f"qemu-img create -q -f qcow2 {img} 1M")

    async def go():
        daemon = BlockdDaemon()
        commands = load_all()

        async def qmp(cmd: str, **args: Any) -> Any:
            return await commands[cmd].handler(daemon, args)

        await qmp("blockdev-add", driver="qcow2", **{"node-name": "n"},
                  file={"driver": "file", "filename": img})
        node = daemon.graph.nodes["n"]
        job = StepJob(daemon, "b", auto_dismiss=False)
        job.add_node(node)
        job.gate.clear()
        job.start()
        for name, args, desc in [
                ("blockdev-snapshot-internal-sync", {"device": "n", "name": "s"},
                 "Node 'n' is busy: block device is in use by block job: backup"),
                ("blockdev-snapshot-delete-internal-sync", {"device": "n", "name": "s"},
                 "Node 'n' is busy: block device is in use by block job: backup"),
                ("block_resize", {"node-name": "n", "size": 2 << 20},
                 "Device '(null)' is in use")]:
            with pytest.raises(QMPError) as err:
                await qmp(name, **args)
            assert err.value.desc == desc
        assert [j["device"] for j in await qmp("query-block-jobs")] == ["b"]
        await qmp("block-job-pause", device="b")
        with pytest.raises(QMPError, match="^The block job for device 'b' is currently paused$"):
            await qmp("block-job-cancel", device="b")
        await qmp("block-job-resume", device="b")
        await qmp("block-job-set-speed", device="b", speed=1 << 20)
        job.gate.set()
        await turns()
        await qmp("block-job-dismiss", id="b")
        await qmp("blockdev-snapshot-internal-sync", device="n", name="s")
        with pytest.raises(QMPError) as err:
            find_block_job(daemon, "b")
        assert (err.value.cls, err.value.desc) == ("DeviceNotActive", "Block job 'b' not found")
        await daemon.shutdown()
    run(go())


# ---- blockdev-create and x-blockdev-amend against qemu-storage-daemon ------------------------


def _transcript(c, lines: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Each command's reply and the events before it, without timestamps."""
    out: list[Any] = []
    for command, args in lines:
        c.send(json.dumps({"execute": command, "arguments": args}))
        while True:
            msg = c.recv()
            msg.pop("timestamp", None)
            out.append(msg)
            if "event" not in msg:
                break
    return out


def _wait_concluded(c, out: list[Any], job_id: str) -> list[dict[str, Any]]:
    """The events up to the job's conclusion, unless the last command of ``out`` brought it."""
    def concluded(e: dict[str, Any]) -> bool:
        return e.get("event") == "JOB_STATUS_CHANGE" and \
            e["data"] == {"id": job_id, "status": "concluded"}
    replies = [i for i, e in enumerate(out) if "event" not in e]
    last = out[replies[-2] + 1:] if len(replies) > 1 else out
    if any(concluded(e) for e in last):
        return []
    events = c.events_until(concluded)
    return [{"event": e["event"], "data": e["data"]} for e in events]


def _anonymous(out: list[Any], work: Any) -> list[Any]:
    return json.loads(json.dumps(out).replace(str(work), "WORK"))


def _both(tmp_path, scenario) -> None:
    """The scenario's transcript from qsd and from blockd, each on a fresh daemon and directory."""
    results = []
    for qsd in (True, False):
        def attempt(n: int) -> Any:
            work = tmp_path / f"{'qsd' if qsd else 'blockd'}{n}"
            work.mkdir()
            with Daemon(str(work / "qmp.sock"), qsd=qsd) as daemon:
                return scenario(daemon.client(), work)
        results.append(past_calibration(attempt))
    assert results[0] == results[1]


pytestmark_qsd = pytest.mark.skipif(not HAVE_QSD, reason="qemu-storage-daemon not installed")

#: Every verb and block-job command on a job that is over, then dismissal.
AFTER_THE_END = [
    ("query-jobs", {}), ("query-block-jobs", {}),
    ("job-pause", {"id": "j"}), ("job-resume", {"id": "j"}), ("job-complete", {"id": "j"}),
    ("job-finalize", {"id": "j"}), ("job-cancel", {"id": "j"}),
    ("block-job-pause", {"device": "j"}), ("block-job-resume", {"device": "j"}),
    ("block-job-cancel", {"device": "j"}), ("block-job-complete", {"device": "j"}),
    ("block-job-set-speed", {"device": "j", "speed": 1}),
    ("block-job-finalize", {"id": "j"}), ("block-job-dismiss", {"id": "j"}),
    ("job-dismiss", {"id": "j"}), ("job-dismiss", {"id": "j"}), ("query-jobs", {}),
    ("job-pause", {"id": "nosuch"}), ("block-job-pause", {"device": "nosuch"}),
]


@pytestmark_qsd
def test_create_job_lifecycle_matches_qsd(tmp_path):
    def scenario(c, work):
        out = _transcript(c, [("blockdev-create", {"job-id": "j", "options": {
            "driver": "file", "filename": str(work / "a.raw"), "size": 1 << 20}})])
        out += _wait_concluded(c, out, "j")
        out += _transcript(c, AFTER_THE_END)
        # A failing create: aborting, with the error in query-jobs.
        out += _transcript(c, [("blockdev-create", {"job-id": "j", "options": {
            "driver": "file", "filename": str(work / "no" / "b.raw"), "size": 1 << 20}})])
        out += _wait_concluded(c, out, "j")
        out += _transcript(c, [("query-jobs", {}), ("job-dismiss", {"id": "j"}),
                               ("blockdev-create", {"job-id": "1bad", "options": {
                                   "driver": "file", "filename": str(work / "c.raw"),
                                   "size": 0}})])
        return _anonymous(out, work)
    _both(tmp_path, scenario)


@pytestmark_qsd
def test_query_jobs_lists_newest_first_like_qsd(tmp_path):
    def scenario(c, work):
        out = []
        for job_id in ("a", "b", "c"):
            out += _transcript(c, [("blockdev-create", {"job-id": job_id, "options": {
                "driver": "file", "filename": str(work / f"{job_id}.raw"), "size": 4096}})])
            out += _wait_concluded(c, out, job_id)
        out += _transcript(c, [("blockdev-create", {"job-id": "b", "options": {
            "driver": "file", "filename": str(work / "d.raw"), "size": 4096}}),
            ("query-jobs", {})])
        return _anonymous(out, work)
    _both(tmp_path, scenario)


@pytestmark_qsd
def test_amend_job_matches_qsd(tmp_path):
    def scenario(c, work):
        img = str(work / "a.luks")
        secret = {"qom-type": "secret", "id": "s0", "data": "abc"}
        secret2 = {"qom-type": "secret", "id": "s1", "data": "def"}
        out = _transcript(c, [("object-add", secret), ("object-add", secret2),
                              ("blockdev-create", {"job-id": "c", "options": {
                                  "driver": "file", "filename": img, "size": 0}})])
        out += _wait_concluded(c, out, "c")
        out += _transcript(c, [("job-dismiss", {"id": "c"}), ("blockdev-add", {
            "driver": "file", "filename": img, "node-name": "f"}),
            ("blockdev-create", {"job-id": "c", "options": {
                "driver": "luks", "file": "f", "size": 1 << 20, "key-secret": "s0",
                "iter-time": 10}})])
        out += _wait_concluded(c, out, "c")
        out += _transcript(c, [("job-dismiss", {"id": "c"}), ("blockdev-add", {
            "driver": "luks", "file": "f", "node-name": "l", "key-secret": "s0"}),
            ("x-blockdev-amend", {"job-id": "j", "node-name": "l", "options": {
                "driver": "luks", "state": "active", "new-secret": "s1", "iter-time": 10}})])
        out += _wait_concluded(c, out, "j")
        out += _transcript(c, AFTER_THE_END)
        return _anonymous(out, work)
    _both(tmp_path, scenario)


def _nbdkit_pause(ctl: str, letter: str) -> None:
    """Pause ('p') or resume ('r') nbdkit's pause filter; returns once it has taken effect."""
    with connect_unix(ctl) as s:
        s.sendall(letter.encode())
        assert s.recv(1) == letter.upper().encode()


@pytest.mark.parametrize("verbs", ["pause-resume-cancel", "pause-then-end"])
@pytestmark_qsd
def test_verbs_on_a_running_create_job_match_qsd(tmp_path, verbs):
    """A vdi create whose storage hangs (nbdkit paused) stays 'running' for certain.

    A create job has no pause point inside its work, in QEMU as here: pause
    and cancel are accepted while it runs and take effect at its end.
    """
    def scenario(c, work):
        sock, ctl = str(work / "nbd.sock"), str(work / "ctl.sock")
        with Server(sock, "nbdkit", "-f", "-U", sock, "--filter=pause", "memory", "16M",
                    f"pause-control={ctl}"):
            out = _transcript(c, [("blockdev-add", {"driver": "nbd", "node-name": "n",
                                                    "server": {"type": "unix", "path": sock}})])
            _nbdkit_pause(ctl, "p")
            out += _transcript(c, [
                ("blockdev-create", {"job-id": "c", "options": {
                    "driver": "vdi", "file": "n", "size": 8 << 20}}),
                ("query-jobs", {}), ("job-pause", {"id": "c"}), ("job-pause", {"id": "c"}),
                ("query-jobs", {}), ("job-complete", {"id": "c"}), ("job-finalize", {"id": "c"}),
                ("job-dismiss", {"id": "c"}), ("block-job-pause", {"device": "c"})])
            if verbs == "pause-resume-cancel":
                out += _transcript(c, [("job-resume", {"id": "c"}), ("job-resume", {"id": "c"}),
                                       ("job-pause", {"id": "c"}), ("job-cancel", {"id": "c"}),
                                       ("job-resume", {"id": "c"}), ("query-jobs", {})])
            _nbdkit_pause(ctl, "r")
            out += _wait_concluded(c, out, "c")
            out += _transcript(c, [("query-jobs", {}), ("job-resume", {"id": "c"}),
                                   ("job-dismiss", {"id": "c"}), ("blockdev-del", {"node-name": "n"})])
        return _anonymous(out, work)
    _both(tmp_path, scenario)


# ---- transaction actions ------------------------------------------------------------------


def test_every_transaction_action_kind_has_one_registered_action():
    from blockd.commands.transaction import ACTIONS
    from blockd.qmp.schema import load

    load_all()
    kinds = load().registry["https://blockd.invalid/schema/types/TransactionActionKind.json"]
    assert set(ACTIONS) == set(kinds.contents["enum"])


# ---- the copy engine ---------------------------------------------------------------------


class Disk:
    """A byte array with the calls the engine makes, recording them and the concurrency."""

    def __init__(self, size: int, fail_at: int | None = None) -> None:
        self.data = bytearray(size)
        self.calls: list[tuple[str, int, int]] = []
        self.busy = self.most = 0
        self.fail_at = fail_at

    async def _io(self, kind: str, offset: int, n: int) -> None:
        self.calls.append((kind, offset, n))
        self.busy += 1
        self.most = max(self.most, self.busy)
        await turns(3)
        self.busy -= 1
        if offset == self.fail_at:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    async def read(self, offset: int, n: int) -> bytes:
        await self._io("read", offset, n)
        return bytes(self.data[offset:offset + n])

    async def write(self, offset: int, data: bytes) -> None:
        await self._io("write", offset, len(data))
        self.data[offset:offset + len(data)] = data

    async def write_zeroes(self, offset: int, n: int) -> None:
        await self._io("zero", offset, n)
        self.data[offset:offset + n] = bytes(n)


def _extents(runs: list[tuple[int, str]]):
    """A status function over fixed runs of (length, kind)."""
    async def status(offset: int, n: int) -> tuple[int, str]:
        pos = 0
        for length, kind in runs:
            if pos <= offset < pos + length:
                return min(n, pos + length - offset), kind
            pos += length
        raise AssertionError(offset)
    return status


def test_copy_engine_follows_extents_detects_zeroes_and_bounds_concurrency():
    from blockd.jobs.copy import DATA, SKIP, ZERO, Copy

    async def go():
        src, dst = Disk(1 << 20), Disk(1 << 20)
        src.data[:] = os.urandom(1 << 20)
        src.data[256 << 10:320 << 10] = bytes(64 << 10)       # data that reads as zeroes
        dst.data[512 << 10:576 << 10] = b"\xff" * (64 << 10)  # to be zeroed
        runs = [(320 << 10, DATA), (192 << 10, SKIP), (64 << 10, ZERO), (448 << 10, DATA)]
        done: list[int] = []
        await Copy(_extents(runs), src.read, dst.write, dst.write_zeroes, 1 << 20,
                   chunk=64 << 10, parallel=3, detect_zeroes=True, done=done.append).run()
        assert sum(done) == 1 << 20
        assert dst.most == 3
        assert ("zero", 256 << 10, 64 << 10) in dst.calls
        assert ("zero", 512 << 10, 64 << 10) in dst.calls
        assert not any(off in range(320 << 10, 512 << 10) for _, off, _ in dst.calls)
        expect = bytearray(src.data)
        expect[320 << 10:512 << 10] = bytes(192 << 10)
        expect[512 << 10:576 << 10] = bytes(64 << 10)
        assert dst.data == expect

        # Without a way to zero, zero runs and zero data are left alone.
        dst = Disk(1 << 20)
        await Copy(_extents(runs), src.read, dst.write, None, 1 << 20, chunk=64 << 10,
                   detect_zeroes=True).run()
        assert all(kind == "write" for kind, _, _ in dst.calls)
        assert ("write", 256 << 10, 64 << 10) not in dst.calls
    run(go())


def test_copy_engine_stops_at_the_first_failure_after_requests_in_flight():
    from blockd.jobs.copy import DATA, Copy

    async def go():
        src, dst = Disk(1 << 20, fail_at=128 << 10), Disk(1 << 20)
        with pytest.raises(OSError) as err:
            await Copy(_extents([(1 << 20, DATA)]), src.read, dst.write, None, 1 << 20,
                       chunk=64 << 10, parallel=2).run()
        assert err.value.errno == errno.EIO
        assert src.busy == dst.busy == 0
        assert max(off for _, off, _ in src.calls) < 320 << 10
    run(go())


def test_copy_engine_rate_limit_waits_for_the_bytes_sent():
    """At 1 MiB/s, 4 MiB in 256 KiB requests wait about 3.9 s in all (first slice free)."""
    from blockd.jobs.copy import DATA, Copy

    async def go():
        now = [0.0]
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)
            now[0] += seconds

        src, dst = Disk(4 << 20), Disk(4 << 20)
        await Copy(_extents([(4 << 20, DATA)]), src.read, dst.write, None, 4 << 20,
                   chunk=256 << 10, parallel=1, limit=RateLimit(1 << 20, clock=lambda: now[0]),
                   sleep=sleep).run()
        assert sum(slept) == pytest.approx(3.75, abs=0.11)
    run(go())


def test_a_block_job_copies_through_the_engine_at_its_speed_with_pause_points():
    from blockd.jobs.copy import DATA, Copy

    class CopyJob(BlockJob):
        job_type = "backup"

        def __init__(self, host: Host, src: Disk, dst: Disk, **kw: Any) -> None:
            super().__init__(host, "cp", **kw)
            self.src, self.dst = src, dst

        async def run(self) -> None:
            self.progress_set_remaining(1 << 20)

            await Copy(_extents([(1 << 20, DATA)]), self.src.read, self.dst.write, None,
                       1 << 20, chunk=64 << 10, gate=self.throttle,
                       done=self.progress_update).run()

    async def go():
        host = Host()
        src, dst = Disk(1 << 20), Disk(1 << 20)
        src.data[:] = os.urandom(1 << 20)
        job = CopyJob(host, src, dst, speed=1, auto_dismiss=False)   # a byte a slice
        job.start()
        await turns(50)
        assert job.status == "running" and job.progress_current == 64 << 10
        job.user_pause()
        job.set_speed(0)            # wakes the job from its wait: it stops at the pause point
        await turns(50)
        assert job.status == "paused" and job.progress_current == 64 << 10
        job.user_resume()
        await turns(500)
        assert job.status == "concluded" and dst.data == src.data
    run(go())


@pytestmark_qsd
def test_quit_dismisses_jobs_before_its_reply_like_qsd(tmp_path):
    def scenario(c, work):
        out = _transcript(c, [("blockdev-create", {"job-id": "j", "options": {
            "driver": "file", "filename": str(work / "a.raw"), "size": 4096}})])
        out += _wait_concluded(c, out, "j")
        out += _transcript(c, [("quit", {})])
        return _anonymous(out, work)
    _both(tmp_path, scenario)
