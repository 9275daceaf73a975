"""Every RPC of a real peer process fed random and mutated bytes over gRPC + mTLS, and round
streams that abuse the size limits: the peer answers a clear status, names the caller in its
log, never hangs, keeps its memory bounded, and still completes the round with honest peers.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from peer.beacon import commit, commitment_signed_bytes
from peer.identity import load_signer
from peer.ledger import session_genesis
from peer.session import SessionProposal, SignedProposal
from peer.tls import TLSFiles, peer_channel
from peer.wire import peer_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
from network_harness import (  # type: ignore[import-not-found, unused-ignore]
    Network,
    fixed_beacon,
    fixed_nonce,
)

pytestmark = pytest.mark.timeout(300)

SERVICE = "/hospital_secagg.v1.Peer/"
# Five running peers of eight: a quorum of the roster (floor((8 + 1)/2) + 1 = 5, the
# aggregator counted as a possible colluder) can finish a round without the three abusers.
RUNNING = ("hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e")
ABUSERS = ("hospital-f", "hospital-g", "hospital-h")  # callers only
CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # beyond a per-caller rate limit (proposals, reads)
}


def _identity(b: bytes) -> bytes:
    return b


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    net = Network.create(tmp_path_factory.mktemp("rpc"), 8, length=200, start=False)
    with ThreadPoolExecutor(len(RUNNING)) as pool:
        for future in [pool.submit(net.peers[p].start) for p in RUNNING]:
            future.result()
    yield net
    for peer in RUNNING:
        net.peers[peer].kill()


def _files(network: Network, member: str) -> TLSFiles:
    m = network.kit.federation.members[member]
    return TLSFiles.of(m.cert, m.key, m.ca)


def _channel(network: Network, target: str, member: str) -> grpc.aio.Channel:
    return peer_channel(network.kit.federation.roster, target, _files(network, member))


def _rss_kib(network: Network, peer: str) -> int:
    process = network.peers[peer].process
    assert process is not None
    pid = process.pid
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _mutations(raw: bytes, rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            how = rng.choice(["flip", "insert", "delete", "truncate"])
            i = rng.randrange(len(data)) if data else 0
            if how == "flip" and data:
                data[i] ^= rng.randint(1, 255)
            elif how == "insert":
                data[i:i] = rng.randbytes(rng.randint(1, 6))
            elif how == "delete":
                del data[i : i + rng.randint(1, 6)]
            else:
                del data[i:]
        out.append(bytes(data))
    return out


async def _unary(channel: grpc.aio.Channel, method: str, raw: bytes) -> grpc.StatusCode:
    call = channel.unary_unary(
        SERVICE + method, request_serializer=_identity, response_deserializer=_identity
    )
    try:
        await call(raw, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _stream(channel: grpc.aio.Channel, first: bytes) -> grpc.StatusCode:
    call = channel.stream_stream(
        SERVICE + "RoundStream", request_serializer=_identity, response_deserializer=_identity
    )(timeout=10)  # type: ignore[call-arg]  # stubs predate grpc.aio
    try:
        await call.write(first)
        await call.done_writing()
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_every_rpc_answers_random_and_mutated_bytes_with_a_clear_status(network: Network) -> None:
    rng = random.Random(20240611)
    caller = "hospital-f"
    proposal = network.proposal("fuzz", rounds=1)
    signed = SignedProposal.sign(
        proposal, caller, load_signer(network.kit.federation.members[caller].key)
    )
    valid = {
        "Propose": pb.SessionProposal(
            document=proposal.document(), proposer=caller, signature=signed.signature
        ).SerializeToString(),
        "Start": pb.StartRequest(session_id="fuzz").SerializeToString(),
        "Status": pb.SessionRef(session_id="fuzz").SerializeToString(),
        "Records": pb.SessionRef(session_id="fuzz").SerializeToString(),
    }
    hello = pb.RoundHello(session_id="fuzz", round=1, peer_id=caller).SerializeToString()
    stream_valid = pb.Fragment(kind="RoundHello", total_size=len(hello), last=True, data=hello)

    async def run() -> dict[str, list[grpc.StatusCode]]:
        channel = _channel(network, "hospital-a", caller)
        codes: dict[str, list[grpc.StatusCode]] = {}
        try:
            for method, raw in valid.items():
                requests = [rng.randbytes(rng.randint(0, 200)) for _ in range(40)]
                requests += _mutations(raw, rng, 40)
                codes[method] = [await _unary(channel, method, r) for r in requests]
            requests = [rng.randbytes(rng.randint(0, 200)) for _ in range(30)]
            requests += _mutations(stream_valid.SerializeToString(), rng, 30)
            requests += [
                pb.Fragment(
                    kind="RoundHello", total_size=len(m), last=True, data=m
                ).SerializeToString()
                for m in _mutations(hello, rng, 30)
            ]
            codes["RoundStream"] = [await _stream(channel, r) for r in requests]
        finally:
            await channel.close(None)
        return codes

    started = time.monotonic()
    codes = asyncio.run(run())
    elapsed = time.monotonic() - started
    for method, answers in codes.items():
        unclear = sorted({c.name for c in answers} - {c.name for c in CLEAR})
        assert not unclear, f"{method} answered {unclear}"
        assert grpc.StatusCode.INVALID_ARGUMENT in answers, method  # some bytes did not parse
    assert sum(len(a) for a in codes.values()) == 410
    assert elapsed < 120, "some calls waited for their deadline"
    assert network.peers["hospital-a"].alive()
    log = network.peers["hospital-a"].log_path.read_text(encoding="utf-8")
    assert "Traceback" not in log
    assert "refused a malformed SessionProposal from hospital-f" in log
    assert "refused a malformed SessionRef from hospital-f" in log
    assert "round stream from hospital-f refused: Fragment does not parse" in log


def _hello(session: SessionProposal, peer: str) -> bytes:
    head = session_genesis(hashlib.sha256(session.document().encode("utf-8")).digest())
    hello = pb.RoundHello(
        session_id=session.session_id, round=1, attempt=0, peer_id=peer, chain_head=head
    ).SerializeToString()
    return pb.Fragment(
        kind="RoundHello", total_size=len(hello), last=True, data=hello
    ).SerializeToString()


async def _abuse(
    channel: grpc.aio.Channel, hello: bytes, then: list[pb.Fragment] | None, forever: bool
) -> tuple[str, int, float]:
    """Join, then misbehave; (the Abort reason or how the stream ended, bytes sent, seconds)."""
    call: Any = channel.stream_stream(
        SERVICE + "RoundStream", request_serializer=_identity, response_deserializer=_identity
    )(timeout=60)  # type: ignore[call-arg]  # stubs predate grpc.aio
    started = time.monotonic()
    sent = 0
    await call.write(hello)

    async def writer() -> None:
        nonlocal sent
        chunk = pb.Fragment(kind="MaskedInput", total_size=1 << 20, last=False, data=b"\0" * 65536)
        for fragment in then or []:
            await call.write(fragment.SerializeToString())
        while forever:
            await call.write(chunk.SerializeToString())
            sent += len(chunk.data)

    task = asyncio.create_task(writer())
    outcome = "stream ended"
    try:
        async for raw in call:
            fragment = pb.Fragment.FromString(raw)
            if fragment.kind == "Abort":
                outcome = "Abort: " + pb.Abort.FromString(fragment.data).reason
    except grpc.aio.AioRpcError as error:
        outcome = f"{error.code().name}: {error.details()}"
    task.cancel()
    return outcome, sent, time.monotonic() - started


def test_oversized_endless_and_silent_streams_are_cut_off_and_the_round_completes(
    network: Network,
) -> None:
    ids = tuple(network.peers)
    candidates = (
        SessionProposal(
            f"limits-{i}",
            ids,
            rounds=1,
            threshold=5,  # 8 peers, the aggregator may collude: t > (8 + 1)/2
            payload={"kind": "vector", "length": 200},
            stage_seconds=4.0,
            prepare_seconds=8.0,
        )
        for i in range(100)
    )
    # The harness fixes every beacon nonce (the abusers' too, below), so the aggregator is
    # known in advance: one of the running peers.
    session = next(c for c in candidates if network.aggregator(c, 1, 0) in RUNNING)
    aggregator = network.aggregator(session, 1, 0)
    operator = network.kit.operator
    signer = load_signer(network.kit.federation.members[operator].key)
    signed = SignedProposal.sign(session, operator, signer)
    request = pb.SessionProposal(
        document=session.document(), proposer=operator, signature=signed.signature
    ).SerializeToString()
    rss_before = _rss_kib(network, aggregator)

    # The abusers are participants that run no peer: the test commits to their beacon
    # nonces for them (with their keys), as their peers would.
    def commitment(peer: str) -> pb.BeaconCommitment:
        value = commit(session.digest, peer, fixed_nonce(peer))
        key = load_signer(network.kit.federation.members[peer].key)
        return pb.BeaconCommitment(
            peer_id=peer,
            commitment=value,
            signature=key.sign(commitment_signed_bytes(session.digest, peer, value)),
        )

    async def start(ops: dict[str, grpc.aio.Channel]) -> None:
        sid = session.session_id
        calls = {
            p: ops[p].unary_unary(
                SERVICE + "Start",
                request_serializer=pb.StartRequest.SerializeToString,
                response_deserializer=pb.StartAnswer.FromString,
            )
            for p in RUNNING
        }
        own = [(await calls[p](pb.StartRequest(session_id=sid))).commitment for p in RUNNING]
        commitments = own + [commitment(p) for p in ABUSERS]
        for p in RUNNING:
            await calls[p](pb.StartRequest(session_id=sid, commitments=commitments))
        reveals = [pb.BeaconReveal(peer_id=p, nonce=fixed_nonce(p)) for p in ids]
        for p in RUNNING:
            answer = await calls[p](pb.StartRequest(session_id=sid, reveals=reveals))
            assert answer.beacon == fixed_beacon(session)

    async def run() -> list[tuple[str, int, float]]:
        ops = {p: _channel(network, p, operator) for p in RUNNING}
        for p in RUNNING:
            assert await _unary(ops[p], "Propose", request) is grpc.StatusCode.OK
        await start(ops)
        abusers = {p: _channel(network, aggregator, p) for p in ABUSERS}
        huge = pb.Fragment(kind="MaskedInput", total_size=10**12, last=False, data=b"")
        outcomes = await asyncio.gather(
            _abuse(abusers[ABUSERS[0]], _hello(session, ABUSERS[0]), [huge], False),
            _abuse(abusers[ABUSERS[1]], _hello(session, ABUSERS[1]), None, True),
            _abuse(abusers[ABUSERS[2]], _hello(session, ABUSERS[2]), None, False),
        )
        for channel in (*ops.values(), *abusers.values()):
            await channel.close(None)
        return list(outcomes)

    (huge, _, _), (endless, endless_sent, _), (silent, _, silent_seconds) = asyncio.run(run())
    assert "exceeds the limit" in huge, huge
    # The server ends the call while this client still writes: grpc may then report the
    # end as INTERNAL instead of delivering the Abort. The aggregator's log has the reason.
    assert "exceed the announced size" in endless or endless.startswith("INTERNAL"), endless
    # Cut off after its announced 1 MiB; what the client could still write is gRPC's flow
    # control window, which the server does not buffer for the round.
    assert endless_sent < 16 << 20, "the endless stream was not cut off"
    assert silent_seconds < 40, silent  # closed when the round ended, not by its own deadline
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records = {p: network.records(p, session.session_id) for p in RUNNING}
        if all(records.values()):
            break
        time.sleep(1)
    for peer, stored in records.items():
        assert [r.record.round for r in stored] == [1], (peer, network.logs())
        survivors = stored[0].record.metrics["survivors"]
        assert isinstance(survivors, list)
        assert sorted(str(s) for s in survivors) == list(RUNNING)
    rss_after = _rss_kib(network, aggregator)
    log = network.peers[aggregator].log_path.read_text(encoding="utf-8")
    assert f"participant={ABUSERS[0]} sent an invalid message: MaskedInput of 10" in log
    assert (
        f"participant={ABUSERS[1]} sent an invalid message: fragments exceed the announced size"
        in log
    )
    assert rss_after - rss_before < 100 * 1024, (rss_before, rss_after)
    print(f"aggregator VmRSS {rss_before} KiB before, {rss_after} KiB after")
