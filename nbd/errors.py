"""Errors of the nbd package that callers outside it catch by type. The
client's are `OSError` with an errno, as every client failure is (see
nbd.client)."""
from __future__ import annotations

import errno


class ExportChanged(OSError):
    """After a reconnect the export behind the address is not the one the
    client had (another size, or refused by the caller's `verify`): the client
    sends it nothing."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ESTALE, message)


class WritesLost(OSError):
    """Writes acknowledged without FUA and not yet covered by a FLUSH were
    acknowledged on a connection that was lost: the server may have lost them
    (it may have restarted), so no FLUSH may report them durable."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class PlainListenerRefused(ValueError):
    """A listener would serve without TLS on a network address and the admin did
    not pass --insecure (nbd.tls.vet_plain_listener); nothing was started."""


class EpochRefused(OSError):
    """The server refused the epoch the client declared (OPT_OPIE_EPOCH): it
    accepted a newer one (this client's head was fenced), it has not been
    fenced at this epoch yet, or it does not fence by epoch at all. Final for
    the client: a reconnect is not retried, the requests waiting fail."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)
