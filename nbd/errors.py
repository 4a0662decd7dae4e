"""Errors of the nbd package that callers outside it catch by type."""
from __future__ import annotations


class PlainListenerRefused(ValueError):
    """A listener would serve without TLS on a network address and the admin did
    not pass --insecure (nbd.tls.vet_plain_listener); nothing was started."""
