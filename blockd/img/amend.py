"""``amend``: change options of an existing image in place.

The ``-o`` text is checked against the format's amendable options (an
option that only ``create`` knows gets qemu-img's hint); qcow2's own
options go to :func:`blockd.drivers.qcow2.amend.amend_options`, key slot
options (``encrypt.*`` for qcow2, bare for raw LUKS) to the node's
``amend(opts, secret, force)``, the same method ``blockdev-amend`` uses.
"""

from __future__ import annotations

from typing import Any

from blockd.drivers.qcow2.amend import BACKING_REFUSED, amend_options
from blockd.drivers.qcow2.driver import Qcow2Node
from blockd.errors import QMPError
from blockd.img.common import (PROG, Args, ImgError, Progress, Session, UsageError, cache_mode,
                               fail)
from blockd.img.create import FORMATS, Opt, _convert, split_opts

_KEYSLOT = [
    Opt("iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    Opt("keyslot", "num", "Select a single keyslot to modify explicitly"),
    Opt("new-secret", "str", "New secret to set in the matching keyslots. Empty string to erase"),
    Opt("old-secret", "str", "Select all keyslots that match this password"),
    Opt("state", "str", "Select new state of affected keyslots (active/inactive)"),
]
_QCOW2_NAMES = ("backing_file", "backing_fmt", "compat", "data_file", "data_file_raw",
                "lazy_refcounts", "refcount_bits", "size")

#: Amendable options per format, as ``-o help`` lists them.
AMEND: dict[str, list[Opt]] = {
    "qcow2": sorted([o for o in FORMATS["qcow2"] if o.name in _QCOW2_NAMES]
                    + [Opt("encrypt." + o.name, o.kind, o.help) for o in _KEYSLOT],
                    key=lambda o: o.name),
    "luks": _KEYSLOT,
}
_TYPE_NAMES = {"str": "<str>", "size": "<size>", "bool": "<bool (on/off)>", "num": "<num>"}


def help_text(fmt: str) -> str:
    if fmt not in AMEND:
        raise ImgError(f"Format driver '{fmt}' does not support option amendment")
    lines = [f"Amend options for '{fmt}':"]
    lines += [f"  {o.name + '=' + _TYPE_NAMES[o.kind]:<22} - {o.help}" for o in AMEND[fmt]]
    return "\n".join(lines) + "\n"


def parse(fmt: str, text: str) -> dict[str, Any]:
    """``-o`` text -> typed values; creation-only options are refused with a hint."""
    table = {o.name: o for o in AMEND[fmt]}
    out: dict[str, Any] = {}
    for item in filter(None, split_opts(text)):
        key, _, value = item.partition("=")
        opt = table.get(key)
        if opt is None:
            if any(o.name == key for o in FORMATS.get(fmt, [])):
                raise ImgError(f"Invalid parameter '{key}'\n"
                               "This option is only supported for image creation")
            raise ImgError(f"Invalid parameter '{key}'")
        value = _convert(opt, value)
        out[key] = value if opt.kind != "bool" else value in ("on", "yes", "true", "y")
    return out


def _keyslot_options(opts: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    """The key slot part of the options in QAPI's spelling, or None if there is none."""
    slot = {k[len(prefix):]: v for k, v in opts.items()
            if k.startswith(prefix) and k[len(prefix):] in {o.name for o in _KEYSLOT}}
    if not slot:
        return None
    if "state" not in slot:
        raise ImgError("Parameter 'state' is missing")
    if slot["state"] not in ("active", "inactive"):
        raise ImgError(f"Parameter 'state' does not accept value '{slot['state']}'")
    return slot


async def run(args: Args) -> int:
    """``amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [--force] -o options
    filename``."""
    text = ",".join(args.o)
    if not args.o:
        raise UsageError("Must specify options (-o)")
    fmt = args.get("f")
    wants_help = any(item in ("help", "?") for item in split_opts(text))
    if fmt and wants_help:
        print(help_text(fmt), end="")
        return 0
    if len(args.rest) != 1:
        raise ImgError("Expecting one image file name")
    filename = args.rest[0]
    cache = cache_mode(args)
    bar = Progress(args.has("p") and not args.has("q"), 100)
    async with Session(args.objects) as session:
        node = await session.open(filename, fmt, read_only=False,
                                  image_opts=args.has("image-opts"), cache=cache)
        fmt = node.driver
        if wants_help:
            print(help_text(fmt), end="")
            return 0
        if fmt not in AMEND:
            raise ImgError(f"Format driver '{fmt}' does not support option amendment")
        opts = parse(fmt, text)
        qcow2 = node if isinstance(node, Qcow2Node) else None  # qcow2's own options
        if qcow2 is not None and any(k.startswith("encrypt.") for k in opts) \
                and not qcow2.image.header.crypt_method:
            raise ImgError("Can't amend encryption options - encryption not present")
        slot = _keyslot_options(opts, "encrypt." if fmt == "qcow2" else "")

        def status(done: int, total: int) -> None:
            bar.add(done * 100 // total - bar.done)

        try:
            if qcow2 is not None:
                own = {k: v for k, v in opts.items() if not k.startswith("encrypt.")}
                await amend_options(qcow2, own, status)
                if slot is not None:
                    await node.amend({"encrypt": {"format": "luks", **slot}},
                                     session.store.secret_bytes, args.has("force"))
            elif slot is not None:
                await node.amend(slot, session.store.secret_bytes, args.has("force"))
        except QMPError as exc:
            # qemu-img draws 100%, reports the failure, then ends the progress line.
            bar.add_percent(100.0)
            message = exc.desc
            if message == BACKING_REFUSED:
                message += f"\nYou can use '{PROG} rebase' instead."
            fail(message)
            bar.end_line()
            return 1
        bar.finish()
    return 0
