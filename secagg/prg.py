"""The mask PRG: AES-256-CTR keyed with the full 256-bit seed, expanded into a numpy array.

Why AES-CTR: it is a standard PRG, hardware-accelerated (AES-NI), and pyca ``cryptography``
can write the keystream straight into a caller's buffer with ``update_into``, so a mask of
``m`` words costs one keystream pass and one vectorised add, with no intermediate ``bytes``.

Why in chunks: :meth:`MaskExpander.add_into` runs the keystream of one seed through a small
buffer (:data:`CHUNK_WORDS` words, a few hundred KiB) and adds each chunk into the
accumulator while it is still in the CPU cache. A whole-vector keystream buffer (4 MB at
m = 10^6) would be written to memory and read back for every mask, and a fresh one per call
costs page faults on top; the chunked pass touches the accumulator only. One encryptor object
per seed keeps the counter running across chunks, so the mask is bit-identical to the
whole-vector keystream (tests/secagg/test_masking_chunked.py checks it against that formula).

Every seed is used for exactly one mask: seeds are derived per (session, round, pair) or
drawn fresh per round, so a fixed all-zero IV is safe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from .errors import ConfigError
from .ring import WordArray, le_view, word_dtype

__all__ = ["CHUNK_WORDS", "MaskExpander", "expand_mask", "keystream_floor"]

_BLOCK = 16
_ZERO_IV = bytes(_BLOCK)
CHUNK_WORDS = 1 << 15
"""Words of keystream per chunk: 128 KiB of uint32, small enough to stay in L2 cache."""


class Hasher(Protocol):
    """What :meth:`MaskExpander.combine` feeds (``hashlib.sha256()`` is one)."""

    def update(self, data: memoryview, /) -> None: ...


def _keystream(seed: bytes) -> CipherContext:
    if len(seed) != 32:
        raise ConfigError(f"mask seeds are 32 bytes, not {len(seed)}")
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()


class MaskExpander:
    """Expands seeds into masks of one fixed length, reusing its buffers.

    ``expand`` returns a view into an internal buffer that the next call overwrites: add it
    into an accumulator right away, or better, let :meth:`add_into` do it chunk by chunk.
    """

    def __init__(self, length: int, bits: int = 32, chunk_words: int = CHUNK_WORDS) -> None:
        if length < 1:
            raise ConfigError(f"vector length must be positive, not {length}")
        if chunk_words < 1:
            raise ConfigError(f"chunk size must be positive, not {chunk_words}")
        self.length = length
        self.dtype = word_dtype(bits)
        self._chunk = min(chunk_words, length)
        chunk_bytes = self._chunk * self.dtype.itemsize
        # update_into needs an output buffer one block longer than the input.
        self._zeros = bytes(chunk_bytes)
        self._out = bytearray(chunk_bytes + _BLOCK - 1)
        self._view = np.frombuffer(self._out, dtype=self.dtype, count=self._chunk)
        self._whole: tuple[bytes, bytearray, WordArray] | None = None  # made on first expand

    def expand(self, seed: bytes) -> WordArray:
        """The mask of ``seed`` (32 bytes), as a read-only view valid until the next call."""
        encryptor = _keystream(seed)
        if self._whole is None:
            nbytes = self.length * self.dtype.itemsize
            out = bytearray(nbytes + _BLOCK - 1)
            self._whole = (bytes(nbytes), out, np.frombuffer(out, self.dtype, self.length))
        zeros, out, view = self._whole
        encryptor.update_into(zeros, out)
        return view

    def add_into(
        self, acc: WordArray, seed: bytes, sign: int = 1, start: WordArray | None = None
    ) -> None:
        """``acc = start + sign * PRG(seed)`` modulo 2^bits, in place (sign is +1 or -1).

        ``start`` defaults to ``acc`` itself (``acc += sign * PRG(seed)``).
        """
        self.combine(acc, acc if start is None else start, ((seed, sign),))

    def combine(
        self,
        out: WordArray,
        start: WordArray,
        terms: Sequence[tuple[bytes, int]],
        hasher: Hasher | None = None,
    ) -> None:
        """``out = start + sum(sign * PRG(seed) for seed, sign in terms)`` modulo 2^bits.

        Chunk by chunk, every term's keystream is added while the chunk of ``out`` is in the
        cache (one encryptor per seed keeps each counter running), so ``out`` is written once
        per chunk, whatever the number of masks. ``out`` may be ``start`` itself. With a
        ``hasher``, each finished chunk's little-endian bytes are fed to it in order: the
        digest of ``out`` comes out of the same pass, without reading the vector again.
        """
        for array, what in ((out, "output"), (start, "input")):
            if array.shape != (self.length,) or array.dtype != self.dtype:
                raise ConfigError(
                    f"{what} of shape {array.shape} and dtype {array.dtype}, expected "
                    f"({self.length},) {self.dtype}"
                )
        # Bound methods and whole-chunk views made once: at m = 10^6 the inner loop runs
        # ~300 times per mask set, and its Python overhead is part of the masked stage.
        streams = [
            (_keystream(seed).update_into, np.add if sign > 0 else np.subtract)
            for seed, sign in terms
        ]
        chunk, zeros, keystream, view = self._chunk, self._zeros, self._out, self._view
        itemsize = self.dtype.itemsize
        for begin in range(0, self.length, chunk):
            end = min(begin + chunk, self.length)
            n = end - begin
            if n == chunk:
                pad, words = zeros, view
            else:  # the last chunk is shorter
                pad, words = zeros[: n * itemsize], view[:n]
            dst, source = out[begin:end], start[begin:end]
            for update_into, op in streams:
                update_into(pad, keystream)
                op(source, words, out=dst)
                source = dst
            if not streams:
                np.copyto(dst, source)
            if hasher is not None:
                hasher.update(le_view(dst))


def expand_mask(seed: bytes, length: int, bits: int = 32) -> WordArray:
    """A fresh array holding the mask of ``seed`` (convenience; hot paths use MaskExpander)."""
    return MaskExpander(length, bits).expand(seed).copy()


def keystream_floor(n_masks: int, length: int, bits: int = 32) -> Callable[[], None]:
    """Work doing ``n_masks`` AES-256-CTR keystreams of ``length`` words added into one sum.

    The least any masking can cost, the yardstick the participant's masked stage is
    measured against (:mod:`secagg.simulate`, ``scripts.bench``): the same keystream bytes
    and the same modular adds, with no key agreement, key derivation, digest or bookkeeping.
    Its buffers are allocated here, once, so calling the work repeatedly times only the
    keystream and the adds. The keys are fixed and public: this is a timing, not a mask.
    """
    if n_masks < 0:
        raise ConfigError(f"the number of masks cannot be negative, not {n_masks}")
    dtype = word_dtype(bits)
    nbytes = length * dtype.itemsize
    zeros = bytes(nbytes)
    out = bytearray(nbytes + _BLOCK - 1)
    view = np.frombuffer(out, dtype=dtype, count=length)
    acc = np.zeros(length, dtype=dtype)
    keys = [i.to_bytes(32, "big") for i in range(n_masks)]

    def work() -> None:
        for key in keys:
            _keystream(key).update_into(zeros, out)
            np.add(acc, view, out=acc)

    return work
