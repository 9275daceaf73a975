"""A hospital's peer: the gRPC service, session decisions, and the loop that runs rounds.

Every peer runs the same program; none is special. For each round the aggregator follows
from the proposal (:func:`peer.session.aggregator_for`); that peer runs an
:class:`~peer.round.AggregatorRound` beside its own participation, and everyone else dials it.
A round whose aggregator cannot be reached is retried with the next one in the rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from secagg import RandomSource, SystemRandom

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
from .codec import CodecError, fragments, record_from_proto, record_to_proto
from .config import PeerConfig
from .identity import PeerIdentity, Role, load_signer
from .ledger import (
    BeaconState,
    Ledger,
    LedgerError,
    RecordRejected,
    RoundStatus,
    SessionError,
    SessionStatus,
)
from .logs import remote
from .payload import Payload, VectorPayload
from .ratelimit import Backoff, RateLimiter
from .reload import TrustedKeys, TrustReloader
from .round import (
    NO_FAULTS,
    AggregatorRound,
    Elsewhere,
    FaultHooks,
    RoundContext,
    RoundOutcome,
    RoundStatusKind,
    backend_for,
    max_message_bytes,
    participate,
    serve_round_stream,
    valid_signatures,
)
from .session import ProposalError, SessionProposal, SignedProposal, aggregator_for, check_policy
from .session_state import SessionState
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
# A round not agreed after this many attempts per participant ends the session here
# (aborted, with the reason): rounds are retried, never skipped, so it cannot go on.
ATTEMPTS_PER_PARTICIPANT = 3


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
    state: SessionState = SessionState.ACCEPTED
    round: int = 0
    stage: str = ""
    aggregator: str = ""
    detail: str = ""


@dataclass
class _Session:
    proposal: SessionProposal
    beacon: bytes  # fixed by commit-reveal before the session runs (peer/beacon.py)
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


async def _until(stop: asyncio.Event, source: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The items of ``source`` until ``stop`` is set; then ``source`` is closed (its
    ``finally`` blocks run: a round sees the stream's peer leave) and iteration ends."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            item = asyncio.ensure_future(anext(source))
            await asyncio.wait({item, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not item.done():
                item.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await item
                return
            try:
                yield item.result()
            except StopAsyncIteration:
                return
    finally:
        stopped.cancel()
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


class PeerNode:
    """One institution's peer process (see the module docstring)."""

    def __init__(
        self,
        config: PeerConfig,
        *,
        payload_factory: PayloadFactory = default_payload,
        rng: RandomSource | None = None,
        nonce_rng: RandomSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        faults: FaultHooks = NO_FAULTS,
    ) -> None:
        self.config = config
        self.faults = faults  # test-only fault injection (peer/faults.py); no-op by default
        self.me = config.peer_id
        self.authenticator = Authenticator.from_files(config.ca, config.roster, config.crl)
        self.files = TLSFiles.of(config.cert, config.key, config.ca)
        self.signer = load_signer(config.key)
        self.roster = self.authenticator.roster
        # Live: members whose certificate the CRL revokes have no key here (peer/reload.py).
        self.verifiers = TrustedKeys(self.roster, self.authenticator.crl)
        self.limits = config.limits
        self._reads = RateLimiter(self.limits.reads_per_second, self.limits.reads_burst)
        self._read_refusals_logged: dict[str, float] = {}
        self.reloader = TrustReloader(
            self.authenticator,
            config.roster,
            config.crl,
            on_change=self._trust_changed,
            interval=self.limits.trust_poll_seconds,
        )
        # Open RoundStreams and who holds them, to close them when a CRL revokes the caller.
        self._open_streams: dict[asyncio.Event, PeerIdentity] = {}
        self.ledger = Ledger(config.ledger_url)
        self.ledger.create()
        self.payload_factory = payload_factory
        self.rng = rng or SystemRandom()
        # Beacon nonces (peer/beacon.py): the system CSPRNG unless a test fixes them. Not
        # ``rng``, whose outputs are secrets that never leave this peer: a nonce is kept in
        # the ledger (so a restart commits to the same one) and is published at the reveal.
        self._nonce_rng = nonce_rng or SystemRandom()
        self._proposal_limiter = RateLimiter(
            config.policy.proposals_per_minute / 60.0, config.policy.proposal_burst, clock
        )
        self._rate_limited: set[str] = set()  # callers whose last proposal was rate limited
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
                    self._round_stream,  # parses its own fragments (_parsed_fragments)
                    response_serializer=pb.Fragment.SerializeToString,
                ),
            },
        )
        async with create_server(
            self.config.listen, self.files, self.authenticator, handlers=[handler]
        ) as (_, port):
            self.port = port
            reloader = asyncio.create_task(self.reloader.run(self._stopping))
            self._background.add(reloader)
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                # Only possible in the main thread of a Unix process (peer start); a peer
                # run inside a test polls the files only.
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reloader.trigger)
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

    def _trust_changed(self) -> None:
        """A new roster or CRL is in force: use its keys, close streams it no longer allows."""
        old, self.roster = self.roster, self.authenticator.roster
        self.verifiers.refresh(self.roster, self.authenticator.crl)
        for peer_id in list(self._channels):
            before, after = old.get(peer_id), self.roster.get(peer_id)
            if after is None or before is None or before.address != after.address:
                # Dial the new address (or nobody) from now on.
                closed = asyncio.ensure_future(self._channels.pop(peer_id).close(None))
                self._background.add(closed)
                closed.add_done_callback(self._background.discard)
        revoked = self.authenticator.crl.serial_numbers
        for closing, caller in list(self._open_streams.items()):
            entry = self.roster.get(caller.peer_id)
            if (
                caller.serial_number in revoked
                or entry is None
                or entry.cert_fingerprint_sha256 != caller.fingerprint
            ):
                logger.warning(
                    "peer=%s closing the round stream of %s: its certificate is no longer "
                    "accepted (revoked or removed from the roster)",
                    self.me,
                    caller.peer_id,
                )
                closing.set()

    def _resume_sessions(self) -> None:
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
            self._launch(proposal, beacon)

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
            return self._accept(proposal)
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
            except (ProposalError, ValueError, OSError) as error:
                reason = f"cannot take part: {error}"
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
        return self._accept(proposal)

    def _accept(self, proposal: SessionProposal) -> pb.ProposalAnswer:
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

    async def _start(
        self, request: pb.StartRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StartAnswer:
        """Fix the session beacon with its proposer, then run the session (peer/beacon.py).

        With the participants' signed commitments: check and store them, answer this peer's
        nonce. With every nonce: check each against its commitment, store the beacon, run.
        Every answer carries this peer's own signed commitment; only the proposer may call.
        """
        caller = caller_identity().peer_id
        sid = request.session_id
        info = self.ledger.session(sid)
        if info is None:
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
        own = self._accept(proposal)  # this peer's signed commitment, answered every time
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
        if answer.beacon and runnable and sid not in self._sessions:
            self._launch(proposal, answer.beacon)
        answer.status.CopyFrom(self._status_of(sid))
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
        self, request: pb.SessionRef, context: grpc.aio.ServicerContext[Any, Any], what: str
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
        if info is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r} here"
            )
        assert info is not None
        if caller not in info.participants and caller != info.proposer:
            logger.warning(
                "peer=%s refused %s of session %s to %s: not a participant nor its proposer",
                self.me,
                what,
                remote(request.session_id),
                caller,
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller} is neither a participant nor the proposer of session "
                f"{request.session_id!r}: its {what} are not answered to {caller}",
            )

    async def _status(
        self, request: pb.SessionRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SessionStatus:
        await self._authorize_read(request, context, "status")
        return self._status_of(request.session_id)

    async def _records(
        self, request: pb.SessionRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SessionStatus:
        await self._authorize_read(request, context, "records")
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
            if progress.state in (SessionState.FAILED, SessionState.SETTLING)
            else (SessionState.of(info.status) if info else SessionState.UNKNOWN),
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
        identity = caller_identity()
        caller = identity.peer_id
        closing = asyncio.Event()  # set when a new CRL or roster no longer accepts the caller
        self._open_streams[closing] = identity
        hello_seconds = self.limits.hello_seconds or self.config.stage_seconds
        try:
            async for fragment in _until(
                closing,
                serve_round_stream(
                    _parsed_fragments(requests),
                    caller,
                    self._find_round,
                    self._max_bytes(),
                    hello_seconds=hello_seconds,
                ),
            ):
                yield fragment
            if closing.is_set():
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the certificate of {caller} is no longer accepted (revoked or removed "
                    "from the roster); stream closed",
                )
        except TimeoutError:
            logger.warning(
                "peer=%s closed a round stream from %s: no hello within %gs",
                self.me,
                caller,
                hello_seconds,
            )
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{caller} sent no RoundHello within {hello_seconds:g}s; stream closed",
            )
        except Elsewhere as elsewhere:
            # Not an error of the caller: the round is elsewhere in time. Answered in-band
            # (an Abort message) rather than by aborting the call, which grpc can surface to
            # the client as INTERNAL when the client is still writing.
            logger.info("peer=%s round stream from %s: %s", self.me, caller, elsewhere.reason)
            for fragment in fragments(elsewhere.abort()):
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
        finally:
            self._open_streams.pop(closing, None)

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
        info = self.ledger.session(hello.session_id)
        if info is not None and hello.peer_id not in info.participants:
            # Before any answer about where the session is: that is for participants only.
            raise PermissionError(
                f"{hello.peer_id} is not a participant of session {hello.session_id!r}"
            )
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
        async with self._rounds_changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._rounds_changed.wait_for(lambda: key in self._rounds),
                    timeout=session.proposal.prepare_seconds + session.proposal.stage_seconds,
                )
        round_ = self._rounds.get(key)
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

    def _launch(self, proposal: SessionProposal, beacon: bytes) -> None:
        session = self._sessions.get(proposal.session_id)
        if session is not None and session.task is not None and not session.task.done():
            return
        session = self._sessions[proposal.session_id] = _Session(proposal, beacon)
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
            # After a restart the others may have agreed rounds without this peer: fetch them
            # (verified: their signatures against the roster, >= threshold, each the next
            # round of this chain). What the others *say* moves this peer nowhere.
            views = await self._ask_others(proposal, timeout=5.0)
            await self._catch_up_with_the_most_advanced(proposal, views)
            round_ = self.ledger.last_agreed_round(sid) + 1
            attempt = self._attempt_hint(proposal, session.beacon, round_, -1, views)
            backoff = Backoff(base=0.5, cap=max(1.0, min(proposal.stage_seconds, 10.0)))
            limit = max(6, ATTEMPTS_PER_PARTICIPANT * len(proposal.participants))
            while round_ <= proposal.rounds:
                progress.state, progress.round = SessionState.RUNNING, round_
                aggregator = aggregator_for(proposal, round_, attempt, session.beacon)
                progress.aggregator, progress.stage = aggregator, "starting"
                outcome = await self._one_round(session, payload, round_, attempt, aggregator)
                progress.detail = outcome.reason
                if outcome.status is RoundStatusKind.AGREED:
                    round_, attempt = round_ + 1, 0
                    backoff.reset()
                    continue
                if outcome.status is RoundStatusKind.REFUSED and outcome.reason.startswith(
                    CANNOT_RECORD
                ):
                    # Stay on this round until the ledger can be written again.
                    await asyncio.sleep(min(proposal.stage_seconds, 5.0))
                    continue
                # Not agreed here. Whether the others agreed it without this peer, only their
                # agreed records can tell: a ROUND_AGREED/ROUND_PASSED answer is a claim,
                # acted on only once the claimer's records are fetched and verified.
                claimed = outcome.precondition in (
                    pb.PRECONDITION_ROUND_AGREED,
                    pb.PRECONDITION_ROUND_PASSED,
                )
                if claimed:
                    await self._catch_up(sid, aggregator)
                views = []
                if self.ledger.last_agreed_round(sid) < round_:
                    # The aggregator may have died after some peers stored the agreed record:
                    # ask everyone before retrying, so that no second, different record of
                    # the same round is ever signed while the first one exists.
                    views = await self._agreed_elsewhere(proposal, round_)
                if self.ledger.last_agreed_round(sid) >= round_:
                    round_, attempt = self.ledger.last_agreed_round(sid) + 1, 0
                    backoff.reset()
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
                # round is tried again under its number, with the next aggregator.
                attempt = self._attempt_hint(proposal, session.beacon, round_, attempt, views)
                if attempt >= limit:
                    reason = f"round {round_} was not agreed in {attempt} attempts"
                    logger.error("peer=%s session=%s gives up: %s", self.me, sid, reason)
                    self.ledger.set_session_status(sid, SessionStatus.ABORTED, reason=reason)
                    progress.state, progress.stage, progress.detail = (
                        SessionState.ABORTED,
                        "",
                        reason,
                    )
                    return
                await asyncio.sleep(backoff.next_delay())
            await self._settle(proposal, progress)
            if proposal.payload_kind == "statistics":
                from .statistics import record_statistics_result

                for stored in self.ledger.agreed_records(sid):
                    record_statistics_result(
                        self.ledger, sid, stored.record.round, proposal, stored.record.metrics
                    )
            progress.state, progress.stage = SessionState.FINISHED, ""
            self.ledger.set_session_status(sid, SessionStatus.FINISHED)
            logger.info("peer=%s session=%s finished", self.me, sid)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            progress.state, progress.detail = SessionState.FAILED, str(error)
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
            remote(outcome.reason),  # may carry another peer's Abort reason
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
            if outcome.precondition == pb.PRECONDITION_BEHIND:
                before = self.ledger.session_head(ctx.session_id)
                await self._catch_up(ctx.session_id, ctx.aggregator)
                if self.ledger.session_head(ctx.session_id) != before:
                    continue  # in sync now: join again with a fresh contribution
            retry = outcome.status is RoundStatusKind.AGGREGATOR_FAILED and (
                outcome.precondition == pb.PRECONDITION_NOT_READY or outcome.unreachable
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

    async def _agreed_elsewhere(
        self, proposal: SessionProposal, round_: int
    ) -> list[tuple[str, pb.SessionStatus]]:
        """Fetch (verified) any agreed record of ``round_`` another participant holds; the
        others' views of the session, for :meth:`_attempt_hint`."""
        views = await self._ask_others(proposal)
        await self._catch_up_with_the_most_advanced(proposal, views)
        if self.ledger.last_agreed_round(proposal.session_id) >= round_:
            logger.info(
                "peer=%s session=%s round %d was agreed without this peer; fetched its record",
                self.me,
                proposal.session_id,
                round_,
            )
        return views

    def _attempt_hint(
        self,
        proposal: SessionProposal,
        beacon: bytes,
        round_: int,
        failed: int,
        views: list[tuple[str, pb.SessionStatus]],
    ) -> int:
        """The attempt to try after ``failed`` (-1: none yet): the next one, or the one most
        of the others run now if that is further on.

        A peer that was down, or lost an attempt, would otherwise dial aggregators one
        attempt behind everyone. The others' answers are not evidence, so they only choose
        the attempt (whose aggregator is then dialled, and must run it): they never move the
        round. A hint counts only when more than half of the answering participants give
        the same aggregator for this round, so one liar cannot steer it.
        """
        nxt = failed + 1
        counts: dict[str, int] = {}
        for _, status in views:
            if status.state == SessionState.RUNNING and status.current_round == round_:
                counts[status.current_aggregator] = counts.get(status.current_aggregator, 0) + 1
        if not counts:
            return nxt
        aggregator, votes = max(counts.items(), key=lambda item: item[1])
        if 2 * votes <= len(views) or (
            failed >= 0 and aggregator == aggregator_for(proposal, round_, failed, beacon)
        ):
            return nxt  # no majority, or the others have not moved past the failed attempt
        n = len(proposal.participants)
        for candidate in range(nxt, nxt + n):
            if aggregator_for(proposal, round_, candidate, beacon) == aggregator:
                return candidate
        return nxt

    async def _settle(self, proposal: SessionProposal, progress: _Progress) -> None:
        """At the end of a session, wait (bounded) for the others to end too and fetch any
        round they agreed without this peer, so every ledger ends with the same records."""
        progress.state = SessionState.SETTLING
        loop = asyncio.get_running_loop()
        deadline = loop.time() + proposal.prepare_seconds + 2 * proposal.stage_seconds
        while True:
            views = await self._ask_others(proposal)
            await self._catch_up_with_the_most_advanced(proposal, views)
            busy = [p for p, s in views if s.state == SessionState.RUNNING]
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
