"""Secret objects: every way QEMU accepts a secret, and that bytes never leak."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from blockd.errors import QMPError
from blockd.objects import ObjectStore

KEY = bytes(range(32))
IV = bytes(range(16, 32))


def _encrypt(plain: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    data = padder.update(plain) + padder.finalize()
    enc = Cipher(algorithms.AES(KEY), modes.CBC(IV)).encryptor()
    return enc.update(data) + enc.finalize()


def test_data_file_and_base64(tmp_path):
    store = ObjectStore()
    store.add({"qom-type": "secret", "id": "a", "data": "pw"})
    (tmp_path / "f").write_bytes(b"from-file\n")
    store.add({"qom-type": "secret", "id": "b", "file": str(tmp_path / "f")})
    store.add({"qom-type": "secret", "id": "c", "data": base64.b64encode(b"\x00\xffbin").decode(),
               "format": "base64"})
    store.add({"qom-type": "secret", "id": "d", "data": "YWJ", "format": "base64"})
    assert store.secret_bytes("a") == b"pw"
    assert store.secret_bytes("b") == b"from-file\n"
    assert store.secret_bytes("c") == b"\x00\xffbin"
    assert store.secret_bytes("d") == b"ab"


def test_file_is_read_once(tmp_path):
    store = ObjectStore()
    path = tmp_path / "f"
    path.write_bytes(b"first")
    store.add({"qom-type": "secret", "id": "a", "file": str(path)})
    path.write_bytes(b"second")
    assert store.secret_bytes("a") == b"first"


def test_encrypted_secret():
    store = ObjectStore()
    store.add({"qom-type": "secret", "id": "k", "format": "base64",
               "data": base64.b64encode(KEY).decode()})
    ciphertext = base64.b64encode(_encrypt(b"letmein")).decode()
    store.add({"qom-type": "secret", "id": "s", "keyid": "k", "format": "base64",
               "iv": base64.b64encode(IV).decode(), "data": ciphertext})
    assert store.secret_bytes("s") == b"letmein"


@pytest.mark.parametrize("args, message", [
    ({"keyid": "nokey", "iv": "AAAA", "data": "x"}, "No secret with id 'nokey'"),
    ({"keyid": "short", "iv": "AAAA", "data": "x"}, "Key should be 32 bytes in length"),
    ({"keyid": "k", "data": "x"}, "IV is required to decrypt secret"),
    ({"keyid": "k", "iv": "AAAA", "data": "x"}, "IV should be 16 bytes in length not 3"),
    ({"data": "a!", "format": "base64"}, "Base64 data contains invalid characters"),
    ({}, "Either 'file' or 'data' must be provided"),
    ({"data": "x", "file": "/x"}, "'file' and 'data' are mutually exclusive"),
])
def test_errors(args, message):
    store = ObjectStore()
    store.add({"qom-type": "secret", "id": "short", "data": "abc"})
    store.add({"qom-type": "secret", "id": "k", "format": "base64",
               "data": base64.b64encode(KEY).decode()})
    with pytest.raises(QMPError) as info:
        store.add({"qom-type": "secret", "id": "new", **args})
    assert info.value.desc == message


def test_secret_never_rendered():
    store = ObjectStore()
    store.add({"qom-type": "secret", "id": "a", "data": "topsecret"})
    obj = store.objects["a"]
    assert "topsecret" not in repr(obj) and "topsecret" not in str(obj.props)
    assert "topsecret" not in str(store.qom_list("/objects/a"))
