"""XOR parity over whole buffers with numpy (no per-byte Python loops)."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def as_array(data: bytes | bytearray | memoryview) -> np.ndarray:
    """A writable uint8 copy of `data`."""
    return np.frombuffer(data, dtype=np.uint8).copy()


def xor_into(acc: np.ndarray, data: bytes | bytearray | memoryview | np.ndarray) -> None:
    """acc ^= data, in place; lengths must match."""
    other = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if len(acc) % 8 == 0 and len(other) % 8 == 0:
        np.bitwise_xor(acc.view(np.uint64), other.view(np.uint64), out=acc.view(np.uint64))
    else:
        np.bitwise_xor(acc, other, out=acc)


def xor_all(buffers: Iterable[bytes | bytearray | memoryview | np.ndarray], length: int) -> np.ndarray:
    """XOR of all buffers (zeros when there are none)."""
    acc = np.zeros(length, dtype=np.uint8)
    for b in buffers:
        xor_into(acc, b)
    return acc
