"""A participant's side of one round (theory of operation: peer/round/__init__.py).

:func:`participate` prepares this peer's contribution, charges its privacy before anything
of it can leave (:func:`charge_before_release`), then drives its role object over one
``RoundStream`` to the aggregator until the round is agreed, aborted or refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from secagg import RemoteProtocolError, SecAggError

from ..channels import RoundStreamCall
from ..codec import CodecError, Reassembler, fragments, record_to_proto
from ..ledger import LedgerError
from ..logs import remote
from ..payloads import LocalContribution
from ..published import disclose, internal_error
from ..wire import peer_pb2 as pb
from .aggregating import HELLO_MAX_BYTES, SEND_FRAGMENT_BYTES
from .agreement import (
    MyRecord,
    build_record,
    keep_vote_proof,
    mine_of,
    sign_vote_statement,
    store_agreed,
    store_round_proof,
    vote,
)
from .context import RoundContext, RoundOutcome, RoundStatusKind

__all__ = [
    "AggregatorSilent",
    "RoundStreamDialer",
    "charge_before_release",
    "participate",
    "silence_limits",
]

logger = logging.getLogger("peer.rounds")
T = TypeVar("T")


class RoundStreamDialer(Protocol):
    """What a participant needs of the aggregator: a way to open a round stream
    (peer/channels.py: the pool's PooledRoundStreams, or a PeerStub)."""

    def round_stream(self, timeout: float | None = None) -> RoundStreamCall: ...


class AggregatorSilent(Exception):
    """The aggregator sent nothing, or took nothing, for longer than the stage allows."""

    def __init__(self, seconds: float, stage: str) -> None:
        super().__init__(f"silent for {seconds:.1f}s in stage {stage}")
        self.seconds = seconds
        self.stage = stage


def silence_limits(stage_seconds: float, prepare_seconds: float) -> dict[str, float]:
    """How long a participant waits on the aggregator's stream, by what it waits for.

    A partitioned aggregator (its packets dropped, no RST) shows nothing on the stream: TCP
    alone would notice only when a retransmission or keepalive ping times out. Every read and
    write is therefore bounded by what the aggregator's own deadlines allow
    (peer/round/aggregating.py), plus one stage of grace for the aggregator's work between
    stages (closing a stage, encoding the transcript) and for scheduling:

    * ``join``: the aggregator may wait ``prepare + stage`` for its round to start
      (``SessionRunner.find_round``), then as long again for everyone's first message;
    * ``stage``: each later stage closes within ``stage`` of the aggregator's last message;
    * ``votes``: it collects the signed records for ``2 * stage``;
    * ``send``: a message must be taken within a stage, or the aggregator drops us anyway.

    A limit runs from the start of each read or write, so a large message that keeps flowing
    (fragment after fragment) never times out; only silence does.
    """
    return {
        "join": 2 * (prepare_seconds + stage_seconds),
        "stage": 2 * stage_seconds,
        "votes": 3 * stage_seconds,
        "send": stage_seconds,
    }


class _Stream:
    """A participant's end of a RoundStream: fragments out, whole messages in, each read and
    write bounded by a silence limit (:func:`silence_limits`)."""

    def __init__(self, call: RoundStreamCall, max_bytes: int, limits: dict[str, float]) -> None:
        self._call = call
        self._reassembler = Reassembler(max_bytes)
        self._limits = limits
        self.sent = 0
        self.received = 0
        self.stage = "hello"  # the stage this peer is in, for the silence message

    async def _bounded(self, step: Awaitable[T], seconds: float) -> T:
        try:
            return await asyncio.wait_for(step, seconds)
        except TimeoutError:
            raise AggregatorSilent(seconds, self.stage) from None

    async def send(self, message: object) -> None:
        # In fragments of 64 KiB like the aggregator's sends: grpc holds each stream's
        # incoming message whole until it is complete, so 1 MiB fragments cost the
        # aggregator ~3 MiB per participant uploading at once (issue 11, lane 11t).
        for fragment in fragments(message, SEND_FRAGMENT_BYTES):
            self.sent += len(fragment.data)
            await self._bounded(self._call.write(fragment), self._limits["send"])

    async def receive(self, waiting_for: str = "stage") -> object | None:
        """The next whole message, or None when the aggregator closed the stream.

        Raises:
            AggregatorSilent: no fragment came within the ``waiting_for`` limit.
        """
        while True:
            fragment = await self._bounded(self._call.read(), self._limits[waiting_for])
            if fragment is grpc.aio.EOF:  # type: ignore[attr-defined]
                return None
            assert isinstance(fragment, pb.Fragment)  # the call's deserializer made it
            self.received += len(fragment.data)
            message = self._reassembler.push(fragment)
            if message is not None:
                return message


async def participate(ctx: RoundContext, aggregator: RoundStreamDialer) -> RoundOutcome:
    """Take part in one round as a participant, over a RoundStream to ``aggregator`` (the
    round's aggregator's :class:`~peer.channels.PeerStub`)."""
    outcome = RoundOutcome(RoundStatusKind.AGGREGATOR_FAILED, ctx.aggregator)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    over = _attempt_over(ctx)  # first, before any work (training, charging)
    if over is not None:
        logger.warning("%s cannot state its vote: %s", ctx.log_prefix, over)
        return RoundOutcome(
            RoundStatusKind.REFUSED, ctx.aggregator, f"cannot state its vote: {over}"
        )
    try:
        contribution: LocalContribution = await loop.run_in_executor(
            None, ctx.payload.prepare, ctx.round
        )
    except Exception as error:  # the payload's own checks (budget, data): not a crash
        # The reason is published (Status.detail): a data error names patients, so it goes
        # out as its category and a reference to this log line (peer/published.py).
        said = disclose(error, ctx.me)
        logger.warning("%s cannot prepare its contribution: %s", ctx.log_prefix, said.local)
        return RoundOutcome(
            RoundStatusKind.REFUSED,
            ctx.aggregator,
            f"cannot prepare: {said.public}",
            local_reason=f"cannot prepare: {said.local}",
        )
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
    try:
        call = aggregator.round_stream(timeout=timeout)
    except Exception as error:  # e.g. a channel closed meanwhile: this round only, not the peer
        logger.warning("%s cannot open the round stream: %s", prefix, error)
        outcome.reason = f"cannot open a round stream to aggregator {ctx.aggregator}: {error}"
        return outcome
    stream = _Stream(
        call, ctx.max_message_bytes(), silence_limits(ctx.stage_seconds, ctx.prepare_seconds)
    )
    waiting_for = "join"  # what the next read waits for (silence_limits)
    participant = ctx.backend.participant(ctx, contribution.vector)
    sent: list[object] = []  # what this peer sent: its own input must be in the transcript
    my_record: MyRecord | None = None
    built_here = False  # my_record was built from this attempt's transcript
    transcript: object | None = None
    try:
        # Kept before it leaves: from now on this peer signs no earlier attempt's record.
        statement = sign_vote_statement(ctx)
        hello = pb.RoundHello(
            session_id=ctx.session_id,
            round=ctx.round,
            attempt=ctx.attempt,
            peer_id=ctx.me,
            epsilon=contribution.epsilon,
            chain_head=ctx.ledger.session_head(ctx.session_id),
            vote_statement=statement,
        )
        # A vote this peer kept from an earlier attempt goes to this attempt's aggregator,
        # which completes the record if t such votes agree (peer/ledger/_votes.py).
        kept = ctx.ledger.signed_vote(ctx.session_id, ctx.round)
        if kept is not None:
            hello.prior_vote.CopyFrom(
                record_to_proto(kept.record, {ctx.me: kept.signature}, kept.aggregator)
            )
            if hello.ByteSize() > HELLO_MAX_BYTES - 4096:  # still sent at the vote stage
                logger.warning("%s kept vote too large for a hello; not announced", prefix)
                hello.ClearField("prior_vote")
        await stream.send(hello)
        ctx.faults.point(ctx.round, ctx.backend.first_stage.value)
        first = await loop.run_in_executor(None, participant.start)  # e.g. key generation
        if first is not None:  # some roles speak only when spoken to
            sent.append(first)
            await stream.send(first)
        ctx.on_stage(ctx.backend.first_stage.value, "sent")
        stream.stage = ctx.backend.first_stage.value
        while True:
            message = await stream.receive(waiting_for)
            waiting_for = "stage"
            if message is None:
                outcome.reason = "the aggregator closed the stream before the round ended"
                return outcome
            if ctx.backend.is_transcript(message):
                transcript = ctx.backend.completed(message, participant)
            elif isinstance(message, pb.RecordDraft):
                if transcript is None:
                    raise RemoteProtocolError(ctx.aggregator, "record draft before the transcript")
                ctx.on_stage("verify", "checking the transcript")
                stream.stage = "verify"
                my_record = await loop.run_in_executor(
                    None, build_record, ctx, transcript, message, sent, contribution
                )
                ctx.faults.point(ctx.round, "sign")
                # Kept in the ledger before the signature leaves (or the earlier vote again,
                # unless the relayed vote statements release it).
                built_hash = my_record[2]
                my_record, ballot = vote(ctx, my_record, message.vote_statements)
                outcome.survivors = my_record[3]
                stream.stage = "sign"
                ctx.on_stage("agree", "signed the record, waiting for the others")
                await stream.send(ballot)
                waiting_for = "votes"
                if my_record[2] == built_hash:  # this transcript is the evidence of my vote
                    built_here = True
                    await loop.run_in_executor(
                        None, keep_vote_proof, ctx, transcript, built_hash, prefix
                    )
            elif isinstance(message, pb.AgreedRecord):
                if my_record is None:
                    # The aggregator completed the round with votes of an earlier attempt.
                    kept = ctx.ledger.signed_vote(ctx.session_id, ctx.round)
                    if (
                        kept is None
                        or not message.signatures
                        or any(s.record_hash != kept.record_hash for s in message.signatures)
                    ):
                        # Not the record this peer signed: a claim, acted on only once the
                        # record is fetched and its signatures verified (peer/runner.py).
                        outcome.precondition = pb.PRECONDITION_ROUND_AGREED
                        outcome.precondition_round = ctx.round
                        outcome.reason = (
                            f"aggregator {ctx.aggregator} completed the round with the votes "
                            "of an earlier attempt"
                        )
                        return outcome
                    my_record = mine_of(kept)
                    outcome.survivors = my_record[3]
                stored = store_agreed(ctx, message, my_record, contribution)
                # For verify-ledger: the evidence kept with my vote (perhaps of an earlier
                # attempt), or this attempt's transcript if the record was built from it.
                store_round_proof(ctx, transcript if built_here else None, my_record[2], prefix)
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
            elif isinstance(message, pb.Abort) and message.precondition != pb.PRECONDITION_NONE:
                outcome.precondition = message.precondition
                outcome.precondition_round = message.round
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
                reply = ctx.faults.reply(ctx.round, reply, ctx.signer, ctx.config.digest)
                sent.append(reply)
                stage = ctx.backend.stage_reached(participant)
                ctx.on_stage(stage, "")
                stream.stage = stage
                ctx.faults.point(ctx.round, stage)
                await stream.send(reply)
    except (SecAggError, CodecError, LedgerError) as error:
        outcome.status = RoundStatusKind.REFUSED
        outcome.reason = str(error)
        # Our own error text (one line: the log formatters escape control characters).
        logger.warning("%s refused: %s", prefix, error)
        # Best effort: the aggregator may have finished the call already (it hands out the
        # agreed record last, so a peer that cannot store it finds the stream closed).
        with contextlib.suppress(
            grpc.RpcError, asyncio.CancelledError, asyncio.InvalidStateError, AggregatorSilent
        ):
            await stream.send(pb.Abort(reason=str(error), offender=getattr(error, "offender", "")))
        return outcome
    except AggregatorSilent as error:
        # Not this peer's fault, nor proof of the aggregator's: the round is retried with the
        # next aggregator (peer/runner.py) instead of waiting for TCP to give up.
        outcome.reason = f"aggregator {ctx.aggregator} {error}"
        logger.warning("%s %s", prefix, outcome.reason)
        return outcome
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
        details = (error.details() if isinstance(error, grpc.aio.AioRpcError) else None) or str(
            error
        )
        outcome.unreachable = code is grpc.StatusCode.UNAVAILABLE
        if code is grpc.StatusCode.FAILED_PRECONDITION:
            outcome.reason = f"aggregator {ctx.aggregator} refused the stream: {details}"
        else:
            status = code.name if code else "error"
            outcome.reason = f"stream to aggregator {ctx.aggregator} failed: {status} {details}"
        logger.warning("%s %s", prefix, remote(outcome.reason))  # details are the server's text
        return outcome
    except Exception as error:  # a bug or an environment fault: this round only, never the peer
        said = internal_error(error, ctx.me)  # e.g. conclude on local data: no message out
        logger.exception("%s failed: %s", prefix, said.local)
        outcome.status = RoundStatusKind.REFUSED
        outcome.reason, outcome.local_reason = said.public, said.local
        return outcome
    finally:
        outcome.bytes_sent, outcome.bytes_received = stream.sent, stream.received
        call.cancel()


def _attempt_over(ctx: RoundContext) -> str | None:
    """Why this attempt is over for this peer (None: it is not): the peer stated its vote for
    a later attempt (then restarted, say), so it signs no record of this one
    (peer/ledger/_votes.py); refused at once rather than after training."""
    try:
        stated = ctx.ledger.stated_attempt(ctx.session_id, ctx.round)
    except LedgerError as error:
        return str(error)
    if stated is not None and stated > ctx.attempt:
        return f"attempt {ctx.attempt} is over for it (it stated its vote for attempt {stated})"
    return None


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
