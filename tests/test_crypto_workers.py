"""Cipher helper processes: the wire format, results equal to in-process ciphering,
and a helper killed mid-stream costing nothing but speed."""

from __future__ import annotations

import asyncio
import io
import os
import time

import pytest

from blockd.crypto import workers
from blockd.crypto.cipher import SectorCipher
from blockd.drivers.sector_io import crypt_sectors
from harness import WAIT

CIPHERS = [
    SectorCipher("aes-256", "xts", bytes(range(64))),
    SectorCipher("aes-128", "cbc", bytes(range(16)), "essiv", "sha256"),
    SectorCipher("aes-128", "cbc", bytes(range(16)), "plain"),
]


async def _wait_ready() -> workers.HelperPool:
    deadline = time.monotonic() + WAIT
    while not workers._pool.ready():
        assert time.monotonic() < deadline, "cipher helpers did not start"
        await asyncio.sleep(0.02)
    return workers._pool


def test_helper_loop_speaks_the_wire_format():
    """DEFINE, work in two slots, FORGET: replies name the requests, results sit in the
    output slots."""
    cipher = CIPHERS[0]
    data = os.urandom(4096)
    spec = workers.encode_spec(cipher.spec)
    shared = bytearray(workers.AREA)
    shared[workers.input_at(0):workers.input_at(0) + 4096] = data
    shared[workers.input_at(3):workers.input_at(3) + 4096] = data
    stream = (workers.REQUEST.pack(0, 7, workers.DEFINE, 0, 0, len(spec)) + spec
              + workers.REQUEST.pack(41, 7, workers.ENCRYPT, 9, 0, 4096)
              + workers.REQUEST.pack(42, 7, workers.DECRYPT, 9, 3, 4096)
              + workers.REQUEST.pack(0, 7, workers.FORGET, 0, 0, 0))
    out = io.BytesIO()
    workers.serve(io.BytesIO(stream), out, shared)
    assert out.getvalue() == workers.HELLO + workers.REPLY.pack(41) + workers.REPLY.pack(42)
    first, second = workers.output_at(0), workers.output_at(3)
    assert shared[first:first + 4096] == cipher.encrypt(9, data)
    assert shared[second:second + 4096] == cipher.decrypt(9, data)


def test_spec_survives_the_wire_and_keys_stay_out_of_repr():
    cipher = CIPHERS[1]
    assert workers.decode_spec(workers.encode_spec(cipher.spec)) == cipher.spec
    assert bytes(range(16)).hex() not in repr(cipher)


@pytest.mark.parametrize("cipher", CIPHERS, ids=["xts", "cbc-essiv", "cbc-plain"])
def test_helpers_cipher_like_the_daemon(cipher):
    """Large requests go to the helpers once they run; the bytes are the same either way."""
    data = os.urandom(3 << 20)

    async def body():
        first = await crypt_sectors(cipher, True, 1000, data)  # starts the helpers
        await _wait_ready()
        again = await asyncio.gather(*(crypt_sectors(cipher, True, 1000, data)
                                       for _ in range(3)))
        plain = await crypt_sectors(cipher, False, 1000, first)
        workers.shutdown()
        return first, again, plain

    first, again, plain = asyncio.run(body())
    assert first == cipher.encrypt(1000, data)
    assert all(a == first for a in again)
    assert plain == data


def test_killed_helper_is_replaced_and_no_request_fails():
    cipher = CIPHERS[0]
    data = os.urandom(2 << 20)
    expect = cipher.encrypt(5, data)

    async def body():
        await crypt_sectors(cipher, True, 5, data)
        pool = await _wait_ready()
        victims = [h.proc for h in pool.helpers]
        running = [asyncio.ensure_future(crypt_sectors(cipher, True, 5, data))
                   for _ in range(4)]
        await asyncio.sleep(0)
        for proc in victims:
            proc.kill()
        results = await asyncio.gather(*running)
        for proc in victims:
            proc.wait()
        # The next large request notices and starts new helpers.
        await crypt_sectors(cipher, True, 5, data)
        await _wait_ready()
        assert all(h.proc not in victims for h in pool.helpers)
        results.append(await crypt_sectors(cipher, True, 5, data))
        workers.shutdown()
        return results

    assert all(r == expect for r in asyncio.run(body()))


def test_large_io_on_luks_qcow2_matches_qemu(tmp_path):
    """Megabyte writes and reads (helper-sized, over allocated and fresh clusters) on a
    LUKS qcow2 image made by qemu-img; qemu-io reads back what blockd wrote."""
    from blockd.block.graph import BlockGraph
    from harness import qemu_tool

    img = tmp_path / "l.qcow2"
    made = qemu_tool("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
                     "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                     str(img), "16M")
    assert made.returncode == 0, made.stderr
    opts = {"driver": "qcow2", "node-name": "enc",
            "file": {"driver": "file", "filename": str(img)},
            "encrypt": {"format": "luks", "key-secret": "s0"}}

    async def body():
        graph = BlockGraph(secrets=lambda _: b"pw")
        node = await graph.open_node(opts)
        await node.write(1 << 20, b"\x5a" * (3 << 20))  # allocating
        await _wait_ready()
        await node.write(2 << 20, b"\xa5" * (1 << 20))  # in place, through the helpers
        await node.write((6 << 20) + 512, b"\x3c" * (2 << 20))  # fresh, sector-aligned
        got = bytes(await node.read(1 << 20, 3 << 20))
        assert workers._pool.next_req > 0  # the helpers did the work
        await graph.close_all()
        workers.shutdown()
        return got

    got = asyncio.run(body())
    assert got == b"\x5a" * (1 << 20) + b"\xa5" * (1 << 20) + b"\x5a" * (1 << 20)
    r = qemu_tool("qemu-io", "--object", "secret,id=s0,data=pw", "--image-opts",
                  f"driver=qcow2,file.filename={img},encrypt.key-secret=s0",
                  "-c", "read -P 0x5a 1M 1M", "-c", "read -P 0xa5 2M 1M",
                  "-c", "read -P 0x5a 3M 1M", "-c", f"read -P 0x3c {(6 << 20) + 512} 2M")
    assert r.returncode == 0 and "fail" not in r.stdout, r.stdout + r.stderr
    check = qemu_tool("qemu-img", "check", "--object", "secret,id=s0,data=pw", "--image-opts",
                      f"driver=qcow2,file.filename={img},encrypt.key-secret=s0")
    assert "No errors were found" in check.stdout, check.stdout + check.stderr


def test_helpers_that_cannot_start_are_not_retried(monkeypatch):
    """A helper that dies before saying it is ready (a broken interpreter path, say)
    leaves the cipher work in the daemon, without spawning processes per request."""
    cipher = CIPHERS[0]
    data = os.urandom(1 << 20)
    monkeypatch.setattr(workers.sys, "executable", "/bin/false")

    async def body():
        pool = None
        for _ in range(20):
            assert await crypt_sectors(cipher, False, 3, data) == cipher.decrypt(3, data)
            pool = workers._pool
            await asyncio.sleep(0.05)
        spawned = pool.failed, [h.proc for h in pool.helpers]
        workers.shutdown()
        return spawned

    failed, helpers = asyncio.run(body())
    assert failed and not helpers


@pytest.mark.parametrize("alg,mode,key_len,ivgen", [
    ("aes-256", "xts", 64, "plain64"), ("aes-128", "cbc", 16, "essiv"),
    ("aes-256", "ecb", 32, "plain64"), ("aes-128", "ctr", 16, "plain")])
def test_crypt_into_writes_what_encrypt_and_decrypt_return(alg, mode, key_len, ivgen):
    cipher = SectorCipher(alg, mode, os.urandom(key_len), ivgen,
                          "sha256" if ivgen == "essiv" else None)
    data = os.urandom(8192)
    for encrypt in (True, False):
        buf = bytearray(8192)
        cipher.crypt_into(9, memoryview(data), encrypt, memoryview(buf))
        assert buf == (cipher.encrypt(9, data) if encrypt else cipher.decrypt(9, data))
