"""A site that accepts no inbound connection (no address in the roster) takes part through
a relay (peer/relay.py): real peer processes on 127.0.0.1 with mTLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from network_harness import Network, fixed_beacon

from peer.session import aggregator_for
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
