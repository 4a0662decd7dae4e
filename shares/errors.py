"""The two kinds of errors the shares package raises.

`ValidationErrors` is bad admin input, collected by field, raised before
anything is changed. `CallError` is a failure of the system (a server that
would not start, a command that failed) and carries an errno when one is known.
"""
from __future__ import annotations

import errno as errno_mod


class ValidationErrors(ValueError):
    """Bad input, one or more messages per field; nothing was changed.

    Collect with `add(field, message)` and finish with `check()`, which raises
    the collection if it is not empty.
    """

    def __init__(self, errors: list[tuple[str, str]] | None = None) -> None:
        self.errors: list[tuple[str, str]] = list(errors or [])
        super().__init__()

    def add(self, field: str, message: str) -> None:
        self.errors.append((field, message))

    def extend(self, other: "ValidationErrors", prefix: str = "") -> None:
        for field, message in other.errors:
            self.add(f"{prefix}{field}", message)

    def fields(self) -> set[str]:
        return {field for field, _ in self.errors}

    def check(self) -> None:
        if self.errors:
            raise self

    def __str__(self) -> str:
        return "; ".join(f"{field}: {message}" for field, message in self.errors)


class CallError(RuntimeError):
    """A system operation failed; `errno` says why when it is known."""

    def __init__(self, message: str, errno: int = errno_mod.EIO) -> None:
        super().__init__(message)
        self.errno = errno
