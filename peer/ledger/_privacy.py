"""Privacy charges (written before a value leaves the peer) and their totals, and the
results of statistics sessions."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from peer.ledger._errors import InvalidRecordError, LedgerReadError, RecordRejected
from peer.ledger._records import (
    ChargedRelease,
    JsonValue,
    PrivacyCharge,
    PrivacyKind,
    PrivacyTotals,
    StatisticsResult,
    canonical_json,
)
from peer.ledger._schema import PrivacyReleaseRow, PrivacyRow, StatisticsRow
from peer.ledger._sessions import session_row
from peer.ledger._store import LedgerStore, loads_json

__all__ = ["PrivacyMixin"]


class PrivacyMixin(LedgerStore):
    """The privacy charges and statistics results of a :class:`~peer.ledger.Ledger`."""

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
        now = self.now()
        with self.transaction(write=True) as session:
            session_row(session, session_id)
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
        with self.transaction(write=False) as session:
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
                if _has_releases(session)
                else ()
            )
            for row in rows:
                where = f"privacy charge of {peer_id} in {row.session_id!r} round {row.round}"
                event = None if row.event is None else loads_json(row.event, where)
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

    def privacy_peers(self) -> list[str]:
        """The peers with privacy charges in this ledger (a peer charges only itself)."""
        with self.transaction(write=False) as session:
            peers = set(session.scalars(select(PrivacyRow.peer_id).distinct()))
            if _has_releases(session):
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
        now = self.now()
        with self.transaction(write=True) as session:
            session_row(session, session_id)
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
        with self.transaction(write=False) as session:
            query = select(StatisticsRow)
            if session_id is not None:
                query = query.where(StatisticsRow.session_id == session_id)
            rows = session.scalars(query.order_by(StatisticsRow.created_at, StatisticsRow.query_id))
            return [
                StatisticsResult(
                    query_id=row.query_id,
                    session_id=row.session_id,
                    round=row.round,
                    query=loads_json(row.query, f"query {row.query_id!r}"),
                    result=loads_json(row.result, f"result of query {row.query_id!r}"),
                    epsilon=row.epsilon,
                    created_at=row.created_at,
                )
                for row in rows
            ]


def _has_releases(session: Session) -> bool:
    """Whether the release charges table exists: a ledger created before it was added
    gets it at the peer's next ``create``, but a read-only reader (the dashboard) may
    open it before that."""
    return inspect(session.connection()).has_table(PrivacyReleaseRow.__tablename__)
