"""``create``: new images from qemu-img's ``-o`` option syntax.

qemu-img describes creation options as flat ``key=value`` lists per
format, merged with the protocol's (``file``) options; the "Formatting"
line prints them in a fixed order, with defaults filled in.  Here each
format has a table of those options, and the values are turned into a
``blockdev-create`` dictionary for the driver's ``create``.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from typing import Any

from blockd.block.filename import backing_path, create_path
from blockd.errors import QMPError, TooLarge
from blockd.img.common import Args, ImgError, Session, UsageError, parse_size


@dataclass(frozen=True)
class Opt:
    """One ``-o`` option: its value type, help text and printed default."""

    name: str
    kind: str  # "str", "size", "bool" or "num"
    help: str
    default: str | None = None


_SIZE = Opt("size", "size", "Virtual disk size")
_PROTOCOL = [
    Opt("nocow", "bool", "Turn off copy-on-write (valid only on btrfs)"),
    Opt("preallocation", "str", "Preallocation mode (allowed values: off, falloc, full)"),
    Opt("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
]
_CRYPTO = [
    ("key-secret", "str", "ID of the secret that provides the keyslot passphrase"),
    ("cipher-alg", "str", "Name of encryption cipher algorithm"),
    ("cipher-mode", "str", "Name of encryption cipher mode"),
    ("ivgen-alg", "str", "Name of IV generator algorithm"),
    ("ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    ("hash-alg", "str", "Name of encryption hash algorithm"),
    ("iter-time", "num", "Time to spend in PBKDF in milliseconds"),
]


def luks_qapi(opts: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The LUKS creation options among ``-o`` ones (named with ``prefix``), by their QAPI
    names; values outside QEMU's enums are refused with its message."""
    from blockd.qmp.schema import load

    out = {name: opts[prefix + name] for name, _, _ in _CRYPTO if prefix + name in opts}
    load().validate_type("QCryptoBlockCreateOptionsLUKS", out)
    return out

#: Each format's own options, in the order the "Formatting" line prints them.
FORMATS: dict[str, list[Opt]] = {
    "raw": [_SIZE],
    "luks": [_SIZE] + [Opt(n, k, h) for n, k, h in _CRYPTO],
    "qcow2": [
        Opt("encryption", "bool", "Encrypt the image with format 'aes'. (Deprecated in favor "
                                  "of encrypt.format=aes)"),
        Opt("encrypt.format", "str", "Encrypt the image, format choices: 'aes', 'luks'"),
        *[Opt("encrypt." + n, k, "ID of secret providing qcow AES key or LUKS passphrase"
              if n == "key-secret" else h) for n, k, h in _CRYPTO],
        Opt("cluster_size", "size", "qcow2 cluster size", "65536"),
        Opt("extended_l2", "bool", "Extended L2 tables", "off"),
        Opt("preallocation", "str",
            "Preallocation mode (allowed values: off, metadata, falloc, full)"),
        Opt("compression_type", "str", "Compression method used for image cluster compression",
            "zlib"),
        _SIZE,
        Opt("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
        Opt("backing_file", "str", "File name of a base image"),
        Opt("backing_fmt", "str", "Image format of the base image"),
        Opt("data_file", "str", "File name of an external data file"),
        Opt("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
        Opt("lazy_refcounts", "bool", "Postpone refcount updates", "off"),
        Opt("refcount_bits", "num", "Width of a reference count entry in bits", "16"),
    ],
    "vpc": [
        _SIZE,
        Opt("subformat", "str", "Type of virtual hard disk format. Supported formats are "
                                "{dynamic (default) | fixed} "),
        Opt("force_size", "bool", "Force disk size calculation to use the actual size "
                                  "specified, rather than using the nearest CHS-based "
                                  "calculation"),
    ],
    "vdi": [_SIZE, Opt("static", "bool", "VDI static (pre-allocated) image", "off")],
    "vhdx": [
        Opt("size", "size", "Virtual disk size; max of 64TB."),
        Opt("log_size", "size", "Log size; min 1MB.", "1048576"),
        Opt("block_size", "size", "Block Size; min 1MB, max 256MB. 0 means auto-calculate "
                                  "based on image size.", "0"),
        Opt("subformat", "str", "VHDX format type, can be either 'dynamic' or 'fixed'. "
                                "Default is 'dynamic'."),
        Opt("block_state_zero", "bool", "Force use of payload blocks of type 'ZERO'. "
                                        "Non-standard, but default.  Do not set to 'off' when "
                                        "using 'qemu-img convert' with subformat=dynamic."),
    ],
    "qed": [
        _SIZE,
        Opt("backing_file", "str", "File name of a base image"),
        Opt("backing_fmt", "str", "Image format of the base image"),
        Opt("cluster_size", "size", "Cluster size (in bytes)", "65536"),
        Opt("table_size", "size", "L1/L2 table size (in clusters)"),
    ],
    "qcow": [
        _SIZE,
        Opt("backing_file", "str", "File name of a base image"),
        Opt("backing_fmt", "str", "Format of the backing image"),
        Opt("encryption", "bool", "Encrypt the image with format 'aes'. (Deprecated in favor "
                                  "of encrypt.format=aes)"),
        Opt("encrypt.format", "str", "Encrypt the image, format choices: 'aes'"),
        Opt("encrypt.key-secret", "str", "ID of the secret that provides the AES encryption "
                                         "key"),
    ],
    "parallels": [_SIZE, Opt("cluster_size", "size", "Parallels image cluster size", "1048576")],
    "vmdk": [
        _SIZE,
        Opt("adapter_type", "str", "Virtual adapter type, can be one of ide (default), "
                                   "lsilogic, buslogic or legacyESX"),
        Opt("backing_file", "str", "File name of a base image"),
        Opt("backing_fmt", "str", "Must be 'vmdk' if present"),
        Opt("compat6", "bool", "VMDK version 6 image", "off"),
        Opt("hwversion", "str", "VMDK hardware version", "undefined"),
        Opt("toolsversion", "str", "VMware guest tools version"),
        Opt("subformat", "str", "VMDK flat extent format, can be one of {monolithicSparse "
                                "(default) | monolithicFlat | twoGbMaxExtentSparse | "
                                "twoGbMaxExtentFlat | streamOptimized} "),
        Opt("zeroed_grain", "bool", "Enable efficient zero writes using the zeroed-grain GTE "
                                    "feature"),
    ],
}
# The encrypt.* entries above were built in _CRYPTO's order; qemu-img prints
# key-secret right after format, which that order already gives.

_TYPE_NAMES = {"str": "<str>", "size": "<size>", "bool": "<bool (on/off)>", "num": "<num>"}
_BOOLS = {"on": True, "yes": True, "true": True, "y": True,
          "off": False, "no": False, "false": False, "n": False}


def all_opts(fmt: str) -> list[Opt]:
    """Format options followed by the protocol's, as qemu-img merges them."""
    own = FORMATS[fmt]
    names = {o.name for o in own}
    return own + [o for o in _PROTOCOL if o.name not in names]


#: Formats qemu-img reads but cannot create.
_READ_ONLY = ("bochs", "cloop", "dmg")


def _unknown(fmt: str) -> ImgError:
    if fmt in _READ_ONLY:
        return ImgError(f"Format driver '{fmt}' does not support image creation")
    return ImgError(f"Unknown file format '{fmt}'")


def help_text(fmt: str, with_protocol: bool) -> str:
    """``-o help``: sorted options; the protocol's only when a filename was given."""
    if fmt not in FORMATS:
        raise _unknown(fmt)
    opts = all_opts(fmt) if with_protocol else FORMATS[fmt]
    lines = ["Supported options:" if with_protocol else f"Supported {fmt} options:"]
    for o in sorted(opts, key=lambda o: o.name):
        lines.append(f"  {o.name + '=' + _TYPE_NAMES[o.kind]:<22} - {o.help}")
    if not with_protocol:
        lines += ["", "The protocol level may support further options.",
                  "Specify the target filename to include those options."]
    return "\n".join(lines) + "\n"


def split_opts(text: str) -> list[str]:
    """``-o`` text as ``name`` or ``name=value`` items: a comma ends an item, except
    that ``,,`` inside a value stands for one comma."""
    items = []
    pos = 0
    while pos <= len(text):
        m = re.compile(r"[^=,]*").match(text, pos)
        assert m is not None
        pos = m.end()
        if text[pos:pos + 1] != "=":
            items.append(m.group())
            pos += 1
            continue
        value = re.compile(r"(?:[^,]|,,)*").match(text, pos + 1)
        assert value is not None
        items.append(f"{m.group()}={value.group().replace(',,', ',')}")
        pos = value.end() + 1
    return items


def wants_help(text: str) -> bool:
    return any(item in ("help", "?") for item in split_opts(text))


def parse_opts(fmt: str, text: str) -> dict[str, Any]:
    """``-o`` text -> {name: normalised value}; later duplicates win, as in qemu-img."""
    if fmt not in FORMATS:
        raise _unknown(fmt)
    table = {o.name: o for o in all_opts(fmt)}
    out: dict[str, Any] = {}
    for item in filter(None, split_opts(text)):
        key, _, value = item.partition("=")
        opt = table.get(key)
        if opt is None:
            raise ImgError(f"Invalid parameter '{key}'")
        out[key] = _convert(opt, value)
    return out


def _convert(opt: Opt, value: str) -> Any:
    if opt.kind == "bool":
        if value not in _BOOLS:
            raise ImgError(f"Parameter '{opt.name}' expects 'on' or 'off'")
        return value  # printed as given; interpreted by _bool()
    if opt.kind == "num":
        try:
            return int(value, 0)
        except ValueError:
            raise ImgError(f"Parameter '{opt.name}' expects a number") from None
    if opt.kind == "size":
        try:
            return parse_size(value)
        except ImgError:
            raise ImgError(f"Parameter '{opt.name}' expects a non-negative number below 2^64\n"
                           "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                           "tera-, peta-\nand exabytes, respectively.") from None
    return value


def _bool(value: str | None) -> bool:
    return value is not None and bool(value) and _BOOLS[value]


def formatting_line(filename: str, fmt: str, opts: dict[str, Any]) -> str:
    """qemu-img's "Formatting" line: set options and defaults in the fixed order."""
    parts = []
    for o in all_opts(fmt):
        value = opts.get(o.name, o.default)
        if value is not None:  # commas doubled, as QEMU prints option values
            parts.append(f"{o.name}={str(value).replace(',', ',,')}")
    return f"Formatting '{filename}', fmt={fmt} " + " ".join(parts)


def _enum(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise QMPError(f"Parameter '{name}' does not accept value '{value}'")
    return value


_PREALLOC = ("off", "metadata", "falloc", "full")


def _qcow2_options(opts: dict[str, Any], size: int) -> dict[str, Any]:
    versions = {"0.10": "v2", "v2": "v2", "1.1": "v3", "v3": "v3"}
    out: dict[str, Any] = {"driver": "qcow2", "size": size}
    if "compat" in opts:
        if opts["compat"] not in versions:
            raise QMPError(f"Parameter 'version' does not accept value '{opts['compat']}'")
        out["version"] = versions[opts["compat"]]
    if "backing_file" in opts:
        out["backing-file"] = opts["backing_file"]
    if "backing_fmt" in opts:
        out["backing-fmt"] = opts["backing_fmt"]
    if "cluster_size" in opts:
        out["cluster-size"] = opts["cluster_size"]
    if "preallocation" in opts:
        out["preallocation"] = _enum("preallocation", opts["preallocation"], _PREALLOC)
    if "lazy_refcounts" in opts:
        out["lazy-refcounts"] = _bool(opts["lazy_refcounts"])
    if "refcount_bits" in opts:
        out["refcount-bits"] = opts["refcount_bits"]
    if "extended_l2" in opts:
        out["extended-l2"] = _bool(opts["extended_l2"])
    if "compression_type" in opts:
        out["compression-type"] = _enum("compression-type", opts["compression_type"],
                                        ("zlib", "zstd"))
    if "data_file_raw" in opts:
        out["data-file-raw"] = _bool(opts["data_file_raw"])
    luks_qapi(opts, "encrypt.")
    encrypt = {k[8:]: v for k, v in opts.items() if k.startswith("encrypt.")}
    if _bool(opts.get("encryption")):
        encrypt.setdefault("format", "aes")
    if encrypt:
        out["encrypt"] = encrypt
    return out


def _luks_options(opts: dict[str, Any], size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"driver": "luks", "size": size, **luks_qapi(opts, "")}
    if "key-secret" not in out:
        raise QMPError("Parameter 'key-secret' is required for cipher")
    if "preallocation" in opts:
        out["preallocation"] = _enum("preallocation", opts["preallocation"],
                                     ("off", "falloc", "full"))
    return out


_VMDK_SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                    "twoGbMaxExtentFlat", "streamOptimized")


def _vmdk_options(opts: dict[str, Any], size: int) -> dict[str, Any]:
    """qemu-img's vmdk options as ``blockdev-create`` ones, checked in QEMU's order."""
    if opts.get("backing_fmt", "vmdk") != "vmdk":
        raise QMPError("backing_file must be a vmdk image")
    out: dict[str, Any] = {"driver": "vmdk", "size": size}
    for name, key, allowed in (("adapter_type", "adapter-type",
                                ("ide", "buslogic", "lsilogic", "legacyESX")),
                               ("subformat", "subformat", _VMDK_SUBFORMATS)):
        if name in opts:
            if opts[name] not in allowed:
                raise QMPError(f"invalid parameter value: {opts[name]}")
            out[key] = opts[name]
    hw = opts.get("hwversion", "undefined")
    if _bool(opts.get("compat6")):
        if hw != "undefined":
            raise QMPError("compat6 cannot be enabled with hwversion set")
        hw = "6"
    if hw != "undefined":
        out["hwversion"] = hw
    for name, key in (("backing_file", "backing-file"), ("toolsversion", "toolsversion")):
        if name in opts:
            out[key] = opts[name]
    if "zeroed_grain" in opts:
        out["zeroed-grain"] = _bool(opts["zeroed_grain"])
    return out


def _vpc_options(opts: dict[str, Any], size: int) -> dict[str, Any]:
    """qemu-img's vpc sizes: rounded up to the CHS geometry unless ``force_size``."""
    from blockd.drivers.vpc.create import chs_size

    out: dict[str, Any] = {"driver": "vpc"}
    if "subformat" in opts:
        out["subformat"] = _enum("subformat", opts["subformat"], ("dynamic", "fixed"))
    if "force_size" in opts:
        out["force-size"] = _bool(opts["force_size"])
    try:
        out["size"] = chs_size(size, out.get("force-size", False))
    except QMPError:
        raise QMPError("The image size is too large for file format 'vpc'") from None
    return out


def _vdi_options(opts: dict[str, Any], size: int) -> dict[str, Any]:
    """``static=on`` is QEMU's metadata preallocation for vdi."""
    out: dict[str, Any] = {"driver": "vdi", "size": size}
    if _bool(opts.get("static")):
        out["preallocation"] = "metadata"
    return out


def _vhdx_options(opts: dict[str, Any], size: int) -> dict[str, Any]:
    """qemu-img's vhdx sizes: log and block sizes rounded up to whole MiB, a block size
    of 0 chosen by the driver, one past the maximum lowered to it."""
    from blockd.drivers.vhdx.layout import BLOCK_SIZE_MAX

    def mib(n: int) -> int:
        return -(-n // (1 << 20)) * (1 << 20)

    out: dict[str, Any] = {"driver": "vhdx", "size": size}
    if "log_size" in opts:
        out["log-size"] = mib(opts["log_size"])
    block = mib(opts.get("block_size", 0))
    if block:
        out["block-size"] = min(block, BLOCK_SIZE_MAX)
    if "subformat" in opts:
        out["subformat"] = _enum("subformat", opts["subformat"], ("dynamic", "fixed"))
    if "block_state_zero" in opts:
        out["block-state-zero"] = _bool(opts["block_state_zero"])
    return out


def _qed_options(opts: dict[str, Any], size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"driver": "qed", "size": size}
    for name, key in (("backing_file", "backing-file"), ("cluster_size", "cluster-size"),
                      ("table_size", "table-size")):
        if name in opts:
            out[key] = opts[name]
    if "backing_fmt" in opts:
        from blockd.qmp.schema import load

        load().validate_type("BlockdevDriver", opts["backing_fmt"], "backing-fmt")
        out["backing-fmt"] = opts["backing_fmt"]
    return out


def _qcow_options(opts: dict[str, Any], size: int) -> dict[str, Any]:
    """qemu-img's qcow options: ``encryption=on`` is ``encrypt.format=aes``, the QAPI
    crypto format ``qcow``; the backing format is not stored (qcow has no field)."""
    out: dict[str, Any] = {"driver": "qcow", "size": size}
    if "backing_file" in opts:
        out["backing-file"] = opts["backing_file"]
    encrypt = {k[8:]: v for k, v in opts.items() if k.startswith("encrypt.")}
    if "encryption" in opts:
        if "format" in encrypt:
            raise QMPError("'encrypt.format' and its alias 'encryption' can't be used at the "
                           "same time")
        if _bool(opts["encryption"]):
            encrypt["format"] = "aes"
    if encrypt:
        if "format" not in encrypt:
            raise QMPError("Parameter 'encrypt.format' is missing")
        fmt = encrypt["format"]
        if fmt not in ("aes", "qcow", "luks"):
            raise QMPError(f"Parameter 'format' does not accept value '{fmt}'")
        encrypt["format"] = "qcow" if fmt == "aes" else fmt
        out["encrypt"] = encrypt
    return out


def _parallels_options(opts: dict[str, Any], size: int) -> dict[str, Any]:
    """qemu-img rounds the cluster size up to whole sectors, silently."""
    cluster = opts.get("cluster_size", 1 << 20)
    return {"driver": "parallels", "size": size, "cluster-size": -(-cluster // 512) * 512}


#: Each format's ``-o`` options to ``blockdev-create`` options, and the module that creates.
_BUILDERS = {"qcow2": _qcow2_options, "luks": _luks_options, "vpc": _vpc_options,
             "vdi": _vdi_options, "vmdk": _vmdk_options, "vhdx": _vhdx_options,
             "qed": _qed_options, "qcow": _qcow_options, "parallels": _parallels_options}
_CREATORS = {"qcow2": "blockd.drivers.qcow2.create", "luks": "blockd.drivers.luks",
             "vpc": "blockd.drivers.vpc.create", "vdi": "blockd.drivers.vdi.create",
             "vmdk": "blockd.drivers.vmdk.create", "vhdx": "blockd.drivers.vhdx.create",
             "qed": "blockd.drivers.qed.create", "qcow": "blockd.drivers.qcow.create",
             "parallels": "blockd.drivers.parallels.create"}
#: The formats whose ``-o preallocation`` goes to the (empty) file they are written on:
#: qemu-img hands the protocol only the options the format does not take.
_FILE_PREALLOC = ("vpc", "vdi", "vhdx", "qed", "qcow", "parallels")
#: The formats whose failed creation leaves the file as far as it got, as qemu-img does.
_KEEP_FAILED = ("vhdx",)


def _file_prealloc(value: str) -> str:
    """A ``preallocation`` the protocol takes, checked with qemu-img's messages."""
    if value not in _PREALLOC:
        raise QMPError(f"invalid parameter value: {value}")
    if value == "metadata":
        raise QMPError("Unsupported preallocation mode: metadata")
    return value


async def _backing_size(session: Session, filename: str, opts: dict[str, Any],
                        size: int | None, unsafe: bool) -> int | None:
    """Check the backing file as qemu-img does; its size when none was given."""
    backing = opts.get("backing_file")
    if backing is None:  # a lone backing format is the driver's to refuse
        return size
    if backing == filename:  # compared as strings, as qemu-img does
        raise ImgError(f"{filename}: Error: Trying to create an image with the same filename "
                       "as the backing file")
    if not backing:
        raise ImgError(f"{filename}: Expected backing file name, got empty string")
    if unsafe and size is not None:
        return size
    try:
        path = backing_path(filename, backing)
    except QMPError as exc:
        raise ImgError(f"{filename}: {exc.desc}") from None
    fmt = opts.get("backing_fmt")
    if fmt is None:
        try:
            detected = await session.detect(path)
        except ImgError as exc:
            raise ImgError(f"{filename}: {exc}\nCould not open backing image.") from None
        raise ImgError(f"{filename}: Backing file specified without backing format\n"
                       f"Detected format of {detected}.", newline=False)
    try:
        base = await session.open(path, fmt, force_share=True, wrap=False)
    except ImgError as exc:
        raise ImgError(f"{filename}: {exc}\nCould not open backing image.") from None
    if size is None:
        size = base.length()
    await session.graph.delete_node(base)
    return size


def _allocate_first_block(filename: str, size: int) -> None:
    """Give a sparse raw image its first block, as QEMU does (for O_DIRECT alignment probing).

    Done so a new image maps like one qemu-img made: 4 KiB of data, then a hole.
    """
    fd = os.open(filename, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(min(size, 4096)), 0)
    finally:
        os.close(fd)


async def create_image(session: Session, filename: str, fmt: str, size: int | None,
                       opts: dict[str, Any], *, unsafe: bool = False,
                       quiet: bool = True, context: str = "",
                       name_too_large: bool = False) -> None:
    """Create ``filename``, printing the "Formatting" line unless ``quiet``.

    Errors in the option syntax stop before that line; the drivers' own
    checks (cluster size, enum values, secrets) come after it, as in qemu-img,
    and are reported after ``filename: `` and ``context``.  ``name_too_large``:
    a size the format cannot address is reported as ``qemu-img create`` does.
    """
    from blockd.drivers import file as file_driver

    if fmt not in FORMATS:
        raise ImgError(f"{filename}: {_unknown(fmt)}")
    try:
        path = create_path(filename)
    except QMPError as exc:
        raise ImgError(f"{filename}: {exc.desc}") from None
    opts = dict(opts)
    if "size" in opts:
        if size is not None:
            raise ImgError(f"{filename}: The image size must be specified only once")
        size = opts.pop("size")
    size = await _backing_size(session, filename, opts, size, unsafe)
    if size is None:
        raise ImgError(f"{filename}: Image creation needs a size parameter")
    if not quiet:
        print(formatting_line(filename, fmt, {**opts, "size": size}), flush=True)
    file_opts: dict[str, Any] = {"driver": "file", "filename": path, "size": 0}
    created = False
    try:
        if fmt == "raw":
            prealloc = opts.get("preallocation", "off")
            if prealloc not in ("off", "falloc", "full"):
                raise QMPError(f"invalid parameter value: {prealloc}")
            file_opts.update(size=size, preallocation=prealloc)
            await file_driver.create(session.graph, file_opts)
            if prealloc == "off" and size:
                _allocate_first_block(path, size)
            return
        size = -(-size // 512) * 512  # format drivers work in whole sectors
        options = _BUILDERS[fmt](opts, size)
        if fmt in _FILE_PREALLOC and "preallocation" in opts:
            file_opts["preallocation"] = _file_prealloc(opts["preallocation"])
        await file_driver.create(session.graph, file_opts)
        created = True
        if "data_file" in opts:
            data = opts["data_file"]
            await file_driver.create(session.graph, {"driver": "file", "filename": data,
                                                     "size": 0})
            options["data-file"] = {"driver": "file", "filename": data}
        options["file"] = {"driver": "file", "filename": path}
        if fmt == "vmdk":
            from blockd.drivers.vmdk.create import extent_filenames

            names = extent_filenames(path, options.get("subformat", "monolithicSparse"), size)
            for name in names:
                await file_driver.create(session.graph, {"driver": "file", "filename": name,
                                                         "size": 0})
            options["extents"] = [{"driver": "file", "filename": n} for n in names]
        creator = importlib.import_module(_CREATORS[fmt])
        await creator.create(session.graph, options)
    except QMPError as exc:
        if created and fmt not in _KEEP_FAILED:  # no half-made file left behind
            os.unlink(path)
        if name_too_large and isinstance(exc, TooLarge):
            hint = " (try using a larger cluster size)" if fmt == "qcow2" else ""
            raise ImgError(f"{filename}: The image size is too large for file format "
                           f"'{fmt}'{hint}") from None
        raise ImgError(f"{filename}: {context}{exc.human()}") from None


def add_backing_options(fmt: str, opts: dict[str, Any], backing: str | None,
                        backing_fmt: str | None) -> None:
    """``-b``/``-B`` and ``-F`` as the ``backing_file``/``backing_fmt`` options they stand for,
    refused where the format has no such option."""
    names = {o.name for o in all_opts(fmt)}
    if backing is not None:
        if "backing_file" not in names:
            raise ImgError(f"Backing file not supported for file format '{fmt}'")
        opts["backing_file"] = backing
    if backing_fmt is not None:
        if "backing_fmt" not in names:
            raise ImgError(f"Backing file format not supported for file format '{fmt}'")
        opts["backing_fmt"] = backing_fmt


async def run(args: Args) -> int:
    """``create [-q] [-f fmt] [-b backing [-F fmt]] [-u] [-o options] filename [size]``."""
    fmt = args.get("f", "raw")
    text = ",".join(args.o)
    if wants_help(text):
        print(help_text(fmt, with_protocol=bool(args.rest)), end="")
        return 0
    if not args.rest:
        raise UsageError("Expecting image file name")
    filename = args.rest[0]
    size = parse_size(args.rest[1]) if len(args.rest) > 1 else None
    if len(args.rest) > 2:
        raise UsageError("Unexpected argument: " + args.rest[2])
    try:
        opts = parse_opts(fmt, text)
        add_backing_options(fmt, opts, args.get("b"), args.get("F"))
    except ImgError as exc:
        raise ImgError(f"{filename}: {exc}") from None
    async with Session(args.objects) as session:
        await create_image(session, filename, fmt, size, opts, unsafe=args.has("u"),
                           quiet=args.has("q"), name_too_large=True)
    return 0
