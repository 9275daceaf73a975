"""Real peers as separate processes on 127.0.0.1 with mTLS: agreement, dropouts, crashes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from network_harness import Network

from peer.ledger import RoundStatus
from peer.wire import peer_pb2 as pb

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def make_network(tmp_path: Path) -> Iterator[Callable[..., Network]]:
    created: list[Network] = []

    def make(n: int, **kwargs: Any) -> Network:
        network = Network.create(tmp_path / f"network-{len(created)}", n, **kwargs)
        created.append(network)
        return network

    yield make
    for network in created:
        network.stop()


def states(statuses: dict[str, pb.SessionStatus | Exception]) -> dict[str, str]:
    return {p: s.state if isinstance(s, pb.SessionStatus) else repr(s) for p, s in statuses.items()}


def assert_identical_records(network: Network, peers: list[str], session: str, rounds: int) -> None:
    reference = [(r.record, r.record_hash) for r in network.records(peers[0], session)]
    assert [r.round for r, _ in reference] == list(range(1, rounds + 1))
    for peer_id in peers:
        mine = [(r.record, r.record_hash) for r in network.records(peer_id, session)]
        assert mine == reference, f"{peer_id} holds different agreed records"
        assert network.verify(peer_id) == []


@pytest.mark.parametrize("n", [3, pytest.param(5, marks=pytest.mark.slow)])
def test_peers_agree_on_the_plain_sum(make_network: Callable[..., Network], n: int) -> None:
    network = make_network(n)
    proposal = network.proposal("s1", rounds=2)
    statuses = network.run_session(proposal)
    assert set(states(statuses).values()) == {"finished"}, network.logs()
    expected = network.plain_sum(list(network.peers))
    for peer_id in network.peers:
        for round_ in (1, 2):
            np.testing.assert_array_equal(network.aggregate_of(peer_id, "s1", round_), expected)
    assert_identical_records(network, list(network.peers), "s1", 2)
    # every peer signed each record
    for stored in network.records("hospital-a", "s1"):
        assert sorted(stored.signatures) == sorted(network.peers)


def _non_aggregators(network: Network, proposal_rounds: int, session: str = "s1") -> list[str]:
    proposal = network.proposal(session, rounds=proposal_rounds)
    busy = {network.aggregator(proposal, r) for r in range(1, proposal_rounds + 1)}
    return [p for p in network.peers if p not in busy]


# A participant that dies before sending its masked input is left out of the sum (its
# pairwise masks are recovered); one that dies later is in the sum.
KILL_STAGES = {
    "advertise": False,
    "share": False,
    "masked": False,
    "consistency": True,
    "unmask": True,
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(KILL_STAGES))
def test_participant_killed_at_each_stage(make_network: Callable[..., Network], stage: str) -> None:
    # 4 peers, t = 3: one participant dying anywhere leaves enough to finish the round.
    network = make_network(4, start=False)
    proposal = network.proposal("s1", rounds=2)
    aggregators = {network.aggregator(proposal, r) for r in (1, 2)}
    victim = next(p for p in network.peers if p not in aggregators)
    for peer_id, process in network.peers.items():
        process.start({"HOSPITAL_SECAGG_KILL_AT": f"1:{stage}"} if peer_id == victim else None)
    statuses = network.run_session(proposal)
    survivors = [p for p in network.peers if p != victim]
    assert all(states(statuses)[p] == "finished" for p in survivors), network.logs()
    assert not network.peers[victim].alive()
    in_sum = list(network.peers) if KILL_STAGES[stage] else survivors
    for peer_id in survivors:
        np.testing.assert_array_equal(
            network.aggregate_of(peer_id, "s1", 1), network.plain_sum(in_sum)
        )
        np.testing.assert_array_equal(
            network.aggregate_of(peer_id, "s1", 2), network.plain_sum(survivors)
        )
    assert_identical_records(network, survivors, "s1", 2)


@pytest.mark.slow
def test_round_aborts_cleanly_and_next_round_proceeds(make_network: Callable[..., Network]) -> None:
    # t = 3 of 3: losing one peer at the masked stage makes round 1 impossible; it aborts,
    # nothing is agreed for that attempt, and round 1 is tried again under its number (rounds
    # are never skipped) once the peer is back, then round 2.
    network = make_network(3, start=False)
    proposal = network.proposal("s1", rounds=2, threshold=3)
    victim = next(p for p in network.peers if p != network.aggregator(proposal, 1))
    for peer_id, process in network.peers.items():
        process.start({"HOSPITAL_SECAGG_KILL_AT": "1:masked"} if peer_id == victim else None)

    import threading

    def restart_victim() -> None:
        network.peers[victim].wait_exit(timeout=60)
        network.peers[victim].start()

    restarter = threading.Thread(target=restart_victim)
    restarter.start()
    statuses = network.run_session(proposal, expect_all=True)
    restarter.join()
    assert set(states(statuses).values()) == {"finished"}, network.logs()
    for peer_id in network.peers:
        rounds = [r.record.round for r in network.records(peer_id, "s1")]
        assert rounds == [1, 2], f"{peer_id}: {rounds}\n{network.logs()}"
        for round_ in rounds:
            np.testing.assert_array_equal(
                network.aggregate_of(peer_id, "s1", round_), network.plain_sum(list(network.peers))
            )
        assert network.verify(peer_id) == []
    survivor = next(p for p in network.peers if p != victim)
    with network.ledger(survivor) as ledger:
        first = ledger.round_attempts("s1", 1)
    assert first[0].status is RoundStatus.ABORTED, first  # the attempt the kill spoilt


@pytest.mark.slow
def test_aggregator_killed_mid_round_is_replaced(make_network: Callable[..., Network]) -> None:
    network = make_network(4, start=False)
    proposal = network.proposal("s1", rounds=1)
    dead = network.aggregator(proposal, 1, attempt=0)
    replacement = network.aggregator(proposal, 1, attempt=1)
    assert dead != replacement
    for peer_id, process in network.peers.items():
        process.start(
            {"HOSPITAL_SECAGG_KILL_AT": "1:aggregator:masked"} if peer_id == dead else None
        )
    statuses = network.run_session(proposal)
    survivors = [p for p in network.peers if p != dead]
    assert all(states(statuses)[p] == "finished" for p in survivors), network.logs()
    for peer_id in survivors:
        records = network.records(peer_id, "s1")
        assert [r.record.round for r in records] == [1]
        assert records[0].record.metrics["aggregator"] == replacement
        np.testing.assert_array_equal(
            network.aggregate_of(peer_id, "s1", 1), network.plain_sum(survivors)
        )
    assert_identical_records(network, survivors, "s1", 1)


@pytest.mark.slow
def test_killed_peer_restarts_with_its_ledger_and_the_session_completes(
    make_network: Callable[..., Network],
) -> None:
    # 4 peers, t = 3: the others agree round 2 while the victim is down (with 3 peers the
    # safe threshold is 3 of 3, and nobody could agree without it).
    network = make_network(4, start=False)
    proposal = network.proposal("s1", rounds=3)
    victim = next(p for p in network.peers if p != network.aggregator(proposal, 2))
    for peer_id, process in network.peers.items():
        process.start({"HOSPITAL_SECAGG_KILL_AT": "2:sign"} if peer_id == victim else None)

    import threading

    def restart_victim() -> None:
        network.peers[victim].wait_exit(timeout=60)
        assert network.verify(victim) == []  # intact after kill -9
        network.peers[victim].start()

    restarter = threading.Thread(target=restart_victim)
    restarter.start()
    statuses = network.run_session(proposal, expect_all=True)
    restarter.join()
    assert set(states(statuses).values()) == {"finished"}, network.logs()
    assert_identical_records(network, list(network.peers), "s1", 3)


def test_tampered_transcript_is_not_agreed(make_network: Callable[..., Network]) -> None:
    network = make_network(3, start=False)
    proposal = network.proposal("s1", rounds=1)
    liar = network.aggregator(proposal, 1)
    for peer_id, process in network.peers.items():
        process.start({"HOSPITAL_SECAGG_TAMPER_TRANSCRIPT": "1"} if peer_id == liar else None)
    network.run_session(proposal)
    # The liar's result is agreed by nobody; round 1 is tried again by the next aggregator.
    for peer_id in network.peers:
        records = network.records(peer_id, "s1")
        assert [r.record.round for r in records] == [1], network.logs()
        assert records[0].record.metrics["aggregator"] != liar
    honest = next(p for p in network.peers if p != liar)
    log = network.peers[honest].log_path.read_text(encoding="utf-8")
    assert "the aggregate is not the sum of the signed masked inputs" in log


def test_cleartext_sessions_are_refused_unless_policy_allows(
    make_network: Callable[..., Network],
) -> None:
    import asyncio

    from peer.operator import ProposalRefused

    network = make_network(3)
    proposal = network.proposal("clear", rounds=1, aggregation="cleartext")

    async def propose() -> None:
        operator = network.operator()
        try:
            await operator.propose(proposal)
        finally:
            await operator.close()

    with pytest.raises(ProposalRefused, match="does not allow it") as refused:
        asyncio.run(propose())
    assert set(refused.value.answers) == set(network.peers)


def test_cleartext_baseline_sums_when_allowed(make_network: Callable[..., Network]) -> None:
    network = make_network(3, policy={"allow_cleartext": True})
    proposal = network.proposal("clear", rounds=1, aggregation="cleartext")
    statuses = network.run_session(proposal)
    assert set(states(statuses).values()) == {"finished"}, network.logs()
    expected = network.plain_sum(list(network.peers))
    for peer_id in network.peers:
        np.testing.assert_array_equal(network.aggregate_of(peer_id, "clear", 1), expected)


def test_paillier_session_sums_through_the_same_peers(make_network: Callable[..., Network]) -> None:
    # Small keys keep the test fast; the peers' policy must explicitly accept them.
    network = make_network(3, length=64, policy={"min_paillier_key_bits": 1024})
    proposal = network.proposal("ph", rounds=2, aggregation="paillier", paillier_key_bits=1024)
    statuses = network.run_session(proposal)
    assert set(states(statuses).values()) == {"finished"}, network.logs()
    expected = network.plain_sum(list(network.peers))
    for peer_id in network.peers:
        for round_ in (1, 2):
            np.testing.assert_array_equal(network.aggregate_of(peer_id, "ph", round_), expected)
    assert_identical_records(network, list(network.peers), "ph", 2)


def test_paillier_keys_below_the_local_minimum_are_refused(
    make_network: Callable[..., Network],
) -> None:
    import asyncio

    from peer.operator import ProposalRefused

    network = make_network(3, length=8)
    proposal = network.proposal("ph", rounds=1, aggregation="paillier", paillier_key_bits=512)

    async def propose() -> None:
        operator = network.operator()
        try:
            await operator.propose(proposal)
        finally:
            await operator.close()

    with pytest.raises(ProposalRefused, match="below this institution's minimum of 2048"):
        asyncio.run(propose())
