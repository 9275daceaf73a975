"""One round of secure aggregation over gRPC streams: the aggregator's and a participant's side.

Theory of operation
-------------------
Every participant (the aggregator's own node included, through its own server) opens a
``RoundStream`` to the round's aggregator and sends a ``RoundHello``. Messages are secagg
objects, encoded by :mod:`peer.codec` and cut into fragments. The secagg state machines do all
protocol work; this module only moves messages, keeps deadlines and runs heavy steps (mask
expansion, unmasking, verification) in a worker thread so streams keep flowing.

After the unmasking stage the aggregator sends every connected participant the transcript and
a ``RecordDraft`` (the chain head and each peer's claimed epsilon). Each participant verifies
the transcript itself, computes the round's result with its payload, and signs the record
(``peer.ledger.record_payload``). The aggregator groups the signed records by hash; if at least
t peers signed the same record it sends it back with all its signatures and every peer stores
it. A peer that computed something else refuses to sign and says why.

A dropout is a missed deadline or a closed stream. An aggregator that vanishes is noticed by
the participants as a failed stream, and the round is retried with the next aggregator.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

from secagg import (
    AggregatorState,
    RandomSource,
    RemoteProtocolError,
    RoundAborted,
    RoundConfig,
    SecAggError,
    Signer,
    Verifier,
)
from secagg.crypto import sha256

from .backends import RoundBackend
from .codec import CodecError, Reassembler, fragments
from .faults import fault_point, tamper_outgoing, tamper_reply, tamper_transcript_aggregate
from .ledger import (
    AgreedRecord,
    Ledger,
    LedgerError,
    PrivacyCharge,
    StoredRecord,
)
from .logs import remote
from .payload import LocalContribution, Payload
from .wire import peer_pb2 as pb

__all__ = [
    "PRECONDITION",
    "ROUND_STREAM_METHOD",
    "AggregatorRound",
    "RoundContext",
    "RoundOutcome",
    "RoundStatusKind",
    "max_message_bytes",
    "participate",
]

ROUND_STREAM_METHOD = "/hospital_secagg.v1.Peer/RoundStream"
# The offender of an Abort that only says the aggregator is at another point in the session
# ("not-ready: ...", "round-passed: N", "round-agreed: ...", "behind: N").
PRECONDITION = "precondition"
logger = logging.getLogger("peer.rounds")


class RoundStatusKind(StrEnum):
    AGREED = "agreed"
    ABORTED = "aborted"  # the round cannot complete (too few peers, no agreement)
    AGGREGATOR_FAILED = "aggregator-failed"  # retry with the next aggregator
    REFUSED = "refused"  # this peer refused (protocol violation, bad transcript)


@dataclass
class RoundOutcome:
    status: RoundStatusKind
    aggregator: str
    reason: str = ""
    record: StoredRecord | None = None
    survivors: tuple[str, ...] = ()
    dropped: dict[str, list[str]] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    # Why the aggregator refused the stream: "not-ready: ...", "round-agreed: ..." or
    # "round-passed: <its current round>".
    precondition: str = ""


@dataclass
class RoundContext:
    """Everything one node needs to take part in one round."""

    me: str
    session_id: str
    round: int
    attempt: int
    aggregator: str
    config: RoundConfig
    signer: Signer
    verifiers: Mapping[str, Verifier]
    ledger: Ledger
    payload: Payload
    backend: RoundBackend
    rng: RandomSource
    stage_seconds: float
    prepare_seconds: float
    paillier_key_bits: int = 2048
    on_stage: Callable[[str, str], None] = lambda stage, detail: None

    @property
    def log_prefix(self) -> str:
        return f"peer={self.me} session={self.session_id} round={self.round} attempt={self.attempt}"

    def max_message_bytes(self) -> int:
        return max_message_bytes(
            self.config.vector_length, self.config.bits, len(self.config.peers)
        )


def max_message_bytes(vector_length: int, bits: int, peers: int) -> int:
    """Largest message a round may carry: the transcript holds every masked input."""
    words = vector_length * (bits // 8)
    return (peers + 2) * (words + 64 * 1024) + peers * peers * 256 + (1 << 20)


def _aggregate_hash(aggregate: np.ndarray[Any, Any]) -> bytes:
    little = aggregate.astype(aggregate.dtype.newbyteorder("<"), copy=False)
    return sha256(b"hospital-secagg/aggregate/v1", little.tobytes())


# ====================================================================== aggregator side


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A message already cut into fragments, to send the same bytes on many streams."""

    fragments: tuple[pb.Fragment, ...]

    @classmethod
    def of(cls, message: object) -> Encoded:
        return cls(tuple(fragments(message)))


class AggregatorRound:
    """The aggregator's side of one round: owns the secagg Aggregator and the streams."""

    def __init__(self, ctx: RoundContext) -> None:
        self.ctx = ctx
        self.protocol = ctx.backend.aggregator(ctx)
        # While a stage closes in a worker thread, the event loop must not feed the same
        # object: late messages are dropped then (they would be refused as late anyway).
        self._closing = False
        self._outboxes: dict[str, asyncio.Queue[object | None]] = {}
        self._hellos: dict[str, pb.RoundHello] = {}
        self._gone: set[str] = set()
        self._wake = asyncio.Event()
        self._votes: dict[str, pb.AgreedRecord] = {}
        self._refusals: dict[str, str] = {}
        self._collecting_votes = False
        self.finished = asyncio.Event()
        self.result: str = ""
        self.agreed: pb.AgreedRecord | None = None
        self.log = logging.LoggerAdapter(logger, {"peer": ctx.me})

    def _info(self, message: str, *args: object) -> None:
        self.log.info(f"{self.ctx.log_prefix} role=aggregator " + message, *args)

    def _warn(self, message: str, *args: object) -> None:
        self.log.warning(f"{self.ctx.log_prefix} role=aggregator " + message, *args)

    # -------------------------------------------------------------- stream side

    def join(self, hello: pb.RoundHello) -> asyncio.Queue[object | None]:
        """Register a participant's stream. Only possible while keys are being advertised."""
        peer = hello.peer_id
        if not self.ctx.config.is_member(peer):
            raise PermissionError(f"{peer} is not a participant of this round")
        first = self.ctx.backend.first_stage
        if self.protocol.stage is not first or self.finished.is_set():
            raise PermissionError(f"round already past stage {first.value}; {peer} joined too late")
        if peer in self._outboxes:
            raise PermissionError(f"{peer} already has a stream open for this round")
        queue: asyncio.Queue[object | None] = asyncio.Queue()
        self._outboxes[peer] = queue
        self._hellos[peer] = hello
        self._info("participant=%s joined", peer)
        return queue

    def deliver(self, peer: str, message: object) -> None:
        """A whole message arrived from ``peer``'s stream."""
        try:
            if isinstance(message, pb.AgreedRecord):
                if self._collecting_votes and peer not in self._votes:
                    self._votes[peer] = message
            elif isinstance(message, pb.Abort):
                self._refusals[peer] = message.reason
                self._warn("participant=%s refused: %s", peer, remote(message.reason))
                self._gone.add(peer)
            elif self._closing:
                self._warn(
                    "participant=%s sent %s while the stage closed", peer, type(message).__name__
                )
            elif getattr(message, "sender", None) != peer:
                raise RemoteProtocolError(
                    peer, f"sent a message signed as {getattr(message, 'sender', '?')!r}"
                )
            else:
                self.protocol.receive(message)
        except RemoteProtocolError as error:
            self._warn(
                "stage=%s rejected message from %s: %s",
                self.protocol.stage.value,
                error.offender,
                error.reason,
            )
            self._close_stream(peer, pb.Abort(reason=error.reason, offender=error.offender))
        except SecAggError as error:
            self._warn(
                "stage=%s message from %s after the round ended: %s",
                self.protocol.stage.value,
                peer,
                error,
            )
        self._wake.set()

    def reject(self, peer: str, reason: str) -> None:
        """``peer``'s stream carried bytes that are not a valid message."""
        self._warn("participant=%s sent an invalid message: %s", peer, reason)
        self._close_stream(peer, pb.Abort(reason=reason, offender=peer))

    def leave(self, peer: str) -> None:
        self._gone.add(peer)
        self._wake.set()

    def _close_stream(self, peer: str, final: object | None = None) -> None:
        queue = self._outboxes.get(peer)
        if queue is not None and peer not in self._gone:
            if final is not None:
                queue.put_nowait(final)
            queue.put_nowait(None)
        self._gone.add(peer)

    def _send(self, peer: str, message: object) -> None:
        queue = self._outboxes.get(peer)
        if queue is not None and peer not in self._gone:
            queue.put_nowait(tamper_outgoing(self.ctx.round, peer, message))  # test-only hook

    def _broadcast(self, message: object) -> None:
        for peer in list(self._outboxes):
            self._send(peer, message)

    # -------------------------------------------------------------- driving

    async def _wait(self, done: Callable[[], bool], seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    def _stage_complete(self, joining: bool) -> bool:
        """Everyone the stage waits for has answered (or gone). While participants can still
        join, that includes every roster peer, even when the stage itself needs fewer
        (Paillier's key stage needs only the key holder)."""
        if self.protocol.pending() - self._gone:
            return False
        return not joining or set(self.ctx.config.peers) <= set(self._outboxes) | self._gone

    async def run(self) -> None:
        """Run the stages, then the agreement. Never raises: outcomes go to the streams."""
        try:
            await self._run()
        except Exception as error:  # a bug must not leave streams hanging
            self.log.exception("%s role=aggregator failed", self.ctx.log_prefix)
            self.result = f"aggregator error: {error}"
            self._finish(pb.Abort(reason=self.result, offender=self.ctx.me))

    def _finish(self, final: object | None) -> None:
        for peer in list(self._outboxes):
            self._close_stream(peer, final)
        self.finished.set()

    async def _run(self) -> None:
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        while self.protocol.state is AggregatorState.RUNNING:
            stage = self.protocol.stage
            seconds = ctx.stage_seconds
            joining = stage is ctx.backend.first_stage
            if joining:
                seconds += ctx.prepare_seconds  # everyone computes its contribution first
            await self._wait(functools.partial(self._stage_complete, joining), seconds)
            fault_point(ctx.round, f"aggregator:{stage.value}")
            self._closing = True
            try:
                # Closing can be heavy (unmasking, multiplying ciphertexts): off the loop.
                outgoing = await loop.run_in_executor(None, self.protocol.close_stage)
            except (RoundAborted, RemoteProtocolError) as error:
                self.result = f"aborted at stage {stage.value}: {error}"
                self._warn("stage=%s round aborted: %s", stage.value, error)
                self._finish(pb.Abort(reason=self.result, offender=getattr(error, "offender", "")))
                return
            finally:
                self._closing = False
            dropped = self.protocol.dropped.get(stage, ())
            self._info("stage=%s closed dropped=%s", stage.value, ",".join(dropped) or "-")
            for liar in sorted(getattr(self.protocol, "misbehaving", ())):
                self._warn("participant=%s revealed wrong shares; rebuilt without them", liar)
            for peer, message in outgoing.items():
                self._send(peer, message)

        recipients = [p for p in self._outboxes if p not in self._gone]
        transcripts = await loop.run_in_executor(
            None, ctx.backend.transcripts, self.protocol, recipients
        )
        if tamper_transcript_aggregate(ctx.round):
            transcripts = {p: _tampered(t) for p, t in transcripts.items()}
        result = self.protocol.result
        assert result is not None
        epsilon = {p: self._hellos[p].epsilon for p in result.survivors if p in self._hellos}
        draft = pb.RecordDraft(
            prev_hash=ctx.ledger.session_head(ctx.session_id),
            epsilon_json=json.dumps(epsilon, sort_keys=True),
        )
        self._collecting_votes = True
        # The transcript (every masked input) is the largest message of the round: encode
        # each distinct one once, off the event loop, instead of once per stream.
        encoded: dict[int, Encoded] = {}
        for peer, transcript in transcripts.items():
            if id(transcript) not in encoded:
                encoded[id(transcript)] = await loop.run_in_executor(None, Encoded.of, transcript)
            self._send(peer, encoded[id(transcript)])
        self._broadcast(draft)
        voters = set(self._outboxes) - self._gone
        await self._wait(lambda: voters <= set(self._votes) | self._gone, ctx.stage_seconds * 2)
        self.agreed = self._tally()
        if self.agreed is None:
            self._finish(pb.Abort(reason=self.result, offender=""))
            return
        self._info("agreed signatures=%d", len(self.agreed.signatures))
        self._finish(self.agreed)

    def _tally(self) -> pb.AgreedRecord | None:
        by_hash: dict[bytes, list[pb.AgreedRecord]] = {}
        for peer, vote in self._votes.items():
            # A vote counts only if it is this stream's peer signing, validly, the very
            # record it sent: one bad signature must not spoil the record for everyone.
            try:
                record, signatures = record_from_proto(vote)
            except CodecError as error:
                self._warn("participant=%s sent a malformed record: %s", peer, error)
                continue
            valid, _ = valid_signatures(record, signatures, self.ctx.verifiers)
            if list(valid) != [peer] or len(vote.signatures) != 1:
                self._warn("participant=%s sent a record without its own valid signature", peer)
                continue
            if vote.signatures[0].record_hash != record.record_hash():
                self._warn("participant=%s misstated the hash of its record", peer)
                continue
            by_hash.setdefault(record.record_hash(), []).append(vote)
        if not by_hash:
            self.result = "no participant signed a record"
            return None
        best_hash, best = max(by_hash.items(), key=lambda item: len(item[1]))
        for record_hash, votes in by_hash.items():
            if record_hash != best_hash:
                dissent = ",".join(v.signatures[0].peer_id for v in votes)
                self._warn(
                    "peers %s signed a different record (%s)", dissent, record_hash.hex()[:16]
                )
        if len(best) < self.ctx.config.threshold:
            self.result = (
                f"only {len(best)} peers signed the same record, {self.ctx.config.threshold} needed"
            )
            return None
        agreed = pb.AgreedRecord()
        agreed.CopyFrom(best[0])
        del agreed.signatures[:]
        agreed.signatures.extend(
            v.signatures[0] for v in sorted(best, key=lambda v: v.signatures[0].peer_id)
        )
        self.result = "agreed"
        return agreed


def _tampered(transcript: object) -> object:
    """Test hook (peer/faults.py): the same transcript with a wrong aggregate."""
    aggregate = getattr(transcript, "aggregate", None)
    if not isinstance(aggregate, np.ndarray):
        return transcript
    wrong = aggregate.copy()
    wrong[0] += 1
    return dataclasses.replace(transcript, aggregate=wrong)  # type: ignore[type-var]


# ====================================================================== participant side


class _Stream:
    """A participant's end of a RoundStream: fragments out, whole messages in."""

    def __init__(self, call: Any, max_bytes: int) -> None:
        self._call = call
        self._reassembler = Reassembler(max_bytes)
        self.sent = 0
        self.received = 0

    async def send(self, message: object) -> None:
        for fragment in fragments(message):
            self.sent += len(fragment.data)
            await self._call.write(fragment)

    async def receive(self) -> object | None:
        """The next whole message, or None when the aggregator closed the stream."""
        while True:
            fragment = await self._call.read()
            if fragment is grpc.aio.EOF:  # type: ignore[attr-defined]
                return None
            self.received += len(fragment.data)
            message = self._reassembler.push(fragment)
            if message is not None:
                return message


async def participate(ctx: RoundContext, channel: grpc.aio.Channel) -> RoundOutcome:
    """Take part in one round as a participant, through ``channel`` to the aggregator."""
    outcome = RoundOutcome(RoundStatusKind.AGGREGATOR_FAILED, ctx.aggregator)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        contribution: LocalContribution = await loop.run_in_executor(
            None, ctx.payload.prepare, ctx.round
        )
    except Exception as error:  # the payload's own checks (budget, data): not a crash
        logger.warning("%s cannot prepare its contribution: %s", ctx.log_prefix, error)
        return RoundOutcome(RoundStatusKind.REFUSED, ctx.aggregator, f"cannot prepare: {error}")
    if contribution.clipped_fraction > 0:
        # Quantization ranges follow from public session parameters; clipping means a value
        # fell outside them. Never silent: it biases the result.
        logger.warning(
            "%s clipped %.3g%% of its coordinates to the quantization range",
            ctx.log_prefix,
            100 * contribution.clipped_fraction,
        )
    refusal = charge_before_release(ctx, contribution)
    if refusal is not None:
        return refusal
    prefix = f"{ctx.log_prefix} role=participant aggregator={ctx.aggregator}"
    timeout = ctx.prepare_seconds + ctx.stage_seconds * 10
    method = channel.stream_stream(
        ROUND_STREAM_METHOD,
        request_serializer=pb.Fragment.SerializeToString,
        response_deserializer=pb.Fragment.FromString,
    )
    call = method(timeout=timeout)  # type: ignore[call-arg]  # stubs predate grpc.aio
    stream = _Stream(call, ctx.max_message_bytes())
    participant = ctx.backend.participant(ctx, contribution.vector)
    sent: list[object] = []  # what this peer sent: its own input must be in the transcript
    my_record: tuple[AgreedRecord, bytes, bytes] | None = None  # record, model, record hash
    transcript: Any = None
    try:
        await stream.send(
            pb.RoundHello(
                session_id=ctx.session_id,
                round=ctx.round,
                attempt=ctx.attempt,
                peer_id=ctx.me,
                epsilon=contribution.epsilon,
                chain_head=ctx.ledger.session_head(ctx.session_id),
            )
        )
        fault_point(ctx.round, ctx.backend.first_stage.value)
        first = await loop.run_in_executor(None, participant.start)  # e.g. key generation
        if first is not None:  # some roles speak only when spoken to
            sent.append(first)
            await stream.send(first)
        ctx.on_stage(ctx.backend.first_stage.value, "sent")
        while True:
            message = await stream.receive()
            if message is None:
                outcome.reason = "the aggregator closed the stream before the round ended"
                return outcome
            if ctx.backend.is_transcript(message):
                transcript = message
            elif isinstance(message, pb.RecordDraft):
                if transcript is None:
                    raise RemoteProtocolError(ctx.aggregator, "record draft before the transcript")
                ctx.on_stage("verify", "checking the transcript")
                my_record = await loop.run_in_executor(
                    None, _build_record, ctx, transcript, message, sent, contribution
                )
                record = my_record[0]
                outcome.survivors = transcript.survivors
                fault_point(ctx.round, "sign")
                signature = ctx.signer.sign(record.payload())
                await stream.send(record_to_proto(record, {ctx.me: signature}, ctx.aggregator))
            elif isinstance(message, pb.AgreedRecord):
                if my_record is None:
                    raise RemoteProtocolError(ctx.aggregator, "agreed record before the transcript")
                stored = _store_agreed(ctx, message, my_record, contribution)
                outcome.status = RoundStatusKind.AGREED
                outcome.record = stored
                outcome.reason = f"agreed with {len(message.signatures)} signatures"
                logger.info(
                    "%s agreed signatures=%d in %.2fs",
                    prefix,
                    len(message.signatures),
                    time.monotonic() - started,
                )
                return outcome
            elif isinstance(message, pb.Abort) and message.offender == PRECONDITION:
                outcome.precondition = message.reason
                outcome.reason = f"aggregator {ctx.aggregator} is elsewhere: {message.reason}"
                return outcome
            elif isinstance(message, pb.Abort):
                outcome.status = RoundStatusKind.ABORTED
                outcome.reason = message.reason
                logger.warning(
                    "%s aggregator aborted the round: %s", prefix, remote(message.reason)
                )
                return outcome
            elif isinstance(message, Message):
                raise RemoteProtocolError(ctx.aggregator, f"unexpected {type(message).__name__}")
            else:  # the protocol's own messages
                if ctx.backend.is_heavy(message):
                    reply = await loop.run_in_executor(None, participant.receive, message)
                else:
                    reply = participant.receive(message)
                reply = tamper_reply(ctx.round, reply, ctx.signer, ctx.config.digest)  # tests
                sent.append(reply)
                stage = ctx.backend.stage_reached(participant)
                ctx.on_stage(stage, "")
                fault_point(ctx.round, stage)
                await stream.send(reply)
    except (SecAggError, CodecError, LedgerError) as error:
        outcome.status = RoundStatusKind.REFUSED
        outcome.reason = str(error)
        # Our own error text (one line: the log formatters escape control characters).
        logger.warning("%s refused: %s", prefix, error)
        with contextlib.suppress(grpc.RpcError, asyncio.CancelledError):
            await stream.send(pb.Abort(reason=str(error), offender=getattr(error, "offender", "")))
        return outcome
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
        details = (error.details() if isinstance(error, grpc.aio.AioRpcError) else None) or str(
            error
        )
        if code is grpc.StatusCode.FAILED_PRECONDITION:
            outcome.precondition = details
            outcome.reason = f"aggregator {ctx.aggregator} refused the stream: {details}"
        else:
            status = code.name if code else "error"
            outcome.reason = f"stream to aggregator {ctx.aggregator} failed: {status} {details}"
        logger.warning("%s %s", prefix, remote(outcome.reason))  # details are the server's text
        return outcome
    except Exception as error:  # a bug or an environment fault: this round only, never the peer
        logger.exception("%s failed", prefix)
        outcome.status = RoundStatusKind.REFUSED
        outcome.reason = f"internal error: {error}"
        return outcome
    finally:
        outcome.bytes_sent, outcome.bytes_received = stream.sent, stream.received
        call.cancel()


def charge_before_release(
    ctx: RoundContext, contribution: LocalContribution
) -> RoundOutcome | None:
    """Charge the contribution's privacy to the ledger before anything of it can leave.

    Every attempt that sends a noisy vector releases it (to that attempt's aggregator, who
    may unmask it and then abort), so the charge is per release, not per agreed record, and
    an aborted attempt stays charged. A retry that sends the very same vector releases
    nothing new and the ledger does not charge it twice (same ``release_id``).

    Returns:
        None when the round may go on; a REFUSED outcome when the charge cannot be written
        (then nothing was sent).
    """
    if not contribution.is_private:
        return None
    try:
        charged = ctx.ledger.charge_release(
            ctx.session_id,
            ctx.round,
            ctx.attempt,
            contribution.release_id,
            contribution.charge(ctx.me),
        )
    except LedgerError as error:
        logger.warning("%s cannot charge its privacy, sends nothing: %s", ctx.log_prefix, error)
        return RoundOutcome(
            RoundStatusKind.REFUSED, ctx.aggregator, f"cannot charge privacy: {error}"
        )
    logger.info(
        "%s %s epsilon %.4g before release",
        ctx.log_prefix,
        "charged" if charged else "already charged (same value as an earlier attempt):",
        contribution.epsilon,
    )
    return None


def _build_record(
    ctx: RoundContext,
    transcript: Any,
    draft: pb.RecordDraft,
    sent: list[object],
    contribution: LocalContribution,
) -> tuple[AgreedRecord, bytes, bytes]:
    """Verify the transcript and build the record this peer is willing to sign."""
    aggregate, survivors = ctx.backend.verify(transcript, ctx, sent)
    head = ctx.ledger.session_head(ctx.session_id)
    if draft.prev_hash != head:
        raise RemoteProtocolError(
            ctx.aggregator,
            f"record draft continues chain {draft.prev_hash.hex()[:16]}, "
            f"mine is at {head.hex()[:16]}",
        )
    try:
        epsilon = {str(k): float(v) for k, v in json.loads(draft.epsilon_json).items()}
    except (ValueError, AttributeError) as error:
        raise RemoteProtocolError(ctx.aggregator, f"malformed epsilon claims: {error}") from None
    if ctx.me in survivors and abs(epsilon.get(ctx.me, -1.0) - contribution.epsilon) > 1e-12:
        raise RemoteProtocolError(ctx.aggregator, "record draft misstates my privacy spending")
    result = ctx.payload.conclude(ctx.round, aggregate, survivors)
    metrics = dict(result.metrics)
    metrics["survivors"] = list(survivors)
    metrics["aggregator"] = ctx.aggregator
    record = AgreedRecord.build(
        ctx.session_id,
        ctx.round,
        aggregate_hash=_aggregate_hash(aggregate),
        model_hash=sha256(result.model),
        metrics=metrics,
        epsilon=epsilon,
        prev_hash=head,
    )
    return record, result.model, record.record_hash()


def _store_agreed(
    ctx: RoundContext,
    agreed: pb.AgreedRecord,
    mine: tuple[AgreedRecord, bytes, bytes],
    contribution: LocalContribution,
) -> StoredRecord:
    """Check the agreed record is the one this peer computed, with >= t valid signatures."""
    record, model, record_hash = mine
    claimed = {s.peer_id: s.signature for s in agreed.signatures if s.record_hash == record_hash}
    others = sorted(s.peer_id for s in agreed.signatures if s.record_hash != record_hash)
    if others:
        raise RemoteProtocolError(ctx.aggregator, f"{', '.join(others)} signed another record")
    signatures, invalid = valid_signatures(record, claimed, ctx.verifiers)
    if invalid:
        # Kept out of the ledger; enough valid ones still make the record.
        logger.warning(
            "%s aggregator=%s relayed invalid record signatures of %s",
            ctx.log_prefix,
            ctx.aggregator,
            ", ".join(invalid),
        )
    if len(signatures) < ctx.config.threshold:
        raise RemoteProtocolError(
            ctx.aggregator,
            f"agreed record has {len(signatures)} signatures, {ctx.config.threshold} needed",
        )
    # Only a peer whose input is in the released sum has spent privacy on this round.
    spent = record.epsilon.get(ctx.me, 0.0)
    privacy = (
        [PrivacyCharge(ctx.me, contribution.privacy_kind, spent, contribution.delta)]
        if spent > 0
        else []
    )
    return ctx.ledger.append_agreed(
        record,
        signatures,
        checkpoint=model,
        privacy=privacy,
        min_signatures=ctx.config.threshold,
        verifiers=ctx.verifiers,
    )


async def serve_round_stream(
    requests: AsyncIterator[pb.Fragment],
    caller: str,
    find_round: Callable[[pb.RoundHello], Any],
    max_bytes: int,
    hello_seconds: float | None = None,
) -> AsyncIterator[pb.Fragment]:
    """The aggregator's end of one participant's RoundStream (used by the gRPC servicer).

    ``find_round(hello)`` returns the :class:`AggregatorRound` (awaitable) or raises
    PermissionError / LookupError with the reason to refuse. A stream whose hello has not
    arrived within ``hello_seconds`` raises TimeoutError: an open stream that says nothing
    would otherwise hold the aggregator's resources for ever.
    """
    hello_reader = Reassembler(64 * 1024)
    first = await asyncio.wait_for(anext(requests, None), hello_seconds)
    if first is None:
        return
    hello = hello_reader.push(first)
    if not isinstance(hello, pb.RoundHello):
        raise PermissionError("the first message on a round stream must be a RoundHello")
    if hello.peer_id != caller:
        raise PermissionError(f"certificate of {caller} cannot speak for {hello.peer_id!r}")
    round_ = await find_round(hello)
    queue = round_.join(hello)
    reassembler = Reassembler(max_bytes)

    async def read() -> None:
        try:
            async for fragment in requests:
                message = reassembler.push(fragment)
                if message is not None:
                    round_.deliver(caller, message)
        except CodecError as error:
            round_.reject(caller, str(error))
        finally:
            round_.leave(caller)

    reader = asyncio.create_task(read())
    try:
        while True:
            message = await queue.get()
            if message is None:
                break
            for fragment in (
                message.fragments if isinstance(message, Encoded) else fragments(message)
            ):
                yield fragment
    finally:
        reader.cancel()
        round_.leave(caller)


def record_to_proto(
    record: AgreedRecord, signatures: Mapping[str, bytes], aggregator: str = ""
) -> pb.AgreedRecord:
    """The wire form of an agreed record (or of one peer's signed vote for it)."""
    record_hash = record.record_hash()
    return pb.AgreedRecord(
        aggregator=aggregator,
        session_id=record.session_id,
        round=record.round,
        aggregate_hash=record.aggregate_hash,
        model_hash=record.model_hash,
        metrics_hash=record.metrics_hash,
        prev_hash=record.prev_hash,
        metrics_json=json.dumps(dict(record.metrics), sort_keys=True),
        epsilon_json=json.dumps(dict(record.epsilon), sort_keys=True),
        signatures=[
            pb.RecordSignature(peer_id=p, record_hash=record_hash, signature=s)
            for p, s in sorted(signatures.items())
        ],
    )


def record_from_proto(proto: pb.AgreedRecord) -> tuple[AgreedRecord, dict[str, bytes]]:
    """The record and its signatures; CodecError if the record's JSON is malformed."""
    try:
        metrics = json.loads(proto.metrics_json or "{}")
        epsilon = json.loads(proto.epsilon_json or "{}")
    except ValueError as error:
        raise CodecError(f"malformed record JSON: {error}") from None
    if not isinstance(metrics, dict) or not isinstance(epsilon, dict):
        raise CodecError("record metrics and epsilon must be JSON objects")
    record = AgreedRecord(
        session_id=proto.session_id,
        round=proto.round,
        aggregate_hash=proto.aggregate_hash,
        model_hash=proto.model_hash,
        metrics_hash=proto.metrics_hash,
        prev_hash=proto.prev_hash,
        metrics=metrics,
        epsilon=epsilon,
    )
    return record, {s.peer_id: s.signature for s in proto.signatures}


def valid_signatures(
    record: AgreedRecord, signatures: Mapping[str, bytes], verifiers: Mapping[str, Verifier]
) -> tuple[dict[str, bytes], list[str]]:
    """The signatures over ``record`` that verify under their peer's roster key, and the
    peers whose signature did not."""
    payload = record.payload()
    valid: dict[str, bytes] = {}
    invalid: list[str] = []
    for peer, signature in signatures.items():
        verifier = verifiers.get(peer)
        if verifier is not None and verifier.verify(signature, payload):
            valid[peer] = signature
        else:
            invalid.append(peer)
    return valid, sorted(invalid)
