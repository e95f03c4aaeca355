"""Argument validation: QEMU's error texts, in the order QEMU's visitor finds them."""

from __future__ import annotations

import pytest

from blockd.errors import QMPError
from blockd.qmp.schema import load


@pytest.mark.parametrize("command, args, message", [
    ("blockdev-add", {}, "Parameter 'driver' is missing"),
    ("blockdev-add", {"driver": "nosuch"}, "Parameter 'driver' does not accept value 'nosuch'"),
    ("blockdev-add", {"driver": 5}, "Invalid parameter type for 'driver', expected: string"),
    ("blockdev-add", {"driver": "file", "read-only": "x"},
     "Invalid parameter type for 'read-only', expected: boolean"),
    ("blockdev-add", {"driver": "file", "cache": {"direct": 1}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ("blockdev-add", {"driver": "file", "cache": []},
     "Invalid parameter type for 'cache', expected: object"),
    ("blockdev-add", {"driver": "file", "filename": "x", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ("blockdev-add", {"driver": "raw", "file": 5}, "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "raw", "file": {"driver": "file"}}, "Parameter 'file.filename' is missing"),
    ("blockdev-add", {"driver": "raw", "file": {"driver": "file", "filename": "x", "locking": "bad"}},
     "Parameter 'locking' does not accept value 'bad'"),
    ("blockdev-reopen", {"options": [{"driver": "raw", "file": "f", "read-only": 3}]},
     "Invalid parameter type for 'options[0].read-only', expected: boolean"),
    ("qmp_capabilities", {"enable": ["bogus"]}, "Parameter 'null' does not accept value 'bogus'"),
    ("block_resize", {"size": 1.5}, "Invalid parameter type for 'size', expected: integer"),
    ("block_resize", {"size": True}, "Invalid parameter type for 'size', expected: integer"),
    ("object-add", {"qom-type": "nosuch", "id": "a"}, "Parameter 'qom-type' does not accept value 'nosuch'"),
    ("object-add", {"qom-type": "secret", "id": "a", "data": "x", "bogus": 1},
     "Parameter 'bogus' is unexpected"),
    # Only what blockd runs is accepted (and introspected): no other export, address or action.
    ("block-export-add", {"type": "fuse", "id": "e", "node-name": "n"},
     "Parameter 'type' does not accept value 'fuse'"),
    ("nbd-server-start", {"addr": {"type": "vsock", "data": {"cid": "1", "port": "2"}}},
     "Parameter 'type' does not accept value 'vsock'"),
    ("transaction", {"actions": [{"type": "blockdev-backup", "data": {}}]},
     "Parameter 'type' does not accept value 'blockdev-backup'"),
    ("transaction", {"actions": [{"type": "abort"}]}, "Parameter 'actions[0].data' is missing"),
    # An alternate's type error names the member alone, 'null' inside a list.
    ("blockdev-add", {"driver": "raw", "file": {"driver": "raw", "file": 5}},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": [5]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
])
def test_messages(command, args, message):
    with pytest.raises(QMPError) as info:
        load().validate(command, args)
    assert info.value.desc == message


def test_valid_arguments_pass():
    schema = load()
    schema.validate("blockdev-add", {"driver": "raw", "node-name": "r", "read-only": True,
                                     "file": {"driver": "file", "filename": "/x"}})
    schema.validate("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f0"})
    schema.validate("object-add", {"qom-type": "secret", "id": "s", "data": "x", "format": "base64"})
