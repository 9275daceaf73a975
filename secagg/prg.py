"""The mask PRG: AES-256-CTR keyed with the full 256-bit seed, expanded into a numpy array.

Why AES-CTR: it is a standard PRG, hardware-accelerated (AES-NI), and pyca ``cryptography``
can write the keystream straight into a caller's buffer with ``update_into``, so a mask of
``m`` words costs one keystream pass and one vectorised add, with no intermediate ``bytes``.

Every seed is used for exactly one mask: seeds are derived per (session, round, pair) or
drawn fresh per round, so a fixed all-zero IV is safe.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import ConfigError
from .ring import WordArray, word_dtype

__all__ = ["MaskExpander", "expand_mask"]

_BLOCK = 16
_ZERO_IV = bytes(_BLOCK)


class MaskExpander:
    """Expands seeds into masks of one fixed length, reusing its buffers.

    ``expand`` returns a view into an internal buffer that the next call overwrites: add it
    into an accumulator right away (see :meth:`add_into`).
    """

    def __init__(self, length: int, bits: int = 32) -> None:
        if length < 1:
            raise ConfigError(f"vector length must be positive, not {length}")
        self.length = length
        self.dtype = word_dtype(bits)
        self._nbytes = length * self.dtype.itemsize
        # update_into needs an output buffer one block longer than the input.
        self._zeros = bytes(self._nbytes)
        self._out = bytearray(self._nbytes + _BLOCK - 1)
        self._view = np.frombuffer(self._out, dtype=self.dtype, count=length)

    def expand(self, seed: bytes) -> WordArray:
        """The mask of ``seed`` (32 bytes), as a read-only view valid until the next call."""
        if len(seed) != 32:
            raise ConfigError(f"mask seeds are 32 bytes, not {len(seed)}")
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
        encryptor.update_into(self._zeros, self._out)
        return self._view

    def add_into(self, acc: WordArray, seed: bytes, sign: int = 1) -> None:
        """``acc += sign * PRG(seed)`` modulo 2^bits, in place (sign is +1 or -1)."""
        mask = self.expand(seed)
        if sign > 0:
            np.add(acc, mask, out=acc)
        else:
            np.subtract(acc, mask, out=acc)


def expand_mask(seed: bytes, length: int, bits: int = 32) -> WordArray:
    """A fresh array holding the mask of ``seed`` (convenience; hot paths use MaskExpander)."""
    return MaskExpander(length, bits).expand(seed).copy()
