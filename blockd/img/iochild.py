"""The I/O helper process of :mod:`blockd.img.bulkio`, and the messages it speaks.

A helper is a forked process that copies bytes between files and shared
buffers.  It exists for the GIL: a thread of the main process must
win the GIL back after every syscall, and in a copy the event loop and the
other thread hold it often enough that a writer thread measurably waited
for it.  A process has a GIL of its own.

The parent sends each file once, as a descriptor (SCM_RIGHTS), then jobs
that name files and the shared buffers by key; each job gets one reply.
Messages are length-prefixed frames on a stream socket.  The encoders and
decoders are pure functions, apart from the sockets.
"""

from __future__ import annotations

import array
import mmap
import os
import signal
import socket
import struct
from typing import Sequence

#: Message kinds.
FILE, READ, WRITE = b"F", b"R", b"W"

_FRAME = struct.Struct("=I")        # length of what follows
_HEAD = struct.Struct("=cQ")        # kind, file key or job id
_JOB = struct.Struct("=iI")         # buffer key, pieces
_PIECE = struct.Struct("=iqQQ")     # file key, file offset, start, stop in the buffer
_REPLY = struct.Struct("=Qii")      # job, failed piece (-1 if none), errno

Piece = tuple[int, int, int, int]   # file key, file offset, start, stop


def frame(body: bytes) -> bytes:
    """``body`` with its length in front."""
    return _FRAME.pack(len(body)) + body


def take_frames(inbox: bytearray) -> list[bytes]:
    """The bodies of the whole frames at the start of ``inbox``, which loses them (a
    partial frame at the end stays for the bytes still to come)."""
    bodies = []
    at = 0
    while len(inbox) - at >= _FRAME.size:
        (size,) = _FRAME.unpack_from(inbox, at)
        if len(inbox) - at - _FRAME.size < size:
            break
        bodies.append(bytes(inbox[at + _FRAME.size:at + _FRAME.size + size]))
        at += _FRAME.size + size
    del inbox[:at]
    return bodies


def encode_file(key: int) -> bytes:
    """Register the descriptor sent alongside as file ``key``."""
    return frame(_HEAD.pack(FILE, key))


def encode_job(kind: bytes, job: int, buf: int, pieces: Sequence[Piece]) -> bytes:
    """A READ (fill ``pieces`` of buffer ``buf`` from files) or WRITE (write ``pieces``
    of the buffer to files) job."""
    parts = [_HEAD.pack(kind, job), _JOB.pack(buf, len(pieces))]
    parts += [_PIECE.pack(*p) for p in pieces]
    return frame(b"".join(parts))


def decode_job(body: bytes) -> tuple[bytes, int, int, list[Piece]]:
    """(kind, job, buffer, pieces) of a job's frame body."""
    kind, job = _HEAD.unpack_from(body)
    buf, npieces = _JOB.unpack_from(body, _HEAD.size)
    at = _HEAD.size + _JOB.size
    pieces = [_PIECE.unpack_from(body, at + i * _PIECE.size) for i in range(npieces)]
    return kind, job, buf, pieces


def encode_reply(job: int, failed: int, errno: int) -> bytes:
    """A job's outcome: the index of the piece that failed (-1 if none) with its errno."""
    return frame(_REPLY.pack(job, failed, errno))


def decode_reply(body: bytes) -> tuple[int, int, int]:
    """(job, failed piece or -1, errno) of a reply's frame body."""
    return _REPLY.unpack(body)


def adjacent(pieces: list[tuple[int, int, memoryview]]
             ) -> list[tuple[int, int, int, list[memoryview]]]:
    """``(index of the first piece, fd, offset, buffers)`` for each run of pieces that
    follow each other in one file, to move with one ``preadv``/``pwritev``: a qcow2
    image keeps a chunk's clusters side by side, so a chunk usually costs one call."""
    groups: list[tuple[int, int, int, list[memoryview]]] = []
    end = -1
    for i, (fd, offset, data) in enumerate(pieces):
        if groups and groups[-1][1] == fd and offset == end and len(groups[-1][3]) < _IOV_MAX:
            groups[-1][3].append(data)
        else:
            groups.append((i, fd, offset, [data]))
        end = offset + len(data)
    return groups


#: Buffers per ``preadv``/``pwritev`` call, well under any system's IOV_MAX.
_IOV_MAX = 64


class PieceFailed(Exception):
    """Piece ``index`` of a job failed with ``error``."""

    def __init__(self, index: int, error: OSError) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


def move(pieces: list[tuple[int, int, memoryview]], reading: bool) -> None:
    """Read into (``reading``) or write from each ``(fd, offset, buffer)`` piece.

    Bytes past the end of a file read as zeroes, as the file driver's own
    reads do.
    """
    for first, fd, offset, views in adjacent(pieces):
        move_group(first, fd, offset, views, reading)


def move_group(first: int, fd: int, offset: int, views: list[memoryview], reading: bool,
               flags: int = 0) -> None:
    """Move one group of :func:`adjacent` (which uses up ``views``), ``preadv``/``pwritev``
    ``flags`` given; :class:`PieceFailed` names the piece that failed, counting
    from ``first``."""
    call = os.preadv if reading else os.pwritev
    i = first
    try:
        while views:
            n = call(fd, views, offset, flags)
            if n == 0 and reading:  # the file ends here
                for rest in views:
                    rest[:] = bytes(len(rest))
                break
            offset += n
            i += _advance(views, n)
    except OSError as exc:
        raise PieceFailed(i, exc) from None


def _advance(views: list[memoryview], n: int) -> int:
    """Drop the first ``n`` bytes from ``views``; returns how many views were used up."""
    done = 0
    while views and n >= len(views[0]):
        n -= len(views.pop(0))
        done += 1
    if n:
        views[0] = views[0][n:]
    return done


class _Helper:
    """The helper's side: registered files and buffers, and the jobs run on them."""

    def __init__(self, sock: socket.socket, buffers: list[mmap.mmap]) -> None:
        self.sock = sock
        self.files: dict[int, int] = {}
        self.buffers = buffers

    def serve(self) -> None:
        while (got := self._receive()) is not None:
            body, fds = got
            kind, key = _HEAD.unpack_from(body)
            if kind == FILE:
                self.files[key] = fds[0]
            else:
                self.sock.sendall(self._run(body))

    def _run(self, body: bytes) -> bytes:
        kind, job, key, pieces = decode_job(body)
        view = memoryview(self.buffers[key])
        work = [(self.files[f], offset, view[a:b]) for f, offset, a, b in pieces]
        try:
            move(work, kind == READ)
        except PieceFailed as exc:
            return encode_reply(job, exc.index, exc.error.errno or 0)
        finally:
            del work
            view.release()
        return encode_reply(job, -1, 0)

    def _receive(self) -> tuple[bytes, list[int]] | None:
        """The next frame body and the descriptors sent with it, or None at the end."""
        fds = array.array("i")
        head = b""
        while len(head) < _FRAME.size:
            data, anc, _, _ = self.sock.recvmsg(_FRAME.size - len(head),
                                                socket.CMSG_SPACE(fds.itemsize * 4))
            if not data:
                return None
            head += data
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        (size,) = _FRAME.unpack(head)
        body = bytearray(size)
        view = memoryview(body)
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                return None
            got += n
        return bytes(body), list(fds)


def serve(fd: int, buffers: list[mmap.mmap]) -> None:
    """Serve jobs on socket ``fd`` until the parent hangs up (the helper's entry point);
    jobs name ``buffers`` by index."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        _Helper(socket.socket(fileno=fd), buffers).serve()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent hung up while jobs were in flight: it no longer wants them
