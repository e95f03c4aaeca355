"""qcow2 error paths: injected I/O errors at every metadata event, and a full disk.

Each blkdebug event gets a one-shot EIO.  The same write session runs
through blockd (over NBD, so the daemon must survive it) and through
qemu-io on the same rules: the client sees the same failures, later
requests succeed, and after a clean close ``qemu-img check`` finds no
corruption, and no more leaked clusters than in QEMU's image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from harness import Daemon, sh

EVENTS = ["l1_update", "l2_load", "l2_update", "l2_alloc_write", "refblock_load",
          "refblock_update", "refblock_alloc", "refblock_alloc_write", "refblock_alloc_hookup",
          "cluster_alloc", "write_aio", "cow_read", "cow_write", "flush_to_disk", "flush_to_os"]

# An allocating partial write (COW), a second L2 table, a run long enough to need
# a new refcount block (4k clusters: one block counts 8 MiB), then rewrites.
SESSION = ["write -P 1 0 2k", "write -P 2 4M 4k", "write -P 3 8M 9M", "flush",
           "write -P 4 0 2k", "write -P 5 4M 4k", "write -P 6 8M 4k", "flush",
           "read -P 4 0 2k", "read -P 5 4M 4k", "read -P 6 8M 4k"]


def outcome(out: subprocess.CompletedProcess) -> list[str]:
    """Per command: ok or the error, without timings."""
    lines = []
    for line in (out.stdout + out.stderr).splitlines():
        if "failed:" in line:
            lines.append(line.split("qemu-io: ")[-1])
        elif line.startswith(("wrote", "read")):
            lines.append(line)
    return lines


def check(img: str) -> dict:
    return json.loads(sh("qemu-img", "check", "--output=json", img).stdout)


def blkdebug(img: str, event: str) -> dict:
    return {"driver": "qcow2", "node-name": "q",
            "file": {"driver": "blkdebug",
                     "inject-error": [{"event": event, "once": True, "immediately": True}],
                     "image": {"driver": "file", "filename": img}}}


@pytest.mark.parametrize("event", EVENTS)
def test_error_at_metadata_event(tmp_path, event):
    base = str(tmp_path / "base.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k", base, "64M")
    theirs, ours = str(tmp_path / "qemu.qcow2"), str(tmp_path / "blockd.qcow2")
    shutil.copy(base, theirs)
    shutil.copy(base, ours)
    cmds = [a for c in SESSION for a in ("-c", c)]
    expected = outcome(sh("qemu-io", *cmds, "json:" + json.dumps(blkdebug(theirs, event))))

    nbd = str(tmp_path / "nbd.sock")
    with Daemon(str(tmp_path / "qmp.sock"), "--blockdev", json.dumps(blkdebug(ours, event)),
                "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                "--export", "type=nbd,id=e,node-name=q,writable=on") as dm:
        got = outcome(sh("qemu-io", "-f", "raw", *cmds, f"nbd+unix:///q?socket={nbd}"))
        # Still serving: a new client reads what the session left.
        again = sh("qemu-io", "-f", "raw", "-c", "read -P 6 8M 4k", f"nbd+unix:///q?socket={nbd}")
        assert again.returncode == 0 and "failed" not in again.stdout + again.stderr
        assert dm.client().cmd("query-block-exports")["return"][0]["id"] == "e"

    # One request fails in each (which one depends on when each writes its metadata:
    # QEMU caches tables, blockd writes them through), with the same error, and
    # every other request works: the failure did not poison the image.
    failed = [line for line in got if "failed" in line]
    assert len(failed) == len([line for line in expected if "failed" in line]), (got, expected)
    assert failed == [line for line in expected if "failed" in line]
    assert len(got) == len(expected)
    mine, qemu = check(ours), check(theirs)
    assert mine.get("corruptions", 0) == 0 and mine["check-errors"] == 0, mine
    assert mine.get("leaks", 0) <= qemu.get("leaks", 0), (mine, qemu)


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs, unmounted afterwards (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if sh("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)).returncode:
        pytest.skip("cannot mount tmpfs here")
    yield str(mnt)
    sh("umount", str(mnt))


def test_full_disk(tmp_path, small_fs):
    """ENOSPC fails the write cleanly, keeps what was written, and passes once space returns."""
    img = os.path.join(small_fs, "f.qcow2")
    filler = os.path.join(small_fs, "filler")
    sh("qemu-img", "create", "-f", "qcow2", img, "64M")
    nbd = str(tmp_path / "nbd.sock")
    node = {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": img}}
    with Daemon(str(tmp_path / "qmp.sock"), "--blockdev", json.dumps(node),
                "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                "--export", "type=nbd,id=e,node-name=q,writable=on"):
        url = f"nbd+unix:///q?socket={nbd}"
        first = sh("qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", "-c", "flush", url)
        assert "failed" not in first.stdout + first.stderr
        with open(filler, "wb") as f:
            try:
                f.write(bytes(8 << 20))
            except OSError:
                pass
        full = sh("qemu-io", "-f", "raw", "-c", "write -P 2 8M 2M", url)
        assert "write failed: No space left on device" in full.stdout + full.stderr
        kept = sh("qemu-io", "-f", "raw", "-c", "read -P 1 0 1M", url)
        assert "failed" not in kept.stdout + kept.stderr
        os.unlink(filler)
        later = sh("qemu-io", "-f", "raw", "-c", "write -P 3 8M 2M", "-c", "flush",
                   "-c", "read -P 3 8M 2M", "-c", "read -P 1 0 1M", url)
        assert "failed" not in later.stdout + later.stderr, later.stdout + later.stderr
    report = check(img)
    assert report.get("corruptions", 0) == 0 and report["check-errors"] == 0, report
