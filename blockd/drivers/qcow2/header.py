"""The qcow2 header and its extensions (docs/interop/qcow2.txt, "Header").

All integers are big-endian.  Version 2 headers stop at byte 72; version
3 adds feature bits, the refcount width and ``header_length``, and may
carry the compression type at byte 104.  Extensions follow the header
as (type, length, data padded to 8 bytes) records up to a zero type.
Extensions blockd does not interpret are kept as raw bytes and written
back unchanged, as the format asks.
"""

from __future__ import annotations

import dataclasses
import struct

from blockd.errors import QMPError

MAGIC = 0x514649FB  # "QFI\xfb"

#: Header extension types.
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

#: Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
#: Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
#: Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1

#: The feature table blockd writes on create: (type, bit, name); type 0 incompatible,
#: 1 compatible, 2 autoclear.
FEATURE_TABLE = [
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
    (0, 3, "compression type"), (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"), (2, 1, "raw external data"),
]

_V2 = struct.Struct(">IIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 32 bytes, through header_length
V2_LENGTH = 72
V3_LENGTH = 104
#: What blockd writes for v3: room for the compression type, padded to 8.
V3_WRITE_LENGTH = 112


@dataclasses.dataclass
class Extension:
    type: int
    data: bytes


@dataclasses.dataclass
class Header:
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_WRITE_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    extensions: list[Extension] = dataclasses.field(default_factory=list)
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    def extension(self, ext_type: int) -> Extension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    def set_extension(self, ext_type: int, data: bytes | None) -> None:
        """Replace (or with ``None`` drop) the extension of a type."""
        self.extensions = [e for e in self.extensions if e.type != ext_type]
        if data is not None:
            self.extensions.append(Extension(ext_type, data))

    @property
    def backing_format(self) -> str | None:
        ext = self.extension(EXT_BACKING_FORMAT)
        return ext.data.decode(errors="replace") if ext else None

    @property
    def data_file(self) -> str | None:
        ext = self.extension(EXT_DATA_FILE)
        return _c_string(ext.data) if ext else None

    def feature_names(self) -> dict[tuple[int, int], str]:
        """(type, bit) -> name from the image's own feature table."""
        ext = self.extension(EXT_FEATURE_TABLE)
        names: dict[tuple[int, int], str] = {}
        if ext is None:
            return names
        for pos in range(0, len(ext.data) - 47, 48):
            kind, bit = ext.data[pos], ext.data[pos + 1]
            names[(kind, bit)] = ext.data[pos + 2:pos + 48].rstrip(b"\0").decode(errors="replace")
        return names

    # ---- encoding -----------------------------------------------------------------

    def encode(self) -> bytes:
        """Header, extensions and backing file name, as one buffer for cluster 0."""
        out = bytearray(_V2.pack(
            MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
            self.nb_snapshots, self.snapshots_offset))
        if self.version >= 3:
            out += _V3.pack(self.incompatible_features, self.compatible_features,
                            self.autoclear_features, self.refcount_order, self.header_length)
            if self.header_length > V3_LENGTH:
                out += bytes([self.compression_type])
            out += bytes(self.header_length - len(out))
        for ext in self.extensions:
            out += struct.pack(">II", ext.type, len(ext.data)) + ext.data
            out += bytes(-len(ext.data) % 8)
        out += bytes(8)  # end of extensions
        if self.backing_file:
            name = self.backing_file.encode()
            self.backing_file_offset = len(out)
            self.backing_file_size = len(name)
            struct.pack_into(">QI", out, 8, self.backing_file_offset, self.backing_file_size)
            out += name
        else:
            self.backing_file_offset = self.backing_file_size = 0
            struct.pack_into(">QI", out, 8, 0, 0)
        if len(out) > self.cluster_size:
            raise QMPError("Header extensions do not fit in the first cluster")
        return bytes(out)


#: Limits on what an image may declare, as QEMU's: tables are read whole into
#: memory, so a hostile header must not make us allocate more than these.
MAX_REFTABLE_SIZE = 8 << 20
MAX_L1_SIZE = 32 << 20
MAX_SNAPSHOTS = 65536
SNAPSHOT_HEADER_SIZE = 40
MAX_BACKING_NAME = 1023
#: Longest backing format name QEMU keeps (its buffer, with the NUL, is 16 bytes).
MAX_BACKING_FORMAT = 15
_INT64_MAX = (1 << 63) - 1
_INT_MAX = (1 << 31) - 1
#: The header struct QEMU reads whatever header_length says (v3 fields and compression type).
_STRUCT_LENGTH = 112


def validate_table(h: Header, offset: int, entries: int, entry_len: int, max_bytes: int,
                   name: str) -> None:
    """A table the header points to: bounded in size, cluster aligned, addressable."""
    if entries > max_bytes // entry_len:
        raise QMPError(f"{name} too large")
    if _INT64_MAX - entries * entry_len < offset or offset % h.cluster_size:
        raise QMPError(f"{name} offset invalid")


def size_to_l1(h: Header, size: int) -> int:
    """L1 entries needed to map ``size`` guest bytes."""
    l2_bits = h.cluster_bits - (4 if h.extended_l2 else 3)
    shift = h.cluster_bits + l2_bits
    return (size + (1 << shift) - 1) >> shift


def parse(buf: bytes, may_be_corrupt: bool = True, for_check: bool = False) -> Header:
    """Parse and range-check the first cluster of an image, in QEMU's order and words.

    Every field that sizes or locates something is checked before anything
    is read or allocated from it.  Bytes missing at the end of a short file
    read as zeros, as QEMU's block layer pads reads past the end.
    """
    if len(buf) < 4 or struct.unpack_from(">I", buf)[0] != MAGIC:
        raise QMPError("Image is not in qcow2 format")
    if len(buf) < _STRUCT_LENGTH:
        buf = bytes(buf) + bytes(_STRUCT_LENGTH - len(buf))
    (magic, version, bfo, bfs, cluster_bits, size, crypt, l1_size, l1_off,
     rt_off, rt_clusters, nb_snap, snap_off) = _V2.unpack_from(buf)
    if version not in (2, 3):
        raise QMPError(f"Unsupported qcow2 version {version}")
    if not 9 <= cluster_bits <= 21:
        raise QMPError(f"Unsupported cluster size: 2^{cluster_bits}")
    h = Header(version=version, backing_file_offset=bfo, backing_file_size=bfs,
               cluster_bits=cluster_bits, size=size, crypt_method=crypt, l1_size=l1_size,
               l1_table_offset=l1_off, refcount_table_offset=rt_off,
               refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap,
               snapshots_offset=snap_off, header_length=V2_LENGTH, refcount_order=4)
    if version >= 3:
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = _V3.unpack_from(buf, V2_LENGTH)
        if h.header_length < V3_LENGTH:
            raise QMPError("qcow2 header too short")
    if h.header_length > h.cluster_size:
        raise QMPError("qcow2 header exceeds cluster size")
    if bfo > h.cluster_size:
        raise QMPError("Invalid backing file offset")
    ext_end = bfo if bfo else h.cluster_size
    if len(buf) < ext_end:
        buf = bytes(buf) + bytes(ext_end - len(buf))
    if h.header_length > V3_LENGTH:
        h.compression_type = buf[V3_LENGTH]
    _check_compression_type(h)
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        try:
            _read_extensions(h, buf, ext_end)
        except QMPError:
            pass  # only the feature names are wanted here, as far as they can be read
        raise QMPError("Unsupported qcow2 feature(s): " + unsupported_features(h, unknown))
    if h.incompatible_features & INCOMPAT_CORRUPT and not may_be_corrupt:
        raise QMPError("qcow2: Image is corrupt; cannot be opened read/write")
    if h.refcount_order > 6:
        raise QMPError("Reference count entry width too large; may not exceed 64 bits")
    if rt_clusters == 0:
        raise QMPError("Image does not contain a reference count table")
    validate_table(h, rt_off, rt_clusters, h.cluster_size, MAX_REFTABLE_SIZE,
                   "Reference count table")
    if not for_check:  # a check reads (and may repair) the snapshot table itself
        validate_table(h, snap_off, nb_snap, SNAPSHOT_HEADER_SIZE,
                       SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS, "Snapshot table")
    validate_table(h, l1_off, l1_size, 8, MAX_L1_SIZE, "Active L1 table")
    needed = size_to_l1(h, size)
    if needed > _INT_MAX:
        raise QMPError("Image is too big")
    if l1_size < needed:
        raise QMPError("L1 table is too small")
    if crypt > CRYPT_LUKS:
        # QEMU prints the method as a signed int.
        raise QMPError(f"Unsupported encryption method {crypt - (crypt >> 31 << 32)}")
    _read_extensions(h, buf, ext_end)
    if bfo:
        if bfs > min(MAX_BACKING_NAME, h.cluster_size - bfo):
            raise QMPError("Backing file name too long")
        h.backing_file = _c_string(buf[bfo:bfo + bfs])
    return h


def _c_string(raw: bytes) -> str:
    """A file name stored in the image; QEMU reads it as a C string, so a NUL ends it."""
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


def _check_compression_type(h: Header) -> None:
    if h.compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise QMPError(f"qcow2: unknown compression type: {h.compression_type}")
    has_bit = bool(h.incompatible_features & INCOMPAT_COMPRESSION)
    if h.compression_type == COMPRESSION_ZLIB and has_bit:
        raise QMPError("qcow2: Compression type incompatible feature bit must not be set")
    if h.compression_type != COMPRESSION_ZLIB and not has_bit:
        raise QMPError("qcow2: Compression type incompatible feature bit must be set")


def _read_extensions(h: Header, buf: bytes, end: int) -> None:
    """The extension records between the header and ``end`` (backing name or cluster end)."""
    h.extensions = []
    pos = h.header_length
    while pos < end:
        if pos + 8 > end:
            raise QMPError("Header extension too large")
        ext_type, length = struct.unpack_from(">II", buf, pos)
        pos += 8
        if length > end - pos:
            raise QMPError("Header extension too large")
        if ext_type == EXT_END:
            return
        data = bytes(buf[pos:pos + length])
        if ext_type == EXT_BACKING_FORMAT and length > MAX_BACKING_FORMAT:
            raise QMPError(f"ERROR: ext_backing_format: len={length} too large "
                           f"(>={MAX_BACKING_FORMAT + 1})")
        if ext_type == EXT_BITMAPS:
            _check_bitmaps_extension(h, data)
        h.extensions.append(Extension(ext_type, data))
        pos += (length + 7) & ~7


#: Bitmap limits, as QEMU's.
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS


def _check_bitmaps_extension(h: Header, data: bytes) -> None:
    if len(data) != 24:
        raise QMPError("bitmaps_ext: Invalid extension length")
    if not h.autoclear_features & AUTOCLEAR_BITMAPS:
        return  # stale: ignored, and dropped on the next header write
    nb, reserved, dir_size, dir_offset = struct.unpack(">IIQQ", data)
    if reserved:
        raise QMPError("bitmaps_ext: Reserved field is not zero")
    if nb > MAX_BITMAPS:
        raise QMPError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported "
                       f"maximum of {MAX_BITMAPS}")
    if nb == 0:
        raise QMPError("found bitmaps extension with zero bitmaps")
    if dir_offset % h.cluster_size:
        raise QMPError("bitmaps_ext: invalid bitmap directory offset")
    if dir_size > MAX_BITMAP_DIRECTORY_SIZE:
        raise QMPError(f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum "
                       f"supported size ({MAX_BITMAP_DIRECTORY_SIZE})")


def unsupported_features(h: Header, mask: int) -> str:
    """Name incompatible bits as QEMU does: table entries in table order, then the rest as hex."""
    parts = []
    for (kind, bit), name in h.feature_names().items():
        if kind == 0 and mask & (1 << bit):
            parts.append(name)
            mask &= ~(1 << bit)
    if mask:
        parts.append(f"Unknown incompatible feature: {mask:x}")
    return ", ".join(parts)


def feature_table_bytes() -> bytes:
    out = bytearray()
    for kind, bit, name in FEATURE_TABLE:
        out += bytes([kind, bit]) + name.encode().ljust(46, b"\0")
    return bytes(out)
