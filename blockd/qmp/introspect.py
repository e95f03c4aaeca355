"""``query-qmp-schema``: QAPI introspection generated from ``schema/``.

Management software (libvirt above all) decides what it may send by
walking this answer, so it is built from the same documents that validate
arguments and cannot drift from them.  The JSON Schema documents become
QAPI's ``SchemaInfo`` entities the way QEMU's generator builds them from
its own schema: every integer type is the builtin ``int``, a flat union
lists a variant for every value of its tag (those without members get the
empty object), boxed commands name their argument type, and ``x-features``
become ``features``.  Type names stay readable instead of masked as QEMU
does; clients must not rely on names either way.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

from blockd.qmp.schema import Schema, load

EMPTY = "q_empty"

#: JSON Schema type -> (QAPI builtin, its introspection json-type).
_BUILTIN = {"string": ("str", "string"), "integer": ("int", "int"), "number": ("number", "number"),
            "boolean": ("bool", "boolean"), "null": ("null", "null")}
_ANY = ("any", "value")


def _features(node: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    if node.get("x-features"):
        entry["features"] = list(node["x-features"])
    return entry


def _arguments(doc: dict[str, Any]) -> dict[str, Any]:
    """A command's or event's document as its argument type: its features are its own."""
    return {k: v for k, v in doc.items() if k != "x-features"}


class _Builder:
    """Collects the entities one document reaches, each once, keyed by name."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.types: dict[str, dict[str, Any]] = {}

    def builtin(self, name: str, json_type: str) -> str:
        self.types.setdefault(name, {"name": name, "meta-type": "builtin", "json-type": json_type})
        return name

    def empty(self) -> str:
        self.types.setdefault(EMPTY, {"name": EMPTY, "meta-type": "object", "members": []})
        return EMPTY

    def type_name(self, node: dict[str, Any], context: str) -> str:
        """Name of the type ``node`` denotes, describing it on first use.

        Inline structs, enums and alternates are named after ``context``
        (QEMU's ``q_obj_<command>-arg`` for command arguments).
        """
        if "$ref" in node:
            name = pathlib.PurePosixPath(node["$ref"]).stem
            if name not in self.types:
                self.types[name] = {}  # placeholder: types may refer to themselves
                self.types[name] = self.describe(name, self.schema.types[name])
            return name
        stype = node.get("type")
        if stype == "array":
            elem = self.type_name(node.get("items", {}), f"{context}-elem")
            name = f"[{elem}]"
            self.types.setdefault(name, {"name": name, "meta-type": "array", "element-type": elem})
            return name
        if stype == "object" and "properties" in node and not node["properties"] \
                and "allOf" not in node:
            return self.empty()
        if "oneOf" in node or "enum" in node or (
                stype == "object" and ("properties" in node or "allOf" in node)):
            self.types[context] = self.describe(context, node)
            return context
        if isinstance(stype, str) and stype in _BUILTIN:
            return self.builtin(*_BUILTIN[stype])
        return self.builtin(*_ANY)

    def describe(self, name: str, node: dict[str, Any]) -> dict[str, Any]:
        """The ``SchemaInfo`` of a named enum, alternate, struct or flat union."""
        if "enum" in node:
            return _features(node, {"name": name, "meta-type": "enum", "values": list(node["enum"]),
                                    "members": [{"name": v} for v in node["enum"]]})
        if "oneOf" in node:
            return _features(node, {
                "name": name, "meta-type": "alternate",
                "members": [{"type": self.type_name(b, f"{name}-{i}")}
                            for i, b in enumerate(node["oneOf"])]})
        required = set(node.get("required", ()))
        members = []
        for member, sub in node.get("properties", {}).items():
            entry: dict[str, Any] = {"name": member, "type": self.type_name(sub, f"{name}-{member}")}
            if member not in required:
                entry["default"] = None
            members.append(_features(sub, entry))
        info: dict[str, Any] = {"name": name, "meta-type": "object", "members": members}
        variants = []
        for clause in node.get("allOf", ()):
            cond = clause.get("if", {}).get("properties", {})
            if len(cond) != 1 or "then" not in clause:
                raise ValueError(f"{name}: allOf holds only one-member if/then union branches")
            tag, value = next(iter(cond.items()))
            info["tag"] = tag
            case = value["const"]
            variants.append({"case": case, "type": self.type_name(clause["then"], f"{name}-{case}")})
        if variants:
            # As in QAPI, tag values without a branch of their own have no members.
            tag_type = self.schema.types[pathlib.PurePosixPath(
                node["properties"][info["tag"]]["$ref"]).stem]
            cases = {v["case"] for v in variants}
            variants += [{"case": v, "type": self.empty()} for v in tag_type["enum"] if v not in cases]
            info["variants"] = variants
        return _features(node, info)


@functools.lru_cache(maxsize=1)
def schema_info() -> list[dict[str, Any]]:
    """Every command and event of ``schema/``, then every type they reach."""
    schema = load()
    builder = _Builder(schema)
    entities = []
    for cmd, doc in sorted(schema.commands.items()):
        entry: dict[str, Any] = {"name": cmd, "meta-type": "command",
                                 "arg-type": builder.type_name(_arguments(doc), f"q_obj_{cmd}-arg")}
        returns = doc.get("x-returns")
        entry["ret-type"] = builder.type_name(returns, f"q_obj_{cmd}-ret") if returns \
            else builder.empty()
        if doc.get("x-allow-oob"):
            entry["allow-oob"] = True
        entities.append(_features(doc, entry))
    for event, doc in sorted(schema.events.items()):
        entities.append(_features(doc, {"name": event, "meta-type": "event",
                                        "arg-type": builder.type_name(_arguments(doc),
                                                                      f"q_obj_{event}-arg")}))
    return entities + list(builder.types.values())
