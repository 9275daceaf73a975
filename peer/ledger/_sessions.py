"""Sessions: a proposal recorded, decided, and its status moved along the allowed
transitions."""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from peer.ledger._errors import SessionError
from peer.ledger._records import SessionInfo, SessionStatus, canonical_json
from peer.ledger._schema import SessionRow
from peer.ledger._store import LedgerStore, check_peers, loads_json
from secagg.crypto import sha256

__all__ = ["SessionsMixin", "session_info", "session_row"]

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


class SessionsMixin(LedgerStore):
    """The sessions of a :class:`~peer.ledger.Ledger`."""

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
        peers = check_peers(participants, f"participants of session {session_id!r}")
        if not 1 <= threshold <= len(peers):
            raise ValueError(
                f"session {session_id!r}: threshold {threshold} is not in 1..{len(peers)}"
            )
        if rounds_planned < 1:
            raise ValueError(f"session {session_id!r}: rounds_planned must be >= 1")
        proposal_hash = sha256(proposal.encode("utf-8"))
        now = self.now()
        with self.transaction(write=True) as session:
            existing = session.get(SessionRow, session_id)
            if existing is not None:
                if existing.proposal_hash != proposal_hash:
                    raise SessionError(
                        f"session {session_id!r} already exists with another proposal "
                        f"(from {existing.proposer!r})"
                    )
                return session_info(existing)
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
            return session_info(row)

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
        with self.transaction(write=True) as session:
            row = session_row(session, session_id)
            if row.status != status and status not in _TRANSITIONS[row.status]:
                raise SessionError(
                    f"session {session_id!r} is {row.status.value}; it cannot become {status.value}"
                )
            row.status = status
            if reason is not None:
                row.reason = reason
            row.updated_at = self.now()

    def session(self, session_id: str) -> SessionInfo | None:
        """The recorded session, or None."""
        with self.transaction(write=False) as session:
            row = session.get(SessionRow, session_id)
            return None if row is None else session_info(row)

    def sessions(self) -> list[SessionInfo]:
        """Every recorded session, oldest first."""
        with self.transaction(write=False) as session:
            rows = session.scalars(
                select(SessionRow).order_by(SessionRow.created_at, SessionRow.session_id)
            )
            return [session_info(row) for row in rows]


def session_row(session: Session, session_id: str) -> SessionRow:
    row = session.get(SessionRow, session_id)
    if row is None:
        raise SessionError(f"unknown session {session_id!r}")
    return row


def session_info(row: SessionRow) -> SessionInfo:
    participants = loads_json(row.participants, f"participants of session {row.session_id!r}")
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
