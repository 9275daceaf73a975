"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^256 + 297).

2^256 + 297 is the smallest prime above 2^256, so every 32-byte secret is a field element
and a share fits in 33 bytes. Share x-coordinates are peers' 1-based roster positions.

Reconstruction of many secrets from shares held by the same set of peers (the common case:
every survivor reveals its shares of every other survivor's self-mask seed) computes the
Lagrange coefficients once per x-set and reuses them (:class:`Reconstructor`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import mul
from typing import Any

import numpy as np
import numpy.typing as npt

from .crypto import RandomSource, SystemRandom
from .errors import ConfigError

__all__ = [
    "PRIME",
    "SHARE_BYTES",
    "Reconstructor",
    "ShareError",
    "decode_share",
    "encode_share",
    "lagrange_at_zero",
    "reconstruct",
    "split_secret",
]

PRIME = 2**256 + 297
SHARE_BYTES = 33
SECRET_BYTES = 32
# Coefficients are drawn 128 bits wider than the field so that reducing them mod PRIME is
# statistically uniform (bias < 2^-128).
_COEFF_BYTES = 48

ObjectArray = npt.NDArray[Any]
"""A numpy array of Python ints (dtype=object): exact big-integer arithmetic in C loops."""


class ShareError(ValueError):
    """Shares that cannot be (or do not consistently) reconstruct a secret."""


def encode_share(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def decode_share(raw: bytes) -> int:
    if len(raw) != SHARE_BYTES:
        raise ShareError(f"a share is {SHARE_BYTES} bytes, not {len(raw)}")
    value = int.from_bytes(raw, "big")
    if value >= PRIME:
        raise ShareError("share value is outside the field")
    return value


def split_secret(
    secret: bytes, xs: Sequence[int], threshold: int, rng: RandomSource
) -> dict[int, int]:
    """Split ``secret`` so that any ``threshold`` of the shares at ``xs`` reconstruct it.

    Returns ``{x: share}``. Any ``threshold - 1`` shares are uniformly distributed
    whatever the secret (information-theoretic hiding).
    """
    if len(secret) != SECRET_BYTES:
        raise ConfigError(f"secrets are {SECRET_BYTES} bytes, not {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ConfigError(f"threshold {threshold} must be between 1 and {len(xs)} shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ConfigError("share x-coordinates must be distinct and non-zero")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [
        int.from_bytes(rng.token_bytes(_COEFF_BYTES), "big") % PRIME for _ in range(threshold - 1)
    ]
    return dict(zip(xs, _evaluate_many(coefficients, xs), strict=True))


# Horner's rule runs once per coefficient over all x's at once: numpy object arrays apply the
# big-integer operations in a C loop, which removes the interpreter overhead that dominates a
# pure-Python double loop (t * n steps: 125,000 for t = 251, n = 500). The accumulator is
# reduced every few steps only: between reductions it grows by log2(x) bits per step, which
# costs less than a reduction as long as the x's are roster positions (small).
_REDUCE_EVERY = 8


def _evaluate_many(coefficients: Sequence[int], xs: Sequence[int]) -> list[int]:
    """The polynomial with ``coefficients`` (lowest degree first) at each of ``xs``, mod PRIME."""
    points = np.array(list(xs), dtype=object)
    acc = np.zeros(len(points), dtype=object)
    for step, c in enumerate(reversed(coefficients), start=1):
        acc = acc * points
        acc += c
        if step % _REDUCE_EVERY == 0:
            acc %= PRIME
    acc %= PRIME
    return [int(v) for v in acc]


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Coefficients l_i with f(0) = sum_i l_i f(x_i) for any polynomial of degree < len(xs)."""
    return [int(v) for v in _lagrange_rows(xs, (0,))[0]]


def _lagrange_rows(xs: Sequence[int], points: Sequence[int]) -> ObjectArray:
    """Row r, column i: the Lagrange basis polynomial of ``xs[i]`` evaluated at ``points[r]``.

    So ``rows @ ys`` (mod PRIME) is the value at each point of the polynomial through
    (xs, ys). Computed in barycentric form with exact integer products (the x's are small
    roster positions), so each row costs O(len(xs)) big-integer operations in numpy's C loop
    and only the len(xs) denominators need a modular inversion.
    """
    if len(set(xs)) != len(xs):
        raise ShareError("duplicate share x-coordinates")
    nodes = np.array(list(xs), dtype=object)
    weights = np.empty(len(nodes), dtype=object)
    for i, xi in enumerate(xs):
        differences = xi - nodes
        differences[i] = 1
        weights[i] = pow(int(np.prod(differences)) % PRIME, -1, PRIME)
    rows = np.empty((len(points), len(nodes)), dtype=object)
    for r, z in enumerate(points):
        if z in xs:
            raise ShareError(f"x={z} is one of the interpolation nodes")
        offsets = z - nodes
        full = int(np.prod(offsets))
        # Exact: every offset divides the full product.
        rows[r] = (full // offsets) * weights % PRIME
    return rows


class Reconstructor:
    """Reconstructs secrets, caching Lagrange coefficients per set of x-coordinates.

    The aggregator reconstructs one secret per survivor (and per dropped peer) from shares
    held by largely the same responders, so the coefficients are computed once per x-set,
    not once per secret.

    Checking that further shares lie on the same polynomial (``check``) uses a random linear
    combination: with secret random weights r_x drawn once per x-set, the shares are
    consistent iff sum_x r_x y_x equals sum_i c_i y_i, where c combines the rows predicting
    each further share. That is O(n) per secret instead of O(n*t), and a wrong share escapes
    it with probability 1/PRIME, because the weights are drawn after the shares were sent
    and never leave this object. Only when it fails is the exact per-share check run, to
    name the shares that disagree.

    Args:
        threshold: t, the number of shares that determine a secret.
        rng: where the check's random weights come from (the OS CSPRNG by default).
    """

    def __init__(self, threshold: int, rng: RandomSource | None = None) -> None:
        if threshold < 1:
            raise ConfigError(f"threshold must be at least 1, not {threshold}")
        self.threshold = threshold
        self._rng: RandomSource = rng if rng is not None else SystemRandom()
        self._cache: dict[tuple[int, ...], list[int]] = {}
        self._check_cache: dict[tuple[tuple[int, ...], tuple[int, ...]], _Check] = {}

    def reconstruct(self, shares: Mapping[int, int], *, check: bool = False) -> bytes:
        """The secret from ``shares`` ({x: y}); uses the ``threshold`` lowest x's.

        With ``check``, every further share must lie on the same polynomial; otherwise
        :class:`ShareError` names the x-coordinates that disagree.

        Raises:
            ShareError: too few shares, or shares that are not of one 32-byte secret.
        """
        if len(shares) < self.threshold:
            raise ShareError(f"{len(shares)} shares given, {self.threshold} needed")
        ordered = sorted(shares)
        xs = tuple(ordered[: self.threshold])
        coefficients = self._cache.get(xs)
        if coefficients is None:
            coefficients = self._cache[xs] = lagrange_at_zero(xs)
        ys = [shares[x] for x in xs]
        value: int = sum(map(mul, coefficients, ys)) % PRIME
        extra = tuple(ordered[self.threshold :])
        if check and extra:
            self._check(xs, extra, ys, [shares[x] for x in extra])
        if value >= 1 << (8 * SECRET_BYTES):
            raise ShareError("shares do not reconstruct a 32-byte secret (inconsistent shares)")
        return value.to_bytes(SECRET_BYTES, "big")

    def _check(
        self, xs: tuple[int, ...], extra: tuple[int, ...], ys: list[int], extra_ys: list[int]
    ) -> None:
        plan = self._check_cache.get((xs, extra))
        if plan is None:
            rows = _lagrange_rows(xs, extra)
            weights = [
                int.from_bytes(self._rng.token_bytes(_COEFF_BYTES), "big") % PRIME for _ in extra
            ]
            combined = np.array(weights, dtype=object).dot(rows) % PRIME
            plan = self._check_cache[(xs, extra)] = _Check(
                rows, weights, [int(c) for c in combined]
            )
        observed: int = sum(map(mul, plan.weights, extra_ys)) % PRIME
        predicted: int = sum(map(mul, plan.combined, ys)) % PRIME
        if observed == predicted:
            return
        exact = plan.rows.dot(np.array(ys, dtype=object)) % PRIME
        bad = [x for x, p, y in zip(extra, exact, extra_ys, strict=True) if p != y]
        raise ShareError(f"shares at x={bad} are inconsistent with the others")


@dataclass(frozen=True, slots=True)
class _Check:
    rows: ObjectArray  # rows[k] @ ys predicts the share at extra[k]
    weights: list[int]  # secret random r_k, one per further share
    combined: list[int]  # sum_k r_k rows[k] mod PRIME


def reconstruct(shares: Mapping[int, int], threshold: int, *, check: bool = False) -> bytes:
    """One-off reconstruction; see :meth:`Reconstructor.reconstruct`."""
    return Reconstructor(threshold).reconstruct(shares, check=check)
