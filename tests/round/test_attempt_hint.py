"""Which attempt of a round a peer tries next (peer/attempts.py ``next_attempt``).

The others' Status answers only choose the attempt; they never move the round. These tests
pin what a peer that fell behind, restarted, or meets a liar does.
"""

from __future__ import annotations

import pytest

from peer.attempts import next_attempt
from peer.session import SessionProposal, aggregator_for
from peer.session_state import SessionState
from peer.wire import peer_pb2 as pb

PEERS = tuple(f"hospital-{c}" for c in "abcde")
BEACON = b"\x07" * 32
ROUND = 3


@pytest.fixture
def proposal() -> SessionProposal:
    return SessionProposal(
        "hint",
        participants=PEERS,
        rounds=5,
        threshold=4,
        payload={"kind": "vector", "length": 8},
    )


def _at(proposal: SessionProposal, attempt: int) -> pb.SessionStatus:
    """A peer running ``attempt`` of ROUND, as its Status says it."""
    return pb.SessionStatus(
        session_id=proposal.session_id,
        state=SessionState.RUNNING,
        current_round=ROUND,
        current_aggregator=aggregator_for(proposal, ROUND, attempt, BEACON),
        current_attempt=attempt,
    )


def _views(*statuses: pb.SessionStatus) -> list[tuple[str, pb.SessionStatus]]:
    return [(PEERS[i + 1], status) for i, status in enumerate(statuses)]


def test_others_behind_do_not_send_a_peer_n_attempts_ahead(proposal: SessionProposal) -> None:
    # The partial-agreement soak: a restarted peer failed attempt 1 while the others had just
    # entered the round (attempt 0). The aggregator of attempt 0 is also that of attempt 5;
    # guessing from the aggregator alone sent the peer to 5, where nobody came in time.
    views = _views(*(_at(proposal, 0) for _ in range(4)))
    assert aggregator_for(proposal, ROUND, 0, BEACON) == aggregator_for(proposal, ROUND, 5, BEACON)
    assert next_attempt(proposal, BEACON, ROUND, 1, views) == 2


def test_a_peer_behind_joins_the_attempt_the_others_run(proposal: SessionProposal) -> None:
    views = _views(*(_at(proposal, 3) for _ in range(4)))
    assert next_attempt(proposal, BEACON, ROUND, -1, views) == 3
    assert next_attempt(proposal, BEACON, ROUND, 0, views) == 3
    # Already past it: it cannot go back (its vote statement forbids it).
    assert next_attempt(proposal, BEACON, ROUND, 4, views) == 5


def test_a_restarted_peer_starts_at_its_stated_attempt(proposal: SessionProposal) -> None:
    # It stated its vote for attempt 2, then restarted: attempts 0 and 1 are over for it.
    assert next_attempt(proposal, BEACON, ROUND, -1, [], stated=2) == 2
    assert next_attempt(proposal, BEACON, ROUND, 2, [], stated=2) == 3
    # The others ran further meanwhile: it joins them.
    views = _views(*(_at(proposal, 4) for _ in range(3)))
    assert next_attempt(proposal, BEACON, ROUND, -1, views, stated=2) == 4


def test_a_minority_of_liars_cannot_steer_the_attempt(proposal: SessionProposal) -> None:
    # Two of four answer "attempt 9"; the two honest peers have not started the round.
    liars = [_at(proposal, 9), _at(proposal, 9)]
    idle = [pb.SessionStatus(session_id=proposal.session_id, state=SessionState.ACCEPTED)] * 2
    assert next_attempt(proposal, BEACON, ROUND, 0, _views(*liars, *idle)) == 1


def test_an_attempt_that_does_not_match_its_aggregator_is_not_believed(
    proposal: SessionProposal,
) -> None:
    # Three answer aggregator-of-attempt-1 but claim attempt 7 (whose aggregator differs):
    # the claimed number is ignored, the aggregator alone guides (as for a peer of an older
    # version, whose answers carry no attempt).
    lying = pb.SessionStatus()
    lying.CopyFrom(_at(proposal, 1))
    lying.current_attempt = 7
    assert aggregator_for(proposal, ROUND, 7, BEACON) != lying.current_aggregator
    assert next_attempt(proposal, BEACON, ROUND, -1, _views(lying, lying, lying)) == 1
