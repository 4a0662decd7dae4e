"""Errors of the head daemon and its services (the API, discovery, shares).

`HeadError` is what an admin's request gets when it cannot be done: a message
for a person and the HTTP status the API answers with. Nothing was changed.
"""
from __future__ import annotations


class HeadError(Exception):
    """An operation the admin asked for cannot be done; nothing was changed."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


class ServiceAddressError(Exception):
    """The service address or the list of its client connections cannot be
    handled: no such interface, the kernel refused, or a published list is
    malformed. Nothing was changed by the call that raised it."""
