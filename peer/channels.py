"""Channels to the other peers, one per peer, and one typed stub for the Peer service.

Every caller of another peer (the node's session runner and catch-up, the operator's client)
goes through a :class:`ChannelPool`: it dials each roster member at most once, over mTLS to
that member's identity (:func:`peer.tls.peer_channel`), and redials when the roster moves
the member. :class:`PeerStub` names the service's methods with their message types, so no
caller writes a method path or a serializer again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from .identity import Roster
from .tls import TLSFiles, peer_channel
from .wire import peer_pb2 as pb

__all__ = [
    "SERVICE",
    "ChannelPool",
    "ControlCall",
    "PeerCalls",
    "PeerStub",
    "PooledRoundStreams",
    "RoundStreamCall",
    "method_path",
]

SERVICE = "hospital_secagg.v1.Peer"


def method_path(name: str) -> str:
    """The full gRPC path of one of the Peer service's methods."""
    return f"/{SERVICE}/{name}"


class RoundStreamCall(Protocol):
    """The client end of a RoundStream (grpc.aio's stubs are untyped)."""

    async def write(self, request: pb.Fragment) -> None: ...

    async def read(self) -> object: ...

    def cancel(self) -> bool: ...


class ControlCall(Protocol):
    """The client end of a Control stream (an outbound-only peer's, peer/relay.py)."""

    async def write(self, request: pb.RelayedAnswer) -> None: ...

    async def read(self) -> object: ...

    def cancel(self) -> bool: ...


class PeerCalls(Protocol):
    """What a caller asks of another peer: a :class:`PeerStub` for a peer it can dial, a
    relayed stub (peer/relay.py) for an outbound-only one."""

    async def propose(
        self, request: pb.SessionProposal, timeout: float | None = None
    ) -> pb.ProposalAnswer: ...

    async def start(
        self, request: pb.StartRequest, timeout: float | None = None
    ) -> pb.StartAnswer: ...

    async def status(self, session_id: str, timeout: float | None = None) -> pb.SessionStatus: ...

    async def records(self, session_id: str, timeout: float | None = None) -> pb.SessionStatus: ...

    def round_stream(self, timeout: float | None = None) -> RoundStreamCall: ...


def _unary(
    channel: grpc.aio.Channel, name: str, request: type[Message], response: type[Message]
) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
    return channel.unary_unary(
        method_path(name),
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


class PeerStub:
    """The Peer service (protos/peer.proto) of one peer, over ``channel``."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self._propose = _unary(channel, "Propose", pb.SessionProposal, pb.ProposalAnswer)
        self._start = _unary(channel, "Start", pb.StartRequest, pb.StartAnswer)
        self._status = _unary(channel, "Status", pb.SessionRef, pb.SessionStatus)
        self._records = _unary(channel, "Records", pb.SessionRef, pb.SessionStatus)
        self._round_stream = channel.stream_stream(
            method_path("RoundStream"),
            request_serializer=pb.Fragment.SerializeToString,
            response_deserializer=pb.Fragment.FromString,
        )
        self._relay = _unary(channel, "Relay", pb.RelayedCall, pb.RelayedAnswer)
        self._control = channel.stream_stream(
            method_path("Control"),
            request_serializer=pb.RelayedAnswer.SerializeToString,
            response_deserializer=pb.RelayedCall.FromString,
        )

    async def propose(
        self, request: pb.SessionProposal, timeout: float | None = None
    ) -> pb.ProposalAnswer:
        answer: pb.ProposalAnswer = await self._propose(request, timeout=timeout)
        return answer

    async def start(self, request: pb.StartRequest, timeout: float | None = None) -> pb.StartAnswer:
        answer: pb.StartAnswer = await self._start(request, timeout=timeout)
        return answer

    async def status(self, session_id: str, timeout: float | None = None) -> pb.SessionStatus:
        answer: pb.SessionStatus = await self._status(
            pb.SessionRef(session_id=session_id), timeout=timeout
        )
        return answer

    async def records(self, session_id: str, timeout: float | None = None) -> pb.SessionStatus:
        answer: pb.SessionStatus = await self._records(
            pb.SessionRef(session_id=session_id), timeout=timeout
        )
        return answer

    def round_stream(self, timeout: float | None = None) -> RoundStreamCall:
        call: RoundStreamCall = self._round_stream(timeout=timeout)  # type: ignore[call-arg]  # stubs predate grpc.aio
        return call

    async def relay(
        self, request: pb.RelayedCall, timeout: float | None = None
    ) -> pb.RelayedAnswer:
        answer: pb.RelayedAnswer = await self._relay(request, timeout=timeout)
        return answer

    def control(self) -> ControlCall:
        call: ControlCall = self._control()  # type: ignore[call-arg]  # stubs predate grpc.aio
        return call


class ChannelPool:
    """At most one channel per peer, dialled on first use.

    ``roster()`` is read at each dial, so a reloaded roster is used from then on;
    :meth:`forget` closes a peer's channel (its address changed or it left the roster).
    A peer without an address (outbound-only) is reached through ``relayed`` (set with
    :meth:`relay_outbound_only`; peer/relay.py), never dialled.
    """

    def __init__(self, roster: Callable[[], Roster], files: TLSFiles) -> None:
        self._roster = roster
        self._files = files
        self._stubs: dict[str, PeerStub] = {}
        self._closing: set[asyncio.Future[None]] = set()
        self._relayed: Callable[[str], PeerCalls] | None = None

    def relay_outbound_only(self, relayed: Callable[[str], PeerCalls]) -> None:
        """Reach outbound-only peers with ``relayed(peer_id)`` (peer/relay.py)."""
        self._relayed = relayed

    def stub(self, peer_id: str) -> PeerCalls:
        """How to call ``peer_id``: its stub, or its relayed stub when it is outbound-only
        (KeyError: not in the roster, or runs no server)."""
        stub = self._stubs.get(peer_id)
        if stub is not None:
            return stub
        entry = self._roster().get(peer_id)
        if entry is not None and not entry.inbound and self._relayed is not None:
            return self._relayed(peer_id)
        return self.dial(peer_id)

    def dial(self, peer_id: str) -> PeerStub:
        """The direct stub of ``peer_id`` (KeyError: not in the roster, or has no address)."""
        stub = self._stubs.get(peer_id)
        if stub is None:
            channel = peer_channel(self._roster(), peer_id, self._files)
            stub = self._stubs[peer_id] = PeerStub(channel)
        return stub

    def channel(self, peer_id: str) -> grpc.aio.Channel:
        return self.dial(peer_id).channel

    def round_streams(self, peer_id: str) -> PooledRoundStreams:
        """Opens round streams to ``peer_id`` on whichever channel the pool holds when each
        stream opens (a stub taken earlier may have been closed by a renewal meanwhile)."""
        return PooledRoundStreams(self, peer_id)

    def dialled(self) -> list[str]:
        """The peers this pool holds a channel to."""
        return list(self._stubs)

    def forget(self, peer_id: str, grace: float | None = None) -> None:
        """Close ``peer_id``'s channel (in the background); the next use dials again.

        ``grace``: seconds its calls in flight may still take (None: cancel them now).
        """
        stub = self._stubs.pop(peer_id, None)
        if stub is not None:
            closing = asyncio.ensure_future(stub.channel.close(grace))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for stub in self._stubs.values():
            await stub.channel.close(None)
        self._stubs.clear()


class PooledRoundStreams:
    """A participant's way to the aggregator, looked up in the pool only when the stream
    opens.

    A participant prepares its contribution (training: seconds to minutes) before it opens
    the stream. A renewal of this peer's certificate in that time closes every pooled
    channel (peer/node.py), and a call on a closed channel raises ``UsageError``: a stub
    taken before the preparation would fail the round, this one dials the new channel.
    """

    def __init__(self, pool: ChannelPool, peer_id: str) -> None:
        self._pool = pool
        self._peer_id = peer_id

    def round_stream(self, timeout: float | None = None) -> RoundStreamCall:
        return self._pool.stub(self._peer_id).round_stream(timeout=timeout)
