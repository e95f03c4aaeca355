#!/usr/bin/env python3
"""A LUKS-encrypted qcow2 image created over QMP, written over NBD, rekeyed with x-blockdev-amend.

qemu-io and qemu-img then open it with the new password only; the old
one is refused.  The random uuid and PBKDF2 counts are filtered.  Under
BLOCKD_IOTEST_QSD=1 the output matches too, except when QEMU 7.2's
PBKDF2 calibration fails on a busy machine ("Unable to get accurate CPU
usage" from the keyslot-adding amend job), a known QEMU flake.
"""

import re
import time

import iotests
from iotests import log, qemu_img, qemu_io

img = iotests.scratch("t.qcow2")
nbd = iotests.scratch("nbd.sock")
open(img, "wb").close()


def wait_job(c, job_id):
    while True:
        jobs = c.cmd("query-jobs")["return"]
        if jobs and jobs[0]["status"] == "concluded":
            log(jobs)
            log(c.cmd("job-dismiss", id=job_id))
            return
        time.sleep(0.05)


def encrypt_info(c):
    node = [n for n in c.cmd("query-named-block-nodes")["return"] if n["node-name"] == "q0"][0]
    enc = node["image"]["format-specific"]["data"]["encrypt"]
    enc["uuid"] = "UUID"
    enc["master-key-iters"] = "N"
    for slot in enc["slots"]:
        if "iters" in slot:
            slot["iters"] = "N"
    return {"encrypted": node["encrypted"], "encrypt": dict(sorted(enc.items()))}


daemon = iotests.Daemon("--object", "secret,id=old,data=first",
                        "--object", "secret,id=new,data=second")
try:
    c = daemon.client()
    log(c.cmd("blockdev-add", driver="file", **{"node-name": "f0"}, filename=img))
    log(c.cmd("blockdev-create", **{"job-id": "create"},
              options={"driver": "qcow2", "file": "f0", "size": 16 << 20,
                       "encrypt": {"format": "luks", "key-secret": "old", "cipher-alg": "aes-128",
                                   "cipher-mode": "cbc", "ivgen-alg": "essiv",
                                   "ivgen-hash-alg": "sha256", "iter-time": 10}}))
    wait_job(c, "create")
    log(c.cmd("blockdev-add", driver="qcow2", **{"node-name": "q0"}, file="f0"))
    log(c.cmd("blockdev-add", driver="qcow2", **{"node-name": "q0"}, file="f0",
              encrypt={"format": "luks", "key-secret": "new"}))
    log(c.cmd("blockdev-add", driver="qcow2", **{"node-name": "q0"}, file="f0",
              encrypt={"format": "luks", "key-secret": "old"}))
    log(encrypt_info(c))
    log(c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}}))
    log(c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, writable=True))
    uri = f"nbd+unix:///q0?socket={nbd}"
    log(qemu_io("-f", "raw", "-c", "write -P 0xa5 0 1M", "-c", "write -P 0x5a 1000 333",
                "-c", "read -P 0xa5 0 1000", "-c", "read -P 0x5a 1000 333", uri))
    log(c.cmd("x-blockdev-amend", **{"job-id": "amend", "node-name": "q0"},
              options={"driver": "qcow2", "encrypt": {"format": "luks", "state": "inactive",
                                                      "keyslot": 0}}))
    wait_job(c, "amend")
    log(c.cmd("x-blockdev-amend", **{"job-id": "amend", "node-name": "q0"},
              options={"driver": "qcow2", "encrypt": {"format": "luks", "state": "active",
                                                      "new-secret": "new", "iter-time": 100}}))
    wait_job(c, "amend")
    log(c.cmd("x-blockdev-amend", **{"job-id": "amend", "node-name": "q0"},
              options={"driver": "qcow2", "encrypt": {"format": "luks", "state": "inactive",
                                                      "old-secret": "old"}}))
    wait_job(c, "amend")
    log(encrypt_info(c))
    log(c.cmd("block-export-del", id="e0"))
    c.events(0.5)
    log(c.cmd("blockdev-del", **{"node-name": "q0"}))
    log(c.cmd("blockdev-del", **{"node-name": "f0"}))
finally:
    daemon.stop()

opts = f"driver=qcow2,file.filename={img},encrypt.key-secret=s"
log(re.sub(r"Image end offset: \d+", "Image end offset: N",
           qemu_img("check", "--object", "secret,id=s,data=second", "--image-opts", opts)))
log(qemu_io("--object", "secret,id=s,data=second", "--image-opts", opts,
            "-c", "read -P 0xa5 0 1000", "-c", "read -P 0x5a 1000 333",
            "-c", "read -P 0xa5 1333 1047243", "-c", "read -P 0 1M 15M"))
log(qemu_io("--object", "secret,id=s,data=first", "--image-opts", opts, "-c", "read 0 512"))
iotests.cleanup()
