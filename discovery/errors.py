"""Errors of the discovery package's coordination (etcd) client and member runner.

Two kinds, as elsewhere in Opie: `CoordUnavailable` is the cluster's state (no
endpoint answered within the bound: dead, paused, partitioned, or without
quorum) and may succeed later; `CoordRefused` is etcd saying no to a request it
understood (a bad request, an unknown lease). Neither changes anything on our
side; a caller that must act on unavailability (the election) does so itself.
"""
from __future__ import annotations


class CoordError(Exception):
    """Base of every coordination error."""


class CoordUnavailable(CoordError):
    """No etcd endpoint answered within the bound (every endpoint was tried)."""


class CoordRefused(CoordError):
    """etcd answered and refused the request; `.code` is its gRPC status code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class LeaseExpired(CoordRefused):
    """The lease is gone (expired or revoked): its keys are deleted."""


class EtcdMemberError(CoordError):
    """An etcd member did not start, or did not become healthy in time."""
