"""The payloads a session can carry, by kind: what each peer puts into a round.

``vector`` (:mod:`.vector`: numbers the operator prepared), ``training`` (:mod:`.training`:
federated DP-SGD on the peer's patient data) and ``statistics`` (:mod:`.statistics`:
differentially private queries). Each is a :class:`~peer.payloads.base.Payload`: the generic
round loop asks it for its contribution, its result, the privacy the session costs
(``epsilon_needed``) and what to store at the end (``finish``), and knows no kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..config import PeerConfig
from ..ledger import Ledger
from ..session import ProposalError, SessionProposal
from .base import LocalContribution, Payload, RoundResult
from .vector import VectorPayload

__all__ = [
    "LocalContribution",
    "Payload",
    "PayloadFactory",
    "RoundResult",
    "VectorPayload",
    "default_payload",
    "epsilon_needed",
    "payload_for",
    "ring_bits_for",
    "session_rounds_for",
]

PayloadFactory = Callable[[SessionProposal, PeerConfig, Ledger], Payload]


def _vector(proposal: SessionProposal, config: PeerConfig, ledger: Ledger) -> Payload:
    """The peer's configured .npy file (zeros if it has none)."""
    if config.payload_file is not None:
        return VectorPayload.from_file(config.payload_file, proposal.vector_length, proposal.bits)
    return VectorPayload(proposal.vector_length, proposal.bits)


def _training(proposal: SessionProposal, config: PeerConfig, ledger: Ledger) -> Payload:
    from .training import training_payload  # lazy: loads TensorFlow

    return training_payload(proposal, config, ledger)


def _statistics(proposal: SessionProposal, config: PeerConfig, ledger: Ledger) -> Payload:
    from .statistics import statistics_payload

    return statistics_payload(proposal, config, ledger)


_KINDS: dict[str, PayloadFactory] = {
    "vector": _vector,
    "training": _training,
    "statistics": _statistics,
}


def ring_bits_for(payload: Mapping[str, Any]) -> int:
    """The ring a payload aggregates in: training updates and their noisy evaluation sums
    need the 64-bit ring's headroom; the other payloads fit in 32 bits (the default)."""
    return 64 if payload.get("kind") == "training" else 32


def session_rounds_for(payload: Mapping[str, Any]) -> int | None:
    """The number of session rounds a payload implies (training: standardization, its
    training rounds, a final evaluation), or None when the proposal must say."""
    rounds = payload.get("training_rounds")
    if payload.get("kind") == "training" and isinstance(rounds, int) and rounds >= 1:
        return rounds + 2
    return None


def payload_for(kind: str) -> PayloadFactory:
    """How this peer builds a payload of ``kind`` (ProposalError if it supports none)."""
    try:
        return _KINDS[kind]
    except KeyError:
        raise ProposalError(f"payload kind {kind!r} is not supported by this peer") from None


def default_payload(proposal: SessionProposal, config: PeerConfig, ledger: Ledger) -> Payload:
    """The payload of a session, by its kind (the node's default factory)."""
    return payload_for(proposal.payload_kind)(proposal, config, ledger)


def epsilon_needed(payload: Payload) -> float:
    """Privacy the whole session costs this peer (0 for payloads that spend none)."""
    return float(payload.epsilon_needed())
