"""Cipher work for large requests, spread over helper processes.

``cryptography`` holds the GIL while it ciphers, and XTS needs a fresh
OpenSSL context for every 512-byte sector, so one Python process ciphers
no faster than one core however many threads it runs.  An encrypted export
streaming 1 MiB requests would keep the event loop's core busy with
cipher work alone.  Requests of at least :data:`MIN_BYTES` are therefore
cut into pieces and ciphered by helper processes, one per core, while
the event loop goes on serving other requests.

Helpers are plain child processes (``python -m blockd.crypto.workers``),
not ``multiprocessing``: that would re-import the parent's main module in
each child, which a daemon embedded in another program cannot promise to
survive.  Each helper shares a memory area with the daemon (a memfd,
inherited): the daemon copies a piece into a free input slot and sends a
short request over the helper's stdin; the helper ciphers the slot into
the matching output slot and answers with the request id on its stdout,
which the event loop watches.  No bulk data crosses a pipe and no thread
waits on one.

The helpers start on the first large request (that request, and the ones
until the helpers say they are ready, are ciphered in a worker thread),
hold the keys of the images they cipher for until those close, and exit
when their stdin closes, so they never outlive the daemon.  If a helper
dies, its pending pieces are ciphered in the daemon and the pool is
started afresh on the next large request.

Wire format, big-endian.  Daemon to helper: ``id:u32 cipher:u32 op:u8
sector:u64 slot:u32 length:u32``; ``op`` is :data:`DECRYPT` or
:data:`ENCRYPT` (``length`` bytes in input slot ``slot``), :data:`DEFINE`
(``length`` bytes of JSON follow on the pipe: the cipher's construction
parameters, key in hex) or :data:`FORGET`.  Helper to daemon:
:data:`HELLO` once, then ``id:u32`` for each DECRYPT or ENCRYPT done.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import weakref
from typing import Any, BinaryIO

from blockd.crypto.cipher import SectorCipher

#: Smaller requests cost more to ship to a helper than to cipher here.
MIN_BYTES = 64 << 10
#: One slot, and the largest piece of a request one helper takes: small enough
#: to spread a 1 MiB request over every core, large enough to cost little to ship.
PIECE = 256 << 10
#: Input slots per helper (as many output slots follow them in the shared area).
SLOTS = 8
#: Bytes of one helper's shared area.
AREA = 2 * SLOTS * PIECE

DECRYPT, ENCRYPT, DEFINE, FORGET = range(4)
REQUEST = struct.Struct(">IIBQII")
REPLY = struct.Struct(">I")
#: A helper's first byte: it has imported everything and takes requests.
HELLO = b"R"


def input_at(slot: int) -> int:
    """Where input slot ``slot`` starts in the shared area."""
    return slot * PIECE


def output_at(slot: int) -> int:
    """Where the result of the piece in input slot ``slot`` goes."""
    return (SLOTS + slot) * PIECE


def encode_spec(spec: tuple) -> bytes:
    """A cipher's construction parameters as a DEFINE payload."""
    alg, mode, key, ivgen, ivgen_hash, sector_size = spec
    return json.dumps([alg, mode, key.hex(), ivgen, ivgen_hash, sector_size]).encode()


def decode_spec(payload: bytes) -> tuple:
    alg, mode, key, ivgen, ivgen_hash, sector_size = json.loads(payload)
    return alg, mode, bytes.fromhex(key), ivgen, ivgen_hash, sector_size


# ---- the helper process ------------------------------------------------------------

def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    return data if len(data) == n else None


def serve(inp: BinaryIO, out: BinaryIO, shared: Any) -> None:
    """The helper's loop: requests in, results into ``shared``, until ``inp`` closes
    or ``out`` does (the daemon is done: replies it no longer reads are not errors)."""
    with memoryview(shared) as area:
        try:
            _serve(inp, out, area)
        except BrokenPipeError:
            pass


def _serve(inp: BinaryIO, out: BinaryIO, area: memoryview) -> None:
    ciphers: dict[int, SectorCipher] = {}
    out.write(HELLO)
    out.flush()
    while (head := _read_exactly(inp, REQUEST.size)) is not None:
        req, cid, op, sector, slot, length = REQUEST.unpack(head)
        if op == DEFINE:
            payload = _read_exactly(inp, length)
            if payload is None:
                return
            ciphers[cid] = SectorCipher(*decode_spec(payload))
        elif op == FORGET:
            ciphers.pop(cid, None)
        else:
            src, dst = input_at(slot), output_at(slot)
            ciphers[cid].crypt_into(sector, area[src:src + length], op == ENCRYPT,
                                    area[dst:dst + length])
            out.write(REPLY.pack(req))
            out.flush()


def _helper_main() -> None:
    # An interrupt at the terminal reaches the whole process group; the daemon
    # decides, and the helper ends when the daemon closes its input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = int(sys.argv[1])
    with mmap.mmap(fd, AREA) as shared:
        serve(sys.stdin.buffer, sys.stdout.buffer, shared)
    # Without the interpreter's clean-up, which would flush replies into a pipe
    # nobody reads any more.
    os._exit(0)


# ---- the daemon's side -------------------------------------------------------------

class _Helper:
    """One helper process, its shared area and the pieces it owes us."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        fd = os.memfd_create("blockd-cipher")
        try:
            os.ftruncate(fd, AREA)
            self.view = memoryview(mmap.mmap(fd, AREA))
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env = dict(os.environ,
                       PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
            proc = subprocess.Popen(
                [sys.executable, "-m", "blockd.crypto.workers", str(fd)], env=env,
                pass_fds=(fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        finally:
            os.close(fd)
        assert proc.stdin is not None and proc.stdout is not None  # both piped
        self.proc, self.stdin, self.stdout = proc, proc.stdin, proc.stdout
        self.out = self.stdout.fileno()
        os.set_blocking(self.out, False)
        loop.add_reader(self.out, self._readable)
        self.free = list(range(SLOTS))
        #: Request id -> (future, slot, where the result goes).
        self.pending: dict[int, tuple[asyncio.Future, int, memoryview]] = {}
        self.defined: set[int] = set()
        self.ready = False
        self.alive = True
        self._partial = b""

    def _readable(self) -> None:
        try:
            data = os.read(self.out, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        if not self.ready:
            self.ready = data[:1] == HELLO
            data = data[1:]
        data = self._partial + data
        whole = len(data) - len(data) % REPLY.size
        self._partial = data[whole:]
        for (req,) in REPLY.iter_unpack(data[:whole]):
            fut, slot, dest = self.pending.pop(req)
            out = output_at(slot)
            dest[:] = self.view[out:out + len(dest)]
            self.free.append(slot)
            if not fut.done():
                fut.set_result(True)

    def send(self, head: bytes, payload: bytes = b"") -> None:
        """Requests are short and slots bound how many wait, so the pipe never fills."""
        if not self.alive:
            return
        try:
            self.stdin.write(head + payload)
            self.stdin.flush()
        except (OSError, ValueError):
            self.close()

    def close(self) -> None:
        """Stop the helper; whoever waits on it gets False and ciphers in the daemon."""
        if not self.alive:
            return
        self.alive = False
        if not self.loop.is_closed():
            self.loop.remove_reader(self.out)
        for fut, _, _ in self.pending.values():
            if not fut.done():
                fut.set_result(False)
        self.pending.clear()
        try:
            self.stdin.close()
        except OSError:
            pass
        # The helper exits on end of input; subprocess reaps it later.
        self.stdout.close()


class HelperPool:
    """The helper processes serving one event loop, one per core."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.helpers: list[_Helper] = []
        self.ids: dict[tuple, int] = {}
        self.next_id = 0
        self.next_req = 0
        self.failed = False
        self.slot_freed = asyncio.Event()

    def ready(self) -> bool:
        """True once every helper runs; the first call starts them (without waiting)."""
        if self.helpers and all(h.alive for h in self.helpers):
            return all(h.ready for h in self.helpers)
        if any(not h.ready for h in self.helpers):
            # One died before it could start (say, a broken install): no retries
            # that would spawn processes on every request.
            self.failed = True
        self.close()
        if not self.failed:
            try:
                self.helpers = [_Helper(self.loop) for _ in range(max(1, os.cpu_count() or 1))]
            except OSError:
                self.failed = True  # no processes here: everything is ciphered in the daemon
        return False

    def _cipher_id(self, cipher: SectorCipher) -> int:
        cid = self.ids.get(cipher.spec)
        if cid is None:
            self.next_id += 1
            cid = self.ids[cipher.spec] = self.next_id
            weakref.finalize(cipher, self._forget, cipher.spec)
        return cid

    def _forget(self, spec: tuple) -> None:
        """A cipher was dropped (its image closed): the helpers drop its key too."""
        cid = self.ids.pop(spec, None)
        for h in self.helpers:
            if cid in h.defined and h.alive:
                h.defined.discard(cid)
                h.send(REQUEST.pack(0, cid, FORGET, 0, 0, 0))

    async def run(self, cipher: SectorCipher, op: int, sector: int, piece: memoryview,
                  dest: memoryview) -> bool:
        """One piece through the least busy helper, its result into ``dest``.

        False if no helper could do it (they died): the caller ciphers it.
        """
        while True:
            live = [h for h in self.helpers if h.alive and h.free]
            if live or not any(h.alive for h in self.helpers):
                break
            self.slot_freed.clear()
            await self.slot_freed.wait()
        if not live:
            return False
        helper = max(live, key=lambda h: len(h.free))
        slot = helper.free.pop()
        helper.view[input_at(slot):input_at(slot) + len(piece)] = piece
        self.next_req = (self.next_req + 1) & 0xFFFFFFFF
        fut = self.loop.create_future()
        # Registered before sending: a send that finds the helper dead closes it,
        # which settles every pending piece, this one included.
        helper.pending[self.next_req] = (fut, slot, dest)
        cid = self._cipher_id(cipher)
        if cid not in helper.defined:
            spec = encode_spec(cipher.spec)
            helper.send(REQUEST.pack(0, cid, DEFINE, 0, 0, len(spec)), spec)
            helper.defined.add(cid)
        helper.send(REQUEST.pack(self.next_req, cid, op, sector, slot, len(piece)))
        try:
            return await fut
        finally:
            self.slot_freed.set()

    def close(self) -> None:
        for h in self.helpers:
            h.close()
        self.helpers = []
        self.ids.clear()


_pool: HelperPool | None = None


async def crypt_in_helpers(cipher: SectorCipher, encrypt: bool, sector: int,
                           data: bytes | bytearray | memoryview) -> bytes | bytearray:
    """``data`` (whole sectors, the first numbered ``sector``) ciphered, by helpers if ready."""
    global _pool
    loop = asyncio.get_running_loop()
    if _pool is None or _pool.loop is not loop:
        if _pool is not None:
            _pool.close()
        _pool = HelperPool(loop)
    pool = _pool
    run = cipher.encrypt if encrypt else cipher.decrypt
    view = memoryview(data).cast("B")
    if not pool.ready():
        return await asyncio.to_thread(run, sector, view)
    per = cipher.sector_size
    op = ENCRYPT if encrypt else DECRYPT
    out = bytearray(len(view))
    dest = memoryview(out)
    starts = range(0, len(view), PIECE)
    done = await asyncio.gather(*(pool.run(cipher, op, sector + pos // per,
                                           view[pos:pos + PIECE], dest[pos:pos + PIECE])
                                  for pos in starts))
    for ok, pos in zip(done, starts):
        if not ok:  # its helper died: cipher it here
            dest[pos:pos + PIECE] = await asyncio.to_thread(run, sector + pos // per,
                                                            view[pos:pos + PIECE])
    return out


def shutdown() -> None:
    """Stop the helpers (at daemon exit); they exit when their input closes."""
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None


if __name__ == "__main__":
    _helper_main()
