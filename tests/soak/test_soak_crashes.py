"""Soak: 5 real peers, 20 rounds, a random peer SIGKILLed in about a third of them.

The schedule comes from a seeded ``random.Random`` (``HOSPITAL_SOAK_SEED`` overrides the
seed) and is printed, with what the crasher actually did, so a failure can be replayed.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import pytest
from soak_harness import Crasher, Network, consistency_problems, kill_schedule

PEERS = 6
ROUNDS = 20
THRESHOLD = 4  # > (6 + 1)/2 (the aggregator may collude); 2 peers may be down
STAGE_SECONDS = 3.0
SEED = int(os.environ.get("HOSPITAL_SOAK_SEED", "20240611"))

pytestmark = pytest.mark.timeout(420)


@pytest.mark.slow
def test_random_crashes_lose_no_round(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tests.soak")
    network = Network.create(tmp_path / "soak", PEERS, length=1000, stage_seconds=STAGE_SECONDS)
    schedule = kill_schedule(random.Random(SEED), list(network.peers), ROUNDS, max_delay=1.0)
    print(f"seed={SEED} schedule:")
    for kill in schedule:
        print(f"  {kill}")
    proposal = network.proposal(
        "soak",
        rounds=ROUNDS,
        threshold=THRESHOLD,
        stage_seconds=STAGE_SECONDS,
        prepare_seconds=STAGE_SECONDS,
    )
    crasher = Crasher(network, "soak", schedule, max_down=PEERS - THRESHOLD)
    try:
        crasher.start()
        try:
            statuses = network.run_session(proposal, timeout=300.0, expect_all=True)
        finally:
            crasher.stop()
        print("crashes carried out:")
        for event in crasher.events:
            print(f"  {event}")
        states = {p: getattr(s, "state", repr(s)) for p, s in statuses.items()}
        assert set(states.values()) == {"finished"}, f"{states}\n{network.logs()}"
    finally:
        network.stop()
    assert sum(e.killed for e in crasher.events) >= len(schedule) // 2, crasher.events
    problems = consistency_problems(network, "soak", ROUNDS)
    agreed = [r.record.round for r in network.records("hospital-a", "soak")]
    print(f"agreed rounds ({len(agreed)}/{ROUNDS}): {agreed}")
    assert problems == [], "\n".join(problems) + "\n" + network.logs()
