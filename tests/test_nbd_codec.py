"""The pure NBD codec (nbd/codec.py): every message round-trips, a few are
pinned to literal bytes hand-checked against the spec
(NetworkBlockDevice/nbd doc/proto.md), and every decoder, fed arbitrary or
hostile bytes, either returns or raises `ProtocolError` -- nothing else."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opie.nbd import codec
from opie.nbd.codec import ExportInfo, ProtocolError
from opie.nbd.constants import (
    MAX_NAME_LENGTH,
    MAX_OPTION_LENGTH,
    ChunkType,
    ClientFlag,
    Command,
    CommandFlag,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    ReplyFlag,
    TransmissionFlag,
)

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
# Export names: UTF-8 text whose encoding stays within the spec's 4096 bytes.
names = st.text(max_size=300).filter(lambda s: len(s.encode()) <= MAX_NAME_LENGTH)
hostile = st.binary(max_size=300)
FAST = settings(max_examples=150, deadline=None)


# ---------------------------------------------------------------- literal bytes
# Each literal below was written from the spec's field tables, not from the
# codec: "S: 64 bits NBDMAGIC, 64 bits IHAVEOPT, 16 bits handshake flags", ...

def test_greeting_literal():
    wire = codec.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
    assert wire == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert codec.GREETING_SIZE == 18
    assert codec.decode_greeting(wire) == 3


def test_client_flags_literal():
    assert codec.encode_client_flags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES) == b"\x00\x00\x00\x03"
    assert codec.decode_client_flags(b"\x00\x00\x00\x01") == ClientFlag.FIXED_NEWSTYLE


def test_option_request_literal():
    # C: IHAVEOPT, u32 option, u32 length, data
    assert codec.encode_option(Option.LIST) == b"IHAVEOPT" + b"\x00\x00\x00\x03" + b"\x00\x00\x00\x00"
    assert codec.encode_option(Option.EXPORT_NAME, b"disk0") == (
        b"IHAVEOPT\x00\x00\x00\x01\x00\x00\x00\x05disk0")
    hdr = codec.decode_option_header(b"IHAVEOPT\x00\x00\x00\x07\x00\x00\x01\x00")
    assert (hdr.option, hdr.length) == (Option.GO, 256)


def test_option_reply_literal():
    # S: u64 0x3e889045565a9, u32 option, u32 reply type, u32 length, data
    wire = codec.encode_option_reply(Option.GO, Reply.ERR_UNSUP, b"no")
    assert wire == (b"\x00\x03\xe8\x89\x04\x55\x65\xa9" + b"\x00\x00\x00\x07" + b"\x80\x00\x00\x01"
                    + b"\x00\x00\x00\x02" + b"no")
    hdr = codec.decode_option_reply_header(wire[:20])
    assert (hdr.option, hdr.reply, hdr.length) == (Option.GO, Reply.ERR_UNSUP, 2)


def test_reply_type_numbers_match_the_spec():
    # error replies have bit 31 set: NBD_REP_ERR_UNSUP is 2^31 + 1, and so on.
    assert Reply.ACK == 1 and Reply.SERVER == 2 and Reply.INFO == 3
    assert [Reply.ERR_UNSUP, Reply.ERR_POLICY, Reply.ERR_INVALID, Reply.ERR_PLATFORM, Reply.ERR_TLS_REQD,
            Reply.ERR_UNKNOWN, Reply.ERR_SHUTDOWN, Reply.ERR_BLOCK_SIZE_REQD, Reply.ERR_TOO_BIG] == \
        [2**31 + i for i in range(1, 10)]
    assert all(r.is_error for r in Reply if r.value > 2**31) and not Reply.ACK.is_error


def test_info_go_data_literal():
    # u32 name length, name, u16 number of info requests, u16 each
    wire = codec.encode_info_request("disk0", (Info.BLOCK_SIZE, Info.NAME))
    assert wire == b"\x00\x00\x00\x05disk0\x00\x02\x00\x03\x00\x01"
    assert codec.decode_info_request(wire) == codec.InfoRequest("disk0", (3, 1))
    assert codec.decode_info_request(b"\x00\x00\x00\x00\x00\x00") == codec.InfoRequest("", ())


def test_info_reply_payload_literals():
    # NBD_INFO_EXPORT: u16 0, u64 size, u16 transmission flags (length 12)
    export = codec.encode_info_export(64 << 20, TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH)
    assert export == b"\x00\x00" + b"\x00\x00\x00\x00\x04\x00\x00\x00" + b"\x00\x05"
    # NBD_INFO_BLOCK_SIZE: u16 3, u32 min, u32 preferred, u32 max (length 14)
    bs = codec.encode_info_block_size(1, 4096, 32 << 20)
    assert bs == b"\x00\x03" + b"\x00\x00\x00\x01" + b"\x00\x00\x10\x00" + b"\x02\x00\x00\x00"
    # NBD_INFO_NAME / DESCRIPTION: u16 type, then the string
    assert codec.encode_info_text(Info.NAME, "d0") == b"\x00\x01d0"
    assert codec.encode_info_text(Info.DESCRIPTION, "x") == b"\x00\x02x"
    info = ExportInfo()
    for payload in (export, bs, b"\x00\x01d0", b"\x00\x02x", b"\x00\x63whatever"):  # 0x63: unknown, ignored
        codec.decode_info_reply(payload, info)
    assert (info.size, info.flags, info.block_size, info.name, info.description) == (
        64 << 20, 5, (1, 4096, 32 << 20), "d0", "x")


def test_server_entry_literal():
    # NBD_REP_SERVER: u32 name length, name, rest is a description
    assert codec.encode_server_entry("d0", "desc") == b"\x00\x00\x00\x02d0desc"
    assert codec.decode_server_entry(b"\x00\x00\x00\x02d0desc") == ("d0", "desc")
    assert codec.decode_server_entry(b"\x00\x00\x00\x00") == ("", "")


def test_export_name_reply_literal():
    # u64 size, u16 flags, 124 zero bytes unless NO_ZEROES was agreed
    wire = codec.encode_export_name_reply(1 << 20, 0x0001, no_zeroes=False)
    assert wire == b"\x00\x00\x00\x00\x00\x10\x00\x00" + b"\x00\x01" + bytes(124)
    assert codec.encode_export_name_reply(1 << 20, 1, no_zeroes=True) == wire[:10]
    assert codec.decode_export_name_reply(wire) == (1 << 20, 1)
    assert codec.decode_export_name_reply(wire[:10]) == (1 << 20, 1)


def test_request_literal():
    # C: u32 0x25609513, u16 flags, u16 type, u64 handle, u64 offset, u32 length
    wire = codec.encode_request(CommandFlag.FUA, Command.WRITE, 0x0102030405060708, 4096, 512)
    assert wire == (b"\x25\x60\x95\x13" + b"\x00\x01" + b"\x00\x01" + bytes(range(1, 9))
                    + b"\x00\x00\x00\x00\x00\x00\x10\x00" + b"\x00\x00\x02\x00")
    assert codec.decode_request(wire) == codec.Request(1, 1, 0x0102030405060708, 4096, 512)
    assert codec.decode_request(memoryview(wire)) == codec.decode_request(wire)


def test_simple_reply_literal():
    # S: u32 0x67446698, u32 error, u64 handle
    wire = codec.encode_simple_reply(7, 22)
    assert wire == b"\x67\x44\x66\x98" + b"\x00\x00\x00\x16" + b"\x00\x00\x00\x00\x00\x00\x00\x07"
    assert codec.reply_header_size(wire[:4]) == 16
    assert codec.decode_reply_header(wire) == codec.ReplyHeader(False, 7, error=22)


def test_structured_reply_literals():
    # S: u32 0x668e33ef, u16 flags, u16 type, u64 handle, u32 length
    none = codec.encode_chunk_header(ReplyFlag.DONE, ChunkType.NONE, 9, 0)
    assert none == b"\x66\x8e\x33\xef" + b"\x00\x01" + b"\x00\x00" + b"\x00" * 7 + b"\x09" + bytes(4)
    # OFFSET_DATA payload: u64 offset, then data; length counts both
    data_hdr = codec.encode_offset_data_header(ReplyFlag.DONE, 9, 512, 4)
    assert data_hdr == (b"\x66\x8e\x33\xef\x00\x01\x00\x01" + b"\x00" * 7 + b"\x09" + b"\x00\x00\x00\x0c"
                        + b"\x00\x00\x00\x00\x00\x00\x02\x00")
    hdr = codec.decode_reply_header(data_hdr[:20])
    assert hdr == codec.ReplyHeader(True, 9, flags=1, type=ChunkType.OFFSET_DATA, length=12)


def test_error_chunk_literal():
    # NBD_REPLY_TYPE_ERROR (2^15 + 1): u32 error, u16 message length, message
    wire = codec.encode_error_chunk(ReplyFlag.DONE, 5, 22, "bad")
    assert wire == (b"\x66\x8e\x33\xef\x00\x01\x80\x01" + b"\x00" * 7 + b"\x05" + b"\x00\x00\x00\x09"
                    + b"\x00\x00\x00\x16" + b"\x00\x03" + b"bad")
    hdr = codec.decode_reply_header(wire[:20])
    assert (hdr.type, hdr.length) == (ChunkType.ERROR, 9)
    assert codec.decode_error_chunk(wire[20:]) == (22, "bad")


def test_error_chunk_message_is_capped_at_the_spec_string_limit():
    wire = codec.encode_error_chunk(ReplyFlag.DONE, 1, 5, "x" * 10000)
    err, msg = codec.decode_error_chunk(wire[20:])
    assert err == 5 and len(msg) == 4096


# ---------------------------------------------------------------- refusals (table)
@pytest.mark.parametrize("decode, data", [
    (codec.decode_greeting, b"NBDMAGIC" + b"\x00\x42\x02\x81\x86\x12\x53\x00" + b"\x00\x03"),  # oldstyle
    (codec.decode_greeting, b"NBDMAGIX" + b"IHAVEOPT" + b"\x00\x03"),
    (codec.decode_greeting, b"NBDMAGICIHAVEOPT\x00"),  # truncated
    (codec.decode_client_flags, b"\x00\x00\x01"),
    (codec.decode_option_header, b"IHAVEOPX\x00\x00\x00\x01\x00\x00\x00\x00"),
    (codec.decode_option_header, b"IHAVEOPT\x00\x00\x00\x01\x00\x00\x00"),
    (codec.decode_option_reply_header, b"\x00\x03\xe8\x89\x04\x55\x65\xa8" + bytes(12)),
    (codec.decode_option_reply_header,  # a reply longer than any we accept
     b"\x00\x03\xe8\x89\x04\x55\x65\xa9" + bytes(8) + struct.pack(">I", MAX_OPTION_LENGTH + 1)),
    (codec.decode_info_request, b"\x00\x00\x00\x05disk0\x00"),  # count truncated
    (codec.decode_info_request, b"\x00\x00\x00\x06disk0\x00\x00"),  # name runs into count
    (codec.decode_info_request, b"\xff\xff\xff\xff\x00\x00"),  # huge name length
    (codec.decode_info_request, b"\x00\x00\x00\x00\x00\x02\x00\x03"),  # 2 requests announced, 1 sent
    (codec.decode_info_request, b"\x00\x00\x00\x00\x00\x00\x00\x03"),  # 0 announced, 1 sent
    (codec.decode_info_request, b"\x00\x00\x00\x02\xff\xfe\x00\x00"),  # name not UTF-8
    (codec.decode_info_request, struct.pack(">I", 4097) + b"a" * 4097 + b"\x00\x00"),  # name > 4096
    (codec.decode_export_name, b"a" * (MAX_NAME_LENGTH + 1)),
    (codec.decode_export_name, b"\xc3\x28"),
    (codec.decode_server_entry, b"\x00\x00\x00"),
    (codec.decode_server_entry, b"\x00\x00\x00\x05abc"),
    (codec.decode_request, b"\x25\x60\x95\x14" + bytes(24)),
    (codec.decode_request, b"\x25\x60\x95\x13" + bytes(23)),
    (codec.reply_header_size, b"\x67\x44\x66\x99"),
    (codec.decode_reply_header, b"\x67\x44\x66\x98" + bytes(11)),  # simple header cut short
    (codec.decode_reply_header, b"\x66\x8e\x33\xef" + bytes(15)),  # structured header cut short
    (codec.decode_reply_header, b""),
    (codec.decode_error_chunk, b"\x00\x00\x00\x16\x00"),
    (codec.decode_error_chunk, b"\x00\x00\x00\x16\x00\x04bad"),  # message longer than payload
    (codec.decode_export_name_reply, bytes(9)),
])
def test_decoders_refuse_malformed_input(decode, data):
    with pytest.raises(ProtocolError):
        decode(data)


@pytest.mark.parametrize("payload", [
    b"\x00",  # shorter than the type
    b"\x00\x00" + bytes(9),  # NBD_INFO_EXPORT must be exactly 12 bytes
    b"\x00\x00" + bytes(11),
    b"\x00\x03" + bytes(11),  # NBD_INFO_BLOCK_SIZE must be exactly 14 bytes
    b"\x00\x03" + bytes(13),
    b"\x00\x01\xff",  # NBD_INFO_NAME not UTF-8
])
def test_info_reply_refuses_malformed_payloads(payload):
    with pytest.raises(ProtocolError):
        codec.decode_info_reply(payload, ExportInfo())


# ---------------------------------------------------------------- round trips (properties)
@FAST
@given(u16)
def test_greeting_round_trip(flags):
    assert codec.decode_greeting(codec.encode_greeting(flags)) == flags


@FAST
@given(u32)
def test_client_flags_round_trip(flags):
    assert codec.decode_client_flags(codec.encode_client_flags(flags)) == flags


@FAST
@given(u32, st.binary(max_size=64))
def test_option_round_trip(option, data):
    wire = codec.encode_option(option, data)
    hdr = codec.decode_option_header(wire[:codec.OPTION_HEADER_SIZE])
    assert (hdr.option, hdr.length, wire[codec.OPTION_HEADER_SIZE:]) == (option, len(data), data)


@FAST
@given(u32, u32, st.binary(max_size=64))
def test_option_reply_round_trip(option, reply, data):
    wire = codec.encode_option_reply(option, reply, data)
    hdr = codec.decode_option_reply_header(wire[:codec.OPTION_REPLY_SIZE])
    assert (hdr.option, hdr.reply, hdr.length) == (option, reply, len(data))
    assert wire[codec.OPTION_REPLY_SIZE:] == data


@FAST
@given(names, st.lists(u16, max_size=8).map(tuple))
def test_info_request_round_trip(name, requests):
    assert codec.decode_info_request(codec.encode_info_request(name, requests)) == codec.InfoRequest(name, requests)


@FAST
@given(names)
def test_export_name_round_trip(name):
    assert codec.decode_export_name(name.encode()) == name


@FAST
@given(names, st.text(max_size=100))
def test_server_entry_round_trip(name, description):
    assert codec.decode_server_entry(codec.encode_server_entry(name, description)) == (name, description)


@FAST
@given(u64, u16, u32, u32, u32, names, st.text(max_size=100))
def test_info_reply_round_trip(size, flags, bmin, bpref, bmax, name, description):
    info = ExportInfo()
    codec.decode_info_reply(codec.encode_info_export(size, flags), info)
    codec.decode_info_reply(codec.encode_info_block_size(bmin, bpref, bmax), info)
    codec.decode_info_reply(codec.encode_info_text(Info.NAME, name), info)
    codec.decode_info_reply(codec.encode_info_text(Info.DESCRIPTION, description), info)
    assert info == ExportInfo(size, flags, name, description, (bmin, bpref, bmax))


@FAST
@given(u64, u16, st.booleans())
def test_export_name_reply_round_trip(size, flags, no_zeroes):
    wire = codec.encode_export_name_reply(size, flags, no_zeroes)
    assert len(wire) == (10 if no_zeroes else 134)
    assert codec.decode_export_name_reply(wire) == (size, flags)


@FAST
@given(u16, u16, u64, u64, u32)
def test_request_round_trip(flags, type_, cookie, offset, length):
    wire = codec.encode_request(flags, type_, cookie, offset, length)
    assert len(wire) == codec.REQUEST_SIZE
    assert codec.decode_request(wire) == codec.Request(flags, type_, cookie, offset, length)


@FAST
@given(u64, u32)
def test_simple_reply_round_trip(cookie, error):
    assert codec.decode_reply_header(codec.encode_simple_reply(cookie, error)) == \
        codec.ReplyHeader(False, cookie, error=error)


@FAST
@given(u16, u16, u64, u32)
def test_chunk_header_round_trip(flags, type_, cookie, length):
    wire = codec.encode_chunk_header(flags, type_, cookie, length)
    assert codec.reply_header_size(wire[:4]) == codec.STRUCTURED_REPLY_SIZE
    assert codec.decode_reply_header(wire) == codec.ReplyHeader(True, cookie, flags=flags, type=type_, length=length)


@FAST
@given(u16, u64, u64, st.integers(0, 2**32 - 9))
def test_offset_data_header_round_trip(flags, cookie, offset, data_len):
    wire = codec.encode_offset_data_header(flags, cookie, offset, data_len)
    hdr = codec.decode_reply_header(wire[:codec.STRUCTURED_REPLY_SIZE])
    assert hdr == codec.ReplyHeader(True, cookie, flags=flags, type=ChunkType.OFFSET_DATA, length=8 + data_len)
    assert struct.unpack(">Q", wire[codec.STRUCTURED_REPLY_SIZE:]) == (offset,)


@FAST
@given(u16, u64, st.integers(1, 2**32 - 1), st.text(max_size=200))
def test_error_chunk_round_trip(flags, cookie, error, message):
    wire = codec.encode_error_chunk(flags, cookie, error, message)
    hdr = codec.decode_reply_header(wire[:codec.STRUCTURED_REPLY_SIZE])
    assert (hdr.structured, hdr.flags, hdr.type, hdr.cookie) == (True, flags, ChunkType.ERROR, cookie)
    payload = wire[codec.STRUCTURED_REPLY_SIZE:]
    assert hdr.length == len(payload)
    assert codec.decode_error_chunk(payload) == (error, message)


# ---------------------------------------------------------------- hostile bytes
def _returns_or_protocol_error(fn, *args):
    """Call a decoder; anything but a return or ProtocolError fails the test."""
    try:
        return fn(*args)
    except ProtocolError:
        return None


DECODERS = [codec.decode_greeting, codec.decode_client_flags, codec.decode_option_header,
            codec.decode_option_reply_header, codec.decode_info_request, codec.decode_export_name,
            codec.decode_server_entry, codec.decode_export_name_reply, codec.decode_request,
            codec.reply_header_size, codec.decode_reply_header, codec.decode_error_chunk,
            lambda b: codec.decode_info_reply(b, ExportInfo())]


@settings(max_examples=300, deadline=None)
@given(hostile, st.booleans())
def test_every_decoder_survives_arbitrary_bytes(data, as_view):
    buf = memoryview(data) if as_view else data
    for decode in DECODERS:
        _returns_or_protocol_error(decode, buf if decode is codec.decode_request else data)


def _valid_messages():
    """One valid encoding per decoder, to mutate."""
    return [
        (codec.decode_greeting, codec.encode_greeting(3)),
        (codec.decode_client_flags, codec.encode_client_flags(1)),
        (codec.decode_option_header, codec.encode_option(Option.GO)),
        (codec.decode_option_reply_header, codec.encode_option_reply(Option.GO, Reply.ACK)),
        (codec.decode_info_request, codec.encode_info_request("disk0", (Info.BLOCK_SIZE, Info.NAME))),
        (codec.decode_server_entry, codec.encode_server_entry("disk0", "a disk")),
        (codec.decode_export_name_reply, codec.encode_export_name_reply(1 << 30, 0x1ff, True)),
        (codec.decode_request, codec.encode_request(1, 1, 42, 4096, 512)),
        (codec.decode_reply_header, codec.encode_simple_reply(42, 0)),
        (codec.decode_reply_header, codec.encode_chunk_header(1, 1, 42, 520)),
        (codec.decode_error_chunk, codec.encode_error_chunk(1, 42, 22, "bad")[20:]),
        (lambda b: codec.decode_info_reply(b, ExportInfo()), codec.encode_info_export(1 << 20, 1)),
        (lambda b: codec.decode_info_reply(b, ExportInfo()), codec.encode_info_block_size(1, 4096, 1 << 25)),
    ]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_every_decoder_survives_mutated_valid_messages(data):
    """Near-valid input finds more paths than random bytes: flip, cut, extend."""
    decode, wire = data.draw(st.sampled_from(_valid_messages()))
    buf = bytearray(wire)
    for _ in range(data.draw(st.integers(0, 4))):
        if buf:
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    tail = data.draw(st.binary(max_size=8))
    _returns_or_protocol_error(decode, bytes(buf[:cut]) + tail)


@FAST
@given(st.binary(min_size=2, max_size=40))
def test_info_request_decoder_never_reads_past_its_data(data):
    """Whatever a hostile INFO/GO says about lengths, a decoded request
    accounts for every byte: 4 + name + 2 + 2 per request."""
    req = _returns_or_protocol_error(codec.decode_info_request, data)
    if req is not None:
        assert 4 + len(req.name.encode()) + 2 + 2 * len(req.requests) == len(data)


# ---------------------------------------------------------------- Opie's epoch option
def test_epoch_option_literal():
    # C: IHAVEOPT, u32 0x4F504945 ("OPIE"), u32 length 8, u64 epoch
    from opie.nbd.constants import OPT_OPIE_EPOCH
    wire = codec.encode_option(OPT_OPIE_EPOCH, codec.encode_epoch(5))
    assert wire == b"IHAVEOPT" + b"OPIE" + b"\x00\x00\x00\x08" + b"\x00" * 7 + b"\x05"
    hdr = codec.decode_option_header(wire)
    assert (hdr.option, hdr.length) == (OPT_OPIE_EPOCH, 8)
    assert codec.decode_epoch(wire[16:]) == 5
    assert codec.option_name(OPT_OPIE_EPOCH) == "NBD_OPT_OPIE_EPOCH"
    assert OPT_OPIE_EPOCH not in {int(o) for o in Option}


@pytest.mark.parametrize("data", [b"", b"\x00" * 7, b"\x00" * 9, b"\x00" * 8, b"\x80" + b"\x00" * 7,
                                  b"\xff" * 8])
def test_epoch_option_refuses_bad_data(data):
    with pytest.raises(ProtocolError):
        codec.decode_epoch(data)


@pytest.mark.parametrize("epoch", [0, -1, 1 << 63])
def test_epoch_encoder_refuses_out_of_range(epoch):
    with pytest.raises(ValueError):
        codec.encode_epoch(epoch)


@FAST
@given(st.integers(1, 2**63 - 1))
def test_epoch_round_trip(epoch):
    assert codec.decode_epoch(codec.encode_epoch(epoch)) == epoch


@FAST
@given(hostile)
def test_epoch_decoder_hostile(data):
    try:
        assert 1 <= codec.decode_epoch(data) < 2**63
    except ProtocolError:
        pass
