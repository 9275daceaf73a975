"""The Paillier round parameters (:class:`PaillierConfig`) and the package constants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import RoundConfig
from ..crypto import canonical, sha256
from ..errors import ConfigError

DEFAULT_KEY_BITS = 2048
MIN_KEY_BITS = 2048
# Below this a prime factor would be shorter than the proof's 128-bit coefficients.
_SMALLEST_TEST_KEY_BITS = 512
_PROOF_COEFFICIENT_BYTES = 16
AGGREGATOR = "aggregator"

PrivateKey = Any  # phe.paillier.PaillierPrivateKey (phe ships no type information)
PublicKey = Any  # phe.paillier.PaillierPublicKey


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
