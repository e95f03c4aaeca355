"""``blockdev-create`` for qcow2: a fresh image on an opened file node.

The layout is QEMU's: the header in cluster 0, the refcount table in
cluster 1, its first refcount block in cluster 2; then the image is
opened and grown to its size, which places the L1 table after them.
"""

from __future__ import annotations

import struct
from typing import Any

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode, ChildLink, Perm
from blockd.drivers.create_target import creation_file
from blockd.drivers.qcow2 import crypt
from blockd.drivers.qcow2 import header as hdr
from blockd.errors import QMPError


def _check(options: dict[str, Any]) -> tuple[int, int, int]:
    version = 3 if options.get("version", "v3") == "v3" else 2
    cs = options.get("cluster-size", 65536)
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise QMPError("Cluster size must be a power of two between 512 and 2048k")
    bits = options.get("refcount-bits", 16)
    if bits < 1 or bits > 64 or bits & (bits - 1):
        raise QMPError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3:
        if bits != 16:
            raise QMPError("Different refcount widths than 16 bits require compatibility "
                           "level 1.1 or above (use version=v3 or greater)")
        if options.get("lazy-refcounts"):
            raise QMPError("Lazy refcounts only supported with compatibility level 1.1 and above "
                           "(use version=v3 or greater)")
        if options.get("extended-l2"):
            raise QMPError("Extended L2 entries are only supported with compatibility level 1.1 "
                           "and above (use version=v3 or greater)")
        if options.get("compression-type", "zlib") != "zlib":
            raise QMPError("Non-zlib compression type is only supported with compatibility "
                           "level 1.1 and above (use version=v3 or greater)")
    if options.get("extended-l2") and cs < 16384:
        raise QMPError("Extended L2 entries are only supported with cluster sizes of at least "
                       "16384 bytes")
    if options["size"] % 512:
        raise QMPError("Image size must be a multiple of 512 bytes")
    if "backing-fmt" in options and "backing-file" not in options:
        raise QMPError("Backing format cannot be used without backing file")
    if options.get("data-file") is not None and version < 3:
        raise QMPError("External data files are only supported with compatibility level 1.1 "
                       "and above (use version=v3 or greater)")
    if options.get("data-file-raw") and options.get("data-file") is None:
        raise QMPError("data-file-raw requires data-file")
    if options.get("data-file-raw") and options.get("backing-file"):
        raise QMPError("Backing file and data-file-raw cannot be used at the same time")
    if options.get("preallocation", "off") != "off" and options.get("backing-file") \
            and not options.get("extended-l2"):
        raise QMPError("Backing file and preallocation can only be used at the same time if "
                       "extended_l2 is on")
    return version, cs, bits


async def create(graph: BlockGraph, options: dict[str, Any]) -> None:
    version, cs, bits = _check(options)
    ref = options["file"]
    file = graph.lookup(ref) if isinstance(ref, str) else await graph.open_node(ref, implicit=True)
    data_ref = options.get("data-file")
    data = None
    try:
        # The file is written through a user's edge, given up before the image is
        # opened on it (the image node shares no writer).
        async with creation_file(graph, file.node_name,
                                 Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE) as link:
            if data_ref is not None:
                data = graph.lookup(data_ref) if isinstance(data_ref, str) \
                    else await graph.open_node(data_ref, implicit=True)
            await _write_empty(link, _header(options, version, cs, bits, data))
        # Open what we wrote and grow it, as QEMU does, so the L1 table lands after.
        from blockd.drivers.qcow2.driver import Qcow2Node

        node_opts: dict[str, Any] = {"driver": "qcow2", "file": file.node_name, "backing": None}
        if data is not None:
            node_opts["data-file"] = data.node_name
        node = await graph.open_node(node_opts, implicit=True)
        assert isinstance(node, Qcow2Node)
        prealloc = options.get("preallocation", "off")
        if options.get("data-file-raw") and prealloc == "off":
            prealloc = "metadata"  # every cluster maps to its place in the raw data file
        try:
            try:
                await node.truncate(options["size"], prealloc=prealloc)
            except QMPError as exc:
                raise type(exc)(f"Could not resize image: {exc.desc}") from None
            encrypt = options.get("encrypt")
            if encrypt is not None:
                await _set_up_encryption(graph, node, encrypt)
        finally:
            await graph.delete_node(node)
    finally:
        if not isinstance(ref, str):
            await graph.delete_node(file)
        if data is not None and not isinstance(data_ref, str):
            await graph.delete_node(data)


def _header(options: dict[str, Any], version: int, cs: int, bits: int,
            data: BlockNode | None) -> hdr.Header:
    """The new image's header: no tables yet, features and extensions as asked."""
    h = hdr.Header(version=version, cluster_bits=cs.bit_length() - 1,
                   refcount_order=bits.bit_length() - 1,
                   refcount_table_offset=cs, refcount_table_clusters=1)
    if version >= 3:
        h.header_length = hdr.V3_WRITE_LENGTH
        if options.get("lazy-refcounts"):
            h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
        if options.get("extended-l2"):
            h.incompatible_features |= hdr.INCOMPAT_EXTL2
        if options.get("compression-type") == "zstd":
            h.incompatible_features |= hdr.INCOMPAT_COMPRESSION
            h.compression_type = hdr.COMPRESSION_ZSTD
        if data is not None:
            h.incompatible_features |= hdr.INCOMPAT_DATA_FILE
            h.extensions.append(hdr.Extension(hdr.EXT_DATA_FILE, data.filename().encode()))
            if options.get("data-file-raw"):
                h.autoclear_features |= hdr.AUTOCLEAR_DATA_FILE_RAW
        h.extensions.append(hdr.Extension(hdr.EXT_FEATURE_TABLE, hdr.feature_table_bytes()))
    else:
        h.header_length = hdr.V2_LENGTH
    if options.get("backing-file"):
        h.backing_file = options["backing-file"]
        if options.get("backing-fmt"):
            h.extensions.insert(0, hdr.Extension(hdr.EXT_BACKING_FORMAT,
                                                 options["backing-fmt"].encode()))
    return h


async def _write_empty(file: ChildLink, h: hdr.Header) -> None:
    """Cluster 0 the header, 1 the refcount table, 2 its first block (counting all three)."""
    from blockd.drivers.qcow2.refcount import set_entry

    cs = h.cluster_size
    head = h.encode()
    await file.truncate(0, exact=True)
    table = struct.pack(">Q", 2 * cs) + bytes(cs - 8)
    block = bytearray(cs)
    for c in range(3):
        set_entry(block, c, h.refcount_order, 1)
    await file.truncate(3 * cs, exact=True)
    await file.write(0, head + bytes(cs - len(head)))
    await file.write(cs, table)
    await file.write(2 * cs, bytes(block))
    await file.flush()


async def _set_up_encryption(graph: BlockGraph, node: Any, encrypt: dict[str, Any]) -> None:
    """Make the new image encrypted, after it got its size, as QEMU orders it."""
    if encrypt["format"] == "luks":
        await crypt.create_luks(node.image, encrypt, graph.secrets)
        return
    # Legacy AES keeps nothing on disk but the method: the key is the password.
    from blockd.drivers.luks import secret_password

    secret_password(graph.secrets, encrypt.get("key-secret"), "encrypt.")
    node.image.header.crypt_method = hdr.CRYPT_AES
    await node.image.file.write(32, struct.pack(">I", hdr.CRYPT_AES))
    await node.image.file.flush()
