"""``blockdev-reopen``: new options for several nodes as one transaction.

As QEMU's ``bdrv_reopen_multiple``: every listed node (and the inline
children that follow a read-only change) is checked and prepared, then
all commit, or all abort.  Besides driver options a reopen may point
``file`` or ``backing`` at another node (``backing: null`` drops it),
which is how a filter is put in or taken out without stopping an export.
The new links and the new read-only flags are checked together, as one
permission change, and a refusal puts the old options back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from blockd.block.graph import (BlockGraph, ChildLink, Move, check_common_options,
                                inherited_options)
from blockd.block.node import BlockNode, Perm
from blockd.errors import QMPError
from blockd.qjson import qdict_keys

#: The children a reopen may change; the others (``image``, ``data-file``) must stay.
_SWAPPABLE = ("backing", "file")
_FIXED = ("data-file", "image")
#: Options QEMU's reopen handles for every driver: they may change or be left out.
_COMMON = ("node-name", "driver", "discard", "cache.direct", "cache.no-flush", "read-only",
           "auto-read-only", "detect-zeroes", "force-share")


@dataclasses.dataclass
class _Entry:
    node: BlockNode
    options: dict[str, Any]
    read_only: bool
    #: role -> the new child (None: drop it), for the links this reopen changes.
    children: dict[str, BlockNode | None] = dataclasses.field(default_factory=dict)


async def reopen(graph: BlockGraph, entries: list[dict[str, Any]]) -> None:
    """Reopen several nodes atomically: all prepare, then all commit or all abort.

    Everything from the first flush to the last moved link happens in one
    drained section over the listed nodes and the children that come and go.
    """
    plan = _parse(graph, entries)
    _add_implicit_children(graph, plan)
    # Nodes going read-only must not have writers above them.
    for e in plan:
        if e.read_only and not e.node.read_only:
            _check_no_writers(e.node, plan)
    moves = _moves(plan)
    nodes = [e.node for e in plan] + [c for _, o, n in moves for c in (o, n) if c is not None]
    async with graph.drained(nodes):
        orphans = await _apply(graph, plan, moves)
    await graph.drop_orphans(orphans)


async def _apply(graph: BlockGraph, plan: list[_Entry], moves: list[Move]) -> list[BlockNode]:
    for e in plan:
        if e.read_only and not e.node.read_only:
            await e.node.flush()
    prepared: list[tuple[_Entry, Any]] = []
    try:
        for e in plan:
            prepared.append((e, await e.node.reopen_prepare(e.options, e.read_only)))
    except BaseException:
        for e, state in reversed(prepared):
            await e.node.reopen_abort(state)
        raise
    old = [(e.node, e.node.options, e.node.read_only) for e in plan]
    # Children commit first, so a parent becoming writable finds its storage writable.
    for e, state in sorted(prepared, key=lambda p: _height(p[0].node)):
        await e.node.reopen_commit(state, e.options, e.read_only)
    touched = [e.node for e in plan]
    going_read_only = [node for node, _, ro in old if node.read_only and not ro]
    try:
        orphans = graph.rewire(moves, refresh=touched, going_read_only=going_read_only)
    except QMPError:
        # Refused (a permission, an image lock): the old options come back.
        for node, options, ro in old:
            state = await node.reopen_prepare(options, ro)
            await node.reopen_commit(state, options, ro)
            graph.refresh(node)
        raise
    for e, _ in prepared:
        await e.node.reopen_commit_post()
    return orphans


def _parse(graph: BlockGraph, entries: list[dict[str, Any]]) -> list[_Entry]:
    plan: list[_Entry] = []
    listed: dict[str, _Entry] = {}
    for options in entries:
        name = options.get("node-name")
        if name is None:
            raise QMPError("node-name not specified")
        node = graph.nodes.get(name)
        if node is None:
            raise QMPError(f"Failed to find node with node-name='{name}'")
        read_only = bool(options.get("read-only", False))
        if name in listed:
            # QEMU's queue holds a node once: options listed again replace the earlier.
            listed[name].options, listed[name].read_only = options, read_only
            continue
        listed[name] = _Entry(node, options, read_only)
        plan.append(listed[name])
    i = 0
    while i < len(plan):  # grows as inline children join with their new options
        e = plan[i]
        i += 1
        if e.options["driver"] != e.node.driver:
            raise QMPError("Cannot change the option 'driver'")
        check_common_options(e.options)
        _parse_children(graph, e, plan)
    return plan


def _parse_children(graph: BlockGraph, e: _Entry, plan: list[_Entry]) -> None:
    """QEMU's order: a missing ``backing``, then ``backing``, then ``file``, then the rest.

    An inline child (options, not a name) reopens the child this node
    created inline with those options, as QEMU queues it; for any other
    child its keys are options that cannot change.
    """
    node, options = e.node, e.options
    _check_reset(e)
    if node.supports_backing and "backing" not in options and \
            (node.backing is not None or node.backing_filename()):
        raise QMPError(f"backing is missing for '{node.node_name}'")
    for role in _SWAPPABLE:
        if role not in options or isinstance(options[role], dict):
            continue  # an inline child is an option that cannot change, checked below
        ref = options[role]
        new = None if ref is None else graph.lookup_node(ref)
        if new is not None and _reaches(new, node, plan):
            raise QMPError(f"Making '{ref}' a {role} child of '{node.node_name}' "
                           "would create a cycle")
        link = node.children.get(role)
        old = link.child if link else None
        if old is new or (old is not None and graph.skip_implicit_filters(old) is new):
            continue
        if old is not None and old.node_name in graph.implicit_filters:
            raise QMPError(f"Cannot replace implicit {role} child of {node.node_name}")
        if role == "backing" and not node.supports_backing and not node.is_filter:
            raise QMPError(f"Driver '{node.driver}' of node '{node.node_name}' does not "
                           "support backing files")
        e.children[role] = new
    for role in (*_SWAPPABLE, *_FIXED):
        ref = options.get(role)
        if isinstance(ref, dict):
            _inline_child(graph, e, role, ref, plan)
        elif role in _FIXED and ref is not None:
            link = node.children.get(role)
            if link is not None and ref != link.child.node_name:
                raise QMPError(f"Cannot change the option '{role}'")
    _check_unchanged(e)


def _driver_options(e: _Entry, options: dict[str, Any]) -> dict[str, Any] | None:
    """The flattened options QEMU's generic rules cover for this node (None: the driver
    checks its own); children's options belong to the children."""
    mutable = e.node.reopen_mutable
    if mutable is None:
        return None
    roles = set(e.node.children) | set(_SWAPPABLE) | set(_FIXED)
    return {key: value for key, value in _flatten(options, "").items()
            if key.split(".")[0] not in roles and key not in _COMMON and key not in mutable}


def _check_reset(e: _Entry) -> None:
    """An option given at open may not be left out, as QEMU's bdrv_reset_options_allowed."""
    old = _driver_options(e, e.node.options)
    new = _flatten(e.options, "")
    for key in qdict_keys(old or {}):
        if key not in new:
            raise QMPError(f"Option '{key}' cannot be reset to its default value")


def _check_unchanged(e: _Entry) -> None:
    """Options the driver does not take on reopen must be the ones it has."""
    new = _driver_options(e, e.options)
    if new is None:
        return
    old = _flatten(e.node.options, "")
    for key in qdict_keys(_flatten(e.options, "")):
        if key in new and old.get(key) != new[key]:
            raise QMPError(f"Cannot change the option '{key}'")


def _inline_child(graph: BlockGraph, e: _Entry, role: str, ref: dict[str, Any],
                  plan: list[_Entry]) -> None:
    link = e.node.children.get(role)
    child = link.child if link else None
    if child is None or child.node_name not in graph.implicit:
        # QEMU flattens the options: the inline child's keys are options the
        # reopen cannot change, and the first in its QDict order is reported.
        raise QMPError(f"Cannot change the option '{qdict_keys(_flatten(ref, role))[0]}'")
    if ref.get("node-name", child.node_name) != child.node_name:
        raise QMPError("Cannot change the option 'node-name'")
    options = inherited_options(e.node, {**ref, "node-name": child.node_name}, role)
    # The child takes the parent's new read-only flag unless it sets its own.
    read_only = ref.get("read-only", True if role == "backing" else e.read_only)
    options["read-only"] = read_only
    plan.append(_Entry(child, options, read_only))


def _flatten(value: dict[str, Any] | list[Any], prefix: str) -> dict[str, Any]:
    """QEMU's flattened QDict keys: ``prefix.key``, list members by index."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    out: dict[str, Any] = {}
    for key, item in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, (dict, list)):
            out.update(_flatten(item, name))
        else:
            out[name] = item
    return out


def _reaches(top: BlockNode, node: BlockNode, plan: list[_Entry]) -> bool:
    """Whether ``node`` is ``top`` or below it: linking ``top`` under ``node`` would loop.

    The links entries parsed before this one already changed count, as QEMU
    changes them one entry after another.
    """
    changed = {id(e.node): e.children for e in plan if e.children}
    seen: set[int] = set()
    todo = [top]
    while todo:
        cur = todo.pop()
        if cur is node:
            return True
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        children: dict[str, BlockNode | None] = {
            role: link.child for role, link in cur.children.items()}
        children.update(changed.get(id(cur), {}))
        todo += [child for child in children.values() if child is not None]
    return False


def _moves(plan: list[_Entry]) -> list[Move]:
    moves: list[Move] = []
    for e in plan:
        for role, new in e.children.items():
            link = e.node.children.get(role)
            if link is None:
                assert new is not None
                moves.append((ChildLink(e.node, new, role), None, new))
            else:
                moves.append((link, link.child, new))
    return moves


def _height(node: BlockNode) -> int:
    """Longest path down to a leaf: storage sorts before the formats above it."""
    return 1 + max((_height(link.child) for link in node.children.values()), default=0)


def _add_implicit_children(graph: BlockGraph, plan: list[_Entry]) -> None:
    """Children a node created inline follow its read-only change, as in QEMU."""
    listed = {e.node.node_name for e in plan}
    i = 0
    while i < len(plan):  # grows as children join, so grandchildren follow too
        e = plan[i]
        i += 1
        for role, link in e.node.children.items():
            child = link.child
            if role in e.children:
                continue  # being replaced: the old child keeps its flag
            if child.node_name in graph.implicit and child.node_name not in listed \
                    and role != "backing" and child.read_only != e.read_only:
                plan.append(_Entry(child, {**child.options, "read-only": e.read_only},
                                   e.read_only))
                listed.add(child.node_name)


def _check_no_writers(node: BlockNode, plan: list[_Entry]) -> None:
    """Writers that stay on a node going read-only; those this reopen links to
    it anew are checked with the new links (``BlockGraph.rewire``)."""
    read_only_after = {e.node.node_name for e in plan if e.read_only}
    leaving = {id(e.node.children[role]) for e in plan for role in e.children
               if role in e.node.children}
    for link in node.parents:
        parent = link.parent
        if not link.perm & Perm.WRITE or id(link) in leaving:
            continue
        if isinstance(parent, BlockNode) and parent.node_name in read_only_after:
            continue
        # The topmost node QEMU names is the one whose users still write.
        raise QMPError(f"Read-only block node '{_top_writer_node(node, read_only_after)}' "
                       "cannot support read-write users")


def _top_writer_node(node: BlockNode, read_only_after: set[str]) -> str:
    for link in node.parents:
        parent = link.parent
        if isinstance(parent, BlockNode) and link.perm & Perm.WRITE and \
                parent.node_name in read_only_after:
            return _top_writer_node(parent, read_only_after)
    return node.node_name
