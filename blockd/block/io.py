"""The request path of every edge of the graph, as QEMU's ``block/io.c`` is.

Every read, write, zero, discard, flush, block status and truncate a
parent sends to a child (a format driver to its ``file``, a ``Backend``
to its node) is a method of the edge, :class:`Edge`, and passes here
once.  Here, and nowhere else, the request is checked (QEMU's bounds,
``EIO``; the edge's ``write``/``resize`` permission, ``EPERM``), padded
to the child's ``request_alignment`` by reading and rewriting the
partial blocks at its ends, serialised against overlapping writes when a
padded write or a :func:`serialised` section needs it, announced to the
child's before-write hooks, counted in flight for :func:`drain`, and
recorded in the child's dirty bitmaps.  Drivers implement the
``BlockNode`` methods and may trust what reaches them.

The common request (no padding, no drain, no serialisation, no hooks)
costs a few attribute tests: every test reads a plain int or a
container's truth, never an ``IntFlag`` (each of whose operations is a
Python-level call).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import os
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, TypeVar

if TYPE_CHECKING:
    from blockd.block.node import BlockNode, Claim, Extent

#: The largest length QEMU's block layer handles (INT64_MAX rounded down to 1 GiB).
MAX_LENGTH = (1 << 63) - (1 << 30)

#: ``Perm.WRITE`` and ``Perm.RESIZE`` as plain ints (see the module docstring).
_PERM_WRITE = 0x2
_PERM_RESIZE = 0x8

#: A before-write hook: awaited with the node and the range before a write-type
#: request reaches the node's driver (QEMU's before-write notifiers).
T = TypeVar("T")
BeforeWrite = Callable[["BlockNode", int, int], Awaitable[None]]


class WriteFlags(enum.IntFlag):
    """Flags on write-type requests."""

    NONE = 0
    FUA = 0x1  # force unit access: durable before completion
    MAY_UNMAP = 0x2  # write-zeroes may deallocate (punch a hole)
    NO_FALLBACK = 0x4  # write-zeroes must be fast or fail with ENOTSUP


_ZEROS = bytes(4 << 20)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte is zero: a memcmp against a shared zero buffer."""
    view = memoryview(data).cast("B")
    for pos in range(0, len(view), len(_ZEROS)):
        if not _ZEROS.startswith(view[pos:pos + len(_ZEROS)]):
            return False
    return True


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _bad_request(offset: int, length: int) -> bool:
    """QEMU's ``bdrv_check_request``: negative or beyond what the block layer addresses."""
    return offset < 0 or length < 0 or offset > MAX_LENGTH - length


class Requests:
    """A node's state in the request path, one object so the node's own attributes
    stay few (past about thirty, every attribute access of an object gets slower).

    Requests in flight into the node; write-type ones among them that are not
    tracked for serialisation; serialising ones; the tracked ones (kept only
    while a serialising one is about); drained sections holding the node;
    futures waiting for any of these to change; before-write hooks.
    """

    __slots__ = ("in_flight", "writing", "serialising", "tracked", "quiesce", "waiters",
                 "before_write")

    def __init__(self) -> None:
        self.in_flight = 0
        self.writing = 0
        self.serialising = 0
        self.tracked: list[_Tracked] = []
        self.quiesce = 0
        self.waiters: list[asyncio.Future[None]] = []
        self.before_write: list[BeforeWrite] = []


class Edge:
    """The requests a parent sends its child through one edge of the graph.

    :class:`blockd.block.node.ChildLink` is the edge; ``writable`` and
    ``resizable`` mirror its permissions as plain bools, ``external`` says
    the parent is a user (export, job, backend) rather than a node, whose
    new requests a drained section holds back.
    """

    child: "BlockNode"
    writable: bool
    resizable: bool
    external: bool

    def length(self) -> int:
        return self.child.length()

    def debug_event(self, event: str) -> None:
        """A format driver reached a blkdebug event point on this edge (QEMU's
        ``BLKDBG_EVENT`` names the child too)."""
        self.child.debug_event(event)

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        child = self.child
        st = child.requests
        if offset < 0 or length < 0 or offset > MAX_LENGTH - length:  # _bad_request, inline
            raise _error(errno.EIO)
        if st.quiesce and self.external:
            await _held(child)
        st.in_flight += 1
        try:
            align = child.request_alignment
            if align > 1 and (offset | length) & (align - 1):
                return await _read_padded(child, offset, length, align)
            return await child.read(offset, length)
        finally:
            st.in_flight -= 1
            if st.waiters:
                _wake(child)

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        child = self.child
        st = child.requests
        length = len(data)
        if offset < 0 or offset > MAX_LENGTH - length:  # _bad_request, inline
            raise _error(errno.EIO)
        if not self.writable:
            raise _error(errno.EPERM)
        if st.quiesce and self.external:
            await _held(child)
        if child.bitmaps and _readonly_bitmaps(child):
            raise _error(errno.EPERM)
        st.in_flight += 1
        try:
            if st.before_write:
                await _before_write(child, offset, length)
            align = child.request_alignment
            if st.serialising or (align > 1 and (offset | length) & (align - 1)):
                await _write_slow(child, offset, data, flags, align)
            else:
                st.writing += 1
                try:
                    if child.options.get("detect-zeroes", "off") != "off" and is_zero(data):
                        await _write_detected_zeroes(child, offset, length, flags)
                    else:
                        await child.write(offset, data, flags)
                finally:
                    st.writing -= 1
        finally:
            st.in_flight -= 1
            # Even a failed write may have changed part of the range.
            if child.bitmaps:
                child.mark_dirty(offset, length)
            if st.waiters:
                _wake(child)

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        child = self.child
        st = child.requests
        if _bad_request(offset, length):
            raise _error(errno.EIO)
        if not self.writable:
            raise _error(errno.EPERM)
        if st.quiesce and self.external:
            await _held(child)
        if child.bitmaps and _readonly_bitmaps(child):
            raise _error(errno.EPERM)
        st.in_flight += 1
        try:
            if st.before_write:
                await _before_write(child, offset, length)
            await _zeroes(child, offset, length, flags)
        finally:
            st.in_flight -= 1
            if child.bitmaps:
                child.mark_dirty(offset, length)
            if st.waiters:
                _wake(child)

    async def discard(self, offset: int, length: int) -> None:
        child = self.child
        st = child.requests
        if _bad_request(offset, length):
            raise _error(errno.EIO)
        if not self.writable:
            raise _error(errno.EPERM)
        if child.bitmaps and _readonly_bitmaps(child):
            raise _error(errno.EPERM)
        if child.options.get("discard", "ignore") != "unmap":
            return  # an ignored discard changes nothing, so bitmaps do not see it either
        if st.quiesce and self.external:
            await _held(child)
        st.in_flight += 1
        try:
            if st.before_write:
                await _before_write(child, offset, length)
            entry = await _track(child, offset, offset + length, False) \
                if st.serialising else None
            st.writing += entry is None
            try:
                await child.discard(offset, length)
            finally:
                _untrack(child, entry)
        finally:
            st.in_flight -= 1
            if child.bitmaps:
                child.mark_dirty(offset, length)
            if st.waiters:
                _wake(child)

    async def flush(self) -> None:
        child = self.child
        st = child.requests
        if st.quiesce and self.external:
            await _held(child)
        st.in_flight += 1
        try:
            await child.flush()
        finally:
            st.in_flight -= 1
            if st.waiters:
                _wake(child)

    async def block_status(self, offset: int, length: int) -> "Extent":
        return await self._query(self.child.block_status, offset, length)

    async def extents(self, offset: int, length: int) -> list["Extent"]:
        """:meth:`block_status` of a whole range in one call to the driver."""
        return await self._query(self.child.extents, offset, length)

    async def _query(self, ask: Callable[[int, int], Awaitable[T]], offset: int,
                     length: int) -> T:
        """A status question to the child, checked and counted in flight like data."""
        child = self.child
        st = child.requests
        if _bad_request(offset, length):
            raise _error(errno.EIO)
        if st.quiesce and self.external:
            await _held(child)
        st.in_flight += 1
        try:
            return await ask(offset, length)
        finally:
            st.in_flight -= 1
            if st.waiters:
                _wake(child)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        child = self.child
        st = child.requests
        if size < 0 or size > MAX_LENGTH:
            raise _error(errno.EINVAL)
        if not self.resizable:
            raise _error(errno.EPERM)
        if st.quiesce and self.external:
            await _held(child)
        st.in_flight += 1
        try:
            await child.truncate(size, exact, prealloc)
            for bitmap in child.bitmaps.values():
                bitmap.resize(child.length())
        finally:
            st.in_flight -= 1
            if st.waiters:
                _wake(child)

    async def claim(self, offset: int, length: int) -> "Claim | None":
        """Room for a bulk copy (see :meth:`BlockNode.claim`); only on a writable edge."""
        if not self.writable:
            raise _error(errno.EPERM)
        return await self.child.claim(offset, length)


# ---- the slow paths -------------------------------------------------------------------

def _readonly_bitmaps(node: "BlockNode") -> bool:
    """A bitmap loaded from a read-only image cannot record, so the node takes no writes."""
    return any(bitmap.readonly for bitmap in node.bitmaps.values())


async def _before_write(node: "BlockNode", offset: int, length: int) -> None:
    for hook in list(node.requests.before_write):
        await hook(node, offset, length)


async def _write_detected_zeroes(node: "BlockNode", offset: int, length: int,
                                 flags: WriteFlags) -> None:
    """``detect-zeroes``: a write of zeroes becomes a write-zeroes (unmapping with ``unmap``).

    The write is aligned and already counted or tracked, so it goes to the
    driver as it is: tracking it again could wait for a serialised section
    that waits for this very write.
    """
    if node.options.get("detect-zeroes") == "unmap":
        flags |= WriteFlags.MAY_UNMAP
    await node.write_zeroes(offset, length, flags)


async def _write_slow(node: "BlockNode", offset: int, data: bytes | bytearray | memoryview,
                      flags: WriteFlags, align: int) -> None:
    """A write that is padded or must be ordered against a serialised section."""
    length = len(data)
    if align > 1 and (offset | length) & (align - 1):
        await _write_padded(node, offset, data, flags, align, strict=False)
        return
    entry = await _track(node, offset, offset + length, False)
    try:
        if node.options.get("detect-zeroes", "off") != "off" and is_zero(data):
            await _write_detected_zeroes(node, offset, length, flags)
        else:
            await node.write(offset, data, flags)
    finally:
        _untrack(node, entry)


async def _zeroes(node: "BlockNode", offset: int, length: int, flags: WriteFlags) -> None:
    """Write-zeroes: partial blocks at either end are read, zeroed and rewritten."""
    align = node.request_alignment
    end = offset + length
    head_end = min(end, -(-offset // align) * align)
    tail_start = max(head_end, end - end % align)
    if head_end > offset:
        await _write_padded(node, offset, bytes(head_end - offset), flags & WriteFlags.FUA,
                            align, strict=True)
    if tail_start > head_end:
        st = node.requests
        entry = await _track(node, head_end, tail_start, False) if st.serialising else None
        st.writing += entry is None
        try:
            await node.write_zeroes(head_end, tail_start - head_end, flags)
        finally:
            _untrack(node, entry)
    if end > tail_start:
        await _write_padded(node, tail_start, bytes(end - tail_start), flags & WriteFlags.FUA,
                            align, strict=True)


def _span(node: "BlockNode", offset: int, length: int, align: int) -> tuple[int, int]:
    """The ``align``-aligned span covering a request, cut at the node's end when the
    end block is partial (the request itself may reach past the end: a write grows
    the node)."""
    start = offset - offset % align
    end = offset + length
    return start, max(end, min(-(-end // align) * align, node.length()))


async def _read_padded(node: "BlockNode", offset: int, length: int,
                       align: int) -> bytes | bytearray | memoryview:
    start, end = _span(node, offset, length, align)
    data = await node.read(start, end - start)
    return memoryview(data)[offset - start:offset - start + length]


async def _write_padded(node: "BlockNode", offset: int, data: bytes | bytearray | memoryview,
                        flags: WriteFlags, align: int, strict: bool) -> None:
    """Read the partial ``align`` blocks around a write, then write whole blocks.

    The span is serialised against every overlapping write, so no write
    lands between the read and the rewrite.  QEMU 7.2 ignores a failed
    padding read of a plain write (``strict`` false) and writes what its
    buffer held; the node's :meth:`~BlockNode.padding_read_failed` decides
    here (blkdebug returns its image's bytes, other nodes fail the write).
    Write-zeroes reports the failure.
    """
    start, end = _span(node, offset, len(data), align)
    padded = end - start
    entry = await _track(node, start, end, True)
    try:
        buf = bytearray(padded)
        wend = offset + len(data)
        head, tail = offset % align, wend % align
        size = node.length()
        # One read covers head and tail when the padded span is one or two blocks.
        merged = head and tail and padded <= 2 * align
        reads: list[tuple[tuple[str, ...], int, int]] = []  # (events, offset, length)
        if merged:
            reads.append((("head", "tail"), start, padded))
        elif head:
            reads.append((("head",), start, min(align, padded)))
        if tail and not merged:
            t = start + padded - (padded % align or align)
            reads.append((("tail",), t, start + padded - t))
        for names, o, n in reads:
            n = min(n, size - o)  # past the end there is nothing to read: zeroes
            for name in names:
                node.debug_event(f"pwritev_rmw_{name}")
            if n > 0:
                try:
                    chunk = await node.read(o, n)
                except OSError as exc:
                    if strict:
                        raise
                    chunk = await node.padding_read_failed(o, n, exc)
                buf[o - start:o - start + n] = chunk
            for name in names:
                node.debug_event(f"pwritev_rmw_after_{name}")
        buf[head:head + len(data)] = data
        await node.write(start, buf, flags)
    finally:
        _untrack(node, entry)


# ---- serialisation ----------------------------------------------------------------------

class _Tracked:
    """A write-type request in flight while a serialised section is active."""

    __slots__ = ("start", "end", "serialising")

    def __init__(self, start: int, end: int, serialising: bool) -> None:
        self.start = start
        self.end = end
        self.serialising = serialising


async def _track(node: "BlockNode", start: int, end: int, serialising: bool) -> _Tracked:
    """Enter ``[start, end)`` into the node's tracked writes, after those it must follow.

    A serialising request waits for every overlapping write that came
    before it, untracked ones included (they started before any section was
    active, and ``node.requests.writing`` counts them); a plain write waits only for
    overlapping serialising ones.  Waiting only for earlier entries cannot
    deadlock.
    """
    entry = _Tracked(start, end, serialising)
    if serialising:
        node.requests.serialising += 1
    node.requests.tracked.append(entry)
    try:
        if serialising:
            while node.requests.writing:
                await _wait(node)
        while True:
            for other in node.requests.tracked:
                if other is entry:
                    return entry
                if other.start < end and start < other.end and (serialising or other.serialising):
                    await _wait(node)
                    break
    except BaseException:
        _untrack(node, entry)
        raise


def _untrack(node: "BlockNode", entry: _Tracked | None) -> None:
    if entry is None:
        node.requests.writing -= 1
    else:
        node.requests.tracked.remove(entry)
        if entry.serialising:
            node.requests.serialising -= 1
    if node.requests.waiters:
        _wake(node)


@contextlib.asynccontextmanager
async def serialised(node: "BlockNode", offset: int, length: int) -> AsyncIterator[None]:
    """Hold off every other write to ``[offset, offset + length)`` of ``node``.

    Entered once the writes already in flight there have finished; until it
    ends, new writes overlapping the range wait.  A copy-before-write
    filter reads the old data inside such a section.
    """
    entry = await _track(node, offset, offset + length, True)
    try:
        yield
    finally:
        _untrack(node, entry)


# ---- drained sections ---------------------------------------------------------------------

def _wait(node: "BlockNode") -> "asyncio.Future[None]":
    """A future done at the next change of ``node``'s requests (one finishing, a section ending)."""
    fut = asyncio.get_running_loop().create_future()
    if node.requests.waiters:
        node.requests.waiters.append(fut)
    else:
        node.requests.waiters = [fut]
    return fut


def _wake(node: "BlockNode") -> None:
    waiters, node.requests.waiters = node.requests.waiters, []
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)


async def _held(node: "BlockNode") -> None:
    """A user's new request waits while its node is drained."""
    while node.requests.quiesce:
        await _wait(node)


def _upward(node: "BlockNode") -> list["BlockNode"]:
    """``node`` and every node above it: their requests may still reach it."""
    seen = {id(node): node}
    todo = [node]
    while todo:
        for link in todo.pop().parents:
            if not link.external and id(link.parent) not in seen:
                seen[id(link.parent)] = link.parent
                todo.append(link.parent)
    return list(seen.values())


@contextlib.asynccontextmanager
async def drain(node: "BlockNode") -> AsyncIterator[None]:
    """A drained section of ``node`` (QEMU's ``bdrv_drained_begin``/``end``).

    New requests of users (exports, jobs) into ``node`` and the nodes
    above it wait until the section ends; entering waits until no request
    is in flight in any of them, so the graph around ``node`` can change
    with nothing half done.  Sections nest.
    """
    nodes = _upward(node)
    for n in nodes:
        n.requests.quiesce += 1
    try:
        while True:
            busy = next((n for n in nodes if n.requests.in_flight), None)
            if busy is None:
                break
            await _wait(busy)
        yield
    finally:
        for n in nodes:
            n.requests.quiesce -= 1
            if not n.requests.quiesce and n.requests.waiters:
                _wake(n)

