"""The evidence of each agreed secagg round, kept so that ``verify-ledger`` can re-check it.

A peer agreed a round after the succinct check (secagg/succinct.py) of the aggregator's
statement and the survivors' signed answers. What that check needs is stored as it was
received: the round's parameters (the RoundConfig fields, as JSON) and the succinct
transcript (its protobuf bytes, ``SuccinctTranscript`` in protos/peer.proto). The ledger
only keeps the bytes; decoding and re-running the check is ``peer verify-ledger``'s job
(peer/ledger_rounds.py), so that this package does not depend on the wire format.

The transcript holds no answered survivor's masked vector: storing it costs about one
aggregate per round.

A peer also keeps the evidence of the record it *voted* for (:meth:`ProofsMixin.keep_vote_proof`):
if that attempt's aggregator vanishes and a later attempt completes the record from the kept
votes (peer/ledger/_votes.py), the later attempt has no transcript of its own, and the kept
evidence is what goes into ``round_proofs`` (:meth:`ProofsMixin.promote_vote_proof`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from peer.ledger._schema import ProofRow, VoteProofRow
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

    def keep_vote_proof(self, proof: StoredProof, record_hash: bytes) -> None:
        """Keep ``proof`` as the evidence of the record ``record_hash`` this peer voted for
        (one per round: a later vote's evidence replaces it)."""
        with self.transaction(write=True) as session:
            row = session.get(VoteProofRow, (proof.session_id, proof.round))
            if row is None:
                row = VoteProofRow(session_id=proof.session_id, round=proof.round)
                session.add(row)
            row.record_hash = record_hash
            row.attempt = proof.attempt
            row.aggregator = proof.aggregator
            row.config = proof.config_json
            row.transcript = proof.transcript
            row.recorded_at = self.now()

    def promote_vote_proof(self, session_id: str, round_: int, record_hash: bytes) -> bool:
        """Store the kept evidence of the vote for ``record_hash`` as the round's evidence
        (the record was agreed); False when none is kept for that record."""
        with self.transaction(write=True) as session:
            kept = session.get(VoteProofRow, (session_id, round_))
            if kept is None or kept.record_hash != record_hash:
                return False
            row = session.get(ProofRow, (session_id, round_))
            if row is None:
                row = ProofRow(session_id=session_id, round=round_)
                session.add(row)
            row.attempt = kept.attempt
            row.aggregator = kept.aggregator
            row.config = kept.config
            row.transcript = kept.transcript
            row.recorded_at = self.now()
            session.delete(kept)
            return True
