"""Bulk copies off the event loop's critical path: writes by a helper process, reads
where they cost least.

Copying an image costs two memory copies per byte: source file into a
buffer, buffer into the target file.  The writes, the copy's critical path,
go to a helper process (:mod:`blockd.img.iochild`) that does nothing else,
so the loop only walks metadata (block status, qcow2 allocation), reads
and finds zero pieces while the helper writes the chunk before.

Reads follow the file driver's rule: what the kernel can serve without
waiting for a disk (a memory file system, or pages ``preadv`` with
``RWF_NOWAIT`` finds cached) is copied on the loop; the rest goes to a
second helper, started when first needed.  A read the loop can do itself
costs less than handing it over: waking a sleeping helper, and being woken
by its reply, costs tens of microseconds each in a virtual machine, and on
two cores a third busy process takes turns with the writer.

Why processes and not threads: a thread must win the GIL back after every
syscall, and here the loop holds it often, so a writer thread spends much
of its time waiting for it.  The helpers are forked, not started afresh: a
fork is far quicker than booting a new interpreter, and the copy buffers, shared anonymous mappings made before the fork,
are then shared with the helpers without further ado.

Only plain data at a known offset of a host file is handed over: what
``block_status`` reports for raw images and unencrypted, uncompressed
qcow2 clusters, and what a target's :meth:`BlockNode.claim` sets aside.
Everything else (compressed or encrypted clusters, other protocols) stays
with the drivers on the loop.

One writer, not a pool: two writers to the same file contend for its inode
lock, and qemu-img, too, writes one request at a time unless told ``-W``.  Each
job covers a whole chunk, because waking a process (or the loop, when a
job is done) costs tens of microseconds in a virtual machine.
"""

from __future__ import annotations

import array
import asyncio
import collections
import errno
import itertools
import mmap
import os
import signal
import socket
import sys
import traceback
from typing import Sequence

from blockd.drivers.file import FileNode
from blockd.img import iochild
from blockd.img.iochild import PieceFailed

__all__ = ["BulkIO", "PieceFailed", "host_file"]


def host_file(node: object) -> FileNode | None:
    """The file node if its data can be read and written with plain ``pread``/``pwrite``."""
    if isinstance(node, FileNode) and not node.direct and node.fd >= 0:
        return node
    return None


class BulkIO:
    """Shared buffers, the writer helper that writes from them, and reads into them.

    ``buffers`` are page-aligned buffers of ``size`` bytes that the helpers
    share, one per copy task.  Create it inside the running loop:
    the helpers hold no descriptors but the ones sent to them later.
    """

    def __init__(self, count: int, size: int) -> None:
        # Pages are only allocated when first used.
        self.buffers = [mmap.mmap(-1, size) for _ in range(count)]
        self._keys = {id(buf): i for i, buf in enumerate(self.buffers)}
        self._reads: _Channel | None = None  # until a read must wait for a disk
        self._writes = _Channel("writer", self.buffers)

    async def read(self, pieces: list[tuple[FileNode, int, int, int]], into: mmap.mmap) -> None:
        """Fill ``into[start:stop]`` from each ``(file, host, start, stop)`` piece: on the
        loop what needs no disk, the rest in one job of the reader helper.

        Bytes past the end of a file read as zeroes, as the file driver's own
        reads do.  :class:`PieceFailed` says which piece could not be read.
        """
        left = _read_here(pieces, into)
        if not left:
            return
        if self._reads is None:
            self._reads = _Channel("reader", self.buffers)
        try:
            await self._reads.run(iochild.READ, self._key(into), [pieces[i] for i in left])
        except PieceFailed as exc:
            raise PieceFailed(left[exc.index], exc.error) from None

    async def write(self, buf: mmap.mmap, pieces: list[tuple[FileNode, int, int, int]]) -> None:
        """Write ``buf[start:stop]`` at ``host`` in ``file`` for each piece, in one job;
        :class:`PieceFailed` says which piece failed."""
        await self._writes.run(iochild.WRITE, self._key(buf), pieces)

    def _key(self, buf: mmap.mmap) -> int:
        return self._keys[id(buf)]

    def close(self) -> None:
        """Stop the helpers once the jobs already sent are done."""
        if self._reads is not None:
            self._reads.close()
        self._writes.close()

    async def __aenter__(self) -> "BulkIO":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _read_here(pieces: list[tuple[FileNode, int, int, int]], into: mmap.mmap) -> list[int]:
    """Read the pieces the kernel serves without waiting for a disk; the indexes of the
    others, left for the reader helper.

    A file on a memory file system is read plainly, any other with
    ``RWF_NOWAIT``, which fails (possibly after a short read) where a page
    is not cached: that group of pieces is then left whole to the helper.
    """
    left: list[int] = []
    view = memoryview(into)
    work = [(f.fd, host, view[a:b]) for f, host, a, b in pieces]
    groups = iochild.adjacent(work)
    try:
        for first, fd, offset, views in groups:
            file = pieces[first][0]
            count = len(views)
            if not (file.in_memory or file.nowait_read):
                left += range(first, first + count)
                continue
            try:
                iochild.move_group(first, fd, offset, views, True,
                                   0 if file.in_memory else _NOWAIT)
            except PieceFailed as exc:
                if isinstance(exc.error, BlockingIOError):
                    left += range(first, first + count)
                elif exc.error.errno == errno.EOPNOTSUPP and not file.in_memory:
                    file.nowait_unsupported(read=True)  # as the driver itself concludes
                    left += range(first, first + count)
                else:
                    raise
    finally:
        del work, groups
        view.release()
    return left


_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


class _Channel:
    """One helper process and the socket its jobs and replies go over.

    The socket is non-blocking on this side: a job that does not fit waits
    in an outbox, so the loop never blocks on a busy helper (which could be
    blocked in turn on a reply the loop has not read).
    """

    def __init__(self, name: str, buffers: list[mmap.mmap]) -> None:
        self._loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        sys.stdout.flush()
        sys.stderr.flush()
        self._pid = os.fork()
        if self._pid == 0:
            _helper(ours, theirs, buffers)
        theirs.close()
        self.name = name
        self._sock = ours
        ours.setblocking(False)
        self._files: dict[int, tuple[FileNode, int]] = {}
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._outbox: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._inbox = bytearray()
        self._blocked = False  # waiting for room in the socket
        self._ids = itertools.count()
        self._closed = False
        self._loop.add_reader(ours.fileno(), self._receive)

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Queue a message (with descriptors to pass along) for the helper."""
        if self._closed:
            raise OSError(errno.EIO, f"the copy's {self.name} helper has stopped")
        self._outbox.append((memoryview(data), list(fds)))
        if len(self._outbox) == 1:
            self._flush()

    async def run(self, kind: bytes, buf: int,
                  pieces: list[tuple[FileNode, int, int, int]]) -> None:
        """Send one job and wait for its reply."""
        keyed = [(self._file_key(f), host, a, b) for f, host, a, b in pieces]
        job = next(self._ids)
        fut = self._loop.create_future()
        self._pending[job] = fut
        self.send(iochild.encode_job(kind, job, buf, keyed))
        await fut

    def _file_key(self, file: FileNode) -> int:
        """The key ``file`` has in the helper, sending it the descriptor the first time."""
        if id(file) not in self._files:
            key = len(self._files)
            self.send(iochild.encode_file(key), [file.fd])
            self._files[id(file)] = (file, key)  # kept, so the id is not reused
        return self._files[id(file)][1]

    def _flush(self) -> None:
        while self._outbox:
            data, fds = self._outbox[0]
            try:
                if fds:
                    sent = self._sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    sent = self._sock.send(data)
            except BlockingIOError:
                if not self._blocked:
                    self._blocked = True
                    self._loop.add_writer(self._sock.fileno(), self._flush)
                return
            except OSError as exc:
                self._stopped(f"is gone ({exc.strerror})")
                return
            if sent < len(data):
                self._outbox[0] = (data[sent:], [])  # descriptors went with the first byte
            else:
                self._outbox.popleft()
        if self._blocked:
            self._blocked = False
            self._loop.remove_writer(self._sock.fileno())

    def _receive(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                self._stopped(f"is gone ({exc.strerror})")
                return
            if not data:
                self._stopped("exited")
                return
            self._inbox += data
        for body in iochild.take_frames(self._inbox):
            job, failed, code = iochild.decode_reply(body)
            fut = self._pending.pop(job)
            if fut.cancelled():
                continue
            if failed >= 0:
                fut.set_exception(PieceFailed(failed, OSError(code, os.strerror(code))))
            else:
                fut.set_result(None)

    def _stopped(self, why: str) -> None:
        """The helper is gone: every waiting job fails, saying ``why``."""
        exc = OSError(errno.EIO, f"the copy's {self.name} helper {why}")
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._loop.remove_writer(self._sock.fileno())
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    def close(self) -> None:
        """Hang up, then wait for the helper: it finishes the jobs it has already
        received first, so nothing it writes lands after this returns."""
        if not self._closed:
            self._stopped("was stopped")
        self._sock.close()
        os.waitpid(self._pid, 0)  # the helper exits as soon as it reads the hang-up


def _helper(parent_end: socket.socket, ours: socket.socket, buffers: list[mmap.mmap]) -> None:
    """Run in a forked helper: serve jobs, then leave without the parent's clean-up.

    The child only runs :func:`iochild.serve` (syscalls and the zero scan,
    imported already), so the state it inherits from other threads, such
    as locks they held, is never touched.  ``os._exit`` skips atexit
    handlers and buffered output that belong to the parent.
    """
    code = 1
    try:
        parent_end.close()
        fd = ours.detach()
        # Every other descriptor is the parent's: an inherited end of the other
        # helper's socket would keep that helper from ever seeing the hang-up.
        os.closerange(3, fd)
        os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
        signal.set_wakeup_fd(-1)  # the loop's self-pipe was among them
        iochild.serve(fd, buffers)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)
