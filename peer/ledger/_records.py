"""Value types of the ledger and the exact bytes that peers sign.

Everything that is hashed or signed is defined here, in one place, so that the peer that
signs an agreed record and the ledger that later verifies it cannot disagree on encoding.

Each session has its own hash chain: its first record's ``prev_hash`` is
:func:`session_genesis` of the session's proposal hash, and each later record's
``prev_hash`` is the ``record_hash`` of the session's previous agreed record. A chain
therefore depends only on what the session's participants agreed on, never on other
sessions a peer happens to take part in, so every participant computes the same payload.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, TypeAlias

from peer.ledger._errors import InvalidRecordError
from secagg.crypto import Verifier, canonical, sha256

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "HASH_BYTES",
    "RECORD_DOMAIN",
    "ZERO_HASH",
    "AgreedRecord",
    "BeaconState",
    "ChargedRelease",
    "Checkpoint",
    "JsonValue",
    "PrivacyCharge",
    "PrivacyKind",
    "PrivacyTotals",
    "RefusedProposal",
    "RoundAttempt",
    "RoundStatus",
    "SessionInfo",
    "SessionStatus",
    "StatisticsResult",
    "StoredRecord",
    "canonical_json",
    "metrics_digest",
    "model_digest",
    "record_payload",
    "session_genesis",
    "valid_signers",
]

JsonValue: TypeAlias = (
    "bool | int | float | str | Sequence[JsonValue] | Mapping[str, JsonValue] | None"
)

HASH_BYTES = 32
ZERO_HASH = bytes(HASH_BYTES)
"""The head hash :meth:`Ledger.head` shows for a ledger without records (not a chain link)."""

RECORD_DOMAIN = "agreed-record/v1"
METRICS_DOMAIN = "agreed-metrics/v1"
GENESIS_DOMAIN = "session-genesis/v1"


# --------------------------------------------------------------------------- encodings


def canonical_json(value: JsonValue) -> str:
    """The one JSON text of ``value``: sorted keys, no spaces, no NaN or infinity.

    Python floats are written with ``repr`` precision, so parsing the text and writing it
    again gives the same text; that is what makes a stored JSON column re-hashable.

    Raises:
        InvalidRecordError: for NaN, infinities or values JSON cannot encode.
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRecordError(f"value cannot be stored as canonical JSON: {exc}") from exc


def metrics_digest(metrics: Mapping[str, JsonValue], epsilon: Mapping[str, float]) -> bytes:
    """The ``metrics_hash`` of an agreed record.

    It covers the agreed global metrics *and* the ε each peer spent, so that the public
    privacy figures shown on every dashboard are signed by the consortium like the metrics.
    """
    document = canonical_json({"epsilon": dict(epsilon), "metrics": dict(metrics)})
    return sha256(canonical(METRICS_DOMAIN, document))


def model_digest(weights: bytes) -> bytes:
    """The ``model_hash`` of a global model: SHA-256 of its float32 little-endian bytes."""
    return sha256(weights)


def session_genesis(proposal_hash: bytes) -> bytes:
    """The ``prev_hash`` of a session's first agreed record.

    Args:
        proposal_hash: SHA-256 of the session's proposal text (UTF-8), as
            :meth:`Ledger.record_proposal` stores it in ``SessionInfo.proposal_hash``.

    Binding the chain to the proposal means a record cannot be moved to another session,
    nor a session's chain to another proposal under the same id.
    """
    _check_hash("proposal_hash", proposal_hash)
    return sha256(canonical(GENESIS_DOMAIN, proposal_hash))


def record_payload(
    session_id: str,
    round_: int,
    aggregate_hash: bytes,
    model_hash: bytes,
    metrics_hash: bytes,
    prev_hash: bytes,
) -> bytes:
    """The bytes every peer signs to agree on a round; ``record_hash`` is their SHA-256.

    Peers call this before the record exists, so it depends on nothing stored.
    """
    return canonical(
        RECORD_DOMAIN, session_id, round_, aggregate_hash, model_hash, metrics_hash, prev_hash
    )


# --------------------------------------------------------------------------- statuses


class SessionStatus(enum.StrEnum):
    """Life of a session in this peer's ledger."""

    PROPOSED = "proposed"
    ACCEPTED = "accepted"
    REFUSED = "refused"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class RoundStatus(enum.StrEnum):
    """Outcome of one attempt at a round."""

    RUNNING = "running"
    AGREED = "agreed"
    ABORTED = "aborted"
    REFUSED_TO_SIGN = "refused-to-sign"


class PrivacyKind(enum.StrEnum):
    """What a privacy charge paid for."""

    TRAINING = "training"
    STATISTICS = "statistics"


# --------------------------------------------------------------------------- records


def _check_hash(name: str, value: object) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_BYTES:
        shown = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise InvalidRecordError(f"{name} must be {HASH_BYTES} bytes, got {shown}")


def _check_epsilon(epsilon: Mapping[str, float]) -> None:
    for peer_id, eps in epsilon.items():
        if not isinstance(peer_id, str) or not peer_id:
            raise InvalidRecordError(f"epsilon keys must be peer ids, got {peer_id!r}")
        if isinstance(eps, bool) or not isinstance(eps, int | float):
            raise InvalidRecordError(f"epsilon of {peer_id!r} must be a number, got {eps!r}")
        if not math.isfinite(eps) or eps < 0:
            raise InvalidRecordError(f"epsilon of {peer_id!r} must be finite and >= 0: {eps}")


@dataclass(frozen=True, slots=True)
class AgreedRecord:
    """What the consortium agreed on for one round, before it gets a place in a ledger.

    Attributes:
        metrics: the agreed global metrics (JSON-compatible).
        epsilon: the ε each peer spent on this round, ``{peer_id: epsilon}``.
    """

    session_id: str
    round: int
    aggregate_hash: bytes
    model_hash: bytes
    metrics_hash: bytes
    prev_hash: bytes
    metrics: Mapping[str, JsonValue] = field(default_factory=dict)
    epsilon: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        session_id: str,
        round_: int,
        *,
        aggregate_hash: bytes,
        model_hash: bytes,
        metrics: Mapping[str, JsonValue],
        epsilon: Mapping[str, float],
        prev_hash: bytes,
    ) -> AgreedRecord:
        """A record whose ``metrics_hash`` is computed from ``metrics`` and ``epsilon``."""
        return cls(
            session_id=session_id,
            round=round_,
            aggregate_hash=aggregate_hash,
            model_hash=model_hash,
            metrics_hash=metrics_digest(metrics, epsilon),
            prev_hash=prev_hash,
            metrics=metrics,
            epsilon=epsilon,
        )

    def payload(self) -> bytes:
        """The signed bytes (see :func:`record_payload`)."""
        return record_payload(
            self.session_id,
            self.round,
            self.aggregate_hash,
            self.model_hash,
            self.metrics_hash,
            self.prev_hash,
        )

    def record_hash(self) -> bytes:
        """SHA-256 of :meth:`payload`: what the ``prev_hash`` of the session's next record
        points to."""
        return sha256(self.payload())

    def check(self) -> None:
        """Check every field's shape and that ``metrics_hash`` covers metrics and epsilon.

        Raises:
            InvalidRecordError: naming the first field that is wrong.
        """
        if not isinstance(self.session_id, str) or not self.session_id:
            raise InvalidRecordError(f"session_id must be a non-empty string: {self.session_id!r}")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise InvalidRecordError(f"round must be an integer >= 0, got {self.round!r}")
        for name in ("aggregate_hash", "model_hash", "metrics_hash", "prev_hash"):
            _check_hash(name, getattr(self, name))
        _check_epsilon(self.epsilon)
        expected = metrics_digest(self.metrics, self.epsilon)
        if expected != self.metrics_hash:
            raise InvalidRecordError(
                f"session {self.session_id!r} round {self.round}: metrics_hash "
                f"{self.metrics_hash.hex()} does not cover the given metrics and epsilon "
                f"(expected {expected.hex()})"
            )


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """An agreed record as kept in a ledger.

    ``seq`` is this ledger's own append order (global, gap-free); it is not signed, so two
    peers may hold the same record at different positions.
    """

    seq: int
    record: AgreedRecord
    record_hash: bytes
    signatures: Mapping[str, bytes]
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Global model weights after an agreed round (float32, little-endian)."""

    session_id: str
    round: int
    weights: bytes
    sha256: bytes

    def array(self) -> npt.NDArray[np.float32]:
        """The weights as a flat float32 array (a copy, safe to modify)."""
        import numpy as np

        return np.frombuffer(self.weights, dtype="<f4").astype(np.float32)


@dataclass(frozen=True, slots=True)
class PrivacyCharge:
    """Privacy budget one peer spent in one round (for DP-SGD: the increase of ε(δ)).

    ``event`` describes the mechanism of the release (see
    :mod:`peer.training.accounting`: Poisson-sampled Gaussian, Gaussian, pure ε); the
    accountant composes the events of a peer's whole history. A charge without one (older
    ledgers) counts as its ε and δ by basic composition.
    """

    peer_id: str
    kind: PrivacyKind
    epsilon: float
    delta: float
    event: Mapping[str, JsonValue] | None = None

    def check(self) -> None:
        """Raises InvalidRecordError if a figure is negative, infinite or NaN."""
        if not self.peer_id:
            raise InvalidRecordError("a privacy charge needs a peer id")
        for name, value in (("epsilon", self.epsilon), ("delta", self.delta)):
            if not math.isfinite(value) or value < 0:
                raise InvalidRecordError(
                    f"privacy {name} of {self.peer_id!r} must be finite and >= 0: {value}"
                )
        if self.delta > 1:
            raise InvalidRecordError(f"privacy delta of {self.peer_id!r} exceeds 1: {self.delta}")
        if self.event is not None and not (
            isinstance(self.event, Mapping) and isinstance(self.event.get("mechanism"), str)
        ):
            raise InvalidRecordError(
                f"privacy event of {self.peer_id!r} must name its mechanism: {self.event!r}"
            )


@dataclass(frozen=True, slots=True)
class ChargedRelease:
    """A privacy charge as stored: which release it paid for, and when."""

    session_id: str
    round: int
    attempt: int
    release_id: str
    charge: PrivacyCharge
    recorded_at: datetime | None


@dataclass(frozen=True, slots=True)
class PrivacyTotals:
    """One peer's recorded privacy charges, added up per kind and composed.

    The per-kind sums add each charge's ε (each charge is the increase of the composed ε
    when it was made, so they add up to about the composed figure). ``composed`` is the
    accountant's ε of the peer's whole history (PLD over every charge's mechanism event at
    ``composed_delta``, plus the ε of charges without an event by basic composition);
    ``None`` when no charge has an event (then the sums are the figure).
    """

    peer_id: str
    training_epsilon: float = 0.0
    training_delta: float = 0.0
    statistics_epsilon: float = 0.0
    statistics_delta: float = 0.0
    composed: float | None = None
    composed_delta: float = 0.0

    @property
    def epsilon(self) -> float:
        """Total ε: the composed figure when there is one, else the sum over the kinds."""
        if self.composed is not None:
            return self.composed
        return self.training_epsilon + self.statistics_epsilon

    @property
    def delta(self) -> float:
        """Total δ over training and statistics."""
        return self.training_delta + self.statistics_delta


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session as this peer recorded it."""

    session_id: str
    proposal: str
    proposal_hash: bytes
    proposer: str
    status: SessionStatus
    reason: str | None
    created_at: datetime
    participants: tuple[str, ...]
    threshold: int
    rounds_planned: int

    def known_to(self, peer_id: str) -> bool:
        """Whether ``peer_id`` may learn anything of this session (even that it exists):
        its participants and its proposer; to anyone else a peer answers as if it had
        no such session (SECURITY.md, "Outsiders learn nothing of a session")."""
        return peer_id in self.participants or peer_id == self.proposer


@dataclass(frozen=True, slots=True)
class RoundAttempt:
    """One attempt at a round (a dead aggregator means another attempt with the next one)."""

    session_id: str
    round: int
    attempt: int
    aggregator: str
    status: RoundStatus
    participants: tuple[str, ...]
    dropped: Mapping[str, tuple[str, ...]]
    started_at: datetime
    ended_at: datetime | None
    bytes_sent: int
    bytes_received: int
    abort_reason: str | None


@dataclass(frozen=True, slots=True)
class StatisticsResult:
    """The result of one federated differentially private statistics query."""

    query_id: str
    session_id: str
    round: int
    query: JsonValue
    result: JsonValue
    epsilon: float
    created_at: datetime


@dataclass(frozen=True, slots=True)
class BeaconState:
    """A session's commit-reveal beacon at this peer (see peer/beacon.py).

    ``commitments`` maps each participant to (commitment, signature) once the proposer sent
    them; ``beacon`` is set once every nonce was revealed and checked.
    """

    session_id: str
    nonce: bytes
    commitments: Mapping[str, tuple[bytes, bytes]] | None
    reveals: Mapping[str, bytes] | None
    beacon: bytes | None


@dataclass(frozen=True, slots=True)
class RefusedProposal:
    """A refused proposal, as kept in the bounded log (never as a session)."""

    session_id: str
    proposer: str
    proposal_hash: bytes
    size: int
    reason: str
    received_at: datetime


def valid_signers(
    payload: bytes, signatures: Mapping[str, bytes], verifiers: Mapping[str, Verifier]
) -> tuple[list[str], list[str]]:
    """Split signers into (valid, problems); each problem is a sentence naming the peer."""
    valid: list[str] = []
    problems: list[str] = []
    for peer_id in sorted(signatures):
        verifier = verifiers.get(peer_id)
        if verifier is None:
            problems.append(f"signature by {peer_id!r}, who is not in the roster")
        elif not verifier.verify(signatures[peer_id], payload):
            problems.append(f"signature of {peer_id!r} does not verify under its roster key")
        else:
            valid.append(peer_id)
    return valid, problems
