"""``query-qmp-schema``: QAPI introspection generated from ``schema/``.

Clients such as ``qmp-shell`` and management scripts discover commands
and argument types here.  The JSON Schema documents are translated to
QAPI's ``SchemaInfo`` shapes; type names are kept readable rather than
masked as QEMU does, which clients must accept anyway.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

from blockd.qmp.schema import load

_BUILTIN = {"string": "str", "integer": "int", "number": "number", "boolean": "bool",
            "null": "null", "object": "any"}


class _Builder:
    def __init__(self) -> None:
        self.schema = load()
        self.out: dict[str, dict[str, Any]] = {}

    def type_name(self, node: dict[str, Any], context: str) -> str:
        """Name of the type ``node`` denotes, registering it if needed."""
        if "$ref" in node:
            name = pathlib.PurePosixPath(node["$ref"]).stem
            if name not in self.out and name in self.schema.types:
                self.out[name] = {}  # placeholder against recursion
                self.out[name] = self.describe(name, self.schema.types[name])
            return name
        stype = node.get("type")
        if stype == "array":
            elem = self.type_name(node.get("items", {}), context + "-elem")
            name = f"[{elem}]"
            self.out.setdefault(name, {"name": name, "meta-type": "array", "element-type": elem})
            return name
        if "oneOf" in node or (stype == "object" and "properties" in node) or "enum" in node:
            self.out[context] = self.describe(context, node)
            return context
        if isinstance(stype, str):
            name = node.get("x-int", _BUILTIN.get(stype, "any"))
            self.out.setdefault(name, {"name": name, "meta-type": "builtin", "json-type": stype})
            return name
        self.out.setdefault("any", {"name": "any", "meta-type": "builtin", "json-type": "value"})
        return "any"

    def describe(self, name: str, node: dict[str, Any]) -> dict[str, Any]:
        if "enum" in node:
            return {"name": name, "meta-type": "enum", "values": list(node["enum"]),
                    "members": [{"name": v} for v in node["enum"]]}
        if "oneOf" in node:
            return {"name": name, "meta-type": "alternate",
                    "members": [{"type": self.type_name(b, f"{name}-{i}")}
                                for i, b in enumerate(node["oneOf"])]}
        required = set(node.get("required", ()))
        members = []
        for member, sub in node.get("properties", {}).items():
            entry: dict[str, Any] = {"name": member, "type": self.type_name(sub, f"{name}-{member}")}
            if member not in required:
                entry["default"] = None
            members.append(entry)
        info: dict[str, Any] = {"name": name, "meta-type": "object", "members": members}
        variants = []
        for clause in node.get("allOf", ()):
            cond = clause.get("if", {}).get("properties", {})
            if len(cond) == 1 and "then" in clause:
                tag, value = next(iter(cond.items()))
                info["tag"] = tag
                variants.append({"case": value.get("const"),
                                 "type": self.type_name(clause["then"], f"{name}-{value.get('const')}")})
        if variants:
            info["variants"] = variants
        return info


@functools.lru_cache(maxsize=1)
def schema_info() -> list[dict[str, Any]]:
    builder = _Builder()
    commands = []
    for cmd, doc in sorted(builder.schema.commands.items()):
        arg = builder.type_name(doc, f"q_obj_{cmd}-arg") if doc.get("properties") or doc.get("allOf") \
            else builder.type_name({"type": "object", "properties": {}}, "q_empty")
        ret = doc.get("x-returns")
        if ret in builder.schema.types:
            ret = builder.type_name({"$ref": f"{ret}.json"}, ret)
        elif ret:
            ret = builder.type_name({}, "any")
        entry: dict[str, Any] = {"name": cmd, "meta-type": "command", "arg-type": arg,
                                 "ret-type": ret or "q_empty"}
        if doc.get("x-allow-oob"):
            entry["allow-oob"] = True
        commands.append(entry)
    builder.out.setdefault("q_empty", {"name": "q_empty", "meta-type": "object", "members": []})
    return commands + [v for v in builder.out.values() if v]
