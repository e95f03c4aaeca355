"""User-creatable objects (``object-add``), of which blockd has ``secret``.

Secrets hold passwords and keys for encrypted images.  Their bytes are
kept only here, handed to drivers through :meth:`ObjectStore.secret_bytes`,
and never rendered in a reply, event, log line or exception text.  A
secret given as ``file`` is read once, when the object is created.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from blockd.errors import QMPError
from blockd.paths import display_path, os_path

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")

#: QOM types blockd knows, with their parents (for qom-list-types).
TYPES: dict[str, tuple[str | None, bool]] = {
    # name: (parent, abstract)
    "object": (None, True),
    "container": ("object", False),
    "secret_common": ("object", True),
    "secret": ("secret_common", False),
}

#: The properties ``qom-list`` shows for a secret, in QEMU's order.
_SECRET_PROPS = [("type", "string"), ("iv", "string"), ("keyid", "string"), ("loaded", "bool"),
                 ("format", "QCryptoSecretFormat"), ("file", "string"), ("data", "string")]


_B64 = re.compile(rb"[A-Za-z0-9+/]*=*\Z")


def _b64decode(text: str | bytes) -> bytes:
    """Decode base64 as QEMU does: only the alphabet, padding optional."""
    data = text.encode() if isinstance(text, str) else text
    if not _B64.match(data):
        raise QMPError("Base64 data contains invalid characters")
    data = data.rstrip(b"=")
    try:
        return base64.b64decode(data + b"=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        raise QMPError("Base64 data contains invalid characters") from None


class Secret:
    """A loaded secret.  ``repr`` and ``str`` never show the payload."""

    qom_type = "secret"

    def __init__(self, obj_id: str, props: dict[str, Any], payload: bytes) -> None:
        self.id = obj_id
        self.props = props
        self._payload = payload

    @property
    def payload(self) -> bytes:
        return self._payload

    def __repr__(self) -> str:
        return f"<Secret {self.id!r}>"


class ObjectStore:
    """The ``/objects`` container."""

    def __init__(self) -> None:
        self.objects: dict[str, Secret] = {}

    def add(self, args: dict[str, Any]) -> None:
        """``object-add`` after schema validation (qom-type is ``secret``)."""
        obj_id = args["id"]
        if not _ID.match(obj_id):
            raise QMPError("Parameter 'id' expects an identifier")
        if obj_id in self.objects:
            raise QMPError(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
        payload = self._load_secret(args)
        props = {k: v for k, v in args.items() if k not in ("qom-type", "id", "data")}
        self.objects[obj_id] = Secret(obj_id, props, payload)

    def delete(self, obj_id: str) -> None:
        if obj_id not in self.objects:
            raise QMPError(f"object '{obj_id}' not found")
        del self.objects[obj_id]

    def secret_bytes(self, secret_id: str) -> bytes:
        """Payload of secret ``secret_id`` with QEMU's error if there is none."""
        obj = self.objects.get(secret_id)
        if obj is None:
            raise QMPError(f"No secret with id '{secret_id}'")
        return obj.payload

    def _load_secret(self, args: dict[str, Any]) -> bytes:
        data, path = args.get("data"), args.get("file")
        if data is None and path is None:
            raise QMPError("Either 'file' or 'data' must be provided")
        if data is not None and path is not None:
            raise QMPError("'file' and 'data' are mutually exclusive")
        if path is not None:
            try:
                with open(os_path(path), "rb") as f:
                    raw = f.read()
            except OSError as exc:
                raise QMPError(f"Unable to read {path}: Failed to open file "
                               f"\u201c{display_path(path)}\u201d: {exc.strerror}") from None
        else:
            assert data is not None  # one of the two, checked above
            raw = data.encode("utf-8")
        if args.get("format", "raw") == "base64":
            raw = _b64decode(raw)
        keyid = args.get("keyid")
        if keyid is not None:
            raw = self._decrypt(raw, keyid, args.get("iv"))
        return raw

    def _decrypt(self, ciphertext: bytes, keyid: str, iv_b64: str | None) -> bytes:
        """AES-256-CBC with PKCS#7 padding under another secret's key, as QEMU does."""
        key = self.secret_bytes(keyid)
        if len(key) != 32:
            raise QMPError("Key should be 32 bytes in length")
        if iv_b64 is None:
            raise QMPError("IV is required to decrypt secret")
        iv = _b64decode(iv_b64)
        if len(iv) != 16:
            raise QMPError(f"IV should be 16 bytes in length not {len(iv)}")
        if not ciphertext or len(ciphertext) % 16:
            raise QMPError(f"Length {len(ciphertext)} must be a multiple of block size 16")
        # Imported here: only encrypted secrets need it, and it costs every start-up.
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        plain = dec.update(ciphertext) + dec.finalize()
        pad = plain[-1]
        if pad > 16:
            raise QMPError(f"Incorrect number of padding bytes ({pad}) found on decrypted data")
        return plain[:-pad] if pad else plain

    # ---- QOM views --------------------------------------------------------

    def qom_list(self, path: str) -> list[dict[str, str]]:
        parts = [p for p in path.split("/") if p]
        if not parts:
            return [{"name": "type", "type": "string"},
                    {"name": "objects", "type": "child<container>"},
                    {"name": "chardevs", "type": "child<container>"}]
        if parts == ["objects"]:
            return [{"name": "type", "type": "string"}] + [
                {"name": oid, "type": f"child<{obj.qom_type}>"} for oid, obj in self.objects.items()]
        if parts == ["chardevs"]:
            return [{"name": "type", "type": "string"}]
        if len(parts) == 2 and parts[0] == "objects" and parts[1] in self.objects:
            return [{"name": n, "type": t} for n, t in _SECRET_PROPS]
        raise QMPError(f"Device '{path}' not found", "DeviceNotFound")

    @staticmethod
    def list_types(implements: str | None, abstract: bool) -> list[dict[str, Any]]:
        def ancestors(name: str) -> list[str]:
            out = []
            cur: str | None = name
            while cur is not None:
                out.append(cur)
                cur = TYPES[cur][0]
            return out

        result = []
        for name, (parent, is_abstract) in TYPES.items():
            if is_abstract and not abstract:
                continue
            if implements is not None and implements not in ancestors(name):
                continue
            entry: dict[str, Any] = {"name": name}
            if is_abstract:
                entry["abstract"] = True
            if parent is not None:
                entry["parent"] = parent
            result.append(entry)
        return result
