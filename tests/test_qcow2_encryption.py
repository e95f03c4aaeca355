"""Encrypted qcow2 (LUKS and legacy AES), cross-checked both ways with qemu-img/qemu-io/qsd."""

import asyncio
import json
import os
import shutil
import time

import pytest

from blockd.block.graph import BlockGraph
from blockd.drivers.qcow2.create import create as qcow2_create
from blockd.errors import QMPError
from harness import HAVE_QSD, WAIT, Daemon, open_user, past_calibration, qemu_io, qemu_tool, sh

SECRETS = {"s0": b"pw", "s1": b"other", "bad": b"wrong"}


def secrets(secret_id):
    if secret_id not in SECRETS:
        raise QMPError(f"No secret with id '{secret_id}'")
    return SECRETS[secret_id]


def qemu_img_create(path, opts, size="4M", extra=()):
    r = qemu_tool("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
                  "-o", opts, *extra, str(path), size)
    assert r.returncode == 0, r.stderr


def image_opts(path, fmt, secret="s0"):
    return f"driver=qcow2,file.filename={path},encrypt.format={fmt},encrypt.key-secret={secret}"


def encrypted_io(path, fmt, *cmds, secret="pw"):
    r = qemu_io(None, image_opts(path, fmt), *cmds,
                pre=["--object", f"secret,id=s0,data={secret}", "--image-opts"])
    return r.returncode == 0 and "verification failed" not in r.stdout \
        and "failed" not in r.stdout, r.stdout + r.stderr


def qemu_check(path, fmt):
    r = sh("qemu-img", "check", "--object", "secret,id=s0,data=pw", "--image-opts",
           image_opts(path, fmt))
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr


def node_opts(path, fmt, secret="s0", **extra):
    return {"driver": "qcow2", "node-name": "enc",
            "file": {"driver": "file", "filename": str(path)},
            "encrypt": {"format": fmt, "key-secret": secret}, **extra}


async def exercise(user):
    """Writes that cover allocation, in-place, partial-sector and concurrent cases, through
    a user's edge (whose request path pads partial sectors and serialises those writes)."""
    await user.write(1 << 20, b"\xc3" * 8192)
    await user.write(70000, b"\x77" * 333)  # partial sectors: read-modify-write
    await user.write(3 << 20, b"\x99" * 4096)
    await asyncio.gather(*(user.write(200000 + i * 100, bytes([i + 1]) * 100) for i in range(10)))
    await user.write((2 << 20) - 7, b"\x42" * 3000)  # crosses a cluster boundary
    await user.flush()


EXERCISED = ["read -P 0xc3 1M 8k", "read -P 0x77 70000 333", "read -P 0x99 3M 4k",
             f"read -P 0x42 {(2 << 20) - 7} 3000"] + \
            [f"read -P {i + 1} {200000 + i * 100} 100" for i in range(10)]

QEMU_MADE = [
    ("luks", "encrypt.format=luks"),
    ("luks", "encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,"
             "encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1,"
             "cluster_size=512"),
    ("luks", "encrypt.format=luks,encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,"
             "encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512,cluster_size=2M"),
    ("aes", "encrypt.format=aes"),
    ("aes", "encrypt.format=aes,compat=0.10,cluster_size=4k"),
]


@pytest.mark.parametrize("fmt,opts", QEMU_MADE)
def test_qemu_made_images_read_and_write(tmp_path, fmt, opts):
    img = tmp_path / "a.qcow2"
    if fmt == "luks":
        opts += ",encrypt.key-secret=s0,encrypt.iter-time=10"
    else:
        opts += ",encrypt.key-secret=s0"
    qemu_img_create(img, opts)
    ok, out = encrypted_io(img, fmt, "write -P 0x5a 0 64k", "write -P 0x11 3M 1M")
    assert ok, out

    async def body():
        graph = BlockGraph(secrets=secrets)
        user = await open_user(graph, node_opts(img, fmt))
        node = user.node
        assert node.encrypted()
        assert bytes(await user.read(0, 65536)) == b"\x5a" * 65536
        assert bytes(await user.read(3 << 20, 1 << 20)) == b"\x11" * (1 << 20)
        assert bytes(await user.read(100, 1000)) == b"\x5a" * 1000  # unaligned
        info = node.format_specific()["data"]["encrypt"]
        assert info["format"] == fmt
        await exercise(user)
        res = await node.check()  # blockd's own check counts the LUKS header clusters
        assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0), res.messages
        await graph.close_all()

    asyncio.run(body())
    ok, out = encrypted_io(img, fmt, *EXERCISED, "read -P 0x5a 0 64k", "read -P 0x11 3076k 1020k")
    assert ok, out
    qemu_check(img, fmt)


BLOCKD_MADE = [
    ("luks", {}, {}),
    ("luks", {"cipher-alg": "aes-128", "cipher-mode": "xts", "hash-alg": "sha1"},
     {"cluster-size": 512}),
    ("luks", {"cipher-alg": "aes-256", "cipher-mode": "cbc", "ivgen-alg": "essiv",
              "ivgen-hash-alg": "sha256", "hash-alg": "sha512"}, {"cluster-size": 2 << 20}),
    ("luks", {"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "plain"},
     {"version": "v2"}),
    ("qcow", {}, {}),
    ("qcow", {}, {"cluster-size": 512, "version": "v2"}),
]


async def blockd_create(path, fmt, enc_opts, opts, size=4 << 20):
    open(path, "wb").close()
    graph = BlockGraph(secrets=secrets)
    encrypt = {"format": fmt, "key-secret": "s0", **enc_opts}
    if fmt == "luks":
        encrypt.setdefault("iter-time", 10)
    await qcow2_create(graph, {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)},
                               "size": size, "encrypt": encrypt, **opts})
    await graph.close_all()


@pytest.mark.parametrize("fmt,enc_opts,opts", BLOCKD_MADE)
def test_blockd_made_images_work_in_qemu(tmp_path, fmt, enc_opts, opts):
    img = tmp_path / "b.qcow2"
    open_fmt = "aes" if fmt == "qcow" else "luks"

    async def body():
        await blockd_create(img, fmt, enc_opts, opts)
        graph = BlockGraph(secrets=secrets)
        await exercise(await open_user(graph, node_opts(img, open_fmt)))
        await graph.close_all()

    asyncio.run(body())
    qemu_check(img, open_fmt)
    ok, out = encrypted_io(img, open_fmt, *EXERCISED, "read -P 0 0 64k", "write -P 0x6b 512k 100k")
    assert ok, out
    r = sh("qemu-img", "info", "--output=json", str(img))
    info = json.loads(r.stdout)
    assert info["encrypted"] is True
    enc = info["format-specific"]["data"]["encrypt"]
    assert enc["format"] == open_fmt
    if open_fmt == "luks":
        assert enc["cipher-alg"] == enc_opts.get("cipher-alg", "aes-256")
        assert enc["cipher-mode"] == enc_opts.get("cipher-mode", "xts")
        assert enc["hash-alg"] == enc_opts.get("hash-alg", "sha256")
        assert sum(s["active"] for s in enc["slots"]) == 1

    async def reread():
        graph = BlockGraph(secrets=secrets)
        user = await open_user(graph, node_opts(img, open_fmt, **{"read-only": True}),
                               writable=False)
        assert bytes(await user.read(512 << 10, 100 << 10)) == b"\x6b" * (100 << 10)
        assert bytes(await user.read(70000, 333)) == b"\x77" * 333
        await graph.close_all()

    asyncio.run(reread())


def test_encrypted_overlay_on_plain_base(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    assert sh("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M").returncode == 0
    assert sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 4M", str(base)).returncode == 0

    async def body():
        await blockd_create(top, "luks", {}, {"backing-file": str(base), "backing-fmt": "qcow2"})
        graph = BlockGraph(secrets=secrets)
        user = await open_user(graph, node_opts(top, "luks"))
        assert bytes(await user.read(100000, 5000)) == b"\x33" * 5000
        await user.write(65536 + 1000, b"\xee" * 100)  # copy-on-write from the base
        await graph.close_all()

    asyncio.run(body())
    ok, out = encrypted_io(top, "luks", "read -P 0x33 64k 1000", "read -P 0xee 66536 100",
                           f"read -P 0x33 {65536 + 1100} {65536 - 1100}", "read -P 0x33 1M 3M")
    assert ok, out
    qemu_check(top, "luks")
    # The base stays plain: readable without any key.
    assert sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x33 0 4M", str(base)).returncode == 0


def test_compressed_writes_refused(tmp_path):
    img = tmp_path / "c.qcow2"
    qemu_img_create(img, "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10")
    # QEMU itself stores compressed clusters of encrypted images in the clear; blockd
    # reads those but never writes one.
    ok, out = encrypted_io(img, "luks", "write -c -P 0x12 0 64k")
    assert ok, out

    async def body():
        graph = BlockGraph(secrets=secrets)
        node = await graph.open_node(node_opts(img, "luks"))
        assert bytes(await node.read(0, 65536)) == b"\x12" * 65536
        with pytest.raises(OSError) as err:
            await node.write_compressed(65536, bytes(65536))
        await graph.close_all()
        return err.value.strerror

    assert asyncio.run(body()) == "Compression and encryption not supported at the same time"
    from blockd.img.cli import main
    src = tmp_path / "p.qcow2"
    assert sh("qemu-img", "create", "-q", "-f", "qcow2", str(src), "1M").returncode == 0
    for tool in ("qemu-img", "blockd-img"):
        out = tmp_path / f"{tool}.qcow2"
        argv = ["convert", "-c", "-O", "qcow2", "--object", "secret,id=s0,data=pw", "-o",
                "encrypt.format=luks,encrypt.key-secret=s0", str(src), str(out)]
        if tool == "qemu-img":
            r = sh(tool, *argv)
            assert r.returncode == 1
            assert r.stderr == "qemu-img: Compression and encryption not supported at the " \
                "same time\n"
        else:
            assert main(argv) == 1
        assert not os.path.exists(out)
    qemu_check(img, "luks")


def test_amend_keyslots_round_trip(tmp_path):
    img = tmp_path / "k.qcow2"
    qemu_img_create(img, "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10")
    ok, out = encrypted_io(img, "luks", "write -P 0x21 0 64k")
    assert ok, out

    async def body():
        graph = BlockGraph(secrets=secrets)
        node = await graph.open_node(node_opts(img, "luks"))
        with pytest.raises(QMPError) as err:
            await node.amend({"state": "inactive", "keyslot": 0}, secrets)
        assert err.value.desc.startswith("Attempt to erase the only active keyslot 0")
        await node.amend({"format": "luks", "state": "active", "new-secret": "s1",
                          "iter-time": 10}, secrets)
        await node.amend({"state": "inactive", "old-secret": "s0"}, secrets)
        info = node.format_specific()["data"]["encrypt"]
        assert [s["active"] for s in info["slots"]][:2] == [False, True]
        with pytest.raises(QMPError) as err:
            await node.amend({"format": "qcow", "state": "active", "new-secret": "s0"}, secrets)
        assert err.value.desc == "Amend can't be used to change the qcow2 encryption format"
        await graph.close_all()

    asyncio.run(body())
    ok, out = encrypted_io(img, "luks", "read -P 0x21 0 64k", secret="other")
    assert ok, out
    ok, out = encrypted_io(img, "luks", "read 0 512", secret="pw")
    assert not ok and "Invalid password, cannot unlock any keyslot" in out
    qemu_check_with = sh("qemu-img", "check", "--object", "secret,id=s0,data=other",
                         "--image-opts", image_opts(img, "luks"))
    assert "No errors were found" in qemu_check_with.stdout


# ---- over QMP, side by side with qemu-storage-daemon ------------------------------------

def _images(tmp_path):
    luks, aes, plain, raw = (str(tmp_path / n) for n in ("l.qcow2", "a.qcow2", "p.qcow2", "r.luks"))
    qemu_img_create(luks, "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "1M")
    qemu_img_create(aes, "encrypt.format=aes,encrypt.key-secret=s0", "1M")
    assert sh("qemu-img", "create", "-q", "-f", "qcow2", plain, "1M").returncode == 0
    r = qemu_tool("qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=s0,data=pw",
                  "-o", "key-secret=s0,iter-time=10", raw, "1M")
    assert r.returncode == 0, r.stderr
    return luks, aes, plain, raw


def _read_only_copies(luks, raw):
    """Copies of the images for read-only nodes (the originals are locked by writable ones)."""
    copies = []
    for path in (luks, raw):
        copy = path + ".ro"
        shutil.copy(path, copy)
        copies.append(copy)
    return copies


#: Passwords that must never show up in a reply.
_NEW_PASSWORD, _BAD_PASSWORD = "n3w-Passw0rd", "wr0ng-Passw0rd"


def _session(sock, qsd, luks, aes, plain, raw):
    """blockdev-add errors, then amend errors and results, as the replies' text."""
    out = []
    with Daemon(sock, "--object", "secret,id=s0,data=pw",
                "--object", f"secret,id=s1,data={_NEW_PASSWORD}",
                "--object", f"secret,id=bad,data={_BAD_PASSWORD}", qsd=qsd) as d:
        c = d.client()

        def add(path, encrypt=None, **extra):
            args = {"driver": "qcow2", "node-name": "n",
                    "file": {"driver": "file", "filename": path}, **extra}
            if encrypt is not None:
                args["encrypt"] = encrypt
            r = c.cmd("blockdev-add", **args)
            out.append(r)
            if "return" in r:
                c.cmd("blockdev-del", **{"node-name": "n"})

        add(luks)
        add(luks, {"format": "luks"})
        add(luks, {"key-secret": "s0"})
        add(luks, {"format": "luks", "key-secret": "nope"})
        add(luks, {"format": "luks", "key-secret": "bad"})
        add(luks, {"format": "aes", "key-secret": "s0"})
        add(luks, {"format": "luks", "key-secret": "s0", "x": 1})
        add(aes, {"format": "luks", "key-secret": "s0"})
        add(aes, {"format": "aes", "key-secret": "s0"})
        add(aes, {"format": "aes", "key-secret": "s0"}, **{"read-only": True})
        add(aes)
        add(plain, {"format": "aes", "key-secret": "s0"})

        c.cmd("blockdev-add", driver="qcow2", **{"node-name": "n"},
              file={"driver": "file", "filename": luks}, encrypt={"format": "luks",
                                                                  "key-secret": "s0"})
        file_node = [x["node-name"] for x in c.cmd("query-named-block-nodes")["return"]
                     if x["drv"] == "file"][0]
        for encrypt in ({"format": "luks", "key-secret": "s0"}, None,
                        {"format": "aes", "key-secret": "s0"}):
            options = {"driver": "qcow2", "node-name": "n", "file": file_node}
            if encrypt is not None:
                options["encrypt"] = encrypt
            out.append(c.cmd("blockdev-reopen", options=[options]))
        c.cmd("blockdev-add", driver="qcow2", **{"node-name": "p"},
              file={"driver": "file", "filename": plain, "node-name": "pf"})
        c.cmd("blockdev-add", driver="qcow2", **{"node-name": "a"},
              file={"driver": "file", "filename": aes}, encrypt={"format": "aes",
                                                                 "key-secret": "s0"})
        c.cmd("blockdev-add", driver="luks", **{"node-name": "r", "key-secret": "s0"},
              file={"driver": "file", "filename": raw})
        luks_ro, raw_ro = _read_only_copies(luks, raw)
        c.cmd("blockdev-add", driver="qcow2", **{"node-name": "qro", "read-only": True},
              file={"driver": "file", "filename": luks_ro},
              encrypt={"format": "luks", "key-secret": "s0"})
        c.cmd("blockdev-add", driver="luks", **{"node-name": "rro", "key-secret": "s0",
                                                "read-only": True},
              file={"driver": "file", "filename": raw_ro})

        def amend(node, options, **kw):
            r = c.cmd("x-blockdev-amend", **{"job-id": "j", "node-name": node,
                                             "options": options}, **kw)
            if "error" in r:
                out.append(r)
                return
            deadline = time.monotonic() + WAIT
            while True:
                jobs = c.cmd("query-jobs")["return"]
                if jobs[0]["status"] == "concluded" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            out.append(jobs)
            c.cmd("job-dismiss", id="j")

        def enc(**a):
            return {"driver": "qcow2", "encrypt": {"format": "luks", **a}}

        amend("n", enc(state="active", **{"new-secret": "s1", "iter-time": 10, "keyslot": 0}))
        amend("n", enc(state="active", **{"new-secret": "s1", "iter-time": 10, "keyslot": 9}))
        amend("n", enc(state="active"))
        amend("n", enc(state="inactive", keyslot=0))
        amend("n", enc(state="inactive", keyslot=3))
        amend("n", enc(state="inactive", **{"old-secret": "s0"}))
        amend("n", enc(state="inactive", **{"old-secret": "s1"}))
        amend("n", enc(state="active", **{"new-secret": "s1", "iter-time": 10, "keyslot": 2}))
        amend("n", enc(state="inactive", **{"old-secret": "s1"}))
        amend("n", {"driver": "qcow2"})
        amend("n", {"driver": "luks", "state": "active"})
        amend("n", {"driver": "qcow2", "encrypt": {"format": "luks"}})
        amend("nope", enc(state="inactive", keyslot=2))
        amend("pf", {"driver": "file"})
        amend("p", enc(state="inactive", keyslot=2))
        amend("a", enc(state="inactive", keyslot=0))
        amend("qro", enc(state="active", **{"new-secret": "s1", "iter-time": 10}))
        amend("qro", enc(state="inactive", keyslot=0))
        amend("rro", {"driver": "luks", "state": "active", "new-secret": "s1", "iter-time": 10})
        amend("a", {"driver": "qcow2", "encrypt": {"format": "qcow"}})
        amend("r", {"driver": "luks", "state": "active", "new-secret": "s1", "iter-time": 100})
        amend("r", {"driver": "luks", "state": "inactive", "old-secret": "s0"})
        amend("r", {"driver": "luks", "state": "inactive", "keyslot": 1})
        amend("r", {"driver": "luks", "state": "active", "new-secret": "s0", "iter-time": 100,
                    "secret": "bad"})
        info = [n for n in c.cmd("query-named-block-nodes")["return"] if n["node-name"] == "n"][0]
        enc_info = info["image"]["format-specific"]["data"]["encrypt"]
        out.append((info["encrypted"], sorted(enc_info), [s["active"] for s in enc_info["slots"]]))
    return out


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
def test_qmp_errors_and_amend_match_qsd(tmp_path):
    results = []
    for name, qsd in (("b", False), ("q", True)):
        def attempt(n: int, name=name, qsd=qsd):
            work = tmp_path / f"{name}{n}"
            os.makedirs(work)
            return _session(str(work / "qmp.sock"), qsd, *_images(work))
        results.append(past_calibration(attempt))
    text = json.dumps(results[0])
    assert _NEW_PASSWORD not in text and _BAD_PASSWORD not in text
    assert results[0] == results[1]


def test_blockd_img_convert_info_map(tmp_path, capsys):
    """blockd-img creates, converts into and describes encrypted images as qemu-img does."""
    from blockd.img.cli import main
    obj = ["--object", "secret,id=s0,data=pw"]
    src = tmp_path / "src.qcow2"
    assert sh("qemu-img", "create", "-q", "-f", "qcow2", str(src), "4M").returncode == 0
    assert sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 300k", str(src)).returncode == 0
    targets = [("qcow2", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,"
                "cluster_size=4k", "driver=qcow2,encrypt.key-secret=s0"),
               ("qcow2", "encrypt.format=aes,encrypt.key-secret=s0",
                "driver=qcow2,encrypt.key-secret=s0"),
               ("luks", "key-secret=s0,iter-time=10", "driver=luks,key-secret=s0")]
    for i, (fmt, opts, open_opts) in enumerate(targets):
        out = tmp_path / f"t{i}.{fmt}"
        assert main(["convert", "-O", fmt, *obj, "-o", opts, str(src), str(out)]) == 0
        r = sh("qemu-img", "compare", *obj, "--image-opts", f"{open_opts},file.filename={out}",
               f"driver=qcow2,file.filename={src}")
        assert r.returncode == 0, r.stdout + r.stderr
        capsys.readouterr()
        # No key needed to describe an image, as with qemu-img info.
        assert main(["info", str(out)]) == 0
        assert capsys.readouterr().out == sh("qemu-img", "info", str(out)).stdout
        if fmt == "qcow2":
            r = sh("qemu-img", "check", *obj, "--image-opts", f"{open_opts},file.filename={out}")
            assert "No errors were found" in r.stdout, r.stdout + r.stderr
            args = ["map", "--output=json", *obj, "--image-opts",
                    f"{open_opts},file.filename={out}"]
            assert main(args) == 0
            assert capsys.readouterr().out == sh("qemu-img", *args).stdout
    back = tmp_path / "back.qcow2"
    assert main(["convert", "-O", "qcow2", *obj, "--image-opts",
                 f"driver=qcow2,encrypt.key-secret=s0,file.filename={tmp_path / 't0.qcow2'}",
                 str(back)]) == 0
    assert sh("qemu-img", "compare", str(back), str(src)).returncode == 0


CREATE_CASES = [
    {"format": "luks"},
    {"format": "luks", "key-secret": "nope", "iter-time": 10},
    {"format": "aes", "key-secret": "s0"},
    {"format": "luks", "key-secret": "s0", "iter-time": 10, "x": 1},
    {"format": "luks", "key-secret": "s0", "cipher-alg": "aes-7"},
    {"format": "qcow", "key-secret": "s0"},
    {"format": "qcow"},
    {"format": "luks", "key-secret": "s0", "iter-time": 10, "cipher-alg": "aes-128",
     "cipher-mode": "cbc", "ivgen-alg": "essiv", "ivgen-hash-alg": "sha1", "hash-alg": "sha512"},
    {"format": "luks", "key-secret": "s0", "iter-time": 10, "cipher-alg": "aes-128",
     "cipher-mode": "cbc", "ivgen-alg": "essiv", "ivgen-hash-alg": "sha256", "hash-alg": "sha1"},
    {"format": "luks", "key-secret": "s0", "iter-time": 10, "cipher-alg": "aes-256",
     "cipher-mode": "xts", "ivgen-alg": "plain"},
]


def _create_session(sock, qsd, work):
    out = []
    with Daemon(sock, "--object", "secret,id=s0,data=pw", qsd=qsd) as d:
        c = d.client()
        for i, encrypt in enumerate(CREATE_CASES):
            path = str(work / f"c{i}.qcow2")
            open(path, "wb").close()
            c.cmd("blockdev-add", driver="file", filename=path, **{"node-name": f"f{i}"})
            r = c.cmd("blockdev-create", **{"job-id": "j"}, options={
                "driver": "qcow2", "file": f"f{i}", "size": 1 << 20, "encrypt": encrypt,
                **({"cluster-size": 512} if i % 2 else {})})
            if "error" in r:
                out.append(r)
                continue
            while (jobs := c.cmd("query-jobs")["return"])[0]["status"] != "concluded":
                time.sleep(0.05)
            c.cmd("job-dismiss", id="j")
            out.append(jobs)
            if "error" in jobs[0]:
                continue
            fmt = "aes" if encrypt["format"] == "qcow" else "luks"
            r = sh("qemu-img", "check", "--object", "secret,id=s0,data=pw", "--image-opts",
                   image_opts(path, fmt))
            out.append(r.stdout.splitlines()[0])
            info = json.loads(sh("qemu-img", "info", "--output=json", path).stdout)
            enc = info["format-specific"]["data"]["encrypt"]
            out.append({k: v for k, v in enc.items()
                        if k not in ("uuid", "master-key-iters", "slots")})
    return out


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
def test_blockdev_create_encrypted_matches_qsd(tmp_path):
    results = []
    for name, qsd in (("b", False), ("q", True)):
        def attempt(n: int, name=name, qsd=qsd):
            work = tmp_path / f"{name}{n}"
            os.makedirs(work)
            return _create_session(str(work / "qmp.sock"), qsd, work)
        results.append(past_calibration(attempt))
    assert results[0] == results[1]


def _damage(src, dst, how):
    """A copy of a LUKS qcow2 image with its crypto header extension (the first) broken."""
    shutil.copy(src, dst)
    with open(dst, "r+b") as f:
        head = bytearray(f.read(4096))
        pos = 112  # qemu-img's v3 header length; the crypto extension comes first
        assert head[pos:pos + 4] == b"\x05\x37\xbe\x77"
        if how == "missing":
            head[pos:pos + 4] = b"\x12\x34\x56\x78"  # an unknown extension is skipped
        elif how == "unaligned":
            head[pos + 8:pos + 16] = (int.from_bytes(head[pos + 8:pos + 16], "big")
                                      + 512).to_bytes(8, "big")
        elif how == "short-region":
            head[pos + 16:pos + 24] = (4096).to_bytes(8, "big")
        elif how == "bad-size":
            head[pos + 4:pos + 8] = (8).to_bytes(4, "big")
            head[pos + 16:] = head[pos + 24:] + bytes(8)
        f.seek(0)
        f.write(head)


@pytest.mark.skipif(not HAVE_QSD, reason="needs qemu-storage-daemon")
def test_damaged_crypto_header_errors_match_qsd(tmp_path):
    src = tmp_path / "l.qcow2"
    qemu_img_create(src, "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "1M")
    kinds = ("missing", "unaligned", "short-region", "bad-size")
    for how in kinds:
        _damage(src, tmp_path / f"{how}.qcow2", how)
    replies = []
    for qsd in (False, True):
        with Daemon(str(tmp_path / f"{qsd}.sock"), "--object", "secret,id=s0,data=pw",
                    qsd=qsd) as d:
            c = d.client()
            replies.append([c.cmd("blockdev-add", driver="qcow2", **{"node-name": "n"},
                                  file={"driver": "file",
                                        "filename": str(tmp_path / f"{how}.qcow2")},
                                  encrypt={"format": "luks", "key-secret": "s0"})
                            for how in kinds])
    assert all("error" in r for r in replies[0])
    assert replies[0] == replies[1]


@pytest.mark.parametrize("fmt", [None, "luks"])
def test_header_size_in_part_sectors_shows_whole_sectors_like_qemu(tmp_path, fmt):
    """A header size that is not a multiple of 512 is cut down to whole sectors, as
    QEMU counts it; an encrypted node is then asked for whole sectors only."""
    img = tmp_path / "o.qcow2"
    if fmt is None:
        assert sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1k").returncode == 0
        assert sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 0 1k", str(img)).returncode == 0
    else:
        qemu_img_create(img, "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                        size="1k")
        ok, out = encrypted_io(img, fmt, "write -P 0x3c 0 1k")
        assert ok, out
    with open(img, "r+b") as f:
        f.seek(24)
        f.write((1000).to_bytes(8, "big"))
    r = sh("qemu-img", "info", "--output=json", "--object", "secret,id=s0,data=pw",
           "--image-opts", f"driver=qcow2,file.filename={img}"
           + ("" if fmt is None else ",encrypt.format=luks,encrypt.key-secret=s0"))
    qemu_size = json.loads(r.stdout)["virtual-size"]
    assert qemu_size == 512

    async def body():
        graph = BlockGraph(secrets=secrets)
        opts = node_opts(img, fmt) if fmt else {"driver": "qcow2", "node-name": "o",
                                                "file": {"driver": "file", "filename": str(img)}}
        user = await open_user(graph, opts)
        assert user.node.length() == qemu_size
        assert bytes(await user.read(0, 512)) == b"\x3c" * 512
        await user.write(500, b"\x01" * 12)
        await graph.close_all()

    asyncio.run(body())
    cmds = ["read -P 0x3c 0 500", "read -P 1 500 12"]
    if fmt is None:
        r = qemu_io("qcow2", img, *cmds)
        assert r.returncode == 0 and "failed" not in r.stdout, r.stdout
    else:
        ok, out = encrypted_io(img, fmt, *cmds)
        assert ok, out
