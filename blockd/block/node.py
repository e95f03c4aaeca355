"""The block node: what every driver implements and the graph links together.

A node is QEMU's ``BlockDriverState``: it has a name, a driver, options,
children (``file``, ``backing``, ``data-file``...) and parents (other
nodes, exports, jobs).  Drivers subclass :class:`BlockNode`, implement
:meth:`BlockNode.open` and override the async data-path methods.  Offsets and lengths are in bytes and
reach a driver through :class:`ChildLink`, the edge from its parent,
whose request path (:mod:`blockd.block.io`) checks, pads, counts and
records them once for every driver.  A driver sends requests to its own
children the same way: ``self.file_child.read(...)``, never straight to
the child node.

I/O failures are raised as :class:`OSError` carrying an ``errno`` so that
the NBD server and QMP can report them as QEMU does (``EIO``, ``ENOSPC``,
``EPERM``...).  Open and configuration failures are raised as
:class:`blockd.errors.QMPError` with QEMU's message text.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar

from blockd.block.io import MAX_LENGTH, BeforeWrite, Edge, Requests, WriteFlags
from blockd.block.stats import Stats
from blockd.errors import QMPError

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph, OpenContext
    from blockd.drivers.qcow2.check import CheckResult
    from blockd.drivers.qcow2.snapshot import Snapshot


class Perm(enum.IntFlag):
    """Permissions a parent takes on a child, as in QEMU's block layer.

    The lock bytes of the ``file`` driver are numbered by these bits, so
    the order matters for interoperability with QEMU processes.
    """

    CONSISTENT_READ = 0x1
    WRITE = 0x2
    WRITE_UNCHANGED = 0x4
    RESIZE = 0x8

    @classmethod
    def all(cls) -> "Perm":
        return cls(0xF)


PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}


def perm_names(perm: int) -> str:
    """Comma-separated permission names in bit order, as QEMU prints them."""
    return ", ".join(name for bit, name in PERM_NAMES.items() if perm & bit)


class Status:
    """Block status bits of a range, as ``BDRV_BLOCK_*``.

    Plain ints, not an ``IntFlag``: status is tested for every extent of
    every copy and NBD status reply, and each ``IntFlag`` operation is a
    Python-level call.
    """

    NONE = 0
    DATA = 0x1  # reads return data stored at this layer or below
    ZERO = 0x2  # reads return zeroes
    ALLOCATED = 0x4  # the content is decided at this layer (not backing)
    RECURSE = 0x8  # ask the child at the returned offset


@dataclasses.dataclass
class Extent:
    """Result of :meth:`BlockNode.block_status`: a run of equal status.

    ``offset`` is where the range lives in ``child`` when the driver knows
    (a protocol offset for qcow2 data clusters); ``None`` otherwise.
    """

    length: int
    status: int  # Status bits
    offset: int | None = None
    child: "BlockNode | None" = None


async def _nothing() -> None:
    return None


@dataclasses.dataclass(eq=False)
class Claim:
    """Room in a protocol node, set aside for a bulk copy to fill by itself.

    ``convert`` writes the data with plain ``pwrite`` calls from its writer
    helper, at ``host`` in ``file``; :meth:`commit` then makes those bytes
    the node's content at the claimed guest offset (a qcow2 node links the
    clusters into its L2 table), or :meth:`abort` gives the room back when
    the write failed.  ``length`` may be less than was asked for.
    """

    file: "BlockNode"
    host: int
    length: int
    commit: Callable[[], Awaitable[None]] = _nothing
    abort: Callable[[], Awaitable[None]] = _nothing


class ChildLink(Edge):
    """One edge of the graph: ``parent`` uses ``child`` in ``role``.

    ``perm`` is what the parent needs of the child, ``shared`` what it
    lets others do at the same time.  A parent may be a node, an export
    or a job; ``describe()`` gives the phrase QEMU uses in permission
    errors ("node 'fmt0'", "export 'exp0'"...).  The parent's requests
    to the child are the edge's methods (:class:`blockd.block.io.Edge`).
    """

    def __init__(self, parent: Any, child: "BlockNode", role: str,
                 perm: Perm = Perm(0), shared: Perm = Perm.all()) -> None:
        self.parent = parent
        self.child = child
        self.role = role
        self.external = not isinstance(parent, BlockNode)
        self.perm = perm
        self.shared = shared

    @property
    def perm(self) -> Perm:
        return self._perm

    @perm.setter
    def perm(self, perm: Perm) -> None:
        self._perm = perm
        # Plain bools for the request path, which tests them on every request.
        self.writable = Perm.WRITE in perm
        self.resizable = Perm.RESIZE in perm

    def __repr__(self) -> str:
        return f"<ChildLink {self.role!r} {self.parent!r} -> {self.child!r}>"


def check_length(size: int) -> None:
    """QEMU's bound on any truncate, checked before a driver allocates anything for it."""
    if size > MAX_LENGTH:
        raise QMPError(f"offset({size}) exceeds maximum({MAX_LENGTH})")


class BlockNode:
    """Base class of every driver's nodes.

    Subclasses set :attr:`driver`, implement :meth:`open` and the data
    path.  The graph owns naming, permissions and lifetime; drivers only
    ask it for children through the :class:`OpenContext`.
    """

    driver: ClassVar[str] = ""
    #: Requests must be aligned to this many bytes; the request path pads others
    #: by reading and rewriting the partial blocks (QEMU's ``request_alignment``).
    request_alignment: int = 1
    #: Format drivers interpret their ``file`` child; filters pass through.
    is_format: ClassVar[bool] = False
    is_filter: ClassVar[bool] = False
    #: The role of a filter's one child (blkdebug calls it ``image``).
    filtered_role: ClassVar[str] = "file"
    #: Roles whose child a reopen or a graph change may swap: the driver reaches
    #: them through :attr:`children` on every request, or follows
    #: :meth:`child_changed`.
    relinkable: ClassVar[tuple[str, ...]] = ()
    #: Driver options a reopen may change or leave out, for drivers whose reopen takes
    #: no options of its own (QEMU's generic rules apply: the others must be given
    #: again unchanged); None where the driver checks its options itself.
    reopen_mutable: ClassVar[tuple[str, ...] | None] = None
    #: Protocol drivers (file, null-co, blkdebug) are opened by their own name, not probed.
    is_protocol: ClassVar[bool] = False
    #: Formats that can have a backing file: a run they leave unallocated with no
    #: backing file reads as zeroes (QEMU's ``supports_backing``); elsewhere its
    #: content is unknown.
    supports_backing: ClassVar[bool] = False
    #: Whether the node takes only compressed whole-cluster writes (a streamOptimized
    #: vmdk), so a copy into it must compress, as qemu-img's does.
    needs_compressed_writes: bool = False
    #: Options that change what the node shows; any of them set means the
    #: node's name is a ``json:{...}`` description rather than a file name.
    strong_options: ClassVar[tuple[str, ...]] = ()
    #: ``block-set-write-threshold``'s state (blockd.block.write_threshold), once set.
    write_threshold: Any = None

    def __init__(self, node_name: str, options: dict[str, Any], read_only: bool) -> None:
        self.node_name = node_name
        self.options = options
        self.read_only = read_only
        self.children: dict[str, ChildLink] = {}
        self.parents: list[ChildLink] = []
        #: Perm/shared that parents of this node currently hold (cumulative).
        self.cumulative_perm = Perm(0)
        self.cumulative_shared = Perm.all()
        #: ``query-blockstats`` counters, kept by the backends that use the node.
        self.stats = Stats()
        #: Dirty bitmaps (blockd.block.dirty_bitmap.DirtyBitmap) by name, in creation order.
        self.bitmaps: dict[str, Any] = {}
        #: QEMU's ``auto_backing_file``: the name of the backing file the image itself
        #: leads to (the opened node's name when the image opened it), set by the graph
        #: at open.  None when opened only to be described, where QEMU pretends the
        #: backing file is the image's own.
        self.auto_backing_file: str | None = ""
        #: The node's state in the request path (in flight, drained, hooks...).
        self.requests = Requests()

    # ---- lifecycle -------------------------------------------------------

    async def open(self, ctx: "OpenContext") -> None:
        """Open the node from ``self.options`` (validated ``blockdev-add`` options).

        Children are opened and attached through ``ctx.open_child`` so the
        graph can check permissions before the driver reads anything.
        """
        raise NotImplementedError

    async def close(self) -> None:
        """Flush what is cached and release resources (children are closed by the graph)."""

    # ---- data path -------------------------------------------------------

    def length(self) -> int:
        """Current size in bytes."""
        raise NotImplementedError

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        raise OSError(95, "Operation not supported")

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: WriteFlags = WriteFlags.NONE) -> None:
        raise OSError(95, "Operation not supported")

    async def write_zeroes(self, offset: int, length: int,
                           flags: WriteFlags = WriteFlags.NONE) -> None:
        """Default: write a buffer of zeroes (drivers override to do better)."""
        if flags & WriteFlags.NO_FALLBACK:
            raise OSError(95, "Operation not supported")
        step = 1 << 20
        while length > 0:
            n = min(step, length)
            await self.write(offset, bytes(n), flags & WriteFlags.FUA)
            offset += n
            length -= n

    async def discard(self, offset: int, length: int) -> None:
        """Default: discard is advisory, so doing nothing is correct."""

    async def flush(self) -> None:
        for link in self.children.values():
            await link.flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        """Status of the run starting at ``offset`` (at most ``length`` bytes)."""
        return Extent(length, Status.DATA | Status.ALLOCATED)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """:meth:`block_status` of the whole range: consecutive extents covering it.

        A bulk copy asks for a chunk at a time; drivers that can walk their
        metadata faster than one call per run override this.
        """
        out = []
        end = offset + length
        while offset < end:
            ext = await self.block_status(offset, end - offset)
            out.append(ext)
            offset += ext.length
        return out

    async def claim(self, offset: int, length: int) -> Claim | None:
        """Set aside where ``[offset, offset + length)`` goes, for a bulk copy to write
        itself (see :class:`Claim`); ``None`` when the data must go through :meth:`write`.

        Only for a copy into a node nobody else uses meanwhile: until the
        claim is committed, reads still see the old content.
        """
        return None

    async def truncate(self, size: int, exact: bool = False,
                       prealloc: str = "off") -> None:
        raise OSError(95, "Operation not supported")

    async def padding_read_failed(self, offset: int, length: int,
                                  exc: OSError) -> bytes | bytearray | memoryview:
        """The bytes to keep around an unaligned write whose padding read failed.

        QEMU 7.2 goes on with the write regardless; nodes other than blkdebug,
        whose failures are injected, fail the write instead of guessing.
        """
        raise exc

    def add_before_write(self, hook: BeforeWrite) -> None:
        """Await ``hook(node, offset, length)`` before each write, write-zeroes and
        discard reaches this node's driver (QEMU's before-write notifiers)."""
        self.requests.before_write = [*self.requests.before_write, hook]

    def remove_before_write(self, hook: BeforeWrite) -> None:
        self.requests.before_write = [h for h in self.requests.before_write if h is not hook]

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record a guest write in every recording dirty bitmap of this node.

        A write past the end grew the node (a file under a format driver
        allocating): its bitmaps grow with it first, as QEMU's do.
        """
        end = offset + length
        for bitmap in self.bitmaps.values():
            if end > bitmap.size and self.length() > bitmap.size:
                bitmap.resize(self.length())
            bitmap.mark(offset, length)

    def debug_event(self, event: str) -> None:
        """A format driver reached a point named by a blkdebug event (``l2_update``...).

        Format drivers call this on their ``file`` child; only blkdebug
        reacts, so other drivers ignore it.
        """

    # ---- permissions -----------------------------------------------------

    def child_perm(self, role: str) -> tuple[Perm, Perm]:
        """Permissions this node needs on its child in ``role``.

        The defaults follow QEMU's: a filter passes its parents' needs
        through; a format node reads its storage consistently, writes it
        when the node is writable (metadata may change at any time), and
        lets nobody else write or resize it unless ``force-share`` is set.
        """
        perm, shared = self.cumulative_perm, self.cumulative_shared
        if self.is_filter:
            return perm, shared
        if role == "backing":
            # Backing files are only read; others may write them only if
            # our parents tolerate changing data.
            bshared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
            if shared & Perm.WRITE:
                bshared |= Perm.WRITE | Perm.RESIZE
            return perm & Perm.CONSISTENT_READ, bshared
        perm = Perm.CONSISTENT_READ
        if not self.read_only:
            perm |= Perm.WRITE | Perm.RESIZE
        if self.options.get("force-share"):
            return perm, Perm.all()
        return perm, shared & ~(Perm.WRITE | Perm.RESIZE)

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Called when the cumulative permissions change (the file driver locks)."""

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        """Raise QMPError if ``perm``/``shared`` cannot be taken (e.g. image locks)."""

    # ---- children at run time (x-blockdev-change) ---------------------------

    async def add_child(self, graph: "BlockGraph", child: "BlockNode") -> None:
        """Attach ``child`` as a new child (quorum adds a replica)."""
        raise QMPError(f"The node {self.node_name} does not support adding a child")

    async def del_child(self, graph: "BlockGraph", link: ChildLink) -> None:
        """Detach the child ``link`` leads to."""
        raise QMPError(f"The node {self.node_name} does not support removing a child")

    def child_changed(self, role: str) -> None:
        """The link in ``role`` now leads to another node (or none): drop any copy of the old."""

    # ---- reopen ----------------------------------------------------------

    async def reopen_prepare(self, options: dict[str, Any], read_only: bool) -> Any:
        """Check a reopen with new options; return state for commit.

        Raise QMPError if an option cannot change.  Nothing may change
        visibly until :meth:`reopen_commit`.
        """
        return None

    async def reopen_commit(self, state: Any, options: dict[str, Any], read_only: bool) -> None:
        self.options = options
        self.read_only = read_only

    async def reopen_abort(self, state: Any) -> None:
        """Undo what prepare did."""

    async def reopen_commit_post(self) -> None:
        """After a reopen took effect and the edges hold their new permissions (QEMU's
        ``bdrv_reopen_commit_post``): a node made writable may write its storage now."""

    # ---- queries ---------------------------------------------------------

    @property
    def file(self) -> "BlockNode | None":
        link = self.children.get("file")
        return link.child if link else None

    @property
    def file_node(self) -> "BlockNode":
        """The ``file`` child of a node whose open attached one (formats over storage)."""
        return self.children["file"].child

    @property
    def filtered(self) -> "BlockNode | None":
        """A filter's one child, which requests pass to (None for other nodes)."""
        link = self.children.get(self.filtered_role) if self.is_filter else None
        return link.child if link else None

    @property
    def backing(self) -> "BlockNode | None":
        link = self.children.get("backing")
        return link.child if link else None

    @property
    def file_child(self) -> ChildLink:
        """The edge to the ``file`` child, through which the driver sends it requests."""
        return self.children["file"]

    @property
    def backing_child(self) -> ChildLink | None:
        """The edge to the backing file, if any."""
        return self.children.get("backing")

    def filename(self) -> str:
        """The name QEMU shows as ``file``/``filename`` for this node.

        A plain file name when the node adds nothing to its storage's
        bytes; otherwise ``json:`` and the options that rebuild it.
        """
        exact = self.exact_filename()
        if exact is not None:
            return exact
        from blockd.qjson import encode

        return "json:" + encode(self.full_options())

    def backing_overridden(self) -> bool:
        """Whether the backing link is not the one the image names (set, changed or dropped
        by the user), which QEMU's names then spell out."""
        auto = self.auto_backing_file
        if auto is None or not self.supports_backing:
            return False
        backing = self.backing
        return auto != backing.filename() if backing is not None else auto != ""

    def exact_filename(self) -> str | None:
        """A file name that alone reopens this node, if there is one."""
        if any(key in self.options for key in self.strong_options) or self.backing_overridden():
            return None
        f = self.file
        return f.exact_filename() if f is not None else None

    def full_options(self) -> dict[str, Any]:
        """The driver, its strong options and its children's, as QEMU's json: names list them."""
        opts: dict[str, Any] = {"driver": self.driver}
        for key in self.strong_options:
            if key in self.options:
                opts[key] = self.options[key]
        overridden = self.backing_overridden()
        for role, link in self.children.items():
            if role == "backing" and not overridden:
                continue  # the image's own backing link: QEMU names it only if overridden
            opts[role] = link.child.full_options()
        if overridden and self.backing is None:
            opts["backing"] = None
        return opts

    def driver_stats(self) -> dict[str, Any] | None:
        """``BlockStatsSpecific`` for query-blockstats, for drivers that keep any."""
        return None

    def format_specific(self) -> dict[str, Any] | None:
        """``ImageInfoSpecific`` for ``query-named-block-nodes``, if any."""
        return None

    def cluster_size(self) -> int | None:
        # A filter answers QEMU's bdrv_get_info with its child's.
        below = self.filtered
        return below.cluster_size() if below is not None else None

    def has_info(self) -> bool:
        """Whether the driver reports image details (``dirty-flag`` appears then)."""
        return True

    def snapshots(self) -> list[dict[str, Any]]:
        """Internal snapshots (``SnapshotInfo`` list); only qcow2 has them."""
        return []

    def dirty_bitmaps_info(self) -> list[dict[str, Any]]:
        """``BlockDirtyInfo`` of the node's dirty bitmaps, newest first."""
        return [bitmap.info() for bitmap in self.bitmaps.values()]

    def check_bitmap_storable(self, name: str, granularity: int) -> None:
        """Raise unless a persistent bitmap can be stored in this node's image."""
        raise QMPError(f"Can't store persistent bitmaps to {self.node_name}: "
                       "Operation not supported")

    async def remove_stored_bitmap(self, name: str) -> None:
        """Drop a persistent bitmap from the image (formats that store them)."""

    def is_dirty(self) -> bool:
        below = self.filtered
        return below.is_dirty() if below is not None else False

    def ejected(self) -> bool:
        """The driver gave up on the node (qcow2 after a fatal corruption); queries fail."""
        return False

    def encrypted(self) -> bool:
        return False

    def has_zero_init(self) -> bool:
        """Whether a newly created node reads as zeroes wherever nothing was written
        (QEMU's ``has_zero_init``): ``convert`` then need not write zeroes.  False
        unless the driver knows better."""
        return False

    def allocated_file_size(self) -> int | None:
        """Bytes the storage really uses (``actual-size``)."""
        f = self.file
        return f.allocated_file_size() if f else None

    def backing_filename(self) -> str | None:
        return None

    def backing_format(self) -> str | None:
        return None

    # ---- optional capabilities --------------------------------------------
    # Drivers that have one override its method; the defaults refuse as QEMU
    # does for a driver without the callback.  Callers whose error text
    # depends on the caller ask :meth:`supports` first.

    def supports(self, capability: Callable[..., Any]) -> bool:
        """Whether the driver overrides ``capability`` (a :class:`BlockNode` method), as
        QEMU tests a driver's callback before calling it."""
        return getattr(type(self), capability.__name__) is not capability

    async def check(self, fix: int = 0,
                    sink: Callable[[str], None] | None = None) -> "CheckResult":
        """``qemu-img check``: count (and with ``fix``, repair) inconsistencies; ``sink``
        gets each message as it is found."""
        raise OSError(errno.ENOTSUP, "This image format does not support checks")

    async def amend(self, opts: dict[str, Any], secret: Any, force: bool = False) -> None:
        """Change encryption key slots (``x-blockdev-amend``, ``qemu-img amend``)."""
        raise QMPError("Driver does not support x-blockdev-amend")

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Record another backing file (``None`` for none) in the image's header; the data
        and the open backing link are untouched (``rebase``, ``change-backing-file``)."""
        raise OSError(errno.ENOTSUP, "Operation not supported")

    async def make_empty(self) -> None:
        """Drop every allocation so the backing file shows through (after a commit)."""
        raise OSError(errno.ENOTSUP, "Operation not supported")

    async def compress_cluster(self, data: bytes) -> bytes:
        """One cluster packed for :meth:`write_compressed` (may run many at once)."""
        raise OSError(errno.ENOTSUP, "Operation not supported")

    async def write_compressed(self, offset: int, data: bytes,
                               packed: bytes | None = None) -> None:
        """Store one whole cluster compressed (``convert -c``); ``packed`` is its
        :meth:`compress_cluster` result when the caller made it already."""
        raise OSError(errno.ENOTSUP, "Operation not supported")

    async def snapshot_create(self, name: str, stamp: tuple[int, int, int],
                              icount: int = -1) -> "Snapshot":
        """Take an internal snapshot; ``stamp`` is (date sec, date nsec, VM clock ns)."""
        raise OSError(errno.ENOTSUP, "Operation not supported")

    async def snapshot_delete(self, sn: "Snapshot") -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    async def snapshot_revert(self, sn: "Snapshot") -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    async def show_snapshot(self, sn: "Snapshot", own_size: bool) -> None:
        """Show a snapshot's content instead of the active image (read-only nodes)."""
        raise OSError(errno.ENOTSUP, "Operation not supported")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_name!r}>"
