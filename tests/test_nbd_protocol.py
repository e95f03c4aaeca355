"""The NBD wire code without sockets: each encoder against its parser and fixed bytes."""

from __future__ import annotations

import pytest

from blockd.nbd import protocol as p


def test_greeting_bytes_are_the_spec_ones():
    assert p.greeting() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"


def test_server_parser_handshake_then_requests_split_anywhere():
    stream = (p.client_flags() + p.option_request(p.Opt.GO, p.info_request_data("disk", [p.Info.NAME]))
              + p.request(p.Cmd.WRITE, 7, 512, 4, p.CmdFlag.FUA, b"abcd")
              + p.request(p.Cmd.READ, 8, 0, 4096))
    parser = p.ServerParser()
    events = []
    for i in range(len(stream)):  # one byte at a time
        parser.receive_data(stream[i:i + 1])
        for ev in parser.events():
            events.append(ev)
            if isinstance(ev, p.OptionRequest):
                parser.start_transmission()
    flags, opt, write, read = events
    assert flags.flags == p.ClientFlag.FIXED_NEWSTYLE | p.ClientFlag.NO_ZEROES
    assert opt.option == p.Opt.GO and p.parse_info_request(opt.data) == ("disk", [p.Info.NAME])
    assert (write.cmd, write.handle, write.offset, write.data, write.flags) == (p.Cmd.WRITE, 7, 512, b"abcd", 1)
    assert (read.cmd, read.length) == (p.Cmd.READ, 4096)


def test_bad_magic_and_oversized_payloads_are_protocol_errors():
    parser = p.ServerParser(max_payload=1024)
    parser.receive_data(p.client_flags())
    list(parser.events())
    parser.start_transmission()
    parser.receive_data(p.request(p.Cmd.WRITE, 1, 0, 4096))
    with pytest.raises(p.ProtocolError):
        list(parser.events())
    parser = p.ServerParser()
    parser.receive_data(p.client_flags() + b"\x00" * 16)
    with pytest.raises(p.ProtocolError):
        list(parser.events())


def test_malformed_option_payload_is_invalid_not_fatal():
    with pytest.raises(p.InvalidOption, match="^Inconsistent lengths in option go$"):
        p.parse_info_request(b"\x00\x00\x00\x09abc")
    with pytest.raises(p.InvalidOption, match="^option 'info' has unexpected length$"):
        p.parse_info_request(p.info_request_data("x") + b"junk", p.Opt.INFO)
    with pytest.raises(p.InvalidOption, match="^Inconsistent lengths in option set meta context$"):
        p.meta_context_queries(p.meta_context_data("x", ["base:allocation"])[:-1],
                               p.Opt.SET_META_CONTEXT)


def test_error_messages_fit_and_quote_names_as_qemu():
    """Messages quoting what a client sent are cut, never raised on."""
    name = "x" * 4096
    reply = p.rep_error(p.Opt.GO, p.Rep.ERR_UNKNOWN, f"export '{name}' not present")
    assert len(reply) == 20 + p.MAX_STRING
    assert p.quoted_name(name) == "x" * 80 + "..."
    assert p.quoted_name("x" * 79) == "x" * 79
    odd = p.meta_context_name(b"\x00\x00\x00\x02\xff\xfe", p.Opt.GO)
    assert p.rep_error(p.Opt.GO, p.Rep.ERR_UNKNOWN, odd).endswith(b"\xff\xfe")


def test_client_parser_reads_every_reply_kind():
    c = p.ClientParser()
    c.receive_data(p.greeting())
    assert isinstance(next(c.events()), p.Greeting)
    c.receive_data(p.rep_info_export(p.Opt.GO, 1 << 30, 0x1234) + p.rep_ack(p.Opt.GO))
    info, ack = list(c.events())
    assert p.parse_rep_info(info.data) == (p.Info.EXPORT, (1 << 30, 0x1234)) and ack.reply == p.Rep.ACK
    c.start_transmission()
    c.expect_read(5, 3)
    c.receive_data(p.simple_reply(5) + b"xyz" + p.simple_reply(6, p.Err.EIO))
    ok, err = list(c.events())
    assert (ok.handle, ok.data) == (5, b"xyz") and (err.handle, err.error) == (6, p.Err.EIO)
    c.receive_data(p.chunk_offset_hole(9, 4096, 512, False)
                   + p.chunk_block_status(9, 0, [(4096, 0), (512, 3)], False)
                   + p.chunk_error(9, p.Err.EPERM, "nope", offset=4096))
    hole, status, error = list(c.events())
    assert p.parse_offset_hole(hole.payload) == (4096, 512) and not hole.done
    assert p.parse_block_status(status.payload) == (0, [(4096, 0), (512, 3)])
    assert p.parse_error_chunk(error.payload) == (p.Err.EPERM, "nope", 4096) and error.done


def test_export_name_reply_padding():
    assert len(p.export_name_reply(1, 1, no_zeroes=False)) == 134
    assert len(p.export_name_reply(1, 1, no_zeroes=True)) == 10


def test_client_side_checks():
    """Wire errors as errno (unknown ones are EINVAL) and the block size checks, in QEMU's words."""
    import errno
    assert p.errno_from_wire(p.Err.ENOSPC) == errno.ENOSPC
    assert p.errno_from_wire(p.Err.ESHUTDOWN) == errno.ESHUTDOWN
    assert p.errno_from_wire(999) == errno.EINVAL
    assert p.check_block_sizes(512, 4096, 1 << 25, 1 << 20) is None
    assert p.check_block_sizes(3, 4096, 1 << 25, 1 << 20) == "server minimum block size 3 is not a power of two"
    assert p.check_block_sizes(4096, 512, 1 << 25, 1 << 20) == "server preferred block size 512 is not valid"
    assert p.check_block_sizes(4096, 4096, 512, 1 << 20) == "server maximum block size 512 is not valid"
    assert p.check_block_sizes(4096, 4096, 65536, 1000) == \
        "export size 1000 is not multiple of minimum block size 4096"
    assert p.option_name(p.Opt.GO) == "go" and p.option_name(77) == "<unknown>"
