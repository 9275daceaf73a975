"""`verify-ledger` re-checks each stored secagg round (peer/ledger/_proofs.py,
peer/ledger_check.py): the succinct transcript and the round's parameters are kept with the
agreed record, the linear check is run again, and any edit is reported."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from peer.codec import encode
from peer.ledger import AgreedRecord, Ledger, ProblemKind, SessionStatus, StoredProof
from peer.ledger_check import round_proof_problems
from peer.round.agreement import aggregate_hash
from secagg import RoundConfig, SuccinctTranscript, Verifier, testing
from secagg.crypto import sha256
from secagg.simulate import simulate

SESSION, ROUND, PEERS, LENGTH, THRESHOLD = "proofs", 1, 7, 40, 4
Stored = tuple[Ledger, SuccinctTranscript, RoundConfig, dict[str, Verifier]]


@pytest.fixture
def stored(tmp_path: Path) -> Stored:
    """A ledger holding one agreed secagg round and its evidence, as a peer stores them."""
    result = simulate(PEERS, LENGTH, threshold=THRESHOLD, session_id=SESSION, round_=ROUND, seed=3)
    transcript = result.succinct
    assert transcript is not None
    signers, verifiers = testing.test_identities(result.peers, 3)
    config = RoundConfig(SESSION, ROUND, result.peers, THRESHOLD, LENGTH)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.create()
    ledger.record_proposal(
        SESSION,
        json.dumps({"session": SESSION}),
        proposer=result.peers[0],
        participants=result.peers,
        threshold=THRESHOLD,
        rounds_planned=1,
    )
    if ledger.session(SESSION).status == SessionStatus.PROPOSED:  # type: ignore[union-attr]
        ledger.decide_session(SESSION, accept=True)
    record = AgreedRecord.build(
        SESSION,
        ROUND,
        aggregate_hash=aggregate_hash(transcript.statement.aggregate),
        model_hash=sha256(b"model"),
        metrics={"survivors": list(transcript.survivors)},
        epsilon={},
        prev_hash=ledger.session_head(SESSION),
    )
    ledger.append_agreed(record, {u: signers[u].sign(record.payload()) for u in result.peers})
    ledger.store_round_proof(proof_of(transcript, config))
    return ledger, transcript, config, dict(verifiers)


def proof_of(transcript: SuccinctTranscript, config: RoundConfig) -> StoredProof:
    return StoredProof(
        SESSION,
        ROUND,
        0,
        transcript.aggregator,
        json.dumps(config.as_dict(), sort_keys=True),
        encode(transcript)[1],
    )


def test_a_stored_round_is_rechecked(stored: Stored) -> None:
    ledger, _, _, verifiers = stored
    assert round_proof_problems(ledger, verifiers) == []


def test_an_edited_aggregate_is_detected(stored: Stored) -> None:
    ledger, transcript, config, verifiers = stored
    statement = transcript.statement
    wrong = statement.aggregate.copy()
    wrong[3:4] += np.uint32(1)
    edited = replace(transcript, statement=replace(statement, aggregate=wrong))
    ledger.store_round_proof(proof_of(edited, config))
    (problem,) = round_proof_problems(ledger, verifiers)
    assert problem.kind is ProblemKind.ROUND_PROOF
    assert (problem.session_id, problem.round) == (SESSION, ROUND)
    # The answers were signed over the original statement.
    assert "answer another statement" in problem.message


def test_an_edited_answer_or_parameter_is_detected(stored: Stored) -> None:
    ledger, transcript, config, verifiers = stored
    first = transcript.answers[0]
    forged = replace(first, answers=(first.answers[0] ^ 1, *first.answers[1:]))
    ledger.store_round_proof(
        proof_of(replace(transcript, answers=(forged, *transcript.answers[1:])), config)
    )
    (problem,) = round_proof_problems(ledger, verifiers)
    assert "invalid signature" in problem.message
    # Another round's parameters: nothing in the transcript is signed over them.
    ledger.store_round_proof(proof_of(transcript, replace(config, attempt=1)))
    (problem,) = round_proof_problems(ledger, verifiers)
    assert "signature" in problem.message


def test_evidence_of_another_aggregate_is_detected(stored: Stored) -> None:
    """A consistent transcript of a different round (a valid proof, but not of the agreed
    record's aggregate) is reported too."""
    ledger, _, config, verifiers = stored
    inputs = np.ones((PEERS, LENGTH), dtype=np.uint32)  # same peers and keys, other inputs
    other = simulate(
        PEERS, LENGTH, threshold=THRESHOLD, session_id=SESSION, round_=ROUND, seed=3, inputs=inputs
    )
    assert other.succinct is not None
    ledger.store_round_proof(proof_of(other.succinct, config))
    problems = round_proof_problems(ledger, verifiers)
    assert [p.kind for p in problems] == [ProblemKind.ROUND_PROOF]
    assert "not the one the agreed record holds" in problems[0].message
