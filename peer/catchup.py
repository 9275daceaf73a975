"""Catching up: what the other participants say, and the agreed records this peer lacks.

A peer that was down, refused a round or lost its aggregator asks the others where the
session is (:meth:`CatchUp.ask_others`) and fetches the agreed records it lacks
(:meth:`CatchUp.fetch`). What the others *say* moves this peer nowhere: a fetched record is
stored only when its signatures verify under the current, unrevoked roster keys, reach the
session's threshold and it continues this peer's chain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import grpc

from secagg import Verifier

from .channels import ChannelPool
from .codec import CodecError, record_from_proto
from .ledger import Ledger, LedgerError
from .logs import remote
from .round import valid_signatures
from .session import SessionProposal
from .wire import peer_pb2 as pb

__all__ = ["CatchUp"]

logger = logging.getLogger("peer.node")


class CatchUp:
    """This peer's side of catching up (see the module docstring)."""

    def __init__(
        self, me: str, ledger: Ledger, verifiers: Mapping[str, Verifier], pool: ChannelPool
    ) -> None:
        self.me = me
        self.ledger = ledger
        self.verifiers = verifiers
        self.pool = pool

    async def ask_others(
        self, proposal: SessionProposal, timeout: float = 3.0
    ) -> list[tuple[str, pb.SessionStatus]]:
        """Every other reachable participant's view of the session."""

        async def ask(peer: str) -> tuple[str, pb.SessionStatus | None]:
            try:
                status = await self.pool.stub(peer).status(proposal.session_id, timeout=timeout)
            except grpc.RpcError:
                return peer, None
            return peer, status

        others = [p for p in proposal.participants if p != self.me]
        answers = await asyncio.gather(*(ask(p) for p in others))
        return [(peer, status) for peer, status in answers if status is not None]

    async def from_the_most_advanced(
        self, proposal: SessionProposal, views: list[tuple[str, pb.SessionStatus]]
    ) -> None:
        """Fetch the agreed records this peer lacks from whoever holds the most."""
        mine = len(self.ledger.agreed_records(proposal.session_id))
        for peer, status in sorted(views, key=lambda view: -view[1].rounds_agreed):
            if status.rounds_agreed <= mine:
                return
            await self.fetch(proposal, peer)
            if len(self.ledger.agreed_records(proposal.session_id)) >= status.rounds_agreed:
                return

    async def agreed_elsewhere(
        self, proposal: SessionProposal, round_: int
    ) -> list[tuple[str, pb.SessionStatus]]:
        """Fetch (verified) any agreed record of ``round_`` another participant holds; the
        others' views of the session (for the runner's attempt hint)."""
        views = await self.ask_others(proposal)
        await self.from_the_most_advanced(proposal, views)
        if self.ledger.last_agreed_round(proposal.session_id) >= round_:
            logger.info(
                "peer=%s session=%s round %d was agreed without this peer; fetched its record",
                self.me,
                proposal.session_id,
                round_,
            )
        return views

    async def fetch(self, proposal: SessionProposal, source: str) -> None:
        """Fetch and verify the agreed records this peer missed (it was down or refused)."""
        session_id = proposal.session_id
        try:
            status = await self.pool.stub(source).records(
                session_id, timeout=proposal.stage_seconds
            )
        except grpc.RpcError as error:
            logger.warning(
                "peer=%s cannot fetch records from %s: %s",
                self.me,
                source,
                remote(error.details() if isinstance(error, grpc.aio.AioRpcError) else error),
            )
            return
        have = {r.record.round for r in self.ledger.agreed_records(session_id)}
        for proto in sorted(status.records, key=lambda r: r.round):
            if proto.round in have:
                continue
            try:
                record, claimed = record_from_proto(proto)
            except CodecError as error:
                logger.warning(
                    "peer=%s refused record of round %d from %s: %s",
                    self.me,
                    proto.round,
                    source,
                    remote(error),
                )
                return
            # Only signatures that verify under a current, unrevoked roster key count; the
            # others are dropped (and named), and the rest must still reach the threshold.
            signatures, invalid = valid_signatures(record, claimed, self.verifiers)
            if invalid:
                logger.warning(
                    "peer=%s record of round %d from %s: signatures of %s do not count "
                    "(invalid, unknown or revoked)",
                    self.me,
                    proto.round,
                    source,
                    remote(", ".join(invalid)),
                )
            expected_prev = self.ledger.session_head(session_id)
            if record.prev_hash != expected_prev:
                logger.warning(
                    "peer=%s record of round %d from %s does not continue my chain",
                    self.me,
                    proto.round,
                    source,
                )
                return
            try:
                self.ledger.append_agreed(
                    record,
                    signatures,
                    checkpoint=proto.checkpoint or None,
                    min_signatures=proposal.threshold,
                    verifiers=self.verifiers,
                )
            except LedgerError as error:
                logger.warning(
                    "peer=%s refused record of round %d from %s: %s",
                    self.me,
                    proto.round,
                    source,
                    error,
                )
                return
            logger.info(
                "peer=%s caught up round %d of %s from %s", self.me, proto.round, session_id, source
            )
