"""The session runner's resilience (peer/runner.py): a dead aggregator costs about one stage,
not the joining window; an unexpected exception fails one attempt, not the session.

Two layers: :class:`~peer.attempts.JoinWindow` (when a participant stops dialling) on an
injected clock, and real :class:`~peer.node.PeerNode` objects in this process, on loopback
with mTLS (the kits of ``tests/network/network_harness.py``), for the runner itself.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from peer.attempts import (
    INTERNAL_ERROR,
    SAME_ERROR_ATTEMPTS,
    UNREACHABLE_FLOOR_SECONDS,
    JoinWindow,
)
from peer.beacon import FixedNonce
from peer.config import PeerConfig, load_config
from peer.ledger import Ledger
from peer.node import PeerNode
from peer.payloads import LocalContribution, Payload, PayloadFactory, RoundResult, default_payload
from peer.payloads.vector import VectorPayload
from peer.round import RoundOutcome, RoundStatusKind
from peer.runner import Session
from peer.session import SessionProposal, aggregator_for
from peer.session_state import SessionState
from peer.wire import peer_pb2 as pb
from secagg.ring import WordArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
from network_harness import Network, fixed_beacon, fixed_nonce, serving_in_process  # type: ignore[import-not-found, unused-ignore]

T = TypeVar("T")
FAILED = RoundStatusKind.AGGREGATOR_FAILED


def _unreachable() -> RoundOutcome:
    return RoundOutcome(FAILED, "hospital-b", "connection refused", unreachable=True)


def _not_ready() -> RoundOutcome:
    return RoundOutcome(
        FAILED, "hospital-b", "not running here", precondition=pb.PRECONDITION_NOT_READY
    )


# ------------------------------------------------------------------ when to stop dialling


def test_an_unreachable_aggregator_is_given_up_after_one_stage_not_the_joining_window() -> None:
    window = JoinWindow.opening(100.0, prepare_seconds=60.0, stage_seconds=5.0)
    assert window.unreachable_limit == 5.0
    # The first refusal comes after training (20 s in): the limit counts from it.
    assert window.retry(_unreachable(), 120.0)
    assert window.retry(_unreachable(), 124.9)
    assert not window.retry(_unreachable(), 125.0)  # 5 s of refusals, 40 s of window left


def test_an_answer_resets_the_unreachable_count() -> None:
    window = JoinWindow.opening(0.0, prepare_seconds=60.0, stage_seconds=5.0)
    assert window.retry(_unreachable(), 1.0)
    assert window.retry(_not_ready(), 5.5)  # it answers: there, only not ready
    assert window.retry(_unreachable(), 7.0)  # refused again (restarting): counted anew
    assert window.retry(_unreachable(), 11.9)
    assert not window.retry(_unreachable(), 12.0)


def test_a_not_ready_aggregator_is_waited_on_for_the_whole_joining_window() -> None:
    window = JoinWindow.opening(0.0, prepare_seconds=60.0, stage_seconds=5.0)
    assert window.retry(_not_ready(), 1.0)
    assert window.retry(_not_ready(), 64.9)  # far past one stage
    assert not window.retry(_not_ready(), 65.0)
    # The joining window bounds unreachability too.
    late = JoinWindow.opening(0.0, prepare_seconds=1.0, stage_seconds=5.0)
    assert late.retry(_unreachable(), 4.0)
    assert not late.retry(_unreachable(), 6.0)


def test_a_short_stage_still_rides_out_the_reconnect_back_off() -> None:
    # With a 0.5 s stage, one refusal and a 0.5 s pause would end the attempt before the
    # channel dials again; a server that opens a moment late must still be reached.
    window = JoinWindow.opening(0.0, prepare_seconds=10.0, stage_seconds=0.5)
    assert window.unreachable_limit == UNREACHABLE_FLOOR_SECONDS
    assert window.retry(_unreachable(), 1.0)
    assert window.retry(_unreachable(), 1.0 + UNREACHABLE_FLOOR_SECONDS - 0.1)
    assert not window.retry(_unreachable(), 1.0 + UNREACHABLE_FLOOR_SECONDS)


@pytest.mark.parametrize(
    "outcome",
    [
        RoundOutcome(RoundStatusKind.ABORTED, "hospital-b", "too few"),
        RoundOutcome(RoundStatusKind.REFUSED, "hospital-b", "bad transcript"),
        RoundOutcome(FAILED, "hospital-b", "silent for 2.0s in stage share"),
        RoundOutcome(FAILED, "hospital-b", "claims", precondition=pb.PRECONDITION_ROUND_PASSED),
    ],
)
def test_other_outcomes_end_the_attempt_at_once(outcome: RoundOutcome) -> None:
    assert not JoinWindow.opening(0.0, 60.0, 5.0).retry(outcome, 1.0)


# ------------------------------------------------------------------ the runner, in process


def _node(network: Network, peer: str, factory: PayloadFactory = default_payload) -> PeerNode:
    # The harness's fixed beacon nonces: a test knows who aggregates each attempt.
    return PeerNode(
        load_config(network.kit.kits[peer].config),
        payload_factory=factory,
        nonce_rng=FixedNonce(fixed_nonce(peer)),
    )


def _record_session(ledger: Ledger, proposal: SessionProposal) -> None:
    ledger.record_proposal(
        proposal.session_id,
        proposal.document(),
        proposer="op",
        participants=proposal.participants,
        threshold=proposal.threshold,
        rounds_planned=proposal.rounds,
    )
    ledger.decide_session(proposal.session_id, accept=True)


async def _one_round_from_a(
    node: PeerNode, proposal: SessionProposal, aggregator: str
) -> tuple[RoundOutcome, float]:
    _record_session(node.ledger, proposal)
    session = Session(proposal, fixed_beacon(proposal))
    node.runner.sessions[proposal.session_id] = session
    started = time.monotonic()
    outcome = await node.runner.one_round(session, VectorPayload(8), 1, 0, aggregator)
    return outcome, time.monotonic() - started


@pytest.mark.timeout(60)
def test_a_round_whose_aggregator_refuses_connections_ends_within_about_a_stage(
    tmp_path: Path,
) -> None:
    # hospital-b is in the roster at a port nobody listens on (the kit bound it, then let it
    # go): every dial is refused. Before, hospital-a dialled it for prepare + stage (21 s).
    network = Network.create(tmp_path, 3, length=8, start=False)
    proposal = network.proposal("dead", rounds=1, stage_seconds=1.0, prepare_seconds=20.0)
    node = _node(network, "hospital-a")

    async def body() -> tuple[RoundOutcome, float]:
        try:
            return await _one_round_from_a(node, proposal, "hospital-b")
        finally:
            await node.pool.close()  # its channels belong to this event loop

    try:
        outcome, elapsed = asyncio.run(body())
        (attempt,) = node.ledger.round_attempts("dead")
    finally:
        node.ledger.close()
    assert outcome.status is FAILED, outcome
    assert outcome.unreachable, outcome
    assert "UNAVAILABLE" in outcome.reason
    limit = max(proposal.stage_seconds, UNREACHABLE_FLOOR_SECONDS)
    print(f"refused aggregator given up after {elapsed:.2f}s (limit {limit:.1f}s)")
    # It kept dialling for the limit (the start-up race), and gave up long before the
    # joining window (20 s of preparation ahead, which a dead aggregator never ends).
    assert limit <= elapsed < limit + 6, elapsed
    assert attempt.status.value == "aborted"
    assert "UNAVAILABLE" in (attempt.abort_reason or "")


@pytest.mark.timeout(60)
def test_an_aggregator_that_answers_not_ready_is_waited_on_for_the_joining_window(
    tmp_path: Path,
) -> None:
    # hospital-b serves but has not started the session: it answers "not ready" (it may be
    # a moment behind, or still training), and hospital-a waits prepare + stage for it.
    network = Network.create(tmp_path, 3, length=8, start=False)
    proposal = network.proposal("slow", rounds=1, stage_seconds=1.0, prepare_seconds=5.0)
    a, b = _node(network, "hospital-a"), _node(network, "hospital-b")

    async def body() -> tuple[RoundOutcome, float]:
        return await _one_round_from_a(a, proposal, "hospital-b")

    outcome, elapsed = asyncio.run(serving_in_process([a, b], body))
    assert outcome.status is FAILED, outcome
    assert outcome.precondition == pb.PRECONDITION_NOT_READY, outcome
    assert not outcome.unreachable
    window = proposal.prepare_seconds + proposal.stage_seconds
    print(f"not-ready aggregator waited on for {elapsed:.2f}s (window {window:.1f}s)")
    assert elapsed >= window > max(proposal.stage_seconds, UNREACHABLE_FLOOR_SECONDS), elapsed


class Flaky:
    """A payload whose ``vector_length`` raises ``error`` the first ``times`` calls (a
    transient fault inside one attempt, e.g. a database connection reset), then delegates."""

    def __init__(self, inner: Payload, error: Exception, times: int) -> None:
        self.inner, self.error, self.left = inner, error, times
        self.raised = 0

    def vector_length(self, round_: int) -> int:
        if self.left > 0:
            self.left -= 1
            self.raised += 1
            raise self.error
        return self.inner.vector_length(round_)

    def prepare(self, round_: int) -> LocalContribution:
        return self.inner.prepare(round_)

    def conclude(
        self, round_: int, aggregate: WordArray, survivors: tuple[str, ...]
    ) -> RoundResult:
        return self.inner.conclude(round_, aggregate, survivors)

    def epsilon_needed(self) -> float:
        return self.inner.epsilon_needed()

    def finish(self, ledger: Ledger, proposal: SessionProposal) -> None:
        self.inner.finish(ledger, proposal)


def _flaky_factory(error: Exception, times: int, made: list[Flaky]) -> PayloadFactory:
    def factory(proposal: SessionProposal, config: PeerConfig, ledger: Ledger) -> Payload:
        made.append(Flaky(default_payload(proposal, config, ledger), error, times))
        return made[-1]

    return factory


async def _run_session(
    network: Network, proposal: SessionProposal, timeout: float
) -> dict[str, pb.SessionStatus | Exception]:
    operator = network.operator()
    try:
        await operator.propose(proposal)
        await operator.start(proposal.session_id, proposal.participants)
        return await operator.wait(proposal.session_id, proposal.participants, timeout=timeout)
    finally:
        await operator.close()


def _states(statuses: Mapping[str, pb.SessionStatus | Exception]) -> dict[str, Any]:
    return {p: getattr(s, "state", s) for p, s in statuses.items()}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("role", ["participant", "aggregator"])
def test_an_exception_in_one_attempt_fails_that_attempt_and_the_session_finishes(
    tmp_path: Path, role: str
) -> None:
    # t = n = 3: the round needs the victim. It runs attempt 0 again (as a participant, or
    # as its aggregator) while the others still wait for it there. Moving on alone left it
    # one attempt ahead of the others, every attempt failed, in half the runs.
    network = Network.create(tmp_path, 3, length=8, start=False)
    proposal = network.proposal("flaky", rounds=2, stage_seconds=2.0, prepare_seconds=2.0)
    first = aggregator_for(proposal, 1, 0, fixed_beacon(proposal))
    victim = first if role == "aggregator" else next(p for p in network.peers if p != first)
    made: list[Flaky] = []
    transient = ConnectionResetError("database connection reset by peer")
    nodes = [
        _node(network, p, _flaky_factory(transient, 1, made) if p == victim else default_payload)
        for p in network.peers
    ]
    victim_node = nodes[list(network.peers).index(victim)]
    # And the catch-up after that failed attempt raises once too (a misbehaving peer's
    # answer that the catch-up code did not expect): outside one_round, in the runner loop.
    real = victim_node.catch_up.agreed_elsewhere
    calls: list[int] = []

    async def agreed_elsewhere_once(
        proposal: SessionProposal, round_: int
    ) -> list[tuple[str, pb.SessionStatus]]:
        calls.append(round_)
        if len(calls) == 1:
            raise KeyError("hospital-z")
        return await real(proposal, round_)

    victim_node.catch_up.agreed_elsewhere = agreed_elsewhere_once  # type: ignore[method-assign]

    statuses = asyncio.run(serving_in_process(nodes, lambda: _run_session(network, proposal, 150)))
    assert _states(statuses) == dict.fromkeys(network.peers, "finished"), statuses
    assert sum(f.raised for f in made) == 1
    assert calls[:1] == [1]
    heads = {p: [r.record_hash for r in network.records(p, "flaky")] for p in network.peers}
    assert len({tuple(h) for h in heads.values()}) == 1, heads
    assert len(heads[victim]) == 2
    for peer in network.peers:
        # Round 1 was agreed in the attempt the victim failed: it ran that attempt again.
        first_record = network.records(peer, "flaky")[0]
        assert first_record.record.metrics["attempt"] == 0, (peer, first_record.record.metrics)
    for peer in network.peers:
        assert network.verify(peer) == [], peer
    with network.ledger(victim) as ledger:
        aborted = [a for a in ledger.round_attempts("flaky") if a.status.value == "aborted"]
    # The failed attempt is in the ledger as aborted, its reason naming the error.
    assert any(
        a.round == 1
        and f"{INTERNAL_ERROR}: ConnectionResetError: database connection reset"
        in (a.abort_reason or "")
        for a in aborted
    ), aborted


@pytest.mark.timeout(180)
def test_the_same_exception_in_every_attempt_aborts_the_session_naming_it(
    tmp_path: Path,
) -> None:
    network = Network.create(tmp_path, 3, length=8, start=False)
    proposal = network.proposal("broken", rounds=1, stage_seconds=1.0, prepare_seconds=1.0)
    victim = "hospital-c"
    made: list[Flaky] = []
    bug = ValueError("column 'age' has no values")
    nodes = [
        _node(network, p, _flaky_factory(bug, 10**6, made) if p == victim else default_payload)
        for p in network.peers
    ]

    async def body() -> tuple[pb.SessionStatus, pb.SessionStatus]:
        operator = network.operator()
        try:
            await operator.propose(proposal)
            await operator.start(proposal.session_id, proposal.participants)
            statuses = await operator.wait(proposal.session_id, [victim], timeout=150)
            first = statuses[victim]
            assert isinstance(first, pb.SessionStatus), first
            # The peer still serves: it answers again after its session ended.
            again = (await operator.status(proposal.session_id, [victim]))[victim]
            assert isinstance(again, pb.SessionStatus), again
            return first, again
        finally:
            await operator.close()

    status, again = asyncio.run(serving_in_process(nodes, body))
    assert status.state == SessionState.ABORTED, status
    # Published (Status.detail): the error's type and a reference, never its message
    # (peer/published.py); the same error each time, so the same reference.
    public = re.fullmatch(
        rf"round 1 failed {SAME_ERROR_ATTEMPTS} times in a row by "
        rf"{INTERNAL_ERROR}: ValueError at {victim} \(see its log, ref ([0-9a-f]{{6}})\)",
        status.detail,
    )
    assert public is not None, status.detail
    # This peer's own ledger keeps the message, under the same reference.
    error = f"{INTERNAL_ERROR}: ValueError: column 'age' has no values (ref {public.group(1)})"
    assert again.state == SessionState.ABORTED
    assert sum(f.raised for f in made) == SAME_ERROR_ATTEMPTS
    tasks = {n.me: n.runner.sessions["broken"].task for n in nodes}
    own = tasks[victim]
    assert own is not None
    assert own.done()
    assert not own.cancelled()  # it ended by itself (aborted)
    for peer, task in tasks.items():
        if peer != victim:
            # Still running their rounds without it (t = 3) when the peers stopped: stopping
            # cancels them, and no per-attempt handler swallows the cancellation.
            assert task is not None
            assert task.cancelled(), peer
    with network.ledger(victim) as ledger:
        info = ledger.session("broken")
        attempts = ledger.round_attempts("broken")
    assert info is not None
    assert info.status.value == "aborted"
    assert [a.status.value for a in attempts] == ["aborted"] * SAME_ERROR_ATTEMPTS
    assert all(error in (a.abort_reason or "") for a in attempts), attempts
    assert network.verify(victim) == []
