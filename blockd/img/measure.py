"""``measure``: how big a file an image (or ``--size N``) needs in an output format.

"required" is what ``convert`` would write; "fully allocated" what
preallocation=full would.  For qcow2 the metadata is counted for the fully
allocated layout (header, L1 and L2 tables, refcount structures) and data
clusters only where the source has data, as qemu-img does.
"""

from __future__ import annotations

from typing import Any, Callable

from blockd.block.node import BlockNode, Status
from blockd.errors import QMPError
from blockd.img.common import (PROG, Args, ImgError, Session, chain_status, json_pretty,
                               parse_size)
from blockd.img.snapshot import load_param, parse_param

#: The largest L1 table QEMU opens (32 MiB), which bounds the virtual size.
MAX_L1_BYTES = 32 << 20


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount table and blocks that also cover themselves."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def qcow2_full_size(size: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """File size of a qcow2 image with every cluster allocated."""
    aligned = _round_up(size, cluster_size)
    l2e = 16 if extended_l2 else 8
    meta = cluster_size  # header
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // 8)
    meta += nl1e * 8
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                   refcount_order)
    return meta + aligned


async def _data_bytes(node: BlockNode, cluster_size: int) -> int:
    """Bytes of whole clusters holding data anywhere in the source's chain."""
    size = node.length()
    required = 0
    offset = 0
    while offset < size:
        ext = await chain_status(node, offset, size - offset)
        n = ext.length
        if ext.status & Status.DATA and not ext.status & Status.ZERO:
            n = _round_up(offset + n, cluster_size) - offset
            required += offset % cluster_size + n
        offset += n
    return required


def _bitmaps_size(node: BlockNode, cluster_size: int) -> int:
    """Room for the source's persistent bitmaps: data, tables and directory."""
    total = 0
    directory = 0
    for bitmap in node.bitmaps.values():
        if not bitmap.persistent:
            continue
        nbytes = -(-(-(-node.length() // bitmap.granularity)) // 8)
        clusters = -(-nbytes // cluster_size)
        total += clusters * cluster_size + _round_up(clusters * 8, cluster_size)
        directory += _round_up(24 + len(bitmap.name.encode()), 8)
    return total + _round_up(directory, cluster_size)


def luks_header_bytes(opts: dict[str, Any], prefix: str, secret: Callable[[str], bytes]) -> int:
    """Size of the LUKS header a new volume with the ``-o`` options (named with
    ``prefix``) gets; the options are checked as qemu-img's measure checks them,
    the key secret included, though no key is derived."""
    from blockd.crypto import luks
    from blockd.drivers.luks import secret_password
    from blockd.img.create import luks_qapi

    qapi = luks_qapi(opts, prefix)
    secret_password(secret, qapi.get("key-secret"), prefix)
    return luks.payload_bytes(luks.CreateOptions.from_qapi(qapi))


async def measure(fmt: str, opts: dict[str, Any], size: int | None,
                  node: BlockNode | None, secret: Callable[[str], bytes]) -> dict[str, int]:
    """MeasureInfo for ``node`` (or an empty image of ``size``) converted to ``fmt``."""
    if node is not None:
        size = node.length()
    assert size is not None
    if fmt == "raw":
        required = size if node is not None else _round_up(size, 512)
        return {"required": required, "fully-allocated": required}
    if fmt == "luks":
        # Every payload sector is written encrypted, allocated or not.
        total = luks_header_bytes(opts, "", secret) + size
        return {"required": total, "fully-allocated": total}
    if fmt != "qcow2":
        raise ImgError(f"Block driver '{fmt}' does not support size measurement")
    cs = opts.get("cluster_size", 65536)
    bits = opts.get("refcount_bits", 16)
    ext_l2 = opts.get("extended_l2", "off") in ("on", "yes", "true", "y")
    version = {"0.10": 2, "v2": 2}.get(opts.get("compat", "v3"), 3)
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise ImgError("Cluster size must be a power of two between 512 and 2048k")
    if bits < 1 or bits > 64 or bits & (bits - 1):
        raise ImgError("Refcount width must be a power of two and may not exceed 64 bits")
    if ext_l2 and cs < 16384:
        raise ImgError("Extended L2 entries are only supported with cluster sizes of at least "
                       "16384 bytes")
    luks_bytes = 0
    if opts.get("encrypt.format") == "luks":
        luks_bytes = _round_up(luks_header_bytes(opts, "encrypt.", secret), cs)
    virtual = _round_up(size, cs)
    l2_tables = -(-(virtual // cs) // (cs // (16 if ext_l2 else 8)))
    if l2_tables * 8 > MAX_L1_BYTES:
        raise ImgError("The image size is too large (try using a larger cluster size)")
    if node is None:
        required = 0
    elif opts.get("backing_file"):
        required = virtual  # the new backing file may share nothing with the source
    else:
        required = await _data_bytes(node, cs)
    if opts.get("preallocation") in ("full", "falloc"):
        required = virtual
    full = luks_bytes + qcow2_full_size(virtual, cs, bits.bit_length() - 1, ext_l2)
    info = {"required": full - virtual + required, "fully-allocated": full}
    # Bitmaps are shown when both images could store them: qcow2 v3 on each side.
    spec = node.format_specific() if node is not None and node.driver == "qcow2" else None
    if version >= 3 and node is not None and spec is not None \
            and spec["data"]["compat"] == "1.1":
        info = {"bitmaps": _bitmaps_size(node, cs), **info}
    return info


def human_text(info: dict[str, int]) -> str:
    lines = [f"required size: {info['required']}",
             f"fully allocated size: {info['fully-allocated']}"]
    if "bitmaps" in info:
        lines.append(f"bitmaps size: {info['bitmaps']}")
    return "\n".join(lines) + "\n"


async def run(args: Args) -> int:
    """``measure [--output=ofmt] [-O fmt] [-o opts] [--size N | [-f fmt] filename]``."""
    from blockd.img.create import FORMATS, parse_opts

    fmt = args.get("O", "raw") or "raw"
    text = ",".join(args.o)  # qemu-img's measure lists no options: "help" is refused
    output = args.output()
    snapshot = parse_param(args.get("l") or "") if args.has("l") else None
    if args.has("size") and args.rest:
        raise ImgError("--size N cannot be used together with a filename.")
    if not args.has("size") and len(args.rest) != 1:
        raise ImgError("Either --size N or one filename must be specified.")
    size = None
    if args.has("size"):
        size = parse_size(args.get("size") or "")
    try:
        opts = parse_opts(fmt, text)
    except ImgError as exc:
        if fmt not in FORMATS:
            raise
        raise ImgError(f"{exc}\n{PROG}: Invalid options for file format '{fmt}'") from None
    async with Session(args.objects) as session:
        node = None
        if args.rest:
            node = await session.open(args.rest[0], args.get("f"), force_share=args.has("U"),
                                      image_opts=args.has("image-opts"))
            if snapshot is not None:
                await load_param(node, snapshot)
        try:
            info = await measure(fmt, opts, size, node, session.graph.secrets)
        except QMPError as exc:
            raise ImgError(exc.desc) from None
    print(json_pretty(info) + "\n" if output == "json" else human_text(info), end="")
    return 0
