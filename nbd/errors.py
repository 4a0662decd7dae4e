"""Errors of the NBD client a caller may want to tell apart. Both are
`OSError` with an errno, as every client failure is (see nbd.client)."""
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
