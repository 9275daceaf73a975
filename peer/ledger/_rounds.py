"""Round attempts: each try of a round, started, finished or aborted, and recovered after
a crash."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import select

from peer.ledger._chain import agreed_row
from peer.ledger._errors import DuplicateRoundError, SessionError
from peer.ledger._records import RoundAttempt, RoundStatus, SessionStatus, canonical_json
from peer.ledger._schema import RoundRow
from peer.ledger._sessions import session_row
from peer.ledger._store import LedgerStore, check_peers, loads_json

__all__ = ["RoundsMixin", "attempt_info"]


class RoundsMixin(LedgerStore):
    """The round attempts of a :class:`~peer.ledger.Ledger`."""

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
        peers = check_peers(participants, f"participants of round {round_}")
        now = self.now()
        with self.transaction(write=True) as session:
            srow = session_row(session, session_id)
            if srow.status not in (SessionStatus.ACCEPTED, SessionStatus.RUNNING):
                raise SessionError(
                    f"session {session_id!r} is {srow.status.value}; no round can start"
                )
            if agreed_row(session, session_id, round_) is not None:
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
            return attempt_info(row)

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
            stage: list(check_peers(peers, f"dropped at {stage}"))
            for stage, peers in (dropped or {}).items()
        }
        with self.transaction(write=True) as session:
            row = session.get(RoundRow, (session_id, round_, attempt))
            where = f"session {session_id!r} round {round_} attempt {attempt}"
            if row is None:
                raise SessionError(f"{where} was never started")
            if row.status != RoundStatus.RUNNING:
                raise SessionError(f"{where} already ended as {row.status.value}")
            if status == RoundStatus.AGREED and (agreed_row(session, session_id, round_) is None):
                raise SessionError(f"{where} cannot be agreed: no agreed record is stored")
            row.status = status
            row.dropped = canonical_json(stages)
            row.bytes_sent = bytes_sent
            row.bytes_received = bytes_received
            row.abort_reason = reason
            row.ended_at = self.now()
            session.flush()
            return attempt_info(row)

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
        now = self.now()
        closed: list[RoundAttempt] = []
        with self.transaction(write=True) as session:
            rows = session.scalars(
                select(RoundRow)
                .where(RoundRow.status == RoundStatus.RUNNING)
                .order_by(RoundRow.session_id, RoundRow.round, RoundRow.attempt)
            )
            for row in rows:
                if agreed_row(session, row.session_id, row.round) is not None:
                    row.status = RoundStatus.AGREED
                else:
                    row.status = RoundStatus.ABORTED
                    row.abort_reason = "interrupted: the peer stopped during the round"
                row.ended_at = now
                closed.append(attempt_info(row))
        return closed

    def round_attempts(self, session_id: str, round_: int | None = None) -> list[RoundAttempt]:
        """Attempts of a session (or of one of its rounds), in order."""
        with self.transaction(write=False) as session:
            query = select(RoundRow).where(RoundRow.session_id == session_id)
            if round_ is not None:
                query = query.where(RoundRow.round == round_)
            rows = session.scalars(query.order_by(RoundRow.round, RoundRow.attempt))
            return [attempt_info(row) for row in rows]


def attempt_info(row: RoundRow) -> RoundAttempt:
    where = f"session {row.session_id!r} round {row.round} attempt {row.attempt}"
    dropped = loads_json(row.dropped, f"dropped of {where}")
    return RoundAttempt(
        session_id=row.session_id,
        round=row.round,
        attempt=row.attempt,
        aggregator=row.aggregator,
        status=RoundStatus(row.status),
        participants=tuple(loads_json(row.participants, f"participants of {where}")),
        dropped={stage: tuple(peers) for stage, peers in dropped.items()},
        started_at=row.started_at,
        ended_at=row.ended_at,
        bytes_sent=row.bytes_sent,
        bytes_received=row.bytes_received,
        abort_reason=row.abort_reason,
    )
