"""Differential QMP tests: the same bytes to qemu-storage-daemon and to blockd.

Each session is a list of raw writes.  Both daemons get them, one write
at a time, and every reply line must be byte-identical once the version
strings and timestamps are normalised.  Skipped when qemu-storage-daemon
is not installed.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from harness import HAVE_QSD, qsd_and_blockd

pytestmark = pytest.mark.skipif(not HAVE_QSD, reason="qemu-storage-daemon not installed")

NEG = '{"execute":"qmp_capabilities"}'


PROTOCOL = [
    '{"execute":"query-version"}',
    '{"execute":"nosuch"}',
    '{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]}}',
    '{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}, "id": "neg"}',
    NEG,
    '[1]', '{"foo":1}', '{"execute":1}', '{"execute":"query-version","arguments":[]}',
    '{"execute":"nosuch","id":[1,{"a":null}]}',
    '{"exec-oob":"query-version","id":5}',
    '{"execute":"query-version","exec-oob":"x"}',
    '{"arguments":{}}',
    '{"execute":"query-version","id":1.5}',
    '{"execute":"query-version","control":{}}',
    "{'execute':'query-version', \"id\": 'abc'}",
    '{"execute":"query-version", "id": "a/b\\u007f\\u0001\\n\\t \\ud83d\\ude00 \\u00e9"}',
    '{"execute":"query-version","id":[1e5, -0, 12345678901234567890, 1.0, 0.1, true, null, {}, []]}',
    '}', ']', '{"execute":nonsense}', '{"execute" "x"}', '{"a":1,}', '{1:2}',
    b'{"execute":"qu\xff"}', b'"\xc3\x28"', '42', '"str"',
    '{"execute":"query-version"} {"execute":"query-version","id":2}',
    '{"execute":"query-version",', '"id":"split"}',
    '{"execute":"query-version","id":"\\q"}',
    '{"execute":"query-version","id":"\\uD800"}',
    '{"execute":"query-version","id":1}}',
    b'{"execute":"query-version","id":"\xc0\x80"}',
    b'{"execute":"query-version","id":"\xed\xa0\x80"}',
    '{"execute":"query-version","id":1} junk {"execute":"query-version","id":2}',
    '[' * 1100 + ']' * 1100,
    '{"execute":"query-version","arguments":{"x":1}}',
    # Gone in 7.0 (blockdev-reopen replaced it).
    '{"execute":"x-blockdev-reopen","arguments":{"driver":"raw","node-name":"n"}}',
    '{"execute":"quit","id":"bye"}',
]


def test_protocol_errors_match_qsd(tmp_path):
    expected, actual = qsd_and_blockd(tmp_path, PROTOCOL)
    assert actual == expected


OBJECTS = [
    NEG,
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"abc"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"abc"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"s1","data":"abc!","format":"base64"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"s2","data":"abc","keyid":"nokey","iv":"AAAA"}}',
    '{"execute":"object-add","arguments":{"qom-type":"nosuch","id":"a"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"a"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"a","data":"x","file":"/etc/hostname"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"1a","data":"x"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"b","file":"/nonexist"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"c","data":"YWJj","format":"base64"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"d","data":"abc","keyid":"c"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"e","data":"abc","iv":"AAAA"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"f","data":5}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"g","data":"x","bogus":1}}',
    '{"execute":"object-add","arguments":{"id":"h","data":"x"}}',
    '{"execute":"object-del","arguments":{"id":"nosuch"}}',
    '{"execute":"qom-list","arguments":{"path":"/objects"}}',
    '{"execute":"qom-list","arguments":{"path":"/objects/s0"}}',
    '{"execute":"qom-list","arguments":{"path":"/"}}',
    '{"execute":"qom-list","arguments":{"path":"/nosuch"}}',
    '{"execute":"object-del","arguments":{"id":"c"}}',
    '{"execute":"qom-list","arguments":{"path":"/objects"}}',
    # Secrets encrypted under another secret's AES-256 key.
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"k0","format":"base64",'
    '"data":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"x1","keyid":"k0",'
    '"iv":"EBESExQVFhcYGRobHB0eHw==","data":"6Wa7U58YUl+hc//5rSKPgA=="}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"x2","keyid":"k0","format":"base64",'
    '"iv":"EBESExQVFhcYGRobHB0eHw==","data":"VM0Fc81YkYR3r8wCJFKSXg=="}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"x3","keyid":"k0","data":"6Wa7U58YUl+hc//5rSKPgA=="}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"x4","keyid":"k0","iv":"AAAA",'
    '"data":"6Wa7U58YUl+hc//5rSKPgA=="}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"x5","keyid":"k0",'
    '"iv":"EBESExQVFhcYGRobHB0eHw==","data":"AAAA"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"x6","keyid":"k0",'
    '"iv":"EBESExQVFhcYGRobHB0eHw==","data":"not base64!"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"x7","keyid":"x1",'
    '"iv":"EBESExQVFhcYGRobHB0eHw==","data":"6Wa7U58YUl+hc//5rSKPgA=="}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"x8","format":"base64","data":"YWJ"}}',
    '{"execute":"object-add","arguments":{"qom-type":"secret","id":"x9","format":"hex","data":"YWJ"}}',
]


def test_secret_objects_match_qsd(tmp_path):
    expected, actual = qsd_and_blockd(tmp_path, OBJECTS)
    assert actual == expected


def _images(work) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(work / "a.raw"), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "a.qcow2"), "64M"], check=True)


BLOCK = [
    NEG,
    '{"execute":"blockdev-add","arguments":{"driver":"nosuchdrv","node-name":"x"}}',
    '{"execute":"blockdev-add","arguments":{"node-name":"x"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"x"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"x","filename":5}}',
    '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"x","filename":"/nonexist","bogus":1}}',
    '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"x","filename":"/nonexist"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"x","filename":"TMP/a.raw","read-only":"yes"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"x","filename":"TMP/a.raw","cache":{"direct":1}}}',
    '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"x","filename":"TMP/a.raw","aio":"bad"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"x","file":{"driver":"file","filename":"TMP/a.raw","locking":"bad"}}}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"x","file":5}}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"x","file":{"driver":"file"}}}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"x","file":"nonode"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"f0","filename":"TMP/a.qcow2"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q0","file":"f0"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q1","file":"f0"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r1","file":"f0"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q0","file":"f0"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"1bad","file":"f0"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"a$b","file":"f0"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","file":"f0"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"' + "a" * 40 + '","file":"f0"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r2","file":"f0","detect-zeroes":"unmap"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r2","file":"f0","force-share":true}}',
    '{"execute":"blockdev-del","arguments":{"node-name":"f0"}}',
    '{"execute":"blockdev-del","arguments":{"node-name":"nosuch"}}',
    '{"execute":"query-named-block-nodes","arguments":{"flat":true}}',
    '{"execute":"query-block"}',
    '{"execute":"block_resize","arguments":{"node-name":"x","size":"abc"}}',
    '{"execute":"block_resize","arguments":{"device":"f0","size":2097152}}',
    '{"execute":"block_resize","arguments":{"size":2097152}}',
    '{"execute":"block_resize","arguments":{"node-name":"f0","size":-1}}',
    '{"execute":"block_resize","arguments":{"node-name":"f0","size":2097152}}',
    '{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"nosuch","file":"f0"}]}}',
    '{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","file":"f0"}]}}',
    '{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"r1","file":"f0","read-only":3}]}}',
    '{"execute":"blockdev-del","arguments":{"node-name":"r1"}}',
    '{"execute":"blockdev-del","arguments":{"node-name":"q0"}}',
    '{"execute":"blockdev-del","arguments":{"node-name":"f0"}}',
    '{"execute":"query-named-block-nodes"}',
]


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_block_graph_errors_match_qsd(tmp_path):
    expected, actual = qsd_and_blockd(tmp_path, BLOCK, _images)
    assert actual == expected


#: The graph session again with raw in place of qcow2, plus null-co names,
#: stats, reopen and blockdev-create for files.
RAW_BLOCK = [w.replace('"qcow2"', '"raw"') for w in BLOCK] + [
    '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","size":1048576}}',
    '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n1","latency-ns":5}}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"w0","offset":512,'
    '"file":{"driver":"file","filename":"TMP/a.qcow2"}}}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r9","file":{"driver":"file",'
    '"filename":"TMP/a.raw","cache":{"direct":false,"no-flush":true}},"detect-zeroes":"on"}}',
    '{"execute":"query-named-block-nodes"}',
    '{"execute":"query-blockstats","arguments":{"query-nodes":true}}',
    '{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"r9",'
    '"file":"nosuch","read-only":true}]}}',
    '{"execute":"blockdev-create","arguments":{"job-id":"j","options":{"driver":"file",'
    '"filename":"TMP/c.raw","size":1048576}}}',
    '{"execute":"query-jobs"}',
    '{"execute":"job-dismiss","arguments":{"id":"j"}}',
    '{"execute":"blockdev-create","arguments":{"job-id":"j2","options":{"driver":"file",'
    '"filename":"/nonexist/c.raw","size":1048576}}}',
    '{"execute":"query-jobs"}',
    '{"execute":"job-dismiss","arguments":{"id":"j2"}}',
]


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_raw_graph_session_matches_qsd(tmp_path):
    expected, actual = qsd_and_blockd(tmp_path, RAW_BLOCK, _images)
    assert actual == expected


def _add(args: str) -> str:
    return '{"execute":"blockdev-add","arguments":{%s}}' % args


_RAW_FILE = '"file":{"driver":"file","filename":"TMP/a.raw"'
#: Options QEMU refuses with its own words: files without a size, empty cache objects,
#: pr-manager ids, raw windows.
OPTION_ERRORS = [NEG] + [_add(a) for a in [
    '"driver":"file","node-name":"a","filename":"/proc/self/mem"',
    '"driver":"file","node-name":"a","filename":"/proc/self/status","read-only":true',
    '"driver":"file","node-name":"a","filename":"TMP/a.raw","cache":{}',
    '"driver":"raw","node-name":"a","cache":{},' + _RAW_FILE + '}',
    '"driver":"raw","node-name":"a",' + _RAW_FILE + ',"cache":{}}',
    '"driver":"raw","node-name":"a","cache":{"direct":false},' + _RAW_FILE + ',"cache":{}}',
    '"driver":"raw","node-name":"a","cache":{},"file":{"driver":"file","filename":"/nonexist"}',
    '"driver":"null-co","node-name":"a","cache":{}',
    '"driver":"blkdebug","node-name":"a","cache":{},"image":{"driver":"null-co"}',
    '"driver":"file","node-name":"a","filename":"TMP/a.raw","pr-manager":"s"',
    '"driver":"file","node-name":"a","filename":"/nonexist","pr-manager":"s0"',
    '"driver":"raw","node-name":"a","offset":-1,' + _RAW_FILE + '}',
    '"driver":"raw","node-name":"a","size":-512,"offset":-1,' + _RAW_FILE + '}',
    '"driver":"raw","node-name":"a","offset":-1,"file":"nosuch"',
    '"driver":"raw","node-name":"a","size":1000,' + _RAW_FILE + '}',
    '"driver":"raw","node-name":"a","offset":2097152,"size":512,' + _RAW_FILE + '}',
    '"driver":"raw","node-name":"a","offset":512,"size":1048576,' + _RAW_FILE + '}',
]]
OPTION_ERRORS.insert(10, '{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0",'
                         '"data":"x"}}')


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_option_errors_match_qsd(tmp_path):
    expected, actual = qsd_and_blockd(tmp_path, OPTION_ERRORS, _images)
    assert actual == expected
    assert not any("Internal error" in line for line in actual)


NBD = [
    '{"execute":"qmp_capabilities"}',
    '{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r0","file":{"driver":"file","filename":"TMP/a.raw"}}}',
    '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","read-only":true}}',
    '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e0","node-name":"r0"}}',
    '{"execute":"nbd-server-stop"}',
    '{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"TMP/n.sock"}}}}',
    '{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"TMP/n.sock"}}}}',
    '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e0","node-name":"r0","writable":true,"description":"hello"}}',
    '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e0","node-name":"r0"}}',
    '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e1","node-name":"r0"}}',
    '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e2","node-name":"nosuch"}}',
    '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e3","node-name":"n0","writable":true}}',
    '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e4","node-name":"n0","name":"r0"}}',
    '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e5","node-name":"n0","name":"other","bitmaps":["b"]}}',
    '{"execute":"block-export-add","arguments":{"type":"bad","id":"e6","node-name":"n0"}}',
    '{"execute":"block-export-add","arguments":{"type":"nbd","id":"1bad","node-name":"n0"}}',
    '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e7","node-name":"n0","name":"x7","allocation-depth":true,"writethrough":true}}',
    '{"execute":"query-block-exports"}',
    '{"execute":"blockdev-del","arguments":{"node-name":"r0"}}',
    '{"execute":"block-resize","arguments":{"node-name":"r0","size":1024}}',
    '{"execute":"block_resize","arguments":{"node-name":"r0","size":8388608}}',
    '{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"r0","file":"#x","read-only":true}]}}',
    '{"execute":"block-export-del","arguments":{"id":"nosuch"}}',
    '{"execute":"block-export-del","arguments":{"id":"e7"}}',
    '{"execute":"block-export-del","arguments":{"id":"e7"}}',
    '{"execute":"block-export-del","arguments":{"id":"e1","mode":"hard"}}',
    '{"execute":"query-block-exports"}',
    '{"execute":"nbd-server-add","arguments":{"device":"n0","name":"legacy"}}',
    '{"execute":"nbd-server-remove","arguments":{"name":"legacy"}}',
    '{"execute":"nbd-server-remove","arguments":{"name":"legacy"}}',
    '{"execute":"nbd-server-stop"}',
    '{"execute":"query-block-exports"}',
    '{"execute":"nbd-server-stop"}',
]


def test_nbd_export_session_matches_qsd(tmp_path):
    expected, actual = qsd_and_blockd(tmp_path, NBD, _images)
    assert actual == expected


BITMAPS = [
    '{"execute":"qmp_capabilities"}',
    '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","size":16777216}}',
    '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q0","file":{"driver":"file","filename":"TMP/bm.qcow2"}}}',
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"b0"}}',
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"b0"}}',
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":""}}',
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"g","granularity":1000}}',
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"g","granularity":256}}',
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"g","granularity":4294967296}}',
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"g","granularity":2147483648}}',
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"p","persistent":true}}',
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"nosuch","name":"p"}}',
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"q0","name":"qp","persistent":true}}',
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"q0","name":"qd","disabled":true,"granularity":65536}}',
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"q0","name":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}',
    '{"execute":"query-named-block-nodes","arguments":{"flat":true}}',
    '{"execute":"block-dirty-bitmap-remove","arguments":{"node":"n0","name":"zz"}}',
    '{"execute":"block-dirty-bitmap-clear","arguments":{"node":"n0","name":"b0"}}',
    '{"execute":"block-dirty-bitmap-disable","arguments":{"node":"n0","name":"b0"}}',
    '{"execute":"block-dirty-bitmap-enable","arguments":{"node":"n0","name":"b0"}}',
    '{"execute":"block-dirty-bitmap-merge","arguments":{"node":"n0","target":"b0","bitmaps":["g",{"node":"q0","name":"qd"}]}}',
    '{"execute":"block-dirty-bitmap-merge","arguments":{"node":"n0","target":"b0","bitmaps":["zz"]}}',
    '{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"n0","name":"b0"}}',
    '{"execute":"transaction","arguments":{"actions":[{"type":"block-dirty-bitmap-add","data":{"node":"n0","name":"t1"}},{"type":"block-dirty-bitmap-add","data":{"node":"n0","name":"b0"}}]}}',
    '{"execute":"transaction","arguments":{"actions":[{"type":"block-dirty-bitmap-add","data":{"node":"n0","name":"t1"}},{"type":"block-dirty-bitmap-clear","data":{"node":"n0","name":"b0"}}]}}',
    '{"execute":"transaction","arguments":{"actions":[{"type":"abort","data":{}}]}}',
    '{"execute":"block-dirty-bitmap-remove","arguments":{"node":"q0","name":"qp"}}',
    '{"execute":"block-dirty-bitmap-remove","arguments":{"node":"n0","name":"b0"}}',
    '{"execute":"query-named-block-nodes","arguments":{"flat":true}}',
]


def _bitmap_images(work) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k",
                    str(work / "bm.qcow2"), "16M"], check=True)


def test_bitmap_session_matches_qsd(tmp_path):
    expected, actual = qsd_and_blockd(tmp_path, BITMAPS, _bitmap_images)
    assert actual == expected
