"""The frozen messages of a Paillier round and their signed payloads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..crypto import canonical
from .config import PaillierConfig
from .encoding import (
    _int_bytes,
    _ints_digest,
    _pairs_bytes,
    _positive_ints,
    _require,
)


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
