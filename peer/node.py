"""A hospital's peer: the gRPC service, session decisions, and the loop that runs rounds.

Every peer runs the same program; none is special. For each round the aggregator follows
from the proposal (:func:`peer.session.aggregator_for`); that peer runs an
:class:`~peer.rounds.AggregatorRound` beside its own participation, and everyone else dials it.
A round whose aggregator cannot be reached is retried with the next one in the rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from secagg import RandomSource, SystemRandom

from .backends import backend_for
from .codec import CodecError, fragments
from .config import PeerConfig
from .identity import Role, load_signer
from .ledger import (
    Ledger,
    LedgerError,
    RoundStatus,
    SessionStatus,
)
from .payload import Payload, VectorPayload
from .rounds import (
    PRECONDITION,
    AggregatorRound,
    RoundContext,
    RoundOutcome,
    RoundStatusKind,
    max_message_bytes,
    participate,
    record_from_proto,
    record_to_proto,
    serve_round_stream,
)
from .session import ProposalError, SessionProposal, SignedProposal, aggregator_for, check_policy
from .tls import Authenticator, TLSFiles, caller_identity, create_server, peer_channel
from .wire import peer_pb2 as pb

__all__ = ["SERVICE", "PeerNode"]

SERVICE = "hospital_secagg.v1.Peer"
logger = logging.getLogger("peer.node")

PayloadFactory = Callable[[SessionProposal, PeerConfig, Ledger], Payload]
# Why a round was refused when this peer's ledger cannot record it (read-only, disk full).
CANNOT_RECORD = "cannot record the round"
# Under gRPC's 4 MiB default message limit, with room for the records themselves.
CATCH_UP_CHECKPOINT_BYTES = 3 * 1024 * 1024


def default_payload(proposal: SessionProposal, config: PeerConfig, ledger: Ledger) -> Payload:
    """The payload of a session, by its kind.

    ``vector``: the peer's configured .npy file (zeros if it has none); ``training``:
    federated DP-SGD on the peer's patient data (peer/learning.py).
    """
    kind = proposal.payload_kind
    if kind == "vector":
        if config.payload_file is not None:
            return VectorPayload.from_file(
                config.payload_file, proposal.vector_length, proposal.bits
            )
        return VectorPayload(proposal.vector_length, proposal.bits)
    if kind == "training":
        from .learning import training_payload

        return training_payload(proposal, config, ledger)
    if kind == "statistics":
        from .statistics import statistics_payload

        return statistics_payload(proposal, config, ledger)
    raise ProposalError(f"payload kind {kind!r} is not supported by this peer")


def epsilon_needed(payload: Payload) -> float:
    """Privacy the whole session costs this peer (0 for payloads that spend none)."""
    needed = getattr(payload, "epsilon_needed", None)
    return float(needed()) if callable(needed) else 0.0


@dataclass
class _Progress:
    state: str = "accepted"
    round: int = 0
    stage: str = ""
    aggregator: str = ""
    detail: str = ""


@dataclass
class _Session:
    proposal: SessionProposal
    progress: _Progress = field(default_factory=_Progress)
    task: asyncio.Task[None] | None = None


async def _parsed_fragments(requests: AsyncIterator[bytes]) -> AsyncIterator[pb.Fragment]:
    """A RoundStream's fragments; bytes that are not one raise CodecError (naming no one:
    the caller is known to the stream, which reports it)."""
    async for raw in requests:
        try:
            fragment = pb.Fragment.FromString(raw)
        except DecodeError as error:
            raise CodecError(f"Fragment does not parse: {error}") from None
        yield fragment


class PeerNode:
    """One institution's peer process (see the module docstring)."""

    def __init__(
        self,
        config: PeerConfig,
        *,
        payload_factory: PayloadFactory = default_payload,
        rng: RandomSource | None = None,
    ) -> None:
        self.config = config
        self.me = config.peer_id
        self.authenticator = Authenticator.from_files(config.ca, config.roster, config.crl)
        self.files = TLSFiles.of(config.cert, config.key, config.ca)
        self.signer = load_signer(config.key)
        self.roster = self.authenticator.roster
        self.verifiers = self.roster.verifiers()
        self.ledger = Ledger(config.ledger_url)
        self.ledger.create()
        self.payload_factory = payload_factory
        self.rng = rng or SystemRandom()
        self.port = 0
        self._sessions: dict[str, _Session] = {}
        self._rounds: dict[tuple[str, int, int], AggregatorRound] = {}
        self._rounds_changed = asyncio.Condition()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def serve(self, on_ready: Callable[[int], None] | None = None) -> None:
        """Serve until :meth:`stop`; resumes sessions that were running before a restart."""
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Propose": grpc.unary_unary_rpc_method_handler(
                    self._parsing(self._propose, pb.SessionProposal),
                    response_serializer=pb.ProposalAnswer.SerializeToString,
                ),
                "Start": grpc.unary_unary_rpc_method_handler(
                    self._parsing(self._start, pb.SessionRef),
                    response_serializer=pb.SessionStatus.SerializeToString,
                ),
                "Status": grpc.unary_unary_rpc_method_handler(
                    self._parsing(self._status, pb.SessionRef),
                    response_serializer=pb.SessionStatus.SerializeToString,
                ),
                "Records": grpc.unary_unary_rpc_method_handler(
                    self._parsing(self._records, pb.SessionRef),
                    response_serializer=pb.SessionStatus.SerializeToString,
                ),
                "RoundStream": grpc.stream_stream_rpc_method_handler(
                    self._round_stream,  # parses its own fragments (_parsed_fragments)
                    response_serializer=pb.Fragment.SerializeToString,
                ),
            },
        )
        async with create_server(
            self.config.listen, self.files, self.authenticator, handlers=[handler]
        ) as (_, port):
            self.port = port
            self._resume_sessions()
            if on_ready is not None:
                on_ready(port)
            await self._stopping.wait()
            for session in self._sessions.values():
                if session.task is not None:
                    session.task.cancel()
            for channel in self._channels.values():
                await channel.close(None)

    def stop(self) -> None:
        self._stopping.set()

    def _resume_sessions(self) -> None:
        for info in self.ledger.sessions():
            if info.status in (SessionStatus.RUNNING,):
                try:
                    proposal = SessionProposal.from_document(info.proposal)
                except ProposalError as error:
                    logger.error(
                        "peer=%s cannot resume session %s: %s", self.me, info.session_id, error
                    )
                    continue
                logger.info("peer=%s resuming session=%s", self.me, info.session_id)
                self._launch(proposal)

    def _channel(self, peer_id: str) -> grpc.aio.Channel:
        channel = self._channels.get(peer_id)
        if channel is None:
            channel = self._channels[peer_id] = peer_channel(self.roster, peer_id, self.files)
        return channel

    # ------------------------------------------------------------------ RPC handlers

    def _parsing(
        self, handler: Callable[[Any, Any], Awaitable[Any]], kind: type[Message]
    ) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        """``handler`` behind a parser that answers INVALID_ARGUMENT to bytes that do not parse.

        (grpc's own deserializer answers UNKNOWN and logs a traceback without the caller.)
        """

        async def call(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                request = kind.FromString(raw)
            except DecodeError as error:
                caller = caller_identity().peer_id
                logger.warning(
                    "peer=%s refused a malformed %s from %s: %s",
                    self.me,
                    kind.__name__,
                    caller,
                    error,
                )
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"not a valid {kind.__name__}: {error}"
                )
                raise  # not reached: abort raises
            return await handler(request, context)

        return call

    async def _propose(
        self, request: pb.SessionProposal, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ProposalAnswer:
        caller = caller_identity()
        if request.proposer != caller.peer_id:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller.peer_id} cannot submit a proposal signed as {request.proposer!r}",
            )
        try:
            signed = SignedProposal.verify(
                request.document, request.proposer, request.signature, self.verifiers
            )
        except ProposalError as error:
            logger.warning("peer=%s refused proposal from %s: %s", self.me, caller.peer_id, error)
            return pb.ProposalAnswer(peer_id=self.me, accepted=False, reason=str(error))
        proposal = signed.proposal
        existing = self.ledger.session(proposal.session_id)
        if existing is not None:
            if existing.proposal != proposal.document():
                return pb.ProposalAnswer(
                    peer_id=self.me,
                    accepted=False,
                    reason=f"session id {proposal.session_id} is already used by another proposal",
                )
            accepted = existing.status not in (SessionStatus.REFUSED, SessionStatus.ABORTED)
            return pb.ProposalAnswer(
                peer_id=self.me, accepted=accepted, reason=existing.reason or ""
            )
        needed = 0.0
        loop = asyncio.get_running_loop()
        try:
            # Building a training payload reads the patient data and loads TensorFlow:
            # seconds of work that must not stall the other RPCs.
            backend_for(proposal.aggregation)
            payload = await loop.run_in_executor(
                None, self.payload_factory, proposal, self.config, self.ledger
            )
            needed = await loop.run_in_executor(None, epsilon_needed, payload)
        except (ProposalError, ValueError, OSError) as error:
            reason: str | None = f"cannot take part: {error}"
        else:
            reason = check_policy(
                proposal,
                request.proposer,
                caller.role is Role.PEER,
                self.me,
                self.config.policy,
                epsilon_spent=self.ledger.privacy_spent(self.me).epsilon,
                epsilon_needed=needed,
            )
        self.ledger.record_proposal(
            proposal.session_id,
            proposal.document(),
            proposer=request.proposer,
            participants=list(proposal.participants),
            threshold=proposal.threshold,
            rounds_planned=proposal.rounds,
        )
        self.ledger.decide_session(proposal.session_id, accept=reason is None, reason=reason)
        logger.info(
            "peer=%s session=%s proposal from %s %s%s",
            self.me,
            proposal.session_id,
            request.proposer,
            "accepted" if reason is None else "refused: ",
            reason or "",
        )
        return pb.ProposalAnswer(peer_id=self.me, accepted=reason is None, reason=reason or "")

    async def _start(
        self, request: pb.SessionRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SessionStatus:
        info = self.ledger.session(request.session_id)
        if info is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r} here"
            )
        assert info is not None
        if info.status in (SessionStatus.REFUSED, SessionStatus.ABORTED):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {request.session_id} is {info.status.value}: {info.reason or ''}",
            )
        if request.session_id not in self._sessions and info.status in (
            SessionStatus.ACCEPTED,
            SessionStatus.RUNNING,
        ):
            self._launch(SessionProposal.from_document(info.proposal))
        return self._status_of(request.session_id)

    async def _status(
        self, request: pb.SessionRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SessionStatus:
        if self.ledger.session(request.session_id) is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r} here"
            )
        return self._status_of(request.session_id)

    async def _records(
        self, request: pb.SessionRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SessionStatus:
        status = self._status_of(request.session_id)
        for stored in self.ledger.agreed_records(request.session_id):
            status.records.append(record_to_proto(stored.record, stored.signatures))
        if status.records:
            # The latest result travels along (when it fits one message), so a peer that
            # catches up can continue from the agreed model.
            checkpoint = self.ledger.get_checkpoint(request.session_id, status.records[-1].round)
            if checkpoint is not None and len(checkpoint.weights) <= CATCH_UP_CHECKPOINT_BYTES:
                status.records[-1].checkpoint = checkpoint.weights
        return status

    def _status_of(self, session_id: str) -> pb.SessionStatus:
        info = self.ledger.session(session_id)
        session = self._sessions.get(session_id)
        progress = session.progress if session else _Progress()
        agreed = self.ledger.agreed_records(session_id)
        return pb.SessionStatus(
            session_id=session_id,
            # A runner stopped by an error says so, rather than "running" for ever; one that
            # has run its rounds and only waits for the others says "settling".
            state=progress.state
            if progress.state in ("failed", "settling")
            else (info.status.value if info else "unknown"),
            rounds_planned=info.rounds_planned if info else 0,
            rounds_agreed=len(agreed),
            current_stage=progress.stage,
            current_round=progress.round,
            current_aggregator=progress.aggregator,
            detail=progress.detail,
        )

    async def _round_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Fragment]:
        caller = caller_identity().peer_id
        try:
            async for fragment in serve_round_stream(
                _parsed_fragments(requests), caller, self._find_round, self._max_bytes()
            ):
                yield fragment
        except LookupError as error:
            # Not an error of the caller: the round is elsewhere in time. Answered in-band
            # (an Abort message) rather than by aborting the call, which grpc can surface to
            # the client as INTERNAL when the client is still writing.
            reason = str(error.args[0] if error.args else error)
            logger.info("peer=%s round stream from %s: %s", self.me, caller, reason)
            for fragment in fragments(pb.Abort(reason=reason, offender=PRECONDITION)):
                yield fragment
        except PermissionError as error:
            logger.warning("peer=%s round stream from %s refused: %s", self.me, caller, error)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
        except CodecError as error:  # the hello (later fragments are refused in the round)
            logger.warning("peer=%s round stream from %s refused: %s", self.me, caller, error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except Exception:
            logger.exception("peer=%s round stream from %s failed", self.me, caller)
            raise

    def _max_bytes(self) -> int:
        sizes = [
            max_message_bytes(
                s.proposal.vector_length, s.proposal.bits, len(s.proposal.participants)
            )
            for s in self._sessions.values()
        ]
        return max(sizes, default=1 << 20)

    async def _find_round(self, hello: pb.RoundHello) -> AggregatorRound:
        key = (hello.session_id, hello.round, hello.attempt)
        session = self._sessions.get(hello.session_id)
        if session is None:
            info = self.ledger.session(hello.session_id)
            if info is not None and info.status is SessionStatus.FINISHED:
                raise LookupError(f"round-passed: {info.rounds_planned + 1}")
            raise LookupError(f"not-ready: session {hello.session_id!r} is not running here")
        if any(r.record.round == hello.round for r in self.ledger.agreed_records(hello.session_id)):
            raise LookupError(
                f"round-agreed: round {hello.round} of {hello.session_id} is already agreed"
            )
        if session.progress.round > hello.round:
            raise LookupError(f"round-passed: {session.progress.round}")
        if aggregator_for(session.proposal, hello.round, hello.attempt) != self.me:
            raise PermissionError(
                f"{self.me} is not the aggregator of round {hello.round} attempt {hello.attempt}"
            )
        async with self._rounds_changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._rounds_changed.wait_for(lambda: key in self._rounds),
                    timeout=session.proposal.prepare_seconds + session.proposal.stage_seconds,
                )
        round_ = self._rounds.get(key)
        if round_ is None:
            raise LookupError(
                f"not-ready: {self.me} has not started round {hello.round} attempt {hello.attempt}"
            )
        if round_.protocol.stage is not round_.ctx.backend.first_stage or round_.finished.is_set():
            # Too late to join; the caller waits for the outcome (then "round-agreed" makes
            # it fetch the record, or "round-passed" moves it on) instead of skipping it.
            raise LookupError(f"not-ready: round {hello.round} is already under way here")
        if hello.chain_head != self.ledger.session_head(hello.session_id):
            # A participant that missed agreed rounds would train on a stale model and sign
            # nothing: it must catch up first (Records), then join again.
            raise LookupError(f"behind: {self.ledger.last_agreed_round(hello.session_id)}")
        return round_

    # ------------------------------------------------------------------ running sessions

    def _launch(self, proposal: SessionProposal) -> None:
        session = self._sessions.get(proposal.session_id)
        if session is not None and session.task is not None and not session.task.done():
            return
        session = self._sessions[proposal.session_id] = _Session(proposal)
        session.task = asyncio.create_task(
            self._run_session(session), name=f"session-{proposal.session_id}"
        )

    async def _run_session(self, session: _Session) -> None:
        proposal = session.proposal
        sid = proposal.session_id
        progress = session.progress
        try:
            payload = self.payload_factory(proposal, self.config, self.ledger)
            info = self.ledger.session(sid)
            if info is not None and info.status is SessionStatus.ACCEPTED:
                self.ledger.set_session_status(sid, SessionStatus.RUNNING)
            round_ = self.ledger.last_agreed_round(sid) + 1
            # After a restart the others may be further on (rounds that aborted leave no
            # record here): start where they are, not where this ledger stopped.
            round_ = max(round_, await self._where_are_the_others(proposal))
            attempt = 0
            while round_ <= proposal.rounds:
                progress.state, progress.round = "running", round_
                aggregator = aggregator_for(proposal, round_, attempt)
                progress.aggregator, progress.stage = aggregator, "starting"
                outcome = await self._one_round(session, payload, round_, attempt, aggregator)
                progress.detail = outcome.reason
                if outcome.status is RoundStatusKind.AGGREGATOR_FAILED:
                    if outcome.precondition.startswith(("round-agreed", "round-passed")):
                        # The others went on without this peer (it was down): catch up.
                        await self._catch_up(sid, aggregator)
                        current = outcome.precondition.partition(":")[2].strip()
                        round_ = max(
                            round_ + 1
                            if outcome.precondition.startswith("round-passed")
                            else round_,
                            int(current) if current.isdigit() else 0,
                            self.ledger.last_agreed_round(sid) + 1,
                        )
                        attempt = 0
                        continue
                    # The aggregator may have died after some peers stored the agreed record:
                    # before retrying the round, ask everyone, so that no second, different
                    # record of the same round is ever signed while the first one exists.
                    if await self._agreed_elsewhere(proposal, round_):
                        round_, attempt = self.ledger.last_agreed_round(sid) + 1, 0
                        continue
                    attempt += 1
                    if attempt % len(proposal.participants) == 0:
                        await asyncio.sleep(min(proposal.stage_seconds, 5.0))  # nobody reachable
                    continue
                if outcome.status is RoundStatusKind.REFUSED and outcome.reason.startswith(
                    CANNOT_RECORD
                ):
                    # Stay on this round until the ledger can be written again: moving on
                    # would run through every round at once, and progress.round would tell
                    # the others ("round-passed") that rounds are over which are not.
                    await asyncio.sleep(min(proposal.stage_seconds, 5.0))
                    continue
                round_ += 1
                attempt = 0
            await self._settle(proposal, progress)
            if proposal.payload_kind == "statistics":
                from .statistics import record_statistics_result

                for stored in self.ledger.agreed_records(sid):
                    record_statistics_result(
                        self.ledger, sid, stored.record.round, proposal, stored.record.metrics
                    )
            progress.state, progress.stage = "finished", ""
            self.ledger.set_session_status(sid, SessionStatus.FINISHED)
            logger.info("peer=%s session=%s finished", self.me, sid)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            progress.state, progress.detail = "failed", str(error)
            logger.exception("peer=%s session=%s stopped by an error", self.me, sid)

    async def _one_round(
        self, session: _Session, payload: Payload, round_: int, attempt: int, aggregator: str
    ) -> RoundOutcome:
        proposal = session.proposal
        progress = session.progress

        def on_stage(stage: str, detail: str) -> None:
            progress.stage, progress.detail = stage, detail

        ctx = RoundContext(
            me=self.me,
            session_id=proposal.session_id,
            round=round_,
            attempt=attempt,
            aggregator=aggregator,
            config=proposal.round_config(round_, payload.vector_length(round_), attempt=attempt),
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
        )
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
        if aggregator == self.me:
            agg_round = AggregatorRound(ctx)
            async with self._rounds_changed:
                self._rounds[key] = agg_round
                self._rounds_changed.notify_all()
            aggregator_task = asyncio.create_task(agg_round.run())
        started = time.monotonic()
        outcome = await self._participate_with_retry(ctx)
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
                    reason=f"{outcome.status.value}: {outcome.reason}"[:2000],
                    bytes_sent=outcome.bytes_sent,
                    bytes_received=outcome.bytes_received,
                )
        except LedgerError as error:
            logger.error("peer=%s cannot record the end of round %d: %s", self.me, round_, error)
        logger.info(
            "peer=%s session=%s round=%d attempt=%d outcome=%s in %.2fs %s",
            self.me,
            proposal.session_id,
            round_,
            attempt,
            outcome.status.value,
            time.monotonic() - started,
            outcome.reason,
        )
        if aggregator_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(aggregator_task), proposal.stage_seconds)
            self._rounds.pop(key, None)
        return outcome

    async def _participate_with_retry(self, ctx: RoundContext) -> RoundOutcome:
        """Dial the aggregator; while it is merely not ready yet, try again for a while."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ctx.prepare_seconds + ctx.stage_seconds
        while True:
            outcome = await participate(ctx, self._channel(ctx.aggregator))
            if outcome.precondition.startswith("behind"):
                before = self.ledger.session_head(ctx.session_id)
                await self._catch_up(ctx.session_id, ctx.aggregator)
                if self.ledger.session_head(ctx.session_id) != before:
                    continue  # in sync now: join again with a fresh contribution
            retry = outcome.status is RoundStatusKind.AGGREGATOR_FAILED and (
                outcome.precondition.startswith("not-ready") or "UNAVAILABLE" in outcome.reason
            )
            if not retry or loop.time() >= deadline or self._stopping.is_set():
                return outcome
            await asyncio.sleep(0.5)

    async def _ask_others(
        self, proposal: SessionProposal, timeout: float = 3.0
    ) -> list[tuple[str, pb.SessionStatus]]:
        """Every other reachable participant's view of the session."""

        async def ask(peer: str) -> tuple[str, pb.SessionStatus | None]:
            method = self._channel(peer).unary_unary(
                f"/{SERVICE}/Status",
                request_serializer=pb.SessionRef.SerializeToString,
                response_deserializer=pb.SessionStatus.FromString,
            )
            try:
                status = await method(
                    pb.SessionRef(session_id=proposal.session_id), timeout=timeout
                )
            except grpc.RpcError:
                return peer, None
            return peer, status

        others = [p for p in proposal.participants if p != self.me]
        answers = await asyncio.gather(*(ask(p) for p in others))
        return [(peer, status) for peer, status in answers if status is not None]

    async def _catch_up_with_the_most_advanced(
        self, proposal: SessionProposal, views: list[tuple[str, pb.SessionStatus]]
    ) -> None:
        """Fetch the agreed records this peer lacks from whoever holds the most."""
        mine = len(self.ledger.agreed_records(proposal.session_id))
        for peer, status in sorted(views, key=lambda view: -view[1].rounds_agreed):
            if status.rounds_agreed <= mine:
                return
            await self._catch_up(proposal.session_id, peer)
            if len(self.ledger.agreed_records(proposal.session_id)) >= status.rounds_agreed:
                return

    async def _agreed_elsewhere(self, proposal: SessionProposal, round_: int) -> bool:
        """Whether another participant holds an agreed record of ``round_`` (now fetched)."""
        await self._catch_up_with_the_most_advanced(proposal, await self._ask_others(proposal))
        if self.ledger.last_agreed_round(proposal.session_id) >= round_:
            logger.info(
                "peer=%s session=%s round %d was agreed without this peer; fetched its record",
                self.me,
                proposal.session_id,
                round_,
            )
            return True
        return False

    async def _where_are_the_others(self, proposal: SessionProposal) -> int:
        """After a (re)start: catch up, and the highest round another participant runs."""
        views = await self._ask_others(proposal, timeout=5.0)
        await self._catch_up_with_the_most_advanced(proposal, views)
        running = [(p, s.current_round) for p, s in views if s.state == "running"]
        peer, furthest = max(running, key=lambda view: view[1], default=("", 0))
        if furthest > self.ledger.last_agreed_round(proposal.session_id) + 1:
            logger.info(
                "peer=%s session=%s rejoining at round %d (%s is there)",
                self.me,
                proposal.session_id,
                furthest,
                peer,
            )
        return furthest

    async def _settle(self, proposal: SessionProposal, progress: _Progress) -> None:
        """At the end of a session, wait (bounded) for the others to end too and fetch any
        round they agreed without this peer, so every ledger ends with the same records."""
        progress.state = "settling"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + proposal.prepare_seconds + 2 * proposal.stage_seconds
        while True:
            views = await self._ask_others(proposal)
            await self._catch_up_with_the_most_advanced(proposal, views)
            busy = [p for p, s in views if s.state == "running"]
            if not busy or loop.time() >= deadline or self._stopping.is_set():
                return
            await asyncio.sleep(1.0)

    async def _catch_up(self, session_id: str, source: str) -> None:
        """Fetch and verify the agreed records this peer missed (it was down or refused)."""
        session = self._sessions[session_id]
        method = self._channel(source).unary_unary(
            f"/{SERVICE}/Records",
            request_serializer=pb.SessionRef.SerializeToString,
            response_deserializer=pb.SessionStatus.FromString,
        )
        try:
            status = await method(
                pb.SessionRef(session_id=session_id), timeout=session.proposal.stage_seconds
            )
        except grpc.RpcError as error:
            logger.warning("peer=%s cannot fetch records from %s: %s", self.me, source, error)
            return
        have = {r.record.round for r in self.ledger.agreed_records(session_id)}
        for proto in sorted(status.records, key=lambda r: r.round):
            if proto.round in have:
                continue
            record, signatures = record_from_proto(proto)
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
                    min_signatures=session.proposal.threshold,
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
