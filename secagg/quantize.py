"""Quantization of float vectors into the ring Z_{2^bits}, without wrap-around.

Theory of operation: each coordinate is clipped to ``[-bound, bound]``, shifted to
``[0, 2*bound]`` and scaled to integers ``[0, L]`` with
``L = min(floor((2^bits - 1) / n_peers), 2^53)`` (2^53: the float64 integer limit).
The sum of at most ``n_peers`` such integers is at most ``2^bits - 1``, so the modular sum
computed by secure aggregation *is* the integer sum and can be mapped back exactly.

Rounding is stochastic (``floor(v) + [u < frac(v)]`` with ``u`` uniform): the expectation of
the quantized value equals the input, so the aggregate is unbiased. The rounding noise is not
secret, so it uses an injected ``numpy.random.Generator``. Clipping is never silent: the
count and fraction of clipped coordinates are reported with every quantized vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import ConfigError
from .ring import WordArray, word_dtype

__all__ = ["QuantizedVector", "Quantizer"]

FloatArray = npt.NDArray[np.floating[Any]]

_MAX_EXACT_LEVELS = 1 << 53


@dataclass(frozen=True, slots=True)
class QuantizedVector:
    values: WordArray
    clipped_count: int

    @property
    def clipped_fraction(self) -> float:
        return self.clipped_count / max(1, self.values.size)


class Quantizer:
    """Maps float vectors to Z_{2^bits} and sums of them back.

    Args:
        bound: per-coordinate clipping bound (a scalar or an array of the vector's shape).
            Choose it from what bounds the values (e.g. clip norm and learning rate for
            DP-SGD updates) so that nothing is clipped in practice.
        n_peers: the largest number of vectors that will ever be summed (the roster size).
        bits: ring size, 32 or 64.
    """

    def __init__(self, bound: float | FloatArray, n_peers: int, bits: int = 32) -> None:
        self.dtype = word_dtype(bits)
        self.bits = bits
        if n_peers < 1:
            raise ConfigError(f"n_peers must be at least 1, not {n_peers}")
        bound_array = np.asarray(bound, dtype=np.float64)
        if not np.all(np.isfinite(bound_array)) or np.any(bound_array <= 0):
            raise ConfigError("quantization bounds must be finite and positive")
        self.n_peers = n_peers
        self.bound = bound_array
        # Above 2^53 a float64 cannot hold every integer: a 64-bit L would be rounded *up*
        # (to 2^64 / n), so n values at +bound would wrap the ring. 2^53 levels is still far
        # finer than any float input.
        self.levels = min(((1 << bits) - 1) // n_peers, _MAX_EXACT_LEVELS)
        if self.levels < 2:
            raise ConfigError(f"{bits}-bit ring is too small for {n_peers} peers")
        self.scale = self.levels / (2.0 * bound_array)

    def quantize(self, x: npt.ArrayLike, rng: np.random.Generator) -> QuantizedVector:
        """Clip, scale and stochastically round ``x``."""
        values = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("cannot quantize a vector with NaN or infinite values")
        clipped = np.clip(values, -self.bound, self.bound)
        clipped_count = int(np.count_nonzero(clipped != values))
        scaled = (clipped + self.bound) * self.scale
        floor = np.floor(scaled)
        rounded = floor + (rng.random(scaled.shape) < (scaled - floor))
        # Float round-off near the top must not step past L (that could wrap the sum).
        np.minimum(rounded, self.levels, out=rounded)
        return QuantizedVector(rounded.astype(self.dtype), clipped_count)

    def dequantize_sum(self, total: npt.ArrayLike, n_summed: int) -> npt.NDArray[np.float64]:
        """Map the ring sum of ``n_summed`` quantized vectors back to the float sum."""
        if not 1 <= n_summed <= self.n_peers:
            raise ConfigError(f"n_summed must be between 1 and {self.n_peers}, not {n_summed}")
        words = np.asarray(total, dtype=self.dtype)
        return words.astype(np.float64) / self.scale - n_summed * self.bound
