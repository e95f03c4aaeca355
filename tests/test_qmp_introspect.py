"""``query-qmp-schema`` tells the truth: compared with qemu-storage-daemon's, entity by entity.

QEMU masks its type names (``"arg-type": "29"``), so the two answers are
compared structurally: starting from each command and event, both schemas
are walked in step and every member, type, optionality, variant, enum
value and feature must agree.  blockd may leave out what it does not run
(union variants, enum values, whole commands); anything else it lacks or
adds is listed below with the reason.  A libvirt-style probe then asks
both daemons the questions libvirt asks and requires the same answers for
what blockd implements and a "no" for what it does not.
"""

from __future__ import annotations

import subprocess
from typing import Any

import jsonschema
import pytest

from blockd.qmp.registry import load_all
from blockd.qmp.schema import load
from harness import HAVE_QSD, Daemon

Schema = dict[str, dict[str, Any]]

#: Optional members qsd accepts that blockd does not: (blockd type, member) -> why.
OMITTED_MEMBERS: dict[tuple[str, str], str] = {}

#: Members blockd accepts beyond QEMU's: (blockd type, member) -> why.
EXTENSIONS = {
    ("BlockdevOptionsQcow2", "snapshot"): "blockd's read-only view of an internal snapshot",
}

#: Features qsd lists that blockd does not have: (blockd type, feature) -> why.
OMITTED_FEATURES = {
    ("BlockdevOptionsFile", "dynamic-auto-read-only"):
        "auto-read-only is decided once at open; blockd does not reopen read-write on demand",
}


def _fetch(tmp_path_factory, qsd: bool) -> Schema:
    work = tmp_path_factory.mktemp("qsd" if qsd else "blockd")
    with Daemon(str(work / "qmp.sock"), qsd=qsd) as daemon:
        reply = daemon.client().cmd("query-qmp-schema")
    return {e["name"]: e for e in reply["return"]}


@pytest.fixture(scope="module")
def blockd_schema(tmp_path_factory) -> Schema:
    return _fetch(tmp_path_factory, qsd=False)


@pytest.fixture(scope="module")
def qsd_schema(tmp_path_factory) -> Schema:
    if not HAVE_QSD:
        pytest.skip("qemu-storage-daemon not installed")
    return _fetch(tmp_path_factory, qsd=True)


# ---- libvirt's schema query (virQEMUQAPISchemaPathGet) ---------------------------------


def probe(schema: Schema, query: str) -> bool:
    """Whether ``query`` is found, walking as libvirt does.

    ``name`` selects a member, ``*name`` an optional one, ``+case`` a
    union variant, ``^value`` an enum value, ``!json-type`` a builtin's
    JSON type and ``$feature`` a feature; arrays are looked through and
    alternates tried branch by branch.
    """
    parts = query.split("/")
    if parts[0] not in schema:
        return False
    return _walk(schema, parts[0], parts[1:])


def _features(entry: dict[str, Any], name: str) -> bool:
    return name in entry.get("features", ())


def _walk(schema: Schema, name: str, rest: list[str]) -> bool:
    entry = schema[name]
    if not rest:
        return True
    meta, (query, *more) = entry["meta-type"], rest
    if meta == "array":
        return _walk(schema, entry["element-type"], rest)
    if meta == "alternate":
        return any(_walk(schema, m["type"], rest) for m in entry["members"])
    mod, word = (query[0], query[1:]) if not query[0].isalpha() else ("", query)
    if mod == "$":
        assert not more, query
        return _features(entry, word)
    if meta in ("command", "event"):
        return mod == "" and word in entry and _walk(schema, entry[word], more)
    if meta == "object":
        if mod in ("^", "!"):
            return False
        if mod == "+":
            found = [v for v in entry.get("variants", ()) if v["case"] == word]
        else:
            found = [m for m in entry["members"] if m["name"] == word]
            if mod == "*":
                found = [m for m in found if "default" in m]
        return bool(found) and _walk(schema, found[0]["type"], more)
    if meta == "enum":
        if mod != "^":
            return False
        values = [m for m in entry["members"] if m["name"] == word]
        if more:
            assert len(more) == 1 and more[0].startswith("$"), query
            return bool(values) and _features(values[0], more[0][1:])
        return bool(values)
    if meta == "builtin":
        return mod == "!" and entry["json-type"] == word
    return False


#: Queries libvirt makes (qemu_capabilities.c) about what blockd implements, and the
#: brief's own; both daemons must give the same answer.
SAME_ANSWER = [
    "blockdev-add/arg-type/+qcow2",
    "blockdev-add/arg-type/+qcow2/encrypt/+luks/key-secret",
    "blockdev-add/arg-type/+file/drop-cache",
    "blockdev-add/arg-type/+file/aio/^io_uring",
    "blockdev-add/arg-type/+file/aio/^threads",
    "blockdev-add/arg-type/discard",
    "blockdev-add/arg-type/detect-zeroes",
    "blockdev-add/arg-type/+raw/offset",
    "blockdev-add/arg-type/+qcow2/discard-no-unref",
    "blockdev-add/arg-type/+qcow2/backing/!null",
    "blockdev-add/arg-type/+file/filename/!string",
    "blockdev-add/arg-type/*node-name",
    "blockdev-add/arg-type/*driver",
    "blockdev-add/arg-type/driver/^null-co",
    "blockdev-add/arg-type/+nbd",
    "blockdev-add/arg-type/+nbd/x-dirty-bitmap",
    "blockdev-add/arg-type/+nbd/reconnect-delay",
    "blockdev-add/arg-type/+nbd/open-timeout",
    "blockdev-reopen/arg-type/options/+qcow2/file",
    "blockdev-create/arg-type/options/+qcow2/extended-l2",
    "blockdev-create/arg-type/options/+file/extent-size-hint",
    "blockdev-create/arg-type/options/+raw",
    "blockdev-add/arg-type/+vpc",
    "blockdev-add/arg-type/+vpc/file",
    "blockdev-add/arg-type/driver/^vpc",
    "blockdev-create/arg-type/options/+vpc/force-size",
    "blockdev-create/arg-type/options/+vpc/subformat/^fixed",
    "blockdev-add/arg-type/+vdi/file",
    "blockdev-create/arg-type/options/+vdi/preallocation/^metadata",
    "blockdev-add/arg-type/+vhdx/file",
    "blockdev-add/arg-type/driver/^vhdx",
    "blockdev-create/arg-type/options/+vhdx/log-size",
    "blockdev-create/arg-type/options/+vhdx/block-size",
    "blockdev-create/arg-type/options/+vhdx/block-state-zero",
    "blockdev-create/arg-type/options/+vhdx/subformat/^fixed",
    "blockdev-create/arg-type/options/+vmdk",
    "blockdev-add/arg-type/+qed/backing/!null",
    "blockdev-add/arg-type/driver/^qed",
    "blockdev-create/arg-type/options/+qed/table-size",
    "blockdev-create/arg-type/options/+qed/backing-fmt/^raw",
    "blockdev-add/arg-type/+qcow/encrypt/+aes/key-secret",
    "blockdev-add/arg-type/driver/^qcow",
    "blockdev-create/arg-type/options/+qcow/encrypt/+qcow/key-secret",
    "blockdev-create/arg-type/options/+qcow/backing-file",
    "blockdev-add/arg-type/+parallels/file",
    "blockdev-add/arg-type/+parallels/prealloc-mode",
    "blockdev-add/arg-type/driver/^parallels",
    "blockdev-create/arg-type/options/+parallels/cluster-size",
    "blockdev-add/arg-type/+dmg/file",
    "blockdev-add/arg-type/+bochs/file",
    "blockdev-add/arg-type/+cloop/file",
    "blockdev-create/arg-type/options/+dmg",
    "block-dirty-bitmap-add/arg-type/persistent",
    "block-dirty-bitmap-add/arg-type/disabled",
    "block-dirty-bitmap-merge/arg-type/bitmaps/node",
    "block-export-add/arg-type/+nbd/bitmaps",
    "block-export-add/arg-type/+nbd/bitmaps/node",
    "block-export-add/arg-type/+nbd/bitmaps/!string",
    "block-export-add/arg-type/+nbd/allocation-depth",
    "block-export-add/arg-type/writethrough",
    "nbd-server-start/arg-type/tls-creds",
    "nbd-server-start/arg-type/tls-authz",
    "nbd-server-start/arg-type/max-connections",
    "nbd-server-add/arg-type/bitmap",
    "nbd-server-add/$deprecated",
    "x-blockdev-amend/$unstable",
    "x-debug-block-dirty-bitmap-sha256/$unstable",
    "x-debug-query-block-graph/$unstable",
    "x-debug-query-block-graph/ret-type/edges/shared-perm/^write-unchanged",
    "x-debug-query-block-graph/ret-type/nodes/type/^block-job",
    "object-add/arg-type/qom-type/^secret",
    "object-add/arg-type/+secret/loaded/$deprecated",
    "transaction/arg-type/actions/+block-dirty-bitmap-add/data/persistent",
    "transaction/arg-type/actions/+abort",
    "transaction/arg-type/properties/completion-mode",
    "query-named-block-nodes/arg-type/flat",
    "query-named-block-nodes/ret-type/dirty-bitmaps/inconsistent",
    "query-named-block-nodes/ret-type/image/format-specific/+qcow2/data/bitmaps/flags/^in-use",
    "query-blockstats/ret-type/driver-specific/+file/discard-nb-ok",
    "query-blockstats/ret-type/stats/timed_stats/avg_rd_queue_depth/!number",
    "query-block-exports/ret-type/shutting-down",
    "query-jobs/ret-type/type/^create",
    "query-jobs/ret-type/type/^amend",
    "query-version/ret-type/qemu/major/!int",
    "JOB_STATUS_CHANGE",
    "JOB_STATUS_CHANGE/arg-type/status/^concluded",
    "BLOCK_JOB_COMPLETED/arg-type/*error",
    "BLOCK_JOB_PENDING/arg-type/id",
    "BLOCK_JOB_ERROR/arg-type/action/^stop",
    "query-block-jobs/ret-type/io-status/^nospace",
    "query-block-jobs/ret-type/status/^standby",
    "block-job-cancel/arg-type/*force",
    "block-job-set-speed/arg-type/speed",
    "job-pause/arg-type/id",
    "block-job-change",
    "BLOCK_IMAGE_CORRUPTED/arg-type/*node-name",
    "BLOCK_EXPORT_DELETED/arg-type/id",
    "x-blockdev-reopen",
    "blockdev-add/arg-type/+nosuch",
]

#: Things qsd has and blockd does not: blockd must say no.
BLOCKD_SAYS_NO = [
    "blockdev-add/arg-type/+rbd/encrypt",
    "blockdev-add/arg-type/+nvme",
    "blockdev-add/arg-type/+file/$dynamic-auto-read-only",
    "blockdev-add/arg-type/+qcow2/backing/+throttle",
    "block-export-add/arg-type/+fuse",
    "block-export-add/arg-type/type/^vhost-user-blk",
    "nbd-server-start/arg-type/addr/+vsock",
    "transaction/arg-type/actions/+blockdev-backup",
    "transaction/arg-type/actions/type/^drive-backup",
    "blockdev-backup",
    "block-commit/arg-type/*top",
    "blockdev-snapshot/$allow-write-only-overlay",
    "object-add/arg-type/+iothread",
    "BLOCK_IO_ERROR",
    "query-jobs/ret-type/type/^mirror",
]


@pytest.mark.parametrize("query", SAME_ANSWER)
def test_libvirt_probe_same_answer(blockd_schema, qsd_schema, query):
    assert probe(blockd_schema, query) == probe(qsd_schema, query)


@pytest.mark.parametrize("query", BLOCKD_SAYS_NO)
def test_libvirt_probe_no_for_what_blockd_lacks(blockd_schema, qsd_schema, query):
    assert probe(qsd_schema, query)
    assert not probe(blockd_schema, query)


# ---- entity by entity ---------------------------------------------------------------


class _Compare:
    """Walks blockd's and qsd's entities in step and records every disagreement."""

    def __init__(self, ours: Schema, theirs: Schema) -> None:
        self.ours, self.theirs = ours, theirs
        self.diffs: list[str] = []
        self.seen: set[tuple[str, str]] = set()

    def features(self, ours: dict[str, Any], theirs: dict[str, Any], owner: str, where: str) -> None:
        mine, qemu = set(ours.get("features", ())), set(theirs.get("features", ()))
        for feature in sorted(qemu - mine):
            if (owner, feature) not in OMITTED_FEATURES:
                self.diffs.append(f"{where}: feature {feature} missing")
        for feature in sorted(mine - qemu):
            self.diffs.append(f"{where}: feature {feature} not in QEMU")

    def type(self, ours: str, theirs: str, where: str) -> None:
        if (ours, theirs) in self.seen:
            return
        self.seen.add((ours, theirs))
        a, b = self.ours[ours], self.theirs[theirs]
        if a["meta-type"] != b["meta-type"]:
            self.diffs.append(f"{where}: {a['meta-type']} where QEMU has {b['meta-type']}")
            return
        self.features(a, b, ours, where)
        getattr(self, a["meta-type"])(a, b, where)

    def builtin(self, a: dict[str, Any], b: dict[str, Any], where: str) -> None:
        if (a["name"], a["json-type"]) != (b["name"], b["json-type"]):
            self.diffs.append(f"{where}: {a['name']}/{a['json-type']} where QEMU has "
                              f"{b['name']}/{b['json-type']}")

    def array(self, a: dict[str, Any], b: dict[str, Any], where: str) -> None:
        self.type(a["element-type"], b["element-type"], where + "[]")

    def enum(self, a: dict[str, Any], b: dict[str, Any], where: str) -> None:
        theirs = {m["name"]: m for m in b["members"]}
        order = [v for v in b["values"] if v in a["values"]]
        if a["values"] != order:
            self.diffs.append(f"{where}: values {a['values']} are not a part of QEMU's {b['values']}")
        if a["values"] != [m["name"] for m in a["members"]]:
            self.diffs.append(f"{where}: members disagree with values")
        for m in a["members"]:
            if m["name"] in theirs:
                self.features(m, theirs[m["name"]], a["name"], f"{where}/^{m['name']}")

    def _kind(self, schema: Schema, name: str) -> str:
        entry = schema[name]
        return {"builtin": entry.get("json-type"), "enum": "string"}.get(entry["meta-type"], "object")

    def alternate(self, a: dict[str, Any], b: dict[str, Any], where: str) -> None:
        theirs = {self._kind(self.theirs, m["type"]): m["type"] for m in b["members"]}
        for m in a["members"]:
            kind = self._kind(self.ours, m["type"])
            if kind not in theirs:
                self.diffs.append(f"{where}: alternate branch {kind} not in QEMU")
            else:
                self.type(m["type"], theirs[kind], f"{where}|{kind}")

    def object(self, a: dict[str, Any], b: dict[str, Any], where: str) -> None:
        theirs = {m["name"]: m for m in b["members"]}
        mine = {m["name"]: m for m in a["members"]}
        for name, m in mine.items():
            if name not in theirs:
                if (a["name"], name) not in EXTENSIONS:
                    self.diffs.append(f"{where}/{name}: not in QEMU")
                continue
            q = theirs[name]
            if ("default" in m) != ("default" in q):
                self.diffs.append(f"{where}/{name}: optional={'default' in m}, "
                                  f"QEMU {'default' in q}")
            self.features(m, q, a["name"], f"{where}/{name}")
            self.type(m["type"], q["type"], f"{where}/{name}")
        for name, q in theirs.items():
            if name not in mine and (a["name"], name) not in OMITTED_MEMBERS:
                self.diffs.append(f"{where}/{name}: missing"
                                  + ("" if "default" in q else " (required in QEMU)"))
        if a.get("tag") != b.get("tag"):
            self.diffs.append(f"{where}: tag {a.get('tag')}, QEMU {b.get('tag')}")
        variants = {v["case"]: v["type"] for v in b.get("variants", ())}
        for v in a.get("variants", ()):
            if v["case"] not in variants:
                self.diffs.append(f"{where}/+{v['case']}: not in QEMU")
            else:
                self.type(v["type"], variants[v["case"]], f"{where}/+{v['case']}")

    def entity(self, name: str) -> None:
        a = self.ours[name]
        b = self.theirs.get(name)
        if b is None or b["meta-type"] != a["meta-type"]:
            self.diffs.append(f"{name}: no such {a['meta-type']} in QEMU")
            return
        self.features(a, b, name, name)
        if a.get("allow-oob") != b.get("allow-oob"):
            self.diffs.append(f"{name}: allow-oob differs")
        for key in ("arg-type", "ret-type"):
            if key in b:
                self.type(a[key], b[key], f"{name}/{key}")


def test_every_command_and_event_matches_qsd(blockd_schema, qsd_schema):
    compare = _Compare(blockd_schema, qsd_schema)
    for name, entry in sorted(blockd_schema.items()):
        if entry["meta-type"] in ("command", "event"):
            compare.entity(name)
    assert not compare.diffs, "\n".join(compare.diffs)


def test_lists_exactly_the_commands_blockd_runs(blockd_schema):
    commands = {n for n, e in blockd_schema.items() if e["meta-type"] == "command"}
    assert commands == set(load_all())
    assert "x-blockdev-reopen" not in commands


def test_every_event_blockd_emits_is_listed(blockd_schema):
    events = {n for n, e in blockd_schema.items() if e["meta-type"] == "event"}
    assert events == {"BLOCK_IMAGE_CORRUPTED", "JOB_STATUS_CHANGE", "BLOCK_EXPORT_DELETED",
                      "QUORUM_FAILURE", "QUORUM_REPORT_BAD", "BLOCK_WRITE_THRESHOLD",
                      "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_READY",
                      "BLOCK_JOB_ERROR", "BLOCK_JOB_PENDING"}


def test_every_referenced_type_is_described(blockd_schema):
    """No dangling names, and integers are QAPI's one ``int``, as QEMU lists them."""
    for entry in blockd_schema.values():
        refs = [entry.get(k) for k in ("arg-type", "ret-type", "element-type")]
        refs += [m.get("type") for m in entry.get("members", ())]
        refs += [v["type"] for v in entry.get("variants", ())]
        assert all(r in blockd_schema for r in refs if r is not None), entry["name"]
    builtins = {n: e["json-type"] for n, e in blockd_schema.items() if e["meta-type"] == "builtin"}
    assert builtins.get("int") == "int"
    assert set(builtins) <= {"str", "int", "bool", "number", "null", "any"}


def test_the_reply_describes_itself(blockd_schema):
    """The reply validates against query-qmp-schema's own declared return type."""
    schema = load()
    returns = schema.commands["query-qmp-schema"]["x-returns"]
    validator = jsonschema.Draft202012Validator(
        {"$id": "https://blockd.invalid/schema/commands/ret.json", **returns}, registry=schema.registry)
    validator.validate(list(blockd_schema.values()))


# ---- what blockd sends matches what it declares ---------------------------------------


def _validator(node: dict[str, Any], where: str) -> jsonschema.protocols.Validator:
    schema = load()
    return jsonschema.Draft202012Validator(
        {"$id": f"https://blockd.invalid/schema/{where}.json", **node}, registry=schema.registry)


def test_replies_and_events_fit_their_declared_types(tmp_path):
    """Every query's reply validates against its ret-type, every event against its data type.

    The declared types are closed (no members beyond those listed), so a
    member blockd sends but does not introspect fails here.
    """
    from test_qcow2_integrity import CASES, make_image, poke, tables

    img, bad = str(tmp_path / "a.qcow2"), str(tmp_path / "bad.qcow2")
    make_image(img)
    subprocess.run(["qemu-img", "bitmap", "--add", img, "stored"], check=True)
    make_image(bad)
    poke(bad, *CASES["l2-at-l1"](*tables(bad)))
    nbd = str(tmp_path / "nbd.sock")
    schema = load()
    replies: list[tuple[str, Any]] = []
    events: list[dict[str, Any]] = []
    with Daemon(str(tmp_path / "qmp.sock")) as daemon:
        c, listener = daemon.client(), daemon.client()

        def run(command: str, **args: Any) -> None:
            reply = c.cmd(command, **args)
            assert "return" in reply, (command, reply)
            replies.append((command, reply["return"]))

        run("blockdev-add", driver="qcow2", **{"node-name": "n0"},
            file={"driver": "file", "filename": img})
        run("block-dirty-bitmap-add", node="n0", name="b0", granularity=4096)
        run("object-add", **{"qom-type": "secret", "id": "s0", "data": "x"})
        run("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
        run("block-export-add", type="nbd", id="e0", **{"node-name": "n0"})
        run("blockdev-create", **{"job-id": "j0"},
            options={"driver": "file", "filename": str(tmp_path / "new.raw"), "size": 1 << 20})
        run("blockdev-snapshot-internal-sync", device="n0", name="snap")
        for command, args in [
                ("query-block", {}), ("query-blockstats", {}), ("query-blockstats", {"query-nodes": True}),
                ("query-named-block-nodes", {}), ("query-named-block-nodes", {"flat": True}),
                ("query-block-exports", {}), ("query-version", {}), ("query-commands", {}),
                ("qom-list", {"path": "/objects"}), ("qom-list", {"path": "/objects/s0"}),
                ("qom-list-types", {}), ("x-debug-block-dirty-bitmap-sha256", {"node": "n0", "name": "b0"}),
                ("blockdev-snapshot-delete-internal-sync", {"device": "n0", "name": "snap"}),
                ("query-jobs", {}), ("x-debug-query-block-graph", {})]:
            run(command, **args)
        run("block-export-del", id="e0")
        # A corrupt image last: QEMU answers no more node queries once it stopped.
        run("blockdev-add", driver="qcow2", **{"node-name": "bad"},
            file={"driver": "file", "filename": bad})
        run("block-export-add", type="nbd", id="e1", **{"node-name": "bad"}, writable=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k",
                        f"nbd+unix:///bad?socket={nbd}"], capture_output=True)
        run("query-jobs")
        events = listener.events(timeout=2.0)
    for command, value in replies:
        returns = schema.commands[command].get("x-returns")
        if returns is None:
            assert value == {}, command
        else:
            _validator(returns, f"commands/{command}-ret").validate(value)
    kinds = {e["event"] for e in events}
    assert {"BLOCK_IMAGE_CORRUPTED", "JOB_STATUS_CHANGE", "BLOCK_EXPORT_DELETED"} <= kinds
    for event in events:
        _validator(schema.events[event["event"]], f"events/{event['event']}-data").validate(
            event.get("data", {}))
