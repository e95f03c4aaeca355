#!/usr/bin/env python3
"""Secret objects over QMP and the command line: creation, errors, listing, deletion."""

import iotests
from iotests import log

with open(iotests.scratch("pw.txt"), "w") as f:
    f.write("from-a-file")

daemon = iotests.Daemon("--object", f"secret,id=cli0,file={iotests.scratch('pw.txt')}")
try:
    c = daemon.client()
    for args in [{"qom-type": "secret", "id": "s0", "data": "hunter2"},
                 {"qom-type": "secret", "id": "s0", "data": "again"},
                 {"qom-type": "secret", "id": "s1", "data": "aHVudGVyMg==", "format": "base64"},
                 {"qom-type": "secret", "id": "s2", "data": "!!", "format": "base64"},
                 {"qom-type": "secret", "id": "s3"},
                 {"qom-type": "secret", "id": "s4", "data": "x", "keyid": "nokey", "iv": "AAAA"},
                 {"qom-type": "secret", "id": "s5", "file": iotests.scratch("missing")},
                 {"qom-type": "secret", "id": "9bad", "data": "x"}]:
        log({"execute": "object-add", "arguments": args})
        log(c.cmd("object-add", **args))
    log(sorted(e["name"] for e in c.cmd("qom-list", path="/objects")["return"]))
    log(c.cmd("object-del", id="s0"))
    log(c.cmd("object-del", id="s0"))
    log(sorted(e["name"] for e in c.cmd("qom-list", path="/objects")["return"]))
    log(c.cmd("qom-list-types", implements="secret"))
finally:
    daemon.stop()
    iotests.cleanup()
