"""The Peer gRPC service (protos/peer.proto): thin handlers over the node's parts.

``Propose`` checks a proposal against this peer's policy and commits to a beacon nonce;
``Start`` fixes the session beacon with its proposer and hands the session to the runner
(:mod:`peer.runner`); ``Status`` / ``Records`` answer a session's participants and proposer;
``RoundStream`` is the aggregator's end of a round (:mod:`peer.round_call`);
``Control`` / ``Relay`` carry calls to outbound-only peers (:mod:`peer.relay`), which run
them through :meth:`PeerService.relayed`: the same handlers, for the call's signed author.
Authentication is the TLS layer's (:func:`peer.tls.caller_identity`); authorization and rate
limits are here, before any work.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf.message import DecodeError, Message

from secagg import RandomSource, Signer, Verifier

from .beacon import (
    NONCE_BYTES,
    BeaconError,
    Commitment,
    beacon_of,
    check_commitments,
    check_reveals,
    commit,
    commitment_signed_bytes,
)
from .channels import SERVICE
from .codec import record_to_proto
from .config import PeerConfig
from .identity import PeerIdentity, Role, Roster
from .ledger import BeaconState, Ledger, LedgerError, RecordRejected, SessionError, SessionStatus
from .logs import remote
from .payloads import PayloadFactory, epsilon_needed
from .published import disclose, internal_error
from .ratelimit import RateLimiter
from .relay import RELAYED_METHODS, RelayHub, RelayRefused
from .round import backend_for
from .round_call import round_stream_call
from .runner import SessionRunner
from .session import (
    ProposalError,
    SessionProposal,
    SignedProposal,
    check_policy,
    outbound_problem,
)
from .tls import acting_as, caller_identity
from .wire import peer_pb2 as pb

__all__ = ["CATCH_UP_CHECKPOINT_BYTES", "PeerService"]

logger = logging.getLogger("peer.node")

# Under gRPC's 4 MiB default message limit, with room for the records themselves.
CATCH_UP_CHECKPOINT_BYTES = 3 * 1024 * 1024


class CallContext(Protocol):
    """What the unary handlers use of their call: a gRPC ServicerContext, or a relayed
    call's (:class:`_RelayedContext`)."""

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn: ...


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _RelayedContext:
    """A relayed call's context: ``abort`` ends the handler with the code and details that
    go back, signed, to the caller."""

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Aborted(code, details)


class PeerService:
    """The handlers of the Peer service (see the module docstring)."""

    def __init__(
        self,
        *,
        me: str,
        config: PeerConfig,
        ledger: Ledger,
        signer: Signer,
        verifiers: Mapping[str, Verifier],
        runner: SessionRunner,
        payload_factory: PayloadFactory,
        nonce_rng: RandomSource,
        clock: Callable[[], float],
        roster: Callable[[], Roster],
    ) -> None:
        self.me = me
        self.roster = roster
        self.config = config
        self.ledger = ledger
        self.signer = signer
        self.verifiers = verifiers
        self.runner = runner
        self.payload_factory = payload_factory
        self.limits = config.limits
        self._reads = RateLimiter(self.limits.reads_per_second, self.limits.reads_burst)
        self._read_refusals_logged: dict[str, float] = {}
        # Beacon nonces (peer/beacon.py): the system CSPRNG unless a test fixes them. Not
        # the round's ``rng``, whose outputs are secrets that never leave this peer: a nonce
        # is kept in the ledger (so a restart commits to the same one) and is published at
        # the reveal.
        self._nonce_rng = nonce_rng
        self._proposal_limiter = RateLimiter(
            config.policy.proposals_per_minute / 60.0, config.policy.proposal_burst, clock
        )
        self._rate_limited: set[str] = set()  # callers whose last proposal was rate limited
        # Open RoundStreams and who holds them, to close them when a CRL revokes the caller.
        self.open_streams: dict[asyncio.Event, PeerIdentity] = {}
        # Outbound-only peers whose Control stream is open here (peer/relay.py); relayed
        # calls count against the same per-caller rate as Status/Records.
        self.hub = RelayHub(
            me, roster, RateLimiter(self.limits.reads_per_second, self.limits.reads_burst)
        )

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        """The service's methods, for :func:`peer.tls.create_server`."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Propose": grpc.unary_unary_rpc_method_handler(
                    self._parsing(self._propose, pb.SessionProposal),
                    response_serializer=pb.ProposalAnswer.SerializeToString,
                ),
                "Start": grpc.unary_unary_rpc_method_handler(
                    self._parsing(self._start, pb.StartRequest),
                    response_serializer=pb.StartAnswer.SerializeToString,
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
                    self._round_stream,  # parses its own fragments (peer/round_call.py)
                    response_serializer=pb.Fragment.SerializeToString,
                ),
                "Relay": grpc.unary_unary_rpc_method_handler(
                    self._parsing(self._relay, pb.RelayedCall),
                    response_serializer=pb.RelayedAnswer.SerializeToString,
                ),
                "Control": grpc.stream_stream_rpc_method_handler(
                    self._control,
                    request_deserializer=pb.RelayedAnswer.FromString,
                    response_serializer=pb.RelayedCall.SerializeToString,
                ),
            },
        )

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
            try:
                return await handler(request, context)
            except grpc.aio.AbortError:  # the handler's own answer (context.abort)
                raise
            except Exception as error:
                # grpc would answer "Unexpected <type>: <message>": the message may quote
                # local data, so only the type and a reference leave (peer/published.py).
                said = internal_error(error, self.me)
                logger.exception("peer=%s %s failed: %s", self.me, kind.__name__, said.local)
                await context.abort(grpc.StatusCode.INTERNAL, said.public)
                raise  # not reached: abort raises

        return call

    async def _propose(
        self, request: pb.SessionProposal, context: CallContext
    ) -> pb.ProposalAnswer:
        """Check a proposal; on accepting, commit to a beacon nonce (peer/beacon.py).

        A refused proposal is logged apart from the sessions (bounded), so its id stays free
        for a legitimate proposal; one that is too large, or a caller that proposes too often,
        gets RESOURCE_EXHAUSTED and costs the ledger nothing.
        """
        caller = caller_identity()
        if request.proposer != caller.peer_id:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller.peer_id} cannot submit a proposal signed as {request.proposer!r}",
            )
        policy = self.config.policy
        wait = self._proposal_limiter.take(caller.peer_id)
        if wait == 0:
            self._rate_limited.discard(caller.peer_id)
        else:
            if caller.peer_id not in self._rate_limited:  # one log line per flood, not per call
                self._rate_limited.add(caller.peer_id)
                logger.warning(
                    "peer=%s proposals from %s are rate limited", self.me, caller.peer_id
                )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{caller.peer_id} sent more than {policy.proposal_burst} proposals in a burst "
                f"(limit {policy.proposals_per_minute:g} per minute); retry in {wait:.1f}s",
            )
        size = len(request.document.encode("utf-8"))
        if size > policy.max_proposal_bytes:
            logger.warning(
                "peer=%s refused a proposal of %d bytes from %s", self.me, size, caller.peer_id
            )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"proposal document of {size} bytes exceeds this peer's limit of "
                f"{policy.max_proposal_bytes} bytes",
            )
        try:
            signed = SignedProposal.verify(
                request.document, request.proposer, request.signature, self.verifiers
            )
        except ProposalError as error:
            return self._refuse(request, caller.peer_id, "", str(error))
        proposal = signed.proposal
        problem = outbound_problem(proposal, self.roster())
        if problem is not None:  # it decides who may aggregate: it must match our roster
            return self._refuse(request, caller.peer_id, proposal.session_id, problem)
        existing = self.ledger.session(proposal.session_id)
        if existing is not None:
            if existing.proposal != proposal.document() or existing.proposer != request.proposer:
                return self._refuse(
                    request,
                    caller.peer_id,
                    proposal.session_id,
                    f"session id {proposal.session_id} is already used by another proposal",
                )
            # The same proposal again (an operator retrying): the same answer.
            if existing.status in (SessionStatus.REFUSED, SessionStatus.ABORTED):
                return pb.ProposalAnswer(
                    peer_id=self.me, accepted=False, reason=existing.reason or ""
                )
            return self.accept(proposal)
        is_peer = caller.role is Role.PEER
        # Who may propose, and what, before any work on the payload (which reads the
        # patient data): an unauthorized caller costs this peer one policy check.
        reason = check_policy(proposal, request.proposer, is_peer, self.me, policy)
        if reason is None:
            loop = asyncio.get_running_loop()
            try:
                # Building a training payload reads the patient data and loads TensorFlow:
                # seconds of work that must not stall the other RPCs.
                backend_for(proposal.aggregation)
                payload = await loop.run_in_executor(
                    None, self.payload_factory, proposal, self.config, self.ledger
                )
                needed = await loop.run_in_executor(None, epsilon_needed, payload)
            except Exception as error:  # the site's checks, its data, or a bug: a refusal
                # Answered to the operator: a data error goes out as its category and a
                # reference to this log line, never its text (peer/published.py).
                said = disclose(error, self.me)
                logger.warning(
                    "peer=%s session=%s cannot take part: %s",
                    self.me,
                    proposal.session_id,
                    said.local,
                    exc_info=not isinstance(error, ProposalError | ValueError | OSError),
                )
                reason = f"cannot take part: {said.public}"
            else:
                reason = check_policy(
                    proposal,
                    request.proposer,
                    is_peer,
                    self.me,
                    policy,
                    epsilon_spent=self.ledger.privacy_spent(self.me).epsilon,
                    epsilon_needed=needed,
                )
        if reason is not None:
            return self._refuse(request, caller.peer_id, proposal.session_id, reason)
        self.ledger.record_proposal(
            proposal.session_id,
            proposal.document(),
            proposer=request.proposer,
            participants=list(proposal.participants),
            threshold=proposal.threshold,
            rounds_planned=proposal.rounds,
        )
        self.ledger.decide_session(proposal.session_id, accept=True)
        logger.info(
            "peer=%s session=%s proposal from %s accepted",
            self.me,
            proposal.session_id,
            request.proposer,
        )
        return self.accept(proposal)

    def accept(self, proposal: SessionProposal) -> pb.ProposalAnswer:
        """An accepting answer with this peer's signed beacon commitment; the nonce is in the
        ledger before the answer leaves (a restarted peer commits to the same one)."""
        try:
            nonce = self.ledger.session_nonce(
                proposal.session_id, lambda: self._nonce_rng.token_bytes(NONCE_BYTES)
            )
        except RecordRejected:  # a concurrent retry of the same proposal stored it first
            nonce = self.ledger.session_nonce(proposal.session_id, lambda: b"")
        commitment = commit(proposal.digest, self.me, nonce)
        signature = self.signer.sign(commitment_signed_bytes(proposal.digest, self.me, commitment))
        return pb.ProposalAnswer(
            peer_id=self.me,
            accepted=True,
            commitment=commitment,
            commitment_signature=signature,
        )

    def _refuse(
        self, request: pb.SessionProposal, caller: str, session_id: str, reason: str
    ) -> pb.ProposalAnswer:
        """A refusal, logged in the bounded refused-proposal log (never as a session)."""
        logger.warning(
            "peer=%s session=%s proposal from %s refused: %s",
            self.me,
            session_id or "?",
            caller,
            reason,
        )
        document = request.document.encode("utf-8")
        try:
            self.ledger.record_refused_proposal(
                session_id,
                proposer=caller,
                proposal_hash=hashlib.sha256(document).digest(),
                size=len(document),
                reason=reason,
            )
        except LedgerError as error:
            logger.warning("peer=%s cannot log a refused proposal: %s", self.me, error)
        return pb.ProposalAnswer(peer_id=self.me, accepted=False, reason=reason)

    async def _start(self, request: pb.StartRequest, context: CallContext) -> pb.StartAnswer:
        """Fix the session beacon with its proposer, then run the session (peer/beacon.py).

        With the participants' signed commitments: check and store them, answer this peer's
        nonce. With every nonce: check each against its commitment, store the beacon, run.
        Every answer carries this peer's own signed commitment; only the proposer may call.
        """
        caller = caller_identity().peer_id
        sid = request.session_id
        info = self.ledger.session(sid)
        if info is None or not info.known_to(caller):  # an outsider: as if unknown
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no session {sid!r} here")
        assert info is not None
        if caller != info.proposer:
            logger.warning("peer=%s session=%s start by %s refused", self.me, sid, caller)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"only {info.proposer}, who proposed session {sid}, may start it; not {caller}",
            )
        if info.status in (SessionStatus.REFUSED, SessionStatus.ABORTED):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {sid} is {info.status.value}: {info.reason or ''}",
            )
        try:
            proposal = SessionProposal.from_document(info.proposal)
        except ProposalError as error:  # stored by an older version with other rules
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"session {sid}: {error}")
            raise  # not reached: abort raises
        state = self.ledger.beacon_state(sid)
        if state is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.me} made no beacon commitment for session {sid}",
            )
        assert state is not None
        own = self.accept(proposal)  # this peer's signed commitment, answered every time
        answer = pb.StartAnswer(
            peer_id=self.me,
            commitment=pb.BeaconCommitment(
                peer_id=self.me, commitment=own.commitment, signature=own.commitment_signature
            ),
        )
        try:
            if state.beacon is not None:
                answer.nonce, answer.beacon = state.nonce, state.beacon  # both public by now
            elif request.reveals:
                answer.beacon = self._fix_beacon(proposal, state, request)
            elif request.commitments:
                self._fix_commitments(proposal, state, request)
                answer.nonce = state.nonce
        except BeaconError as error:
            logger.warning(
                "peer=%s session=%s refused a start from %s: %s", self.me, sid, caller, error
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"session {sid}: {error}")
        except SessionError as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        runnable = info.status in (SessionStatus.ACCEPTED, SessionStatus.RUNNING)
        if answer.beacon and runnable and sid not in self.runner.sessions:
            self.runner.launch(proposal, answer.beacon)
        answer.status.CopyFrom(self.runner.status_of(sid))
        return answer

    def _fix_commitments(
        self, proposal: SessionProposal, state: BeaconState, request: pb.StartRequest
    ) -> None:
        """Check every participant's signed commitment and fix the set (BeaconError if not)."""
        commitments: dict[str, Commitment] = {}
        for entry in request.commitments:
            if entry.peer_id in commitments:
                raise BeaconError(f"two commitments for {entry.peer_id}")
            commitments[entry.peer_id] = Commitment(
                entry.peer_id, entry.commitment, entry.signature
            )
        check_commitments(proposal.digest, proposal.participants, commitments, self.verifiers)
        if commitments[self.me].commitment != commit(proposal.digest, self.me, state.nonce):
            raise BeaconError(f"the commitment given for {self.me} is not the one it made")
        self.ledger.store_commitments(
            proposal.session_id, {p: (c.commitment, c.signature) for p, c in commitments.items()}
        )

    def _fix_beacon(
        self, proposal: SessionProposal, state: BeaconState, request: pb.StartRequest
    ) -> bytes:
        """Check every revealed nonce and fix the beacon (BeaconError if not)."""
        if state.commitments is None:
            raise BeaconError("nonces before the commitments were fixed")
        reveals: dict[str, bytes] = {}
        for entry in request.reveals:
            if entry.peer_id in reveals:
                raise BeaconError(f"two nonces for {entry.peer_id}")
            reveals[entry.peer_id] = entry.nonce
        committed = {p: c for p, (c, _) in state.commitments.items()}
        check_reveals(proposal.digest, committed, reveals)
        beacon = beacon_of(proposal.digest, reveals)
        self.ledger.store_beacon(proposal.session_id, reveals, beacon)
        logger.info(
            "peer=%s session=%s beacon fixed: %s", self.me, proposal.session_id, beacon.hex()[:16]
        )
        return beacon

    async def _authorize_read(
        self, request: pb.SessionRef, context: CallContext, what: str
    ) -> None:
        """Deny by default: a session's state, records and results are answered to its
        participants and to the operator who proposed it, at a bounded rate per caller."""
        caller = caller_identity().peer_id
        if not self._reads.allow(caller):
            # One log line per caller per 10 s: a flood must not become a log flood.
            now = time.monotonic()
            if now - self._read_refusals_logged.get(caller, -10.0) >= 10.0:
                self._read_refusals_logged[caller] = now
                logger.warning(
                    "peer=%s refusing %s calls from %s: over %g per second",
                    self.me,
                    what,
                    caller,
                    self._reads.rate,
                )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{caller} calls Status/Records more than {self._reads.rate:g} times per second "
                f"(burst {self._reads.burst}); slow down",
            )
        info = self.ledger.session(request.session_id)
        if info is None or not info.known_to(caller):
            if info is not None:
                logger.warning(
                    "peer=%s refused %s of session %s to %s: not a participant nor its proposer",
                    self.me,
                    what,
                    remote(request.session_id),
                    caller,
                )
            # The same answer as for an unknown session: an outsider must not learn that a
            # session exists, who proposed it or who takes part (SessionInfo.known_to).
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r} here"
            )

    async def _status(self, request: pb.SessionRef, context: CallContext) -> pb.SessionStatus:
        await self._authorize_read(request, context, "status")
        return self.runner.status_of(request.session_id)

    async def _records(self, request: pb.SessionRef, context: CallContext) -> pb.SessionStatus:
        await self._authorize_read(request, context, "records")
        status = self.runner.status_of(request.session_id)
        for stored in self.ledger.agreed_records(request.session_id):
            status.records.append(record_to_proto(stored.record, stored.signatures))
        if status.records:
            # The latest result travels along (when it fits one message), so a peer that
            # catches up can continue from the agreed model.
            checkpoint = self.ledger.get_checkpoint(request.session_id, status.records[-1].round)
            if checkpoint is not None and len(checkpoint.weights) <= CATCH_UP_CHECKPOINT_BYTES:
                status.records[-1].checkpoint = checkpoint.weights
        return status

    async def _round_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Fragment]:
        # An async generator itself: grpc serves a stream handler that is not one as a
        # coroutine writing through ``context``. ``requests`` is not used: the call reads
        # with ``context.read()`` (peer/round_call.py says why).
        async for fragment in round_stream_call(
            context,
            me=self.me,
            open_streams=self.open_streams,
            find_round=self.runner.find_round,
            max_bytes=self.runner.max_bytes(),
            hello_seconds=self.limits.hello_seconds or self.config.stage_seconds,
        ):
            yield fragment

    # ------------------------------------------------------------------ outbound-only peers

    async def relayed(
        self, method: str, request: bytes, caller: PeerIdentity
    ) -> tuple[grpc.StatusCode, str, bytes]:
        """Handle a call relayed to this (outbound-only) peer with the handler a direct call
        runs, for ``caller`` (authenticated by its signature on the call, peer/relay.py);
        returns (code, details, serialised response)."""
        handlers: dict[str, Callable[[Any, CallContext], Awaitable[Message]]] = {
            "Propose": self._propose,
            "Start": self._start,
            "Status": self._status,
            "Records": self._records,
        }
        try:
            parsed = RELAYED_METHODS[method].FromString(request)
        except DecodeError as error:
            return grpc.StatusCode.INVALID_ARGUMENT, f"not a valid {method} request: {error}", b""
        with acting_as(caller):
            try:
                response = await handlers[method](parsed, _RelayedContext())
            except _Aborted as aborted:
                return aborted.code, aborted.details, b""
        return grpc.StatusCode.OK, "", response.SerializeToString()

    async def _relay(
        self, request: pb.RelayedCall, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RelayedAnswer:
        """Carry a signed call to an outbound-only peer connected here (peer/relay.py)."""
        caller = caller_identity().peer_id
        try:
            return await self.hub.forward(caller, request, context.time_remaining() or 60.0)
        except RelayRefused as refused:
            logger.info("peer=%s did not relay for %s: %s", self.me, caller, refused)
            await context.abort(refused.code, str(refused))

    async def _control(
        self, requests: AsyncIterator[pb.RelayedAnswer], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.RelayedCall]:
        """An outbound-only peer's long-lived stream: the calls for it go down, its signed
        answers come back (peer/relay.py)."""
        identity = caller_identity()
        try:
            self.hub.admit(identity)
        except RelayRefused as refused:
            logger.warning("peer=%s refused a control stream: %s", self.me, refused)
            await context.abort(refused.code, str(refused))
        async for call in self.hub.control(identity.peer_id, requests):
            yield call
