"""Image format probing, with the signatures, scores and tie order of QEMU 7.2.

When no format is given, QEMU reads the first 2 KiB of the image (zeroes
past its end), asks every format driver for a score and takes the first
driver with the highest one; ``raw`` always scores 1, so anything no
signature claims is raw.  blockd must name the same format as qemu-img
does: a format it has no driver for is then refused by name rather than
read as raw, and a file qemu-img reads as raw (a fixed VHD, which has only
a footer, or a qcow2 header of version 0) stays raw here too.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from blockd.block.filename import typed_options
from blockd.block.graph import BlockGraph, inherited_options
from blockd.block.node import BlockNode
from blockd.errors import QMPError

#: Bytes QEMU reads for probing (``BLOCK_PROBE_BUF_SIZE``).
PROBE_SIZE = 2048

_QCOW_MAGIC = b"QFI\xfb"
_CLOOP_MAGIC = (b"#!/bin/sh\n#V2.0 Format\n"
                b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
_VMDK_VERSIONS = tuple(f"version={v}{end}".encode()
                       for end in ("\n", "\r\n") for v in (1, 2, 3))


def _c_string(buf: bytes, offset: int) -> bytes:
    """What C's ``strcmp`` sees at ``offset``: the bytes up to the next NUL."""
    end = buf.find(b"\0", offset)
    return buf[offset:] if end < 0 else buf[offset:end]


def _u32be(buf: bytes, offset: int) -> int:
    return struct.unpack_from(">I", buf, offset)[0]


def _u32le(buf: bytes, offset: int) -> int:
    return struct.unpack_from("<I", buf, offset)[0]


def _qcow2(buf: bytes, name: str | None) -> int:
    return 100 if buf[:4] == _QCOW_MAGIC and _u32be(buf, 4) >= 2 else 0


def _qcow(buf: bytes, name: str | None) -> int:
    return 100 if buf[:4] == _QCOW_MAGIC and _u32be(buf, 4) == 1 else 0


def _luks(buf: bytes, name: str | None) -> int:
    # LUKS1 only: QEMU 7.2 reads a LUKS2 header as raw data.
    return 100 if buf[:6] == b"LUKS\xba\xbe" and buf[6:8] == b"\0\1" else 0


def _vmdk(buf: bytes, name: str | None) -> int:
    """Binary sparse headers by magic; a text descriptor by its first real line.

    Comment lines are skipped, and lines of spaces; the first other line
    must be ``version=1``, ``2`` or ``3`` (an empty line already fails).
    """
    if buf[:4] in (b"COWD", b"KDMV"):
        return 100
    p, end = 0, len(buf)
    while p < end:
        if buf[p] == 0x23:  # '#'
            nl = buf.find(b"\n", p)
            p = end + 1 if nl < 0 else nl + 1
            continue
        if buf[p] == 0x20:  # ' '
            while p < end and buf[p] == 0x20:
                p += 1
            if p < end and buf[p] == 0x0D:
                p += 1
            if p == end or buf[p] != 0x0A:
                return 0
            p += 1
            continue
        return 100 if buf.startswith(_VMDK_VERSIONS, p) else 0
    return 0


def _vhdx(buf: bytes, name: str | None) -> int:
    return 100 if buf[:8] == b"vhdxfile" else 0


def _vpc(buf: bytes, name: str | None) -> int:
    # Only the copy of the footer at the start of a dynamic image counts:
    # a fixed image (footer at the end only) is raw to QEMU.
    return 100 if buf[:8] == b"conectix" else 0


def _vdi(buf: bytes, name: str | None) -> int:
    return 100 if _u32le(buf, 64) == 0xBEDA107F else 0


def _qed(buf: bytes, name: str | None) -> int:
    return 100 if buf[:4] == b"QED\0" else 0


def _parallels(buf: bytes, name: str | None) -> int:
    magic = buf[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt")
    return 100 if magic and _u32le(buf, 16) == 2 else 0


def _bochs(buf: bytes, name: str | None) -> int:
    ok = (_c_string(buf, 0) == b"Bochs Virtual HD Image" and _c_string(buf, 32) == b"Redolog"
          and _c_string(buf, 48) == b"Growing" and _u32le(buf, 64) in (0x00020000, 0x00010000))
    return 100 if ok else 0


def _cloop(buf: bytes, name: str | None) -> int:
    return 2 if buf.startswith(_CLOOP_MAGIC) else 0


def _dmg(buf: bytes, name: str | None) -> int:
    # By name only: the signature of a dmg image is in its trailer.
    return 2 if name is not None and len(name) > 4 and name.endswith(".dmg") else 0


def _raw(buf: bytes, name: str | None) -> int:
    return 1


#: In QEMU's driver list order, which breaks ties (a cloop header in a
#: ``.dmg`` file is dmg to qemu-img).
_PROBES: tuple[tuple[str, Callable[[bytes, str | None], int]], ...] = (
    ("dmg", _dmg), ("cloop", _cloop), ("bochs", _bochs), ("parallels", _parallels),
    ("qed", _qed), ("vdi", _vdi), ("vhdx", _vhdx), ("vpc", _vpc), ("vmdk", _vmdk),
    ("qcow", _qcow), ("qcow2", _qcow2), ("luks", _luks), ("raw", _raw),
)


def signature_score(fmt: str, head: bytes) -> int:
    """The score ``fmt``'s probe gives an image starting with ``head`` (for drivers that
    check the same signature when they open)."""
    buf = head[:PROBE_SIZE].ljust(PROBE_SIZE, b"\0")
    return dict(_PROBES)[fmt](buf, None)


def probe(head: bytes, name: str | None) -> str:
    """The format qemu-img 7.2 detects in an image starting with ``head``.

    ``name`` is the file name as given (``None`` for ``json:`` names and
    option sets): the dmg driver goes by its suffix.  An empty image is raw.
    """
    if not head:
        return "raw"
    buf = head[:PROBE_SIZE].ljust(PROBE_SIZE, b"\0")
    best, best_score = "raw", 0
    for fmt, score_of in _PROBES:
        score = score_of(buf, name)
        if score > best_score:
            best, best_score = fmt, score
    return best


def probe_name(filename: str) -> str | None:
    """The name probing sees for an image named ``filename``: QEMU has none for a
    ``json:`` name (its options say what the image is)."""
    return None if filename.startswith("json:") else filename


def read_file_head(path: str) -> bytes:
    """The probe bytes of a host file, with QEMU's error when it cannot be opened."""
    from blockd.paths import os_path

    try:
        with open(os_path(path), "rb") as f:
            return f.read(PROBE_SIZE)
    except OSError as exc:
        raise QMPError(f"Could not open '{path}': {exc.strerror}") from None


async def open_image(graph: BlockGraph, options: dict[str, Any], name: str | None, *,
                     typed: bool = False,
                     probed: Callable[[str], None] | None = None,
                     extra: dict[str, Any] | None = None) -> BlockNode:
    """Open the image ``options`` describe, probing its format when they name none.

    Storage other than a host file is opened once, as the format node will
    have it, read for probing and handed over by name, as QEMU's
    ``bdrv_open_inherit`` does: an NBD server may take a single connection.
    ``typed``: the options may hold strings for other types (``json:``,
    ``--image-opts``), converted once every driver is known.  ``probed`` is
    told the format found, before the image opens.  ``extra``: blockd's own open
    modes (``x-check``), added after the user's options are checked.
    """
    file = options.get("file")
    storage = None
    if "driver" not in options and isinstance(file, dict) and \
            file.get("driver") not in (None, "file"):
        parent = BlockNode("", options, bool(options.get("read-only")))
        file = typed_options(dict(file)) if typed else dict(file)
        await fill_drivers(graph, file, None)  # images inside the storage (blkverify's)
        storage = await graph.open_node(inherited_options(parent, file, "file"), implicit=True)
        options = {**options, "file": storage.node_name}
    try:
        if await fill_drivers(graph, options, name) and probed is not None:
            probed(options["driver"])
        return await graph.open_node({**(typed_options(options) if typed else options),
                                      **(extra or {})})
    except BaseException:
        if storage is not None and not storage.parents:
            await graph.delete_node(storage)
        raise


async def fill_drivers(graph: BlockGraph, options: dict[str, Any], name: str | None) -> bool:
    """Probe the format of every image in ``options`` that names none, as QEMU does when
    opening: the top one (named ``name``), and children such as ``backing`` given by
    their storage only.  Whether the top one was probed."""
    def needs_filling(value: Any) -> bool:
        return isinstance(value, dict) and ("driver" in value or value.get("file") is not None)

    probed = "driver" not in options
    file = options.get("file")
    if isinstance(file, dict) and needs_filling(file):
        await fill_drivers(graph, file, None)  # storage with images of its own (blkverify)
    if probed:
        if file is None:
            raise QMPError("Must specify either driver or file")
        options["driver"] = await probe_file_child(graph, file, name)
    for key, value in options.items():
        if key != "file" and needs_filling(value):
            await fill_drivers(graph, value, None)
    return probed


async def probe_file_child(graph: BlockGraph, file: str | dict[str, Any], name: str | None) -> str:
    """The format of the image whose storage ``file`` (a ``BlockdevRef``) describes.

    A host file is read directly; other storage (blkdebug, nbd...) is
    opened as a node of its own for the read and closed again.
    """
    if isinstance(file, str):
        return await _probe_node(graph.lookup(file), name)
    if file.get("driver") == "file" and isinstance(file.get("filename"), str):
        return probe(read_file_head(file["filename"]), name)
    node = await graph.open_node({**file, "read-only": True, "force-share": True},
                                 implicit=True)
    try:
        return await _probe_node(node, name)
    finally:
        await graph.delete_node(node)


async def _probe_node(node: BlockNode, name: str | None) -> str:
    length = min(node.length(), PROBE_SIZE)
    try:
        head = bytes(await node.read(0, length)) if length else b""
    except OSError as exc:
        raise QMPError("Could not read image for determining its format: "
                       f"{exc.strerror or exc}") from None
    return probe(head, name)
