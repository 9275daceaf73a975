"""`verify-ledger`'s gaps closed (peer/ledger_check.py), on real ledgers holding a secagg round
as a peer stores it (tests/round/test_round_proofs.py is the model):

* a round run under other parameters than the accepted proposal fixes is reported, although
  its evidence verifies under its own (signed) parameters;
* an agreed round without stored evidence is a warning naming it, never a silent pass;
* every site's signed acceptance of the proposal is re-checked with the roster keys: a
  forged, missing or foreign one is reported naming the site.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peer.acceptances import AcceptanceStatus, check_acceptances, proposal_digest
from peer.beacon import commit, commitment_signed_bytes
from peer.codec import encode
from peer.ledger import AgreedRecord, Ledger, LedgerReport, ProblemKind, StoredProof
from peer.ledger_check import (
    acceptance_problems,
    round_parameter_problems,
    round_proof_problems,
    unrecheckable_rounds,
)
from peer.round.agreement import aggregate_hash
from peer.session import SessionProposal
from secagg import RoundConfig, SuccinctTranscript, testing
from secagg.crypto import Signer, sha256
from secagg.simulate import simulate

SESSION, PEERS, LENGTH, THRESHOLD, COLLUDERS = "gaps", 7, 40, 5, 1


class Study:
    """A ledger whose accepted proposal fixes n = 7, t = 5, c = 1, length 40."""

    def __init__(self, tmp_path: Path) -> None:
        self.peers = simulate(PEERS, LENGTH, threshold=THRESHOLD, colluders=COLLUDERS).peers
        self.signers, self.verifiers = testing.test_identities(self.peers, 3)
        self.proposal = SessionProposal(
            SESSION,
            participants=self.peers,
            rounds=3,
            threshold=THRESHOLD,
            payload={"kind": "vector", "length": LENGTH},
            colluders=COLLUDERS,
        )
        self.ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
        self.ledger.create()
        self.ledger.record_proposal(
            SESSION,
            self.proposal.document(),
            proposer=self.peers[0],
            participants=self.peers,
            threshold=THRESHOLD,
            rounds_planned=3,
        )
        self.ledger.decide_session(SESSION, accept=True)

    def agree(
        self,
        round_: int,
        *,
        threshold: int = THRESHOLD,
        colluders: int = COLLUDERS,
        evidence: bool = True,
    ) -> SuccinctTranscript:
        """Run round ``round_`` under the given parameters, append its record signed by every
        peer and (unless not ``evidence``) its evidence, as a peer does."""
        result = simulate(
            PEERS,
            LENGTH,
            threshold=threshold,
            colluders=colluders,
            session_id=SESSION,
            round_=round_,
            seed=3,  # the identities' seed (secagg.testing)
        )
        transcript = result.succinct
        assert transcript is not None
        record = AgreedRecord.build(
            SESSION,
            round_,
            aggregate_hash=aggregate_hash(transcript.statement.aggregate),
            model_hash=sha256(b"model"),
            metrics={"survivors": list(transcript.survivors)},
            epsilon={},
            prev_hash=self.ledger.session_head(SESSION),
        )
        self.ledger.append_agreed(
            record, {u: self.signers[u].sign(record.payload()) for u in self.peers}
        )
        if evidence:
            config = RoundConfig(
                SESSION, round_, self.peers, threshold, LENGTH, colluders=colluders
            )
            self.ledger.store_round_proof(
                StoredProof(
                    SESSION,
                    round_,
                    0,
                    transcript.aggregator,
                    json.dumps(config.as_dict(), sort_keys=True),
                    encode(transcript)[1],
                )
            )
        return transcript

    def accept(self, signed_by: dict[str, str] | None = None, extra: str | None = None) -> None:
        """Store every participant's signed acceptance (beacon commitment), as the proposer
        hands them out; ``signed_by`` maps a peer to the peer whose key forges its one."""
        session = self.ledger.session(SESSION)
        assert session is not None
        digest = proposal_digest(session)
        self.ledger.session_nonce(SESSION, lambda: b"\x07" * 32)
        commitments: dict[str, tuple[bytes, bytes]] = {}
        for peer in (*self.peers, *([extra] if extra else [])):
            commitment = commit(digest, peer, bytes([len(peer)]) * 32)
            signer: Signer = (
                self.signers[(signed_by or {}).get(peer, peer)]
                if peer in self.signers
                else self.signers[self.peers[0]]
            )
            commitments[peer] = (
                commitment,
                signer.sign(commitment_signed_bytes(digest, peer, commitment)),
            )
        self.ledger.store_commitments(SESSION, commitments)


@pytest.fixture
def study(tmp_path: Path) -> Study:
    return Study(tmp_path)


def test_rounds_run_under_the_accepted_parameters_pass(study: Study) -> None:
    study.agree(1)
    assert round_proof_problems(study.ledger, study.verifiers) == []
    assert round_parameter_problems(study.ledger) == []
    assert unrecheckable_rounds(study.ledger) == []


def test_a_round_run_under_other_parameters_than_accepted_is_reported(study: Study) -> None:
    # The attack: round 2 runs with a collusion bound of 0 (a lower consistency quorum)
    # where the hospitals accepted 1. Its evidence is consistent and verifies under its own
    # signed parameters, so the succinct re-check alone passes it.
    study.agree(1)
    study.agree(2, colluders=0)
    assert round_proof_problems(study.ledger, study.verifiers) == []
    (problem,) = round_parameter_problems(study.ledger)
    assert problem.kind is ProblemKind.ROUND_PARAMETERS
    assert (problem.session_id, problem.round) == (SESSION, 2)
    assert "colluders 0 (the proposal fixes 1)" in problem.message
    assert "round 2" in str(problem)


def test_each_differing_parameter_is_named(study: Study) -> None:
    study.agree(1)
    (proof,) = study.ledger.round_proofs()
    fields = json.loads(proof.config_json)
    fields.update(threshold=6, vector_length=41, bits=64, attempt=2)
    fields["peers"] = [*fields["peers"][:-1], "hospital-z"]
    study.ledger.store_round_proof(
        StoredProof(SESSION, 1, 0, proof.aggregator, json.dumps(fields), proof.transcript)
    )
    (problem,) = round_parameter_problems(study.ledger)
    for expected in (
        "threshold 6 (the proposal fixes 5)",
        "vector_length 41 (the proposal fixes 40)",
        "bits 64 (the proposal fixes 32)",
        "attempt 2 (the evidence row says 0)",
        "'hospital-z'] (the proposal fixes [",
    ):
        assert expected in problem.message, problem.message


def test_a_round_without_evidence_is_flagged_not_recheckable(study: Study) -> None:
    study.agree(1)
    study.agree(2, evidence=False)  # e.g. agreed before evidence was kept
    (warning,) = unrecheckable_rounds(study.ledger)
    assert warning.kind is ProblemKind.NOT_RECHECKABLE
    assert (warning.session_id, warning.round) == (SESSION, 2)
    assert "no stored evidence" in warning.message
    # A warning is shown, but is not a failure of the records themselves.
    report = LedgerReport("test", 2, 0, warnings=(warning,))
    assert report.ok
    assert "1 warning(s), not re-checkable:" in str(report)
    assert "session 'gaps' round 2: no stored evidence" in str(report)


def test_every_signed_acceptance_is_rechecked(study: Study) -> None:
    study.agree(1)
    study.accept()
    assert acceptance_problems(study.ledger, study.verifiers) == ([], [])
    session = study.ledger.session(SESSION)
    state = study.ledger.beacon_state(SESSION)
    assert session is not None
    assert state is not None
    statuses = {
        a.peer: a.status for a in check_acceptances(session, state.commitments, study.verifiers)
    }
    assert set(statuses.values()) == {AcceptanceStatus.VERIFIED}
    assert {a.status for a in check_acceptances(session, state.commitments, None)} == {
        AcceptanceStatus.UNCHECKED
    }


def test_a_forged_acceptance_is_reported_naming_the_site(study: Study) -> None:
    # The attack: the first site signs an acceptance in the last site's name.
    study.agree(1)
    victim = study.peers[-1]
    study.accept(signed_by={victim: study.peers[0]})
    problems, warnings = acceptance_problems(study.ledger, study.verifiers)
    assert warnings == []
    (problem,) = problems
    assert problem.kind is ProblemKind.ACCEPTANCE
    assert problem.peers == (victim,)
    assert problem.session_id == SESSION
    assert f"acceptance of the proposal by {victim}: signature does not verify" in problem.message


def test_a_missing_or_foreign_acceptance_is_reported(study: Study) -> None:
    study.agree(1)
    study.accept(extra="hospital-z")
    session = study.ledger.session(SESSION)
    state = study.ledger.beacon_state(SESSION)
    assert session is not None
    assert state is not None
    commitments = dict(state.commitments or {})
    del commitments[study.peers[2]]
    statuses = {a.peer: a.status for a in check_acceptances(session, commitments, study.verifiers)}
    assert statuses[study.peers[2]] is AcceptanceStatus.MISSING
    assert statuses["hospital-z"] is AcceptanceStatus.NOT_PARTICIPANT
    problems, _ = acceptance_problems(study.ledger, study.verifiers)
    assert [p.peers for p in problems] == [("hospital-z",)]
    assert "not a participant" in problems[0].message


def test_a_ledger_without_stored_acceptances_warns(study: Study) -> None:
    study.agree(1)
    problems, (warning,) = acceptance_problems(study.ledger, study.verifiers)
    assert problems == []
    assert warning.kind is ProblemKind.NOT_RECHECKABLE
    assert "signed acceptances are not stored" in warning.message
