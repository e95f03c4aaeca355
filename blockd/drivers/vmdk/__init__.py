"""The ``vmdk`` format: VMware's disk images, as QEMU 7.2 reads and writes them.

``descriptor.py`` parses and writes the text descriptor, ``extent.py`` the
sparse extents (header, grain directory and tables), ``stream.py`` the
compressed grains of streamOptimized images, ``driver.py`` the node,
``create.py`` ``blockdev-create``.
"""

from __future__ import annotations

#: Magic numbers of the two sparse headers, as their first four bytes.
MAGIC_COWD = b"COWD"  # VMware 3 (vmfsSparse / ESX)
MAGIC_KDMV = b"KDMV"  # VMware 4 (hosted sparse, streamOptimized)


def _blank_then_version(buf: bytes) -> bool:
    """Whether the text starts (after comments and blank lines) with ``version=1..3``."""
    p, end = 0, len(buf)
    while p < end:
        c = buf[p:p + 1]
        if c == b"#":
            nl = buf.find(b"\n", p)
            p = end + 1 if nl < 0 else nl + 1
            continue
        if c == b" ":
            while p < end and buf[p:p + 1] == b" ":
                p += 1
            if p < end and buf[p:p + 1] == b"\r":
                p += 1
            if p == end or buf[p:p + 1] != b"\n":
                return False
            p += 1
            continue
        rest = buf[p:p + 11]
        return any(rest.startswith(b"version=%d%s" % (v, nl))
                   for v in (1, 2, 3) for nl in (b"\n", b"\r\n"))
    return False


def probe(buf: bytes, filename: str) -> int:
    """QEMU's vmdk score: 100 for a sparse header's magic or a descriptor's ``version=``
    line (after comments and lines of spaces), else 0."""
    if len(buf) < 4:
        return 0
    if buf[:4] in (MAGIC_COWD, MAGIC_KDMV):
        return 100
    return 100 if _blank_then_version(buf) else 0
