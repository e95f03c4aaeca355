#!/usr/bin/env python3
"""QMP negotiation, request-shape errors and JSON errors, one client after another."""

import iotests
from iotests import log

daemon = iotests.Daemon()
try:
    c = daemon.client(negotiate=False)
    log(c.greeting)
    for raw in ['{"execute":"query-version","id":1}',
                '{"execute":"nosuch","id":2}',
                '{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}',
                '{"execute":"qmp_capabilities"}',
                '{"exec-oob":"query-version","id":"oob"}',
                '{"execute":"query-version","id":{"nested":[1,2.5,"x",null]}}',
                '[]', '{"foo":1}', '{"execute":1}', '{"arguments":{}}',
                '{"execute":"query-version","arguments":[]}',
                '{"execute":"query-version","exec-oob":"query-version"}',
                '{"execute":"query-version","id":"split',
                ' write"}',
                '{"execute":bad}', '{"a" 1}', '{"a":1,}', '}',
                '{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0"},"id":3}']:
        log(f"<- {raw}")
        c.send(raw)
        incomplete = raw.endswith("split")  # its reply comes with the next write
        for line in c.lines_until_quiet(0.3) if incomplete else c.reply_lines(0.3):
            log("-> " + line.decode().rstrip())
    log("second client sees its own negotiation state")
    d = daemon.client(negotiate=False)
    d.send('{"execute":"query-version"}')
    log(d.recv())
    d.send('{"execute":"qmp_capabilities"}{"execute":"quit"}')
    log(d.recv())
    log(d.recv())
finally:
    daemon.stop()
    iotests.cleanup()
