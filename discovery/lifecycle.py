"""The start/close lifecycle shared by discovery's long-running pieces."""
from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound="Service")


class Service:
    """Something with `start()` and `close()`; `with obj:` starts it and always closes it.

    `close` must be safe to call twice and after a failed `start`.
    """

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: T) -> T:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
