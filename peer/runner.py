"""The session runner: a peer's rounds, one after the other, with retries and back-off.

For each round the aggregator follows from the proposal (:func:`peer.session.aggregator_for`);
this peer runs an :class:`~peer.round.AggregatorRound` beside its own participation when it
is that aggregator, and dials it otherwise. A round whose aggregator cannot be reached is
retried with the next one in the rotation; rounds are never skipped. At the end of a session
the runner settles: it waits (bounded) for the others and fetches any round they agreed
without it (:mod:`peer.catchup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from secagg import RandomSource, Signer, Verifier

from .attempts import (
    ATTEMPTS_PER_PARTICIPANT,
    INTERNAL_ERROR,
    SAME_ERROR_ATTEMPTS,
    JoinWindow,
    internal_error,
    next_attempt,
    own_failure,
    rejoin_attempt,
)
from .catchup import CatchUp
from .channels import ChannelPool
from .config import PeerConfig
from .ledger import Ledger, LedgerError, RoundStatus, SessionStatus
from .logs import remote
from .metrics import PeerMetrics
from .payloads import Payload, PayloadFactory
from .published import disclose
from .ratelimit import Backoff
from .round import (
    AggregatorRound,
    Elsewhere,
    FaultHooks,
    RoundContext,
    RoundOutcome,
    RoundStatusKind,
    backend_for,
    max_message_bytes,
    participate,
)
from .session import ProposalError, SessionProposal, aggregator_for
from .session_state import SessionState
from .spool import spool_directory
from .wire import peer_pb2 as pb

__all__ = ["CANNOT_RECORD", "Progress", "Session", "SessionRunner"]

logger = logging.getLogger("peer.node")

# Why a round was refused when this peer's ledger cannot record it (read-only, disk full).
CANNOT_RECORD = "cannot record the round"


@dataclass
class Progress:
    """Where this peer's runner is in a session (answered by Status)."""

    state: SessionState = SessionState.ACCEPTED
    round: int = 0
    stage: str = ""
    aggregator: str = ""
    attempt: int = 0
    detail: str = ""


@dataclass
class Session:
    """A session this peer runs."""

    proposal: SessionProposal
    beacon: bytes  # fixed by commit-reveal before the session runs (peer/beacon.py)
    progress: Progress = field(default_factory=Progress)
    task: asyncio.Task[None] | None = None


class SessionRunner:
    """Runs this peer's sessions; answers where they are (Status) and which round a
    participant's stream joins (as the aggregator)."""

    def __init__(
        self,
        *,
        me: str,
        config: PeerConfig,
        ledger: Ledger,
        signer: Signer,
        verifiers: Mapping[str, Verifier],
        rng: RandomSource,
        faults: FaultHooks,
        payload_factory: PayloadFactory,
        pool: ChannelPool,
        catch_up: CatchUp,
        stopping: asyncio.Event,
        metrics: PeerMetrics | None = None,
    ) -> None:
        self.me = me
        self.config = config
        self.ledger = ledger
        self.signer = signer
        self.verifiers = verifiers
        self.rng = rng
        self.faults = faults  # test-only fault injection (peer/faults.py); no-op by default
        self.payload_factory = payload_factory
        self.pool = pool
        self.catch_up = catch_up
        self.stopping = stopping
        self.metrics = metrics  # Prometheus counters (peer/metrics.py), when configured
        # The aggregator's spool of masked inputs: on the peer's disk, not in a RAM-backed /tmp.
        self.spool_dir = spool_directory(config.writable_directory)
        self.sessions: dict[str, Session] = {}
        # The rounds this peer aggregates now, by (session, round, attempt).
        self.rounds: dict[tuple[str, int, int], AggregatorRound] = {}
        self.rounds_changed = asyncio.Condition()

    def stop(self) -> None:
        """Cancel every session's task (they resume at the next start)."""
        for session in self.sessions.values():
            if session.task is not None:
                session.task.cancel()

    def resume(self) -> None:
        """Run again the sessions that were running, and those whose beacon was fixed just
        before a crash (fixed means the proposer started the session)."""
        for info in self.ledger.sessions():
            if info.status not in (SessionStatus.RUNNING, SessionStatus.ACCEPTED):
                continue
            beacon = self.ledger.session_beacon(info.session_id)
            if beacon is None:
                if info.status is SessionStatus.RUNNING:
                    logger.error(
                        "peer=%s cannot resume session %s: it has no beacon",
                        self.me,
                        info.session_id,
                    )
                continue
            try:
                proposal = SessionProposal.from_document(info.proposal)
            except ProposalError as error:
                logger.error(
                    "peer=%s cannot resume session %s: %s", self.me, info.session_id, error
                )
                continue
            logger.info("peer=%s resuming session=%s", self.me, info.session_id)
            self.launch(proposal, beacon)

    def status_of(self, session_id: str) -> pb.SessionStatus:
        info = self.ledger.session(session_id)
        session = self.sessions.get(session_id)
        progress = session.progress if session else Progress()
        agreed = self.ledger.agreed_records(session_id)
        return pb.SessionStatus(
            session_id=session_id,
            # A runner stopped by an error says so, rather than "running" for ever; one that
            # has run its rounds and only waits for the others says "settling".
            state=progress.state
            if progress.state in (SessionState.FAILED, SessionState.SETTLING)
            else (SessionState.of(info.status) if info else SessionState.UNKNOWN),
            rounds_planned=info.rounds_planned if info else 0,
            rounds_agreed=len(agreed),
            current_stage=progress.stage,
            current_round=progress.round,
            current_aggregator=progress.aggregator,
            current_attempt=progress.attempt,
            detail=progress.detail,
        )

    def max_bytes(self) -> int:
        """The largest message any running session's rounds may carry."""
        sizes = [
            max_message_bytes(
                s.proposal.vector_length, s.proposal.bits, len(s.proposal.participants)
            )
            for s in self.sessions.values()
        ]
        return max(sizes, default=1 << 20)

    async def find_round(self, hello: pb.RoundHello) -> AggregatorRound:
        """The round a participant's hello asks for (PermissionError, or Elsewhere)."""
        key = (hello.session_id, hello.round, hello.attempt)
        session = self.sessions.get(hello.session_id)
        info = self.ledger.session(hello.session_id)
        if info is not None and hello.peer_id not in info.participants:
            # Before any answer about where the session is: a round is for participants only
            # (not its proposer, unlike SessionInfo.known_to), and anyone else gets the
            # answer of an unknown session.
            logger.warning(
                "peer=%s round stream of session %s from %s, not a participant: "
                "answered as an unknown session",
                self.me,
                remote(hello.session_id),
                hello.peer_id,
            )
            info = session = None
        if session is None:
            if info is not None and info.status is SessionStatus.FINISHED:
                raise Elsewhere(
                    pb.PRECONDITION_ROUND_PASSED,
                    f"session {hello.session_id} is finished here",
                    info.rounds_planned + 1,
                )
            raise Elsewhere(
                pb.PRECONDITION_NOT_READY, f"session {hello.session_id!r} is not running here"
            )
        if any(r.record.round == hello.round for r in self.ledger.agreed_records(hello.session_id)):
            raise Elsewhere(
                pb.PRECONDITION_ROUND_AGREED,
                f"round {hello.round} of {hello.session_id} is already agreed",
                hello.round,
            )
        if session.progress.round > hello.round:
            raise Elsewhere(
                pb.PRECONDITION_ROUND_PASSED,
                f"session {hello.session_id} is at round {session.progress.round} here",
                session.progress.round,
            )
        if aggregator_for(session.proposal, hello.round, hello.attempt, session.beacon) != self.me:
            raise PermissionError(
                f"{self.me} is not the aggregator of round {hello.round} attempt {hello.attempt}"
            )
        async with self.rounds_changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.rounds_changed.wait_for(lambda: key in self.rounds),
                    timeout=session.proposal.prepare_seconds + session.proposal.stage_seconds,
                )
        round_ = self.rounds.get(key)
        if round_ is None:
            raise Elsewhere(
                pb.PRECONDITION_NOT_READY,
                f"{self.me} has not started round {hello.round} attempt {hello.attempt}",
            )
        if round_.protocol.stage is not round_.ctx.backend.first_stage or round_.finished.is_set():
            # Too late to join; the caller waits for the outcome (then ROUND_AGREED makes
            # it fetch the record, or ROUND_PASSED moves it on) instead of skipping it.
            raise Elsewhere(
                pb.PRECONDITION_NOT_READY, f"round {hello.round} is already under way here"
            )
        if hello.chain_head != self.ledger.session_head(hello.session_id):
            # A participant that missed agreed rounds would train on a stale model and sign
            # nothing: it must catch up first (Records), then join again.
            last = self.ledger.last_agreed_round(hello.session_id)
            raise Elsewhere(
                pb.PRECONDITION_BEHIND, f"the caller is behind: round {last} is agreed here", last
            )
        return round_

    # ------------------------------------------------------------------ running sessions

    def launch(self, proposal: SessionProposal, beacon: bytes) -> None:
        session = self.sessions.get(proposal.session_id)
        if session is not None and session.task is not None and not session.task.done():
            return
        session = self.sessions[proposal.session_id] = Session(proposal, beacon)
        session.task = asyncio.create_task(
            self.run_session(session), name=f"session-{proposal.session_id}"
        )

    async def run_session(self, session: Session) -> None:
        proposal = session.proposal
        sid = proposal.session_id
        progress = session.progress
        try:
            # What trying again cannot change fails the session at once, with its reason: a
            # payload this site cannot build for the proposal (e.g. a model it cannot train).
            payload = self.payload_factory(proposal, self.config, self.ledger)
            info = self.ledger.session(sid)
            if info is not None and info.status is SessionStatus.ACCEPTED:
                self.ledger.set_session_status(sid, SessionStatus.RUNNING)
            # After a restart the others may have agreed rounds without this peer: fetch them
            # (verified: their signatures against the roster, >= threshold, each the next
            # round of this chain). What the others *say* moves this peer nowhere.
            views: list[tuple[str, pb.SessionStatus]] = []
            try:
                views = await self.catch_up.ask_others(proposal, timeout=5.0)
                await self.catch_up.from_the_most_advanced(proposal, views)
            except Exception:  # not fatal: a round's aggregator says BEHIND, and it is fetched
                logger.exception("peer=%s session=%s cannot catch up at its start", self.me, sid)
            round_ = self.ledger.last_agreed_round(sid) + 1
            attempt = self.attempt_hint(proposal, session.beacon, round_, -1, views)
            backoff = Backoff(base=0.5, cap=max(1.0, min(proposal.stage_seconds, 10.0)))
            limit = max(6, ATTEMPTS_PER_PARTICIPANT * len(proposal.participants))
            last_error, same_errors = "", 0  # the last attempt's unexpected error, how often
            rejoined: set[int] = set()  # attempts of this round joined again (rejoin_attempt)
            while round_ <= proposal.rounds:
                progress.state, progress.round = SessionState.RUNNING, round_
                aggregator = aggregator_for(proposal, round_, attempt, session.beacon)
                progress.aggregator, progress.attempt = aggregator, attempt
                progress.stage = "starting"
                error = ""  # why this attempt failed, when an unexpected exception ended it
                outcome: RoundOutcome | None = None
                views = []
                try:
                    outcome = await self.one_round(session, payload, round_, attempt, aggregator)
                    progress.detail = outcome.reason
                    if outcome.status is RoundStatusKind.AGREED:
                        round_, attempt = round_ + 1, 0
                        backoff.reset()
                        last_error, same_errors = "", 0
                        rejoined.clear()
                        continue
                    if outcome.status is RoundStatusKind.REFUSED and outcome.reason.startswith(
                        CANNOT_RECORD
                    ):
                        # Stay on this round until the ledger can be written again.
                        await asyncio.sleep(min(proposal.stage_seconds, 5.0))
                        continue
                    if own_failure(outcome, (INTERNAL_ERROR,)):  # not an aggregator's text
                        error = outcome.reason
                    # Not agreed here. Whether the others agreed it without this peer, only
                    # their agreed records can tell: a ROUND_AGREED/ROUND_PASSED answer is a
                    # claim, acted on only once the claimer's records are fetched and verified.
                    claimed = outcome.precondition in (
                        pb.PRECONDITION_ROUND_AGREED,
                        pb.PRECONDITION_ROUND_PASSED,
                    )
                    if claimed:
                        await self.catch_up.fetch(proposal, aggregator)
                    if self.ledger.last_agreed_round(sid) < round_:
                        # The aggregator may have died after some peers stored the agreed
                        # record: ask everyone before retrying, so that no second, different
                        # record of the same round is ever signed while the first one exists.
                        views = await self.catch_up.agreed_elsewhere(proposal, round_)
                    if self.ledger.last_agreed_round(sid) >= round_:
                        round_, attempt = self.ledger.last_agreed_round(sid) + 1, 0
                        backoff.reset()
                        last_error, same_errors = "", 0
                        rejoined.clear()
                        continue
                    if claimed:
                        logger.warning(
                            "peer=%s session=%s round=%d aggregator %s claims %s but showed no "
                            "agreed record that proves it; trying the next aggregator",
                            self.me,
                            sid,
                            round_,
                            aggregator,
                            remote(outcome.where()),  # the round number is the claimer's
                        )
                    # Rounds are never skipped (the ledger stores only last + 1): an aborted
                    # round is tried again under its number, with the next aggregator (or in
                    # the same attempt, once, when it failed by this peer's own fault).
                    if rejoin_attempt(round_, attempt, outcome, views, rejoined):
                        rejoined.add(attempt)
                    else:
                        attempt = self.attempt_hint(
                            proposal, session.beacon, round_, attempt, views
                        )
                except Exception as exc:  # around one_round (which records its own errors)
                    said = internal_error(exc, self.me)
                    error = progress.detail = said.public  # published: no message, a ref
                    logger.exception(
                        "peer=%s session=%s round=%d attempt=%d failed by an unexpected error "
                        "(%s); trying the round again",
                        self.me,
                        sid,
                        round_,
                        attempt,
                        said.local,
                    )
                    if not views:  # best effort: only to see whether to rejoin the attempt
                        with contextlib.suppress(Exception):
                            views = await self.catch_up.ask_others(proposal)
                    if rejoin_attempt(round_, attempt, outcome, views, rejoined):
                        rejoined.add(attempt)
                    else:
                        attempt += 1
                same_errors = same_errors + 1 if error and error == last_error else int(bool(error))
                last_error = error
                reason = ""
                if same_errors >= SAME_ERROR_ATTEMPTS:
                    reason = f"round {round_} failed {same_errors} times in a row by {error}"
                elif attempt >= limit:
                    reason = f"round {round_} was not agreed in {attempt} attempts"
                    if error:
                        reason += f" (the last one: {error})"
                if reason:
                    logger.error("peer=%s session=%s gives up: %s", self.me, sid, reason)
                    self.ledger.set_session_status(sid, SessionStatus.ABORTED, reason=reason)
                    progress.state, progress.stage, progress.detail = (
                        SessionState.ABORTED,
                        "",
                        reason,
                    )
                    return
                await asyncio.sleep(backoff.next_delay())
            await self.settle(proposal, progress)
            payload.finish(self.ledger, proposal)
            progress.state, progress.stage = SessionState.FINISHED, ""
            self.ledger.set_session_status(sid, SessionStatus.FINISHED)
            logger.info("peer=%s session=%s finished", self.me, sid)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # e.g. its data cannot serve the session (names patients)
            said = disclose(error, self.me)
            progress.state, progress.detail = SessionState.FAILED, said.public
            logger.exception("peer=%s session=%s stopped by %s", self.me, sid, said.local)

    async def one_round(
        self, session: Session, payload: Payload, round_: int, attempt: int, aggregator: str
    ) -> RoundOutcome:
        proposal = session.proposal
        progress = session.progress

        stages = self.metrics.stage_timer() if self.metrics is not None else None

        def on_stage(stage: str, detail: str) -> None:
            progress.stage, progress.detail = stage, detail
            if stages is not None:
                stages.enter(stage)

        # A peer that cannot record the round takes no part in it, in neither role: it finds
        # out before it aggregates or sends anything.
        try:
            ledger_attempt = self.ledger.start_round(
                proposal.session_id,
                round_,
                aggregator=aggregator,
                participants=list(proposal.participants),
            )
        except LedgerError as error:
            logger.warning(
                "peer=%s session=%s round=%d attempt=%d outcome=refused %s: %s",
                self.me,
                proposal.session_id,
                round_,
                attempt,
                CANNOT_RECORD,
                error,
            )
            return RoundOutcome(RoundStatusKind.REFUSED, aggregator, f"{CANNOT_RECORD}: {error}")
        key = (proposal.session_id, round_, attempt)
        aggregator_task: asyncio.Task[None] | None = None
        started = time.monotonic()
        try:
            ctx = RoundContext(
                me=self.me,
                session_id=proposal.session_id,
                round=round_,
                attempt=attempt,
                aggregator=aggregator,
                config=proposal.round_config(
                    round_, payload.vector_length(round_), attempt=attempt, beacon=session.beacon
                ),
                signer=self.signer,
                verifiers=self.verifiers,
                ledger=self.ledger,
                payload=payload,
                backend=backend_for(proposal.aggregation),
                rng=self.rng,
                stage_seconds=proposal.stage_seconds,
                prepare_seconds=proposal.prepare_seconds,
                paillier_key_bits=proposal.paillier_key_bits,
                on_stage=on_stage,
                faults=self.faults,
                spool_dir=self.spool_dir,
            )
            if aggregator == self.me:
                agg_round = AggregatorRound(ctx)
                async with self.rounds_changed:
                    self.rounds[key] = agg_round
                    self.rounds_changed.notify_all()
                aggregator_task = asyncio.create_task(agg_round.run())
            outcome = await self.participate_with_retry(ctx)
        except Exception as error:  # this attempt only (not CancelledError: that stops the peer)
            said = internal_error(error, self.me)
            logger.exception(
                "peer=%s session=%s round=%d attempt=%d failed by an unexpected error (%s)",
                self.me,
                proposal.session_id,
                round_,
                attempt,
                said.local,
            )
            outcome = RoundOutcome(
                RoundStatusKind.REFUSED, aggregator, said.public, local_reason=said.local
            )
        try:
            if outcome.status is RoundStatusKind.AGREED:
                self.ledger.finish_round(
                    proposal.session_id,
                    round_,
                    ledger_attempt.attempt,
                    status=RoundStatus.AGREED,
                    bytes_sent=outcome.bytes_sent,
                    bytes_received=outcome.bytes_received,
                )
            else:
                self.ledger.abort_round(
                    proposal.session_id,
                    round_,
                    ledger_attempt.attempt,
                    # This peer's own ledger: the full text (peer/published.py).
                    reason=f"{outcome.status.value}: {outcome.local_reason or outcome.reason}"[
                        :2000
                    ],
                    bytes_sent=outcome.bytes_sent,
                    bytes_received=outcome.bytes_received,
                )
        except LedgerError as error:
            logger.error("peer=%s cannot record the end of round %d: %s", self.me, round_, error)
        if self.metrics is not None:
            self.metrics.round_finished(outcome, time.monotonic() - started)
        if stages is not None:
            stages.finish()
        logger.info(
            "peer=%s session=%s round=%d attempt=%d outcome=%s in %.2fs %s",
            self.me,
            proposal.session_id,
            round_,
            attempt,
            outcome.status.value,
            time.monotonic() - started,
            remote(outcome.reason),  # may carry another peer's Abort reason
        )
        if aggregator_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(aggregator_task), proposal.stage_seconds)
        self.rounds.pop(key, None)
        return outcome

    async def participate_with_retry(self, ctx: RoundContext) -> RoundOutcome:
        """Dial the aggregator; while it is not ready yet, or briefly unreachable, try again
        (:class:`JoinWindow` says for how long)."""
        loop = asyncio.get_running_loop()
        window = JoinWindow.opening(loop.time(), ctx.prepare_seconds, ctx.stage_seconds)
        while True:
            outcome = await participate(ctx, self.pool.round_streams(ctx.aggregator))
            retry = window.retry(outcome, loop.time())
            if outcome.precondition == pb.PRECONDITION_BEHIND:
                before = self.ledger.session_head(ctx.session_id)
                await self.catch_up.fetch(self.sessions[ctx.session_id].proposal, ctx.aggregator)
                if self.ledger.session_head(ctx.session_id) != before:
                    continue  # in sync now: join again with a fresh contribution
            if not retry or self.stopping.is_set():
                if outcome.unreachable and not self.stopping.is_set():
                    logger.warning(
                        "%s aggregator %s unreachable (limit %.1fs): giving up this attempt",
                        ctx.log_prefix,
                        ctx.aggregator,
                        window.unreachable_limit,
                    )
                return outcome
            await asyncio.sleep(0.5)

    def attempt_hint(
        self,
        proposal: SessionProposal,
        beacon: bytes,
        round_: int,
        failed: int,
        views: list[tuple[str, pb.SessionStatus]],
    ) -> int:
        """:func:`next_attempt`, from this peer's last stated vote of ``round_``."""
        stated: int | None = None
        with contextlib.suppress(LedgerError):
            stated = self.ledger.stated_attempt(proposal.session_id, round_)
        return next_attempt(proposal, beacon, round_, failed, views, stated=stated)

    async def settle(self, proposal: SessionProposal, progress: Progress) -> None:
        """At the end of a session, wait (bounded) for the others to end too and fetch any
        round they agreed without this peer, so every ledger ends with the same records."""
        progress.state = SessionState.SETTLING
        loop = asyncio.get_running_loop()
        deadline = loop.time() + proposal.prepare_seconds + 2 * proposal.stage_seconds
        while True:
            views = await self.catch_up.ask_others(proposal)
            await self.catch_up.from_the_most_advanced(proposal, views)
            busy = [p for p, s in views if s.state == SessionState.RUNNING]
            if not busy or loop.time() >= deadline or self.stopping.is_set():
                return
            await asyncio.sleep(1.0)
