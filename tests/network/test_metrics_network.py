"""A real peer process with a ``[metrics]`` table: its endpoint counts the session's rounds."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from network_harness import Network

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_peer_process_serves_round_metrics(tmp_path: Path) -> None:
    network = Network.create(tmp_path / "network", 3, start=False)
    try:
        port = _free_port()
        config = network.kit.kits["hospital-a"].config
        with config.open("a", encoding="utf-8") as file:
            file.write(f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
        for process in network.peers.values():
            process.start()
        statuses = network.run_session(network.proposal("s1", rounds=2))
        states = {getattr(s, "state", repr(s)) for s in statuses.values()}
        assert states == {"finished"}, network.logs()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        network.stop()
    assert 'peer_rounds_total{outcome="agreed"} 2.0' in text, text
    sent = [line for line in text.splitlines() if line.startswith("peer_bytes_sent_total ")]
    assert sent
    assert float(sent[0].split()[1]) > 0
    assert 'peer_round_seconds_count{outcome="agreed"} 2.0' in text
    # Every SecAgg stage this peer went through, once per round (both rounds agreed first try).
    for stage in ("advertise", "share", "masked", "consistency", "unmask", "verify", "agree"):
        assert f'peer_stage_seconds_count{{stage="{stage}"}} 2.0' in text, (stage, text)
    assert "peer_certificate_days_to_expiry " in text
    assert 'peer_epsilon_remaining{budget="max_epsilon"}' in text
