"""Key generation: the pluggable :class:`PaillierKeyGenerator` and its two implementations."""

from __future__ import annotations

import math
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import rsa
from phe import paillier as phe_paillier
from phe.util import is_prime

from ..crypto import RandomSource
from .config import PrivateKey


class PaillierKeyGenerator(Protocol):
    """Makes the key holder's Paillier key pair."""

    def generate(self, key_bits: int) -> PrivateKey:
        """Return a ``phe`` private key whose modulus has exactly ``key_bits`` bits."""
        ...


def _private_key(p: int, q: int, key_bits: int) -> PrivateKey:
    n = p * q
    if p == q or n.bit_length() != key_bits or math.gcd(n, (p - 1) * (q - 1)) != 1:
        raise ValueError("the primes do not make a valid Paillier modulus")
    return phe_paillier.PaillierPrivateKey(phe_paillier.PaillierPublicKey(n), p, q)


class OpenSSLPrimes:
    """The production key generator: the two primes of an OpenSSL RSA key (pyca).

    The randomness is OpenSSL's CSPRNG and cannot be injected. pyca accepts key sizes from
    1024 bits.
    """

    def generate(self, key_bits: int) -> PrivateKey:
        numbers = rsa.generate_private_key(65537, key_bits).private_numbers()
        return _private_key(numbers.p, numbers.q, key_bits)


class SeededPrimes:
    """Primes searched from candidates drawn from an injected source (reproducible).

    Args:
        rng: where candidates come from. :class:`DeterministicRandom` makes the key a function
            of the seed (tests, simulations); with the OS CSPRNG it is fit for production but
            slower than :class:`OpenSSLPrimes` (pure Python).
    """

    def __init__(self, rng: RandomSource) -> None:
        self._rng = rng

    def generate(self, key_bits: int) -> PrivateKey:
        half = key_bits // 2
        while True:
            p, q = self._prime(half), self._prime(half)
            if p != q:
                return _private_key(p, q, key_bits)

    def _prime(self, bits: int) -> int:
        size = (bits + 7) // 8
        while True:
            candidate = int.from_bytes(self._rng.token_bytes(size), "big") >> (size * 8 - bits)
            # The top two bits set make p * q exactly 2 * bits long.
            candidate |= (3 << (bits - 2)) | 1
            if is_prime(candidate):
                return candidate
