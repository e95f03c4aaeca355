"""QEMU's ``key=value,...`` option syntax and its typing through the schema.

Command line options such as ``--blockdev driver=file,filename=x`` use
dotted keys for nesting (``cache.direct=on``), numeric keys for lists
(``addr.0=...``), ``,,`` for a literal comma and an implied first key
(``--blockdev file,...`` means ``driver=file``).  Every value arrives as
a string; :func:`typed` converts them as the schema says, so the result
goes through the same validation and handlers as a QMP command.
"""

from __future__ import annotations

import re
from typing import Any

from blockd.errors import QMPError
from blockd.qmp.schema import Schema

_KEY = re.compile(r"[A-Za-z0-9_\-.]+\Z")
_SIZE_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                "p": 1 << 50, "e": 1 << 60}


def _split(text: str) -> list[str]:
    """Split on single commas; ``,,`` stands for a comma inside a value."""
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def parse(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse ``key=value`` pairs into nested dicts of strings (lists from numeric keys)."""
    root: dict[str, Any] = {}
    for index, part in enumerate(_split(text)):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            if index == 0 and implied_key is not None:
                key, value = implied_key, part
            else:
                raise QMPError(f"Expected '=' after parameter '{part}'")
        if not _KEY.match(key) or ".." in key or key.startswith(".") or key.endswith("."):
            raise QMPError(f"Invalid parameter '{key}'")
        _put(root, key, value)
    return _lists(root)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Nested options from dotted keys (``file.filename``), lists from numeric keys:
    QEMU's flattened options (``json:`` names) as QMP shapes them."""
    root: dict[str, Any] = {}
    for key, value in flat.items():
        _put(root, key, value)
    return _lists(root)


def _put(root: dict[str, Any], key: str, value: Any) -> None:
    node = root
    segments = key.split(".")
    for seg in segments[:-1]:
        child = node.setdefault(seg, {})
        if not isinstance(child, dict):
            raise QMPError(f"Parameters '{key}' used inconsistently")
        node = child
    if isinstance(node.get(segments[-1]), dict):
        raise QMPError(f"Parameters '{key}' used inconsistently")
    node[segments[-1]] = value


def _lists(node: Any) -> Any:
    """Dicts whose keys are 0..n-1 become lists, as QEMU's keyval does."""
    if not isinstance(node, dict):
        return node
    out = {k: _lists(v) for k, v in node.items()}
    if out and all(k.isdigit() for k in out):
        keys = sorted(out, key=int)
        if [int(k) for k in keys] == list(range(len(keys))):
            return [out[k] for k in keys]
    return out


def _bool(value: str, name: str) -> bool:
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise QMPError(f"Parameter '{name}' expects 'on' or 'off'")


def _int(value: str, name: str, kind: str | None) -> int:
    text = value.strip().lower()
    try:
        if kind == "size":
            m = re.fullmatch(r"(\d+(?:\.\d+)?)([bkmgtpe]?)", text)
            if m is None:
                raise ValueError
            return int(float(m.group(1)) * _SIZE_SUFFIX[m.group(2)])
        return int(text, 0)
    except ValueError:
        what = "a size value" if kind == "size" else "an integer"
        raise QMPError(f"Parameter '{name}' expects {what}") from None


class _Typer:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema

    def convert(self, node: dict[str, Any], value: Any, path: str, base: str) -> Any:
        node, base = self.schema.resolve(node, base)
        if "oneOf" in node:
            # Alternates: a dict picks the object branch, a string the string branch.
            for branch in node["oneOf"]:
                target, tbase = self.schema.resolve(branch, base)
                stype = target.get("type")
                if (isinstance(value, dict) and stype == "object") or \
                        (isinstance(value, str) and stype in ("string", "null")):
                    return self.convert(target, value, path, tbase)
            return value
        stype = node.get("type")
        name = path.rpartition(".")[2] or path
        if isinstance(value, str):
            if stype == "boolean":
                return _bool(value, name)
            if stype == "integer":
                return _int(value, name, node.get("x-int"))
            if stype == "number":
                try:
                    return float(value)
                except ValueError:
                    raise QMPError(f"Parameter '{name}' expects a number") from None
            return value
        if isinstance(value, list) and stype == "array":
            items = node.get("items", {})
            return [self.convert(items, v, f"{path}[{i}]", base) for i, v in enumerate(value)]
        if isinstance(value, dict) and stype == "object":
            members = self._members(node, value, base)
            return {k: self.convert(members[k][0], v, f"{path}.{k}" if path else k, members[k][1])
                    if k in members else v for k, v in value.items()}
        return value

    def _members(self, node: dict[str, Any], value: dict[str, Any], base: str
                 ) -> dict[str, tuple[dict[str, Any], str]]:
        out = {k: (v, base) for k, v in node.get("properties", {}).items()}
        for clause in node.get("allOf", ()):
            cond = clause.get("if", {}).get("properties", {})
            if all(value.get(k) == c.get("const") for k, c in cond.items()) and "then" in clause:
                target, tbase = self.schema.resolve(clause["then"], base)
                out.update(self._members(target, value, tbase))
        return out


def typed(schema: Schema, doc: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    """Convert keyval strings to the types ``doc`` (a command or type schema) expects."""
    return _Typer(schema).convert(doc, value, "", doc["$id"])
