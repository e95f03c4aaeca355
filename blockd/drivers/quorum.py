"""The ``quorum`` driver: the same data kept on several children, reads decided by vote.

Writes go to every child; a write (or flush) succeeds when at least
``vote-threshold`` children took it.  A read asks every child (or, with
``read-pattern=fifo``, the first that answers) and returns the version of
the data that at least ``vote-threshold`` children agree on; children
that disagree or fail are reported with ``QUORUM_REPORT_BAD`` and, with
``rewrite-corrupted``, overwritten with the winning version.  A request
without a quorum fails and raises ``QUORUM_FAILURE``.  Children can be
added and removed at run time (``x-blockdev-change``), which is how a
replica is replaced.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import sys
from typing import Any, Awaitable, Callable

from blockd.block.graph import BlockGraph, OpenContext
from blockd.block.node import BlockNode, ChildLink, Extent, Perm, Status, WriteFlags
from blockd.errors import QMPError

_SECTOR = 512


class _Vote:
    """One version of a result and the children (by position) that gave it."""

    def __init__(self, key: Any, index: int) -> None:
        self.key = key
        self.first = index
        self.voters: list[int] = []


def _tally(results: list[tuple[int, Any]]) -> list[_Vote]:
    """Versions in the order they were first seen."""
    versions: dict[Any, _Vote] = {}
    for index, key in results:
        versions.setdefault(key, _Vote(key, index)).voters.append(index)
    return list(versions.values())


def _winner(votes: list[_Vote]) -> _Vote:
    """The version with the most voters; of equals, the one seen last (QEMU's rule)."""
    return max(reversed(votes), key=lambda v: len(v.voters))


def _reaches(node: BlockNode, target: BlockNode) -> bool:
    """Whether ``target`` is ``node`` or one of its descendants."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current is target:
            return True
        if id(current) not in seen:
            seen.add(id(current))
            stack.extend(link.child for link in current.children.values())
    return False


class QuorumNode(BlockNode):
    driver = "quorum"

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.threshold = 1
        self.blkverify = False
        self.rewrite = False
        self.fifo = False
        #: The number the next added child's role takes (``children.N``).
        self.next_index = 0
        self.size = 0
        self.emit: Callable[[str, dict[str, Any]], None] | None = None

    # ---- open -----------------------------------------------------------

    async def open(self, ctx: OpenContext) -> None:
        opts = self.options
        self.emit = ctx.graph.emit
        refs = opts["children"]
        if not refs:
            raise QMPError("Number of provided children must be 1 or more")
        self.threshold = opts["vote-threshold"]
        if self.threshold < 1:
            raise QMPError("Parameter 'vote-threshold' expects a value >= 1")
        if self.threshold > len(refs):
            raise QMPError("threshold may not exceed children count")
        self.fifo = opts.get("read-pattern", "quorum") == "fifo"
        if not self.fifo:
            self.blkverify = opts.get("blkverify", False)
            if self.blkverify and (len(refs) != 2 or self.threshold != 2):
                raise QMPError("blkverify=on can only be set if there are exactly two files "
                               "and vote-threshold is 2")
            self.rewrite = opts.get("rewrite-corrupted", False)
            if self.rewrite and self.blkverify:
                raise QMPError("rewrite-corrupted=on cannot be used with blkverify=on")
        for i, ref in enumerate(refs):
            await ctx.open_child(ref, f"children.{i}")
        self.next_index = len(refs)
        sizes = {link.child.length() for link in self._links()}
        if len(sizes) != 1:
            raise QMPError("Could not refresh total sector count: Input/output error")
        self.size = sizes.pop()

    def _links(self) -> list[ChildLink]:
        return [link for role, link in self.children.items() if role.startswith("children.")]

    def child_perm(self, role: str) -> tuple[Perm, Perm]:
        """What the parents need passes through; nobody else may write or resize a
        replica, or the children would no longer hold the same data."""
        perm = self.cumulative_perm & (Perm.CONSISTENT_READ | Perm.WRITE |
                                       Perm.WRITE_UNCHANGED | Perm.RESIZE)
        if self.rewrite:
            perm |= Perm.WRITE
        return perm, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        raise QMPError(f"Block format 'quorum' used by node '{self.node_name}' does not "
                       "support reopening files")

    # ---- children at run time (x-blockdev-change) --------------------------

    async def add_child(self, graph: BlockGraph, child: BlockNode) -> None:
        """A node nobody else uses becomes a new replica (after the others' data is
        copied to it by the manager: quorum does not resynchronise)."""
        if child.parents:
            raise QMPError(f"The node {child.node_name} already has a parent")
        if self.blkverify:
            raise QMPError("Cannot add a child to a quorum in blkverify mode")
        role = f"children.{self.next_index}"
        if _reaches(child, self):
            raise QMPError(f"Making '{child.node_name}' a {role} child of '{self.node_name}' "
                           "would create a cycle")
        graph.attach(self, child, role)
        self.next_index += 1

    async def del_child(self, graph: BlockGraph, link: ChildLink) -> None:
        if len(self._links()) <= self.threshold:
            raise QMPError("The number of children cannot be lower than the vote "
                           f"threshold {self.threshold}")
        if link.role == f"children.{self.next_index - 1}":
            self.next_index -= 1
        await graph.unref_child(link)

    # ---- queries -----------------------------------------------------------

    def length(self) -> int:
        return self.size

    def exact_filename(self) -> str | None:
        return None

    def has_info(self) -> bool:
        return False

    def full_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"driver": self.driver,
                                "children": [link.child.full_options()
                                             for link in self._links()],
                                "vote-threshold": self.threshold}
        for key in ("blkverify", "rewrite-corrupted", "read-pattern"):
            if key in self.options:
                opts[key] = self.options[key]
        return opts

    def allocated_file_size(self) -> int | None:
        sizes = [link.child.allocated_file_size() for link in self._links()]
        return sum(s for s in sizes if s is not None)

    # ---- events ------------------------------------------------------------

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        if self.emit is not None:
            self.emit(event, data)

    @staticmethod
    def _sectors(offset: int, length: int) -> dict[str, int]:
        start = offset // _SECTOR
        return {"sector-num": start, "sectors-count": -(-(offset + length) // _SECTOR) - start}

    def _report_bad(self, kind: str, child: BlockNode, offset: int, length: int,
                    error: OSError | None = None) -> None:
        data: dict[str, Any] = {"type": kind}
        if error is not None:
            data["error"] = os.strerror(error.errno or errno.EIO)
        data["node-name"] = child.node_name
        data.update(self._sectors(offset, length))
        self._emit("QUORUM_REPORT_BAD", data)

    def _failure(self, offset: int, length: int) -> None:
        self._emit("QUORUM_FAILURE", {"reference": self.node_name,
                                      **self._sectors(offset, length)})

    @staticmethod
    def _vote_error(errors: list[tuple[int, OSError]]) -> OSError:
        """The error most children gave (QEMU votes on the error code too)."""
        votes = _tally([(i, exc.errno or errno.EIO) for i, exc in errors])
        code = _winner(votes).key
        return OSError(code, os.strerror(code))

    # ---- data path ---------------------------------------------------------

    async def _each(self, kind: str, offset: int, length: int,
                    op: Callable[[ChildLink], Awaitable[Any]]
                    ) -> tuple[list[ChildLink], list[tuple[int, Any]], list[tuple[int, OSError]]]:
        """Run ``op`` on every child's edge at once; results and failures by child
        position, each failure reported as it happens."""
        children = self._links()
        done: list[tuple[int, Any]] = []
        failed: list[tuple[int, OSError]] = []

        async def one(i: int, link: ChildLink) -> None:
            try:
                done.append((i, await op(link)))
            except OSError as exc:
                failed.append((i, exc))
                self._report_bad(kind, link.child, offset, length, exc)

        await asyncio.gather(*(one(i, c) for i, c in enumerate(children)))
        done.sort(key=lambda item: item[0])
        failed.sort(key=lambda item: item[0])
        return children, done, failed

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self.fifo:
            return await self._read_fifo(offset, length)
        children, done, failed = await self._each(
            "read", offset, length, lambda child: child.read(offset, length))
        if len(done) < self.threshold:
            self._failure(offset, length)
            raise self._vote_error(failed)
        datas = {i: bytes(data) for i, data in done}
        first = done[0][0]
        if all(datas[i] == datas[first] for i, _ in done):
            return datas[first]
        if self.blkverify:
            return self._blkverify_mismatch(offset, length, datas[done[0][0]],
                                            datas[done[1][0]])
        votes = _tally([(i, hashlib.sha256(datas[i]).digest()) for i, _ in done])
        best = _winner(votes)
        if len(best.voters) < self.threshold:
            self._failure(offset, length)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        winning = datas[best.first]
        bad = [i for vote in reversed(votes) if vote is not best
               for i in reversed(vote.voters)]
        for i in bad:
            self._report_bad("read", children[i].child, offset, length)
        if self.rewrite:
            await asyncio.gather(*(self._rewrite(children[i], offset, winning) for i in bad))
        return winning

    @staticmethod
    async def _rewrite(link: ChildLink, offset: int, data: bytes) -> None:
        """Repair a replica with the winning data; a failure leaves it as it was."""
        try:
            await link.write(offset, data)
        except OSError:
            pass

    def _blkverify_mismatch(self, offset: int, length: int, a: bytes, b: bytes) -> bytes:
        """QEMU ends the whole process here; blockd fails the request and stays up."""
        at = next(i for i in range(length) if a[i] != b[i])
        print(f"quorum: offset={offset} bytes={length} contents mismatch at offset "
              f"{offset + at}", file=sys.stderr, flush=True)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    async def _read_fifo(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        err: OSError | None = None
        for link in self._links():
            try:
                return await link.read(offset, length)
            except OSError as exc:
                self._report_bad("read", link.child, offset, length, exc)
                err = exc
        assert err is not None
        raise err

    async def _write_all(self, offset: int, length: int,
                         op: Callable[[ChildLink], Awaitable[None]]) -> None:
        _, done, failed = await self._each("write", offset, length, op)
        if len(done) < self.threshold:
            self._failure(offset, length)
            raise self._vote_error(failed)

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        await self._write_all(offset, len(data),
                              lambda child: child.write(offset, data, flags))

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        await self._write_all(offset, length,
                              lambda child: child.write_zeroes(offset, length, flags))

    async def discard(self, offset: int, length: int) -> None:
        """Quorum passes no discards down (as QEMU's): the replicas keep their data."""

    async def flush(self) -> None:
        failed: list[tuple[int, OSError]] = []
        links = self._links()
        for i, link in enumerate(links):
            try:
                await link.flush()
            except OSError as exc:
                self._report_bad("flush", link.child, 0, 0, exc)
                failed.append((i, exc))
        if len(links) - len(failed) < self.threshold:
            raise self._vote_error(failed)

    async def block_status(self, offset: int, length: int) -> Extent:
        """Zeroes only where every child says so; data (the longest run) elsewhere."""
        zero_run, data_run = length, 0
        for link in self._links():
            try:
                ext = await link.block_status(offset, length)
            except OSError as exc:
                self._report_bad("read", link.child, offset, length, exc)
                data_run = length
                break
            if ext.status & Status.ZERO:
                zero_run = min(zero_run, ext.length)
            else:
                data_run = max(data_run, ext.length)
        if data_run:
            return Extent(data_run, Status.DATA | Status.ALLOCATED)
        return Extent(zero_run, Status.ZERO | Status.ALLOCATED)

