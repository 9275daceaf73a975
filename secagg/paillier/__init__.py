"""Paillier aggregation: the comparison backend to SecAgg, as sans-I/O state machines.

The package is cut along the protocol's parts: ``config``, ``keys``, ``encoding`` (packing and
the decryption proof), ``messages``, ``checks``, one module per role (``key_holder``,
``participant``, ``aggregator``), ``verify``, ``peer`` and ``simulate``. Every public name is
importable from ``secagg.paillier``.

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

from .aggregator import (
    PaillierAggregator,
    PaillierAggregatorState,
    PaillierResult,
    PaillierStage,
    PaillierTranscript,
    RedactedPaillierTranscript,
)
from .config import DEFAULT_KEY_BITS, MIN_KEY_BITS, PaillierConfig
from .encoding import endorsement_payload, pack, unpack
from .key_holder import KeyHolderState, PaillierKeyHolder
from .keys import OpenSSLPrimes, PaillierKeyGenerator, SeededPrimes
from .messages import (
    DecryptedSum,
    DecryptionRequest,
    EncryptedInput,
    Endorsement,
    InputsToCheck,
    KeyAnnouncement,
    PaillierAggregatorMessage,
    PaillierParticipantMessage,
    aggregate_digest,
    message_size,
)
from .participant import PaillierParticipant, PaillierParticipantState
from .peer import PaillierPeer
from .simulate import PaillierSimulationResult, simulate_paillier
from .verify import verify_paillier_transcript

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
