"""Succinct verification (secagg/succinct.py, secagg/linear_check.py): every peer checks the
aggregate without receiving any other peer's masked input, and every attack on the sum is
still caught by every honest peer, naming the aggregator (or the survivor that lied)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_testlib import AGGREGATOR, Round, identities, make_round

from secagg import (
    Aggregator,
    ConsistencySignature,
    LinearAnswers,
    MaskedInput,
    ProofAnswers,
    ProofRequest,
    Signer,
    Stage,
    Statement,
    SuccinctTranscript,
    TranscriptError,
    verify_succinct,
)
from secagg.linear_check import LAMBDA, challenge_bits, challenge_key, linear_answers
from secagg.messages import answers_payload
from secagg.ring import WordArray

A, B, C = "hospital-a", "hospital-b", "hospital-c"


@dataclass
class SignedRound:
    """A round whose aggregator has a roster-like identity and signs its statement, with a
    log of everything each participant received and sent."""

    r: Round
    signer: Signer
    received: dict[str, list[object]]
    sent: dict[str, list[object]]

    def sent_by(self, peer: str, kind: type) -> Any:
        return next((m for m in self.sent[peer] if isinstance(m, kind)), None)

    def verify(self, peer: str, transcript: SuccinctTranscript) -> WordArray:
        return verify_succinct(
            transcript,
            self.r.config,
            self.r.verifiers,
            aggregator=AGGREGATOR,
            own=self.sent_by(peer, MaskedInput),
            signed=self.sent_by(peer, ConsistencySignature),
            own_answers=self.sent_by(peer, LinearAnswers),
        ).aggregate


def signed_round(n: int = 5, **kwargs: Any) -> SignedRound:
    r = make_round(n, **kwargs)
    signers, verifiers = identities([AGGREGATOR], seed=99)
    r.verifiers[AGGREGATOR] = verifiers[AGGREGATOR]  # the participants share this mapping
    r.aggregator = Aggregator(r.config, r.verifiers, AGGREGATOR, signers[AGGREGATOR])
    received: dict[str, list[object]] = {u: [] for u in r.peers}
    sent: dict[str, list[object]] = {u: [] for u in r.peers}
    for u, participant in r.participants.items():

        def logged_start(u: str = u, start: Callable[[], object] = participant.start) -> object:
            reply = start()
            sent[u].append(reply)
            return reply

        def logged(message: object, u: str = u, receive: Any = participant.receive) -> object:
            received[u].append(message)
            reply = receive(message)
            sent[u].append(reply)
            return reply

        participant.start = logged_start  # type: ignore[method-assign,assignment]
        participant.receive = logged  # type: ignore[method-assign,assignment]
    return SignedRound(r, signers[AGGREGATOR], received, sent)


def arrays_in(message: object) -> list[WordArray]:
    """Every numpy array a received message carries, however deeply nested."""
    if isinstance(message, np.ndarray):
        return [message]
    if isinstance(message, tuple | list):
        return [a for item in message for a in arrays_in(item)]
    if hasattr(message, "__dataclass_fields__"):
        return [
            a for name in message.__dataclass_fields__ for a in arrays_in(getattr(message, name))
        ]
    return []


def resign(s: SignedRound, statement: Statement) -> Statement:
    """A malicious aggregator signs whatever statement it publishes."""
    return replace(statement, signature=s.signer.sign(statement.signed_payload(s.r.config.digest)))


def run_to_proof(s: SignedRound) -> dict[str, Any]:
    """All stages up to the aggregator's proof requests (after unmasking)."""
    return s.r.advance(list(Stage).index(Stage.PROVE))


def answer(s: SignedRound, statement: Statement) -> tuple[LinearAnswers, ...]:
    """The honest survivors' answers to ``statement`` (delivered as a ProofRequest)."""
    request = ProofRequest(s.r.config.session_id, s.r.config.round, statement)
    return tuple(s.r.participants[u].receive(request) for u in statement.survivors)  # type: ignore[misc]


def refused_by_everyone(
    s: SignedRound, transcript: SuccinctTranscript, match: str, peers: tuple[str, ...] = ()
) -> None:
    for u in peers or s.r.peers:
        with pytest.raises(TranscriptError, match=match) as caught:
            s.verify(u, transcript)
        assert caught.value.offender == AGGREGATOR


# ------------------------------------------------------------------------------ honest rounds


@pytest.mark.parametrize("bits", [32, 64])
def test_honest_round_verifies_without_any_other_peers_vector(bits: int) -> None:
    s = signed_round(5, length=300, bits=bits)
    assert s.r.advance(len(Stage)) == {}
    expected = s.r.expected_sum(s.r.peers)
    answers = s.r.aggregator.proof_answers()
    assert answers.inputs == ()  # every survivor answered: no vector is published
    for u in s.r.peers:
        # What u received: the only vector in it is the aggregate, inside the statement.
        for message in s.received[u]:
            for array in arrays_in(message):
                assert isinstance(message, ProofRequest)
                assert array is message.statement.aggregate
        statement = s.r.participants[u].statement
        assert statement is not None
        assert np.array_equal(
            s.verify(u, SuccinctTranscript.completed(statement, answers)), expected
        )
    full = s.r.aggregator.succinct_transcript()
    assert np.array_equal(s.verify(A, full), expected)


def test_survivor_that_misses_the_proof_stage_is_checked_from_its_vector() -> None:
    s = signed_round(5, length=50)
    outgoing = run_to_proof(s)
    replies = s.r.respond(outgoing, skip=[B])
    outgoing = s.r.collect(replies)
    assert outgoing == {}
    transcript = s.r.aggregator.succinct_transcript()
    assert [m.sender for m in transcript.inputs] == [B]
    for u in s.r.peers:
        assert np.array_equal(s.verify(u, transcript), s.r.expected_sum(s.r.peers))


def test_survivor_signing_wrong_answers_is_named_and_the_round_still_verifies() -> None:
    s = signed_round(5, length=50)
    outgoing = run_to_proof(s)
    replies = s.r.respond(outgoing)
    honest = replies[C]
    assert isinstance(honest, LinearAnswers)
    wrong = (honest.answers[0] ^ 1, *honest.answers[1:])
    header = next(h for h in outgoing[C].statement.masked if h.sender == C)
    digest = s.r.config.digest
    # C is authentic but lies: it signs answers that are not over its signed input.
    replies[C] = replace(
        honest,
        answers=wrong,
        signature=s.r.signers[C].sign(
            answers_payload(digest, C, honest.statement_sha256, header.vector_sha256, wrong)
        ),
    )
    assert s.r.collect(replies) == {}
    assert s.r.aggregator.wrong_answers == {C}
    assert C in s.r.aggregator.misbehaving
    transcript = s.r.aggregator.succinct_transcript()
    assert [m.sender for m in transcript.inputs] == [C]
    for u in (A, B):
        assert np.array_equal(s.verify(u, transcript), s.r.expected_sum(s.r.peers))
    # Published anyway, C's signed wrong answers would make every peer refuse the round.
    lie = replies[C]
    assert isinstance(lie, LinearAnswers)
    lying = replace(transcript, answers=(*transcript.answers, lie), inputs=())
    refused_by_everyone(s, lying, "linear checks fail", (A, B))


# ------------------------------------------------------------------------------ attacks


@pytest.mark.parametrize("bits", [32, 64])
def test_wrong_aggregate_by_half_the_ring_in_one_coordinate_is_caught(bits: int) -> None:
    """The worst error for one functional (2^(bits-1)): caught by all 128 together."""
    s = signed_round(5, length=40, bits=bits)
    statement = run_to_proof(s)[A].statement
    wrong = statement.aggregate.copy()
    wrong[17:18] += wrong.dtype.type(1 << (bits - 1))  # an array add wraps silently
    forged = resign(s, replace(statement, aggregate=wrong))
    transcript = SuccinctTranscript(forged, answer(s, forged))
    refused_by_everyone(s, transcript, "linear checks fail")


def test_altered_masked_input_header_is_caught() -> None:
    s = signed_round(5, length=20)
    statement = run_to_proof(s)[A].statement
    altered = tuple(
        replace(h, vector_sha256=bytes(32)) if h.sender == B else h for h in statement.masked
    )
    forged = resign(s, replace(statement, masked=altered))
    transcript = SuccinctTranscript(forged, ())  # B would refuse to answer it
    refused_by_everyone(s, transcript, "masked input of hospital-b has an invalid signature")


def test_swapped_masked_input_from_another_round_is_caught() -> None:
    s = signed_round(5, length=20)
    statement = run_to_proof(s)[A].statement
    other = signed_round(5, length=20, round_=1)
    replayed = run_to_proof(other)[A].statement.masked
    swapped = tuple(
        next(h for h in replayed if h.sender == B) if h.sender == B else h for h in statement.masked
    )
    forged = resign(s, replace(statement, masked=swapped))
    refused_by_everyone(s, SuccinctTranscript(forged, ()), "hospital-b has an invalid signature")


def test_a_revealed_secret_other_than_the_committed_one_is_caught() -> None:
    """The statement carries the reconstructed secrets, not the n² shares: each must be the
    one its owner committed to in its signed advert."""
    s = signed_round(5, length=20)
    outgoing = s.r.advance(list(Stage).index(Stage.PROVE), drop={2: [C]})  # C drops: masked
    request = outgoing[A]
    assert isinstance(request, ProofRequest)
    statement = request.statement
    assert [v for v, _ in statement.mask_keys] == [C]
    seeds = tuple((u, bytes(32) if u == A else seed) for u, seed in statement.seeds)
    forged = resign(s, replace(statement, seeds=seeds))
    peers = tuple(u for u in s.r.peers if u != C)
    refused_by_everyone(
        s, SuccinctTranscript(forged, ()), "self-mask seed of hospital-a is not the one", peers
    )
    keys = ((C, bytes(31) + b"\x01"),)
    forged = resign(s, replace(statement, mask_keys=keys))
    refused_by_everyone(s, SuccinctTranscript(forged, ()), "mask key of hospital-c", peers)
    # A dropped peer's key offered for a survivor (asking for "both" secrets): refused.
    forged = resign(
        s, replace(statement, mask_keys=((C, statement.mask_keys[0][1]), (A, bytes(32))))
    )
    refused_by_everyone(s, SuccinctTranscript(forged, ()), "exactly the dropped", peers)


def test_swapped_vector_in_the_published_fallback_is_caught() -> None:
    s = signed_round(5, length=20)
    outgoing = run_to_proof(s)
    s.r.collect(s.r.respond(outgoing, skip=[B]))
    transcript = s.r.aggregator.succinct_transcript()
    (fallback,) = transcript.inputs
    swapped = replace(fallback, vector=fallback.vector + np.uint32(1))
    refused_by_everyone(s, replace(transcript, inputs=(swapped,)), "altered or swapped")


def test_the_aggregate_of_a_swapped_input_fails_the_linear_check() -> None:
    """The aggregator sums another vector for B (keeping B's signed header): the answers
    B signed over its real input expose it."""
    s = signed_round(5, length=20)
    statement = run_to_proof(s)[A].statement
    swapped_sum = statement.aggregate + np.uint32(12345)  # y_B replaced by y_B + 12345·1
    forged = resign(s, replace(statement, aggregate=swapped_sum))
    refused_by_everyone(s, SuccinctTranscript(forged, answer(s, forged)), "linear checks fail")


def test_answers_for_another_challenge_are_caught() -> None:
    s = signed_round(5, length=20)
    statement = run_to_proof(s)[A].statement
    answers = answer(s, statement)
    other = resign(s, replace(statement, aggregate=statement.aggregate + np.uint32(1)))
    # The honest answers to the first statement, published with the second one.
    refused_by_everyone(s, SuccinctTranscript(other, answers), "answer another statement")
    # Or relabelled as answers to the second one: no longer signed by their senders.
    relabelled = tuple(
        replace(a, statement_sha256=other.sha256(s.r.config.digest)) for a in answers
    )
    refused_by_everyone(s, SuccinctTranscript(other, relabelled), "invalid signature")


def test_transcript_of_another_attempt_is_caught() -> None:
    s = signed_round(5, length=20)
    s.r.advance(len(Stage))
    retry = signed_round(5, length=20, attempt=1)
    retry.r.advance(len(Stage))
    # Everything in it is signed over the other attempt's round digest.
    refused_by_everyone(s, retry.r.aggregator.succinct_transcript(), "signature")


def test_statement_not_signed_by_the_aggregator_is_caught() -> None:
    s = signed_round(5, length=20)
    s.r.advance(len(Stage))
    transcript = s.r.aggregator.succinct_transcript()
    unsigned = replace(transcript, statement=replace(transcript.statement, signature=b""))
    refused_by_everyone(s, unsigned, "aggregator's valid signature")


@pytest.mark.parametrize("field", ["seeds", "mask_keys"])
def test_a_statement_whose_secrets_are_not_peer_bytes_pairs_is_malformed(field: str) -> None:
    """Found by the participant fuzzer: a mask key that is not a (peer, key) pair crashed
    the statement's hash inside the participant; it is a malformed message instead."""
    s = signed_round(5, length=20)
    s.r.advance(len(Stage))
    statement = s.r.aggregator.succinct_transcript().statement
    malformed: list[Any] = [(("hospital-a", b"k", b"extra"),), (("hospital-a",),), ((7, b"k"),)]
    for bad in [*malformed, ("ab",)]:
        with pytest.raises(ValueError, match="must be \\(peer, bytes\\) pairs"):
            replace(statement, **{field: bad})


def test_my_answers_altered_are_caught_and_replaced_by_my_vector_accepted() -> None:
    s = signed_round(5, length=20)
    s.r.advance(len(Stage))
    transcript = s.r.aggregator.succinct_transcript()
    mine = next(a for a in transcript.answers if a.sender == B)
    other_answers = tuple(a for a in transcript.answers if a.sender != B)
    # B's answers altered on the way: caught by everyone, B included.
    altered = replace(mine, answers=(mine.answers[0] ^ 1, *mine.answers[1:]))
    refused_by_everyone(
        s, replace(transcript, answers=(*other_answers, altered)), "answers of hospital-b"
    )
    # My answers arrived late, so my signed vector is published instead: accepted (what
    # every peer received before succinct verification).
    late = replace(
        transcript,
        answers=other_answers,
        inputs=(next(m for m in s.sent[B] if isinstance(m, MaskedInput)),),
    )
    assert np.array_equal(s.verify(B, late), s.r.expected_sum(s.r.peers))


def test_participant_refuses_to_answer_a_statement_that_alters_its_input() -> None:
    s = signed_round(5, length=20)
    statement = run_to_proof(s)[A].statement
    altered = tuple(
        replace(h, vector_sha256=bytes(32)) if h.sender == A else h for h in statement.masked
    )
    forged = resign(s, replace(statement, masked=altered))
    with pytest.raises(Exception, match="my masked input altered") as caught:
        s.r.participants[A].receive(ProofRequest(s.r.config.session_id, 0, forged))
    assert getattr(caught.value, "offender", None) == AGGREGATOR


# ------------------------------------------------------------------------------ the check


def reference_answers(key: bytes, vector: WordArray, bits: int) -> list[int]:
    matrix = challenge_bits(key, vector.size)
    words = [int(v) for v in vector]
    return [
        sum(w for w, r in zip(words, row.tolist(), strict=True) if r) % (1 << bits)
        for row in matrix
    ]


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([32, 64]),
    key=st.binary(min_size=32, max_size=32),
    data=st.data(),
)
def test_linear_answers_are_the_inner_products_mod_the_ring(
    bits: int, key: bytes, data: st.DataObject
) -> None:
    m = data.draw(st.integers(1, 40))
    top = (1 << bits) - 1
    words = data.draw(st.lists(st.integers(0, top), min_size=m, max_size=m))
    other = data.draw(st.lists(st.integers(0, top), min_size=m, max_size=m))
    dtype = np.uint32 if bits == 32 else np.uint64
    y, w = np.array(words, dtype=dtype), np.array(other, dtype=dtype)
    answers = linear_answers(key, y)
    assert list(answers) == reference_answers(key, y, bits)
    # Linear over the ring: what the sum check relies on.
    both = linear_answers(key, np.add(y, w))
    assert list(both) == [
        (a + b) % (1 << bits) for a, b in zip(answers, linear_answers(key, w), strict=True)
    ]


@pytest.mark.parametrize("bits", [32, 64])
def test_half_ring_error_is_seen_exactly_by_the_functionals_that_touch_its_coordinate(
    bits: int,
) -> None:
    """⟨r_j, 2^(bits-1)·e_c⟩ = 2^(bits-1)·r_j(c): the check misses the error only if all λ
    bits of column c are 0, probability 2^-λ over the challenge (SECURITY.md's proof)."""
    key = challenge_key(bytes(32), bytes(range(32)))
    error = np.zeros(1000, dtype=np.uint32 if bits == 32 else np.uint64)
    error[700] = error.dtype.type(1 << (bits - 1))
    column = challenge_bits(key, error.size)[:, 700]
    assert len(column) == LAMBDA
    assert column.any()
    assert list(linear_answers(key, error)) == [int(b) << (bits - 1) for b in column]


def test_challenge_depends_on_the_statement_and_the_round() -> None:
    a = challenge_key(bytes(32), bytes(32))
    assert challenge_key(bytes(32), bytes(31) + b"\x01") != a
    assert challenge_key(bytes(31) + b"\x01", bytes(32)) != a


def test_proof_answers_carry_no_vector_when_everyone_answers() -> None:
    s = signed_round(4, length=10)
    s.r.advance(len(Stage))
    answers = s.r.aggregator.proof_answers()
    assert isinstance(answers, ProofAnswers)
    assert arrays_in(answers) == []
