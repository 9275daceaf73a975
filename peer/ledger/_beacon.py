"""The session beacon's commit-reveal state, and the log of refused proposals."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sqlalchemy import func, select

from peer.ledger._errors import SessionError
from peer.ledger._records import BeaconState, RefusedProposal, canonical_json
from peer.ledger._schema import BeaconRow, RefusedProposalRow
from peer.ledger._sessions import session_row
from peer.ledger._store import LedgerStore, loads_json

__all__ = ["BeaconMixin"]


class BeaconMixin(LedgerStore):
    """The session beacon and refused-proposal log of a :class:`~peer.ledger.Ledger`."""

    # ------------------------------------------------------------------ session beacon

    def session_nonce(self, session_id: str, draw: Callable[[], bytes]) -> bytes:
        """This peer's beacon nonce for ``session_id``: the stored one, or ``draw()`` stored
        now (durably, before the caller answers with its commitment).

        Raises:
            SessionError: unknown session.
        """
        with self.transaction(write=True) as session:
            session_row(session, session_id)
            row = session.get(BeaconRow, session_id)
            if row is None:
                row = BeaconRow(session_id=session_id, nonce=draw())
                session.add(row)
            return bytes(row.nonce)

    def beacon_state(self, session_id: str) -> BeaconState | None:
        """The session's commit-reveal state here, or None before this peer committed."""
        with self.transaction(write=False) as session:
            row = session.get(BeaconRow, session_id)
            if row is None:
                return None
            commitments = None
            if row.commitments is not None:
                raw = loads_json(row.commitments, f"commitments of session {session_id!r}")
                commitments = {
                    str(p): (bytes.fromhex(c), bytes.fromhex(sig)) for p, (c, sig) in raw.items()
                }
            reveals = None
            if row.reveals is not None:
                raw = loads_json(row.reveals, f"reveals of session {session_id!r}")
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
        with self.transaction(write=True) as session:
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
        with self.transaction(write=True) as session:
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
        now = self.now()
        with self.transaction(write=True) as session:
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
        with self.transaction(write=False) as session:
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
