"""The raw ``luks`` driver in-process and over QMP, cross-checked with qemu-img/qemu-io/qsd."""

import asyncio
import json
import subprocess
import time

import pytest

from blockd.block.graph import BlockGraph
from blockd.errors import QMPError
from harness import HAVE_QSD, WAIT, Daemon, luks_io, open_user, past_calibration, qemu_tool

SECRETS = {"s0": b"pw", "s1": b"other"}


def secrets(secret_id):
    if secret_id not in SECRETS:
        raise QMPError(f"No secret with id '{secret_id}'")
    return SECRETS[secret_id]


def run(coro):
    return asyncio.run(coro)


def qemu_img_create(path, opts="", size="4M"):
    o = "key-secret=s0,iter-time=10" + ("," + opts if opts else "")
    r = qemu_tool("qemu-img", "create", "-f", "luks", "--object", "secret,id=s0,data=pw",
                  "-o", o, str(path), size)
    assert r.returncode == 0, r.stderr


def qemu_io(path, *cmds, secret="pw"):
    r = luks_io(path, *cmds, secret=secret)
    return r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr


def luks_opts(path, **extra):
    return {"driver": "luks", "node-name": "enc", "key-secret": "s0",
            "file": {"driver": "file", "filename": str(path)}, **extra}


@pytest.mark.parametrize("opts", ["", "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
                                  "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha1"])
def test_read_qemu_data_and_write_back(tmp_path, opts):
    img = tmp_path / "a.luks"
    qemu_img_create(img, opts)
    ok, out = qemu_io(img, "write -P 0x5a 0 64k", "write -P 0x11 3M 1M")
    assert ok, out

    async def body():
        graph = BlockGraph(secrets=secrets)
        node = await open_user(graph, luks_opts(img))
        assert node.length() == 4 << 20
        assert bytes(await node.read(0, 65536)) == b"\x5a" * 65536
        assert bytes(await node.read(3 << 20, 1 << 20)) == b"\x11" * (1 << 20)
        assert bytes(await node.read(100, 1000)) == b"\x5a" * 1000  # unaligned
        await node.write(1 << 20, b"\xc3" * 8192)
        await node.write(70000, b"\x77" * 333)  # partial sectors: read-modify-write
        await node.write(3 << 20, b"\x99" * 4096)
        # Concurrent overlapping sub-sector writes must all land.
        await asyncio.gather(*(node.write(200000 + i * 100, bytes([i + 1]) * 100)
                               for i in range(10)))
        await node.flush()
        await graph.close_all()

    run(body())
    ok, out = qemu_io(img, "read -P 0xc3 1M 8k", "read -P 0x77 70000 333",
                      "read -P 0x99 3M 4k", "read -P 0x11 3076k 1020k", "read -P 0x5a 0 64k")
    assert ok, out
    for i in range(10):
        ok, out = qemu_io(img, f"read -P {i + 1} {200000 + i * 100} 100")
        assert ok, out


def test_open_errors_match_qemu(tmp_path):
    img = tmp_path / "a.luks"
    qemu_img_create(img, size="1M")
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(1 << 20))

    async def err(opts):
        graph = BlockGraph(secrets=secrets)
        with pytest.raises(QMPError) as e:
            await graph.open_node(opts)
        assert not graph.nodes
        return e.value.desc

    assert run(err(luks_opts(img, **{"key-secret": "s1"}))) == \
        "Invalid password, cannot unlock any keyslot"
    opts = luks_opts(img)
    del opts["key-secret"]
    assert run(err(opts)) == "Parameter 'key-secret' is required for cipher"
    assert run(err(luks_opts(img, **{"key-secret": "nope"}))) == "No secret with id 'nope'"
    assert run(err(luks_opts(raw))) == "Volume is not in LUKS format"
    ok, out = qemu_io(img, "read 0 512", secret="other")
    assert "Invalid password, cannot unlock any keyslot" in out


def test_blockdev_create_opens_in_qemu(tmp_path):
    img = tmp_path / "new.luks"
    img.write_bytes(b"")

    async def body():
        from blockd.drivers.luks import create

        graph = BlockGraph(secrets=secrets)
        await create(graph, {"driver": "luks", "file": {"driver": "file", "filename": str(img)},
                             "size": 2 << 20, "key-secret": "s0", "cipher-alg": "aes-128",
                             "cipher-mode": "cbc", "ivgen-alg": "essiv", "hash-alg": "sha1",
                             "iter-time": 10})
        node = await open_user(graph, luks_opts(img))
        assert node.length() == 2 << 20
        assert bytes(await node.read(0, 4096)) != bytes(4096)  # unwritten sectors are not zero
        await node.write(0, b"\x42" * 65536)
        info = node.node.format_specific()
        await graph.close_all()
        return info

    info = run(body())
    qinfo = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img)],
                                      capture_output=True, text=True, check=True).stdout)
    assert qinfo["virtual-size"] == 2 << 20
    assert qinfo["encrypted"] is True
    assert qinfo["format-specific"] == info
    assert info["data"]["cipher-alg"] == "aes-128" and info["data"]["ivgen-hash-alg"] == "sha256"
    ok, out = qemu_io(img, "read -P 0x42 0 64k")
    assert ok, out


def test_truncate_and_amend(tmp_path):
    img = tmp_path / "a.luks"
    qemu_img_create(img, size="1M")

    async def body():
        graph = BlockGraph(secrets=secrets)
        node = await open_user(graph, luks_opts(img))
        await node.truncate(3 << 20)
        assert node.length() == 3 << 20
        await node.write((3 << 20) - 512, b"\xee" * 512)
        await node.node.amend({"state": "active", "new-secret": "s1", "iter-time": 10}, secrets)
        assert [s["active"] for s in node.node.format_specific()["data"]["slots"]][:2] == [True, True]
        await node.node.amend({"state": "inactive", "keyslot": 0}, secrets)
        await graph.close_all()

    run(body())
    ok, out = qemu_io(img, "read -P 0xee 3145216 512", secret="other")
    assert ok, out
    ok, out = qemu_io(img, "read 0 512")
    assert "Invalid password, cannot unlock any keyslot" in out


def qmp_session(tmp_path, qsd, img):
    d = Daemon(str(tmp_path / ("q.sock" if qsd else "b.sock")),
               "--object", "secret,id=s0,data=pw", "--object", "secret,id=bad,data=nope", qsd=qsd)
    try:
        c = d.client()
        bad = c.cmd("blockdev-add", **luks_opts(img, **{"key-secret": "bad"}))
        ok = c.cmd("blockdev-add", **luks_opts(img))
        nodes = c.cmd("query-named-block-nodes")
        return bad, ok, nodes
    finally:
        d.stop()


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
def test_qmp_matches_qsd(tmp_path):
    img = tmp_path / "a.luks"
    qemu_img_create(img, "cipher-mode=cbc,ivgen-alg=essiv", size="1M")
    ours = qmp_session(tmp_path, False, img)
    theirs = qmp_session(tmp_path, True, img)
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1]
    mine = {n["node-name"]: n for n in ours[2]["return"]}["enc"]
    qemu = {n["node-name"]: n for n in theirs[2]["return"]}["enc"]
    for key in ("drv", "encrypted", "file", "ro"):
        assert mine[key] == qemu[key], key
    assert mine["image"]["format-specific"] == qemu["image"]["format-specific"]
    assert mine["image"]["virtual-size"] == qemu["image"]["virtual-size"]


def create_session(tmp_path, qsd):
    tag = "q" if qsd else "b"
    img = tmp_path / f"{tag}.luks"
    img.write_bytes(b"")
    d = Daemon(str(tmp_path / f"{tag}.sock"), "--object", "secret,id=s0,data=pw", qsd=qsd)
    try:
        c = d.client()
        c.cmd("blockdev-add", driver="file", filename=str(img), **{"node-name": "f0"})
        results = []
        for job, extra in (("j0", {}), ("j1", {"key-secret": "s0", "iter-time": 10,
                                              "cipher-mode": "cbc", "ivgen-alg": "plain64"})):
            r = c.cmd("blockdev-create", **{"job-id": job}, options={
                "driver": "luks", "file": "f0", "size": 1 << 20, **extra})
            assert r == {"return": {}}, r
            deadline = time.monotonic() + WAIT
            while True:
                jobs = {j["id"]: j for j in c.cmd("query-jobs")["return"]}
                if jobs[job]["status"] == "concluded" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            results.append(jobs[job])
            c.cmd("job-dismiss", id=job)
        return results, img
    finally:
        d.stop()


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
def test_blockdev_create_over_qmp_matches_qsd(tmp_path):
    ours, img = create_session(tmp_path, False)
    theirs, qimg = past_calibration(lambda _: create_session(tmp_path, True))
    assert ours == theirs
    assert ours[0]["error"] == "Parameter 'key-secret' is required for cipher"
    assert img.stat().st_size == qimg.stat().st_size
    ok, out = qemu_io(img, "write -P 0x21 0 4k", "read -P 0x21 0 4k")
    assert ok, out
