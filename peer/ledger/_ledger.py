"""The :class:`Ledger`: a peer's durable, hash-chained record of what the consortium agreed.

Theory of operation
-------------------
Every session has its own hash chain. An agreed round's ``prev_hash`` must equal the
``record_hash`` of the session's last agreed record (rounds only move forward; aborted
rounds leave no record, so the previous record is that of the highest agreed round), or
:func:`session_genesis` of the session's proposal hash for its first record. Chains are
per session because peers take part in different sessions: a global chain would differ
from peer to peer, and they could not sign the same record.

Each row also gets ``seq = last seq + 1``: this ledger's own gap-free append order, used
for export, import and display, but not signed. The check and the insert run in one
transaction (``BEGIN IMMEDIATE`` on SQLite, so that two writers queue instead of racing);
``seq`` being the primary key makes a lost race fail rather than fork a chain. The record,
its signatures, its checkpoint and its privacy charges are written together or not at
all.

SQLite connections are set up for durability: write-ahead log, ``synchronous=FULL`` (a
commit has reached the disk before it returns, so a power cut cannot lose an agreed round
that peers were told about) and enforced foreign keys. On other backends the server's own
durability settings apply.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, inspect, select
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import IntegrityError, InternalError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from peer.ledger._errors import (
    ChainMismatchError,
    DuplicateRoundError,
    InvalidRecordError,
    LedgerError,
    LedgerReadError,
    LedgerWriteError,
    NotEnoughSignaturesError,
    RecordRejected,
    SessionError,
)
from peer.ledger._records import (
    ZERO_HASH,
    AgreedRecord,
    BeaconState,
    ChargedRelease,
    Checkpoint,
    JsonValue,
    PrivacyCharge,
    PrivacyKind,
    PrivacyTotals,
    RefusedProposal,
    RoundAttempt,
    RoundStatus,
    SessionInfo,
    SessionStatus,
    StatisticsResult,
    StoredRecord,
    canonical_json,
    model_digest,
    session_genesis,
)
from peer.ledger._schema import (
    SCHEMA_VERSION,
    AgreedRow,
    Base,
    BeaconRow,
    CheckpointRow,
    MetaRow,
    PrivacyReleaseRow,
    PrivacyRow,
    RefusedProposalRow,
    RoundRow,
    SessionRow,
    SignatureRow,
    StatisticsRow,
)
from secagg.crypto import Verifier, sha256

__all__ = ["Clock", "Ledger", "system_clock"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
"""Returns the current time as a timezone-aware datetime."""


def system_clock() -> datetime:
    """The production clock: the current UTC time."""
    return datetime.now(UTC)


# Execution option that asks the SQLite ``begin`` hook for a write (IMMEDIATE) transaction.
_WRITE = "ledger_write"

# Which session status may follow which. Re-setting the current status is always allowed
# (a restarted peer marks its session running again).
_TRANSITIONS: dict[SessionStatus, frozenset[SessionStatus]] = {
    SessionStatus.PROPOSED: frozenset(
        {SessionStatus.ACCEPTED, SessionStatus.REFUSED, SessionStatus.ABORTED}
    ),
    SessionStatus.ACCEPTED: frozenset({SessionStatus.RUNNING, SessionStatus.ABORTED}),
    SessionStatus.RUNNING: frozenset({SessionStatus.FINISHED, SessionStatus.ABORTED}),
    SessionStatus.REFUSED: frozenset(),
    SessionStatus.FINISHED: frozenset(),
    SessionStatus.ABORTED: frozenset(),
}


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # pysqlite's own transaction handling starts transactions lazily (after a SELECT)
        # and commits behind our back on DDL; we issue BEGIN ourselves in ``_on_begin``.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=FULL")
            mode = str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode not in ("wal", "memory"):
                try:
                    cursor.execute("PRAGMA journal_mode=WAL")
                except sqlite3.OperationalError as exc:
                    # A read-only file can still be read; writes will fail with a clear
                    # LedgerWriteError. Anything else should be visible to the operator.
                    log.warning("could not switch the ledger to WAL mode: %s", exc)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = bool(conn.get_execution_options().get(_WRITE, False))
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise LedgerReadError(f"{what} is not valid JSON: {exc}") from exc


def _check_peers(peers: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(peers, str):
        raise TypeError(f"{what} must be a sequence of peer ids, not a string")
    seen: set[str] = set()
    for peer_id in peers:
        if not isinstance(peer_id, str) or not peer_id:
            raise ValueError(f"{what}: peer ids must be non-empty strings, got {peer_id!r}")
        if peer_id in seen:
            raise ValueError(f"{what}: peer {peer_id!r} is listed twice")
        seen.add(peer_id)
    return tuple(peers)


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


class Ledger:
    """A peer's local ledger in any SQLAlchemy database (SQLite file by default).

    Args:
        url: a SQLAlchemy URL, e.g. ``sqlite:////var/lib/peer/ledger.db`` or
            ``postgresql+psycopg://peer@db/ledger``.
        clock: the time source for every timestamp the ledger writes.

    Call :meth:`create` once before first use (it is idempotent). Methods that write raise
    :class:`LedgerWriteError` when the database cannot be written, and a
    :class:`RecordRejected` subclass when what was asked would break the ledger; in both
    cases nothing was written.
    """

    def __init__(self, url: str | URL, clock: Clock = system_clock) -> None:
        self._url = make_url(url)
        self._shown_url = self._url.render_as_string(hide_password=True)
        self._clock = clock
        options: dict[str, Any] = {}
        sqlite = self._url.get_backend_name() == "sqlite"
        if sqlite and self._url.database in (None, "", ":memory:"):
            # One in-memory database only exists while its one connection lives.
            options = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        self._engine = create_engine(self._url, **options)
        if sqlite and self._engine.dialect.driver == "pysqlite":
            _configure_sqlite(self._engine)

    # ------------------------------------------------------------------ plumbing

    @property
    def url(self) -> str:
        """The database URL, with any password hidden."""
        return self._shown_url

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for read-only consumers such as the dashboard)."""
        return self._engine

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self._shown_url!r})"

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError(f"the ledger clock must return aware datetimes, got {now!r}")
        return now

    @contextmanager
    def _db_errors(self, *, write: bool) -> Iterator[None]:
        """Map database failures to ledger errors, in this one place."""
        try:
            yield
        except (OperationalError, InternalError) as exc:
            reason = str(exc.orig) if exc.orig is not None else str(exc)
            if write:
                raise LedgerWriteError(
                    f"cannot write the ledger at {self._shown_url}: {reason}"
                ) from exc
            raise LedgerReadError(f"cannot read the ledger at {self._shown_url}: {reason}") from exc
        except IntegrityError as exc:
            reason = str(exc.orig) if exc.orig is not None else str(exc)
            raise RecordRejected(
                f"the ledger at {self._shown_url} refused the write ({reason}); another "
                "writer may have changed it at the same time"
            ) from exc

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Session]:
        """One database transaction; committed when the block ends without an exception."""
        with self._db_errors(write=write), self._engine.connect() as conn:
            if write:
                conn.execution_options(**{_WRITE: True})
            with (
                conn.begin(),
                Session(bind=conn, join_transaction_mode="rollback_only") as session,
            ):
                yield session
                session.flush()

    # ------------------------------------------------------------------ schema

    def create(self) -> None:
        """Create the tables if they do not exist, and check the schema version.

        Raises:
            LedgerWriteError: the database cannot be written.
            LedgerError: the database holds a ledger of another schema version.
        """
        with self._db_errors(write=True):
            Base.metadata.create_all(self._engine)
        with self._transaction(write=True) as session:
            row = session.get(MetaRow, "schema_version")
            if row is None:
                session.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
            elif row.value != str(SCHEMA_VERSION):
                raise LedgerError(
                    f"the ledger at {self._shown_url} has schema version {row.value}; "
                    f"this program understands version {SCHEMA_VERSION}"
                )

    # ------------------------------------------------------------------ sessions

    def record_proposal(
        self,
        session_id: str,
        proposal: str,
        *,
        proposer: str,
        participants: Sequence[str],
        threshold: int,
        rounds_planned: int,
    ) -> SessionInfo:
        """Record a session proposal as received (status ``proposed``).

        Args:
            proposal: the signed proposal document, stored byte for byte as given (JSON).

        Returns:
            The stored session. Recording the same proposal again is a no-op.

        Raises:
            SessionError: another proposal already uses ``session_id``.
            ValueError: malformed arguments (not JSON, bad threshold, ...).
        """
        if not session_id:
            raise ValueError("session_id must not be empty")
        try:
            json.loads(proposal)
        except ValueError as exc:
            raise ValueError(f"proposal of session {session_id!r} is not JSON: {exc}") from exc
        peers = _check_peers(participants, f"participants of session {session_id!r}")
        if not 1 <= threshold <= len(peers):
            raise ValueError(
                f"session {session_id!r}: threshold {threshold} is not in 1..{len(peers)}"
            )
        if rounds_planned < 1:
            raise ValueError(f"session {session_id!r}: rounds_planned must be >= 1")
        proposal_hash = sha256(proposal.encode("utf-8"))
        now = self._now()
        with self._transaction(write=True) as session:
            existing = session.get(SessionRow, session_id)
            if existing is not None:
                if existing.proposal_hash != proposal_hash:
                    raise SessionError(
                        f"session {session_id!r} already exists with another proposal "
                        f"(from {existing.proposer!r})"
                    )
                return self._session_info(existing)
            row = SessionRow(
                session_id=session_id,
                proposal=proposal,
                proposal_hash=proposal_hash,
                proposer=proposer,
                status=SessionStatus.PROPOSED,
                reason=None,
                created_at=now,
                updated_at=now,
                participants=canonical_json(list(peers)),
                threshold=threshold,
                rounds_planned=rounds_planned,
            )
            session.add(row)
            session.flush()
            return self._session_info(row)

    def decide_session(self, session_id: str, *, accept: bool, reason: str | None = None) -> None:
        """Record this peer's decision on a proposal (``accepted`` or ``refused``).

        Raises:
            SessionError: unknown session, or it was already decided.
            ValueError: a refusal without a reason.
        """
        if not accept and not reason:
            raise ValueError(f"refusing session {session_id!r} needs a reason")
        status = SessionStatus.ACCEPTED if accept else SessionStatus.REFUSED
        self.set_session_status(session_id, status, reason=reason)

    def set_session_status(
        self, session_id: str, status: SessionStatus, *, reason: str | None = None
    ) -> None:
        """Move a session to ``status`` (proposed → accepted/refused → running → finished,
        or aborted from any unfinished state).

        Raises:
            SessionError: unknown session, or a change the life cycle does not allow.
        """
        with self._transaction(write=True) as session:
            row = self._session_row(session, session_id)
            if row.status != status and status not in _TRANSITIONS[row.status]:
                raise SessionError(
                    f"session {session_id!r} is {row.status.value}; it cannot become {status.value}"
                )
            row.status = status
            if reason is not None:
                row.reason = reason
            row.updated_at = self._now()

    def session(self, session_id: str) -> SessionInfo | None:
        """The recorded session, or None."""
        with self._transaction(write=False) as session:
            row = session.get(SessionRow, session_id)
            return None if row is None else self._session_info(row)

    def sessions(self) -> list[SessionInfo]:
        """Every recorded session, oldest first."""
        with self._transaction(write=False) as session:
            rows = session.scalars(
                select(SessionRow).order_by(SessionRow.created_at, SessionRow.session_id)
            )
            return [self._session_info(row) for row in rows]

    @staticmethod
    def _session_row(session: Session, session_id: str) -> SessionRow:
        row = session.get(SessionRow, session_id)
        if row is None:
            raise SessionError(f"unknown session {session_id!r}")
        return row

    @staticmethod
    def _session_info(row: SessionRow) -> SessionInfo:
        participants = _loads(row.participants, f"participants of session {row.session_id!r}")
        return SessionInfo(
            session_id=row.session_id,
            proposal=row.proposal,
            proposal_hash=row.proposal_hash,
            proposer=row.proposer,
            status=SessionStatus(row.status),
            reason=row.reason,
            created_at=row.created_at,
            participants=tuple(participants),
            threshold=row.threshold,
            rounds_planned=row.rounds_planned,
        )

    # ------------------------------------------------------------------ round attempts

    def start_round(
        self, session_id: str, round_: int, *, aggregator: str, participants: Sequence[str]
    ) -> RoundAttempt:
        """Record the start of an attempt at a round and return it (attempts count from 1).

        An attempt still marked running (left by a crash, or by an aggregator that died) is
        closed as aborted. An ``accepted`` session becomes ``running``.

        Raises:
            SessionError: unknown session, or one that is not accepted or running.
            DuplicateRoundError: the round is already agreed.
        """
        if round_ < 1:
            raise ValueError(f"rounds are numbered from 1, got {round_}")
        peers = _check_peers(participants, f"participants of round {round_}")
        now = self._now()
        with self._transaction(write=True) as session:
            srow = self._session_row(session, session_id)
            if srow.status not in (SessionStatus.ACCEPTED, SessionStatus.RUNNING):
                raise SessionError(
                    f"session {session_id!r} is {srow.status.value}; no round can start"
                )
            if self._agreed_row(session, session_id, round_) is not None:
                raise DuplicateRoundError(
                    f"session {session_id!r} round {round_} is already agreed"
                )
            srow.status = SessionStatus.RUNNING
            srow.updated_at = now
            attempts = list(
                session.scalars(
                    select(RoundRow).where(
                        RoundRow.session_id == session_id, RoundRow.round == round_
                    )
                )
            )
            number = max((a.attempt for a in attempts), default=0) + 1
            for stale in attempts:
                if stale.status == RoundStatus.RUNNING:
                    stale.status = RoundStatus.ABORTED
                    stale.ended_at = now
                    stale.abort_reason = f"superseded by attempt {number}"
            row = RoundRow(
                session_id=session_id,
                round=round_,
                attempt=number,
                aggregator=aggregator,
                status=RoundStatus.RUNNING,
                participants=canonical_json(list(peers)),
                dropped=canonical_json({}),
                started_at=now,
                ended_at=None,
                bytes_sent=0,
                bytes_received=0,
                abort_reason=None,
            )
            session.add(row)
            session.flush()
            return self._attempt(row)

    def finish_round(
        self,
        session_id: str,
        round_: int,
        attempt: int,
        *,
        status: RoundStatus,
        dropped: Mapping[str, Sequence[str]] | None = None,
        bytes_sent: int = 0,
        bytes_received: int = 0,
        reason: str | None = None,
    ) -> RoundAttempt:
        """End a running attempt.

        Args:
            status: ``agreed`` (the agreed record must already be appended),
                ``refused-to-sign`` or ``aborted`` (both need ``reason``).
            dropped: the peers that dropped out, per protocol stage.

        Raises:
            SessionError: the attempt is unknown or already ended, or ``agreed`` without
                an agreed record.
        """
        if status == RoundStatus.RUNNING:
            raise ValueError("finish_round needs a final status, not running")
        if status != RoundStatus.AGREED and not reason:
            raise ValueError(f"a round ending as {status.value} needs a reason")
        if bytes_sent < 0 or bytes_received < 0:
            raise ValueError("byte counts must be >= 0")
        stages = {
            stage: list(_check_peers(peers, f"dropped at {stage}"))
            for stage, peers in (dropped or {}).items()
        }
        with self._transaction(write=True) as session:
            row = session.get(RoundRow, (session_id, round_, attempt))
            where = f"session {session_id!r} round {round_} attempt {attempt}"
            if row is None:
                raise SessionError(f"{where} was never started")
            if row.status != RoundStatus.RUNNING:
                raise SessionError(f"{where} already ended as {row.status.value}")
            if status == RoundStatus.AGREED and (
                self._agreed_row(session, session_id, round_) is None
            ):
                raise SessionError(f"{where} cannot be agreed: no agreed record is stored")
            row.status = status
            row.dropped = canonical_json(stages)
            row.bytes_sent = bytes_sent
            row.bytes_received = bytes_received
            row.abort_reason = reason
            row.ended_at = self._now()
            session.flush()
            return self._attempt(row)

    def abort_round(
        self,
        session_id: str,
        round_: int,
        attempt: int,
        *,
        reason: str,
        dropped: Mapping[str, Sequence[str]] | None = None,
        bytes_sent: int = 0,
        bytes_received: int = 0,
    ) -> RoundAttempt:
        """End a running attempt as aborted (see :meth:`finish_round`)."""
        return self.finish_round(
            session_id,
            round_,
            attempt,
            status=RoundStatus.ABORTED,
            dropped=dropped,
            bytes_sent=bytes_sent,
            bytes_received=bytes_received,
            reason=reason,
        )

    def recover_interrupted_rounds(self) -> list[RoundAttempt]:
        """Close the attempts a stopped peer left running; call once at peer start-up.

        An attempt whose round has an agreed record becomes ``agreed`` (the peer stopped
        after recording it); any other becomes ``aborted``.

        Returns:
            The attempts that were closed.
        """
        now = self._now()
        closed: list[RoundAttempt] = []
        with self._transaction(write=True) as session:
            rows = session.scalars(
                select(RoundRow)
                .where(RoundRow.status == RoundStatus.RUNNING)
                .order_by(RoundRow.session_id, RoundRow.round, RoundRow.attempt)
            )
            for row in rows:
                if self._agreed_row(session, row.session_id, row.round) is not None:
                    row.status = RoundStatus.AGREED
                else:
                    row.status = RoundStatus.ABORTED
                    row.abort_reason = "interrupted: the peer stopped during the round"
                row.ended_at = now
                closed.append(self._attempt(row))
        return closed

    def round_attempts(self, session_id: str, round_: int | None = None) -> list[RoundAttempt]:
        """Attempts of a session (or of one of its rounds), in order."""
        with self._transaction(write=False) as session:
            query = select(RoundRow).where(RoundRow.session_id == session_id)
            if round_ is not None:
                query = query.where(RoundRow.round == round_)
            rows = session.scalars(query.order_by(RoundRow.round, RoundRow.attempt))
            return [self._attempt(row) for row in rows]

    @staticmethod
    def _attempt(row: RoundRow) -> RoundAttempt:
        where = f"session {row.session_id!r} round {row.round} attempt {row.attempt}"
        dropped = _loads(row.dropped, f"dropped of {where}")
        return RoundAttempt(
            session_id=row.session_id,
            round=row.round,
            attempt=row.attempt,
            aggregator=row.aggregator,
            status=RoundStatus(row.status),
            participants=tuple(_loads(row.participants, f"participants of {where}")),
            dropped={stage: tuple(peers) for stage, peers in dropped.items()},
            started_at=row.started_at,
            ended_at=row.ended_at,
            bytes_sent=row.bytes_sent,
            bytes_received=row.bytes_received,
            abort_reason=row.abort_reason,
        )

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
        now = self._now()
        with self._transaction(write=True) as session:
            return self._append(
                session, record, signatures, checkpoint, charges, min_signatures, verifiers, now
            )

    def _append(
        self,
        session: Session,
        record: AgreedRecord,
        signatures: Mapping[str, bytes],
        checkpoint: bytes | None,
        privacy: Sequence[PrivacyCharge],
        min_signatures: int | None,
        verifiers: Mapping[str, Verifier] | None,
        now: datetime,
    ) -> StoredRecord:
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
        srow = self._session_row(session, record.session_id)
        participants = set(_loads(srow.participants, f"participants of {where}"))
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
        if self._agreed_row(session, record.session_id, record.round) is not None:
            raise DuplicateRoundError(f"{where} is already agreed in this ledger")
        last_round, session_hash = self._session_head(session, srow)
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
        head_seq, _ = self._head(session)
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

    @staticmethod
    def _agreed_row(session: Session, session_id: str, round_: int) -> AgreedRow | None:
        return session.scalars(
            select(AgreedRow).where(AgreedRow.session_id == session_id, AgreedRow.round == round_)
        ).one_or_none()

    @staticmethod
    def _head(session: Session) -> tuple[int, bytes]:
        row = session.execute(
            select(AgreedRow.seq, AgreedRow.record_hash).order_by(AgreedRow.seq.desc()).limit(1)
        ).one_or_none()
        return (0, ZERO_HASH) if row is None else (row.seq, row.record_hash)

    def head(self) -> tuple[int, bytes]:
        """``(seq, record_hash)`` of the last record appended to this ledger, of any session;
        ``(0, 32 zero bytes)`` if none.

        For display and catch-up positions only: a new record links to
        :meth:`session_head`, not to this.
        """
        with self._transaction(write=False) as session:
            return self._head(session)

    @staticmethod
    def _session_head(session: Session, srow: SessionRow) -> tuple[int, bytes]:
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

    def session_head(self, session_id: str) -> bytes:
        """The ``prev_hash`` the session's next agreed record must carry: the
        ``record_hash`` of its last agreed record, or :func:`session_genesis` if none.

        Raises:
            SessionError: unknown session.
        """
        with self._transaction(write=False) as session:
            return self._session_head(session, self._session_row(session, session_id))[1]

    def last_agreed_round(self, session_id: str) -> int:
        """The highest agreed round of a session, 0 if none (resume at this + 1)."""
        with self._transaction(write=False) as session:
            value = session.scalar(
                select(func.max(AgreedRow.round)).where(AgreedRow.session_id == session_id)
            )
            return int(value or 0)

    def agreed_records(
        self, session_id: str | None = None, *, after_seq: int = 0
    ) -> list[StoredRecord]:
        """Agreed records in this ledger's append order (``seq``), optionally of one session
        (then also its chain order) or after a position."""
        with self._transaction(write=False) as session:
            query = select(AgreedRow).where(AgreedRow.seq > after_seq)
            if session_id is not None:
                query = query.where(AgreedRow.session_id == session_id)
            rows = session.scalars(query.order_by(AgreedRow.seq))
            return [self._stored(row) for row in rows]

    @staticmethod
    def _stored(row: AgreedRow) -> StoredRecord:
        where = f"agreed record seq {row.seq}"
        record = AgreedRecord(
            session_id=row.session_id,
            round=row.round,
            aggregate_hash=row.aggregate_hash,
            model_hash=row.model_hash,
            metrics_hash=row.metrics_hash,
            prev_hash=row.prev_hash,
            metrics=_loads(row.metrics, f"metrics of {where}"),
            epsilon=_loads(row.epsilon, f"epsilon of {where}"),
        )
        return StoredRecord(
            seq=row.seq,
            record=record,
            record_hash=row.record_hash,
            signatures={sig.peer_id: sig.signature for sig in row.signatures},
            recorded_at=row.recorded_at,
        )

    # ------------------------------------------------------------------ checkpoints

    def get_checkpoint(self, session_id: str, round_: int) -> Checkpoint | None:
        """The global model stored with an agreed round, or None."""
        with self._transaction(write=False) as session:
            row = session.get(CheckpointRow, (session_id, round_))
            return None if row is None else self._checkpoint(row)

    def latest_checkpoint(self, session_id: str) -> Checkpoint | None:
        """The checkpoint of the highest round of a session that has one (for resuming)."""
        with self._transaction(write=False) as session:
            row = session.scalars(
                select(CheckpointRow)
                .where(CheckpointRow.session_id == session_id)
                .order_by(CheckpointRow.round.desc())
                .limit(1)
            ).one_or_none()
            return None if row is None else self._checkpoint(row)

    @staticmethod
    def _checkpoint(row: CheckpointRow) -> Checkpoint:
        return Checkpoint(
            session_id=row.session_id, round=row.round, weights=row.weights, sha256=row.sha256
        )

    # ------------------------------------------------------------------ privacy, statistics

    def charge_release(
        self, session_id: str, round_: int, attempt: int, release_id: str, charge: PrivacyCharge
    ) -> bool:
        """Record, durably, the privacy charge of a value about to leave this peer.

        Call it *before* the value can leave: when it returns, the charge is committed. The
        same ``release_id`` (the same value sent again, e.g. by a retried attempt) is charged
        once; any other value is a new charge.

        Returns:
            True if this call charged the release, False if it was already charged.

        Raises:
            InvalidRecordError: a negative, infinite or malformed figure or event.
            SessionError: unknown session.
            LedgerWriteError: the charge could not be written (the value must not leave).
        """
        charge.check()
        if not release_id or len(release_id) > 64:
            raise InvalidRecordError(f"release id must be 1..64 characters: {release_id!r}")
        event = None if charge.event is None else canonical_json(dict(charge.event))
        now = self._now()
        with self._transaction(write=True) as session:
            self._session_row(session, session_id)
            key = (session_id, round_, charge.peer_id, release_id)
            if session.get(PrivacyReleaseRow, key) is not None:
                return False
            session.add(
                PrivacyReleaseRow(
                    session_id=session_id,
                    round=round_,
                    peer_id=charge.peer_id,
                    release_id=release_id,
                    attempt=attempt,
                    kind=charge.kind,
                    epsilon=charge.epsilon,
                    delta=charge.delta,
                    event=event,
                    recorded_at=now,
                )
            )
        return True

    def privacy_charges(self, peer_id: str, session_id: str | None = None) -> list[ChargedRelease]:
        """Every privacy charge of ``peer_id``, oldest first.

        The charges written before each release (:meth:`charge_release`), and, for rounds
        that have none (ledgers written before releases were charged), the charges stored
        with the agreed record (``release_id`` ``"agreed"``, attempt 0).
        """
        with self._transaction(write=False) as session:
            releases = select(PrivacyReleaseRow).where(PrivacyReleaseRow.peer_id == peer_id)
            legacy = select(PrivacyRow).where(PrivacyRow.peer_id == peer_id)
            if session_id is not None:
                releases = releases.where(PrivacyReleaseRow.session_id == session_id)
                legacy = legacy.where(PrivacyRow.session_id == session_id)
            charged: list[ChargedRelease] = []
            covered: set[tuple[str, int]] = set()
            rows = (
                session.scalars(
                    releases.order_by(PrivacyReleaseRow.recorded_at, PrivacyReleaseRow.round)
                )
                if self._has_releases(session)
                else ()
            )
            for row in rows:
                where = f"privacy charge of {peer_id} in {row.session_id!r} round {row.round}"
                event = None if row.event is None else _loads(row.event, where)
                covered.add((row.session_id, row.round))
                charged.append(
                    ChargedRelease(
                        row.session_id,
                        row.round,
                        row.attempt,
                        row.release_id,
                        PrivacyCharge(
                            peer_id, PrivacyKind(row.kind), row.epsilon, row.delta, event
                        ),
                        row.recorded_at,
                    )
                )
            for old in session.scalars(legacy.order_by(PrivacyRow.session_id, PrivacyRow.round)):
                if (old.session_id, old.round) not in covered:
                    charged.append(
                        ChargedRelease(
                            old.session_id,
                            old.round,
                            0,
                            "agreed",
                            PrivacyCharge(peer_id, PrivacyKind(old.kind), old.epsilon, old.delta),
                            None,
                        )
                    )
        return charged

    @staticmethod
    def _has_releases(session: Session) -> bool:
        """Whether the release charges table exists: a ledger created before it was added
        gets it at the peer's next ``create``, but a read-only reader (the dashboard) may
        open it before that."""
        return inspect(session.connection()).has_table(PrivacyReleaseRow.__tablename__)

    def privacy_peers(self) -> list[str]:
        """The peers with privacy charges in this ledger (a peer charges only itself)."""
        with self._transaction(write=False) as session:
            peers = set(session.scalars(select(PrivacyRow.peer_id).distinct()))
            if self._has_releases(session):
                peers |= set(session.scalars(select(PrivacyReleaseRow.peer_id).distinct()))
        return sorted(peers)

    def privacy_spent(
        self, peer_id: str, session_id: str | None = None, *, delta: float | None = None
    ) -> PrivacyTotals:
        """What ``peer_id`` spent (optionally in one session), per kind and composed.

        The composed ε (:attr:`PrivacyTotals.epsilon`) is the PLD accountant's over every
        charge's mechanism event at ``delta`` (default
        :data:`peer.training.accounting.GLOBAL_DELTA`), plus, by basic composition, the ε of
        charges stored without an event.
        """
        from peer.training.accounting import GLOBAL_DELTA, composed_epsilon

        charges = [c.charge for c in self.privacy_charges(peer_id, session_id)]
        sums = {kind: [0.0, 0.0] for kind in PrivacyKind}
        for charge in charges:
            sums[charge.kind][0] += charge.epsilon
            sums[charge.kind][1] += charge.delta
        events = [dict(c.event) for c in charges if c.event is not None]
        at = GLOBAL_DELTA if delta is None else delta
        composed = None
        if events:
            try:
                composed = composed_epsilon(events, at)  # type: ignore[arg-type]
            except ValueError as error:
                raise LedgerReadError(f"privacy charges of {peer_id}: {error}") from None
            composed += sum(c.epsilon for c in charges if c.event is None)
        training = sums[PrivacyKind.TRAINING]
        statistics = sums[PrivacyKind.STATISTICS]
        return PrivacyTotals(
            peer_id=peer_id,
            training_epsilon=training[0],
            training_delta=training[1],
            statistics_epsilon=statistics[0],
            statistics_delta=statistics[1],
            composed=composed,
            composed_delta=at if composed is not None else 0.0,
        )

    def record_statistics(
        self,
        query_id: str,
        session_id: str,
        round_: int,
        *,
        query: JsonValue,
        result: JsonValue,
        epsilon: float,
        privacy: Iterable[PrivacyCharge] = (),
    ) -> StatisticsResult:
        """Store the result of a federated DP statistics query with its privacy charges.

        Raises:
            SessionError: unknown session.
            RecordRejected: ``query_id`` is already stored.
        """
        charges = tuple(privacy)
        for charge in charges:
            charge.check()
        if epsilon < 0:
            raise ValueError(f"query {query_id!r}: epsilon must be >= 0")
        now = self._now()
        with self._transaction(write=True) as session:
            self._session_row(session, session_id)
            if session.get(StatisticsRow, query_id) is not None:
                raise RecordRejected(f"statistics query {query_id!r} is already recorded")
            session.add(
                StatisticsRow(
                    query_id=query_id,
                    session_id=session_id,
                    round=round_,
                    query=canonical_json(query),
                    result=canonical_json(result),
                    epsilon=epsilon,
                    created_at=now,
                )
            )
            for charge in charges:
                session.add(
                    PrivacyRow(
                        session_id=session_id,
                        round=round_,
                        peer_id=charge.peer_id,
                        kind=charge.kind,
                        epsilon=charge.epsilon,
                        delta=charge.delta,
                    )
                )
        return StatisticsResult(
            query_id=query_id,
            session_id=session_id,
            round=round_,
            query=query,
            result=result,
            epsilon=epsilon,
            created_at=now,
        )

    def statistics_results(self, session_id: str | None = None) -> list[StatisticsResult]:
        """Stored statistics results, oldest first."""
        with self._transaction(write=False) as session:
            query = select(StatisticsRow)
            if session_id is not None:
                query = query.where(StatisticsRow.session_id == session_id)
            rows = session.scalars(query.order_by(StatisticsRow.created_at, StatisticsRow.query_id))
            return [
                StatisticsResult(
                    query_id=row.query_id,
                    session_id=row.session_id,
                    round=row.round,
                    query=_loads(row.query, f"query {row.query_id!r}"),
                    result=_loads(row.result, f"result of query {row.query_id!r}"),
                    epsilon=row.epsilon,
                    created_at=row.created_at,
                )
                for row in rows
            ]

    # ------------------------------------------------------------------ session beacon

    def session_nonce(self, session_id: str, draw: Callable[[], bytes]) -> bytes:
        """This peer's beacon nonce for ``session_id``: the stored one, or ``draw()`` stored
        now (durably, before the caller answers with its commitment).

        Raises:
            SessionError: unknown session.
        """
        with self._transaction(write=True) as session:
            self._session_row(session, session_id)
            row = session.get(BeaconRow, session_id)
            if row is None:
                row = BeaconRow(session_id=session_id, nonce=draw())
                session.add(row)
            return bytes(row.nonce)

    def beacon_state(self, session_id: str) -> BeaconState | None:
        """The session's commit-reveal state here, or None before this peer committed."""
        with self._transaction(write=False) as session:
            row = session.get(BeaconRow, session_id)
            if row is None:
                return None
            commitments = None
            if row.commitments is not None:
                raw = _loads(row.commitments, f"commitments of session {session_id!r}")
                commitments = {
                    str(p): (bytes.fromhex(c), bytes.fromhex(sig)) for p, (c, sig) in raw.items()
                }
            reveals = None
            if row.reveals is not None:
                raw = _loads(row.reveals, f"reveals of session {session_id!r}")
                reveals = {str(p): bytes.fromhex(n) for p, n in raw.items()}
            return BeaconState(
                session_id=session_id,
                nonce=bytes(row.nonce),
                commitments=commitments,
                reveals=reveals,
                beacon=None if row.beacon is None else bytes(row.beacon),
            )

    def session_beacon(self, session_id: str) -> bytes | None:
        """The session's beacon, once every nonce was revealed here."""
        state = self.beacon_state(session_id)
        return None if state is None else state.beacon

    def store_commitments(
        self, session_id: str, commitments: Mapping[str, tuple[bytes, bytes]]
    ) -> None:
        """Fix the participants' (commitment, signature) set of a session (checked by the
        caller). Storing the same set again is a no-op.

        Raises:
            SessionError: no nonce of this peer for the session, or another set is stored
                (the commitments must be fixed before any nonce is revealed).
        """
        text = canonical_json({p: [c.hex(), sig.hex()] for p, (c, sig) in commitments.items()})
        with self._transaction(write=True) as session:
            row = session.get(BeaconRow, session_id)
            if row is None:
                raise SessionError(f"session {session_id!r}: this peer made no commitment")
            if row.commitments is not None and row.commitments != text:
                raise SessionError(f"session {session_id!r}: other commitments are already fixed")
            row.commitments = text

    def store_beacon(self, session_id: str, reveals: Mapping[str, bytes], beacon: bytes) -> None:
        """Record the checked reveals and the beacon. Storing the same again is a no-op.

        Raises:
            SessionError: no commitments stored, or another beacon is already stored.
        """
        with self._transaction(write=True) as session:
            row = session.get(BeaconRow, session_id)
            if row is None or row.commitments is None:
                raise SessionError(f"session {session_id!r}: no commitments are fixed here")
            if row.beacon is not None and bytes(row.beacon) != beacon:
                raise SessionError(f"session {session_id!r}: another beacon is already fixed")
            row.reveals = canonical_json({p: n.hex() for p, n in reveals.items()})
            row.beacon = beacon

    # ------------------------------------------------------------------ refused proposals

    def record_refused_proposal(
        self,
        session_id: str,
        *,
        proposer: str,
        proposal_hash: bytes,
        size: int,
        reason: str,
        keep: int = 1000,
    ) -> None:
        """Log a refused proposal, keeping only the ``keep`` most recent ones.

        Refused proposals are not sessions: they reserve no id and take bounded space
        whatever a caller sends (the reason is cut to 1,000 characters).
        """
        now = self._now()
        with self._transaction(write=True) as session:
            session.add(
                RefusedProposalRow(
                    session_id=session_id[:200],
                    proposer=proposer[:200],
                    proposal_hash=proposal_hash,
                    size=size,
                    reason=reason[:1000],
                    received_at=now,
                )
            )
            session.flush()
            newest = session.scalar(select(func.max(RefusedProposalRow.id))) or 0
            session.execute(
                RefusedProposalRow.__table__.delete().where(  # type: ignore[attr-defined]
                    RefusedProposalRow.id <= newest - keep
                )
            )

    def refused_proposals(self) -> list[RefusedProposal]:
        """The logged refused proposals, oldest first."""
        with self._transaction(write=False) as session:
            rows = session.scalars(select(RefusedProposalRow).order_by(RefusedProposalRow.id))
            return [
                RefusedProposal(
                    session_id=row.session_id,
                    proposer=row.proposer,
                    proposal_hash=row.proposal_hash,
                    size=row.size,
                    reason=row.reason,
                    received_at=row.received_at,
                )
                for row in rows
            ]
