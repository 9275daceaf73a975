"""The aggregator's side of one round over gRPC streams (theory of operation: peer/round/).

Every participant (the aggregator's own node included, through its own server) opens a
``RoundStream`` to the round's aggregator and sends a ``RoundHello``; :func:`serve_round_stream`
is the aggregator's end of one such stream and :class:`AggregatorRound` owns the role object
and every stream of the round. Heavy steps (unmasking, multiplying ciphertexts, encoding the
transcript) run in a worker thread so that streams keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from secagg import AggregatorState, RemoteProtocolError, RoundAborted, SecAggError

from ..codec import CodecError, Reassembler, fragments
from ..logs import remote
from ..published import disclose
from ..wire import peer_pb2 as pb
from .agreement import (
    InvalidVoteStatement,
    check_vote_statement,
    current_votes,
    prior_votes_agreed,
    tally,
)
from .context import RoundContext

__all__ = [
    "HELLO_MAX_BYTES",
    "SEND_FRAGMENT_BYTES",
    "AggregatorRound",
    "Elsewhere",
    "Encoded",
    "serve_round_stream",
]

logger = logging.getLogger("peer.rounds")

# The largest RoundHello an aggregator reads: room for a vote kept from an earlier attempt
# (a record with its metrics, peer/ledger/_votes.py) besides the hello's own few fields.
HELLO_MAX_BYTES = 1 << 20

# The aggregator sends in fragments of this size (participants send theirs in 1 MiB ones).
# grpc's server takes a streamed message off the handler before the participant has read
# it, and holds about one written message per stream that the participant's window has not
# accepted yet. The aggregator writes the same large messages (the statement with the
# aggregate, the transcript) to every stream at once while the participants are busy: in
# fragments of 1 MiB that was about a vector of 4 MB per participant in the aggregator's
# native memory (issue 11; measured 0.9 to 2.2 MiB per stream of 4 MB written and not yet
# read, under 0.2 MiB in fragments of 64 KiB: tests/round/test_round_send_buffer.py). 64 KiB is
# HTTP/2's initial stream window: no fewer round trips on a slow link than before.
SEND_FRAGMENT_BYTES = 1 << 16


class Elsewhere(LookupError):
    """This peer cannot take the stream: it is at another point of the session.

    Not an error of the caller: answered in-band as an Abort carrying the typed
    ``precondition`` (and the round it names), so that the caller knows what to do next.
    """

    def __init__(self, precondition: pb.Precondition.ValueType, reason: str, round_: int = 0):
        super().__init__(reason)
        self.precondition = precondition
        self.reason = reason
        self.round = round_

    def abort(self) -> pb.Abort:
        return pb.Abort(reason=self.reason, precondition=self.precondition, round=self.round)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A message already cut into fragments, to send the same bytes on many streams."""

    fragments: tuple[pb.Fragment, ...]

    @classmethod
    def of(cls, message: object) -> Encoded:
        return cls(tuple(fragments(message, SEND_FRAGMENT_BYTES)))


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
        # Votes the participants signed in an earlier attempt of this round, from their hellos.
        self._prior_votes: dict[str, pb.AgreedRecord] = {}
        # Their vote statements (peer/round/agreement.py), relayed when a prior vote exists.
        self._vote_statements: dict[str, pb.VoteStatement] = {}
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
        if hello.HasField("prior_vote"):
            self._prior_votes[peer] = hello.prior_vote
        if hello.HasField("vote_statement"):  # relayed only if checked (agreement.py)
            try:
                if hello.vote_statement.peer_id != peer:
                    raise InvalidVoteStatement(f"vote statement of {hello.vote_statement.peer_id}")
                check_vote_statement(self.ctx, hello.vote_statement)
                self._vote_statements[peer] = hello.vote_statement
            except InvalidVoteStatement as error:
                self._warn("participant=%s sent an invalid %s", peer, error)
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
            queue.put_nowait(self.ctx.faults.outgoing(self.ctx.round, peer, message))

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
            # The Abort goes to every participant: the error's type and a reference to this
            # log line, not its message (peer/published.py).
            said = disclose(error, self.ctx.me)
            self.log.exception("%s role=aggregator failed: %s", self.ctx.log_prefix, said.local)
            self.result = f"aggregator error: {said.public}"
            self._finish(pb.Abort(reason=self.result, offender=self.ctx.me))
        finally:
            self.ctx.backend.release(self.protocol)  # e.g. the spooled masked inputs

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
            if joining and self._prior_votes:
                # An earlier attempt's aggregator vanished after collecting the votes: if t
                # participants signed the same record then, it may be agreed somewhere, and
                # it is the only record of this round that can be. Complete it again.
                agreed = prior_votes_agreed(self._prior_votes, ctx, self._warn)
                if agreed is not None:
                    self._info(
                        "agreed signatures=%d collected from an earlier attempt",
                        len(agreed.signatures),
                    )
                    self.agreed = agreed
                    self.result = "agreed in an earlier attempt"
                    self._finish(agreed)
                    return
            ctx.faults.point(ctx.round, f"aggregator:{stage.value}")
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
            for liar in sorted(ctx.backend.misbehaving(self.protocol)):
                self._warn(
                    "participant=%s revealed wrong shares or answers; went on without them", liar
                )
            # A message sent to many (secagg's statement, with the aggregate) is encoded
            # once, off the event loop, instead of once per stream.
            shared: dict[int, object] = {}
            for message in outgoing.values():
                if id(message) in shared:
                    shared[id(message)] = await loop.run_in_executor(None, Encoded.of, message)
                else:
                    shared[id(message)] = message
            for peer, message in outgoing.items():
                self._send(peer, shared[id(message)])

        recipients = [p for p in self._outboxes if p not in self._gone]
        transcripts = await loop.run_in_executor(
            None, ctx.backend.transcripts, self.protocol, recipients
        )
        transcripts = ctx.faults.transcripts(ctx.round, transcripts)
        result = self.protocol.result
        assert result is not None
        epsilon = {p: self._hellos[p].epsilon for p in result.survivors if p in self._hellos}
        draft = pb.RecordDraft(
            prev_hash=ctx.ledger.session_head(ctx.session_id),
            epsilon_json=json.dumps(epsilon, sort_keys=True),
        )
        if self._prior_votes:  # enough statements release a vote nobody else signed
            draft.vote_statements.extend(self._vote_statements.values())
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
        """The agreed record of the votes (peer/round/agreement.py), or None (``result`` says
        why)."""
        # A participant that left after announcing an earlier vote still counts with it;
        # one that voted in this attempt counts with that vote (the same one, if it had one).
        votes = {**current_votes(self._prior_votes, self.ctx, self._warn), **self._votes}
        agreed, self.result = tally(
            votes, self.ctx.verifiers, self.ctx.config.threshold, self._warn
        )
        return agreed


async def serve_round_stream(
    requests: AsyncIterator[pb.Fragment],
    caller: str,
    find_round: Callable[[pb.RoundHello], Awaitable[AggregatorRound]],
    max_bytes: int,
    hello_seconds: float | None = None,
) -> AsyncIterator[pb.Fragment]:
    """The aggregator's end of one participant's RoundStream (used by the gRPC servicer).

    ``find_round(hello)`` returns the :class:`AggregatorRound` (awaitable) or raises
    PermissionError with the reason to refuse, or :class:`Elsewhere`. A stream whose hello has not
    arrived within ``hello_seconds`` raises TimeoutError: an open stream that says nothing
    would otherwise hold the aggregator's resources for ever.
    """
    hello_reader = Reassembler(HELLO_MAX_BYTES)
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
                # Neither the fragment (up to 1 MiB) nor the message is kept while this
                # stream waits for its next message, a stage later: n streams each holding
                # their last masked input made the aggregator's memory O(n·m) (issue 11).
                del fragment
                if message is not None:
                    round_.deliver(caller, message)
                    del message
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
                message.fragments
                if isinstance(message, Encoded)
                else fragments(message, SEND_FRAGMENT_BYTES)
            ):
                yield fragment
    finally:
        reader.cancel()
        round_.leave(caller)
