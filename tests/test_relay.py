"""Outbound-only sites (peer/relay.py): who may aggregate, and relays trusted for nothing.

The relay tests run the real objects (CallChecker, ControlClient, RelayHub, RelayRoute) with
real certificate keys, over an in-memory link instead of gRPC (like h11's ConnectionPair):
a relay that alters a call or an answer is refused with an error naming it; one that drops
is a relay the caller moves past.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from peer.channels import ControlCall
from peer.identity import PeerIdentity, Roster, load_signer
from peer.identity.testing import LocalFederation
from peer.published import INTERNAL_ERROR
from peer.ratelimit import RateLimiter
from peer.relay import (
    CallChecker,
    ControlClient,
    RelayError,
    RelayHub,
    RelayRefused,
    RelayRoute,
    check_answer,
    rpc_error,
    sign_answer,
    sign_call,
)
from peer.session import ProposalError, SessionProposal, aggregator_for, outbound_problem
from peer.wire import peer_pb2 as pb

A, B, C, OPS = "hospital-a", "hospital-b", "hospital-c", "ops"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> LocalFederation:
    return LocalFederation.create(
        tmp_path_factory.mktemp("relay"),
        federation="relay",
        peers=[A, B, C],
        operators=[OPS],
        outbound_only=[C],
    )


def proposal(
    outbound_only: tuple[str, ...] = (C,), participants: tuple[str, ...] = (A, B, C)
) -> SessionProposal:
    return SessionProposal(
        "s1",
        participants,
        rounds=5,
        threshold=SessionProposal.default_threshold(len(participants)),
        payload={"kind": "vector", "length": 4},
        outbound_only=outbound_only,
    )


# --------------------------------------------------------------------------- selection rule


def test_an_outbound_only_participant_is_never_the_aggregator() -> None:
    p = proposal()
    seen: set[str] = set()
    for beacon_byte in range(40):
        beacon = bytes([beacon_byte]) * 32
        for round_ in range(1, 6):
            for attempt in range(6):
                chosen = aggregator_for(p, round_, attempt, beacon)
                assert chosen != C
                # Every peer computes the same choice from the signed proposal and beacon.
                same = SessionProposal.from_document(p.document())
                assert aggregator_for(same, round_, attempt, beacon) == chosen
                seen.add(chosen)
    assert seen == {A, B}  # the rotation still covers every inbound participant


def test_sessions_without_outbound_only_sites_keep_their_documents() -> None:
    plain = proposal(outbound_only=())
    assert "outbound_only" not in plain.document()
    assert '"outbound_only":["hospital-c"]' in proposal().document()
    assert proposal().digest != plain.digest  # the list is signed with the proposal


def test_proposals_that_leave_no_aggregator_or_name_strangers_are_refused() -> None:
    with pytest.raises(ProposalError, match="no one can be the aggregator"):
        proposal(outbound_only=(A, B), participants=(A, B))
    with pytest.raises(ProposalError, match="hospital-x, who are not participants"):
        proposal(outbound_only=("hospital-x",))


def test_the_outbound_only_list_must_match_the_roster(fed: LocalFederation) -> None:
    roster = fed.roster
    assert outbound_problem(proposal(), roster) is None
    # A proposer narrowing the rotation to an accomplice (B "cannot accept connections"):
    narrowed = outbound_problem(proposal(outbound_only=(B, C)), roster)
    assert narrowed is not None
    assert "hospital-b, hospital-c" in narrowed
    # ... or hiding that C cannot aggregate (its rounds would fail):
    assert outbound_problem(proposal(outbound_only=()), roster) is not None


# --------------------------------------------------------------------------- relayed calls


@dataclass
class Keys:
    fed: LocalFederation
    roster: Roster

    def signer(self, who: str) -> Any:
        return load_signer(self.fed.members[who].key)

    @property
    def verifiers(self) -> dict[str, Any]:
        return self.roster.verifiers()

    def identity(self, who: str) -> PeerIdentity:
        entry = self.roster[who]
        return PeerIdentity(
            who,
            entry.institution,
            entry.role,
            entry.cert_fingerprint_sha256,
            entry.certificate.serial_number,
            datetime(2100, 1, 1, tzinfo=UTC),
        )


@pytest.fixture(scope="module")
def keys(fed: LocalFederation) -> Keys:
    return Keys(fed, fed.roster)


def status_call(
    keys: Keys, caller: str = OPS, now: float = 1000.0, nonce: bytes = b"n" * 32
) -> pb.RelayedCall:
    return sign_call(
        caller,
        C,
        "Status",
        pb.SessionRef(session_id="s1"),
        keys.signer(caller),
        now=now,
        nonce=nonce,
    )


def test_a_call_altered_or_forged_by_the_relay_is_refused_naming_it(keys: Keys) -> None:
    checker = CallChecker(C, keys.verifiers, clock=lambda: 1000.0)
    altered = status_call(keys)
    altered.request = pb.SessionRef(session_id="other").SerializeToString()
    with pytest.raises(RelayError, match=r"relayed by hospital-a .* forged or altered") as caught:
        checker.check(altered, A)
    assert caught.value.offender == A
    # The relay signs a call with its own key but claims it comes from the operator:
    forged = sign_call(
        OPS,
        C,
        "Start",
        pb.StartRequest(session_id="s1"),
        keys.signer(A),
        now=1000.0,
        nonce=b"f" * 32,
    )
    with pytest.raises(RelayError, match="as from 'ops' does not verify"):
        checker.check(forged, A)


def test_a_replayed_or_stale_call_is_refused_naming_the_relay(keys: Keys) -> None:
    now = [1000.0]
    checker = CallChecker(C, keys.verifiers, clock=lambda: now[0])
    call = status_call(keys)
    checker.check(call, A)
    with pytest.raises(RelayError, match="hospital-b relayed a Status call from ops a second time"):
        checker.check(call, B)
    now[0] = 1000.0 + 301
    with pytest.raises(RelayError, match="issued 301s ago"):
        checker.check(status_call(keys, nonce=b"m" * 32), A)
    wrong_target = sign_call(
        OPS, B, "Status", pb.SessionRef(), keys.signer(OPS), now=now[0], nonce=b"w" * 32
    )
    with pytest.raises(RelayError, match="for 'hospital-b'"):
        checker.check(wrong_target, A)


def test_an_answer_altered_by_the_relay_is_refused_naming_it(keys: Keys) -> None:
    call = status_call(keys)
    status = pb.SessionStatus(session_id="s1", state="running").SerializeToString()
    answer = sign_answer(C, call, grpc.StatusCode.OK, "", status, keys.signer(C))
    check_answer(call, answer, keys.verifiers, A)
    altered = pb.RelayedAnswer()
    altered.CopyFrom(answer)
    altered.response = pb.SessionStatus(session_id="s1", state="aborted").SerializeToString()
    with pytest.raises(RelayError, match="relayed by hospital-a does not verify") as caught:
        check_answer(call, altered, keys.verifiers, A)
    assert caught.value.offender == A
    # An old, genuine answer handed back for a new call is refused too.
    newer = status_call(keys, nonce=b"x" * 32)
    with pytest.raises(RelayError, match="hospital-a altered or forged"):
        check_answer(newer, answer, keys.verifiers, A)


# --------------------------------------------------------------------------- in-memory links


class MemoryControl:
    """The outbound-only peer's end of a Control stream, wired to a RelayHub in memory."""

    def __init__(self, hub: RelayHub, peer_id: str) -> None:
        self._answers: asyncio.Queue[pb.RelayedAnswer | None] = asyncio.Queue()
        self._calls = hub.control(peer_id, self._iterate())

    async def _iterate(self) -> AsyncIterator[pb.RelayedAnswer]:
        while (answer := await self._answers.get()) is not None:
            yield answer

    async def write(self, request: pb.RelayedAnswer) -> None:
        await self._answers.put(request)

    async def read(self) -> object:
        try:
            return await anext(self._calls)
        except StopAsyncIteration:
            return grpc.aio.EOF  # type: ignore[attr-defined]

    def cancel(self) -> bool:
        self._answers.put_nowait(None)
        return True


@dataclass
class MemoryStub:
    """What a caller or the outbound-only peer dials at a relay, in memory. ``tamper``
    changes what passes through (a malicious relay); ``drop`` swallows every call."""

    peer_id: str
    hub: RelayHub
    tamper_answer: Callable[[pb.RelayedAnswer], None] | None = None
    drop: bool = False
    refuse_control: bool = False

    async def relay(
        self, request: pb.RelayedCall, timeout: float | None = None
    ) -> pb.RelayedAnswer:
        if self.drop:
            await asyncio.sleep(timeout or 1.0)
            raise RelayRefused(grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.peer_id} timed out")
        answer = await self.hub.forward(OPS, request, timeout or 5.0)
        if self.tamper_answer is not None:
            answer = pb.RelayedAnswer.FromString(answer.SerializeToString())
            self.tamper_answer(answer)
        return answer

    def control(self) -> ControlCall:
        if self.drop:
            raise ConnectionError(f"{self.peer_id} is unreachable")
        if self.refuse_control:
            return RefusedControl()
        return MemoryControl(self.hub, C)


class RefusedControl:
    """A Control stream the relay refuses (as PeerService does for a peer it does not
    consider outbound-only): the first read fails."""

    async def write(self, request: pb.RelayedAnswer) -> None:
        pass

    async def read(self) -> object:
        raise rpc_error(grpc.StatusCode.PERMISSION_DENIED, "not an outbound-only peer")

    def cancel(self) -> bool:
        return True


@dataclass
class MemoryPool:
    stubs: dict[str, MemoryStub] = field(default_factory=dict)

    def dial(self, peer_id: str) -> MemoryStub:
        return self.stubs[peer_id]


def hub(keys: Keys, me: str, rate: float = 100.0, burst: int = 100) -> RelayHub:
    return RelayHub(me, lambda: keys.roster, RateLimiter(rate, burst))


async def echo(
    method: str, request: bytes, caller: PeerIdentity
) -> tuple[grpc.StatusCode, str, bytes]:
    """Stands for PeerService.relayed: says who asked what."""
    ref = pb.SessionRef.FromString(request)
    status = pb.SessionStatus(session_id=ref.session_id, detail=f"{caller.peer_id} asked {method}")
    return grpc.StatusCode.OK, "", status.SerializeToString()


def outbound_peer(keys: Keys, pool: MemoryPool, relays: list[str]) -> ControlClient:
    return ControlClient(
        me=C,
        relays=lambda: relays,
        pool=pool,  # type: ignore[arg-type]
        checker=CallChecker(C, keys.verifiers),
        identify=keys.identity,
        dispatch=echo,
        signer=keys.signer(C),
        retry_seconds=0.05,
    )


def operator_route(keys: Keys, pool: MemoryPool) -> RelayRoute:
    return RelayRoute(
        me=OPS,
        signer=keys.signer(OPS),
        verifiers=keys.verifiers,
        roster=lambda: keys.roster,
        pool=pool,  # type: ignore[arg-type]
    )


async def _with_outbound_peer(
    keys: Keys, relays: list[str], pool: MemoryPool, body: Callable[[ControlClient], Any]
) -> Any:
    stopping = asyncio.Event()
    client = outbound_peer(keys, pool, relays)
    task = asyncio.create_task(client.run(stopping))
    try:
        await asyncio.wait_for(client.connected.wait(), 5)
        return await body(client)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 5)


def test_a_call_reaches_the_outbound_only_peer_and_its_signed_answer_comes_back(keys: Keys) -> None:
    hub_a = hub(keys, A)
    pool = MemoryPool({A: MemoryStub(A, hub_a), B: MemoryStub(B, hub(keys, B))})

    async def body(client: ControlClient) -> None:
        assert client.connected_to == A
        assert hub_a.connected(C)
        status = await operator_route(keys, pool).stub(C).status("s1", timeout=5)
        assert status.detail == "ops asked Status"  # the caller is the call's signer

    asyncio.run(_with_outbound_peer(keys, [A, B], pool, body))


def test_an_altered_answer_is_refused_naming_the_relay(keys: Keys) -> None:
    def tamper(answer: pb.RelayedAnswer) -> None:
        answer.response = pb.SessionStatus(session_id="s1", state="aborted").SerializeToString()

    pool = MemoryPool(
        {A: MemoryStub(A, hub(keys, A), tamper_answer=tamper), B: MemoryStub(B, hub(keys, B))}
    )

    async def body(client: ControlClient) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            await operator_route(keys, pool).stub(C).status("s1", timeout=1.5)
        assert isinstance(caught.value, grpc.aio.AioRpcError)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "relayed by hospital-a does not verify" in (caught.value.details() or "")

    asyncio.run(_with_outbound_peer(keys, [A], pool, body))


def test_a_call_the_relay_alters_gets_no_answer_and_the_peer_names_the_relay(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    class AlteringHub(RelayHub):
        async def forward(
            self, caller: str, call: pb.RelayedCall, timeout: float
        ) -> pb.RelayedAnswer:
            call = pb.RelayedCall.FromString(call.SerializeToString())
            call.request = pb.SessionRef(session_id="another").SerializeToString()
            return await super().forward(caller, call, timeout)

    altering = AlteringHub(A, lambda: keys.roster, RateLimiter(100, 100))
    pool = MemoryPool({A: MemoryStub(A, altering), B: MemoryStub(B, hub(keys, B))})

    async def body(client: ControlClient) -> None:
        with pytest.raises(grpc.RpcError):
            await operator_route(keys, pool).stub(C).status("s1", timeout=1.0)

    with caplog.at_level(logging.WARNING, logger="peer.relay"):
        asyncio.run(_with_outbound_peer(keys, [A], pool, body))
    assert "relayed by hospital-a as from 'ops' does not verify" in caplog.text


def test_a_dropping_relay_is_passed_over_on_both_sides(keys: Keys) -> None:
    # A drops everything (dead, or malicious): the outbound-only peer connects to B instead,
    # and a caller that finds A silent reaches the peer through B.
    hub_b = hub(keys, B)
    pool = MemoryPool({A: MemoryStub(A, hub(keys, A), drop=True), B: MemoryStub(B, hub_b)})

    async def body(client: ControlClient) -> None:
        assert client.connected_to == B
        assert hub_b.connected(C)
        route = operator_route(keys, pool)
        status = await route.stub(C).status("s1", timeout=5)
        assert status.detail == "ops asked Status"
        assert route.relays_for(C)[0] == B  # remembered for the next call

    asyncio.run(_with_outbound_peer(keys, [A, B], pool, body))


def test_a_relay_relays_only_roster_outbound_peers_own_signed_calls_at_a_bounded_rate(
    keys: Keys,
) -> None:
    async def go() -> None:
        relay = hub(keys, A, rate=0.001, burst=1)
        # Not the caller's own call: a relay does not carry calls signed by someone else.
        with pytest.raises(
            RelayRefused, match="hospital-b asked to relay a call signed as 'ops'"
        ) as e:
            await relay.forward(B, status_call(keys), 1.0)
        assert e.value.code is grpc.StatusCode.PERMISSION_DENIED
        # C is not connected here: UNAVAILABLE (the caller tries another relay).
        with pytest.raises(RelayRefused, match="no control stream to hospital-a") as e:
            await relay.forward(OPS, status_call(keys), 1.0)
        assert e.value.code is grpc.StatusCode.UNAVAILABLE
        # Over the caller's rate (burst 1, spent above).
        with pytest.raises(RelayRefused, match="more than") as e:
            await relay.forward(OPS, status_call(keys), 1.0)
        assert e.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        # An inbound peer is never a relay target, nor holds a Control stream.
        to_b = sign_call(
            OPS, B, "Status", pb.SessionRef(), keys.signer(OPS), now=1.0, nonce=b"b" * 32
        )
        with pytest.raises(RelayRefused, match="'hospital-b' is not an outbound-only peer"):
            await hub(keys, A).forward(OPS, to_b, 1.0)
        with pytest.raises(RelayRefused, match="hospital-b is not an outbound-only peer"):
            relay.admit(keys.identity(B))
        relay.admit(keys.identity(C))

    asyncio.run(go())


def test_refused_calls_come_back_as_the_grpc_error_a_direct_call_gives(keys: Keys) -> None:
    async def refuse(
        method: str, request: bytes, caller: PeerIdentity
    ) -> tuple[grpc.StatusCode, str, bytes]:
        return grpc.StatusCode.PERMISSION_DENIED, f"{caller.peer_id} may not", b""

    pool = MemoryPool({A: MemoryStub(A, hub(keys, A))})

    async def go() -> None:
        stopping = asyncio.Event()
        client = outbound_peer(keys, pool, [A])
        client.dispatch = refuse
        task = asyncio.create_task(client.run(stopping))
        await asyncio.wait_for(client.connected.wait(), 5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await operator_route(keys, pool).stub(C).records("s1", timeout=5)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.details() == "ops may not"
        stopping.set()
        await task

    asyncio.run(go())


def test_kit_without_addresses_for_outbound_only_peers(tmp_path: Path) -> None:
    from peer.kit import LocalKit

    kit = LocalKit.create(tmp_path, [A, B, C], outbound_only=[C])
    roster = kit.federation.roster
    assert [e.peer_id for e in roster.peers if not e.inbound] == [C]


def test_the_operator_lists_the_rosters_outbound_only_participants(
    fed: LocalFederation, tmp_path: Path
) -> None:
    from peer.operator.federation import FederationFile, build_proposal

    member = fed.members[OPS]
    assert fed.roster_path is not None
    federation = FederationFile(
        tmp_path / "federation.toml",
        member.cert,
        member.key,
        member.ca,
        fed.roster_path,
        {"rounds": 1, "payload": {"kind": "vector", "length": 4}},
    )
    built = build_proposal(federation, fed.roster, "s2")
    assert built.outbound_only == (C,)
    assert outbound_problem(built, fed.roster) is None


def test_a_handler_that_fails_answers_internal_rather_than_leaving_the_caller_waiting(
    keys: Keys,
) -> None:
    async def broken(
        method: str, request: bytes, caller: PeerIdentity
    ) -> tuple[grpc.StatusCode, str, bytes]:
        raise RuntimeError("disk on fire")

    pool = MemoryPool({A: MemoryStub(A, hub(keys, A))})

    async def go() -> None:
        stopping = asyncio.Event()
        client = outbound_peer(keys, pool, [A])
        client.dispatch = broken
        task = asyncio.create_task(client.run(stopping))
        await asyncio.wait_for(client.connected.wait(), 5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await operator_route(keys, pool).stub(C).status("s1", timeout=5)
        assert caught.value.code() is grpc.StatusCode.INTERNAL
        # Its type and a reference, not its message (peer/published.py).
        details = caught.value.details() or ""
        assert details.startswith(f"{INTERNAL_ERROR}: RuntimeError at {C} (see its log, ref ")
        assert "disk on fire" not in details
        stopping.set()
        await task

    asyncio.run(go())


def test_a_call_from_a_revoked_or_unknown_member_is_refused(keys: Keys) -> None:
    trusted = {p: v for p, v in keys.verifiers.items() if p != OPS}  # ops revoked
    checker = CallChecker(C, trusted, clock=lambda: 1000.0)
    with pytest.raises(RelayError, match="'ops', who has no trusted key here"):
        checker.check(status_call(keys), A)


def test_a_relay_that_refuses_the_control_stream_is_not_counted_as_connected(keys: Keys) -> None:
    # Refused by its only relay, the peer is never "connected" and retries with back-off
    # (a few tries a second at first, not a hot loop); given a second relay, it uses it.
    refusing = MemoryStub(A, hub(keys, A), refuse_control=True)
    opened: list[float] = []
    original = refusing.control

    def counting() -> ControlCall:
        opened.append(0.0)
        return original()

    refusing.control = counting  # type: ignore[method-assign]

    async def go() -> None:
        stopping = asyncio.Event()
        client = outbound_peer(keys, MemoryPool({A: refusing}), [A])
        task = asyncio.create_task(client.run(stopping))
        await asyncio.sleep(1.0)
        assert not client.connected.is_set()
        stopping.set()
        await task

    asyncio.run(go())
    assert 2 <= len(opened) <= 20, len(opened)

    pool = MemoryPool(
        {A: MemoryStub(A, hub(keys, A), refuse_control=True), B: MemoryStub(B, hub(keys, B))}
    )

    async def body(client: ControlClient) -> None:
        assert client.connected_to == B

    asyncio.run(_with_outbound_peer(keys, [A, B], pool, body))
