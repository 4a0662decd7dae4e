"""Pure codec of the NBD fixed-newstyle protocol: bytes in, messages out.

No sockets here. The server and client in this package are thin shells that
read exactly the lengths this module announces (`*_SIZE` constants and the
`length` fields of decoded headers) and hand the bytes to these functions.
A decoder of a fixed-size header reads it from the front of its buffer.

Every decoder fails only with `ProtocolError` (malformed input from the
peer). Encoders take trusted values and raise `ValueError` on a programming
error. Wire layouts are written next to each `struct`; all integers are
big-endian, as the spec requires.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from opie.nbd.constants import (
    IHAVEOPT,
    MAX_NAME_LENGTH,
    MAX_OPTION_LENGTH,
    MAX_EPOCH,
    NBDMAGIC,
    OPT_OPIE_EPOCH,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Info,
    Option,
    Reply,
)


class ProtocolError(Exception):
    """The peer sent bytes that do not follow the protocol."""


# ---------------------------------------------------------------- greeting
# Server greeting (fixed newstyle), 18 bytes:
#   0  u64 NBDMAGIC
#   8  u64 IHAVEOPT
#  16  u16 handshake flags
GREETING = struct.Struct(">QQH")
GREETING_SIZE = GREETING.size


def encode_greeting(handshake_flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def decode_greeting(data: bytes) -> int:
    """Return the server's handshake flags."""
    _need(data, GREETING_SIZE, "greeting")
    magic, opt, flags = GREETING.unpack_from(data)
    if magic != NBDMAGIC:
        raise ProtocolError(f"expected NBDMAGIC, got {magic:#x}")
    if opt != IHAVEOPT:
        raise ProtocolError(f"expected IHAVEOPT (newstyle), got {opt:#x}: oldstyle servers are not supported")
    return flags


# Client flags, 4 bytes: u32 flags.
CLIENT_FLAGS = struct.Struct(">I")
CLIENT_FLAGS_SIZE = CLIENT_FLAGS.size


def encode_client_flags(flags: int) -> bytes:
    return CLIENT_FLAGS.pack(flags)


def decode_client_flags(data: bytes) -> int:
    _need(data, CLIENT_FLAGS_SIZE, "client flags")
    return CLIENT_FLAGS.unpack_from(data)[0]


# ---------------------------------------------------------------- options
# Option request header, 16 bytes, then `length` bytes of option data:
#   0  u64 IHAVEOPT
#   8  u32 option
#  12  u32 length
OPTION_HEADER = struct.Struct(">QII")
OPTION_HEADER_SIZE = OPTION_HEADER.size


@dataclass(frozen=True)
class OptionHeader:
    option: int
    length: int


def encode_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def decode_option_header(data: bytes) -> OptionHeader:
    """Decode an option header. The length is returned as sent; the caller
    decides (with `MAX_OPTION_LENGTH`) whether to read or refuse the data."""
    _need(data, OPTION_HEADER_SIZE, "option header")
    magic, option, length = OPTION_HEADER.unpack_from(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"expected IHAVEOPT option magic, got {magic:#x}")
    return OptionHeader(option, length)


# Opie's epoch option (OPT_OPIE_EPOCH) data, 8 bytes:
#   0  u64 epoch, 1..MAX_EPOCH
# Sent after STARTTLS and before GO/EXPORT_NAME, at most once per connection;
# answered NBD_REP_ACK (admitted) or an error reply with a message.
EPOCH_DATA = struct.Struct(">Q")


def encode_epoch(epoch: int) -> bytes:
    if not 1 <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch must be 1..{MAX_EPOCH}, got {epoch}")
    return EPOCH_DATA.pack(epoch)


def decode_epoch(data: bytes) -> int:
    if len(data) != EPOCH_DATA.size:
        raise ProtocolError(f"epoch option of {len(data)} bytes, expected {EPOCH_DATA.size}")
    (epoch,) = EPOCH_DATA.unpack(data)
    if not 1 <= epoch <= MAX_EPOCH:
        raise ProtocolError(f"epoch {epoch} out of range 1..{MAX_EPOCH}")
    return epoch


# Option reply header, 20 bytes, then `length` bytes:
#   0  u64 OPTION_REPLY_MAGIC (0x3e889045565a9)
#   8  u32 option being answered
#  12  u32 reply type (Reply)
#  16  u32 length
OPTION_REPLY = struct.Struct(">QIII")
OPTION_REPLY_SIZE = OPTION_REPLY.size


@dataclass(frozen=True)
class OptionReplyHeader:
    option: int
    reply: int
    length: int


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def decode_option_reply_header(data: bytes) -> OptionReplyHeader:
    _need(data, OPTION_REPLY_SIZE, "option reply header")
    magic, option, reply, length = OPTION_REPLY.unpack_from(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"expected option reply magic, got {magic:#x}")
    if length > MAX_OPTION_LENGTH:
        raise ProtocolError(f"option reply of {length} bytes exceeds {MAX_OPTION_LENGTH}")
    return OptionReplyHeader(option, reply, length)


# NBD_OPT_INFO / NBD_OPT_GO data:
#   u32 name length, name bytes, u16 number of info requests, u16 each.
@dataclass(frozen=True)
class InfoRequest:
    name: str
    requests: tuple[int, ...] = field(default=())


def encode_info_request(name: str, requests: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests))


def decode_info_request(data: bytes) -> InfoRequest:
    if len(data) < 6:
        raise ProtocolError(f"INFO/GO data of {len(data)} bytes is shorter than 6")
    (name_len,) = struct.unpack_from(">I", data, 0)
    if name_len > MAX_NAME_LENGTH or 4 + name_len + 2 > len(data):
        raise ProtocolError(f"INFO/GO name length {name_len} does not fit {len(data)} bytes")
    name = _decode_name(data[4:4 + name_len])
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    rest = data[6 + name_len:]
    if len(rest) != 2 * count:
        raise ProtocolError(f"INFO/GO announces {count} info requests but carries {len(rest)} bytes")
    reqs = struct.unpack(f">{count}H", rest) if count else ()
    return InfoRequest(name, tuple(reqs))


def decode_export_name(data: bytes) -> str:
    if len(data) > MAX_NAME_LENGTH:
        raise ProtocolError(f"export name of {len(data)} bytes exceeds {MAX_NAME_LENGTH}")
    return _decode_name(data)


def encode_server_entry(name: str, description: str = "") -> bytes:
    """NBD_REP_SERVER payload: u32 name length, name, optional description."""
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + description.encode()


def decode_server_entry(data: bytes) -> tuple[str, str]:
    if len(data) < 4:
        raise ProtocolError("NBD_REP_SERVER payload shorter than 4 bytes")
    (n,) = struct.unpack_from(">I", data)
    if 4 + n > len(data):
        raise ProtocolError(f"NBD_REP_SERVER name length {n} exceeds payload")
    return _decode_name(data[4:4 + n]), _decode_name(data[4 + n:])


# NBD_REP_INFO payloads start with u16 info type:
#   EXPORT:     u64 size, u16 transmission flags             (12 bytes)
#   NAME:       name bytes
#   DESCRIPTION text bytes
#   BLOCK_SIZE: u32 minimum, u32 preferred, u32 maximum       (14 bytes)
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")


def encode_info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def encode_info_text(kind: int, text: str) -> bytes:
    return struct.pack(">H", kind) + text.encode()


@dataclass
class ExportInfo:
    """What a client learned about an export during INFO/GO."""

    size: int = 0
    flags: int = 0
    name: str | None = None
    description: str | None = None
    block_size: tuple[int, int, int] | None = None


def decode_info_reply(data: bytes, into: ExportInfo) -> None:
    if len(data) < 2:
        raise ProtocolError("NBD_REP_INFO payload shorter than 2 bytes")
    (kind,) = struct.unpack_from(">H", data)
    if kind == Info.EXPORT:
        if len(data) != INFO_EXPORT.size:
            raise ProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes, expected {INFO_EXPORT.size}")
        _, into.size, into.flags = INFO_EXPORT.unpack(data)
    elif kind == Info.BLOCK_SIZE:
        if len(data) != INFO_BLOCK_SIZE.size:
            raise ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes, expected {INFO_BLOCK_SIZE.size}")
        _, a, b, c = INFO_BLOCK_SIZE.unpack(data)
        into.block_size = (a, b, c)
    elif kind == Info.NAME:
        into.name = _decode_name(data[2:])
    elif kind == Info.DESCRIPTION:
        into.description = _decode_name(data[2:])
    # unknown info types are ignored, as the spec asks of clients


# Reply to NBD_OPT_EXPORT_NAME: u64 size, u16 flags, then 124 zero bytes
# unless both sides agreed to NO_ZEROES.
EXPORT_NAME_REPLY = struct.Struct(">QH")


def encode_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    return EXPORT_NAME_REPLY.pack(size, flags) + (b"" if no_zeroes else bytes(124))


def decode_export_name_reply(data: bytes) -> tuple[int, int]:
    _need(data, EXPORT_NAME_REPLY.size, "export name reply")
    return EXPORT_NAME_REPLY.unpack(data[:EXPORT_NAME_REPLY.size])


# ---------------------------------------------------------------- transmission
# Request, 28 bytes, then `length` bytes of data for NBD_CMD_WRITE:
#   0  u32 REQUEST_MAGIC
#   4  u16 command flags
#   6  u16 type (Command)
#   8  u64 cookie (handle)
#  16  u64 offset
#  24  u32 length
REQUEST = struct.Struct(">IHHQQI")
REQUEST_SIZE = REQUEST.size


@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def encode_request(flags: int, type_: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, type_, cookie, offset, length)


def decode_request(data: bytes | memoryview) -> Request:
    _need(data, REQUEST_SIZE, "request")
    magic, flags, type_, cookie, offset, length = REQUEST.unpack_from(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"expected request magic {REQUEST_MAGIC:#x}, got {magic:#x}")
    return Request(flags, type_, cookie, offset, length)


# Simple reply, 16 bytes, then data for a successful NBD_CMD_READ:
#   0  u32 SIMPLE_REPLY_MAGIC
#   4  u32 error (Errno; 0 = success)
#   8  u64 cookie
SIMPLE_REPLY = struct.Struct(">IIQ")
SIMPLE_REPLY_SIZE = SIMPLE_REPLY.size


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


# Structured reply chunk header, 20 bytes, then `length` bytes of payload:
#   0  u32 STRUCTURED_REPLY_MAGIC
#   4  u16 flags (ReplyFlag.DONE)
#   6  u16 type (ChunkType)
#   8  u64 cookie
#  16  u32 length
STRUCTURED_REPLY = struct.Struct(">IHHQI")
STRUCTURED_REPLY_SIZE = STRUCTURED_REPLY.size


def encode_chunk_header(flags: int, type_: int, cookie: int, length: int) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, type_, cookie, length)


def encode_offset_data_header(flags: int, cookie: int, offset: int, data_len: int) -> bytes:
    """Chunk header plus the u64 offset of an OFFSET_DATA chunk; data follows."""
    return encode_chunk_header(flags, ChunkType.OFFSET_DATA, cookie, 8 + data_len) + struct.pack(">Q", offset)


def encode_error_chunk(flags: int, cookie: int, error: int, message: str = "") -> bytes:
    """ERROR chunk payload: u32 error, u16 message length, message."""
    msg = message.encode()[:4096]
    payload = struct.pack(">IH", error, len(msg)) + msg
    return encode_chunk_header(flags, ChunkType.ERROR, cookie, len(payload)) + payload


@dataclass(frozen=True, slots=True)
class ReplyHeader:
    """A decoded reply header: simple (structured=False, length unknown) or a
    structured chunk (type, flags and payload length known)."""

    structured: bool
    cookie: int
    error: int = 0
    flags: int = 0
    type: int = 0
    length: int = 0


def reply_header_size(first4: bytes) -> int:
    """Given a reply's first 4 bytes, how long its full header is."""
    _need(first4, 4, "reply magic")
    (magic,) = struct.unpack_from(">I", first4)
    if magic == SIMPLE_REPLY_MAGIC:
        return SIMPLE_REPLY_SIZE
    if magic == STRUCTURED_REPLY_MAGIC:
        return STRUCTURED_REPLY_SIZE
    raise ProtocolError(f"unknown reply magic {magic:#x}")


def decode_reply_header(data: bytes) -> ReplyHeader:
    size = reply_header_size(data[:4])
    _need(data, size, "reply header")
    if size == SIMPLE_REPLY_SIZE:
        _, error, cookie = SIMPLE_REPLY.unpack(data[:size])
        return ReplyHeader(False, cookie, error=error)
    _, flags, type_, cookie, length = STRUCTURED_REPLY.unpack(data[:size])
    return ReplyHeader(True, cookie, flags=flags, type=type_, length=length)


def decode_error_chunk(payload: bytes) -> tuple[int, str]:
    if len(payload) < 6:
        raise ProtocolError("error chunk shorter than 6 bytes")
    error, mlen = struct.unpack_from(">IH", payload)
    if 6 + mlen > len(payload):
        raise ProtocolError("error chunk message length exceeds payload")
    return error, payload[6:6 + mlen].decode("utf-8", "replace")


# ---------------------------------------------------------------- helpers
def option_name(option: int) -> str:
    if option == OPT_OPIE_EPOCH:
        return "NBD_OPT_OPIE_EPOCH"
    try:
        return f"NBD_OPT_{Option(option).name}"
    except ValueError:
        return f"option {option}"


def reply_name(reply: int) -> str:
    try:
        return f"NBD_REP_{Reply(reply).name}"
    except ValueError:
        return f"reply {reply:#x}"


def _decode_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"name is not UTF-8: {exc}") from None


def _need(data: bytes | memoryview, n: int, what: str) -> None:
    if len(data) < n:
        raise ProtocolError(f"{what} needs {n} bytes, got {len(data)}")
