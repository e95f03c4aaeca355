"""Argument checking against ``schema/`` with QEMU's error messages.

``jsonschema`` decides whether arguments are valid.  Which error to
report, and in what words, follows QEMU's QAPI input visitor: members
are visited in declaration order (missing, wrong type, bad enum value),
union branches after their base, and keys nobody asked for are reported
last ("Parameter 'x' is unexpected").  The walk below reproduces that
order over the same schema documents, so the schema stays the single
description of every command.
"""

from __future__ import annotations

import functools
import json
import pathlib
import urllib.parse
from typing import Any, Iterator

import jsonschema
import referencing
import referencing.jsonschema

from blockd.errors import QMPError

SCHEMA_DIR = pathlib.Path(__file__).resolve().parent.parent.parent / "schema"
BASE_URI = "https://blockd.invalid/schema/"

#: Ranges of QAPI's sized integer types and the C names QEMU reports.
INT_RANGES: dict[str, tuple[int, int, str]] = {
    "int8": (-(1 << 7), (1 << 7) - 1, "int8_t"),
    "int16": (-(1 << 15), (1 << 15) - 1, "int16_t"),
    "int32": (-(1 << 31), (1 << 31) - 1, "int32_t"),
    "int64": (-(1 << 63), (1 << 63) - 1, "int64_t"),
    "uint8": (0, (1 << 8) - 1, "uint8_t"),
    "uint16": (0, (1 << 16) - 1, "uint16_t"),
    "uint32": (0, (1 << 32) - 1, "uint32_t"),
    "uint64": (0, (1 << 64) - 1, "uint64_t"),
    "size": (0, (1 << 64) - 1, "uint64_t"),
}

_JSON_TYPE_NAMES = {
    "string": "string", "integer": "integer", "number": "number",
    "boolean": "boolean", "object": "object", "array": "array", "null": "null",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _matches_type(schema_type: str | list[str], value: Any) -> bool:
    types = [schema_type] if isinstance(schema_type, str) else schema_type
    actual = _json_type(value)
    return actual in types or (actual == "integer" and "number" in types)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class Schema:
    """All documents under ``schema/``, ready for validation and introspection."""

    def __init__(self, root: pathlib.Path = SCHEMA_DIR) -> None:
        self.types: dict[str, dict[str, Any]] = {}
        self.commands: dict[str, dict[str, Any]] = {}
        #: Event name -> the schema of its ``data`` (introspection only).
        self.events: dict[str, dict[str, Any]] = {}
        resources = []
        for sub, table in (("types", self.types), ("commands", self.commands),
                           ("events", self.events)):
            for path in sorted((root / sub).glob("*.json")):
                doc = json.loads(path.read_text())
                doc.setdefault("$id", f"{BASE_URI}{sub}/{path.name}")
                table[path.stem] = doc
                resources.append((doc["$id"], referencing.Resource.from_contents(
                    doc, default_specification=referencing.jsonschema.DRAFT202012)))
        self.registry: referencing.Registry = referencing.Registry().with_resources(resources)
        self._validators: dict[str, jsonschema.protocols.Validator] = {}

    # ---- validation -----------------------------------------------------

    def validate(self, command: str, args: dict[str, Any]) -> None:
        """Raise QMPError with QEMU's text if ``args`` do not fit ``command``."""
        doc = self.commands.get(command)
        if doc is None:
            return
        _Walker(self).walk(doc, args, "", doc["$id"])
        validator = self._validator(command)
        error = jsonschema.exceptions.best_match(validator.iter_errors(args))
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "arguments"
            raise QMPError(f"Invalid parameter '{where}': {error.message}")

    def validate_type(self, type_name: str, value: Any, path: str = "") -> None:
        """Check ``value`` against a named type (command line options use this)."""
        doc = self.types[type_name]
        _Walker(self).walk(doc, value, path, doc["$id"])
        validator = jsonschema.Draft202012Validator(doc, registry=self.registry)
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            raise QMPError(f"Invalid parameter: {error.message}")

    def _validator(self, command: str) -> jsonschema.protocols.Validator:
        validator = self._validators.get(command)
        if validator is None:
            validator = jsonschema.Draft202012Validator(self.commands[command], registry=self.registry)
            self._validators[command] = validator
        return validator

    def resolve(self, schema: dict[str, Any], base: str) -> tuple[dict[str, Any], str]:
        """Follow ``$ref`` chains; returns the target and its base URI."""
        while "$ref" in schema:
            ref = schema["$ref"]
            schema = self.registry.resolver(base).lookup(ref).contents
            base = urllib.parse.urljoin(base, ref).partition("#")[0]
        return schema, base


class _Walker:
    """Visits a value the way QEMU's QAPI input visitor would, raising its first error."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema

    def walk(self, node: dict[str, Any], value: Any, path: str, base: str,
             leaf: str | None = None) -> None:
        """Check ``value``; ``path`` is the dotted full name, ``leaf`` the member name.

        QEMU names the full path in missing/type errors but only the member
        (or ``null`` for a list element) in enum and range errors.
        """
        node, base = self.schema.resolve(node, base)
        short = leaf if leaf is not None else (path if path and not path.endswith("]") else "null")
        if "oneOf" in node:
            self._alternate(node, value, path, base, short)
            return
        stype = node.get("type")
        if stype is None:
            return
        if not _matches_type(stype, value):
            expected = stype if isinstance(stype, str) else stype[0]
            raise QMPError(f"Invalid parameter type for '{path}', expected: "
                           f"{_JSON_TYPE_NAMES.get(expected, expected)}")
        if stype == "object":
            self._struct(node, value, path, base)
        elif stype == "array":
            items = node.get("items")
            if items is not None:
                for i, item in enumerate(value):
                    self.walk(items, item, f"{path}[{i}]", base, "null")
        elif "enum" in node and value not in node["enum"]:
            if value in node.get("x-qemu-enum", ()):
                from blockd.drivers import unsupported

                raise unsupported(value)
            raise QMPError(f"Parameter '{short}' does not accept value '{value}'")
        elif "const" in node and value != node["const"]:
            raise QMPError(f"Parameter '{short}' does not accept value '{value}'")
        elif "x-int" in node:
            low, high, cname = INT_RANGES[node["x-int"]]
            if not low <= value <= high:
                raise QMPError(f"Parameter '{short}' expects {cname}")

    def _alternate(self, node: dict[str, Any], value: Any, path: str, base: str,
                   short: str) -> None:
        """QEMU names an alternate's type error by the member name alone (``null`` in a list)."""
        for branch in node["oneOf"]:
            target, tbase = self.schema.resolve(branch, base)
            stype = target.get("type")
            if stype is None and "oneOf" in target:
                continue
            if stype is not None and _matches_type(stype, value):
                self.walk(target, value, path, tbase, short)
                return
        raise QMPError(f"Invalid parameter type for '{short}', expected: {node.get('title', 'value')}")

    def _members(self, node: dict[str, Any], value: dict[str, Any], base: str
                 ) -> Iterator[tuple[str, dict[str, Any], str, bool]]:
        """Members of a struct or flat union, base first, then the chosen branch."""
        required = set(node.get("required", ()))
        for name, sub in node.get("properties", {}).items():
            yield name, sub, base, name in required
        for clause in node.get("allOf", ()):
            if "if" in clause:
                if self._condition_holds(clause["if"], value):
                    target, tbase = self.schema.resolve(clause["then"], base)
                    yield from self._members(target, value, tbase)
            else:
                target, tbase = self.schema.resolve(clause, base)
                yield from self._members(target, value, tbase)

    @staticmethod
    def _condition_holds(cond: dict[str, Any], value: dict[str, Any]) -> bool:
        for name, sub in cond.get("properties", {}).items():
            if name not in value or value[name] != sub.get("const"):
                return False
        return True

    def _struct(self, node: dict[str, Any], value: dict[str, Any], path: str, base: str) -> None:
        seen: set[str] = set()
        for name, sub, mbase, required in self._members(node, value, base):
            seen.add(name)
            if name in value:
                self.walk(sub, value[name], _join(path, name), mbase, name)
            elif required:
                raise QMPError(f"Parameter '{_join(path, name)}' is missing")
        closed = node.get("additionalProperties") is False or node.get("unevaluatedProperties") is False
        if closed:
            for key in value:
                if key not in seen:
                    raise QMPError(f"Parameter '{_join(path, key)}' is unexpected")


@functools.lru_cache(maxsize=1)
def load() -> Schema:
    """The process-wide schema (loaded once)."""
    return Schema()
