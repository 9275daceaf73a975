"""The ring Z_{2^bits}: its numpy word type and its canonical (little-endian) byte form.

Every vector the protocol masks, sums, signs or sends is an array of ring words. Their dtype
is written here once, and so is the byte order they take on the wire and under a hash:
little-endian, whatever the machine's own order, so that two peers on different hardware
digest and decode the same bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import ConfigError

__all__ = ["WordArray", "from_le_bytes", "le_bytes", "le_view", "word_dtype"]

WordArray = npt.NDArray[Any]
"""A vector of ring words (uint32 or uint64)."""


def word_dtype(bits: int) -> np.dtype[Any]:
    """The numpy dtype of the ring Z_{2^bits} (bits = 32 or 64)."""
    if bits == 32:
        return np.dtype(np.uint32)
    if bits == 64:
        return np.dtype(np.uint64)
    raise ConfigError(f"ring size must be 32 or 64 bits, not {bits}")


def le_bytes(vector: WordArray) -> bytes:
    """The words of ``vector`` as little-endian bytes (no copy on a little-endian machine)."""
    return vector.astype(vector.dtype.newbyteorder("<"), copy=False).tobytes()


def le_view(vector: WordArray) -> memoryview:
    """The bytes of :func:`le_bytes` as a buffer, without a copy when the words already are
    little-endian and contiguous (to hash or write a vector without duplicating it)."""
    return np.ascontiguousarray(vector, dtype=vector.dtype.newbyteorder("<")).data


def from_le_bytes(raw: bytes, bits: int) -> WordArray:
    """The inverse of :func:`le_bytes`: a native-order array of ring words (a copy)."""
    dtype = word_dtype(bits)
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
