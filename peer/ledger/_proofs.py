"""The evidence of each agreed secagg round, kept so that ``verify-ledger`` can re-check it.

A peer agreed a round after the succinct check (secagg/succinct.py) of the aggregator's
statement and the survivors' signed answers. What that check needs is stored as it was
received: the round's parameters (the RoundConfig fields, as JSON) and the succinct
transcript (its protobuf bytes, ``SuccinctTranscript`` in protos/peer.proto). The ledger
only keeps the bytes; decoding and re-running the check is ``peer verify-ledger``'s job
(peer/ledger_check.py), so that this package does not depend on the wire format.

The transcript holds no answered survivor's masked vector: storing it costs about one
aggregate per round.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from peer.ledger._schema import ProofRow
from peer.ledger._store import LedgerStore

__all__ = ["ProofsMixin", "StoredProof"]


@dataclass(frozen=True, slots=True)
class StoredProof:
    """One round's stored evidence (see the module docstring)."""

    session_id: str
    round: int
    attempt: int
    aggregator: str
    config_json: str
    transcript: bytes


class ProofsMixin(LedgerStore):
    """The round evidence of a :class:`~peer.ledger.Ledger`."""

    def store_round_proof(self, proof: StoredProof) -> None:
        """Keep ``proof`` (one per session and round: a later one replaces it, since only
        one attempt of a round is ever agreed)."""
        with self.transaction(write=True) as session:
            row = session.get(ProofRow, (proof.session_id, proof.round))
            if row is None:
                row = ProofRow(session_id=proof.session_id, round=proof.round)
                session.add(row)
            row.attempt = proof.attempt
            row.aggregator = proof.aggregator
            row.config = proof.config_json
            row.transcript = proof.transcript
            row.recorded_at = self.now()

    def round_proofs(self) -> list[StoredProof]:
        """Every stored round's evidence, by session and round."""
        with self.transaction(write=False) as session:
            rows = session.scalars(select(ProofRow).order_by(ProofRow.session_id, ProofRow.round))
            return [
                StoredProof(r.session_id, r.round, r.attempt, r.aggregator, r.config, r.transcript)
                for r in rows
            ]
