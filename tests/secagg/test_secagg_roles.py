"""The role scaffolding shared by every protocol (secagg/_roles.py).

Every aggregator (SecAgg, Paillier, cleartext) and every participant-side role fits the typed
interfaces a round driver uses (mypy checks the assignments below); the cleartext roles, which
had their own copy of the scaffolding, now behave like the secure ones where theirs differed.
"""

from __future__ import annotations

import numpy as np
import pytest
from secagg_testlib import make_round

from secagg import (
    AggregatorRole,
    AggregatorState,
    DeterministicRandom,
    InvalidSignatureError,
    LocalProtocolError,
    ParticipantRole,
    RemoteProtocolError,
    RoundAborted,
    RoundConfig,
    Stage,
)
from secagg.cleartext import (
    CleartextAggregator,
    CleartextInput,
    CleartextParticipant,
    verify_cleartext_transcript,
)
from secagg.paillier import PaillierAggregator, PaillierConfig, PaillierPeer, SeededPrimes
from secagg.ring import WordArray, word_dtype
from secagg.testing import peer_ids
from secagg.testing import test_identities as identities

AGG = "the-aggregator"
PEERS = peer_ids(4)
CONFIG = RoundConfig("cleartext-test", 3, PEERS, 3, 5)
SIGNERS, VERIFIERS = identities(PEERS, 7)


def vector(value: int) -> WordArray:
    return np.full(CONFIG.vector_length, value, dtype=word_dtype(CONFIG.bits))


def cleartext_inputs() -> dict[str, CleartextInput]:
    return {
        u: CleartextParticipant(CONFIG, u, SIGNERS[u], vector(i + 1), AGG).start()
        for i, u in enumerate(PEERS)
    }


def test_every_role_fits_the_driver_interfaces() -> None:
    r = make_round()
    paillier = PaillierConfig(CONFIG, PEERS[1], 512, insecure_small_keys=True)
    aggregators: list[AggregatorRole] = [
        r.aggregator,
        PaillierAggregator(paillier, VERIFIERS, PEERS[0]),
        CleartextAggregator(CONFIG, VERIFIERS, AGG),
    ]
    participants: list[ParticipantRole] = [
        r.participants[r.peers[0]],
        PaillierPeer(
            paillier,
            PEERS[1],
            SIGNERS[PEERS[1]],
            VERIFIERS,
            vector(1),
            DeterministicRandom("roles"),
            PEERS[0],
            SeededPrimes(DeterministicRandom("primes")),
        ),
        CleartextParticipant(CONFIG, PEERS[0], SIGNERS[PEERS[0]], vector(1), AGG),
    ]
    for aggregator in aggregators:
        assert aggregator.state is AggregatorState.RUNNING
        assert aggregator.misbehaving == set()  # no getattr fallback needed
        assert aggregator.dropped_at(aggregator.stage) == ()
    assert all(p.state.value == "new" for p in (participants[0], participants[2]))


def test_cleartext_round_sums_and_its_transcript_verifies() -> None:
    agg = CleartextAggregator(CONFIG, VERIFIERS, AGG)
    inputs = cleartext_inputs()
    for u in PEERS[:3]:
        agg.receive(inputs[u])
    assert agg.pending() == {PEERS[3]}
    assert agg.close_stage() == {}
    assert agg.state is AggregatorState.DONE
    assert agg.result is not None
    assert agg.result.survivors == PEERS[:3]
    assert agg.dropped_at(Stage.MASKED) == (PEERS[3],)
    assert np.array_equal(agg.result.aggregate, vector(1 + 2 + 3))
    total = verify_cleartext_transcript(agg.transcript(PEERS[0]), CONFIG, VERIFIERS)
    assert np.array_equal(total, vector(6))
    sent = agg.transcripts(PEERS[:3])
    assert sent[PEERS[0]] is sent[PEERS[2]]  # the same one for everyone


def test_cleartext_close_twice_is_refused_and_keeps_the_drop_report() -> None:
    """Bug fixed: the cleartext aggregator checked no state at close, so a second close
    recomputed the result with an empty drop report (pending() is empty once DONE)."""
    agg = CleartextAggregator(CONFIG, VERIFIERS, AGG)
    inputs = cleartext_inputs()
    for u in PEERS[:3]:
        agg.receive(inputs[u])
    agg.close_stage()
    result = agg.result
    with pytest.raises(LocalProtocolError, match="round is done"):
        agg.close_stage()
    assert agg.result is result
    assert result is not None
    assert result.dropped[Stage.MASKED] == (PEERS[3],)


def test_cleartext_sender_of_a_refused_input_is_left_out() -> None:
    """Like the secure aggregators: a sender whose input was refused cannot try again, and
    two inputs from one sender (equivocation) leave both out. Before, the cleartext
    aggregator accepted a second attempt and kept the first of two inputs."""
    agg = CleartextAggregator(CONFIG, VERIFIERS, AGG)
    inputs = cleartext_inputs()
    a, b, c, d = PEERS
    forged = CleartextInput(a, CONFIG.session_id, CONFIG.round, vector(99), bytes(64))
    with pytest.raises(InvalidSignatureError) as refused:
        agg.receive(forged)
    assert refused.value.offender == a
    with pytest.raises(RemoteProtocolError, match="not expected") as again:
        agg.receive(inputs[a])
    assert again.value.offender == a
    agg.receive(inputs[b])
    with pytest.raises(RemoteProtocolError, match="two messages") as twice:
        agg.receive(inputs[b])
    assert twice.value.offender == b
    agg.receive(inputs[c])
    agg.receive(inputs[d])
    # Only c and d count: below t = 3, so the round aborts, reporting a and b as dropped.
    with pytest.raises(RoundAborted, match="only 2 inputs"):
        agg.close_stage()
    assert agg.dropped_at(Stage.MASKED) == (a, b)


def test_cleartext_aborts_below_threshold_and_says_why() -> None:
    agg = CleartextAggregator(CONFIG, VERIFIERS, AGG)
    inputs = cleartext_inputs()
    for u in PEERS[:2]:
        agg.receive(inputs[u])
    with pytest.raises(RoundAborted, match="only 2 inputs, threshold is 3"):
        agg.close_stage()
    assert agg.state is AggregatorState.ABORTED
    assert agg.abort_reason == "only 2 inputs, threshold is 3"
    assert agg.dropped_at(Stage.MASKED) == PEERS[2:]


def test_cleartext_input_of_another_round_is_refused() -> None:
    agg = CleartextAggregator(CONFIG, VERIFIERS, AGG)
    other = RoundConfig(CONFIG.session_id, CONFIG.round + 1, PEERS, 3, 5)
    replay = CleartextParticipant(other, PEERS[0], SIGNERS[PEERS[0]], vector(1), AGG).start()
    with pytest.raises(RemoteProtocolError, match="another session or round") as refused:
        agg.receive(replay)
    assert refused.value.offender == PEERS[0]


def test_cleartext_aggregator_needs_every_verifier() -> None:
    """Bug fixed: a missing verifier surfaced as a KeyError at the first input."""
    verifiers = {u: v for u, v in VERIFIERS.items() if u != PEERS[2]}
    with pytest.raises(LocalProtocolError, match="no signature verifier"):
        CleartextAggregator(CONFIG, verifiers, AGG)


def test_cleartext_participant_refuses_any_aggregator_message_naming_it() -> None:
    """Bug fixed: the cleartext participant had no receive(); a driver passing a message on
    crashed with AttributeError instead of a refusal naming the aggregator."""
    participant = CleartextParticipant(CONFIG, PEERS[0], SIGNERS[PEERS[0]], vector(1), AGG)
    with pytest.raises(LocalProtocolError, match="delivered in state new"):
        participant.receive(object())
    fresh = CleartextParticipant(CONFIG, PEERS[0], SIGNERS[PEERS[0]], vector(1), AGG)
    fresh.start()
    with pytest.raises(RemoteProtocolError, match="unexpected CleartextInput") as refused:
        fresh.receive(cleartext_inputs()[PEERS[1]])
    assert refused.value.offender == AGG
    assert fresh.state.value == "failed"


def test_secure_aggregators_refuse_a_message_of_another_protocol_naming_its_sender() -> None:
    """receive() takes any decoded message; one of another protocol is a breach by its
    sender (who is then excluded), never a crash."""
    r = make_round()
    stray = cleartext_inputs()[PEERS[0]]
    sender = r.peers[0]
    misaddressed = CleartextInput(
        sender, stray.session_id, stray.round, stray.vector, stray.signature
    )
    with pytest.raises(RemoteProtocolError, match="sent CleartextInput at stage advertise") as e:
        r.aggregator.receive(misaddressed)
    assert e.value.offender == sender
    assert sender not in r.aggregator.pending()
