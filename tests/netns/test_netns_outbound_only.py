"""An outbound-only site in its own network namespace whose link drops every inbound
connection: it agrees a session through a relay (peer/relay.py).

Skipped without root or network namespaces, unless CI is set (then it fails instead).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from netns_harness import PEER_PORT, NetnsFederation, netns_unavailable_reason

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

OUTBOUND = "hospital-c"


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[NetnsFederation]:
    reason = netns_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"network namespace tests must run in CI, but: {reason}")
        pytest.skip(reason)
    created = NetnsFederation.create(tmp_path / "federation", 3, outbound_only=[OUTBOUND])
    yield created
    created.close()


def connects(fed: NetnsFederation, from_netns: str, address: str) -> bool:
    """Whether a TCP connection from ``from_netns`` to ``address``:PEER_PORT opens in 3 s."""
    probe = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({address!r}, {PEER_PORT}), timeout=3).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    result = subprocess.run(
        ["ip", "netns", "exec", from_netns, sys.executable, "-c", probe], check=False, timeout=30
    )
    return result.returncode == 0


def test_an_outbound_only_site_behind_a_firewall_agrees_a_session(fed: NetnsFederation) -> None:
    c = fed.peers[OUTBOUND]
    # The firewall: nobody can open a connection to hospital-c, though it listens; the
    # others accept connections as usual.
    assert not connects(fed, fed.operator_netns, c.address)
    assert not connects(fed, fed.peers["hospital-a"].netns, c.address)
    assert connects(fed, fed.operator_netns, fed.peers["hospital-a"].address)
    assert fed.links.stats.firewalled > 0
    assert fed.kit.federation.roster[OUTBOUND].address is None

    proposal = fed.proposal("s1", rounds=2)
    assert proposal.outbound_only == (OUTBOUND,)
    started = time.monotonic()
    states = fed.run_session(proposal, require_all=True, rpc_timeout=10.0)
    seconds = time.monotonic() - started
    assert set(states.values()) == {"finished"}, f"{states}\n{fed.logs()}"
    expected = fed.plain_sum(list(fed.peers))
    reference = [r.record_hash for r in fed.records("hospital-a", "s1")]
    assert len(reference) == 2
    for peer_id in fed.peers:
        assert [r.record_hash for r in fed.records(peer_id, "s1")] == reference
        for round_ in (1, 2):
            np.testing.assert_array_equal(fed.aggregate_of(peer_id, "s1", round_), expected)
        assert fed.verify(peer_id) == []
    for stored in fed.records(OUTBOUND, "s1"):
        assert OUTBOUND in stored.signatures
    assert "control stream open to relay" in c.log()
    print(
        f"\nNETNS-REPORT scenario=outbound-only rounds=2 agreed={len(reference)} "
        f"seconds={seconds:.1f} links={fed.links.stats}"
    )
