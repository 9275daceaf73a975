"""What a round aggregates. The round machinery does not care what the vector means.

A :class:`Payload` turns local data into the quantized vector a peer contributes, and turns
the verified aggregate into the round's result (the new global model and the agreed
metrics). ``conclude`` must be deterministic: every peer runs it on the same aggregate and
they must all get the same bytes, because they sign the hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from secagg.ring import WordArray

from ..ledger import Ledger, PrivacyCharge, PrivacyKind
from ..session import SessionProposal

__all__ = ["LocalContribution", "Payload", "RoundResult"]


@dataclass(frozen=True)
class LocalContribution:
    """A peer's input to one round.

    ``events`` are the DP mechanisms whose output the vector carries (JSON objects of
    :mod:`peer.training.accounting`); the round driver charges them, with ``epsilon``,
    to the ledger before the vector can leave (:func:`release_charge`). A payload that
    returns the *same* vector for a retried attempt of a round releases nothing new and
    is not charged again; one that draws fresh noise is charged again.
    """

    vector: WordArray
    epsilon: float = 0.0  # privacy this round costs this peer (public)
    delta: float = 0.0
    clipped_fraction: float = 0.0
    privacy_kind: PrivacyKind = PrivacyKind.TRAINING
    events: tuple[Mapping[str, Any], ...] = ()

    @property
    def release_id(self) -> str:
        """Names the released value: a digest of the vector (the same value, the same id)."""
        little = self.vector.astype(self.vector.dtype.newbyteorder("<"), copy=False)
        digest = hashlib.sha256(b"hospital-secagg/release/v1" + little.tobytes())
        return digest.hexdigest()

    @property
    def is_private(self) -> bool:
        """Whether releasing the vector costs privacy (so it must be charged first)."""
        return self.epsilon > 0 or bool(self.events)

    def charge(self, peer_id: str) -> PrivacyCharge:
        """The ledger charge of releasing this contribution (all its events, composed)."""
        event: dict[str, Any] | None = None
        if len(self.events) == 1:
            event = dict(self.events[0])
        elif self.events:
            event = {"mechanism": "composed", "events": [dict(e) for e in self.events]}
        return PrivacyCharge(peer_id, self.privacy_kind, self.epsilon, self.delta, event)


@dataclass(frozen=True)
class RoundResult:
    """What every peer derives from the verified aggregate."""

    model: bytes  # the new global state (float32 bytes for models; the aggregate for vectors)
    metrics: Mapping[str, Any] = field(default_factory=dict)


class Payload(Protocol):
    def vector_length(self, round_: int) -> int:
        """Words this peer contributes in ``round_`` (the same at every peer)."""
        ...

    def prepare(self, round_: int) -> LocalContribution:
        """Compute this peer's contribution (may be slow: runs in an executor)."""
        ...

    def conclude(
        self, round_: int, aggregate: WordArray, survivors: tuple[str, ...]
    ) -> RoundResult:
        """The round's result from the verified aggregate (deterministic)."""
        ...

    def epsilon_needed(self) -> float:
        """Privacy the whole session costs this peer (0 for payloads that spend none)."""
        ...

    def finish(self, ledger: Ledger, proposal: SessionProposal) -> None:
        """After the session's last round, with every agreed record in ``ledger``."""
        ...
