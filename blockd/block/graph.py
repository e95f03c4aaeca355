"""The node graph: naming, opening, permissions and removal of block nodes.

This mirrors the parts of QEMU's block layer a QMP client can observe:
node-name rules, implicit ``#blockN`` names for inline children, the
permission system (a parent's needs against the sharing every other
parent allows) and the order of errors.  Permission changes are checked
for the whole affected subgraph before anything is applied, so a refused
``blockdev-add`` or export leaves every lock as it was.

The graph can also be rewired (QEMU's ``bdrv_replace_node``, filters put
in and taken out, a reopen's new ``file`` or ``backing``): every link that
moves is pointed at its new child first, the permissions of the whole
change are checked, and on any refusal every link goes back, so a
refused change leaves the graph and its locks untouched.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import re
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, overload

from blockd.block.node import MAX_LENGTH, BlockNode, ChildLink, Perm, perm_names
from blockd.errors import QMPError

_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")
#: QEMU keeps node names in a 32-byte buffer including the terminator.
_NODE_NAME_MAX = 31


class User:
    """A non-node parent of a node: an export, a job, the monitor's handle.

    ``desc`` is the phrase QEMU prints for it in permission errors;
    ``graph_type`` and ``graph_name`` are how ``x-debug-query-block-graph``
    shows it (exports' backends are anonymous in QEMU 7.2).
    """

    graph_type = "block-backend"
    graph_name = ""

    def __init__(self, desc: str) -> None:
        self.desc = desc

    def describe(self) -> str:
        return self.desc


def describe_parent(parent: Any) -> str:
    if isinstance(parent, BlockNode):
        return f"node '{parent.node_name}'"
    return parent.describe()


def inherited_options(parent: BlockNode, opts: dict[str, Any], role: str) -> dict[str, Any]:
    """Defaults an inline child takes from its parent, as QEMU's block layer gives them.

    Cache modes and read-only-ness flow down; lower layers get
    ``discard=unmap`` because the parent already decided whether a
    discard should reach them.  Backing files are opened read-only.
    """
    cache = parent.options.get("cache")
    if cache and opts.get("cache") != {}:  # an empty one is refused once the child opened
        opts["cache"] = {**cache, **opts.get("cache", {})}
    if role == "backing":
        opts.setdefault("read-only", True)
        opts.setdefault("auto-read-only", False)
    else:
        for key in ("read-only", "auto-read-only"):
            if key not in opts and key in parent.options:
                opts[key] = parent.options[key]
        if parent.read_only:
            opts.setdefault("read-only", True)
    opts.setdefault("discard", "unmap")
    return opts


def check_common_options(options: dict[str, Any]) -> None:
    """Cross-member rules of ``BlockdevOptions`` that a schema cannot state (add and reopen)."""
    if options.get("detect-zeroes") == "unmap" and options.get("discard", "ignore") != "unmap":
        raise QMPError("setting detect-zeroes to unmap is not allowed without setting "
                       "discard operation to unmap")
    if options.get("force-share") and not options.get("read-only", False):
        raise QMPError("force-share=on can only be used with read-only images")


#: One rewiring step: ``link`` leaves ``old`` (None: a new link) for ``new`` (None: dropped).
Move = tuple[ChildLink, "BlockNode | None", "BlockNode | None"]


def unsupported_option(node: BlockNode, key: str) -> str:
    """QEMU's words for an option the driver left unconsumed (protocols say "doesn't")."""
    if node.is_protocol:
        return f"Block protocol '{node.driver}' doesn't support the option '{key}'"
    return f"Block format '{node.driver}' does not support the option '{key}'"


class OpenContext:
    """What a driver may use while its node is opening."""

    def __init__(self, graph: "BlockGraph", node: BlockNode) -> None:
        self.graph = graph
        self.node = node
        #: Children this open created inline; closed again if the open fails.
        self.created: list[BlockNode] = []

    @overload
    async def open_child(self, ref: str | dict[str, Any] | None, role: str) -> BlockNode: ...

    @overload
    async def open_child(self, ref: str | dict[str, Any] | None, role: str,
                         *, required: bool) -> BlockNode | None: ...

    async def open_child(self, ref: str | dict[str, Any] | None, role: str,
                         *, required: bool = True) -> BlockNode | None:
        """Resolve a ``BlockdevRef`` (node name or inline options) and attach it.

        Inline children inherit ``read-only`` (and ``auto-read-only``)
        from the parent unless they set it, as in QEMU.
        """
        if ref is None:
            if required:
                raise QMPError(f"A block device must be specified for \"{role}\"")
            return None
        if role != "file":
            # QEMU names a node after opening its ``file`` child and before any other.
            self.graph.place(self.node.node_name)
        if isinstance(ref, str):
            child = self.graph.lookup(ref)
        else:
            opts = inherited_options(self.node, dict(ref), role)
            child = await self.graph.open_node(opts, implicit=True)
            self.created.append(child)
        try:
            self.graph.attach(self.node, child, role)
        except QMPError:
            if child in self.created:
                self.created.remove(child)
                await self.graph.delete_node(child)
            raise
        return child

    def secret(self, secret_id: str) -> bytes:
        """Bytes of a ``secret`` object (raises QEMU's error if absent)."""
        return self.graph.secrets(secret_id)


class BlockGraph:
    """All nodes of the daemon, in creation order."""

    def __init__(self, secrets: Callable[[str], bytes] | None = None) -> None:
        self.nodes: dict[str, BlockNode] = {}
        #: Each node's position in QEMU's list of nodes (see :meth:`place`).
        self._places: dict[str, int] = {}
        self._next_place = itertools.count()
        #: Nodes created inline by another node's open (not owned by the monitor).
        self.implicit: set[str] = set()
        #: Filters put in without a name (a job's): QEMU's ``implicit`` nodes, which
        #: a reopen looks through and may not replace.
        self.implicit_filters: set[str] = set()
        self._counter = 0
        self._secrets = secrets
        #: Nodes are opened only to be described (``qemu-img info``): encrypted
        #: images may then open without their key, and their data is not read.
        self.no_io = False
        #: Writes must be durable when they complete (qemu-img's ``writethrough`` and
        #: ``directsync`` cache modes): protocol files open for writing with ``O_DSYNC``.
        self.write_through = False
        #: Where drivers send QMP events (``BLOCK_IMAGE_CORRUPTED``); set by the daemon.
        self.emit: Callable[[str, dict[str, Any]], None] | None = None

    # ---- lookup -------------------------------------------------------------

    def secrets(self, secret_id: str) -> bytes:
        if self._secrets is None:
            raise QMPError(f"No secret with id '{secret_id}'")
        return self._secrets(secret_id)

    def lookup(self, name: str) -> BlockNode:
        """Find a node as ``blockdev-add`` children references do."""
        node = self.nodes.get(name)
        if node is None:
            raise QMPError(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    def lookup_node(self, node_name: str) -> BlockNode:
        """Find a node for commands that accept only node names (exports, reopen)."""
        node = self.nodes.get(node_name)
        if node is None:
            raise QMPError(f"Cannot find device='' nor node-name='{node_name}'")
        return node

    def dirty_bitmap(self, node_name: str, name: str) -> tuple[BlockNode, Any]:
        """A bitmap named by node and name, with the texts of QEMU's bitmap lookup."""
        node = self.nodes.get(node_name)
        if node is None:
            raise QMPError(f"Node '{node_name}' not found")
        bitmap = node.bitmaps.get(name)
        if bitmap is None:
            raise QMPError(f"Dirty bitmap '{name}' not found")
        return node, bitmap

    def find(self, node_name: str) -> BlockNode:
        """Find a node as commands taking ``node-name`` do."""
        node = self.nodes.get(node_name)
        if node is None:
            raise QMPError(f"Cannot find node {node_name}") from None
        return node

    def __iter__(self) -> Iterator[BlockNode]:
        """Nodes in the order QEMU lists them (``query-named-block-nodes`` reverses it)."""
        return iter(sorted(self.nodes.values(), key=lambda n: self._places[n.node_name]))

    def place(self, name: str) -> None:
        """Give the node ``name`` its place in the node list, if it has none yet.

        QEMU names a node, which puts it at the end of its list, after the
        node's ``file`` child opened and before its other children do.
        """
        self._places.setdefault(name, next(self._next_place))

    # ---- names --------------------------------------------------------------

    def check_new_name(self, name: str) -> None:
        if not _NODE_NAME.match(name):
            raise QMPError(f"Invalid node-name: '{name}'")
        if name in self.nodes:
            raise QMPError(f"Duplicate nodes with node-name='{name}'")
        if len(name) > _NODE_NAME_MAX:
            raise QMPError("Node name too long")

    def _implicit_name(self) -> str:
        """QEMU's generated names: a counter and two random digits, so clients can't guess them."""
        name = f"#block{self._counter}{random.randrange(99):02d}"
        self._counter += 1
        return name

    # ---- open and close -----------------------------------------------------

    async def open_node(self, options: dict[str, Any], *, implicit: bool = False) -> BlockNode:
        """Open a node (and inline children) from validated options."""
        from blockd.drivers import driver_class

        name = options.get("node-name")
        if name is None:
            if not implicit:
                raise QMPError("'node-name' must be specified for the root node")
            name = self._implicit_name()
        else:
            self.check_new_name(name)
        if "driver" not in options:  # QMP's schema requires it; option strings may not give it
            raise QMPError("Must specify either driver or file")
        cls = driver_class(options["driver"])
        read_only = bool(options.get("read-only", False))
        node = cls(name, options, read_only)
        ctx = OpenContext(self, node)
        try:
            await node.open(ctx)
            if node.length() > MAX_LENGTH:  # QEMU refuses what its block layer cannot address
                await node.close()
                raise QMPError("Could not refresh total sector count: File too large")
        except BaseException:
            self._places.pop(name, None)
            await self._detach_all(node, ctx.created)
            raise
        if options.get("cache") == {}:
            # An empty object is an option no driver consumes: QEMU refuses it once the
            # node (children included) opened.
            await node.close()
            self._places.pop(name, None)
            await self._detach_all(node, ctx.created)
            raise QMPError(unsupported_option(node, "cache"))
        self.place(name)
        self.nodes[name] = node
        node.auto_backing_file = self._auto_backing_file(node, options)
        if implicit or options.get("node-name") is None:
            self.implicit.add(name)
        for child in ctx.created:
            self.implicit.add(child.node_name)
        return node

    def _auto_backing_file(self, node: BlockNode, options: dict[str, Any]) -> str | None:
        """What the image itself names as backing file: the node it opened from its
        header, or the header's name when the user chose the backing link."""
        if self.no_io:
            return None
        if "backing" not in options and node.backing is not None:
            return node.backing.filename()
        return node.backing_filename() or ""

    async def _detach_all(self, node: BlockNode, created: list[BlockNode]) -> None:
        for link in list(node.children.values()):
            self.detach(link)
        for child in created:
            await self.delete_node(child)

    async def delete_node(self, node: BlockNode) -> None:
        """Close ``node``, detach it, and delete the inline children it owned."""
        try:
            await node.close()
        finally:
            self.nodes.pop(node.node_name, None)
            self._places.pop(node.node_name, None)
            self.implicit.discard(node.node_name)
            self.implicit_filters.discard(node.node_name)
            for link in list(node.children.values()):
                await self.unref_child(link)

    async def unref_child(self, link: ChildLink) -> None:
        """Remove the edge ``link``; a child the parent's open created goes with it
        when nothing else uses it."""
        child = link.child
        self.detach(link)
        if child.node_name in self.implicit and not child.parents:
            await self.delete_node(child)

    async def blockdev_del(self, node_name: str) -> None:
        node = self.nodes.get(node_name)
        if node is None:
            raise QMPError(f"Failed to find node with node-name='{node_name}'")
        if any(not isinstance(link.parent, BlockNode) for link in node.parents):
            raise QMPError(f"Node {node_name} is in use")
        overlays = [link.parent for link in node.parents if link.role == "backing"]
        if overlays:
            # QEMU blocks a backing node's deletion; the newest overlay's blocker speaks.
            raise QMPError(f"Node '{node_name}' is busy: node is used as backing hd of "
                           f"'{overlays[-1].node_name}'")
        if node.parents:
            raise QMPError(f"Block device {node_name} is in use")
        if node_name in self.implicit:
            raise QMPError(f"Node {node_name} is not owned by the monitor")
        await self.delete_node(node)

    async def close_all(self) -> None:
        """Close every node, parents before children (used on quit)."""
        for node in reversed(list(self.nodes.values())):
            if node.node_name in self.nodes and not node.parents:
                await self.delete_node(node)
        for node in reversed(list(self.nodes.values())):
            await self.delete_node(node)

    # ---- rewiring -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def drained(self, nodes: Iterable[BlockNode]) -> AsyncIterator[None]:
        """Quiesce ``nodes`` while links around them change.

        DRAIN HOOK: the one place the request path (``blockd/block/io.py``)
        plugs in, to hold new requests on these nodes and wait for those in
        flight before the graph changes, and release them afterwards.  Until
        it does, requests are not counted, so there is nothing to wait for.
        """
        yield

    async def replace_node(self, old: BlockNode, new: BlockNode) -> None:
        """Move every parent of ``old`` (nodes, exports, backends, jobs) onto ``new``.

        Links ``new`` itself reaches are left alone, as QEMU leaves them, so
        a node can take the place of its own child (a filter put on top).
        All permissions are checked before anything moves; a refusal
        changes nothing.
        """
        below = self._reachable_links(new)
        moves: list[Move] = [(link, old, new) for link in old.parents if id(link) not in below]
        async with self.drained([old, new]):
            orphans = self.rewire(moves)
        await self.drop_orphans(orphans)

    async def insert_filter(self, filter_options: dict[str, Any], below: BlockNode) -> BlockNode:
        """Open a filter over ``below`` and put it in ``below``'s place for all its parents.

        ``filter_options`` are ``blockdev-add`` options without the filtered
        child, which is ``below``.  Without a node-name the filter is
        implicit, as a job's filters are.  If the parents cannot move, the
        filter is closed again and nothing changed.
        """
        from blockd.drivers import driver_class

        options = dict(filter_options)
        cls = driver_class(options["driver"])
        if not cls.is_filter:
            raise QMPError(f"'{options['driver']}' is not a filter driver")
        options[cls.filtered_role] = below.node_name
        node = await self.open_node(options, implicit="node-name" not in options)
        try:
            await self.replace_node(below, node)
        except BaseException:
            await self.delete_node(node)
            raise
        if "node-name" not in options:
            self.implicit_filters.add(node.node_name)
        return node

    def skip_implicit_filters(self, node: BlockNode) -> BlockNode:
        """The first node below ``node`` that is not an unnamed filter."""
        while node.node_name in self.implicit_filters and node.filtered is not None:
            node = node.filtered
        return node

    async def remove_filter(self, node: BlockNode) -> BlockNode:
        """Give a filter's parents its child back, then delete the filter; returns the child."""
        child = node.filtered
        if child is None:
            raise QMPError(f"Node '{node.node_name}' is not a filter")
        await self.replace_node(node, child)
        if self.nodes.get(node.node_name) is node:  # an unnamed one went with its last parent
            await self.delete_node(node)
        return child

    def rewire(self, moves: list[Move], refresh: Iterable[BlockNode] = (),
               going_read_only: Iterable[BlockNode] = ()) -> list[BlockNode]:
        """Point links at new children, all or nothing; returns the old children left orphaned.

        ``refresh`` are nodes whose own needs changed meanwhile (a reopen's
        new read-only flag): their children's permissions are planned too;
        ``going_read_only`` those of them this change made read-only.
        Users (exports, jobs) keep what they hold; node parents ask
        ``child_perm`` again.  Links are moved first so the plan sees the
        graph as it will be; on any refusal they are put back in reverse.
        """
        saved = {id(link.parent): (link.parent, dict(link.parent.children)) for link, _, _ in moves
                 if isinstance(link.parent, BlockNode)}
        done: list[Move] = []
        try:
            for move in moves:
                self._point(*move)
                done.append(move)
            plan: dict[int, tuple[ChildLink, Perm, Perm]] = {}
            for node in refresh:
                self._plan_children(node, plan)
            for link, _, new in moves:
                if new is None:
                    continue
                if isinstance(link.parent, BlockNode):
                    p, s = link.parent.child_perm(link.role)
                else:
                    p, s = link.perm, link.shared
                plan[id(link)] = (link, p, s)
                self._plan_node(new, plan)
            olds = [prev for _, prev, _ in moves if prev is not None]
            for prev in olds:
                self._plan_node(prev, plan)
            self._check(plan)
            newly = {id(n) for n in going_read_only}
            for link, _, new in moves:
                if new is not None:
                    self._check_writable(new, plan, id(new) in newly)
            for link, _, _ in moves:
                parent = link.parent
                if isinstance(parent, BlockNode) and link.role not in parent.relinkable:
                    # The driver holds this child itself: moving the link would leave it
                    # on the old one.  QEMU's drivers do not; where QEMU would accept
                    # the change, blockd says it cannot.
                    raise QMPError(f"blockd cannot change the '{link.role}' child of "
                                   f"'{parent.driver}' node '{parent.node_name}'")
        except BaseException:
            for link, old, new in reversed(done):
                self._point(link, new, old)
            for parent, children in saved.values():
                parent.children = children
            raise
        self._commit(plan, olds)
        for link, _, _ in moves:
            if isinstance(link.parent, BlockNode):
                link.parent.child_changed(link.role)
        return [prev for prev in olds if not prev.parents and prev.node_name in self.implicit]

    async def drop_orphans(self, nodes: list[BlockNode]) -> None:
        """Delete implicit nodes a rewiring left without parents, as QEMU's last unref does."""
        for node in nodes:
            if node.node_name in self.nodes and not node.parents:
                await self.delete_node(node)

    @staticmethod
    def _point(link: ChildLink, old: BlockNode | None, new: BlockNode | None) -> None:
        if old is not None:
            old.parents.remove(link)
        parent = link.parent
        if new is None:
            if isinstance(parent, BlockNode) and parent.children.get(link.role) is link:
                del parent.children[link.role]
            return
        link.child = new
        new.parents.append(link)
        if isinstance(parent, BlockNode):
            parent.children[link.role] = link

    @staticmethod
    def _reachable_links(node: BlockNode) -> set[int]:
        """Ids of every link below ``node`` (QEMU's should_update_child walk)."""
        seen: set[int] = set()
        found: set[int] = set()
        todo = [node]
        while todo:
            cur = todo.pop()
            for link in cur.children.values():
                found.add(id(link))
                if id(link.child) not in seen:
                    seen.add(id(link.child))
                    todo.append(link.child)
        return found

    def _check_writable(self, node: BlockNode, plan: dict[int, tuple[ChildLink, Perm, Perm]],
                        newly: bool) -> None:
        """A writer on a read-only node: QEMU names the node when the same change made
        it read-only."""
        perm = Perm(0)
        for link in node.parents:
            perm |= self._effective(link, plan)[0]
        if node.read_only and perm & (Perm.WRITE | Perm.WRITE_UNCHANGED):
            if newly:
                raise QMPError(f"Read-only block node '{node.node_name}' cannot support "
                               "read-write users")
            raise QMPError("Block node is read-only")

    # ---- permissions --------------------------------------------------------

    def attach(self, parent: Any, child: BlockNode, role: str,
               perm: Perm | None = None, shared: Perm | None = None) -> ChildLink:
        """Add an edge and take its permissions, or raise without changing anything.

        Node parents compute their needs with ``child_perm``; other users
        pass ``perm``/``shared`` explicitly.
        """
        link = ChildLink(parent, child, role)
        if isinstance(parent, BlockNode):
            parent.children[role] = link
        child.parents.append(link)
        try:
            self._apply(link, perm, shared)
        except QMPError:
            child.parents.remove(link)
            if isinstance(parent, BlockNode) and parent.children.get(role) is link:
                del parent.children[role]
            raise
        return link

    def detach(self, link: ChildLink) -> None:
        """Remove an edge and relax the child's permissions."""
        if link in link.child.parents:
            link.child.parents.remove(link)
        if isinstance(link.parent, BlockNode) and link.parent.children.get(link.role) is link:
            del link.parent.children[link.role]
        plan: dict[int, tuple[ChildLink, Perm, Perm]] = {}
        self._plan_node(link.child, plan)
        self._commit(plan, [link.child])

    def update_user(self, link: ChildLink, perm: Perm, shared: Perm) -> None:
        """Change what a user (export, job) holds, checking as attach does."""
        self._apply(link, perm, shared)

    def refresh(self, node: BlockNode) -> None:
        """Recompute what ``node`` takes on its children (after a reopen)."""
        plan: dict[int, tuple[ChildLink, Perm, Perm]] = {}
        self._plan_children(node, plan)
        self._check(plan)
        self._commit(plan)

    def _plan_children(self, node: BlockNode, plan: dict[int, tuple[ChildLink, Perm, Perm]]) -> None:
        for link in node.children.values():
            p, s = node.child_perm(link.role)
            plan[id(link)] = (link, p, s)
            self._plan_node(link.child, plan)

    def _apply(self, link: ChildLink, perm: Perm | None, shared: Perm | None) -> None:
        if perm is None or shared is None:
            perm, shared = link.parent.child_perm(link.role)
        plan = {id(link): (link, perm, shared)}
        self._plan_node(link.child, plan)
        self._check(plan)
        self._commit(plan)

    @staticmethod
    def _effective(link: ChildLink, plan: dict[int, tuple[ChildLink, Perm, Perm]]) -> tuple[Perm, Perm]:
        entry = plan.get(id(link))
        return (entry[1], entry[2]) if entry else (link.perm, link.shared)

    def _plan_node(self, node: BlockNode, plan: dict[int, tuple[ChildLink, Perm, Perm]]) -> None:
        """Plan the perms ``node`` takes on its children given its parents' planned perms."""
        perm, shared = Perm(0), Perm.all()
        for link in node.parents:
            p, s = self._effective(link, plan)
            perm |= p
            shared &= s
        saved = node.cumulative_perm, node.cumulative_shared
        node.cumulative_perm, node.cumulative_shared = perm, shared
        try:
            for link in node.children.values():
                p, s = node.child_perm(link.role)
                if (p, s) != self._effective(link, plan):
                    plan[id(link)] = (link, p, s)
                    self._plan_node(link.child, plan)
        finally:
            node.cumulative_perm, node.cumulative_shared = saved

    def _check(self, plan: dict[int, tuple[ChildLink, Perm, Perm]]) -> None:
        children: dict[int, BlockNode] = {}
        for link, _, _ in plan.values():
            children[id(link.child)] = link.child
        for child in children.values():
            links = child.parents
            for i, a in enumerate(links):
                ap, ash = self._effective(a, plan)
                for b in links[i + 1:]:
                    bp, bsh = self._effective(b, plan)
                    if id(a) not in plan and id(b) not in plan:
                        continue
                    # Report from the side of the later edge, as QEMU does.
                    if ap & ~bsh:
                        self._conflict(child, a, b, ap & ~bsh)
                    if bp & ~ash:
                        self._conflict(child, b, a, bp & ~ash)
            perm, shared = Perm(0), Perm.all()
            for link in links:
                p, s = self._effective(link, plan)
                perm |= p
                shared &= s
            child.check_perm(perm, shared)

    @staticmethod
    def _conflict(child: BlockNode, needs: ChildLink, denies: ChildLink, perms: Perm) -> None:
        def user(link: ChildLink) -> str:
            return (f"{describe_parent(link.parent)} (uses node '{child.node_name}' "
                    f"as '{link.role}' child)")
        raise QMPError(
            f"Permission conflict on node '{child.node_name}': permissions "
            f"'{perm_names(perms)}' are both required by {user(needs)} and "
            f"unshared by {user(denies)}.")

    def _commit(self, plan: dict[int, tuple[ChildLink, Perm, Perm]],
                extra: Iterable[BlockNode] = ()) -> None:
        touched: dict[int, BlockNode] = {id(n): n for n in extra}
        for link, p, s in plan.values():
            link.perm, link.shared = p, s
            touched[id(link.child)] = link.child
        for node in touched.values():
            perm, shared = Perm(0), Perm.all()
            for link in node.parents:
                perm |= link.perm
                shared &= link.shared
            node.cumulative_perm, node.cumulative_shared = perm, shared
            node.set_perm(perm, shared)
