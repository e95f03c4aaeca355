"""The ``file`` protocol driver: a regular file (or block device) on the host.

Data requests try the page cache first without blocking the event loop
(``preadv``/``pwritev`` with ``RWF_NOWAIT``) and fall back to a worker
thread when the kernel would block.  That keeps small cached I/O on the
loop, where it is cheapest, and slow I/O off it.  A file system that refuses
``RWF_NOWAIT`` for a direction (EOPNOTSUPP: ext4 and xfs refuse buffered
writes) is not asked again for that file; EAGAIN only means "not this time".

Image locking follows QEMU's protocol so that blockd and QEMU processes
exclude each other: open file description (OFD) read locks on byte
``100 + bit`` for every permission held and on ``200 + bit`` for every
permission not shared with others.  A would-be user tests the opposite
bytes before taking its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from collections.abc import Iterator
from typing import Any

from blockd.block.graph import BlockGraph, OpenContext
from blockd.drivers.workers import BUFFERED, DEVICE
from blockd.block.node import BlockNode, Claim, Extent, Perm, PERM_NAMES, Status, WriteFlags
from blockd.errors import QMPError
from blockd.paths import os_path

_PERM_BASE = 100
_SHARED_BASE = 200
#: ``struct flock`` on Linux x86-64/aarch64: type, whence, start, len, pid.
_FLOCK = "hhxxxxqqi4x"

_FALLOC_KEEP_SIZE = 0x01
_FALLOC_PUNCH_HOLE = 0x02
_FALLOC_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
#: Above this size a request goes straight to a thread: it rarely fits the cache
#: path and copying it would stall the loop.
_INLINE_MAX = 1 << 20
#: File systems whose I/O is a memory copy: a thread hop costs more than the I/O.
_MEMORY_FS = {"tmpfs", "ramfs", "hugetlbfs"}
#: The end of the largest request QEMU's block layer accepts (INT64_MAX aligned down).
MAX_REQUEST_END = (1 << 63) - (1 << 31)


#: Requests up to this size use their worker thread's scratch buffer.
_SCRATCH_MAX = 1 << 20
_thread_scratch = threading.local()


@contextlib.contextmanager
def _scratch(size: int) -> Iterator[memoryview]:
    """Page-aligned memory for one O_DIRECT request (which needs aligned buffers).

    Each worker thread keeps one mapping for the requests it runs: a fresh
    one per request costs two system calls and page faults.
    """
    if size > _SCRATCH_MAX:
        with mmap.mmap(-1, size) as own:
            with memoryview(own) as view:
                yield view
        return
    mapping = getattr(_thread_scratch, "mapping", None)
    if mapping is None:
        mapping = _thread_scratch.mapping = mmap.mmap(-1, _SCRATCH_MAX)
    with memoryview(mapping) as whole, whole[:size] as view:
        yield view


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` (a write may stop short).  The views of what is left die
    on return, so a caller's scratch mapping can be closed after it."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _check_request(offset: int, length: int) -> None:
    """Offsets come from image metadata too: out of range is EIO, as in QEMU."""
    if offset < 0 or length < 0 or offset + length > MAX_REQUEST_END:
        raise OSError(errno.EIO, "Input/output error")


def filesystem_type(fd: int) -> str:
    """The type of the file system holding ``fd`` (from /proc/self/mountinfo)."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[2] == dev:
                    return fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with mode flags (``os.posix_fallocate`` has none)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class LockBytes:
    """QEMU's image locking protocol on one file descriptor."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.held: set[int] = set()

    def _fcntl(self, cmd: int, ltype: int, offset: int) -> int:
        arg = struct.pack(_FLOCK, ltype, os.SEEK_SET, offset, 1, 0)
        res = fcntl.fcntl(self.fd, cmd, arg)
        return struct.unpack(_FLOCK, res)[0]

    def _locked_by_other(self, offset: int) -> bool:
        return self._fcntl(fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK

    def check(self, perm: Perm, shared: Perm) -> None:
        """Raise QEMU's error if another process forbids ``perm`` or uses what we don't share."""
        for i, (bit, name) in enumerate(PERM_NAMES.items()):
            hint = f"Is another process using the image [{self.path}]?"
            if perm & bit and self._locked_by_other(_SHARED_BASE + i):
                raise QMPError(f'Failed to get "{name}" lock', hint=hint)
            if not shared & bit and self._locked_by_other(_PERM_BASE + i):
                raise QMPError(f'Failed to get shared "{name}" lock', hint=hint)

    def apply(self, perm: Perm, shared: Perm) -> None:
        want = set()
        for i, bit in enumerate(PERM_NAMES):
            if perm & bit:
                want.add(_PERM_BASE + i)
            if not shared & bit:
                want.add(_SHARED_BASE + i)
        for offset in sorted(want - self.held):
            self._fcntl(fcntl.F_OFD_SETLK, fcntl.F_RDLCK, offset)
        for offset in sorted(self.held - want):
            self._fcntl(fcntl.F_OFD_SETLK, fcntl.F_UNLCK, offset)
        self.held = want


def _open_error(path: str, exc: OSError) -> QMPError:
    return QMPError(f"Could not open '{path}': {exc.strerror}")


class FileNode(BlockNode):
    """A host file opened with ``pread``/``pwrite`` semantics."""

    driver = "file"
    is_protocol = True
    strong_options = ("filename",)

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        super().__init__(node_name, options, read_only)
        self.fd = -1
        self.path = options["filename"]
        self.size = 0
        self.direct = False
        #: Writes are durable on completion (``O_DSYNC``): see ``BlockGraph.write_through``.
        self.dsync = False
        self.locks: LockBytes | None = None
        self.is_block_device = False
        self.discards_ok = self.discards_failed = self.discard_bytes_ok = 0
        #: I/O done on the loop thread (memory-backed files); else cache-first, then threads.
        self.in_memory = False
        #: Whether ``RWF_NOWAIT`` is worth trying, per direction, and how often the
        #: kernel refused it as unsupported (once per direction at most).
        self.nowait_read = self.nowait_write = bool(_NOWAIT)
        self.nowait_refused = 0
        #: The last ``[start, end)`` found to hold data: sequential readers ask again
        #: and again, and ``SEEK_HOLE`` is slow on some file systems.
        self.data_extent = (0, 0)
        #: Changes made, and how many of them the last successful flush covered: a
        #: flush with nothing new to sync is skipped, as QEMU skips it.
        self.write_gen = 0
        self.flushed_gen = 0
        #: O_DIRECT writes in flight: aligned span, whether read-modify-write, done.
        self.direct_writes: list[tuple[int, int, bool, asyncio.Event]] = []

    # ---- open/close ---------------------------------------------------------

    async def open(self, ctx: OpenContext) -> None:
        opts = self.options
        pr_manager = opts.get("pr-manager")
        if pr_manager is not None:
            # blockd has no pr-manager objects: the id names nothing, or another kind.
            try:
                ctx.secret(pr_manager)
            except QMPError:
                raise QMPError(f"No persistent reservation manager with id '{pr_manager}'") \
                    from None
            raise QMPError(f"Object with id '{pr_manager}' is not a persistent reservation "
                           "manager")
        if opts.get("aio") == "native" and not opts.get("cache", {}).get("direct"):
            raise QMPError("aio=native was specified, but it requires cache.direct=on, "
                           "which was not specified.")
        self.direct = bool(opts.get("cache", {}).get("direct", False))
        self.dsync = ctx.graph.write_through
        self.fd = self._open_fd(self.read_only)
        try:
            st = os.fstat(self.fd)
            if stat.S_ISDIR(st.st_mode):
                raise QMPError(f"'{self.path}' is not a file")
            self._check_kind(st.st_mode)
            # Opened non-blocking so a FIFO cannot hang the daemon; files do not need it.
            os.set_blocking(self.fd, True)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            self.in_memory = not self.direct and filesystem_type(self.fd) in _MEMORY_FS
            self.size = self._query_size()
            locking = opts.get("locking", "auto")
            if locking != "off":
                self.locks = LockBytes(self.fd, self.path)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def _check_kind(self, mode: int) -> None:
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise QMPError(f"'file' driver requires '{self.path}' to be a regular file")

    def _access_flags(self, read_only: bool) -> int:
        flags = os.O_RDONLY if read_only else os.O_RDWR | (os.O_DSYNC if self.dsync else 0)
        return flags | (os.O_DIRECT if self.direct else 0)

    def _open_fd(self, read_only: bool) -> int:
        flags = os.O_CLOEXEC | os.O_NONBLOCK | self._access_flags(read_only)
        try:
            return os.open(os_path(self.path), flags)
        except IsADirectoryError:
            raise QMPError(f"'{self.path}' is not a file") from None
        except OSError as exc:
            auto_ro = self.options.get("auto-read-only", False)
            if (not read_only and auto_ro
                    and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM)):
                self.read_only = True
                return self._open_fd(True)
            raise _open_error(self.path, exc) from None

    def _query_size(self) -> int:
        """The size from ``lseek``; files that have none (``/proc`` files) cannot be opened."""
        try:
            return os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as exc:
            raise QMPError(f"Could not refresh total sector count: {exc.strerror}") from None

    async def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops its OFD locks
            self.fd = -1

    # ---- permissions --------------------------------------------------------

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        if self.locks is not None:
            self.locks.check(perm, shared)

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        if self.locks is not None and self.fd >= 0:
            self.locks.apply(perm, shared)

    # ---- data path ----------------------------------------------------------

    def length(self) -> int:
        # QEMU counts whole 512-byte sectors; the partial tail reads as zeroes.
        return -(-self.size // 512) * 512

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        _check_request(offset, length)
        if self.direct:
            return await DEVICE.run(self._direct_read, offset, length)
        if self.in_memory:
            return self._pread(offset, length)
        if self.nowait_read and length <= _INLINE_MAX:
            buf = bytearray(length)
            try:
                got = os.preadv(self.fd, [buf], offset, _NOWAIT)
            except BlockingIOError:
                got = 0
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                self.nowait_unsupported(read=True)
                got = 0
            if got == length:
                return buf
            rest = await DEVICE.run(self._pread, offset + got, length - got)
            buf[got:] = rest
            return buf
        return await DEVICE.run(self._pread, offset, length)

    def nowait_unsupported(self, read: bool) -> None:
        """The file system does not support ``RWF_NOWAIT`` this way: stop asking."""
        self.nowait_refused += 1
        if read:
            self.nowait_read = False
        else:
            self.nowait_write = False

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            # Short read at EOF of a file that shrank under us: the rest reads as zeroes.
            data += bytes(length - len(data))
        return data

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        _check_request(offset, len(data))
        if self.direct:
            await self._direct_write_serialised(offset, data)
        elif self.in_memory:
            self._pwrite(offset, data)
        elif self.nowait_write and len(data) <= _INLINE_MAX:
            try:
                done = os.pwritev(self.fd, [data], offset, _NOWAIT)
            except BlockingIOError:
                done = 0
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                self.nowait_unsupported(read=False)
                done = 0
            if done < len(data):
                await BUFFERED.run(self._pwrite, offset + done, memoryview(data)[done:])
        else:
            await BUFFERED.run(self._pwrite, offset, data)
        self._wrote(offset, len(data))
        if WriteFlags.FUA in flags:  # cheaper than ``&``, which builds a new flag value
            await self.flush()

    def _wrote(self, offset: int, length: int) -> None:
        """Account for data written at ``offset``: a later flush must sync it."""
        self.write_gen += 1
        if offset + length > self.size:
            self.size = offset + length

    async def claim(self, offset: int, length: int) -> Claim | None:
        if self.direct:  # O_DIRECT wants aligned buffers; keep those writes here
            return None
        _check_request(offset, length)

        async def commit() -> None:
            self._wrote(offset, length)

        return Claim(self, offset, length, commit)

    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        _pwrite_all(self.fd, data, offset)

    # O_DIRECT needs buffers, offsets and lengths aligned to the device's block.
    _ALIGN = 4096

    def _aligned_span(self, offset: int, length: int) -> tuple[int, int]:
        a = self._ALIGN
        start = offset - offset % a
        end = -(-(offset + length) // a) * a
        return start, end

    async def _direct_write_serialised(self, offset: int,
                                       data: bytes | bytearray | memoryview) -> None:
        """An O_DIRECT write, after any in-flight write it could undo or be undone by.

        An unaligned write rewrites the whole blocks around it from what it
        read before: a concurrent write into those blocks would be lost, so
        the two wait for each other (aligned writes touch only their own bytes
        and run side by side).
        """
        start, end = self._aligned_span(offset, len(data))
        rmw = start != offset or end != offset + len(data)
        while True:
            clash = next((done for s, e, other_rmw, done in self.direct_writes
                          if s < end and start < e and (rmw or other_rmw)), None)
            if clash is None:
                break
            await clash.wait()
        entry = (start, end, rmw, asyncio.Event())
        self.direct_writes.append(entry)

        def finished(_: asyncio.Future) -> None:
            self.direct_writes.remove(entry)
            entry[3].set()

        work = DEVICE.run(self._direct_write, offset, data)
        work.add_done_callback(finished)
        # Shielded: a cancelled request leaves its write running, and it stays
        # in the list until the worker is really done with it.
        await asyncio.shield(work)

    def _direct_read(self, offset: int, length: int) -> bytes:
        start, end = self._aligned_span(offset, length)
        with _scratch(end - start) as buf:
            got = os.preadv(self.fd, [buf], start)
            data = bytes(buf[offset - start:offset - start + length])
        if got < offset - start + length:
            data = data[:max(0, got - (offset - start))].ljust(length, b"\0")
        return data

    def _direct_write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        start, end = self._aligned_span(offset, len(data))
        with _scratch(end - start) as buf:
            if start != offset or end != offset + len(data):
                got = os.preadv(self.fd, [buf], start)
                if got < len(buf):  # past EOF: zeroes, not the last request's bytes
                    buf[got:] = bytes(len(buf) - got)
            buf[offset - start:offset - start + len(data)] = data
            _pwrite_all(self.fd, buf, start)

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        """Zero by punching a hole when unmapping is allowed, else by ZERO_RANGE."""
        end = offset + length
        if end > self.size:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.data_extent = (0, 0)
        self.write_gen += 1
        modes = []
        if flags & WriteFlags.MAY_UNMAP and self._discard_enabled():
            modes.append(_FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE)
        modes.append(_FALLOC_ZERO_RANGE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                break
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        else:
            await super().write_zeroes(offset, length, flags)
            return
        if flags & WriteFlags.FUA:
            await self.flush()

    def _discard_enabled(self) -> bool:
        return self.options.get("discard", "ignore") == "unmap"

    async def discard(self, offset: int, length: int) -> None:
        self.data_extent = (0, 0)
        self.write_gen += 1
        try:
            fallocate(self.fd, _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE, offset, length)
        except OSError as exc:
            self.discards_failed += 1
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return
        self.discards_ok += 1
        self.discard_bytes_ok += length

    async def flush(self) -> None:
        if self.options.get("cache", {}).get("no-flush"):
            return
        gen = self.write_gen
        if gen == self.flushed_gen:
            return
        self.debug_event("flush_to_disk")
        if self.in_memory:
            # Nothing to write back on a memory file system: the syscall is
            # cheaper than the hop to a worker thread.
            os.fdatasync(self.fd)
            return
        await DEVICE.run(os.fdatasync, self.fd)
        self.flushed_gen = max(self.flushed_gen, gen)

    async def block_status(self, offset: int, length: int) -> Extent:
        """Data or hole, from ``SEEK_DATA``/``SEEK_HOLE``.

        With ``O_DIRECT`` data that ends in a partial block at the end of the file
        goes on to the block's end, as in QEMU (whose requests are whole blocks then).
        """
        start, end = self.data_extent
        if start <= offset < end:
            if self.direct and end == self.size:
                end = self._aligned_span(offset, end - offset)[1]
            return Extent(min(length, end - offset), Status.DATA | Status.ALLOCATED, offset, self)
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to EOF
                return Extent(length, Status.ZERO | Status.ALLOCATED, offset, self)
            return Extent(length, Status.DATA | Status.ALLOCATED, offset, self)
        if data > offset:
            return Extent(min(length, data - offset), Status.ZERO | Status.ALLOCATED, offset, self)
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        self.data_extent = (offset, hole)
        if self.direct and hole == self.size:
            hole = self._aligned_span(offset, hole - offset)[1]
        return Extent(min(length, hole - offset), Status.DATA | Status.ALLOCATED, offset, self)

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        if self.is_block_device:
            if size > self.size:
                raise OSError(errno.EINVAL, "Cannot grow device files")
            return
        await asyncio.to_thread(_resize_file, self.fd, self.size, size, prealloc)
        self.size = size
        self.data_extent = (0, 0)
        self.write_gen += 1

    # ---- queries ------------------------------------------------------------

    def exact_filename(self) -> str | None:
        return self.path

    def driver_stats(self) -> dict[str, Any] | None:
        return {"driver": "file", "discard-nb-ok": self.discards_ok,
                "discard-nb-failed": self.discards_failed,
                "discard-bytes-ok": self.discard_bytes_ok}

    def allocated_file_size(self) -> int | None:
        return os.fstat(self.fd).st_blocks * 512

    def has_zero_init(self) -> bool:
        """A new regular file is a hole; a block device holds whatever it held."""
        return not self.is_block_device

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        for key in ("filename", "locking", "aio"):
            if options.get(key) != self.options.get(key) and key in options | self.options:
                if key not in options:
                    raise QMPError(f"Option '{key}' cannot be reset to its default value")
                raise QMPError(f"Cannot change the option '{key}'")
        if read_only == self.read_only:
            return None
        flags = os.O_CLOEXEC | self._access_flags(read_only)
        try:
            return os.open(os_path(self.path), flags)
        except OSError as exc:
            raise _open_error(self.path, exc) from None

    async def reopen_commit(self, state: Any, options: dict[str, Any], read_only: bool) -> None:
        if state is not None:
            old = self.fd
            self.fd = state
            if self.locks is not None:
                # The new descriptor holds no locks yet; closing the old one drops its own.
                self.locks.fd, self.locks.held = state, set()
                self.locks.apply(self.cumulative_perm, self.cumulative_shared)
            os.close(old)
        await super().reopen_commit(state, options, read_only)

    async def reopen_abort(self, state: Any) -> None:
        if state is not None:
            os.close(state)


def _resize_file(fd: int, old: int, new: int, prealloc: str) -> None:
    """Set the file size, preallocating the new tail as asked (QEMU's modes)."""
    if prealloc == "off" or new <= old:
        os.ftruncate(fd, new)
    elif prealloc == "falloc":
        os.posix_fallocate(fd, old, new - old)
    elif prealloc == "full":
        os.ftruncate(fd, new)
        chunk = bytes(1 << 20)
        pos = old
        while pos < new:
            n = min(len(chunk), new - pos)
            os.pwrite(fd, chunk[:n], pos)
            pos += n
        os.fsync(fd)
    else:
        raise QMPError(f"Unsupported preallocation mode '{prealloc}'")


async def create(graph: BlockGraph, options: dict[str, Any]) -> None:
    """``blockdev-create`` for ``file``: make (or empty) the file and size it."""
    path = options["filename"]
    size = options["size"]
    prealloc = options.get("preallocation", "off")
    if prealloc == "metadata":
        raise QMPError("Unsupported preallocation mode 'metadata'")
    try:
        fd = os.open(os_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise QMPError(f"Could not create '{path}': {exc.strerror}") from None
    try:
        locks = LockBytes(fd, path)
        # As QEMU: others may go on reading and writing, not resizing.
        shared = Perm.all() & ~Perm.RESIZE
        locks.check(Perm.WRITE | Perm.RESIZE, shared)
        locks.apply(Perm.WRITE | Perm.RESIZE, shared)
        try:
            await asyncio.to_thread(os.ftruncate, fd, 0)
            await asyncio.to_thread(_resize_file, fd, 0, size, prealloc)
        except OSError as exc:
            raise QMPError(f"Could not resize file: {exc.strerror}") from None
    finally:
        os.close(fd)


class HostDeviceNode(FileNode):
    """QEMU's ``host_device``: a character or block device, which is what QEMU opens
    a file name naming one with (``/dev/null`` as an empty backing file, say)."""

    driver = "host_device"

    def _check_kind(self, mode: int) -> None:
        if not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
            raise QMPError(f"'host_device' driver requires '{self.path}' to be either a "
                           "character or block device")
