"""Crash safety: SIGKILL blockd during a write load, then judge the image with qemu-img.

A client writes random ranges of a qcow2 image over NBD, flushing (or
using FUA) now and then, and the daemon is killed at a random moment.
Whatever was acknowledged after a flush, or by a FUA write, must read
back; ``qemu-img check`` may then find leaks at most (eager refcounts),
and after blockd reopened the image read-write nothing at all for lazy
refcounts (the dirty image is repaired on open).  Each seed picks the
image's creator (qemu-img or blockd-img), its refcount mode and the
moment of the kill.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import pytest

from harness import WAIT, Daemon, NBDClient, blockd_img_run, sh

SIZE = 32 << 20
BLOCK = 64 << 10


def load(client: NBDClient, rng: random.Random, durable: dict[int, bytes],
         stop: threading.Event) -> None:
    """Write each 64k block at most once (so every acknowledged byte has one expected value)."""
    blocks = list(range(SIZE // BLOCK))
    rng.shuffle(blocks)
    pending: dict[int, bytes] = {}
    try:
        for i, block in enumerate(blocks):
            if stop.is_set():
                return
            start = rng.randrange(0, BLOCK, 512)
            length = rng.randrange(512, BLOCK - start + 1, 512)
            offset = block * BLOCK + start
            data = bytes([rng.randrange(1, 256)]) * length
            fua = rng.random() < 0.15
            if client.write(offset, data, fua):
                continue
            if fua:
                durable[offset] = data
            else:
                pending[offset] = data
            if i % 5 == 4 and client.flush() == 0:
                durable.update(pending)
                pending.clear()
    except (ConnectionError, OSError, AssertionError):
        return


def check(img: str) -> dict:
    return json.loads(sh("qemu-img", "check", "--output=json", img).stdout)


@pytest.mark.parametrize("seed", range(12))
def test_kill_during_writes(tmp_path, seed):
    rng = random.Random(seed)
    img = str(tmp_path / "c.qcow2")
    lazy = seed % 3 == 2
    opts = f"cluster_size={rng.choice(['4k', '64k'])},lazy_refcounts={'on' if lazy else 'off'}"
    if seed % 2:
        made = blockd_img_run("create", "-q", "-f", "qcow2", "-o", opts, img, str(SIZE))
        assert made.returncode == 0, made.stderr
    else:
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, img, str(SIZE))
    nbd = str(tmp_path / "nbd.sock")
    dm = Daemon(str(tmp_path / "qmp.sock"),
                "--blockdev", f"driver=qcow2,node-name=q,file.driver=file,file.filename={img}",
                "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                "--export", "type=nbd,id=e,node-name=q,writable=on")
    durable: dict[int, bytes] = {}
    stop = threading.Event()
    client = NBDClient.open(nbd, "q")
    worker = threading.Thread(target=load, args=(client, rng, durable, stop))
    worker.start()
    time.sleep(rng.uniform(0.05, 0.6))
    os.kill(dm.proc.pid, signal.SIGKILL)
    dm.proc.wait()
    stop.set()
    worker.join(WAIT)
    client.close()
    dm.stop()

    first = check(img)
    if not lazy:
        assert first.get("corruptions", 0) == 0 and first["check-errors"] == 0, first
    # Reopen read-write in blockd (a dirty image is repaired here) and close cleanly.
    with Daemon(str(tmp_path / "qmp2.sock"),
                "--blockdev", f"driver=qcow2,node-name=q,file.driver=file,file.filename={img}"):
        pass
    after = check(img)
    assert after.get("corruptions", 0) == 0 and after["check-errors"] == 0, after
    if lazy:
        assert after.get("leaks", 0) == 0, after
    raw = str(tmp_path / "c.raw")
    assert sh("qemu-img", "convert", "-O", "raw", img, raw).returncode == 0
    with open(raw, "rb") as f:
        for offset, data in durable.items():
            f.seek(offset)
            assert f.read(len(data)) == data, f"acknowledged data lost at {offset}"
