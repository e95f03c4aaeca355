"""Image names as QEMU's block layer reads them: ``json:``, protocol prefixes, NBD URIs.

qemu-img and backing file links name an image by one string.  QEMU turns
it into node options before opening anything: ``json:{...}`` holds the
options themselves (nested or with dotted keys; options given otherwise
win), a ``protocol:`` prefix chooses the storage driver (``file:``,
``nbd:``/``nbd://``, ``blkdebug:``...), which parses the rest of the
name, and anything else is a host file.  This module makes the same
options, shaped as ``blockdev-add`` takes them, with QEMU's errors for
names it refuses.  A format node whose driver is left out is probed
afterwards (:mod:`blockd.block.probe`).
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from blockd.errors import QMPError
from blockd.paths import os_path

#: QEMU 7.2's protocol prefixes and the drivers they choose.
PROTOCOLS = {
    "file": "file", "host_device": "host_device", "host_cdrom": "host_cdrom",
    "nbd": "nbd", "nbd+tcp": "nbd", "nbd+unix": "nbd",
    "blkdebug": "blkdebug", "blkverify": "blkverify",
    "null-co": "null-co", "null-aio": "null-aio",
    "http": "http", "https": "https", "ftp": "ftp", "ftps": "ftps", "ssh": "ssh",
    "gluster": "gluster", "gluster+tcp": "gluster", "gluster+unix": "gluster",
    "gluster+rdma": "gluster", "iscsi": "iscsi", "nfs": "nfs", "rbd": "rbd",
    "fat": "vvfat", "nvme": "nvme",
}
#: Drivers that open storage themselves rather than a ``file`` child; a name
#: given with one of them is that driver's to parse.
PROTOCOL_DRIVERS = frozenset(PROTOCOLS.values()) | {"quorum", "blkreplay"}
#: Drivers that keep the name as their ``filename`` option once parsed.
_KEEP_FILENAME = frozenset({"file", "host_device", "host_cdrom"})
#: Driver options QEMU takes in option strings (``json:``, ``--image-opts``) but not in
#: ``blockdev-add``, whose schema lacks them.
_RUNTIME_ONLY = {"parallels": frozenset({"prealloc-mode", "prealloc-size"})}

NBD_DEFAULT_PORT = 10809
_EXPORT_OPT = ":exportname="
#: Characters RFC 3986 allows in a URI (QEMU's parser refuses any other).
_URI_CHARS = r"[A-Za-z0-9\-._~%!$&'()*+,;=:@/?#\[\]]*\Z"


def has_protocol(name: str) -> bool:
    """Whether ``name`` starts with ``protocol:`` (a colon before any slash)."""
    return re.match(r"[^:/]*:", name) is not None


def image_options(name: str | None, options: dict[str, Any] | None = None, *,
                  typed: bool = False) -> dict[str, Any]:
    """Options for opening the image ``name`` as qemu-img does, on top of ``options``
    (``driver`` from ``-f``, or all of ``--image-opts``; nested or dotted).  A format's
    storage is its ``file`` child; without a ``driver`` the format is left to probing.
    Storage children given as strings (``typed``, and ``json:`` names) are converted
    to their types already, so that probing can open them."""
    flat: dict[str, Any] = {}
    _flatten(options or {}, "", flat)
    return _node(name, None, flat, protocol=False, typed=typed)


def backing_path(image: str, backing: str) -> str:
    """The name a backing file link means, relative to the image's own name."""
    if has_protocol(backing) or backing.startswith("/"):
        return backing
    if not image or image.startswith("json:"):
        raise QMPError(f"Cannot use relative backing file names for '{image}'")
    return _path_combine(image, backing)


def create_path(name: str) -> str:
    """The host file a new image named ``name`` is created as (only host files are)."""
    if not has_protocol(name):
        return name
    protocol = name.partition(":")[0]
    driver = _find_protocol(name)
    if driver != "file":
        raise QMPError(f"Creating images through protocol '{protocol}' is not supported "
                       "by blockd")
    out: dict[str, Any] = {}
    _strip_prefix(name, "file:", out)
    return out["filename"]


def typed_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options that may be strings (``json:`` names, ``--image-opts``) in the types the
    schema gives them, checked as QEMU checks them once every driver is known (QEMU
    accepts ``"on"`` and ``true`` alike)."""
    from blockd.keyval import typed
    from blockd.qmp.schema import load

    schema = load()
    options = typed(schema, schema.types["BlockdevOptions"], options)
    _check_node(schema, options)
    return options


def _check_node(schema: Any, options: dict[str, Any]) -> None:
    """QEMU's refusal of options a driver does not take, and of a node without the
    storage its driver needs, node by node."""
    driver = options.get("driver")
    if not isinstance(driver, str) or driver not in schema.types["BlockdevDriver"]["enum"]:
        return
    if driver in _KEEP_FILENAME and not options.get("filename"):
        raise QMPError(f"The '{driver}' block driver requires a file name")
    if driver == "blkdebug" and options.get("image") is None:
        raise QMPError('A block device must be specified for "image"')
    union = schema.types["BlockdevOptions"]
    known = set(union["properties"]) | _RUNTIME_ONLY.get(driver, frozenset())
    for clause in union["allOf"]:
        if clause["if"]["properties"]["driver"].get("const") == driver:
            branch = clause["then"]["$ref"].removesuffix(".json")
            known |= set(schema.types[branch].get("properties", {}))
    for key, value in options.items():
        if key not in known:
            if driver in PROTOCOL_DRIVERS:
                raise QMPError(f"Block protocol '{driver}' doesn't support the option '{key}'")
            raise QMPError(f"Block format '{driver}' does not support the option '{key}'")
        if isinstance(value, dict):
            _check_node(schema, value)


# ---- options of one node ----------------------------------------------------


def _node(name: str | None, reference: str | None, flat: dict[str, Any],
          protocol: bool, typed: bool) -> Any:
    """One node's options from its name, a node reference and dotted options,
    as QEMU's ``bdrv_open_inherit`` and ``bdrv_fill_options`` take them."""
    if reference is not None:
        if name is not None or flat:
            raise QMPError("Cannot reference an existing block device with additional "
                           "options or a new filename")
        return reference
    if name is not None and name.startswith("json:"):
        for key, value in _json_options(name).items():
            flat.setdefault(key, value)
        name = None
        typed = True
    driver = flat.get("driver")
    if not isinstance(driver, str):
        driver = None  # QEMU reads only a string here
    if driver is not None:
        from blockd.drivers import qemu_driver_names

        if driver not in qemu_driver_names():
            raise QMPError(f"Unknown driver '{driver}'")
        protocol = driver in PROTOCOL_DRIVERS
    parse = False
    if protocol and name is not None:
        if "filename" in flat:
            raise QMPError("Can't specify 'file' and 'filename' options at the same time")
        flat["filename"] = name
        parse = True
    if driver is None and protocol:
        filename = flat.get("filename")
        if not isinstance(filename, str):
            raise QMPError("Must specify either driver or file")
        driver = flat["driver"] = _find_protocol(filename) if parse else "file"
    if parse:
        assert driver is not None and name is not None  # a protocol with a file name
        _parse_filename(driver, name, flat)
    children: dict[str, Any] = {}
    if driver == "blkdebug":
        image = _child(flat.pop("x-image", None), flat, "image", True, typed)
        if image is not None:
            children["image"] = image
    if driver == "blkverify":  # the reference copy is a host file; the image under test is probed
        for key, legacy, is_protocol in (("raw", "x-raw", True), ("test", "x-image", False)):
            child = _child(flat.pop(legacy, None), flat, key, is_protocol, typed)
            if child is not None:
                children[key] = child
    if not protocol:
        file = _child(name, flat, "file", True, typed)
        if file is not None:
            children["file"] = file
        elif driver is None:
            raise QMPError("Must specify either driver or file")
        else:
            raise QMPError('A block device must be specified for "file"')
        # Other children given by options are read the same way (a backing image's
        # format is probed, a data file's storage is a host file unless it says).
        for key, is_protocol in (("backing", False), ("data-file", True)):
            if flat.get(key, "") is not None:
                child = _child(None, flat, key, is_protocol, typed)
                if child is not None:
                    children[key] = child
    out = _nest(flat)
    out.update(children)
    return typed_options(out) if typed and protocol else out


def _child(name: str | None, flat: dict[str, Any], key: str, protocol: bool,
           typed: bool) -> Any:
    """The child ``key`` of a node: from a name, ``key.*`` options or a reference."""
    prefix = key + "."
    sub = {k[len(prefix):]: flat.pop(k) for k in [k for k in flat if k.startswith(prefix)]}
    reference = flat.pop(key, None)
    if not isinstance(reference, str):
        reference = None  # only a string names a node; QEMU ignores anything else here
    if name is None and reference is None and not sub:
        return None
    return _node(name, reference, sub, protocol=protocol, typed=typed)


def _find_protocol(name: str) -> str:
    if not has_protocol(name):
        return _plain_protocol(name)
    protocol = name.partition(":")[0][:127]
    driver = PROTOCOLS.get(protocol)
    if driver is None:
        raise QMPError(f"Unknown protocol '{protocol}'")
    return driver


def _parse_filename(driver: str, name: str, flat: dict[str, Any]) -> None:
    """The driver's own reading of a name given with it (QEMU's ``bdrv_parse_filename``)."""
    if driver in _KEEP_FILENAME:
        _strip_prefix(name, f"{driver}:", flat)
    elif driver == "nbd":
        _parse_nbd(name, flat)
    elif driver == "blkdebug":
        _parse_blkdebug(name, flat)
    elif driver == "blkverify":
        _parse_blkverify(name, flat)
    elif driver in ("null-co", "null-aio"):
        if name != f"{driver}://":
            raise QMPError(f"The only allowed filename for this driver is '{driver}://'")
    if driver not in _KEEP_FILENAME:
        flat.pop("filename", None)


def _strip_prefix(name: str, prefix: str, flat: dict[str, Any]) -> None:
    """``file:x`` names the file ``x``; ``./`` keeps a colon in it from reading as a prefix."""
    if name.startswith(prefix):
        rest = name[len(prefix):]
        flat["filename"] = "./" + rest if has_protocol(rest) else rest


def _parse_blkdebug(name: str, flat: dict[str, Any]) -> None:
    """``blkdebug:[CONFIG]:IMAGE``; without the prefix the whole name is the image."""
    if not name.startswith("blkdebug:"):
        flat["x-image"] = name
        return
    config, colon, image = name[len("blkdebug:"):].partition(":")
    if not colon:
        raise QMPError("blkdebug requires both config file and image path")
    if config:
        flat["config"] = config
    flat["x-image"] = image


def _parse_blkverify(name: str, flat: dict[str, Any]) -> None:
    """``blkverify:RAW:IMAGE``: a raw reference copy and the image checked against it."""
    if not name.startswith("blkverify:"):
        raise QMPError("File name string must start with 'blkverify:'")
    raw, colon, image = name[len("blkverify:"):].partition(":")
    if not colon:
        raise QMPError("blkverify requires raw copy and original image path")
    flat["x-raw"] = raw
    flat["x-image"] = image


# ---- NBD ----------------------------------------------------------------------


def _parse_nbd(name: str, flat: dict[str, Any]) -> None:
    """``nbd[+tcp|+unix]://`` URIs and the legacy ``nbd:HOST:PORT`` / ``nbd:unix:PATH``
    forms, each with an optional export name, into the nbd driver's options."""
    for key in flat:
        if key in ("host", "port", "path", "export") or key.startswith("server."):
            raise QMPError(f"Option '{key}' cannot be used with a file name")
    server: dict[str, str] | None
    if "://" in name:
        try:
            server, export = _nbd_uri(name)
        except ValueError:
            raise QMPError("No valid URL specified") from None
    else:
        server, export = _nbd_legacy(name)
    if export is not None:
        flat["export"] = export
    if server is None:
        raise QMPError("NBD server address missing")
    flat["server"] = server


def _nbd_uri(name: str) -> tuple[dict[str, str], str | None]:
    import urllib.parse

    if not re.match(_URI_CHARS, name):
        raise ValueError(name)
    scheme, _, rest = name.partition("://")
    if scheme not in ("nbd", "nbd+tcp", "nbd+unix"):
        raise ValueError(scheme)
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    path = urllib.parse.unquote(slash + path)
    export = path[1:] if path.startswith("/") else path
    params = [p for p in re.split(r"[&;]", query) if p] if query else []
    host, port = _uri_server(netloc.rpartition("@")[2])
    if scheme == "nbd+unix":
        if host or port is not None or len(params) != 1:
            raise ValueError(name)
        key, eq, value = params[0].partition("=")
        if urllib.parse.unquote(key) != "socket" or not eq:
            raise ValueError(name)
        server = {"type": "unix", "path": urllib.parse.unquote(value)}
    else:
        if not host or params:
            raise ValueError(name)
        server = {"type": "inet", "host": host, "port": str(port or NBD_DEFAULT_PORT)}
    return server, export or None


def _uri_server(netloc: str) -> tuple[str, int | None]:
    """Host (unescaped, IPv6 brackets dropped) and port of a URI's authority."""
    import urllib.parse

    m = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]*)(?::(\d*))?", netloc)
    if m is None:
        raise ValueError(netloc)
    host = m.group(1)
    host = host[1:-1] if host.startswith("[") else urllib.parse.unquote(host)
    port = m.group(2)
    if port is None or port == "":
        return host, None
    if int(port) > 65535:
        raise ValueError(port)
    return host, int(port)


def _nbd_legacy(name: str) -> tuple[dict[str, str] | None, str | None]:
    export = None
    at = name.find(_EXPORT_OPT)
    if at >= 0:
        export = name[at + len(_EXPORT_OPT):]
        if not export:
            return None, None
        name = name[:at]
    if not name.startswith("nbd:"):
        raise QMPError("File name string for NBD must start with 'nbd:'")
    spec = name[len("nbd:"):]
    if not spec:
        return None, export
    if spec.startswith("unix:"):
        return {"type": "unix", "path": spec[len("unix:"):]}, export
    host, port = _inet_parse(spec)
    return {"type": "inet", "host": host, "port": port}, export


def _inet_parse(spec: str) -> tuple[str, str]:
    """QEMU's ``host:port[,option...]`` address syntax; the options are checked only."""
    if spec.startswith(":"):
        m = re.match(r":([^,]{1,32})", spec)
        if m is None:
            raise QMPError(f"error parsing port in address '{spec}'")
        host, port = "", m.group(1)
    elif spec.startswith("["):
        m = re.match(r"\[([^\]]{1,64})\]:([^,]{1,32})", spec)
        if m is None:
            raise QMPError(f"error parsing IPv6 address '{spec}'")
        host, port = m.group(1), m.group(2)
    else:
        m = re.match(r"([^:]{1,64}):([^,]{1,32})", spec)
        if m is None:
            raise QMPError(f"error parsing address '{spec}'")
        host, port = m.group(1), m.group(2)
    _inet_options(spec[m.end():])
    return host, port


def _inet_options(opts: str) -> None:
    at = opts.find(",to=")
    if at >= 0 and re.match(r"[+-]?\d+", opts[at + 4:].lstrip()) is None:
        raise QMPError("error parsing to= argument")
    for flag in ("ipv4", "ipv6", "keep-alive", "mptcp"):
        at = opts.find("," + flag)
        if at < 0:
            continue
        rest = opts[at + len(flag) + 1:]
        comma = rest.find(",")
        if comma >= 0 and rest[comma + 1:comma + 2] == ",":
            raise QMPError(f"error parsing '{flag}' flag '{rest}'")
        value = rest if comma < 0 else rest[:comma]
        if value not in ("", "=on", "=off"):
            raise QMPError(f"error parsing '{flag}' flag '{rest}'")


# ---- json: ------------------------------------------------------------------------


def _json_options(name: str) -> dict[str, Any]:
    """The options of a ``json:`` name, flattened to dotted keys as QEMU does."""
    from blockd.qjson import JSONStreamer

    streamer = JSONStreamer()
    messages = streamer.feed(os.fsencode(name[len("json:"):])) + streamer.end()
    result: Any = None
    found = False
    error = None
    for value, desc in messages:
        if error is not None:
            break
        if found:
            error = "Expecting at most one JSON value"
        elif desc is not None:
            error = desc
        else:
            result, found = value, True
    if error is None and not found:
        error = "Expecting a JSON value"
    if error is not None:
        raise QMPError(f"Could not parse the JSON options: {error}")
    if not isinstance(result, dict):
        raise QMPError("Invalid JSON object given")
    flat: dict[str, Any] = {}
    _flatten(result, "", flat)
    return flat


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    items = value.items() if isinstance(value, dict) else \
        ((str(i), v) for i, v in enumerate(value))
    for key, item in items:
        if isinstance(item, (dict, list)) and item:
            _flatten(item, f"{prefix}{key}.", out)
        else:
            out[prefix + key] = item


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys into nested options (numeric keys make lists), as ``blockdev-add``
    takes them."""
    if not any("." in key for key in flat):
        return flat
    from blockd.keyval import nest

    return nest(flat)


def _path_combine(base: str, name: str) -> str:
    """``name`` in the directory of ``base`` (a protocol prefix of ``base`` is kept)."""
    start = base.index(":") + 1 if has_protocol(base) else 0
    slash = base.rfind("/") + 1
    return base[:max(start, slash)] + name


def _plain_protocol(path: str) -> str:
    """The protocol driver QEMU picks for a plain file name: ``host_device`` for a
    character or block device, else ``file``."""
    try:
        mode = os.stat(os_path(path)).st_mode
    except (OSError, ValueError):
        return "file"
    return "host_device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "file"

