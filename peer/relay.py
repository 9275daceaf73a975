"""Sites that accept no inbound connection: calls to them travel through a relay.

A hospital whose firewall forbids inbound connections has a roster entry without an
address (:attr:`peer.identity.RosterEntry.inbound` is false). It takes part over outbound
connections only:

* it is never the aggregator (:attr:`peer.session.SessionProposal.aggregators`), and opens
  its round streams to each round's aggregator itself, as every participant does;
* it keeps one long-lived ``Control`` stream open to a reachable roster peer, its *relay*
  (:class:`ControlClient`; the relays are tried in the configured order, the next one when
  a relay fails);
* whoever would call its server (the operator's Propose / Start / Status, the other peers'
  Status / Records when they catch up) signs the call (:func:`sign_call`) and hands it to a
  relay's ``Relay`` RPC (:class:`RelayedStub`); the relay sends it down the Control stream
  (:class:`RelayHub`), the outbound-only peer checks it (:class:`CallChecker`), runs the
  *same* service handler a direct call would run, and signs its answer (:func:`sign_answer`),
  which the relay hands back and the caller checks (:func:`check_answer`).

Theory of operation: the relay is trusted for nothing. A call is signed by its author's
certificate key over (caller, target, method, request, time, nonce), so a relay that alters
or forges one is refused by the target, which names the relay; the target refuses a call
older than :data:`FRESH_SECONDS` or one whose nonce it has seen (a relay replaying it). An
answer is signed by the target over the digest of the call it answers, so a relay can
neither alter it nor answer an old answer to a new call; the caller refuses it naming the
relay. The messages carried were already signed end to end by their authors (a proposal by
its proposer, beacon commitments by each peer, agreed records by their signers); the
envelope adds it for the rest (a Status, a refusal, the call itself). What a relay can do
is drop or delay: a dropped call fails at the caller like an unreachable peer (it tries
the next relay), and the protocol already tolerates that (SECURITY.md, "Outbound-only sites
and relays").

The signed envelope itself (signing and checking calls and answers, :class:`CallChecker`) is
in :mod:`peer.relay_envelope`; this module is the streams that carry it, and re-exports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError, Message

from secagg import Signer, Verifier

from .channels import ChannelPool, ControlCall, RoundStreamCall
from .identity import PeerIdentity, Role, Roster
from .published import internal_error
from .ratelimit import Backoff, RateLimiter
from .relay_envelope import (
    FRESH_SECONDS,
    RELAYED_METHODS,
    RESPONSES,
    CallChecker,
    RelayError,
    RelayRefused,
    call_digest,
    check_answer,
    rpc_error,
    sign_answer,
    sign_call,
    status_code,
)
from .wire import peer_pb2 as pb

__all__ = [
    "FRESH_SECONDS",
    "RELAYED_METHODS",
    "CallChecker",
    "ControlClient",
    "RelayError",
    "RelayHub",
    "RelayRefused",
    "RelayRoute",
    "RelayedStub",
    "call_digest",
    "check_answer",
    "rpc_error",
    "sign_answer",
    "sign_call",
]

logger = logging.getLogger("peer.relay")

# --------------------------------------------------------------------------- the target's side


# What the target runs for an accepted call: the service's own handler of ``method`` for
# the signed caller; returns (code, details, serialised response).
Dispatch = Callable[[str, bytes, PeerIdentity], Awaitable[tuple[grpc.StatusCode, str, bytes]]]


class ControlClient:
    """An outbound-only peer's Control stream to its relays, with failover.

    Connects to ``relays`` in order; when the stream to one fails (or cannot be opened),
    the next is tried, round and round, until ``stopping`` is set. Each call received is
    checked (:class:`CallChecker`), handled by ``dispatch`` and answered, signed.
    """

    def __init__(
        self,
        *,
        me: str,
        relays: Callable[[], Sequence[str]],
        pool: ChannelPool,
        checker: CallChecker,
        identify: Callable[[str], PeerIdentity],
        dispatch: Dispatch,
        signer: Signer,
        retry_seconds: float = 1.0,
    ) -> None:
        self.me = me
        self.relays = relays
        self.pool = pool
        self.checker = checker
        self.identify = identify
        self.dispatch = dispatch
        self.signer = signer
        self.retry_seconds = retry_seconds
        self.connected_to: str | None = None  # the relay whose stream is open, if any
        self.connected = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        """Keep one Control stream open until ``stopping``.

        After a stream that was open ends, the next relay is tried at once; when every relay
        failed in a row, the next round of tries waits (exponential back-off, capped), so a
        site cut off from all its relays costs a few log lines a minute.
        """
        turn = 0
        failed_in_a_row = 0
        backoff = Backoff(base=self.retry_seconds, cap=max(self.retry_seconds, 30.0))
        while not stopping.is_set():
            relays = list(self.relays())
            if not relays:
                logger.error("peer=%s is outbound-only but has no relay to connect to", self.me)
                await _sleep_or_stop(stopping, 10 * self.retry_seconds)
                continue
            relay = relays[turn % len(relays)]
            turn += 1
            stream = asyncio.ensure_future(self._serve(relay))
            stopped = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({stream, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not stream.done():
                stream.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stream
            if stream.done() and not stream.cancelled() and stream.exception() is not None:
                logger.warning(
                    "peer=%s control stream to relay %s ended: %s",
                    self.me,
                    relay,
                    stream.exception(),
                )
            if self.connected.is_set():
                failed_in_a_row = 0
                backoff.reset()
            else:
                failed_in_a_row += 1
            self.connected_to = None
            self.connected.clear()
            if failed_in_a_row and failed_in_a_row % len(relays) == 0:
                await _sleep_or_stop(stopping, backoff.next_delay())

    async def _serve(self, relay: str) -> None:
        call = self.pool.dial(relay).control()
        writing = asyncio.Lock()  # one write at a time on a grpc stream
        tasks: set[asyncio.Task[None]] = set()
        try:
            # Announce ourselves (an empty answer); the relay acknowledges with an empty call
            # once it holds the stream, or refuses it (then read raises): only an
            # acknowledged stream counts as open (a refusing relay is retried with back-off).
            await call.write(pb.RelayedAnswer(target=self.me))
            ack = await call.read()
            if not isinstance(ack, pb.RelayedCall) or ack.method:
                raise ConnectionError(f"relay {relay} did not acknowledge the control stream")
            logger.info("peer=%s control stream open to relay %s", self.me, relay)
            self.connected_to = relay
            self.connected.set()
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:  # type: ignore[attr-defined]
                    raise ConnectionError(f"relay {relay} closed the control stream")
                assert isinstance(message, pb.RelayedCall)
                task = asyncio.create_task(self._answer(relay, message, call, writing))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            call.cancel()
            for task in tasks:
                task.cancel()

    async def _answer(
        self, relay: str, call: pb.RelayedCall, stream: ControlCall, writing: asyncio.Lock
    ) -> None:
        try:
            self.checker.check(call, relay)
            identity = self.identify(call.caller)
        except RelayError as error:
            # Not answered: an answer would be signed by this peer for a call its author
            # never made. The caller sees its call dropped; the log names the relay.
            logger.warning("peer=%s refused a relayed call: %s", self.me, error)
            return
        except Exception as error:  # the caller's certificate is no longer accepted
            logger.warning(
                "peer=%s refused a call from %s relayed by %s: %s",
                self.me,
                call.caller,
                relay,
                error,
            )
            answer = sign_answer(
                self.me, call, grpc.StatusCode.PERMISSION_DENIED, str(error), b"", self.signer
            )
        else:
            try:
                code, details, response = await self.dispatch(call.method, call.request, identity)
            except Exception as error:  # a bug here: answered, so the caller does not wait
                # Its type and a reference only: the message may quote local data.
                said = internal_error(error, self.me)
                logger.exception("peer=%s relayed %s failed: %s", self.me, call.method, said.local)
                code, details, response = grpc.StatusCode.INTERNAL, said.public, b""
            answer = sign_answer(self.me, call, code, details, response, self.signer)
        async with writing:
            await stream.write(answer)


async def _sleep_or_stop(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)


# --------------------------------------------------------------------------- the relay's side


@dataclass
class _Link:
    """One outbound-only peer's open Control stream at this relay."""

    calls: asyncio.Queue[pb.RelayedCall] = field(default_factory=asyncio.Queue)
    pending: dict[bytes, asyncio.Future[pb.RelayedAnswer]] = field(default_factory=dict)


class RelayHub:
    """A reachable peer's relay: the Control streams of outbound-only peers connected here,
    and the forwarding of signed calls to them.

    Policy: only roster members call (the TLS layer); only outbound-only roster peers hold a
    Control stream; a caller forwards only calls it signed itself, at a bounded rate.
    """

    def __init__(
        self,
        me: str,
        roster: Callable[[], Roster],
        limiter: RateLimiter,
        max_pending: int = 64,
    ) -> None:
        self.me = me
        self.roster = roster
        self.limiter = limiter
        self.max_pending = max_pending
        self._links: dict[str, _Link] = {}

    def connected(self, peer_id: str) -> bool:
        return peer_id in self._links

    def admit(self, caller: PeerIdentity) -> None:
        """May ``caller`` hold a Control stream here (RelayRefused if not)."""
        entry = self.roster().get(caller.peer_id)
        if entry is None or entry.role is not Role.PEER or entry.inbound:
            raise RelayRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller.peer_id} is not an outbound-only peer of the roster: it has no "
                "Control stream here (relays serve roster peers without an address)",
            )

    async def control(
        self, peer_id: str, answers: AsyncIterator[pb.RelayedAnswer]
    ) -> AsyncIterator[pb.RelayedCall]:
        """Serve ``peer_id``'s Control stream: yield the calls for it, match its answers.

        A newer stream from the same peer replaces the older one (it reconnected).
        """
        link = _Link()
        previous = self._links.get(peer_id)
        self._links[peer_id] = link
        if previous is not None:
            _fail_pending(previous, "it reconnected")
        logger.info("peer=%s relays for %s", self.me, peer_id)

        async def read_answers() -> None:
            async for answer in answers:
                waiter = link.pending.pop(answer.call_digest, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)

        reader = asyncio.create_task(read_answers())
        try:
            yield pb.RelayedCall(target=peer_id)  # the acknowledgement (no method)
            while not reader.done():
                get = asyncio.ensure_future(link.calls.get())
                await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    break
                yield get.result()
        finally:
            reader.cancel()
            if self._links.get(peer_id) is link:
                del self._links[peer_id]
            _fail_pending(link, "its control stream closed")
            logger.info("peer=%s no longer relays for %s", self.me, peer_id)

    async def forward(self, caller: str, call: pb.RelayedCall, timeout: float) -> pb.RelayedAnswer:
        """Carry ``call`` to its target and return the target's (signed) answer.

        Raises:
            RelayRefused: not this caller's own call, over its rate, the target is not an
                outbound-only roster peer or not connected here, or it did not answer in time.
        """
        if call.caller != caller:
            raise RelayRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller} asked to relay a call signed as {call.caller!r}: a relay carries "
                "only its caller's own calls",
            )
        if not self.limiter.allow(caller):
            raise RelayRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{caller} asks {self.me} to relay more than {self.limiter.rate:g} calls per "
                f"second (burst {self.limiter.burst}); slow down",
            )
        entry = self.roster().get(call.target)
        if entry is None or entry.role is not Role.PEER or entry.inbound:
            raise RelayRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{call.target!r} is not an outbound-only peer of the roster: {self.me} "
                "relays to no one else",
            )
        link = self._links.get(call.target)
        if link is None:
            raise RelayRefused(
                grpc.StatusCode.UNAVAILABLE,
                f"{call.target} has no control stream to {self.me}: try another relay",
            )
        if len(link.pending) >= self.max_pending:
            raise RelayRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.me} already waits for {self.max_pending} answers of {call.target}",
            )
        digest = call_digest(call)
        waiter: asyncio.Future[pb.RelayedAnswer] = asyncio.get_running_loop().create_future()
        link.pending[digest] = waiter
        await link.calls.put(call)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise RelayRefused(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{call.target} did not answer a relayed {call.method} within {timeout:g}s",
            ) from None
        finally:
            link.pending.pop(digest, None)


def _fail_pending(link: _Link, why: str) -> None:
    for waiter in link.pending.values():
        if not waiter.done():
            waiter.set_exception(RelayRefused(grpc.StatusCode.UNAVAILABLE, f"relay lost: {why}"))
    link.pending.clear()


# --------------------------------------------------------------------------- the caller's side


class RelayRoute:
    """How this member (a peer or an operator) calls outbound-only peers.

    Through its own :class:`RelayHub` when the target is connected here, otherwise through
    the ``Relay`` RPC of the reachable roster peers: first the one that last carried a call
    to the target, then the others in roster order. Each attempt is a freshly signed call
    (the target refuses a nonce twice).
    """

    def __init__(
        self,
        *,
        me: str,
        signer: Signer,
        verifiers: Mapping[str, Verifier],
        roster: Callable[[], Roster],
        pool: ChannelPool,
        hub: RelayHub | None = None,
        clock: Callable[[], float] = time.time,
        nonce: Callable[[int], bytes] = secrets.token_bytes,
        default_timeout: float = 30.0,
    ) -> None:
        self.me = me
        self.signer = signer
        self.verifiers = verifiers
        self.roster = roster
        self.pool = pool
        self.hub = hub
        self.clock = clock
        self.nonce = nonce
        self.default_timeout = default_timeout
        self._last_relay: dict[str, str] = {}

    def stub(self, target: str) -> RelayedStub:
        return RelayedStub(self, target)

    def relays_for(self, target: str) -> list[str]:
        """The peers to try for ``target``, in order."""
        reachable = [e.peer_id for e in self.roster().peers if e.inbound and e.peer_id != self.me]
        last = self._last_relay.get(target)
        if last in reachable:
            reachable.remove(last)
            reachable.insert(0, last)
        return reachable

    async def call(
        self, target: str, method: str, request: Message, timeout: float | None
    ) -> Message:
        """``method(request)`` on outbound-only ``target``; its response, or the gRPC error
        it answered (or UNAVAILABLE naming the relays tried)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.default_timeout)
        failures: list[str] = []
        while True:
            answer = await self._attempt(target, method, request, deadline, failures)
            if answer is not None:
                return answer
            # No relay carried it: the target may be reconnecting (to the next relay after
            # one failed); try them again while the caller's deadline allows.
            if deadline - loop.time() < 0.5:
                break
            await asyncio.sleep(0.5)
        raise rpc_error(
            grpc.StatusCode.UNAVAILABLE,
            f"outbound-only peer {target} could not be reached through a relay ("
            + ("; ".join(failures[-4:]) or "no reachable peer to relay")
            + ")",
        )

    async def _attempt(
        self, target: str, method: str, request: Message, deadline: float, failures: list[str]
    ) -> Message | None:
        """One pass over the relays: the target's response, or None (``failures`` says why)."""
        loop = asyncio.get_running_loop()
        candidates: list[str | None] = []
        if self.hub is not None and self.hub.connected(target):
            candidates.append(None)  # ourselves
        candidates += self.relays_for(target)
        for index, relay in enumerate(candidates):
            left = deadline - loop.time()
            if left <= 0:
                break
            if index + 1 < len(candidates):
                # A relay that takes the call and never answers (it drops it) must not use
                # up the whole deadline: half of what is left, the rest for the others.
                left /= 2
            call = sign_call(
                self.me,
                target,
                method,
                request,
                self.signer,
                now=self.clock(),
                nonce=self.nonce(32),
            )
            name = relay or self.me
            try:
                if relay is None:
                    assert self.hub is not None
                    answer = await self.hub.forward(self.me, call, left)
                else:
                    answer = await self.pool.dial(relay).relay(call, timeout=left)
            except RelayRefused as refused:
                failures.append(f"{name}: {refused}")
                continue
            except grpc.RpcError as error:
                details = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
                failures.append(f"{name}: {details}")
                continue
            try:
                check_answer(call, answer, self.verifiers, name)
            except RelayError as error:
                logger.warning("peer=%s refused a relayed answer: %s", self.me, error)
                failures.append(str(error))
                continue
            if relay is not None:
                self._last_relay[target] = relay
            code = status_code(answer.code)
            if code is not grpc.StatusCode.OK:
                raise rpc_error(code, answer.details)
            try:
                return RESPONSES[method].FromString(answer.response)
            except DecodeError as error:  # signed by the target itself: its own fault
                raise rpc_error(
                    grpc.StatusCode.INTERNAL, f"{target} answered a malformed {method}: {error}"
                ) from None
        return None


class RelayedStub:
    """The Peer service of an outbound-only peer, through relays (a
    :class:`~peer.channels.PeerCalls`)."""

    def __init__(self, route: RelayRoute, target: str) -> None:
        self.route = route
        self.target = target

    async def propose(
        self, request: pb.SessionProposal, timeout: float | None = None
    ) -> pb.ProposalAnswer:
        answer = await self.route.call(self.target, "Propose", request, timeout)
        assert isinstance(answer, pb.ProposalAnswer)
        return answer

    async def start(self, request: pb.StartRequest, timeout: float | None = None) -> pb.StartAnswer:
        answer = await self.route.call(self.target, "Start", request, timeout)
        assert isinstance(answer, pb.StartAnswer)
        return answer

    async def status(self, session_id: str, timeout: float | None = None) -> pb.SessionStatus:
        answer = await self.route.call(
            self.target, "Status", pb.SessionRef(session_id=session_id), timeout
        )
        assert isinstance(answer, pb.SessionStatus)
        return answer

    async def records(self, session_id: str, timeout: float | None = None) -> pb.SessionStatus:
        answer = await self.route.call(
            self.target, "Records", pb.SessionRef(session_id=session_id), timeout
        )
        assert isinstance(answer, pb.SessionStatus)
        return answer

    def round_stream(self, timeout: float | None = None) -> RoundStreamCall:
        raise rpc_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{self.target} is outbound-only: it is never an aggregator, no round stream "
            "goes to it",
        )
