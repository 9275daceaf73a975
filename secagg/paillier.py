"""Paillier aggregation: the comparison backend to SecAgg, as sans-I/O state machines.

Theory of operation
-------------------
Each round has a *key holder* (a roster peer, rotating) and an *aggregator* (another peer).

1. **Key** — the key holder makes a fresh Paillier key pair and signs the modulus
   (:class:`KeyAnnouncement`); the aggregator relays it to every peer.
2. **Input** — each peer packs its quantized vector into plaintexts (several ring words per
   plaintext, see *Packing*), encrypts them and signs the ciphertexts (:class:`EncryptedInput`).
   A peer that does not send in time is simply not in the sum: no recovery step is needed.
3. **Endorse** — the aggregator multiplies the ciphertexts (adding the plaintexts) and shows
   every contributor *except the key holder* all the signed inputs (:class:`InputsToCheck`).
   Each contributor checks the signatures, that its own input is there unaltered and that at
   least t peers contributed, recomputes the product itself and signs it
   (:class:`Endorsement`).
4. **Decrypt** — the aggregator sends the key holder the product, the list of contributors
   (with digests of their inputs, not the inputs) and the endorsements
   (:class:`DecryptionRequest`). The key holder decrypts only a product that at least t
   contributors endorsed, exactly once per key, and returns the plaintexts with a proof of
   correct decryption, signed (:class:`DecryptedSum`).

Afterwards the aggregator publishes a :class:`PaillierTranscript` to every peer except the
key holder, which gets a :class:`RedactedPaillierTranscript` (input digests, not inputs);
:func:`verify_paillier_transcript` re-multiplies the published ciphertexts, checks that the
product is what the key holder decrypted, checks the decryption proof and every signature.
:class:`PaillierPeer` bundles one peer's roles behind ``start``/``receive``.

Trust assumption (and what is *not* assumed)
--------------------------------------------
* Privacy: the aggregator and the key holder must not collude. The key holder can decrypt any
  single ciphertext it is given, so individual ciphertexts must never reach it: the aggregator
  sends it only the product, and :meth:`PaillierAggregator.transcript` gives it a redacted
  transcript (a key holder handed the full one reports the leak, naming the aggregator).
  Were they to collude, every input would be revealed.
* A lone malicious aggregator cannot get a single input decrypted: the key holder decrypts
  only a product endorsed by t contributors, each of whom recomputed it from t or more signed
  inputs (the same guarantee as SecAgg's consistency check: only sums over at least t inputs
  are ever revealed, colluding peers' inputs included). Because the key holder decrypts once
  per key and every round has a fresh key, two overlapping sums cannot be subtracted.
* Correctness does *not* rest on the key holder: Paillier lets the decryptor recover the
  encryption randomness, so it proves its decryption (see *Decryption proof*) and every peer
  checks it. A wrong sum is detected and attributed to the key holder by its signature.
* A malicious contributor can add anything to the sum (as in SecAgg; no range proofs). If its
  plaintext overflows the packing, the round aborts without naming anyone (it cannot be told
  apart from the others without their keys).
* The key holder cannot vouch for the product (it never sees the inputs), so t endorsements
  must come from the other contributors: Paillier tolerates ``n - 1 - t`` missing peers where
  SecAgg tolerates ``n - t`` (with three peers and t = 2: none).

Packing
-------
A Paillier plaintext is an integer below the modulus n (``key_bits`` bits). Each ring word gets
a slot of ``bits + n_peers.bit_length()`` bits, so that the sum of up to ``n_peers`` words never
carries into the next slot; ``(key_bits - 1) // slot_bits`` slots fit below n (60 of 34 bits
for a 2048-bit key and three peers). One ciphertext then carries 60 coordinates instead of
one, which makes encryption, transfer and decryption ~60 times cheaper. ``packed=False``
encrypts one coordinate per ciphertext (for comparison). Slot sums are exact integers; the
aggregate is reduced mod 2^bits afterwards, like SecAgg's. (The published plaintexts thus show
the integer sum, which says more than the ring sum only if the inputs wrap the ring; the
quantizer's headroom rules that out.)

Decryption proof
----------------
For ciphertext c = g^M r^n mod n^2 (g = n + 1) the key holder knows the factorisation of n
and can compute r. It proves all plaintexts at once: with coefficients e_j (128 bits each,
hashed from the round, the product and the claimed plaintexts, so it cannot choose them),
C* = prod c_j^e_j encrypts sum e_j M_j with randomness W = prod r_j^e_j, and the key holder
publishes W. A verifier checks ``C* * g^(-sum e_j M_j) == W^n (mod n^2)``: the left side is an
n-th residue only if every claimed M_j is right, except with probability 2^-128 (an error in
some M_j survives only if sum e_j (M_j - M'_j) = 0 mod p or mod q). Revealing W reveals
nothing about individual inputs: it is a product over all of them, like the sum itself.

Randomness
----------
Encryption randomness and the proof coefficients are injected (:class:`RandomSource`; phe's
``raw_encrypt`` accepts the randomness). Key generation is pluggable
(:class:`PaillierKeyGenerator`): phe's own ``generate_paillier_keypair`` draws from
``random.SystemRandom`` and accepts no source, so it is not used. The production default
:class:`OpenSSLPrimes` takes the two primes of an RSA key from pyca ``cryptography``
(OpenSSL's prime generation and CSPRNG: fast and vetted, but its randomness cannot be
injected). :class:`SeededPrimes` searches primes from candidates drawn from an injected
:class:`RandomSource` (reproducible with :class:`DeterministicRandom` in tests and
simulations); its primality test is phe's (trial division and 25 Miller-Rabin rounds whose
witnesses come from Python's ``random`` module; witnesses are public, so that is harmless).

Key sizes: 2048 bits by default and at least :data:`MIN_KEY_BITS`; smaller keys are refused
unless ``insecure_small_keys=True``, which only tests and quick benchmarks set.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric import rsa
from phe import paillier as phe_paillier
from phe.util import is_prime

from .aggregator import AggregatorState
from .config import RoundConfig
from .crypto import DeterministicRandom, RandomSource, Signer, Verifier, canonical, sha256
from .errors import (
    ConfigError,
    InvalidSignatureError,
    LocalProtocolError,
    RemoteProtocolError,
    RoundAborted,
    SecAggError,
)
from .ring import WordArray, word_dtype
from .simulate import peer_ids, test_identities
from .transcript import TranscriptError, VerifiedAggregate

__all__ = [
    "DEFAULT_KEY_BITS",
    "MIN_KEY_BITS",
    "DecryptedSum",
    "DecryptionRequest",
    "EncryptedInput",
    "Endorsement",
    "InputsToCheck",
    "KeyAnnouncement",
    "KeyHolderState",
    "OpenSSLPrimes",
    "PaillierAggregator",
    "PaillierAggregatorMessage",
    "PaillierAggregatorState",
    "PaillierConfig",
    "PaillierKeyGenerator",
    "PaillierKeyHolder",
    "PaillierParticipant",
    "PaillierParticipantMessage",
    "PaillierParticipantState",
    "PaillierPeer",
    "PaillierResult",
    "PaillierSimulationResult",
    "PaillierStage",
    "PaillierTranscript",
    "RedactedPaillierTranscript",
    "SeededPrimes",
    "aggregate_digest",
    "endorsement_payload",
    "message_size",
    "pack",
    "simulate_paillier",
    "unpack",
    "verify_paillier_transcript",
]

DEFAULT_KEY_BITS = 2048
MIN_KEY_BITS = 2048
# Below this a prime factor would be shorter than the proof's 128-bit coefficients.
_SMALLEST_TEST_KEY_BITS = 512
_PROOF_COEFFICIENT_BYTES = 16
AGGREGATOR = "aggregator"

PrivateKey = Any  # phe.paillier.PaillierPrivateKey (phe ships no type information)
PublicKey = Any  # phe.paillier.PaillierPublicKey


# ====================================================================== configuration


@dataclass(frozen=True)
class PaillierConfig:
    """The Paillier parameters of one round, on top of the shared :class:`RoundConfig`.

    ``digest`` hashes the round configuration's digest with everything here; it is bound into
    every signature, so a message from another session, round, key holder, key size or
    packing never verifies.

    Args:
        round: the round's parameters (roster, t, vector length, ring bits). Its threshold t
            is the least number of contributors and of endorsements; the graph is unused.
        key_holder: the roster peer that makes the key and decrypts the sum.
        key_bits: Paillier modulus size. At least :data:`MIN_KEY_BITS`.
        packed: several ring words per plaintext (the default) or one.
        insecure_small_keys: allow keys down to 512 bits. For tests and quick benchmarks only.

    Raises:
        ConfigError: an invalid parameter.
    """

    round: RoundConfig
    key_holder: str
    key_bits: int = DEFAULT_KEY_BITS
    packed: bool = True
    insecure_small_keys: bool = field(default=False, compare=False)
    slot_bits: int = field(init=False)
    slots: int = field(init=False)
    ciphertext_count: int = field(init=False)
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        config = self.round
        if not config.is_member(self.key_holder):
            raise ConfigError(f"key holder {self.key_holder!r} is not in the roster")
        smallest = _SMALLEST_TEST_KEY_BITS if self.insecure_small_keys else MIN_KEY_BITS
        if self.key_bits < smallest or self.key_bits % 2:
            raise ConfigError(
                f"Paillier keys must have an even number of bits, at least {smallest}, "
                f"not {self.key_bits}"
                + ("" if self.insecure_small_keys else " (smaller keys are for tests only)")
            )
        if config.threshold > len(config.peers) - 1:
            raise ConfigError(
                f"threshold {config.threshold} needs {config.threshold} endorsements from peers "
                f"other than the key holder, but the roster has only {len(config.peers) - 1}"
            )
        # n_peers < 2^headroom, so a slot holds the sum of n_peers words below 2^bits.
        slot_bits = config.bits + len(config.peers).bit_length()
        # n >= 2^(key_bits-1): a packed value below 2^(key_bits-1) never wraps mod n.
        slots = (self.key_bits - 1) // slot_bits if self.packed else 1
        object.__setattr__(self, "slot_bits", slot_bits)
        object.__setattr__(self, "slots", slots)
        object.__setattr__(self, "ciphertext_count", -(-config.vector_length // slots))
        object.__setattr__(
            self,
            "digest",
            sha256(
                canonical(
                    "secagg/paillier/config/v1",
                    config.digest,
                    self.key_holder,
                    self.key_bits,
                    slot_bits,
                    slots,
                )
            ),
        )

    @property
    def session_id(self) -> str:
        return self.round.session_id

    @property
    def round_number(self) -> int:
        return self.round.round

    def slots_used(self, index: int) -> int:
        """How many coordinates plaintext ``index`` carries (the last one may be partial)."""
        return min(self.slots, self.round.vector_length - index * self.slots)


# ====================================================================== key generation


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


# ====================================================================== encoding helpers


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


# ====================================================================== messages


@dataclass(frozen=True, slots=True)
class KeyAnnouncement:
    """Key stage: the key holder's fresh Paillier modulus, signed."""

    sender: str
    session_id: str
    round: int
    modulus: int
    signature: bytes

    def __post_init__(self) -> None:
        _require(isinstance(self.modulus, int) and self.modulus > 3, "modulus must be > 3")

    def signed_payload(self, digest: bytes) -> bytes:
        return canonical("secagg/paillier/key/v1", digest, self.sender, _int_bytes(self.modulus))


@dataclass(frozen=True, slots=True)
class EncryptedInput:
    """Input stage: the sender's packed vector, encrypted, signed."""

    sender: str
    session_id: str
    round: int
    ciphertexts: tuple[int, ...]
    signature: bytes

    def __post_init__(self) -> None:
        _positive_ints(self.ciphertexts, "ciphertexts")

    def input_digest(self) -> bytes:
        return _ints_digest("secagg/paillier/input-digest/v1", self.ciphertexts)

    def signed_payload(self, digest: bytes) -> bytes:
        return canonical("secagg/paillier/input/v1", digest, self.sender, self.input_digest())


@dataclass(frozen=True, slots=True)
class Endorsement:
    """Endorse stage: the sender vouches for the product it recomputed (see
    :func:`endorsement_payload`)."""

    sender: str
    session_id: str
    round: int
    signature: bytes


@dataclass(frozen=True, slots=True)
class DecryptedSum:
    """Decrypt stage: the summed plaintexts, the proof witness, signed by the key holder over
    the contributions and the product it decrypted."""

    sender: str
    session_id: str
    round: int
    plaintexts: tuple[int, ...]
    witness: int
    signature: bytes

    def __post_init__(self) -> None:
        _require(all(isinstance(m, int) and m >= 0 for m in self.plaintexts), "bad plaintexts")
        _require(isinstance(self.witness, int) and self.witness > 0, "witness must be positive")

    def signed_payload(
        self, digest: bytes, contributions: Sequence[tuple[str, bytes]], aggregate_digest: bytes
    ) -> bytes:
        return canonical(
            "secagg/paillier/decrypted/v1",
            digest,
            self.sender,
            _pairs_bytes(contributions),
            aggregate_digest,
            _ints_digest("plaintexts", self.plaintexts),
            _int_bytes(self.witness),
        )


PaillierParticipantMessage = KeyAnnouncement | EncryptedInput | Endorsement | DecryptedSum


@dataclass(frozen=True, slots=True)
class InputsToCheck:
    """Endorse stage, aggregator -> each contributor but the key holder: every signed input."""

    session_id: str
    round: int
    inputs: tuple[EncryptedInput, ...]


@dataclass(frozen=True, slots=True)
class DecryptionRequest:
    """Decrypt stage, aggregator -> key holder: the product, whose it is, and endorsements.

    ``contributions`` lists (sender, input digest) in roster order: digests, never inputs.
    """

    session_id: str
    round: int
    contributions: tuple[tuple[str, bytes], ...]
    aggregate: tuple[int, ...]
    endorsements: tuple[Endorsement, ...]

    def __post_init__(self) -> None:
        _positive_ints(self.aggregate, "aggregate ciphertexts")


# The aggregator relays the KeyAnnouncement itself in the key stage.
PaillierAggregatorMessage = KeyAnnouncement | InputsToCheck | DecryptionRequest


def aggregate_digest(aggregate: Sequence[int]) -> bytes:
    return _ints_digest("secagg/paillier/aggregate/v1", aggregate)


def _contributions(
    inputs: Mapping[str, EncryptedInput], config: PaillierConfig
) -> tuple[tuple[str, bytes], ...]:
    return tuple((u, inputs[u].input_digest()) for u in config.round.peers if u in inputs)


def message_size(message: PaillierParticipantMessage | PaillierAggregatorMessage) -> int:
    """Bytes of payload a message carries on the wire (ids, integers at their key's width)."""

    def ints(values: Iterable[int]) -> int:
        return sum(len(_int_bytes(v)) for v in values)

    if isinstance(message, KeyAnnouncement):
        return len(message.sender) + ints([message.modulus]) + len(message.signature)
    if isinstance(message, EncryptedInput):
        return len(message.sender) + ints(message.ciphertexts) + len(message.signature)
    if isinstance(message, Endorsement):
        return len(message.sender) + len(message.signature)
    if isinstance(message, DecryptedSum):
        size = ints(message.plaintexts) + ints([message.witness]) + len(message.signature)
        return len(message.sender) + size
    if isinstance(message, InputsToCheck):
        return sum(message_size(m) for m in message.inputs)
    contributions = sum(len(u) + len(d) for u, d in message.contributions)
    endorsements = sum(message_size(e) for e in message.endorsements)
    return contributions + ints(message.aggregate) + endorsements


# ====================================================================== shared checks


class _Checks:
    """Checks every role makes on relayed messages; ``offender`` is who relayed them."""

    def __init__(self, config: PaillierConfig, verifiers: Mapping[str, Verifier]) -> None:
        self.config = config
        self.verifiers = verifiers

    def round_of(self, message: Any, offender: str, what: str = "message") -> None:
        config = self.config
        if (message.session_id, message.round) != (config.session_id, config.round_number):
            raise RemoteProtocolError(
                offender,
                f"{what} for session {message.session_id!r} round {message.round}, this is "
                f"session {config.session_id!r} round {config.round_number} "
                "(replayed or misrouted)",
            )

    def key(self, message: KeyAnnouncement, offender: str) -> PublicKey:
        config = self.config
        if message.sender != config.key_holder:
            raise RemoteProtocolError(
                offender, f"key announced by {message.sender!r}, not key holder {config.key_holder}"
            )
        self.round_of(message, offender, "key announcement")
        if not self.verifiers[config.key_holder].verify(
            message.signature, message.signed_payload(config.digest)
        ):
            raise InvalidSignatureError(offender, "key announcement has an invalid signature")
        n = message.modulus
        if n.bit_length() != config.key_bits or n % 2 == 0:
            raise RemoteProtocolError(
                offender, f"key has {n.bit_length()} bits, the round uses {config.key_bits}"
            )
        return phe_paillier.PaillierPublicKey(n)

    def encrypted_input(self, message: EncryptedInput, n: int, offender: str) -> None:
        """``offender`` is the sender when it arrives directly, the relay otherwise."""
        sender = message.sender
        if not self.config.round.is_member(sender) or sender not in self.verifiers:
            raise RemoteProtocolError(offender, f"input of {sender!r}, who is not in the roster")
        self.round_of(message, offender, f"input of {sender}")
        problem = _ciphertext_problem(message.ciphertexts, self.config, n)
        if problem is not None:
            raise RemoteProtocolError(offender, f"input of {sender}: {problem}")
        if not self.verifiers[sender].verify(
            message.signature, message.signed_payload(self.config.digest)
        ):
            raise InvalidSignatureError(offender, f"input of {sender} has an invalid signature")

    def endorsements(
        self,
        endorsements: Sequence[Endorsement],
        contributions: Sequence[tuple[str, bytes]],
        product_digest: bytes,
        offender: str,
    ) -> None:
        config = self.config
        contributors = {u for u, _ in contributions}
        payload = endorsement_payload(config.digest, contributions, product_digest)
        seen: set[str] = set()
        for endorsement in endorsements:
            signer = endorsement.sender
            if signer in seen or signer not in contributors or signer == config.key_holder:
                raise RemoteProtocolError(offender, f"endorsement of {signer!r} is not expected")
            self.round_of(endorsement, offender, f"endorsement of {signer}")
            if not self.verifiers[signer].verify(endorsement.signature, payload):
                raise InvalidSignatureError(
                    offender, f"endorsement of {signer} is not over these inputs and product"
                )
            seen.add(signer)
        if len(seen) < config.round.threshold:
            raise RemoteProtocolError(
                offender, f"only {len(seen)} endorsements, threshold is {config.round.threshold}"
            )


# ====================================================================== key holder


class KeyHolderState(StrEnum):
    NEW = "new"
    PUBLISHED = "published"  # sent its key, waits for the decryption request
    DONE = "done"
    FAILED = "failed"


class PaillierKeyHolder:
    """The key holder's side of one round: one key, at most one decryption.

        kh = PaillierKeyHolder(config, "hospital-b", signer, verifiers, OpenSSLPrimes())
        send(kh.start())                 # KeyAnnouncement
        send(kh.receive(request))        # DecryptedSum; kh.state is DONE, the key is dropped
        kh.verified                      # the sum and its contributors, for agreement

    The key holder peer also contributes its own input through a separate
    :class:`PaillierParticipant`. It must never be given individual ciphertexts.

    Args:
        config: the round's parameters; ``config.key_holder`` must be ``me``.
        me: this peer's id.
        signer: signs with this institution's key.
        verifiers: every roster peer's signature verifier.
        keygen: makes the key pair (default :class:`OpenSSLPrimes`).
        aggregator: the aggregator's peer id, used to name it in errors.
    """

    def __init__(
        self,
        config: PaillierConfig,
        me: str,
        signer: Signer,
        verifiers: Mapping[str, Verifier],
        keygen: PaillierKeyGenerator | None = None,
        aggregator: str = AGGREGATOR,
    ) -> None:
        if me != config.key_holder:
            raise LocalProtocolError(f"{me} is not the key holder of this round")
        if aggregator == me:
            raise ConfigError("the key holder cannot also be the aggregator")
        missing = [u for u in config.round.peers if u not in verifiers]
        if missing:
            raise LocalProtocolError(f"no signature verifier for {missing}")
        self.config = config
        self.me = me
        self.aggregator = aggregator
        self.state = KeyHolderState.NEW
        self.verified: VerifiedAggregate | None = None
        self._signer = signer
        self._checks = _Checks(config, verifiers)
        self._keygen: PaillierKeyGenerator = keygen if keygen is not None else OpenSSLPrimes()
        self._private: PrivateKey | None = None

    def start(self) -> KeyAnnouncement:
        """Make a fresh key pair and sign the public modulus."""
        if self.state is not KeyHolderState.NEW:
            state, self.state = self.state, KeyHolderState.FAILED
            raise LocalProtocolError(f"start() called in state {state.value}")
        self._private = self._keygen.generate(self.config.key_bits)
        unsigned = KeyAnnouncement(
            self.me,
            self.config.session_id,
            self.config.round_number,
            self._private.public_key.n,
            b"",
        )
        signature = self._signer.sign(unsigned.signed_payload(self.config.digest))
        self.state = KeyHolderState.PUBLISHED
        return replace(unsigned, signature=signature)

    def receive(self, message: PaillierAggregatorMessage) -> DecryptedSum:
        """Decrypt the endorsed product, once.

        Raises:
            RemoteProtocolError: the request is not one an honest aggregator sends (names the
                aggregator); including any second request.
            RoundAborted: the product decrypts outside the packing (a contributor encrypted an
                out-of-range value; nobody can be named).
            LocalProtocolError: called before ``start()`` or after a failure.
        In every case the key holder is FAILED and its private key is dropped.
        """
        if self.state in (KeyHolderState.NEW, KeyHolderState.FAILED):
            state, self.state = self.state, KeyHolderState.FAILED
            self._private = None
            raise LocalProtocolError(f"{type(message).__name__} delivered in state {state.value}")
        handler = _KEY_HOLDER_TRANSITIONS.get((self.state, type(message)))
        try:
            if handler is None:
                raise RemoteProtocolError(
                    self.aggregator,
                    f"unexpected {type(message).__name__} in state {self.state.value}"
                    + (
                        " (the key holder must never see individual inputs)"
                        if isinstance(message, InputsToCheck)
                        else ""
                    ),
                )
            reply, next_state = handler(self, message)
        except SecAggError:
            self.state = KeyHolderState.FAILED
            self._private = None
            raise
        self.state = next_state
        return reply

    def _on_request(self, message: DecryptionRequest) -> tuple[DecryptedSum, KeyHolderState]:
        config, agg = self.config, self.aggregator
        assert self._private is not None
        n = self._private.public_key.n
        self._checks.round_of(message, agg, "decryption request")
        contributors = [u for u, _ in message.contributions]
        if len(set(contributors)) != len(contributors) or any(
            not config.round.is_member(u) for u in contributors
        ):
            raise RemoteProtocolError(agg, "decryption request lists unknown or repeated peers")
        if contributors != sorted(contributors, key=config.round.index):
            raise RemoteProtocolError(agg, "decryption request lists peers out of roster order")
        if any(len(d) != 32 for _, d in message.contributions):
            raise RemoteProtocolError(agg, "decryption request has malformed input digests")
        if len(contributors) < config.round.threshold:
            raise RemoteProtocolError(
                agg,
                f"asked to decrypt a sum of {len(contributors)} inputs, "
                f"threshold is {config.round.threshold}",
            )
        problem = _ciphertext_problem(message.aggregate, config, n)
        if problem is not None:
            raise RemoteProtocolError(agg, f"aggregate: {problem}")
        product_digest = aggregate_digest(message.aggregate)
        self._checks.endorsements(message.endorsements, message.contributions, product_digest, agg)

        private = self._private
        plaintexts = tuple(private.raw_decrypt(c) for c in message.aggregate)
        try:
            aggregate = unpack(plaintexts, config)
        except ValueError as error:
            raise RoundAborted(
                f"the endorsed sum does not decode ({error}): a contributor encrypted a value "
                "outside the packing; the inputs cannot tell who"
            ) from None
        witness = self._witness(message.aggregate, product_digest, plaintexts)
        unsigned = DecryptedSum(
            self.me, config.session_id, config.round_number, plaintexts, witness, b""
        )
        signature = self._signer.sign(
            unsigned.signed_payload(config.digest, message.contributions, product_digest)
        )
        # One decryption per key: a second, overlapping sum would reveal the difference.
        self._private = None
        self.verified = VerifiedAggregate(
            aggregate,
            tuple(contributors),
            tuple(u for u in config.round.peers if u not in set(contributors)),
        )
        return replace(unsigned, signature=signature), KeyHolderState.DONE

    def _witness(self, aggregate: Sequence[int], digest: bytes, plaintexts: Sequence[int]) -> int:
        """W = (prod c_j^e_j mod n)^(n^-1 mod phi(n)) mod n, by CRT."""
        private = self._private
        assert private is not None
        p, q, n = private.p, private.q, private.public_key.n
        coefficients = _proof_coefficients(self.config, digest, plaintexts)
        combined = 1
        for c, e in zip(aggregate, coefficients, strict=True):
            combined = combined * pow(c % n, e, n) % n
        wp = pow(combined % p, pow(n, -1, p - 1), p)
        wq = pow(combined % q, pow(n, -1, q - 1), q)
        return int(wp + p * ((wq - wp) * pow(p, -1, q) % q))


_KeyHolderHandler = Callable[[PaillierKeyHolder, Any], tuple[DecryptedSum, KeyHolderState]]
_KEY_HOLDER_TRANSITIONS: dict[tuple[KeyHolderState, type], _KeyHolderHandler] = {
    (KeyHolderState.PUBLISHED, DecryptionRequest): cast(
        _KeyHolderHandler, PaillierKeyHolder._on_request
    ),
}


# ====================================================================== participant


class PaillierParticipantState(StrEnum):
    WAITING_KEY = "waiting-key"
    ENCRYPTED = "encrypted"  # sent EncryptedInput, waits for InputsToCheck
    DONE = "done"
    FAILED = "failed"


class PaillierParticipant:
    """One peer's side of one round (the key holder peer has one too).

        p = PaillierParticipant(config, "hospital-a", signer, verifiers, x, rng, "hospital-c")
        send(p.receive(key_announcement))  # EncryptedInput (heavy: run it off the event loop)
        send(p.receive(inputs_to_check))   # Endorsement; p.state is DONE
        # the key holder's participant is DONE after its EncryptedInput

    Args:
        config: the round's parameters.
        me: this peer's id (in the roster).
        signer: signs with this institution's key.
        verifiers: every roster peer's signature verifier.
        x: this peer's quantized input: ``vector_length`` words of the ring.
        rng: the source of the encryption randomness.
        aggregator: the aggregator's peer id; it must not be the key holder.
    """

    def __init__(
        self,
        config: PaillierConfig,
        me: str,
        signer: Signer,
        verifiers: Mapping[str, Verifier],
        x: npt.ArrayLike,
        rng: RandomSource,
        aggregator: str = AGGREGATOR,
    ) -> None:
        if not config.round.is_member(me):
            raise LocalProtocolError(f"{me} is not in the roster of this round")
        if aggregator == config.key_holder:
            raise ConfigError(
                f"{aggregator} cannot be both aggregator and key holder: it could decrypt "
                "every input"
            )
        missing = [u for u in config.round.peers if u not in verifiers]
        if missing:
            raise LocalProtocolError(f"no signature verifier for {missing}")
        vector = np.asarray(x)
        dtype = word_dtype(config.round.bits)
        if vector.shape != (config.round.vector_length,) or vector.dtype != dtype:
            raise LocalProtocolError(
                f"input must be a {dtype} vector of length {config.round.vector_length}, "
                f"not {vector.dtype} of shape {vector.shape}"
            )
        self.config = config
        self.me = me
        self.aggregator = aggregator
        self.state = PaillierParticipantState.WAITING_KEY
        self.sent_input: EncryptedInput | None = None
        self._signer = signer
        self._checks = _Checks(config, verifiers)
        self._x = vector
        self._rng = rng
        self._n = 0

    def receive(self, message: PaillierAggregatorMessage) -> PaillierParticipantMessage:
        """Handle the aggregator's next message and return the reply to send.

        Raises:
            RemoteProtocolError: the aggregator (or a relayed peer) broke the protocol,
                including a message the current state does not expect.
            LocalProtocolError: a message after the participant FAILED.
        In both cases the participant is FAILED and sends nothing more.
        """
        if self.state is PaillierParticipantState.FAILED:
            raise LocalProtocolError(f"{type(message).__name__} delivered in state failed")
        handler = _PARTICIPANT_TRANSITIONS.get((self.state, type(message)))
        if handler is None:
            state, self.state = self.state, PaillierParticipantState.FAILED
            raise RemoteProtocolError(
                self.aggregator, f"unexpected {type(message).__name__} in state {state.value}"
            )
        try:
            reply, next_state = handler(self, message)
        except SecAggError:
            self.state = PaillierParticipantState.FAILED
            raise
        self.state = next_state
        return reply

    def _on_key(self, message: KeyAnnouncement) -> tuple[EncryptedInput, PaillierParticipantState]:
        public_key = self._checks.key(message, self.aggregator)
        self._n = public_key.n
        ciphertexts = tuple(
            public_key.raw_encrypt(m, r_value=_random_unit(self._n, self._rng))
            for m in pack(self._x, self.config)
        )
        unsigned = EncryptedInput(
            self.me, self.config.session_id, self.config.round_number, ciphertexts, b""
        )
        signature = self._signer.sign(unsigned.signed_payload(self.config.digest))
        self.sent_input = replace(unsigned, signature=signature)
        done = self.me == self.config.key_holder
        next_state = PaillierParticipantState.DONE if done else PaillierParticipantState.ENCRYPTED
        return self.sent_input, next_state

    def _on_inputs(self, message: InputsToCheck) -> tuple[Endorsement, PaillierParticipantState]:
        config, agg = self.config, self.aggregator
        self._checks.round_of(message, agg, "inputs to check")
        inputs: dict[str, EncryptedInput] = {}
        for encrypted in message.inputs:
            if encrypted.sender in inputs:
                raise RemoteProtocolError(agg, f"relayed two inputs of {encrypted.sender}")
            self._checks.encrypted_input(encrypted, self._n, agg)
            inputs[encrypted.sender] = encrypted
        if inputs.get(self.me) != self.sent_input:
            raise RemoteProtocolError(agg, "my own input is missing or altered")
        if len(inputs) < config.round.threshold:
            raise RemoteProtocolError(
                agg,
                f"asked to endorse a sum of {len(inputs)} inputs, "
                f"threshold is {config.round.threshold}",
            )
        product = _product(
            (inputs[u].ciphertexts for u in config.round.peers if u in inputs),
            config.ciphertext_count,
            self._n**2,
        )
        payload = endorsement_payload(
            config.digest, _contributions(inputs, config), aggregate_digest(product)
        )
        reply = Endorsement(
            self.me, config.session_id, config.round_number, self._signer.sign(payload)
        )
        return reply, PaillierParticipantState.DONE


_ParticipantHandler = Callable[
    [PaillierParticipant, Any], tuple[PaillierParticipantMessage, PaillierParticipantState]
]
_PARTICIPANT_TRANSITIONS: dict[tuple[PaillierParticipantState, type], _ParticipantHandler] = {
    (PaillierParticipantState.WAITING_KEY, KeyAnnouncement): cast(
        _ParticipantHandler, PaillierParticipant._on_key
    ),
    (PaillierParticipantState.ENCRYPTED, InputsToCheck): cast(
        _ParticipantHandler, PaillierParticipant._on_inputs
    ),
}


# ====================================================================== aggregator


class PaillierStage(StrEnum):
    """The four stages of a Paillier round."""

    KEY = "key"
    INPUT = "input"
    ENDORSE = "endorse"
    DECRYPT = "decrypt"


# The aggregator's states are secagg's (RUNNING, DONE, ABORTED): one driver loop serves both.
PaillierAggregatorState = AggregatorState


_STAGE_MESSAGE: dict[PaillierStage, type] = {
    PaillierStage.KEY: KeyAnnouncement,
    PaillierStage.INPUT: EncryptedInput,
    PaillierStage.ENDORSE: Endorsement,
    PaillierStage.DECRYPT: DecryptedSum,
}
_NEXT_STAGE: dict[PaillierStage, PaillierStage | None] = {
    PaillierStage.KEY: PaillierStage.INPUT,
    PaillierStage.INPUT: PaillierStage.ENDORSE,
    PaillierStage.ENDORSE: PaillierStage.DECRYPT,
    PaillierStage.DECRYPT: None,
}


@dataclass(frozen=True, slots=True, eq=False)
class PaillierResult:
    """The round's outcome: the sum over ``survivors`` (the contributors), mod 2^bits."""

    aggregate: WordArray
    survivors: tuple[str, ...]
    dropped: Mapping[PaillierStage, tuple[str, ...]]


@dataclass(frozen=True, slots=True, eq=False)
class PaillierTranscript:
    """What the aggregator publishes (to every peer except the key holder)."""

    session_id: str
    round: int
    aggregator: str
    key: KeyAnnouncement
    inputs: tuple[EncryptedInput, ...]
    aggregate: tuple[int, ...]  # the product the key holder was asked to decrypt
    endorsements: tuple[Endorsement, ...]
    decryption: DecryptedSum

    @property
    def survivors(self) -> tuple[str, ...]:
        return tuple(m.sender for m in self.inputs)


@dataclass(frozen=True, slots=True, eq=False)
class RedactedPaillierTranscript:
    """The key holder's transcript: digests of the inputs instead of the inputs.

    The key holder could decrypt any individual ciphertext, so it gets (sender, input digest)
    pairs; it checks the endorsements, its own decryption and that its own input is listed.
    """

    session_id: str
    round: int
    aggregator: str
    key: KeyAnnouncement
    contributions: tuple[tuple[str, bytes], ...]
    aggregate: tuple[int, ...]
    endorsements: tuple[Endorsement, ...]
    decryption: DecryptedSum

    @property
    def survivors(self) -> tuple[str, ...]:
        return tuple(u for u, _ in self.contributions)


class PaillierAggregator:
    """The aggregator's side of one round, driven like :class:`secagg.Aggregator`:

        agg = PaillierAggregator(config, verifiers, "hospital-c")
        for stage in PaillierStage:
            for message in arriving messages (until agg.pending() is empty or a deadline):
                try: agg.receive(message)
                except RemoteProtocolError as e: log e (e.offender is left out)
            outgoing = agg.close_stage()     # {peer id: message}, or raises RoundAborted
        agg.result, agg.transcript(peer) for every peer except the key holder

    Expected senders: the key holder (key, decrypt stages), every roster peer (input), every
    contributor but the key holder (endorse).
    """

    def __init__(
        self, config: PaillierConfig, verifiers: Mapping[str, Verifier], me: str = AGGREGATOR
    ) -> None:
        if me == config.key_holder:
            raise ConfigError(
                f"{me} cannot be both aggregator and key holder: it could decrypt every input"
            )
        missing = [u for u in config.round.peers if u not in verifiers]
        if missing:
            raise LocalProtocolError(f"no signature verifier for {missing}")
        self.config = config
        self.me = me
        self.state = PaillierAggregatorState.RUNNING
        self.stage = PaillierStage.KEY
        self.dropped: dict[PaillierStage, tuple[str, ...]] = {}
        self.result: PaillierResult | None = None
        self.abort_reason: str | None = None
        self._checks = _Checks(config, verifiers)
        self._verifiers = verifiers
        self._expected: frozenset[str] = frozenset({config.key_holder})
        self._received: dict[str, PaillierParticipantMessage] = {}
        self._excluded: set[str] = set()
        self._key: KeyAnnouncement | None = None
        self._n = 0
        self._inputs: dict[str, EncryptedInput] = {}
        self._aggregate: tuple[int, ...] = ()
        self._contributions: tuple[tuple[str, bytes], ...] = ()
        self._endorsements: dict[str, Endorsement] = {}
        self._decryption: DecryptedSum | None = None

    # ------------------------------------------------------------------ receiving

    def pending(self) -> frozenset[str]:
        """Peers whose message for the current stage has not arrived yet."""
        if self.state is not PaillierAggregatorState.RUNNING:
            return frozenset()
        return self._expected - set(self._received) - self._excluded

    def receive(self, message: PaillierParticipantMessage) -> None:
        """Accept one message for the current stage.

        Raises:
            RemoteProtocolError: the message breaks the protocol; its sender is left out of
                the rest of the round (for the key holder that aborts the round at close).
            LocalProtocolError: the round is over.
        """
        if self.state is not PaillierAggregatorState.RUNNING:
            raise LocalProtocolError(f"round is {self.state.value}; no more messages")
        sender = message.sender
        if sender not in self._expected or sender in self._excluded:
            raise RemoteProtocolError(sender, f"not expected at stage {self.stage.value}")
        try:
            if not isinstance(message, _STAGE_MESSAGE[self.stage]):
                raise RemoteProtocolError(
                    sender,
                    f"sent {type(message).__name__} at stage {self.stage.value} (late or replayed)",
                )
            if sender in self._received:
                raise RemoteProtocolError(sender, f"sent two messages at stage {self.stage.value}")
            self._checks.round_of(message, sender)
            self._validate(message)
        except RemoteProtocolError:
            self._excluded.add(sender)
            raise
        self._received[sender] = message

    def _validate(self, message: PaillierParticipantMessage) -> None:
        config, sender = self.config, message.sender
        if isinstance(message, KeyAnnouncement):
            self._checks.key(message, sender)
        elif isinstance(message, EncryptedInput):
            self._checks.encrypted_input(message, self._n, sender)
        elif isinstance(message, Endorsement):
            payload = endorsement_payload(
                config.digest, self._contributions, aggregate_digest(self._aggregate)
            )
            if not self._verifiers[sender].verify(message.signature, payload):
                raise InvalidSignatureError(
                    sender, "endorsement is not over the inputs and product it was shown"
                )
        elif isinstance(message, DecryptedSum):
            self._check_decryption(message, sender)

    def _check_decryption(self, message: DecryptedSum, sender: str) -> None:
        config = self.config
        digest = aggregate_digest(self._aggregate)
        if not self._verifiers[sender].verify(
            message.signature, message.signed_payload(config.digest, self._contributions, digest)
        ):
            raise InvalidSignatureError(sender, "decryption has an invalid signature")
        if not _proof_holds(
            config, self._n, self._aggregate, digest, message.plaintexts, message.witness
        ):
            raise RemoteProtocolError(sender, "decrypted sum does not match the aggregate (proof)")
        try:
            unpack(message.plaintexts, config)
        except ValueError as error:
            raise RemoteProtocolError(
                sender, f"returned a sum it should have refused: {error}"
            ) from None

    # ------------------------------------------------------------------ closing stages

    def close_stage(self) -> dict[str, PaillierAggregatorMessage]:
        """End the current stage; return the next messages by recipient.

        After the decrypt stage this sets ``self.result`` and returns {}.

        Raises:
            RoundAborted: the round cannot go on (no key, fewer than t inputs or
                endorsements, no decryption). The aggregator is ABORTED.
        """
        if self.state is not PaillierAggregatorState.RUNNING:
            raise LocalProtocolError(f"round is {self.state.value}")
        stage = self.stage
        arrived = {u: m for u, m in self._received.items() if u not in self._excluded}
        self.dropped[stage] = tuple(
            u for u in self.config.round.peers if u in self._expected and u not in arrived
        )
        try:
            outgoing = self._close(stage, arrived)
        except RoundAborted as error:
            self.state = PaillierAggregatorState.ABORTED
            self.abort_reason = str(error)
            raise
        next_stage = _NEXT_STAGE[stage]
        if next_stage is None:
            self.state = PaillierAggregatorState.DONE
        else:
            self.stage = next_stage
            self._expected = self._next_expected(next_stage)
            self._received = {}
        return outgoing

    def _next_expected(self, stage: PaillierStage) -> frozenset[str]:
        key_holder = self.config.key_holder
        if stage is PaillierStage.INPUT:
            return frozenset(self.config.round.peers)
        if stage is PaillierStage.ENDORSE:
            return frozenset(self._inputs) - {key_holder}
        return frozenset({key_holder})

    def _close(
        self, stage: PaillierStage, arrived: Mapping[str, PaillierParticipantMessage]
    ) -> dict[str, PaillierAggregatorMessage]:
        config = self.config
        sid, rnd, peers = config.session_id, config.round_number, config.round.peers
        t = config.round.threshold
        if stage is PaillierStage.KEY:
            key = arrived.get(config.key_holder)
            if not isinstance(key, KeyAnnouncement):
                raise RoundAborted(f"key holder {config.key_holder} published no valid key")
            self._key, self._n = key, key.modulus
            return dict.fromkeys(peers, key)
        if stage is PaillierStage.INPUT:
            self._inputs = {
                u: m for u, m in arrived.items() if isinstance(m, EncryptedInput) and u in peers
            }
            if len(self._inputs) < t:
                raise RoundAborted(f"only {len(self._inputs)} inputs, threshold is {t}")
            endorsers = len(set(self._inputs) - {config.key_holder})
            if endorsers < t:
                raise RoundAborted(
                    f"only {endorsers} contributors besides the key holder can endorse the sum, "
                    f"threshold is {t}"
                )
            ordered = tuple(self._inputs[u] for u in peers if u in self._inputs)
            self._aggregate = _product(
                (m.ciphertexts for m in ordered), config.ciphertext_count, self._n**2
            )
            self._contributions = _contributions(self._inputs, config)
            check = InputsToCheck(sid, rnd, ordered)
            # Never to the key holder: it could decrypt each input.
            return {u: check for u in peers if u in self._inputs and u != config.key_holder}
        if stage is PaillierStage.ENDORSE:
            self._endorsements = {
                u: m for u, m in arrived.items() if isinstance(m, Endorsement) and u in peers
            }
            if len(self._endorsements) < t:
                raise RoundAborted(f"only {len(self._endorsements)} endorsements, threshold is {t}")
            request = DecryptionRequest(
                sid,
                rnd,
                self._contributions,
                self._aggregate,
                tuple(self._endorsements[u] for u in peers if u in self._endorsements),
            )
            return {config.key_holder: request}
        decryption = arrived.get(config.key_holder)
        if not isinstance(decryption, DecryptedSum):
            raise RoundAborted(f"key holder {config.key_holder} returned no valid decryption")
        self._decryption = decryption
        self.result = PaillierResult(
            unpack(decryption.plaintexts, config),
            tuple(u for u in peers if u in self._inputs),
            dict(self.dropped),
        )
        return {}

    # ------------------------------------------------------------------ publishing

    def transcript(self, recipient: str) -> PaillierTranscript | RedactedPaillierTranscript:
        """The round's transcript for ``recipient`` (after DONE).

        Every peer gets the full :class:`PaillierTranscript` except the key holder, which gets
        a :class:`RedactedPaillierTranscript`: individual ciphertexts must never reach it.
        Send each recipient its own transcript; never broadcast one to all.

        Raises:
            LocalProtocolError: the round has no result.
        """
        if self.result is None or self._key is None or self._decryption is None:
            raise LocalProtocolError("the round has no result to publish")
        peers = self.config.round.peers
        endorsements = tuple(self._endorsements[u] for u in peers if u in self._endorsements)
        if recipient == self.config.key_holder:
            return RedactedPaillierTranscript(
                session_id=self.config.session_id,
                round=self.config.round_number,
                aggregator=self.me,
                key=self._key,
                contributions=self._contributions,
                aggregate=self._aggregate,
                endorsements=endorsements,
                decryption=self._decryption,
            )
        return PaillierTranscript(
            session_id=self.config.session_id,
            round=self.config.round_number,
            aggregator=self.me,
            key=self._key,
            inputs=tuple(self._inputs[u] for u in peers if u in self._inputs),
            aggregate=self._aggregate,
            endorsements=endorsements,
            decryption=self._decryption,
        )


# ====================================================================== verification


def verify_paillier_transcript(
    transcript: PaillierTranscript | RedactedPaillierTranscript,
    config: PaillierConfig,
    verifiers: Mapping[str, Verifier],
    *,
    own: EncryptedInput | None = None,
    me: str | None = None,
) -> VerifiedAggregate:
    """Re-multiply the published inputs, check the decryption proof and every signature.

    A :class:`RedactedPaillierTranscript` (the key holder's) has input digests instead of
    inputs: everything is checked except the re-multiplication, which the key holder cannot
    do without seeing the inputs (it relies on the t endorsements for it).

    Args:
        transcript: as published by the round's aggregator.
        config: this peer's own copy of the round's parameters.
        verifiers: every roster peer's signature verifier.
        own: this peer's own input, if it sent one: it must appear unaltered.
        me: this peer's id. The key holder refuses a full transcript: receiving one means the
            aggregator exposed every input to it (reported, naming the aggregator).

    Returns:
        The verified aggregate (mod 2^bits), its contributors and the peers left out.

    Raises:
        TranscriptError: naming the aggregator, or the key holder for a decryption it signed
            that does not match the product.
    """
    agg = transcript.aggregator

    def fail(reason: str, offender: str = agg) -> TranscriptError:
        return TranscriptError(offender, reason)

    checks = _Checks(config, verifiers)
    if (transcript.session_id, transcript.round) != (config.session_id, config.round_number):
        raise fail(f"transcript is for session {transcript.session_id!r} round {transcript.round}")
    if me == config.key_holder and isinstance(transcript, PaillierTranscript):
        raise fail("sent the key holder every input: they are exposed to it")
    peers = config.round.peers
    try:
        n = checks.key(transcript.key, agg).n
        if isinstance(transcript, PaillierTranscript):
            inputs: dict[str, EncryptedInput] = {}
            for encrypted in transcript.inputs:
                if encrypted.sender in inputs:
                    raise fail(f"transcript lists two inputs of {encrypted.sender}")
                checks.encrypted_input(encrypted, n, agg)
                inputs[encrypted.sender] = encrypted
            if own is not None and inputs.get(own.sender, own) != own:
                raise fail("my own input was altered in the transcript")
            product = _product(
                (inputs[u].ciphertexts for u in peers if u in inputs),
                config.ciphertext_count,
                n * n,
            )
            if tuple(transcript.aggregate) != product:
                raise fail("the aggregate ciphertext is not the product of the published inputs")
            contributions = _contributions(inputs, config)
        else:
            contributions = tuple(transcript.contributions)
            listed = [u for u, _ in contributions]
            if listed != [u for u in peers if u in set(listed)] or len(set(listed)) != len(listed):
                raise fail("contributions are not distinct roster peers in roster order")
            if own is not None and own.sender in listed:
                if dict(contributions)[own.sender] != own.input_digest():
                    raise fail("my own input was altered")
            elif own is not None:
                raise fail("my own input is not in the sum")
            product = tuple(transcript.aggregate)
            problem = _ciphertext_problem(product, config, n)
            if problem is not None:
                raise fail(f"aggregate: {problem}")
        if len(contributions) < config.round.threshold:
            raise fail(f"only {len(contributions)} inputs, threshold is {config.round.threshold}")
        product_digest = aggregate_digest(product)
        checks.endorsements(transcript.endorsements, contributions, product_digest, agg)
    except TranscriptError:
        raise
    except RemoteProtocolError as error:
        raise fail(error.reason) from None

    decryption = transcript.decryption
    key_holder = config.key_holder
    if decryption.sender != key_holder or not verifiers[key_holder].verify(
        decryption.signature,
        decryption.signed_payload(config.digest, contributions, product_digest),
    ):
        raise fail("the decryption is not signed by the key holder over this product")
    # From here on the key holder signed what is checked: a mismatch is its fault.
    if not _proof_holds(
        config, n, product, product_digest, decryption.plaintexts, decryption.witness
    ):
        raise fail("the signed decryption does not match the aggregate (proof fails)", key_holder)
    try:
        aggregate = unpack(decryption.plaintexts, config)
    except ValueError as error:
        raise fail(f"the signed decryption does not decode: {error}", key_holder) from None
    contributors = {u for u, _ in contributions}
    return VerifiedAggregate(
        aggregate,
        tuple(u for u in peers if u in contributors),
        tuple(u for u in peers if u not in contributors),
    )


# ====================================================================== one peer, both roles


class PaillierPeer:
    """One peer's Paillier objects for one round, behind the participant interface that the
    round drivers already use (``start``, ``receive``, ``state``):

        peer = PaillierPeer(config, me, signer, verifiers, x, rng, aggregator, keygen)
        first = peer.start()   # the KeyAnnouncement at the key holder, None elsewhere
        reply = peer.receive(message)   # KeyAnnouncement, InputsToCheck or DecryptionRequest

    At the key holder it owns a :class:`PaillierKeyHolder` (which answers the
    DecryptionRequest) and a :class:`PaillierParticipant` (its own input); elsewhere only the
    participant. ``sent_input`` is this peer's own :class:`EncryptedInput`, for ``own=``.
    """

    def __init__(
        self,
        config: PaillierConfig,
        me: str,
        signer: Signer,
        verifiers: Mapping[str, Verifier],
        x: npt.ArrayLike,
        rng: RandomSource,
        aggregator: str = AGGREGATOR,
        keygen: PaillierKeyGenerator | None = None,
    ) -> None:
        self.participant = PaillierParticipant(config, me, signer, verifiers, x, rng, aggregator)
        self.key_holder = (
            PaillierKeyHolder(config, me, signer, verifiers, keygen, aggregator)
            if me == config.key_holder
            else None
        )

    @property
    def state(self) -> PaillierParticipantState | KeyHolderState:
        """The key holder's state once the participant is done, else the participant's."""
        if self.key_holder is not None and self.participant.state is PaillierParticipantState.DONE:
            return self.key_holder.state
        return self.participant.state

    @property
    def sent_input(self) -> EncryptedInput | None:
        return self.participant.sent_input

    def start(self) -> KeyAnnouncement | None:
        """The key holder's announcement (generates the key: not instant); None elsewhere."""
        return self.key_holder.start() if self.key_holder is not None else None

    def receive(self, message: PaillierAggregatorMessage) -> PaillierParticipantMessage:
        """Route ``message`` to the role it is for; see the roles' ``receive``."""
        if isinstance(message, DecryptionRequest):
            if self.key_holder is None:
                self.participant.state = PaillierParticipantState.FAILED
                raise RemoteProtocolError(
                    self.participant.aggregator, "sent a decryption request to a non-key-holder"
                )
            return self.key_holder.receive(message)
        return self.participant.receive(message)


# ====================================================================== simulation


@dataclass
class PaillierSimulationResult:
    """One in-memory round. Times are seconds; participant figures are medians over peers."""

    peers: tuple[str, ...]
    key_holder: str
    aggregate: WordArray | None
    expected: WordArray | None  # plain sum over the contributors' inputs
    survivors: tuple[int, ...]  # 0-based indices of the contributors
    timings_s: dict[str, float]
    bytes_per_peer: dict[str, float]
    ciphertexts_per_peer: int
    ok: bool
    aborted: str | None = None
    transcript: PaillierTranscript | None = None
    transcript_error: str | None = None
    transcript_bytes: int = 0


def simulate_paillier(
    n_peers: int,
    vector_length: int,
    *,
    threshold: int | None = None,
    key_bits: int = DEFAULT_KEY_BITS,
    packed: bool = True,
    drops: Mapping[PaillierStage, int] | None = None,
    seed: int = 0,
    inputs: WordArray | None = None,
    bits: int = 32,
    key_holder: int = 0,
    keygen: PaillierKeyGenerator | None = None,
    session_id: str = "simulation",
    round_: int = 0,
    verify: bool = True,
    insecure_small_keys: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> PaillierSimulationResult:
    """Run one Paillier round in memory with the same objects a peer drives.

    Args:
        drops: how many peers (never the key holder) miss the input or endorse stage.
        inputs: an (n_peers, vector_length) array of ring words; random when omitted.
        key_holder: index of the key holder in the roster. The aggregator is an extra party.
        keygen: default :class:`SeededPrimes` from the seed (reproducible); benchmarks pass
            :class:`OpenSSLPrimes` to time the production path.
        verify: also run :func:`verify_paillier_transcript` (timed as ``verify``).

    Raises:
        ConfigError: invalid parameters.
    """
    peers = peer_ids(n_peers)
    if threshold is None:
        threshold = n_peers // 2 + 1
    round_config = RoundConfig(session_id, round_, peers, threshold, vector_length, bits)
    if not 0 <= key_holder < n_peers:
        raise ConfigError(f"key holder index must be below {n_peers}, not {key_holder}")
    config = PaillierConfig(
        round_config, peers[key_holder], key_bits, packed, insecure_small_keys=insecure_small_keys
    )
    dtype = word_dtype(bits)
    data_rng = np.random.default_rng(seed)
    if inputs is None:
        inputs = np.asarray(
            data_rng.integers(0, 1 << bits, size=(n_peers, vector_length), dtype=np.uint64)
        ).astype(dtype)
    elif inputs.shape != (n_peers, vector_length) or inputs.dtype != dtype:
        raise ConfigError(f"inputs must be a ({n_peers}, {vector_length}) {dtype} array")
    drop_at: dict[str, PaillierStage] = {}
    candidates = [u for u in peers if u != config.key_holder]
    for stage in (PaillierStage.INPUT, PaillierStage.ENDORSE):
        count = (drops or {}).get(stage, 0)
        if not 0 <= count <= len(candidates):
            raise ConfigError(f"cannot drop {count} peers at {stage.value}")
        for i in sorted(data_rng.choice(len(candidates), size=count, replace=False))[::-1]:
            drop_at[candidates.pop(int(i))] = stage
    signers, verifiers = test_identities(peers, seed)
    holder = PaillierKeyHolder(
        config,
        config.key_holder,
        signers[config.key_holder],
        verifiers,
        keygen if keygen is not None else SeededPrimes(DeterministicRandom(f"{seed}/keygen")),
        AGGREGATOR,
    )
    participants = {
        u: PaillierParticipant(
            config,
            u,
            signers[u],
            verifiers,
            inputs[i],
            DeterministicRandom(f"{seed}/{session_id}/{round_}/{u}/paillier"),
            AGGREGATOR,
        )
        for i, u in enumerate(peers)
    }
    aggregator = PaillierAggregator(config, verifiers, AGGREGATOR)
    times: dict[str, float] = dict.fromkeys(
        ("key_holder_keygen", "key_holder_decrypt", "aggregator", "verify"), 0.0
    )
    encrypt_s = dict.fromkeys(peers, 0.0)
    endorse_s: dict[str, float] = {}
    sent = dict.fromkeys(peers, 0)
    received = dict.fromkeys(peers, 0)

    def to_aggregator(message: PaillierParticipantMessage) -> None:
        start = clock()
        aggregator.receive(message)
        times["aggregator"] += clock() - start

    def close() -> dict[str, PaillierAggregatorMessage]:
        start = clock()
        try:
            return aggregator.close_stage()
        finally:
            times["aggregator"] += clock() - start

    aborted: str | None = None
    began = clock()
    try:
        start = clock()
        announcement = holder.start()
        times["key_holder_keygen"] = clock() - start
        sent[config.key_holder] += message_size(announcement)
        to_aggregator(announcement)
        outgoing = close()
        for stage in (PaillierStage.INPUT, PaillierStage.ENDORSE):
            for u, message in outgoing.items():
                received[u] += message_size(message)
                if drop_at.get(u) is stage:
                    continue
                start = clock()
                reply = participants[u].receive(message)
                (encrypt_s if stage is PaillierStage.INPUT else endorse_s)[u] = clock() - start
                sent[u] += message_size(reply)
                to_aggregator(reply)
            outgoing = close()
        request = outgoing[config.key_holder]
        received[config.key_holder] += message_size(request)
        start = clock()
        decrypted = holder.receive(request)
        times["key_holder_decrypt"] = clock() - start
        sent[config.key_holder] += message_size(decrypted)
        to_aggregator(decrypted)
        close()
    except RoundAborted as error:
        aborted = str(error)
    times["wall"] = clock() - began

    result = aggregator.result
    expected: WordArray | None = None
    survivors: tuple[int, ...] = ()
    transcript: PaillierTranscript | None = None
    transcript_error: str | None = None
    transcript_bytes = 0
    if result is not None:
        survivors = tuple(peers.index(u) for u in result.survivors)
        expected = np.zeros(vector_length, dtype=dtype)
        for i in survivors:
            np.add(expected, inputs[i], out=expected)
        reader = next(u for u in peers if u != config.key_holder)
        published = aggregator.transcript(reader)
        assert isinstance(published, PaillierTranscript)
        transcript = published
        transcript_bytes = (
            message_size(transcript.key)
            + sum(message_size(m) for m in transcript.inputs)
            + sum(len(_int_bytes(c)) for c in transcript.aggregate)
            + sum(message_size(e) for e in transcript.endorsements)
            + message_size(transcript.decryption)
        )
        if verify:
            start = clock()
            try:
                verify_paillier_transcript(transcript, config, verifiers)
            except TranscriptError as error:
                transcript_error = str(error)
            times["verify"] = clock() - start
    times["key_holder_total"] = times["key_holder_keygen"] + times["key_holder_decrypt"]
    times["participant_encrypt"] = statistics.median(encrypt_s.values())
    times["participant_endorse"] = statistics.median(endorse_s.values()) if endorse_s else 0.0
    times["participant_total"] = statistics.median(
        encrypt_s[u] + endorse_s.get(u, 0.0) for u in peers
    )
    ok = (
        result is not None
        and expected is not None
        and np.array_equal(result.aggregate, expected)
        and transcript_error is None
    )
    others = [u for u in peers if u != config.key_holder]
    return PaillierSimulationResult(
        peers=peers,
        key_holder=config.key_holder,
        aggregate=result.aggregate if result else None,
        expected=expected,
        survivors=survivors,
        timings_s=times,
        bytes_per_peer={
            "sent": float(statistics.median(sent[u] for u in others)),
            "received": float(statistics.median(received[u] for u in others)),
            "key_holder_sent": float(sent[config.key_holder]),
            "key_holder_received": float(received[config.key_holder]),
        },
        ciphertexts_per_peer=config.ciphertext_count,
        ok=ok,
        aborted=aborted,
        transcript=transcript,
        transcript_error=transcript_error,
        transcript_bytes=transcript_bytes,
    )
