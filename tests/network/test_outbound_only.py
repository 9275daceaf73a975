"""A site that accepts no inbound connection (no address in the roster) takes part through
a relay (peer/relay.py): real peer processes on 127.0.0.1 with mTLS."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from network_harness import Network, fixed_beacon

from peer.channels import ChannelPool
from peer.identity import load_signer
from peer.operator import ProposalRefused
from peer.relay import RelayRoute
from peer.session import SessionProposal, aggregator_for
from peer.tls import TLSFiles
from peer.wire import peer_pb2 as pb

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    created = Network.create(tmp_path / "net", 3, outbound_only=["hospital-c"])
    yield created
    created.stop()


def test_an_outbound_only_peer_agrees_a_session_through_a_relay(network: Network) -> None:
    roster = network.kit.federation.roster
    assert roster["hospital-c"].address is None
    assert not roster["hospital-c"].inbound
    proposal = network.proposal("s1", rounds=3)
    assert proposal.outbound_only == ("hospital-c",)
    beacon = fixed_beacon(proposal)
    for round_ in (1, 2, 3):
        for attempt in range(4):  # never the aggregator, whatever the attempt
            assert aggregator_for(proposal, round_, attempt, beacon) != "hospital-c"
    # A proposer that narrows the rotation to an accomplice (hospital-a) by calling
    # hospital-b outbound-only is refused by every peer, hospital-c included (through its
    # relay), each naming the mismatch with its roster.
    narrowed = replace(proposal, session_id="narrowed", outbound_only=("hospital-b", "hospital-c"))
    with pytest.raises(ProposalRefused) as narrowing:
        asyncio.run(propose(network, narrowed))
    assert sorted(narrowing.value.answers) == sorted(network.peers)
    for reason in narrowing.value.answers.values():
        assert "outbound-only participants [hospital-b, hospital-c]" in reason
        assert "says [hospital-c]" in reason
    # The operator proposes, starts and follows hospital-c only through a relay.
    statuses = network.run_session(proposal, expect_all=True)
    states = {
        p: s.state if isinstance(s, pb.SessionStatus) else repr(s) for p, s in statuses.items()
    }
    assert set(states.values()) == {"finished"}, network.logs()
    expected = network.plain_sum(list(network.peers))
    reference = [r.record_hash for r in network.records("hospital-a", "s1")]
    assert len(reference) == 3
    for peer_id in network.peers:
        for round_ in (1, 2, 3):
            np.testing.assert_array_equal(network.aggregate_of(peer_id, "s1", round_), expected)
        assert [r.record_hash for r in network.records(peer_id, "s1")] == reference
        assert network.verify(peer_id) == []
    for stored in network.records("hospital-a", "s1"):
        assert "hospital-c" in stored.signatures  # it took part and signed every round
    log = network.peers["hospital-c"].log_path.read_text("utf-8")
    assert "control stream open to relay" in log
    # A member that is not the proposer asks, through its relay (hospital-a), to start the
    # session at hospital-c: the call is signed by hospital-b, so hospital-c's own Start
    # handler sees hospital-b as the caller and refuses it, exactly as a direct call.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(relayed_start_as(network, "hospital-b", "hospital-c", "s1"))
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "may start it; not hospital-b" in (refused.value.details() or "")


async def propose(network: Network, proposal: SessionProposal) -> None:
    operator = network.operator()
    try:
        await operator.propose(proposal)
    finally:
        await operator.close()


async def relayed_start_as(network: Network, me: str, target: str, session_id: str) -> None:
    member = network.kit.federation.members[me]
    roster = network.kit.federation.roster
    pool = ChannelPool(lambda: roster, TLSFiles(member.cert, member.key, member.ca))
    route = RelayRoute(
        me=me,
        signer=load_signer(member.key),
        verifiers=roster.verifiers(),
        roster=lambda: roster,
        pool=pool,
    )
    try:
        await route.stub(target).start(pb.StartRequest(session_id=session_id), timeout=10)
    finally:
        await pool.close()


@pytest.mark.slow
def test_the_relay_dies_mid_session_and_the_outbound_only_peer_fails_over(
    tmp_path: Path,
) -> None:
    # 4 peers, t = 3; hospital-d is outbound-only and keeps its control stream to the
    # victim first. The victim dies in round 1: the others finish without it, hospital-d
    # reconnects to its second relay, and the operator reaches it through that one.
    network = Network.create(tmp_path / "net", 4, outbound_only=["hospital-d"], start=False)
    try:
        proposal = network.proposal("s1", rounds=2)
        aggregators = {network.aggregator(proposal, r) for r in (1, 2)}
        victim = next(p for p in ("hospital-a", "hospital-b", "hospital-c") if p not in aggregators)
        other = sorted(aggregators)[0]
        config = network.kit.kits["hospital-d"].config
        config.write_text(
            config.read_text("utf-8") + f'\n[relay]\npeers = ["{victim}", "{other}"]\n', "utf-8"
        )
        for peer_id, process in network.peers.items():
            process.start({"HOSPITAL_SECAGG_KILL_AT": "1:masked"} if peer_id == victim else None)
        statuses = network.run_session(proposal)
        survivors = [p for p in network.peers if p != victim]
        assert not network.peers[victim].alive()
        assert {p: states_of(statuses)[p] for p in survivors} == dict.fromkeys(
            survivors, "finished"
        ), network.logs()
        reference = [r.record_hash for r in network.records(survivors[0], "s1")]
        assert len(reference) == 2
        for peer_id in survivors:
            assert [r.record_hash for r in network.records(peer_id, "s1")] == reference
            np.testing.assert_array_equal(
                network.aggregate_of(peer_id, "s1", 2), network.plain_sum(survivors)
            )
        log = network.peers["hospital-d"].log_path.read_text("utf-8")
        assert f"control stream open to relay {victim}" in log
        assert f"control stream to relay {victim} ended" in log
        assert f"control stream open to relay {other}" in log
    finally:
        network.stop()


def states_of(statuses: dict[str, pb.SessionStatus | Exception]) -> dict[str, str]:
    return {p: s.state if isinstance(s, pb.SessionStatus) else repr(s) for p, s in statuses.items()}
