"""A vote stuck below t, released over real links (SECURITY.md "Releasing a stuck vote").

Round 1's aggregator shows the record draft to one participant only, collects its vote and
its own (2 < t = 4) and then dies, or (second test) is cut off while alive; the next attempt
must release the participant's vote with the other survivors' vote statements and agree the
round. The fault is a test-only hook (tests/netns/stuck_vote/sitecustomize.py) loaded
through PYTHONPATH into the aggregator's process only: on the k-th vote itself it kills the
aggregator, or logs the line on which the test cuts its link, so the number of signers is
exact whatever the machine's load. The dead aggregator is then started again (without the
hook), the cut one's link healed, and it must end with the same ledger as the others.
Prints ``NETNS-REPORT`` lines (run with ``-s``).
Skipped without root or network namespaces, unless CI is set (then it fails instead).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from netns_harness import LinkConditions, NetnsFederation, netns_unavailable_reason

from peer.ledger import release_quorum
from peer.round.participating import silence_limits
from peer.session import SessionProposal

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HOOK = Path(__file__).resolve().parent / "stuck_vote"
# n = 5, t = 4, c = 1: 2t - n = 3 > c, so the release rule is safe (SECURITY.md), and it
# needs q = n - t + c + 1 = 3 statements. The aggregator and one participant sign record R
# of attempt 0 (2 < t). The 4 survivors are exactly t: the next record needs the stuck
# participant's signature too, which only the release gives (the 3 others are q).
PEERS, THRESHOLD = 5, 4


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[NetnsFederation]:
    reason = netns_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"network namespace tests must run in CI, but: {reason}")
        pytest.skip(reason)
    federation = NetnsFederation.create(
        tmp_path / "federation",
        PEERS,
        length=10_000,
        conditions=LinkConditions(delay=0.02),
        start=False,
    )
    yield federation
    federation.close()


def choose_session(
    fed: NetnsFederation, name: str, rounds: int, **deadlines: float
) -> tuple[SessionProposal, str, str, str]:
    """A proposal whose round 1 aggregator (the victim) aggregates no other round's first
    attempt nor round 1's next one; returns it with the victim, its successor in round 1 and
    the stuck signer: a plain participant of the next attempt (not its aggregator)."""
    for k in range(1000):
        proposal = fed.proposal(f"{name}{k}", rounds, threshold=THRESHOLD, **deadlines)
        victim = fed.aggregator(proposal, 1)
        successor = fed.aggregator(proposal, 1, 1)
        later = [fed.aggregator(proposal, r) for r in range(2, rounds + 1)]
        if victim != successor and victim not in later:
            stuck = next(p for p in fed.peers if p not in (victim, successor))
            print(f"round 1: aggregator {victim} shows the draft to {stuck} only; next {successor}")
            return proposal, victim, successor, stuck
    raise AssertionError("no session id gives round 1's aggregator no other round")


def hook_env(stuck: str, fault: str) -> dict[str, str]:
    """The environment that loads the fault (stuck_vote/sitecustomize.py) into a peer."""
    pythonpath = os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")]))
    return {
        "PYTHONPATH": pythonpath,
        "HOSPITAL_NETNS_STUCK_VOTE": f"1:0:{stuck}",
        "HOSPITAL_NETNS_STUCK_VOTE_FAULT": fault,
    }


def test_a_vote_stuck_below_t_by_a_dying_aggregator_is_released_and_the_round_agreed(
    fed: NetnsFederation,
) -> None:
    assert release_quorum(PEERS, THRESHOLD, 1) == 3
    # Generous deadlines (CI runs on 2 cores): the next attempt waits one joining stage
    # (prepare + stage) for the dead aggregator, nothing here is raced against them.
    proposal, victim, successor, stuck = choose_session(
        fed, "stuck", 3, stage_seconds=4.0, prepare_seconds=2.0
    )
    sid = proposal.session_id
    fed.start(list(fed.peers), env={victim: hook_env(stuck, "kill")})
    # The dead aggregator comes back (without the hook) once the others agreed round 1: it
    # must catch up the record that replaced the one it signed. Depending on how long it
    # takes to start (load), it rejoins rounds 2 and 3 or catches them up after the others
    # ended; both were seen to pass (the second by restarting it after round 3 instead).
    restarted: list[float] = []

    def restart() -> None:
        fed.start([victim])
        restarted.append(time.monotonic())

    fed.when_logged(successor, rf"session={sid} round=1 attempt=1 outcome=agreed", restart)

    started = time.monotonic()
    states = fed.run_session(proposal, timeout=180.0, require_all=True)
    elapsed = time.monotonic() - started
    agreed = max(len(fed.records(p, sid)) for p in fed.peers)
    print(
        f"\nNETNS-REPORT scenario=stuck-vote-released rounds={proposal.rounds} agreed={agreed} "
        f"aborted={proposal.rounds - agreed} seconds={elapsed:.1f} links={fed.links.stats}"
    )
    logs = fed.logs()

    # The fault happened as planned: the aggregator died holding exactly its own vote and
    # the stuck participant's, for a record R of attempt 0 that nobody else signed.
    assert re.search(
        rf"fault injection: aggregator {victim} dies holding 2 votes "
        rf"\({','.join(sorted([victim, stuck]))}\)",
        fed.peers[victim].log(),
    ), logs
    assert restarted, logs
    assert set(states.values()) == {"finished"}, f"{states}\n{logs}"
    print(f"NETNS-REPORT {victim} restarted; its rounds: {fed.round_lines(victim, sid)}")
    check_released_and_agreed(fed, proposal, victim, successor, stuck)


# When the cut aggregator's link heals: once round 1 is agreed without it (it must catch up
# the record that replaced the one it signed), or as soon as the next attempt's aggregator
# gave up the cut one (it joins that attempt still holding its vote for R: released too).
HEAL_AFTER = {
    "round-agreed": "round=1 attempt=1 outcome=agreed",
    "attempt-failed": "round=1 attempt=0 outcome=",
}


@pytest.mark.parametrize("heal", list(HEAL_AFTER))
def test_a_vote_stuck_below_t_by_a_cut_aggregator_is_released_and_the_cut_one_catches_up(
    fed: NetnsFederation, heal: str
) -> None:
    # As above, but the aggregator is not killed: its link is cut (silence, no RST) while it
    # holds the two votes, and it keeps running. The survivors must notice within their
    # silence limits (peer/round/participating.py: 2 stages waiting for the transcript,
    # 3 stages waiting for the agreed record after voting), not TCP's ~10 s, and the next
    # attempt must release the stuck vote. The link is then healed (HEAL_AFTER): the cut
    # aggregator, holding its vote for R, must end with the others' records.
    assert release_quorum(PEERS, THRESHOLD, 1) == 3
    stage_seconds, prepare_seconds = 3.0, 1.5
    proposal, victim, successor, stuck = choose_session(
        fed, "cut", 2, stage_seconds=stage_seconds, prepare_seconds=prepare_seconds
    )
    sid = proposal.session_id
    survivors = [p for p in fed.peers if p != victim]
    limits = silence_limits(stage_seconds, prepare_seconds)
    fed.start(list(fed.peers), env={victim: hook_env(stuck, "cut")})
    cut_at: list[float] = []
    healed_at: list[float] = []

    def cut() -> None:
        fed.cut(victim)
        cut_at.append(time.monotonic())

    def heal_link() -> None:
        fed.heal(victim)
        healed_at.append(time.monotonic())

    fed.when_logged(victim, rf"fault injection: aggregator {victim} is cut holding", cut)
    # The victim's own attempt 0 ends at its vote deadline, when it next sends something
    # (the Abort): the cut must come before (the survivors' reasons below show that no
    # Abort reached them: they gave up on silence).
    victim_gave_up = fed.when_logged(
        victim, rf"session={sid} round=1 attempt=0 outcome=", lambda: None
    )
    noticed = {
        p: fed.when_logged(p, rf"session={sid} round=1 attempt=0 outcome=", lambda: None)
        for p in survivors
    }
    fed.when_logged(successor, rf"session={sid} {HEAL_AFTER[heal]}", heal_link)

    started = time.monotonic()
    states = fed.run_session(proposal, timeout=150.0, require_all=True)
    elapsed = time.monotonic() - started
    agreed = max(len(fed.records(p, sid)) for p in fed.peers)
    print(
        f"\nNETNS-REPORT scenario=stuck-vote-cut-aggregator-healed-after-{heal} "
        f"rounds={proposal.rounds} "
        f"agreed={agreed} aborted={proposal.rounds - agreed} seconds={elapsed:.1f} "
        f"links={fed.links.stats}"
    )
    logs = fed.logs()
    assert re.search(
        rf"fault injection: aggregator {victim} is cut holding 2 votes "
        rf"\({','.join(sorted([victim, stuck]))}\)",
        fed.peers[victim].log(),
    ), logs
    assert cut_at, logs
    assert victim_gave_up.fired_at is not None, logs
    assert cut_at[0] < victim_gave_up.fired_at, "cut after the aggregator's vote deadline"
    assert healed_at, logs
    assert fed.peers[victim].alive(), "a cut must not kill the peer"

    # Every survivor noticed within the limit of what it waited for, counted from the cut
    # (the limit runs from its last read, which came before the cut), and said why: its own
    # silence limit ("aggregator X silent for N s in stage S"), or the connection's keepalive
    # (TCP_USER_TIMEOUT, 5 s for unacknowledged data: peer/tls/_channel.py) when its last
    # bytes to the aggregator were never acknowledged (a vote sent just before the cut).
    # The keepalive can also be beaten by a reset: the cut aggregator's own side of the
    # connection times out first, and once the link is healed (HEAL_AFTER) the survivor's
    # retransmission meets a closed socket (seen in CI: "Connection reset by peer (104)").
    for peer_id in survivors:
        fired = noticed[peer_id].fired_at
        assert fired is not None, logs
        limit = limits["votes" if peer_id == stuck else "stage"]
        # The aggregator's own deadline for what it waits on (the draft: the stage; the
        # agreed record: 2 stages of vote collection) plus one stage of grace.
        assert limit == (3 if peer_id == stuck else 2) * stage_seconds
        first_attempt = fed.round_lines(peer_id, sid)[0]
        print(
            f"NETNS-REPORT {peer_id} noticed the cut aggregator after {fired - cut_at[0]:.2f}s "
            f"(waiting for {'the agreed record' if peer_id == stuck else 'the transcript'}, "
            f"limit {limit:.1f}s): {first_attempt.reason}"
        )
        # Under 10 s even for the one waiting 3 stages: not the keepalive's 5 + 5 s. The
        # margin over the limit allows for a loaded machine's event-loop latency.
        assert fired - cut_at[0] < min(limit + 2.0, 9.9), (peer_id, fired - cut_at[0], logs)
        assert (first_attempt.round, first_attempt.attempt) == (1, 0), (peer_id, logs)
        if heal == "attempt-failed" and healed_at[0] < fired and first_attempt.outcome == "aborted":
            # A race this test allows: the link was healed as soon as the successor gave up
            # (its limit is 2 stages, the stuck peer's 3), and the victim's own vote deadline
            # came before the stuck peer's limit, so the victim's Abort reached it over the
            # healed link (seen once: healed, then the Abort 5.5 s after the cut, limit 9 s).
            assert re.fullmatch(
                r"'?only 2 peers signed the same record, \d+ needed'?", first_attempt.reason
            ), (peer_id, first_attempt.reason)
            continue
        assert first_attempt.outcome == "aggregator-failed", (peer_id, logs)
        assert re.fullmatch(
            rf"'?aggregator {victim} silent for [\d.]+s in stage \w+'?"
            rf"|'?stream to aggregator {victim} failed: UNAVAILABLE "
            rf".*(timed out|reset by peer).*",
            first_attempt.reason,
        ), (peer_id, first_attempt.reason)
    assert set(states.values()) == {"finished"}, f"{states}\n{logs}"
    first = fed.records(successor, sid)[0]
    print(
        f"NETNS-REPORT round 1 agreed in attempt {first.record.metrics['attempt']} by "
        f"{first.record.metrics['aggregator']}, signed by {','.join(sorted(first.signatures))}; "
        f"cut {healed_at[0] - cut_at[0]:.1f}s; {victim}'s rounds: {fed.round_lines(victim, sid)}"
    )
    # Healed as soon as the successor gave up attempt 0, the victim usually joins attempt 1 (6
    # of 6 runs), but only if it gets there within the successor's joining window (4.5 s): on
    # a slower machine it catches the record up instead. Both are correct; the checks follow
    # what happened, and the round-agreed case must never rejoin.
    with fed.ledger(victim) as ledger:
        victim_vote = ledger.signed_vote(sid, 1)
    rejoined = victim_vote is not None and victim_vote.attempt == 1
    assert heal == "attempt-failed" or not rejoined, logs
    print(f"NETNS-REPORT healed victim rejoined attempt 1: {rejoined}")
    check_released_and_agreed(fed, proposal, victim, successor, stuck, rejoined)


def check_released_and_agreed(
    fed: NetnsFederation,
    proposal: SessionProposal,
    victim: str,
    successor: str,
    stuck: str,
    rejoined: bool = False,
) -> None:
    """What every variant must end with. The victim and the stuck peer signed a record R of
    attempt 0 that nobody else signed; the stuck peer released R with the statements of the
    three peers that never saw it, and round 1 was agreed in attempt 1 by the survivors,
    the released peer included. ``rejoined``: the victim took part in attempt 1 too (healed
    in time), released R on the same statements and signed as well; otherwise it kept its
    vote for R and caught the record up. Every ledger, the victim's included, ends with the
    same verified records."""
    sid = proposal.session_id
    logs = fed.logs()
    survivors = [p for p in fed.peers if p != victim]
    signers = list(fed.peers) if rejoined else survivors
    others = [p for p in survivors if p != stuck]
    records = fed.records(stuck, sid)
    assert [r.record.round for r in records] == list(range(1, proposal.rounds + 1)), logs
    # The stuck participant (and the victim, if it rejoined) released R with q statements
    # from the three peers that never saw R, logged it, then signed the next attempt's record.
    with fed.ledger(stuck) as ledger:
        released = ledger.released_votes(sid)
    assert len(released) == 1, logs
    r_hash = released[0].record_hash
    assert records[0].record_hash != r_hash
    for peer_id in [stuck, victim] if rejoined else [stuck]:
        with fed.ledger(peer_id) as ledger:
            released = ledger.released_votes(sid)
        assert len(released) == 1, (peer_id, logs)
        release = released[0]
        assert (release.round, release.record_hash) == (1, r_hash)
        assert (release.signed_attempt, release.released_attempt) == (0, 1)
        assert sorted(s.peer_id for s in release.evidence) == sorted(others)
        assert all(s.vote_hash != r_hash and s.attempt == 1 for s in release.evidence)
        assert re.search(
            rf"peer={peer_id} session={sid} round=1 attempt=1 released its vote for record "
            rf"{r_hash.hex()[:16]} of attempt 0: 3 peers state they did not sign it "
            rf"\({','.join(sorted(others))}\), so it can never reach t={THRESHOLD}; "
            rf"signs {records[0].record_hash.hex()[:16]}",
            fed.peers[peer_id].log(),
        ), fed.peers[peer_id].log()
    # The victim, unless released, still holds its vote for R of attempt 0 (and signed no
    # other record of round 1); the three others never signed R (they never saw it).
    with fed.ledger(victim) as ledger:
        victim_vote = ledger.signed_vote(sid, 1)
        victim_released = ledger.released_votes(sid)
    assert victim_vote is not None, logs
    if rejoined:
        assert (victim_vote.record_hash, victim_vote.attempt) == (records[0].record_hash, 1)
    else:
        assert (victim_vote.record_hash, victim_vote.attempt) == (r_hash, 0)
        assert victim_released == [], logs
    for peer_id in others:
        with fed.ledger(peer_id) as ledger:
            assert ledger.released_votes(sid) == [], peer_id
            mine = ledger.signed_vote(sid, 1)
        assert mine is not None, (peer_id, logs)
        assert mine.record_hash != r_hash, f"{peer_id} signed R although it never saw it"

    # Every survivor gave up attempt 0 and agreed round 1 in attempt 1, with the successor:
    # four signatures, the released peer's included (five if the victim rejoined).
    for peer_id in survivors:
        outcomes = [(ln.round, ln.attempt, ln.outcome) for ln in fed.round_lines(peer_id, sid)]
        assert outcomes[0] == (1, 0, "aggregator-failed"), (peer_id, outcomes, logs)
        assert outcomes[1] == (1, 1, "agreed"), (peer_id, outcomes, logs)
    assert records[0].record.metrics["aggregator"] == successor
    assert records[0].record.metrics["attempt"] == 1
    assert sorted(records[0].signatures) == sorted(signers)

    # One and the same verified record per round in every ledger, the victim's included: it
    # caught up (or signed) the record that replaced R, and each record is the plain sum of
    # the survivors it names.
    if not rejoined:
        caught_up = re.search(
            rf"peer={victim} caught up round 1 of {sid} ", fed.peers[victim].log()
        )
        assert caught_up, logs
    for peer_id in fed.peers:
        held = [(r.record, r.record_hash) for r in fed.records(peer_id, sid)]
        assert held == [(r.record, r.record_hash) for r in records], f"{peer_id}\n{logs}"
        assert fed.verify(peer_id) == [], peer_id
    for stored in records:
        named = stored.record.metrics["survivors"]
        assert isinstance(named, list)
        survivors_of = [str(p) for p in named]
        if stored.record.round == 1:
            assert sorted(survivors_of) == sorted(signers)
        for peer_id in survivors:
            np.testing.assert_array_equal(
                fed.aggregate_of(peer_id, sid, stored.record.round), fed.plain_sum(survivors_of)
            )
