"""Issue 9 item 3, the peer side: proposals whose graph, degree or threshold do not hold
against the collusion a peer assumes are refused with a reason, before any round runs."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from peer.config import Policy
from peer.round.backends import SecAggBackend
from peer.session import ProposalError, SessionProposal, check_policy, required_colluders
from secagg import ConfigError, ConsistencySignature, RoundConfig, TranscriptError, testing
from secagg.messages import consistency_payload
from secagg.simulate import simulate

PAYLOAD = {"kind": "vector", "length": 4}


def peers(n: int) -> tuple[str, ...]:
    return tuple(f"hospital-{i:03d}" for i in range(n))


def propose(n: int, **fields: object) -> SessionProposal:
    return SessionProposal(
        f"s{n}",
        peers(n),
        rounds=1,
        payload=PAYLOAD,
        **fields,  # type: ignore[arg-type]
    )


def refusal(proposal: SessionProposal, policy: Policy | None = None) -> str | None:
    me = proposal.participants[1]
    # The proposer is a peer this site lets propose (deny by default otherwise), so what is
    # checked here is the secure aggregation parameters.
    allowed = replace(
        policy or Policy(),
        allowed_peer_proposers=(proposal.participants[0],),
        allow_exact_payloads=True,
    )
    return check_policy(proposal, proposal.participants[0], True, me, allowed)


def test_the_issues_weak_proposal_is_refused_with_its_reason() -> None:
    """graph = secagg+, degree = 2, threshold = 2 for n = 50 was accepted before issue 9."""
    with pytest.raises(ProposalError, match=r"graph=secagg\+, degree=2, threshold=2 for n=50"):
        propose(50, threshold=2, graph="secagg+", degree=2)


@pytest.mark.parametrize(("n", "t", "c"), [(3, 2, 1), (11, 6, 1), (12, 7, 2)])
def test_a_majority_is_not_enough_when_the_aggregator_may_collude(n: int, t: int, c: int) -> None:
    """t = n//2 + 1 against the aggregator's peer plus 1 colluder (odd n) or 2 (even n): the
    colluders sign both survivor sets (issue 9 item 2). t > (n + c)/2 is accepted."""
    with pytest.raises(ProposalError, match="too weak"):
        propose(n, threshold=t, colluders=c)
    assert propose(n, threshold=(n + c) // 2 + 1, colluders=c).threshold == (n + c) // 2 + 1


def test_the_aggregator_always_counts_as_a_colluder() -> None:
    with pytest.raises(ProposalError, match="colluders must be between 1"):
        propose(10, threshold=6, colluders=0)


def test_policy_refuses_a_proposal_assuming_fewer_colluders_than_the_site() -> None:
    """Safe against the 1 colluder it declares, but this site assumes 10 % of 50."""
    proposal = propose(50, threshold=26)
    reason = refusal(proposal)
    assert reason is not None
    assert "assumes 1 colluding participants" in reason
    assert "assumes 5 of 50" in reason
    stronger = propose(50, threshold=28, colluders=5)
    assert refusal(stronger) is None


def test_policy_minimum_degree_and_threshold_follow_from_n() -> None:
    """SecAgg+ at n = 100: k = 48, t = 25 (the old recommendation) is refused; the new
    recommendation for 5 % colluders passes a site assuming 5 %."""
    policy = Policy(assumed_colluders_fraction=0.05)
    assert required_colluders(100, policy) == 5
    with pytest.raises(ProposalError, match="too weak"):
        propose(100, threshold=25, graph="secagg+", degree=48, colluders=5)
    ok = propose(100, threshold=34, graph="secagg+", degree=60, colluders=5)
    assert refusal(ok, policy) is None
    # A site assuming more collusion refuses the same proposal, saying why.
    reason = refusal(ok, Policy(assumed_colluders_fraction=0.2))
    assert reason is not None
    assert "assumes 20 of 100" in reason


def test_round_config_takes_the_attempt_and_the_beacon() -> None:
    proposal = propose(10, threshold=SessionProposal.default_threshold(10))
    first = proposal.round_config(1, attempt=0, beacon=bytes(32))
    retry = proposal.round_config(1, attempt=1, beacon=bytes(32))
    assert first.digest != retry.digest
    assert first.colluders == 1
    assert first.quorum == 6


def test_a_secagg_plus_round_needs_the_beacon() -> None:
    """Without the beacon the graph would follow from the session id the proposer chose."""
    proposal = propose(100, threshold=34, graph="secagg+", degree=60, colluders=5)
    with pytest.raises(ConfigError, match="needs the session's beacon"):
        proposal.round_config(1)
    assert proposal.round_config(1, beacon=bytes(32)).graph_kind.value == "secagg+"


def test_the_peer_refuses_a_transcript_over_another_survivor_set_than_it_signed() -> None:
    """``SecAggBackend.verify``: the stealth two-view attack seen from the victim's peer."""
    result = simulate(7, 3, seed=5)
    transcript = result.succinct
    assert transcript is not None
    assert result.transcript is not None
    signers, verifiers = testing.test_identities(result.peers, 5)
    config = RoundConfig("simulation", 0, result.peers, 4, 3)
    ctx = SimpleNamespace(config=config, verifiers=verifiers, aggregator=transcript.aggregator)
    backend = SecAggBackend()
    mine = result.transcript.masked_inputs[0]
    signed = next(s for s in transcript.statement.consistency if s.sender == mine.sender)
    backend.verify(transcript, ctx, [mine, signed])  # type: ignore[arg-type]
    # I signed a set without peer-006; the published transcript includes it.
    other = tuple(u for u in transcript.survivors if u != result.peers[-1])
    my_view = ConsistencySignature(
        mine.sender,
        "simulation",
        0,
        signers[mine.sender].sign(consistency_payload(config.digest, other)),
    )
    with pytest.raises(TranscriptError, match=r"not the one .* signed"):
        backend.verify(transcript, ctx, [mine, my_view])  # type: ignore[arg-type]
    # My input left out although I signed a survivor set (with me in it): refused.
    statement = transcript.statement
    without_me = replace(
        transcript,
        statement=replace(
            statement, masked=tuple(h for h in statement.masked if h.sender != mine.sender)
        ),
    )
    with pytest.raises(TranscriptError):
        backend.verify(without_me, ctx, [mine, signed])  # type: ignore[arg-type]
