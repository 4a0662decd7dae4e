"""Numbers of the NBD protocol, as named in the upstream spec
(NetworkBlockDevice/nbd, doc/proto.md). Only facts live here: no logic.
"""
from __future__ import annotations

import enum

NBDMAGIC = 0x4E42444D41474943  # b"NBDMAGIC", first 8 bytes from the server
IHAVEOPT = 0x49484156454F5054  # b"IHAVEOPT", newstyle marker / option magic
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Limits we enforce (the spec lets servers pick these).
MAX_OPTION_LENGTH = 64 * 1024  # an option's data; the spec suggests refusing > 64k-ish
MAX_NAME_LENGTH = 4096  # export names and NBD_INFO_NAME payloads, per spec
MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ/WRITE we accept (advertised as max block)
PREFERRED_BLOCK = 4096
MIN_BLOCK = 1


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


# Opie's own handshake option: the client declares the epoch its connection is
# bound to (fencing of old heads, issue 10). doc/proto.md reserves no range for
# private options and assigns its numbers from 1 upwards; this one is ASCII
# "OPIE", far above them. A server that does not know it answers
# NBD_REP_ERR_UNSUP, as the spec asks for any unknown option.
OPT_OPIE_EPOCH = 0x4F504945
MAX_EPOCH = (1 << 63) - 1  # epochs are etcd revisions (int64)


REP_ERROR_BIT = 1 << 31


class Reply(enum.IntEnum):
    """Option reply types; the ones with bit 31 set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT | 1
    ERR_POLICY = REP_ERROR_BIT | 2
    ERR_INVALID = REP_ERROR_BIT | 3
    ERR_PLATFORM = REP_ERROR_BIT | 4
    ERR_TLS_REQD = REP_ERROR_BIT | 5
    ERR_UNKNOWN = REP_ERROR_BIT | 6
    ERR_SHUTDOWN = REP_ERROR_BIT | 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT | 8
    ERR_TOO_BIG = REP_ERROR_BIT | 9
    ERR_EXT_HEADER_REQD = REP_ERROR_BIT | 10

    @property
    def is_error(self) -> bool:
        return bool(self.value & REP_ERROR_BIT)


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


class ChunkType(enum.IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Errno(enum.IntEnum):
    """Error values on the wire. The spec fixes these numbers (they equal
    Linux errno values, but a server on another OS must still send these)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


def wire_errno(err: int) -> Errno:
    """Map a local errno to the closest value the spec allows on the wire."""
    try:
        return Errno(err)
    except ValueError:
        pass
    import errno as _e

    if err in (_e.EROFS, _e.EACCES):
        return Errno.EPERM
    if err == _e.EDQUOT:
        return Errno.ENOSPC
    if err in (getattr(_e, "EOPNOTSUPP", 95),):
        return Errno.ENOTSUP
    return Errno.EIO
