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

**Releasing a vote** (SECURITY.md, "Releasing a stuck vote"). The first rule alone lets an
aggregator that collects fewer than t signatures and vanishes leave the round unable to ever
reach t. So, as each attempt starts, every peer signs a *vote statement*: "as attempt a
starts, my only signed record of this round is V (or none)" (:meth:`VotesMixin.state_vote`,
kept before it leaves), and from then on it signs no record of an earlier attempt (a record
names its attempt in its metrics, peer/round/agreement.py). A record R of an earlier attempt
that ``n - t + c + 1`` roster peers state they did not sign can then never reach t: at most
``c`` of them lie, the others never sign R, and only ``t - 1`` peers are left. A peer holding
R may then release it (:meth:`VotesMixin.release_vote`) and sign this attempt's record; it
never signs R again. Checking the statements (roster keys, quorum) is the round's job
(peer/round/agreement.py); this module keeps what was decided.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from peer.ledger._errors import VoteConflictError
from peer.ledger._records import AgreedRecord, canonical_json
from peer.ledger._schema import SignedVoteRow, VoteProofRow, VoteReleaseRow, VoteStatementRow
from peer.ledger._sessions import session_row
from peer.ledger._store import LedgerStore, loads_json
from secagg.crypto import Verifier, canonical

__all__ = [
    "VOTE_STATEMENT_DOMAIN",
    "ReleasedVote",
    "SignedVote",
    "VoteStatement",
    "VotesMixin",
    "release_quorum",
    "statement_problem",
    "vote_statement_payload",
]

VOTE_STATEMENT_DOMAIN = "vote-statement/v1"
"""Domain label of a vote statement's signed bytes (records sign under ``agreed-record/v1``)."""


def vote_statement_payload(
    session_id: str, round_: int, attempt: int, peer_id: str, vote_hash: bytes
) -> bytes:
    """The bytes a peer signs to state its vote as ``attempt`` starts (``vote_hash`` empty:
    it signed no record of the round). Every field is bound, so a statement cannot be
    replayed for another session, round, attempt or peer."""
    return canonical(VOTE_STATEMENT_DOMAIN, session_id, round_, attempt, peer_id, vote_hash)


@dataclass(frozen=True, slots=True)
class VoteStatement:
    """One peer's signed vote statement (see the module docstring)."""

    session_id: str
    round: int
    attempt: int
    peer_id: str
    vote_hash: bytes
    signature: bytes

    def payload(self) -> bytes:
        return vote_statement_payload(
            self.session_id, self.round, self.attempt, self.peer_id, self.vote_hash
        )


def release_quorum(peers: int, threshold: int, colluders: int) -> int:
    """How many roster peers must state they did not sign a record before a peer that signed
    it may release its vote: ``n - t + c + 1`` (c at least 1: the aggregator's own peer).

    Then at most ``c`` of them lie, the honest rest never sign the record, and at most
    ``n - (n - t + c + 1) + c = t - 1`` peers can: the record is dead. Proof and
    assumptions: SECURITY.md, "Releasing a stuck vote".
    """
    return peers - threshold + max(colluders, 1) + 1


def statement_problem(
    statement: VoteStatement,
    *,
    session_id: str,
    round_: int,
    attempt: int,
    participants: Collection[str],
    verifiers: Mapping[str, Verifier],
) -> str | None:
    """What is wrong with ``statement`` as one of this session, round and attempt, by a
    participant with its roster key (None: nothing); the text names the statement's peer.
    Shared by the peers that release a vote (peer/round/agreement.py) and ``verify-ledger``.
    """
    peer = statement.peer_id
    verifier = verifiers.get(peer)
    if peer not in participants or verifier is None:
        return f"vote statement of {peer!r}, who is not in the roster"
    there = (statement.session_id, statement.round, statement.attempt)
    if there != (session_id, round_, attempt):
        return (
            f"vote statement of {peer} is for session {there[0]!r} round {there[1]} attempt "
            f"{there[2]}, not session {session_id!r} round {round_} attempt {attempt}"
        )
    if len(statement.vote_hash) not in (0, 32):
        return f"vote statement of {peer} names a malformed record hash"
    if not verifier.verify(statement.signature, statement.payload()):
        return f"vote statement of {peer} is not signed by {peer}"
    return None


@dataclass(frozen=True, slots=True)
class ReleasedVote:
    """A vote this peer released, with the statements that allowed it."""

    session_id: str
    round: int
    record_hash: bytes
    signed_attempt: int
    released_attempt: int
    evidence: tuple[VoteStatement, ...]


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
        where = f"session {record.session_id!r} round {record.round}"
        with self.transaction(write=True) as session:
            session_row(session, record.session_id)
            stated = session.get(VoteStatementRow, (record.session_id, record.round))
            if stated is not None and attempt < stated.attempt:
                raise VoteConflictError(
                    f"{where}: this peer stated its vote as attempt {stated.attempt} started; "
                    f"it signs no record of attempt {attempt}"
                )
            built_in = record.metrics.get("attempt", attempt)  # older records name none
            if built_in != attempt:
                raise VoteConflictError(
                    f"{where}: record {record_hash.hex()[:16]} was built in attempt {built_in}; "
                    f"this peer signs only records of the attempt it is in ({attempt})"
                )
            if session.get(VoteReleaseRow, (record.session_id, record.round, record_hash)):
                raise VoteConflictError(
                    f"{where}: this peer released its vote for record {record_hash.hex()[:16]}; "
                    "it never signs that record again"
                )
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

    def state_vote(self, session_id: str, round_: int, attempt: int) -> bytes:
        """Keep that this peer states its vote as ``attempt`` starts (call before the signed
        statement is sent), and return the hash of the record to state (empty: none).

        From then on :meth:`record_vote` refuses every record signed in an earlier attempt.

        Raises:
            VoteConflictError: this peer already stated its vote for a later attempt (an
                earlier attempt is over for it).
            SessionError: unknown session.
        """
        with self.transaction(write=True) as session:
            session_row(session, session_id)
            row = session.get(VoteStatementRow, (session_id, round_))
            if row is not None and attempt < row.attempt:
                raise VoteConflictError(
                    f"session {session_id!r} round {round_}: this peer stated its vote as "
                    f"attempt {row.attempt} started; attempt {attempt} is over for it"
                )
            vote = session.get(SignedVoteRow, (session_id, round_))
            vote_hash = b"" if vote is None else vote.record_hash
            if row is None:
                row = VoteStatementRow(session_id=session_id, round=round_)
                session.add(row)
            row.attempt = attempt
            row.vote_hash = vote_hash
            row.recorded_at = self.now()
            return vote_hash

    def stated_attempt(self, session_id: str, round_: int) -> int | None:
        """The latest attempt of the round for which this peer stated its vote, if any."""
        with self.transaction(write=False) as session:
            row = session.get(VoteStatementRow, (session_id, round_))
            return None if row is None else row.attempt

    def release_vote(
        self,
        session_id: str,
        round_: int,
        record_hash: bytes,
        *,
        attempt: int,
        evidence: Sequence[VoteStatement],
    ) -> None:
        """Release this peer's vote for ``record_hash`` in ``attempt``: the caller verified
        that ``evidence`` proves the record can never reach t (peer/round/agreement.py). The
        vote is gone (a new record may be signed) and the record is never signed again.

        Raises:
            VoteConflictError: this peer's vote is not for that record, was signed in this
                attempt or later, or the evidence is not of this round and attempt or names
                the record; nothing was written.
        """
        where = f"session {session_id!r} round {round_}"
        with self.transaction(write=True) as session:
            vote = session.get(SignedVoteRow, (session_id, round_))
            if vote is None or vote.record_hash != record_hash:
                raise VoteConflictError(
                    f"{where}: this peer holds no vote for record {record_hash.hex()[:16]}"
                )
            if vote.attempt >= attempt:
                raise VoteConflictError(
                    f"{where}: a vote of attempt {vote.attempt} cannot be released in attempt "
                    f"{attempt}"
                )
            for s in evidence:
                if (s.session_id, s.round, s.attempt) != (session_id, round_, attempt) or (
                    s.vote_hash == record_hash
                ):
                    raise VoteConflictError(
                        f"{where}: the statement of {s.peer_id} does not release record "
                        f"{record_hash.hex()[:16]} in attempt {attempt}"
                    )
            session.add(
                VoteReleaseRow(
                    session_id=session_id,
                    round=round_,
                    record_hash=record_hash,
                    signed_attempt=vote.attempt,
                    released_attempt=attempt,
                    evidence=canonical_json([_statement_json(s) for s in evidence]),
                    recorded_at=self.now(),
                )
            )
            session.delete(vote)
            proof = session.get(VoteProofRow, (session_id, round_))
            if proof is not None and proof.record_hash == record_hash:
                session.delete(proof)  # the evidence of a record that can never be agreed

    def released_votes(self, session_id: str) -> list[ReleasedVote]:
        """The votes this peer released in ``session_id``, by round."""
        with self.transaction(write=False) as session:
            rows = session.scalars(
                select(VoteReleaseRow)
                .where(VoteReleaseRow.session_id == session_id)
                .order_by(VoteReleaseRow.round, VoteReleaseRow.released_attempt)
            )
            return [
                ReleasedVote(
                    r.session_id,
                    r.round,
                    r.record_hash,
                    r.signed_attempt,
                    r.released_attempt,
                    tuple(
                        _statement_of(item, r.session_id, r.round)
                        for item in loads_json(r.evidence, "evidence of a released vote")
                    ),
                )
                for r in rows
            ]

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


def _statement_json(statement: VoteStatement) -> dict[str, str | int]:
    return {
        "peer": statement.peer_id,
        "attempt": statement.attempt,
        "vote_hash": statement.vote_hash.hex(),
        "signature": statement.signature.hex(),
    }


def _statement_of(item: object, session_id: str, round_: int) -> VoteStatement:
    if not isinstance(item, dict):
        raise VoteConflictError(f"stored release evidence of round {round_} is malformed")
    return VoteStatement(
        session_id,
        round_,
        int(item["attempt"]),
        str(item["peer"]),
        bytes.fromhex(str(item["vote_hash"])),
        bytes.fromhex(str(item["signature"])),
    )
