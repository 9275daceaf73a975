"""The chain: agreed records appended to their session's hash chain, with their
signatures, checkpoint and privacy charges in one transaction; heads and checkpoints read
back.

See :mod:`peer.ledger._ledger` for the theory of operation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from peer.ledger._errors import (
    ChainMismatchError,
    DuplicateRoundError,
    InvalidRecordError,
    NotEnoughSignaturesError,
)
from peer.ledger._records import (
    ZERO_HASH,
    AgreedRecord,
    Checkpoint,
    PrivacyCharge,
    StoredRecord,
    canonical_json,
    model_digest,
    session_genesis,
    valid_signers,
)
from peer.ledger._schema import AgreedRow, CheckpointRow, PrivacyRow, SessionRow, SignatureRow
from peer.ledger._sessions import session_row
from peer.ledger._store import LedgerStore, loads_json
from secagg.crypto import Verifier

__all__ = [
    "ChainMixin",
    "agreed_row",
    "append_record",
    "chain_head",
    "checkpoint_info",
    "session_chain_head",
    "stored_record",
]


class ChainMixin(LedgerStore):
    """The agreed records and checkpoints of a :class:`~peer.ledger.Ledger`."""

    # ------------------------------------------------------------------ the chain

    def append_agreed(
        self,
        record: AgreedRecord,
        signatures: Mapping[str, bytes],
        checkpoint: bytes | None = None,
        privacy: Iterable[PrivacyCharge] = (),
        *,
        min_signatures: int | None = None,
        verifiers: Mapping[str, Verifier] | None = None,
    ) -> StoredRecord:
        """Append an agreed record, in one transaction with its signatures, checkpoint and
        privacy charges.

        Args:
            record: the agreed record; its ``prev_hash`` must be :meth:`session_head` of
                its session, and its round the session's last agreed round + 1.
            signatures: ``{peer_id: signature over record.payload()}``.
            checkpoint: the new global model (float32 bytes); its SHA-256 must be
                ``record.model_hash``.
            privacy: privacy charges of this round (session and round come from ``record``).
            min_signatures: signatures required; defaults to the session's threshold.
            verifiers: roster keys; when given, every signature must verify.

        Returns:
            The stored record with its ``seq``.

        Raises:
            ChainMismatchError, DuplicateRoundError, NotEnoughSignaturesError,
            InvalidRecordError, SessionError: the record was refused, nothing was written.
            LedgerWriteError: the database cannot be written, nothing was written.
        """
        charges = tuple(privacy)
        now = self.now()
        with self.transaction(write=True) as session:
            return append_record(
                session, record, signatures, checkpoint, charges, min_signatures, verifiers, now
            )

    def head(self) -> tuple[int, bytes]:
        """``(seq, record_hash)`` of the last record appended to this ledger, of any session;
        ``(0, 32 zero bytes)`` if none.

        For display and catch-up positions only: a new record links to
        :meth:`session_head`, not to this.
        """
        with self.transaction(write=False) as session:
            return chain_head(session)

    def session_head(self, session_id: str) -> bytes:
        """The ``prev_hash`` the session's next agreed record must carry: the
        ``record_hash`` of its last agreed record, or :func:`session_genesis` if none.

        Raises:
            SessionError: unknown session.
        """
        with self.transaction(write=False) as session:
            return session_chain_head(session, session_row(session, session_id))[1]

    def last_agreed_round(self, session_id: str) -> int:
        """The highest agreed round of a session, 0 if none (resume at this + 1)."""
        with self.transaction(write=False) as session:
            value = session.scalar(
                select(func.max(AgreedRow.round)).where(AgreedRow.session_id == session_id)
            )
            return int(value or 0)

    def agreed_records(
        self, session_id: str | None = None, *, after_seq: int = 0
    ) -> list[StoredRecord]:
        """Agreed records in this ledger's append order (``seq``), optionally of one session
        (then also its chain order) or after a position."""
        with self.transaction(write=False) as session:
            query = select(AgreedRow).where(AgreedRow.seq > after_seq)
            if session_id is not None:
                query = query.where(AgreedRow.session_id == session_id)
            rows = session.scalars(query.order_by(AgreedRow.seq))
            return [stored_record(row) for row in rows]

    # ------------------------------------------------------------------ checkpoints

    def get_checkpoint(self, session_id: str, round_: int) -> Checkpoint | None:
        """The global model stored with an agreed round, or None."""
        with self.transaction(write=False) as session:
            row = session.get(CheckpointRow, (session_id, round_))
            return None if row is None else checkpoint_info(row)

    def latest_checkpoint(self, session_id: str) -> Checkpoint | None:
        """The checkpoint of the highest round of a session that has one (for resuming)."""
        with self.transaction(write=False) as session:
            row = session.scalars(
                select(CheckpointRow)
                .where(CheckpointRow.session_id == session_id)
                .order_by(CheckpointRow.round.desc())
                .limit(1)
            ).one_or_none()
            return None if row is None else checkpoint_info(row)


def append_record(
    session: Session,
    record: AgreedRecord,
    signatures: Mapping[str, bytes],
    checkpoint: bytes | None,
    privacy: Sequence[PrivacyCharge],
    min_signatures: int | None,
    verifiers: Mapping[str, Verifier] | None,
    now: datetime,
) -> StoredRecord:
    """Check an agreed record against the session's chain and append it, inside the
    caller's write transaction (shared by :meth:`ChainMixin.append_agreed` and the import
    of an export, so both refuse exactly the same records).

    Raises:
        ChainMismatchError, DuplicateRoundError, NotEnoughSignaturesError,
        InvalidRecordError, SessionError: the record was refused.
    """
    record.check()
    where = f"session {record.session_id!r} round {record.round}"
    if record.round < 1:
        raise InvalidRecordError(f"{where}: rounds are numbered from 1")
    if checkpoint is not None:
        if len(checkpoint) % 4 != 0:
            raise InvalidRecordError(
                f"{where}: checkpoint is {len(checkpoint)} bytes, not whole float32 values"
            )
        if model_digest(checkpoint) != record.model_hash:
            raise InvalidRecordError(
                f"{where}: checkpoint SHA-256 {model_digest(checkpoint).hex()} is not "
                f"the record's model_hash {record.model_hash.hex()}"
            )
    for charge in privacy:
        charge.check()
    srow = session_row(session, record.session_id)
    participants = set(loads_json(srow.participants, f"participants of {where}"))
    required = srow.threshold if min_signatures is None else min_signatures
    outsiders = sorted(set(signatures) - participants)
    if outsiders:
        raise InvalidRecordError(
            f"{where}: signatures by {outsiders}, who are not participants of the session"
        )
    signers = sorted(signatures)
    if verifiers is not None:
        signers, problems = valid_signers(record.payload(), signatures, verifiers)
        if problems:
            raise InvalidRecordError(f"{where}: " + "; ".join(problems))
    if len(signers) < required:
        raise NotEnoughSignaturesError(
            f"{where}: {len(signers)} signature(s) ({', '.join(signers) or 'none'}), "
            f"{required} required"
        )
    if agreed_row(session, record.session_id, record.round) is not None:
        raise DuplicateRoundError(f"{where} is already agreed in this ledger")
    last_round, session_hash = session_chain_head(session, srow)
    if record.round < last_round:
        raise ChainMismatchError(
            f"{where}: session {record.session_id!r} has already agreed round "
            f"{last_round}; its chain only moves forward"
        )
    if record.round != last_round + 1:
        # Rounds are never skipped: an aborted round is retried under its number. So a
        # record further on can only come from signers who want this peer to jump ahead.
        raise ChainMismatchError(
            f"{where}: session {record.session_id!r} has agreed rounds up to {last_round}; "
            f"a record is stored only as the next round of its chain ({last_round + 1})"
        )
    if record.prev_hash != session_hash:
        head = f"round {last_round}" if last_round else "its genesis"
        raise ChainMismatchError(
            f"{where}: prev_hash {record.prev_hash.hex()} is not the head of session "
            f"{record.session_id!r} ({head}, {session_hash.hex()})"
        )
    head_seq, _ = chain_head(session)
    record_hash = record.record_hash()
    row = AgreedRow(
        seq=head_seq + 1,
        session_id=record.session_id,
        round=record.round,
        aggregate_hash=record.aggregate_hash,
        model_hash=record.model_hash,
        metrics_hash=record.metrics_hash,
        metrics=canonical_json(dict(record.metrics)),
        epsilon=canonical_json(dict(record.epsilon)),
        prev_hash=record.prev_hash,
        record_hash=record_hash,
        recorded_at=now,
    )
    row.signatures = [
        SignatureRow(peer_id=peer_id, signature=signatures[peer_id])
        for peer_id in sorted(signatures)
    ]
    session.add(row)
    # Flush the parent first: the checkpoint's foreign key points at it.
    session.flush()
    if checkpoint is not None:
        session.add(
            CheckpointRow(
                session_id=record.session_id,
                round=record.round,
                weights=checkpoint,
                sha256=model_digest(checkpoint),
            )
        )
    for charge in privacy:
        session.add(
            PrivacyRow(
                session_id=record.session_id,
                round=record.round,
                peer_id=charge.peer_id,
                kind=charge.kind,
                epsilon=charge.epsilon,
                delta=charge.delta,
            )
        )
    session.flush()
    return StoredRecord(
        seq=row.seq,
        record=record,
        record_hash=record_hash,
        signatures=dict(signatures),
        recorded_at=now,
    )


def agreed_row(session: Session, session_id: str, round_: int) -> AgreedRow | None:
    return session.scalars(
        select(AgreedRow).where(AgreedRow.session_id == session_id, AgreedRow.round == round_)
    ).one_or_none()


def chain_head(session: Session) -> tuple[int, bytes]:
    row = session.execute(
        select(AgreedRow.seq, AgreedRow.record_hash).order_by(AgreedRow.seq.desc()).limit(1)
    ).one_or_none()
    return (0, ZERO_HASH) if row is None else (row.seq, row.record_hash)


def session_chain_head(session: Session, srow: SessionRow) -> tuple[int, bytes]:
    """``(round, record_hash)`` of the session's last agreed record, or
    ``(0, genesis)``."""
    row = session.execute(
        select(AgreedRow.round, AgreedRow.record_hash)
        .where(AgreedRow.session_id == srow.session_id)
        .order_by(AgreedRow.round.desc())
        .limit(1)
    ).one_or_none()
    if row is None:
        return 0, session_genesis(srow.proposal_hash)
    return row.round, row.record_hash


def stored_record(row: AgreedRow) -> StoredRecord:
    where = f"agreed record seq {row.seq}"
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
    return StoredRecord(
        seq=row.seq,
        record=record,
        record_hash=row.record_hash,
        signatures={sig.peer_id: sig.signature for sig in row.signatures},
        recorded_at=row.recorded_at,
    )


def checkpoint_info(row: CheckpointRow) -> Checkpoint:
    return Checkpoint(
        session_id=row.session_id, round=row.round, weights=row.weights, sha256=row.sha256
    )
