"""Packing ring words into plaintexts, encryption helpers and the decryption proof."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from ..crypto import DeterministicRandom, RandomSource, canonical, sha256
from ..ring import WordArray, word_dtype
from .config import _PROOF_COEFFICIENT_BYTES, PaillierConfig


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _ints_digest(label: str, values: Iterable[int]) -> bytes:
    return sha256(canonical(label), *(canonical(_int_bytes(v)) for v in values))


def _pairs_bytes(pairs: Iterable[tuple[str, bytes]]) -> bytes:
    return b"".join(canonical(peer, digest) for peer, digest in pairs)


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(what)


def _positive_ints(values: Iterable[int], what: str) -> None:
    for value in values:
        _require(isinstance(value, int) and value > 0, f"{what} must be positive integers")


def pack(vector: npt.ArrayLike, config: PaillierConfig) -> tuple[int, ...]:
    """Pack ring words into plaintexts: word i goes to slot i % slots of plaintext i // slots.

    Slot 0 is the least significant. Known answer: with 35-bit slots, ``[1, 2]`` packs to
    ``1 + (2 << 35)``.
    """
    words = [int(v) for v in np.asarray(vector).tolist()]
    width, slots = config.slot_bits, config.slots
    plaintexts = []
    for start in range(0, len(words), slots):
        value = 0
        for word in reversed(words[start : start + slots]):
            value = (value << width) | word
        plaintexts.append(value)
    return tuple(plaintexts)


def unpack(plaintexts: Sequence[int], config: PaillierConfig) -> WordArray:
    """The sum vector, mod 2^bits, from summed plaintexts (inverse of :func:`pack`).

    Raises:
        ValueError: a plaintext has bits outside its used slots (some input was out of range).
    """
    if len(plaintexts) != config.ciphertext_count:
        raise ValueError(f"{len(plaintexts)} plaintexts, expected {config.ciphertext_count}")
    width, ring = config.slot_bits, (1 << config.round.bits) - 1
    slot_mask = (1 << width) - 1
    words: list[int] = []
    for index, value in enumerate(plaintexts):
        used = config.slots_used(index)
        if value < 0 or value >> (used * width):
            raise ValueError(f"plaintext {index} overflows its {used} slots")
        words.extend(((value >> (i * width)) & slot_mask) & ring for i in range(used))
    return np.array(words, dtype=word_dtype(config.round.bits))


def _random_unit(n: int, rng: RandomSource) -> int:
    """Uniform in Z_n^* (64 extra random bits make the modular bias negligible)."""
    size = (n.bit_length() + 7) // 8 + 8
    while True:
        r = int.from_bytes(rng.token_bytes(size), "big") % n
        if r > 0 and math.gcd(r, n) == 1:
            return r


def _ciphertext_problem(ciphertexts: Sequence[int], config: PaillierConfig, n: int) -> str | None:
    """Why ``ciphertexts`` cannot be this round's input (or aggregate), or None."""
    if len(ciphertexts) != config.ciphertext_count:
        return f"{len(ciphertexts)} ciphertexts, expected {config.ciphertext_count}"
    nsquare = n * n
    for index, c in enumerate(ciphertexts):
        # Outside Z*_{n^2} a "ciphertext" would zero or corrupt the whole product.
        if not 0 < c < nsquare or math.gcd(c, n) != 1:
            return f"ciphertext {index} is not a valid Paillier ciphertext for this key"
    return None


def _product(inputs: Iterable[Sequence[int]], count: int, nsquare: int) -> tuple[int, ...]:
    """Homomorphic sum: the coordinate-wise product of ciphertext vectors mod n^2."""
    total = [1] * count
    for ciphertexts in inputs:
        for j, c in enumerate(ciphertexts):
            total[j] = total[j] * c % nsquare
    return tuple(total)


def _proof_coefficients(
    config: PaillierConfig, aggregate_digest: bytes, plaintexts: Sequence[int]
) -> list[int]:
    """The decryption proof's coefficients: a hash of what the key holder claims."""
    seed = sha256(
        canonical(
            "secagg/paillier/decryption-proof/v1",
            config.digest,
            aggregate_digest,
            _ints_digest("plaintexts", plaintexts),
        )
    )
    stream = DeterministicRandom(seed).token_bytes(_PROOF_COEFFICIENT_BYTES * len(plaintexts))
    size = _PROOF_COEFFICIENT_BYTES
    return [int.from_bytes(stream[i : i + size], "big") for i in range(0, len(stream), size)]


def _proof_holds(
    config: PaillierConfig,
    n: int,
    aggregate: Sequence[int],
    aggregate_digest: bytes,
    plaintexts: Sequence[int],
    witness: int,
) -> bool:
    """``prod c_j^e_j * g^(-sum e_j M_j) == W^n (mod n^2)``: see the module docstring."""
    if len(plaintexts) != len(aggregate) or not 0 < witness < n or math.gcd(witness, n) != 1:
        return False
    if any(not 0 <= m < n for m in plaintexts):
        return False
    nsquare = n * n
    coefficients = _proof_coefficients(config, aggregate_digest, plaintexts)
    combined = 1
    claimed = 0
    for c, m, e in zip(aggregate, plaintexts, coefficients, strict=True):
        combined = combined * pow(c, e, nsquare) % nsquare
        claimed += e * m
    # (n + 1)^(-x) = 1 - x n (mod n^2)
    unblinded = combined * (1 - (claimed % n) * n) % nsquare
    return unblinded == pow(witness, n, nsquare)


def endorsement_payload(
    digest: bytes, contributions: Sequence[tuple[str, bytes]], aggregate_digest: bytes
) -> bytes:
    """What a contributor signs: the inputs (sender, digest) and the product it recomputed."""
    return canonical(
        "secagg/paillier/endorse/v1", digest, _pairs_bytes(contributions), aggregate_digest
    )
