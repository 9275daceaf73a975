"""Signed votes: the record this peer signed for a round, kept before the signature leaves.

Why: the aggregator collects the participants' signatures over the round's record and hands
the agreed record back. If it dies or is cut off in between, some peers may hold the agreed
record (it reached them) while others retry the round with the next aggregator. Two rules,
both needing the vote to outlive the peer process, keep a round from being agreed twice:

* a peer never signs two different records for one round (:meth:`VotesMixin.record_vote`
  refuses the second): with ``2t > n + c`` two records cannot both reach ``t`` signatures;
* a retry's aggregator can collect the signatures of the earlier attempt again: each peer
  announces its vote in its ``RoundHello`` (peer/round/), so a record that had reached ``t``
  signatures is completed again without depending on the peers that hold it being reachable.

The vote is committed (``synchronous=FULL`` on SQLite) before the signature is sent; a
crash between the two leaves a vote that was never sent, which costs nothing but the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from peer.ledger._errors import VoteConflictError
from peer.ledger._records import AgreedRecord, canonical_json
from peer.ledger._schema import SignedVoteRow
from peer.ledger._sessions import session_row
from peer.ledger._store import LedgerStore, loads_json

__all__ = ["SignedVote", "VotesMixin"]


@dataclass(frozen=True, slots=True)
class SignedVote:
    """The record this peer signed for ``record.round``, in which attempt, and its result."""

    record: AgreedRecord
    record_hash: bytes
    signature: bytes
    attempt: int
    aggregator: str
    model: bytes
    recorded_at: datetime


class VotesMixin(LedgerStore):
    """The signed votes of a :class:`~peer.ledger.Ledger`."""

    def record_vote(
        self,
        record: AgreedRecord,
        signature: bytes,
        *,
        attempt: int,
        aggregator: str,
        model: bytes,
    ) -> SignedVote:
        """Keep that this peer signed ``record`` (call before the signature is sent).

        Idempotent for the same record: returns the vote already kept (its signature, first
        attempt and model).

        Raises:
            VoteConflictError: this peer already signed a different record for the round;
                nothing was written and the new signature must not be sent.
            SessionError: unknown session.
            LedgerWriteError: the vote could not be written (then it must not be sent).
        """
        record.check()
        record_hash = record.record_hash()
        with self.transaction(write=True) as session:
            session_row(session, record.session_id)
            row = session.get(SignedVoteRow, (record.session_id, record.round))
            if row is None:
                row = SignedVoteRow(
                    session_id=record.session_id,
                    round=record.round,
                    attempt=attempt,
                    aggregator=aggregator,
                    record_hash=record_hash,
                    aggregate_hash=record.aggregate_hash,
                    model_hash=record.model_hash,
                    metrics_hash=record.metrics_hash,
                    metrics=canonical_json(record.metrics),
                    epsilon=canonical_json(record.epsilon),
                    prev_hash=record.prev_hash,
                    signature=signature,
                    model=model,
                    recorded_at=self.now(),
                )
                session.add(row)
                session.flush()
            elif row.record_hash != record_hash:
                raise VoteConflictError(
                    f"session {record.session_id!r} round {record.round}: this peer already "
                    f"signed record {row.record_hash.hex()[:16]} (attempt {row.attempt}, "
                    f"aggregator {row.aggregator}); it does not sign {record_hash.hex()[:16]}"
                )
            return _vote(row)

    def signed_vote(self, session_id: str, round_: int) -> SignedVote | None:
        """The record this peer signed for ``round_`` of ``session_id``, if any."""
        with self.transaction(write=False) as session:
            row = session.get(SignedVoteRow, (session_id, round_))
            return None if row is None else _vote(row)


def _vote(row: SignedVoteRow) -> SignedVote:
    where = f"signed vote of session {row.session_id!r} round {row.round}"
    record = AgreedRecord(
        session_id=row.session_id,
        round=row.round,
        aggregate_hash=row.aggregate_hash,
        model_hash=row.model_hash,
        metrics_hash=row.metrics_hash,
        prev_hash=row.prev_hash,
        metrics=loads_json(row.metrics, f"metrics of {where}"),
        epsilon=loads_json(row.epsilon, f"epsilon of {where}"),
    )
    return SignedVote(
        record=record,
        record_hash=row.record_hash,
        signature=row.signature,
        attempt=row.attempt,
        aggregator=row.aggregator,
        model=row.model,
        recorded_at=row.recorded_at,
    )
