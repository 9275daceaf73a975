"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^256 + 297).

2^256 + 297 is the smallest prime above 2^256, so every 32-byte secret is a field element
and a share fits in 33 bytes. Share x-coordinates are peers' 1-based roster positions.

Reconstruction of many secrets from shares held by the same set of peers (the common case:
every survivor reveals its shares of every other survivor's self-mask seed) computes the
Lagrange coefficients once per x-set and reuses them (:class:`Reconstructor`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .crypto import RandomSource
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
    # Horner's rule, highest coefficient first.
    reversed_coefficients = coefficients[::-1]
    shares = {}
    for x in xs:
        acc = 0
        for c in reversed_coefficients:
            acc = (acc * x + c) % PRIME
        shares[x] = acc
    return shares


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Coefficients l_i with f(0) = sum_i l_i f(x_i) for any polynomial of degree < len(xs)."""
    if len(set(xs)) != len(xs):
        raise ShareError("duplicate share x-coordinates")
    coefficients = []
    for i, xi in enumerate(xs):
        num = 1
        den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        coefficients.append(num * pow(den, -1, PRIME) % PRIME)
    return coefficients


def _evaluate_at(xs: Sequence[int], ys: Sequence[int], x: int) -> int:
    """Value at ``x`` of the polynomial through the points (xs, ys)."""
    total = 0
    for i, xi in enumerate(xs):
        num = 1
        den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + ys[i] * num * pow(den, -1, PRIME)) % PRIME
    return total


class Reconstructor:
    """Reconstructs secrets, caching Lagrange coefficients per set of x-coordinates."""

    def __init__(self, threshold: int) -> None:
        if threshold < 1:
            raise ConfigError(f"threshold must be at least 1, not {threshold}")
        self.threshold = threshold
        self._cache: dict[tuple[int, ...], list[int]] = {}

    def reconstruct(self, shares: Mapping[int, int], *, check: bool = False) -> bytes:
        """The secret from ``shares`` ({x: y}); uses the ``threshold`` lowest x's.

        With ``check``, every further share must lie on the same polynomial; otherwise
        :class:`ShareError` names the x-coordinates that disagree.

        Raises:
            ShareError: too few shares, or shares that are not of one 32-byte secret.
        """
        if len(shares) < self.threshold:
            raise ShareError(f"{len(shares)} shares given, {self.threshold} needed")
        xs = tuple(sorted(shares)[: self.threshold])
        coefficients = self._cache.get(xs)
        if coefficients is None:
            coefficients = self._cache[xs] = lagrange_at_zero(xs)
        value = sum(c * shares[x] for c, x in zip(coefficients, xs, strict=True)) % PRIME
        if check:
            ys = [shares[x] for x in xs]
            bad = [
                x for x in sorted(shares) if x not in xs and _evaluate_at(xs, ys, x) != shares[x]
            ]
            if bad:
                raise ShareError(f"shares at x={bad} are inconsistent with the others")
        if value >= 1 << (8 * SECRET_BYTES):
            raise ShareError("shares do not reconstruct a 32-byte secret (inconsistent shares)")
        return value.to_bytes(SECRET_BYTES, "big")


def reconstruct(shares: Mapping[int, int], threshold: int, *, check: bool = False) -> bytes:
    """One-off reconstruction; see :meth:`Reconstructor.reconstruct`."""
    return Reconstructor(threshold).reconstruct(shares, check=check)
