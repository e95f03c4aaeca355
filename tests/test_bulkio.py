"""The copy helpers of ``blockd-img convert``: their messages, their jobs, their failures.

The helpers are real forked processes working on real files; a helper
that dies must turn into an error for the waiting copy, not a hang.
Reads the kernel serves from memory happen on the loop; the others go to
the reader helper, so tests mark a file as uncached to send its reads there.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from blockd.block.graph import BlockGraph
from blockd.img import iochild
from blockd.img.bulkio import BulkIO, PieceFailed
from harness import WAIT

KIB = 1024


def test_job_and_reply_round_trip() -> None:
    pieces = [(0, 1 << 40, 0, 4096), (3, 7, 4096, 8192)]
    body = iochild.encode_job(iochild.READ, 9, 2, pieces)[4:]
    assert iochild.decode_job(body) == (iochild.READ, 9, 2, pieces)
    reply = iochild.encode_reply(9, 1, 28)
    assert int.from_bytes(reply[:4], sys.byteorder) == len(reply) - 4
    assert iochild.decode_reply(reply[4:]) == (9, 1, 28)


def test_frames_split_across_arrivals() -> None:
    """Replies come off the socket in arbitrary pieces: whole frames are taken, and a
    partial one waits for the rest."""
    one, two = iochild.encode_reply(1, -1, 0), iochild.encode_reply(2, 0, 28)
    inbox = bytearray(one + two[:5])
    assert [iochild.decode_reply(b)[0] for b in iochild.take_frames(inbox)] == [1]
    assert inbox == two[:5]
    assert iochild.take_frames(inbox) == []
    inbox += two[5:]
    assert [iochild.decode_reply(b) for b in iochild.take_frames(inbox)] == [(2, 0, 28)]
    assert inbox == bytearray()


def test_adjacent_pieces_merge() -> None:
    a, b, c = memoryview(bytearray(4)), memoryview(bytearray(4)), memoryview(bytearray(4))
    groups = iochild.adjacent([(5, 100, a), (5, 104, b), (5, 200, c), (6, 204, a)])
    assert [(first, fd, off, len(views)) for first, fd, off, views in groups] == \
        [(0, 5, 100, 2), (2, 5, 200, 1), (3, 6, 204, 1)]


async def _files(tmp_path: Path) -> tuple[BlockGraph, object, object]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = bytearray(os.urandom(64 * KIB))
    data[16 * KIB:24 * KIB] = bytes(8 * KIB)          # a zero run inside the data
    src.write_bytes(bytes(data))
    dst.write_bytes(b"")
    graph = BlockGraph()
    s = await graph.open_node({"driver": "file", "node-name": "s", "filename": str(src),
                               "read-only": True})
    d = await graph.open_node({"driver": "file", "node-name": "d", "filename": str(dst)})
    return graph, s, d


def _uncached(node: object) -> None:
    """Make the copy treat ``node``'s file as one whose pages may need a disk read."""
    node.in_memory = node.nowait_read = False  # type: ignore[attr-defined]


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A directory on a memory file system, where reads never wait for a disk."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as name:
        yield Path(name)


@pytest.mark.parametrize("where", ["memory", "cache", "helper"])
def test_read_write(tmp_path: Path, shm_dir: Path, where: str) -> None:
    """Reads from a memory file system, from the page cache (``RWF_NOWAIT``) and through
    the reader helper fill the buffer alike."""
    base = shm_dir if where == "memory" else tmp_path

    async def go() -> None:
        graph, s, d = await _files(base)
        assert s.in_memory == (where == "memory")
        if where == "helper":
            _uncached(s)
        async with BulkIO(1, 128 * KIB) as io:
            buf = io.buffers[0]
            buf[:] = b"x" * len(buf)
            # Two pieces that follow each other in the file (one preadv), and one
            # reaching past its end, whose missing part reads as zeroes.
            await io.read([(s, 0, 0, 32 * KIB), (s, 32 * KIB, 32 * KIB, 64 * KIB),
                           (s, 60 * KIB, 64 * KIB, 72 * KIB)], buf)
            assert (io._reads is not None) == (where == "helper")
            assert buf[68 * KIB:72 * KIB] == bytes(4 * KIB)
            await io.write(buf, [(d, 0, 0, 16 * KIB), (d, 24 * KIB, 24 * KIB, 68 * KIB)])
        await graph.close_all()

    asyncio.run(go())
    want = (base / "src").read_bytes()
    assert (base / "dst").read_bytes() == want + want[60 * KIB:]


def test_mixed_read_names_failed_piece(tmp_path: Path) -> None:
    """Pieces read on the loop and in the helper land alike, and a failure in either
    names its piece by its place in the whole request."""
    async def go() -> None:
        graph, s, d = await _files(tmp_path)
        other = await graph.open_node({"driver": "file", "node-name": "o", "read-only": True,
                                       "filename": str(tmp_path / "src")})
        _uncached(other)
        async with BulkIO(1, 64 * KIB) as io:
            buf = io.buffers[0]
            await io.read([(s, 0, 0, 8 * KIB), (other, 8 * KIB, 8 * KIB, 32 * KIB),
                           (s, 32 * KIB, 32 * KIB, 64 * KIB)], buf)
            assert bytes(buf) == (tmp_path / "src").read_bytes()
            # Reading a directory's descriptor fails (EISDIR).
            bad = await graph.open_node({"driver": "file", "node-name": "b",
                                         "filename": str(tmp_path / "dst")})
            os.close(bad.fd)
            bad.fd = os.open(tmp_path, os.O_RDONLY)
            for kind in ("loop", "helper"):
                if kind == "helper":
                    _uncached(bad)
                with pytest.raises(PieceFailed) as err:
                    await io.read([(other, 0, 0, 4 * KIB), (bad, 0, 4 * KIB, 8 * KIB)], buf)
                assert err.value.index == 1 and err.value.error.strerror == os.strerror(21)
        await graph.close_all()

    asyncio.run(go())


def test_failed_piece_is_named(tmp_path: Path) -> None:
    async def go() -> None:
        graph, s, d = await _files(tmp_path)
        async with BulkIO(1, 64 * KIB) as io:
            buf = io.buffers[0]
            # The source is open read-only: writing to it fails at the second piece.
            with pytest.raises(PieceFailed) as err:
                await io.write(buf, [(d, 0, 0, 4 * KIB), (s, 0, 0, 4 * KIB)])
            assert err.value.index == 1 and err.value.error.strerror == os.strerror(9)
            # The helper is still there for the next job.
            await io.write(buf, [(d, 0, 0, 4 * KIB)])
        await graph.close_all()

    asyncio.run(go())


def test_dead_helper_fails_the_copy(tmp_path: Path) -> None:
    async def go() -> None:
        graph, s, d = await _files(tmp_path)
        io = BulkIO(1, 64 * KIB)
        buf = io.buffers[0]
        await io.write(buf, [(d, 0, 0, 4 * KIB)])
        os.kill(io._writes._pid, signal.SIGKILL)
        with pytest.raises(OSError, match="writer helper"):
            await asyncio.wait_for(io.write(buf, [(d, 0, 0, 4 * KIB)]), WAIT)
        await asyncio.wait_for(asyncio.to_thread(io.close), WAIT)
        await graph.close_all()

    asyncio.run(go())


def test_helpers_hold_only_their_own_socket(tmp_path: Path) -> None:
    """A helper keeping the other helper's socket open would hang ``close``."""
    async def go() -> None:
        graph, s, d = await _files(tmp_path)
        _uncached(s)
        io = BulkIO(1, 4 * KIB)
        buf = io.buffers[0]
        await io.read([(s, 0, 0, 4 * KIB)], buf)  # both helpers have started serving
        await io.write(buf, [])
        # The reader, started after the writer, holds its socket and the source.
        for pid, held in ((io._reads._pid, 2), (io._writes._pid, 1)):
            fds = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
            assert len([fd for fd in fds if fd > 2]) == held, fds
        await asyncio.wait_for(asyncio.to_thread(io.close), WAIT)
        await graph.close_all()

    asyncio.run(go())
