"""The text descriptor: what a vmdk is made of and which image it sits on.

QEMU reads it as C strings: the first NUL ends the text, ``CID`` is the
first occurrence of those three letters, a quoted value ends at the
next quote.  The same rules apply here, so a descriptor QEMU accepts is
accepted and one it refuses is refused with its message.
"""

from __future__ import annotations

import dataclasses
import re

from blockd.errors import QMPError

#: QEMU reads (and rewrites) this much of a descriptor for the CIDs.
DESC_SIZE = 20 * 512
#: At most this much of a descriptor file is read when opening.
MAX_DESC_READ = (1 << 20) - 1
#: ``createType`` values a separate descriptor file may name.
DESCRIPTOR_TYPES = ("monolithicFlat", "vmfs", "vmfsSparse", "seSparse",
                    "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
EXTENT_TYPES = ("FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE")


@dataclasses.dataclass
class ExtentLine:
    """``RW <sectors> <type> "<file>" [<offset>]``."""

    sectors: int
    type: str
    filename: str
    offset: int  # in sectors, flat extents only


def c_string(raw: bytes) -> str:
    """The text up to the first NUL, as QEMU's string functions see it."""
    nul = raw.find(b"\0")
    return (raw if nul < 0 else raw[:nul]).decode("latin-1")


def quoted_value(desc: str, name: str) -> str | None:
    """``name="value"``: the value after the first occurrence of ``name`` and two characters."""
    pos = desc.find(name)
    if pos < 0:
        return None
    start = pos + len(name) + 2
    if start >= len(desc):
        return None
    end = desc.find('"', start)
    if end < 0:
        return None
    return desc[start:end]


def read_cid(desc: str, parent: bool) -> int | None:
    """``CID`` or ``parentCID`` as hex after ``=`` (sscanf's ``%x``); None if absent or bad."""
    name = "parentCID" if parent else "CID"
    pos = desc.find(name)
    if pos < 0:
        return None
    m = re.match(r"\s*([+-]?)(?:0[xX])?([0-9a-fA-F]+)", desc[pos + len(name) + 1:])
    if m is None:
        return None
    value = int(m.group(2), 16) & 0xFFFFFFFF  # sscanf wraps what does not fit
    return (-value) & 0xFFFFFFFF if m.group(1) == "-" else value


def _next_line(desc: str, p: int) -> int:
    nl = desc.find("\n", p)
    return len(desc) if nl < 0 else nl + 1


def _scan(line: str) -> tuple[int, list]:
    """sscanf(line, "%10s %ld %10s \"%511[^\\n\\r\"]\" %ld"): (matches, values).

    ``line`` runs to the end of the descriptor, as the C string QEMU scans does.
    """
    vals: list = []
    m = re.match(r"\s*(\S{1,10})", line)
    if not m:
        return 0, vals
    vals.append(m.group(1))
    pos = m.end()
    m = re.match(r"\s*([+-]?\d+)", line[pos:])
    if not m:
        return 1, vals
    vals.append(int(m.group(1)))
    pos += m.end()
    m = re.match(r"\s*(\S{1,10})", line[pos:])
    if not m:
        return 2, vals
    vals.append(m.group(1))
    pos += m.end()
    m = re.match(r'\s*"([^\n\r"]{1,511})', line[pos:])
    if not m:
        return 3, vals
    vals.append(m.group(1))
    pos += m.end()
    if not line[pos:].startswith('"'):
        return 4, vals
    pos += 1
    m = re.match(r"\s*([+-]?\d+)", line[pos:])
    if not m:
        return 4, vals
    vals.append(int(m.group(1)))
    return 5, vals


def parse_extents(desc: str) -> list[ExtentLine]:
    """Every usable extent line, in order, checked as QEMU checks them."""
    out: list[ExtentLine] = []
    p = 0
    while p < len(desc):
        np = _next_line(desc, p)
        # sscanf skips newlines like any white space: a blank line reads the next one.
        matches, vals = _scan(desc[p:])
        if matches < 4 or vals[0] != "RW":
            p = np
            continue
        _, sectors, kind, fname = vals[:4]
        flat_offset = vals[4] if matches == 5 else -1
        if kind == "FLAT":
            if matches != 5 or flat_offset < 0:
                _invalid(desc, p, np)
        elif kind == "VMFS":
            if matches != 4:
                _invalid(desc, p, np)
            flat_offset = 0
        elif matches != 4:
            _invalid(desc, p, np)
        if sectors > 0 and kind in EXTENT_TYPES:
            out.append(ExtentLine(sectors, kind, fname, max(flat_offset, 0)))
        p = np
    return out


def _invalid(desc: str, p: int, np: int) -> None:
    line = desc[p:np]
    if line.endswith("\n"):
        line = line[:-1]
    raise QMPError(f"Invalid extent line: {line}")


def create_type(desc: str) -> str:
    """The descriptor file's ``createType``, refused unless QEMU opens such files."""
    ct = quoted_value(desc, "createType")
    if ct is None or len(ct) >= 128:
        raise QMPError("invalid VMDK image descriptor")
    if ct not in DESCRIPTOR_TYPES:
        raise QMPError(f"Unsupported image type '{ct}'")
    return ct


def parent_hint(desc: str) -> str | None:
    """``parentFileNameHint``: the backing file's name, if any.

    The value starts two characters after the key (``="``) and ends at the
    next quote; no closing quote is an error, as in QEMU.
    """
    pos = desc.find("parentFileNameHint")
    if pos < 0:
        return None
    start = pos + len("parentFileNameHint") + 2
    end = desc.find('"', start)
    if end < 0 or end - start > 4095:
        raise OSError(22, "Invalid argument")
    return desc[start:end]


def with_cid(raw: bytes, cid: int) -> bytes | None:
    """The DESC_SIZE bytes QEMU writes back after giving the image a new CID.

    The text from ``parentCID`` on is kept, the ``CID`` value replaced; the
    bytes after the new terminating NUL stay what they were.  None when
    there is no ``parentCID`` (QEMU fails the write then).
    """
    buf = bytearray(raw[:DESC_SIZE].ljust(DESC_SIZE, b"\0"))
    buf[DESC_SIZE - 1] = 0
    text = bytes(buf[:buf.index(0)])
    pos = text.find(b"parentCID")
    if pos < 0:
        return None
    tail = text[pos:]
    cid_pos = text.find(b"CID")
    new = text[:cid_pos + 4] + b"%x\n" % cid + tail + b"\0"
    new = new[:DESC_SIZE - 1] + b"\0" if len(new) > DESC_SIZE else new
    buf[:len(new)] = new
    return bytes(buf)


def template(cid: int, parent_cid: int, create_type: str, parent_line: str,
             extents: str, hw_version: str, size: int, heads: int,
             adapter_type: str, tools_version: str) -> str:
    """The descriptor QEMU writes for a new image."""
    return ("# Disk DescriptorFile\n"
            "version=1\n"
            f"CID={cid:x}\n"
            f"parentCID={parent_cid:x}\n"
            f'createType="{create_type}"\n'
            f"{parent_line}"
            "\n"
            "# Extent description\n"
            f"{extents}"
            "\n"
            "# The Disk Data Base\n"
            "#DDB\n"
            "\n"
            f'ddb.virtualHWVersion = "{hw_version}"\n'
            f'ddb.geometry.cylinders = "{size // (63 * heads * 512)}"\n'
            f'ddb.geometry.heads = "{heads}"\n'
            'ddb.geometry.sectors = "63"\n'
            f'ddb.adapterType = "{adapter_type}"\n'
            f'ddb.toolsVersion = "{tools_version}"\n')
