"""blkdebug: injected errors at format-driver events, states, and NBD clients seeing EIO.

Rule semantics are compared with qemu-io running the same option sets and
the same requests; open errors and node names with qemu-storage-daemon.
"""

from __future__ import annotations

import asyncio
import errno
import subprocess

import pytest

from blockd.block.graph import BlockGraph
from harness import Daemon, open_user, sh


def _image(tmp_path, fmt: str = "raw") -> str:
    path = str(tmp_path / f"a.{fmt}")
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, "4M"], check=True)
    subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x66 0 64k", path], check=True,
                   capture_output=True)
    return path


def _open(path: str, fmt: str, **blkdebug):
    g = BlockGraph()
    opts = {"driver": fmt, "node-name": "top",
            "file": {"driver": "blkdebug", "node-name": "dbg",
                     "image": {"driver": "file", "filename": path}, **blkdebug}}
    return g, opts


def test_read_error_once_then_success(tmp_path):
    path = _image(tmp_path)

    async def body():
        g, opts = _open(path, "raw", **{"inject-error": [{"event": "read_aio", "once": True}]})
        node = await open_user(g, opts)
        with pytest.raises(OSError) as err:
            await node.read(0, 4096)
        assert err.value.errno == errno.EIO
        assert bytes(await node.read(0, 4096)) == b"\x66" * 4096

    asyncio.run(body())


def test_sector_filter_iotype_and_errno(tmp_path):
    path = _image(tmp_path)

    async def body():
        g, opts = _open(path, "raw", **{"inject-error": [
            {"event": "write_aio", "sector": 16, "errno": errno.ENOSPC, "iotype": "write"}]})
        node = await open_user(g, opts)
        await node.write(0, b"x" * 4096)            # sector 0-7: not hit
        with pytest.raises(OSError) as err:
            await node.write(8192, b"y" * 512)      # sector 16
        assert err.value.errno == errno.ENOSPC
        assert bytes(await node.read(8192, 512)) == b"\x66" * 512  # reads unaffected

    asyncio.run(body())


def test_states_aim_at_the_second_l2_update(tmp_path):
    """qcow2 writes into two fresh L2 tables; only the second update fails.

    As in QEMU, changed L2 entries are written when the image is flushed.
    """
    path = _image(tmp_path, "qcow2")

    async def body():
        g, opts = _open(path, "qcow2", **{
            "set-state": [{"event": "l2_update", "state": 1, "new_state": 2}],
            "inject-error": [{"event": "l2_update", "state": 2, "once": True, "immediately": True}]})
        node = await open_user(g, opts)
        await node.write(1 << 20, b"a" * 65536)
        await node.flush()                           # first L2 update: state 1 -> 2
        await node.write(2 << 20, b"b" * 65536)
        with pytest.raises(OSError):
            await node.flush()                       # second: injected
        await node.write(3 << 20, b"c" * 65536)      # once: the image goes on working
        await node.flush()
        assert bytes(await node.read(2 << 20, 65536)) == b"b" * 65536
        await g.close_all()

    asyncio.run(body())
    out = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    # A failed L2 update may leak the new cluster, never corrupt the image.
    assert out.returncode in (0, 3) and "ERROR" not in out.stdout


def test_nbd_client_sees_eio_and_daemon_keeps_serving(tmp_path):
    path = _image(tmp_path)
    nbd = str(tmp_path / "nbd.sock")
    node = ('{"driver":"raw","node-name":"r0","file":{"driver":"blkdebug","image":'
            '{"driver":"file","filename":"%s"},"inject-error":[{"event":"read_aio",'
            '"sector":0,"once":true}]}}' % path)
    with Daemon(str(tmp_path / "qmp.sock"), "--blockdev", node,
                "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                "--export", "type=nbd,id=e0,node-name=r0") as d:
        uri = f"nbd+unix:///r0?socket={nbd}"
        out = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", uri],
                             capture_output=True, text=True)
        assert "Input/output error" in out.stdout + out.stderr
        out = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x66 0 4k", uri],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "verification failed" not in out.stdout
        assert d.client().cmd("query-block-exports")["return"][0]["id"] == "e0"


def test_config_file_rules(tmp_path):
    path = _image(tmp_path)
    conf = tmp_path / "blkdebug.conf"
    conf.write_text('[inject-error]\nevent = "read_aio"\nerrno = "1"\nonce = "on"\n')

    async def body():
        g, opts = _open(path, "raw", config=str(conf))
        node = await open_user(g, opts)
        with pytest.raises(OSError) as err:
            await node.read(0, 512)
        assert err.value.errno == errno.EPERM
        assert node.node.file.filename() == f"blkdebug:{conf}:{path}"

    asyncio.run(body())


# ---- differential: the same rules and requests in blockd and qemu-io ---------------

def _keyval(prefix: str, value, out: list[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _keyval(f"{prefix}.{k}" if prefix else k, v, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _keyval(f"{prefix}.{i}", v, out)
    else:
        text = ("on" if value else "off") if isinstance(value, bool) else str(value)
        out.append(f"{prefix}={text}")


def _qemu_io(options: dict, ops: list[tuple[str, int, int]]) -> list[str]:
    """Each request's outcome in qemu-io: "ok" or the error text."""
    args: list[str] = []
    _keyval("", options, args)
    cmd = ["qemu-io", "-t", "writeback", "--image-opts", ",".join(args)]
    for op, off, n in ops:
        cmd += ["-c", f"write -z {off} {n}" if op == "zero" else f"{op} {off} {n}"]
    out = sh(*cmd).stdout
    results = []
    for line in out.splitlines():
        if " failed: " in line:
            results.append(line.split(" failed: ", 1)[1])
        elif line.startswith(("read ", "wrote ", "discard ")):
            results.append("ok")
    return results


def _blockd(options: dict, ops: list[tuple[str, int, int]]) -> list[str]:
    async def body():
        g = BlockGraph()
        # qemu-io's images take discards (``discard=unmap``); its edge takes writes.
        node = await open_user(g, {"node-name": "top", "discard": "unmap", **options})
        results = []
        for op, off, n in ops:
            try:
                if op == "read":
                    await node.read(off, n)
                elif op == "write":
                    await node.write(off, b"\x55" * n)
                elif op == "zero":
                    await node.write_zeroes(off, n)
                else:
                    await node.discard(off, n)
                results.append("ok")
            except OSError as exc:
                results.append(exc.strerror)
        try:
            await g.close_all()
        except OSError:
            pass  # the flush at close may meet an armed rule; qemu-io ignores that too
        return results

    return asyncio.run(body())


def _inject(*rules, **extra) -> dict:
    return {"inject-error": list(rules), **extra}


R, W, Z, D = "read", "write", "zero", "discard"
SCENARIOS = {
    # the first defined of two armed rules decides the errno
    "first_rule_wins": (True, _inject({"event": "read_aio", "errno": 1}, {"event": "read_aio", "errno": 28}),
                        [(R, 0, 512)]),
    # a sector matches requests containing its first byte, not merely overlapping it
    "sector_first_byte": (True, _inject({"event": "read_aio", "sector": 1}),
                          [(R, 256, 512), (R, 768, 512), (R, 512, 1), (R, 0, 512)]),
    "errno_zero_fails_nothing": (True, _inject({"event": "read_aio", "errno": 0}), [(R, 0, 512)]),
    # rules stay armed until another event arms something else
    "armed_until_replaced": (True, _inject({"event": "write_aio", "iotype": "read"},
                                           {"event": "read_aio", "sector": 100, "errno": 28}),
                             [(W, 0, 512), (R, 0, 512), (W, 0, 512), (R, 4096, 512)]),
    "once": (True, _inject({"event": "read_aio", "once": True, "immediately": True}),
             [(R, 0, 512), (R, 0, 512), (W, 0, 512)]),
    # the first defined set-state rule wins; error rules see the state before the event
    "set_state": (True, {"set-state": [{"event": "read_aio", "new_state": 2},
                                       {"event": "read_aio", "new_state": 3}],
                         **_inject({"event": "read_aio", "state": 2, "errno": 28})},
                  [(R, 0, 512), (R, 0, 512), (R, 0, 512)]),
    "iotype": (True, _inject({"event": "write_aio", "iotype": "write", "errno": 28}),
               [(W, 0, 512), (R, 0, 512), (W, 0, 512)]),
    # events raised by blkdebug's own write path
    "pwritev": (False, _inject({"event": "pwritev"}), [(R, 0, 512), (W, 0, 512), (R, 0, 512)]),
    "pwritev_done": (False, _inject({"event": "pwritev_done", "once": True}),
                     [(W, 0, 512), (W, 0, 512), (W, 0, 512)]),
    "pwritev_zero": (False, _inject({"event": "pwritev_zero", "iotype": "write-zeroes"}),
                     [(W, 0, 512), (Z, 0, 4096), (W, 0, 512)]),
    # align: unaligned writes read their head and tail blocks first
    "rmw_head": (False, _inject({"event": "pwritev_rmw_head", "iotype": "read"}, align=4096),
                 [(W, 0, 4096), (W, 512, 512), (W, 4096, 4096)]),
    "rmw_tail": (False, _inject({"event": "pwritev_rmw_after_head", "iotype": "read", "errno": 28},
                                align=4096),
                 [(W, 512, 8192), (W, 0, 4096), (R, 100, 10)]),
    # pieces below opt-write-zero fall back to writes; discard checks before dropping
    "opt_write_zero": (False, _inject({"event": "pwritev_zero", "iotype": "write-zeroes"},
                                      **{"opt-write-zero": 8192}),
                       [(Z, 4096, 4096), (Z, 4096, 8192), (Z, 8192, 8192)]),
    "opt_write_zero_fallback": (False, _inject({"event": "pwritev_zero", "iotype": "write"},
                                               **{"opt-write-zero": 8192}),
                                [(Z, 4096, 4096), (Z, 8192, 8192)]),
    "opt_discard": (False, _inject({"event": "pwritev", "iotype": "discard", "sector": 8},
                                   **{"opt-discard": 4096}),
                    [(W, 0, 512), (D, 0, 4096), (D, 0, 4608), (D, 4096, 1024), (D, 8192, 512)]),
    "max_transfer": (False, _inject({"event": "pwritev", "sector": 9, "once": True},
                                    **{"max-transfer": 4096}),
                     [(W, 0, 16384), (R, 0, 16384), (W, 0, 16384)]),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_rules_like_qemu_io(tmp_path, name):
    under_raw, rules, ops = SCENARIOS[name]
    path = _image(tmp_path)
    dbg = {"driver": "blkdebug", "image": {"driver": "file", "filename": path}, **rules}
    options = {"driver": "raw", "file": dbg} if under_raw else dbg
    expected = _qemu_io(options, ops)
    assert len(expected) == len(ops)
    assert _blockd(options, ops) == expected


def test_flush_rule_and_events_stop_at_blkdebug(tmp_path):
    path = _image(tmp_path)

    async def body():
        g = BlockGraph()
        inner = {"driver": "blkdebug", "image": {"driver": "file", "filename": path},
                 **_inject({"event": "read_aio"})}
        node = await open_user(g, {"driver": "raw", "node-name": "top",
                                  "file": {"driver": "blkdebug", "image": inner,
                                           **_inject({"event": "write_aio", "iotype": "flush",
                                                      "errno": 28})}})
        await node.read(0, 512)  # the inner node never hears the outer node's events
        await node.flush()
        await node.write(0, b"x" * 512)
        with pytest.raises(OSError) as err:
            await node.flush()
        assert err.value.errno == errno.ENOSPC
        await g.close_all()

    asyncio.run(body())


# ---- differential: open errors and names against qemu-storage-daemon ----------------

CONFIGS = {
    "good": '[inject-error]\nevent = "read_aio"\n',
    "comment_id": '# c\n\n[inject-error "x"]\nevent = "read_aio"\nonce = "yes"\n[set-state]\nevent = "l2_load"\nnew_state = "2"\n',
    "bad_event": '[inject-error]\nevent = "bogus"\n',
    "bad_group": '[frob]\nevent = "read_aio"\n',
    "open_group": '[inject-error\n',
    "bad_number": '[inject-error]\nevent = "read_aio"\nerrno = "x"\n',
    "octal_hex": '[inject-error]\nevent = "read_aio"\nerrno = "034"\nsector = "0x10"\n',
    "bad_bool": '[inject-error]\nevent = "read_aio"\nonce = "maybe"\n',
    "unknown_key": '[inject-error]\nevent = "read_aio"\nfoo = "1"\n',
    "no_event": '[inject-error]\nerrno = "1"\n',
    "unquoted": '[inject-error]\nevent = read_aio\n',
    "no_spaces": '[set-state]\nevent="read_aio"\n',
    "blank_spaces": '[inject-error]\n   \nevent = "read_aio"\n',
    "no_group": 'event = "read_aio"\n',
    "state_before_error": '[set-state]\nevent = "bogus2"\n[inject-error]\nevent = "bogus1"\n',
    "bad_iotype": '[inject-error]\nevent = "read_aio"\niotype = "bogus"\n',
}

OPTIONS = [
    {}, {"align": 0}, {"align": 3}, {"align": -1}, {"align": 2**31}, {"align": 4096},
    {"align": 4096, "max-transfer": 512}, {"max-transfer": 100}, {"max-transfer": 2**31 - 1},
    {"max-transfer": -1, "align": -1, "opt-discard": -3},
    {"align": 512, "opt-write-zero": 256}, {"opt-write-zero": 512, "max-write-zero": 768},
    {"opt-discard": 1024, "max-discard": 1536}, {"opt-discard": 1024, "max-discard": 2048},
    {"config": "/nonexistent"}, {"config": "GOOD", "align": 512},
    {"inject-error": []}, {"set-state": []}, {"take-child-perms": []},
    {"unshare-child-perms": []}, {"share-child-perms": ["write"]},
    {"take-child-perms": ["resize"], "unshare-child-perms": ["write"]},
    {"inject-error": [{"event": "nope"}]},
    {"inject-error": [{"event": "read_aio", "errno": 5}, {"event": "write_aio", "sector": 9}]},
    {"inject-error": [{"event": "read_aio", "state": 2, "iotype": "write", "errno": 5,
                       "sector": 3, "once": True, "immediately": False}],
     "set-state": [{"event": "l2_load", "state": 1, "new_state": 3},
                   {"event": "l1_update", "new_state": 5}]},
    {"set-state": [{"event": "read_aio"}]},
    {"align": 3, "image": {"driver": "file", "filename": "/nonexistent"}},
]


def _open_results(tmp_path, qsd: bool, path: str, configs: dict[str, str]) -> list:
    cases = [{"config": configs[name]} for name in sorted(CONFIGS)]
    cases += [{k: configs["good"] if v == "GOOD" else v for k, v in o.items()} for o in OPTIONS]
    results = []
    with Daemon(str(tmp_path / ("q.sock" if qsd else "b.sock")), qsd=qsd) as d:
        c = d.client()
        for extra in cases:
            r = c.cmd("blockdev-add", **{"driver": "blkdebug", "node-name": "d",
                                         "image": {"driver": "file", "filename": path}, **extra})
            if "error" in r:
                results.append((extra, r["error"]["desc"]))
                continue
            node = [n for n in c.cmd("query-named-block-nodes")["return"] if n["node-name"] == "d"][0]
            results.append((extra, node["file"], node["image"]["filename"]))
            assert c.cmd("blockdev-del", **{"node-name": "d"}) == {"return": {}}
        # the monitor still answers after all of it
        assert "return" in c.cmd("query-version")
    return results


def test_open_errors_and_names_like_qsd(tmp_path):
    path = _image(tmp_path)
    configs = {}
    for name, text in CONFIGS.items():
        (tmp_path / f"{name}.conf").write_text(text)
        configs[name] = str(tmp_path / f"{name}.conf")
    assert _open_results(tmp_path, False, path, configs) == _open_results(tmp_path, True, path, configs)


def test_child_perms_like_qsd(tmp_path):
    """unshare-child-perms keeps a writer off the image; take-child-perms adds to ours."""
    path = _image(tmp_path, "qcow2")
    steps = [
        ("blockdev-add", {"driver": "file", "node-name": "f", "filename": path}),
        ("blockdev-add", {"driver": "blkdebug", "node-name": "d", "image": "f",
                          "unshare-child-perms": ["write"]}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"}),
        ("blockdev-del", {"node-name": "d"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"}),
        ("blockdev-add", {"driver": "blkdebug", "node-name": "d", "image": "f",
                          "take-child-perms": ["write"]}),
        ("blockdev-add", {"driver": "blkdebug", "node-name": "d2", "image": "f",
                          "take-child-perms": ["consistent-read"]}),
        ("blockdev-add", {"driver": "blkdebug", "node-name": "d3", "image": "f",
                          "take-child-perms": ["resize"]}),
    ]
    replies = {}
    for qsd in (True, False):
        with Daemon(str(tmp_path / f"p{qsd}.sock"), qsd=qsd) as d:
            c = d.client()
            replies[qsd] = [c.cmd(name, **args) for name, args in steps]
    assert replies[False] == replies[True]
    assert ["error" in r for r in replies[True]] == [False, False, True, False, False, True, False, True]
