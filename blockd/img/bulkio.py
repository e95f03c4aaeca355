"""I/O threads for bulk copies: data moved with plain syscalls, off the event loop.

Copying an image costs two memory copies per byte: source file into a
buffer, buffer into the target file.  On the event loop's thread they add
up, where qemu-img spreads them over its thread pool.  ``BulkIO`` runs
them, and the zero scan that decides what needs writing, on threads of its
own: the loop only walks metadata (block status, qcow2 allocation), so the
copies use every core.

Only plain data at a known offset of a host file is handed over: what
``block_status`` reports for raw images and unencrypted, uncompressed
qcow2 clusters, and what a target's :meth:`BlockNode.claim` sets aside.
Everything else (compressed or encrypted clusters, other protocols) stays
with the drivers on the loop.

Callers pass buffers they own and reuse: fresh multi-megabyte buffers,
allocated by one thread and freed by another, measured a page fault per
4 KiB.  Each job covers a whole chunk, because waking a thread (or the
loop, when a job is done) costs tens of microseconds in a virtual machine;
callers queue work ahead (``convert`` runs several copy tasks at once) so a
thread often finds its next job already waiting.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import queue
import threading
from typing import Any, Callable

from blockd.drivers.file import FileNode

#: Zero runs in ``buf[start:stop]``, whose first byte is at guest offset ``guest``:
#: ``scan(buf, start, stop, guest)``.
Scan = Callable[[mmap.mmap, int, int, int], list[tuple[int, int]]]
Runs = list[tuple[int, int]]


def host_file(node: object) -> FileNode | None:
    """The file node if its data can be read and written with plain ``pread``/``pwrite``."""
    if isinstance(node, FileNode) and not node.direct and node.fd >= 0:
        return node
    return None


class BulkIO:
    """Two threads, one reading into callers' buffers and one writing from them.

    One writer, not a pool: two threads writing the same file contend for
    its inode lock (profiled: an eighth of the copy's CPU spent spinning on
    it), and qemu-img, too, writes one request at a time unless told ``-W``.
    """

    def __init__(self) -> None:
        self._reads = _Worker("blockd-reader")
        self._writes = _Worker("blockd-writer")

    async def read(self, pieces: list[tuple[FileNode, int, int, int]], into: mmap.mmap,
                   spans: list[tuple[int, int, int]], scan: Scan) -> list[Runs]:
        """Fill ``into[start:stop]`` from each ``(file, host, start, stop)`` piece, then
        return ``scan``'s zero runs of each ``(start, stop, guest)`` span, in one job.

        Bytes past the end of a file read as zeroes, as the file driver's own
        reads do.  :class:`PieceFailed` says which piece could not be read.
        """
        return await self._reads.submit(_fill, [(f.fd, host, a, b) for f, host, a, b in pieces],
                                        into, spans, scan)

    async def write(self, pieces: list[tuple[FileNode, int, memoryview]]) -> None:
        """Write each ``(file, host, data)`` piece, in one job (one thread hand-over);
        :class:`PieceFailed` says which piece failed."""
        await self._writes.submit(_drain, [(file.fd, host, data) for file, host, data in pieces])

    def close(self) -> None:
        """Stop the threads once the jobs already submitted are done."""
        self._reads.close()
        self._writes.close()

    async def __aenter__(self) -> "BulkIO":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class _Worker:
    """A thread running submitted calls in order, each result going back to its task."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> "asyncio.Future[Any]":
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        return fut

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, fut, fn, args = job
            try:
                result = fn(*args)
            except Exception as exc:  # handed to the waiting task, which reports it
                loop.call_soon_threadsafe(_settle, fut, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, fut, result, None)


def _fill(pieces: list[tuple[int, int, int, int]], into: mmap.mmap,
          spans: list[tuple[int, int, int]], scan: Scan) -> list[Runs]:
    view = memoryview(into)
    groups = _adjacent([(fd, host, view[start:stop]) for fd, host, start, stop in pieces])
    for first, fd, offset, views in groups:
        i = first
        try:
            while views:
                got = os.preadv(fd, views, offset)
                if got == 0:  # the file ends here
                    for rest in views:
                        rest[:] = bytes(len(rest))
                    break
                offset += got
                i += _advance(views, got)
        except OSError as exc:
            raise PieceFailed(i, exc) from None
    return [scan(into, start, stop, guest) for start, stop, guest in spans]


def _adjacent(pieces: list[tuple[int, int, memoryview]]
              ) -> list[tuple[int, int, int, list[memoryview]]]:
    """``(index of the first piece, fd, offset, buffers)`` for each run of pieces that
    follow each other in one file, to move with one ``preadv``/``pwritev``.

    A qcow2 image keeps a chunk's clusters side by side, and every syscall
    is a point where the thread must win the GIL back from the loop and the
    other thread: merged, a chunk usually costs one.
    """
    groups: list[tuple[int, int, int, list[memoryview]]] = []
    end = -1
    for i, (fd, offset, data) in enumerate(pieces):
        if groups and groups[-1][1] == fd and offset == end and len(groups[-1][3]) < _IOV_MAX:
            groups[-1][3].append(data)
        else:
            groups.append((i, fd, offset, [data]))
        end = offset + len(data)
    return groups


def _advance(views: list[memoryview], n: int) -> int:
    """Drop the first ``n`` bytes from ``views``; returns how many views were used up."""
    done = 0
    while views and n >= len(views[0]):
        n -= len(views.pop(0))
        done += 1
    if n:
        views[0] = views[0][n:]
    return done


#: Buffers per ``preadv``/``pwritev`` call, well under any system's IOV_MAX.
_IOV_MAX = 64


class PieceFailed(Exception):
    """Piece ``index`` of a batched read or write failed with ``error``."""

    def __init__(self, index: int, error: OSError) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


def _drain(pieces: list[tuple[int, int, memoryview]]) -> None:
    for first, fd, offset, views in _adjacent(pieces):
        i = first
        try:
            while views:
                n = os.pwritev(fd, views, offset)
                offset += n
                i += _advance(views, n)
        except OSError as exc:
            raise PieceFailed(i, exc) from None


def _settle(fut: "asyncio.Future[Any]", result: Any, exc: Exception | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
