"""The succinct check of an aggregate: λ random 0/1 linear functionals over Z_{2^bits}.

Theory of operation
-------------------
Every verifier must be convinced that the published aggregate z equals Σ_i y_i + C, the sum of
the survivors' signed masked inputs plus the mask correction C that the revealed seeds define
(:func:`secagg.masking.mask_correction`), without receiving any y_i. After the aggregator has
fixed z and everything else it publishes (the *statement*, :mod:`secagg.succinct`), a
challenge key is derived from the statement's digest (Fiat–Shamir, :func:`challenge_key`).
The key expands (AES-256-CTR, the mask PRG's cipher) into λ pseudo-random 0/1 vectors
r_1..r_λ of length m. Each survivor signs a_ij = ⟨r_j, y_i⟩ mod 2^bits over its own y_i;
every verifier checks, for all j,

    Σ_i a_ij  =  ⟨r_j, z − C⟩   (mod 2^bits).

Soundness. Let e = Σ_i y_i + C − z ≠ 0 be the error of a wrong aggregate (fixed by the
statement: the y_i by their signed digests, C by the committed seeds). Write e = 2^v·e' with
some coordinate e'_c odd (v < bits). Then ⟨r, e⟩ = 0 mod 2^bits forces ⟨r, e'⟩ = 0 mod 2, i.e.
Σ_{c: e'_c odd} r_c = 0 mod 2, which for uniform independent bits r_c has probability exactly
1/2. So each functional misses a wrong z with probability at most 1/2 whatever e is (and
exactly 1/2 for e = 2^{bits−1}·unit vector: no choice of distribution over Z_{2^bits} does
better per functional), and λ independent functionals miss it with probability ≤ 2^−λ.
The aggregator can grind: each statement it tries costs one hash and is an independent draw
(random-oracle model for HKDF/SHA-256 and AES-CTR as a PRG), so after q tries its chance is
≤ q·2^−λ. With λ = :data:`LAMBDA` = 128, 2^64 tries leave ≤ 2^−64.

Evaluation. The bits are read as 16 bytes per coordinate: bit j of coordinate c is bit (j % 8)
of byte 16c + j // 8 of the keystream. For each of the 16 byte positions, a weighted
``bincount`` sums the vector's words into 256 buckets by that byte's value, and a 256×8 0/1
table turns the buckets into the 8 answers of that byte. Words enter as float64 in 32-bit
limbs over chunks of 2^15 coordinates, so every partial sum stays below 2^47 < 2^53 and is
exact. The bucket indices are the keystream's bytes themselves (a strided uint8 view: numpy's
``bincount`` is about twice as fast on uint8 as on intp indices), and the keystream is written
into one reused buffer (a fresh 16-byte-per-coordinate buffer per chunk cost more in page
faults than the AES itself). About 0.03 s of CPU per 10^6 coordinates (BENCHMARKS.md), against
about 0.01 s for expanding and adding ten masks of that length (AES-NI).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from .crypto import canonical, hkdf_sha256
from .errors import ConfigError
from .ring import WordArray

__all__ = [
    "LAMBDA",
    "challenge_bits",
    "challenge_key",
    "linear_answers",
    "sum_answers",
]

LAMBDA = 128
"""Independent functionals per check: soundness error ≤ q·2^-128 after q grinding tries."""

_CHALLENGE_INFO = b"secagg/linear-check/challenge/v1"
_BYTES_PER_COORDINATE = LAMBDA // 8
# Coordinates per bincount: 2^15 · (2^32 - 1) < 2^53 keeps every sum exact, and the chunk's
# 512 KiB of keystream stays in cache (2^14..2^16 measured alike, 2^13 slower).
_CHUNK = 1 << 15
_LIMB_BITS = 32
# _BIT_TABLE[v, b] = bit b of v: turns a byte position's 256 bucket sums into 8 answers.
_BIT_TABLE = ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1).astype(np.float64)
_ZERO_IV = bytes(16)


def challenge_key(config_digest: bytes, statement_digest: bytes) -> bytes:
    """The key of the round's challenge, derived from everything the aggregator published.

    ``config_digest`` binds session, round, attempt, beacon and parameters; the statement
    digest binds the aggregate and the vector-less transcript (:mod:`secagg.succinct`).
    """
    return hkdf_sha256(statement_digest, canonical(_CHALLENGE_INFO.decode(), config_digest))


def _keystream(key: bytes) -> CipherContext:
    if len(key) != 32:
        raise ConfigError(f"challenge keys are 32 bytes, not {len(key)}")
    return Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()


def challenge_bits(key: bytes, length: int) -> npt.NDArray[np.uint8]:
    """The λ × ``length`` 0/1 challenge matrix in full (reference and tests; the check itself
    never materializes it)."""
    encryptor = _keystream(key)
    raw = encryptor.update(bytes(length * _BYTES_PER_COORDINATE))
    per_coordinate = np.frombuffer(raw, dtype=np.uint8).reshape(length, _BYTES_PER_COORDINATE)
    return np.unpackbits(per_coordinate, axis=1, bitorder="little").T.copy()


def linear_answers(key: bytes, vector: WordArray) -> tuple[int, ...]:
    """(⟨r_1, vector⟩, …, ⟨r_λ, vector⟩) mod 2^bits for the challenge of ``key``.

    ``vector`` is a one-dimensional array of ring words (uint32 or uint64).
    """
    if vector.ndim != 1 or vector.dtype not in (np.uint32, np.uint64):
        raise ConfigError(f"a vector of ring words is needed, not {vector.dtype}{vector.shape}")
    bits = vector.dtype.itemsize * 8
    encryptor = _keystream(key)
    limbs = [
        (_LIMB_BITS * limb, np.uint64(_LIMB_BITS * limb)) for limb in range(bits // _LIMB_BITS)
    ]
    totals = [0] * LAMBDA
    sums = np.empty((_BYTES_PER_COORDINATE, 256))
    zeros = bytes(min(vector.size, _CHUNK) * _BYTES_PER_COORDINATE)
    # update_into wants room for a block more than it writes.
    keystream = bytearray(len(zeros) + 15)
    for start in range(0, vector.size, _CHUNK):
        chunk = vector[start : start + _CHUNK]
        size = chunk.size * _BYTES_PER_COORDINATE
        encryptor.update_into(memoryview(zeros)[:size], keystream)
        # Column p: byte p of every coordinate's 16 challenge bytes, the bucket indices.
        columns = np.frombuffer(keystream, dtype=np.uint8, count=size).reshape(
            chunk.size, _BYTES_PER_COORDINATE
        )
        for shift, word_shift in limbs:
            if bits == _LIMB_BITS:
                part = chunk.astype(np.float64)
            else:  # widened chunk by chunk: a whole uint64 copy would double memory
                wide = chunk.astype(np.uint64, copy=False)
                part = ((wide >> word_shift) & np.uint64(0xFFFFFFFF)).astype(np.float64)
            for p in range(_BYTES_PER_COORDINATE):
                sums[p] = np.bincount(columns[:, p], weights=part, minlength=256)
            exact = np.rint(sums @ _BIT_TABLE).astype(np.uint64).ravel()  # < 2^47: exact
            for j, value in enumerate(exact.tolist()):
                totals[j] += value << shift
    modulus = (1 << bits) - 1
    return tuple(total & modulus for total in totals)


def sum_answers(answers: list[tuple[int, ...]], bits: int) -> tuple[int, ...]:
    """Σ_i a_ij mod 2^bits, per functional j."""
    modulus = (1 << bits) - 1
    totals = [0] * LAMBDA
    for row in answers:
        for j, value in enumerate(row):
            totals[j] += value
    return tuple(total & modulus for total in totals)
