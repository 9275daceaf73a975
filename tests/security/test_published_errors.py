"""Error text that leaves a hospital's peer carries no patient data (peer/published.py).

The attack: nobody needs to attack anything. A hospital's data is imperfect (a record
without its regression target), its peer refuses or fails, and the error is answered to
the operator (the proposal's refusal, ``ceremony run``'s status) and to the other
hospitals' peers (their Status calls). The data layer's messages name the patients
concerned, so those answers would carry them. Here every answer names the category and a
reference, and the hospital's own log holds the full text under the same reference.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import sys
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from peer.attempts import INTERNAL_ERROR, internal_error
from peer.beacon import FixedNonce
from peer.config import PeerConfig, load_config
from peer.data import PatientRecord, PatientStore, split_dataset, write_hospital_stores
from peer.data.datasets import diabetes_feature_names, diabetes_records
from peer.data.errors import (
    CSVImportError,
    DataError,
    ImportIssue,
    ReadOnlyError,
    SchemaMismatchError,
    SourceError,
    SourceIssue,
    SplitError,
)
from peer.data.sources import SourceConfigError
from peer.ledger import Ledger
from peer.node import PeerNode
from peer.operator.client import ProposalRefused
from peer.payloads import LocalContribution, Payload, default_payload
from peer.payloads.evaluation import RegressionEvaluation
from peer.payloads.statistics import StatisticsDataError
from peer.payloads.vector import VectorPayload
from peer.published import DATA_PROBLEM, PublishableError, disclose
from peer.session import ProposalError, SessionProposal
from peer.session_state import SessionState
from peer.training.accounting import PrivacyBudgetError
from peer.wire import peer_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
from network_harness import Network, fixed_nonce, serving_in_process  # type: ignore[import-not-found, unused-ignore]

T = TypeVar("T")
PATIENTS = ("diab-017", "diab-042")  # what a data error names
VALUE = "173.25"  # and a patient's value


# --------------------------------------------------------------------------- the function

DATA_ERRORS: list[Exception] = [
    DataError(f"sqlite:///h.db: column 'target' is missing (patients {', '.join(PATIENTS)})"),
    SchemaMismatchError(f"record {PATIENTS[0]} has 9 features, the store has 10 ({VALUE})"),
    SplitError(f"cannot split: {PATIENTS[0]} and {PATIENTS[1]} are duplicates"),
    CSVImportError(
        "ehr.csv",
        [ImportIssue(4, "hba1c", f"{VALUE} for patient {PATIENTS[0]} is not a number")],
    ),
    SourceError("sqlite:///ehr.db", [SourceIssue(f"patient {PATIENTS[1]}", f"age {VALUE}")]),
    ReadOnlyError("sqlite:///ehr.db", [SourceIssue(None, f"{PATIENTS[0]} {VALUE}")]),
    SourceConfigError(f"[data] id column holds {PATIENTS[0]} twice ({VALUE})"),
    StatisticsDataError(f"feature 'x' is not in the data of {PATIENTS[0]} ({VALUE})"),
]


def _leaks(text: str) -> list[str]:
    return [secret for secret in (*PATIENTS, VALUE) if secret in text]


@pytest.mark.parametrize("error", DATA_ERRORS, ids=lambda e: type(e).__name__)
def test_a_data_error_is_published_as_its_category_and_a_reference(error: Exception) -> None:
    said = disclose(error, "hospital-a")
    assert _leaks(str(error))  # the hazard is real: the message names them
    assert _leaks(said.public) == [], said.public
    assert said.public == f"{DATA_PROBLEM} at hospital-a (see its log, ref {said.ref})"
    # The full text stays for the local log, under the same reference.
    assert str(error) in said.local
    assert f"ref {said.ref}" in said.local


def test_a_value_error_quoting_patient_values_publishes_only_its_type() -> None:
    # The evaluation's own check names the bad values (peer/payloads/evaluation.py).
    labels = np.array([1.0, float("nan"), 173.25])
    with pytest.raises(ValueError, match="not finite") as caught:
        RegressionEvaluation(histogram_bins=4, loss_bound=5.0, target_bound=200.0).check_labels(
            labels, "hospital-a"
        )
    said = disclose(caught.value, "hospital-a")
    assert "nan" in str(caught.value)
    assert said.public == f"ValueError at hospital-a (see its log, ref {said.ref})"
    assert str(caught.value) in said.local


def test_a_real_store_missing_targets_is_not_published(tmp_path: Path) -> None:
    store = PatientStore(f"sqlite:///{tmp_path / 'data.db'}")
    store.create()
    records = diabetes_records(np.random.default_rng(0))[:20]
    store.add_records([dataclasses.replace(r, target=None) for r in records])
    with pytest.raises(DataError) as caught:
        store.targets("train")
    said = disclose(caught.value, "hospital-a")
    named = [r.patient_id for r in records if r.patient_id in str(caught.value)]
    assert named  # the store's message names them
    assert not any(p in said.public for p in named), said.public
    assert all(p in said.local for p in named)


@pytest.mark.parametrize(
    "error",
    [
        PublishableError("hospital-a has 1234 training records, more than max_records 1000"),
        ProposalError("training payload: lr must be positive"),
        PrivacyBudgetError("privacy budget of hospital-a: needs epsilon 3, 1 left"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_what_the_operator_needs_to_fix_a_proposal_is_published_as_is(error: Exception) -> None:
    assert disclose(error, "hospital-a").public == str(error)


def test_an_unexpected_error_publishes_its_type_and_the_same_reference_each_time() -> None:
    bug = KeyError(f"patient {PATIENTS[0]}")
    first = internal_error(bug, "hospital-c")
    again = internal_error(KeyError(bug.args[0]), "hospital-c")
    assert first.public.startswith(f"{INTERNAL_ERROR}: KeyError at hospital-c")
    assert _leaks(first.public) == []
    assert PATIENTS[0] in first.local
    assert f"ref {first.ref}" in first.local
    # The same error, the same reference: the runner recognises a recurring error by its
    # text (peer/attempts.py, SAME_ERROR_ATTEMPTS); another error, another reference.
    assert again == first
    assert internal_error(KeyError("other"), "hospital-c").ref != first.ref
    # Keyed: a guess of the hidden text cannot be checked without this process's key.
    assert disclose(bug, "hospital-c", key=b"k" * 32).ref != first.ref


# --------------------------------------------------------------------------- the network

REGRESSION: dict[str, Any] = {
    "kind": "training",
    "model": "logreg",
    "input_dim": 10,
    "training_rounds": 2,
    "local_steps": 5,
    "batch_size": 16,
    "lr": 0.5,
    "clip_norm": 1.0,
    "noise_multiplier": 1.0,
    "max_records": 1000,
    "feature_bound": 0.2,
    "standardize_noise": 1.0,
    "task": "regression",
    "target_bound": 200.0,
    "target_center": 180.0,
    "residual_bound": 300.0,
}


def _hospitals(tmp_path: Path) -> tuple[Network, SessionProposal, list[PeerNode]]:
    """Three in-process peers, each with its share of the diabetes records in its own store."""
    network = Network.create(tmp_path, 3, length=8, start=False, policy={"max_epsilon": 1000.0})
    configs = [load_config(network.kit.kits[p].config) for p in network.peers]
    records = diabetes_records(np.random.default_rng(0))
    parts = split_dataset(records, 3, "dirichlet", alpha=1.0, rng=np.random.default_rng(1))
    write_hospital_stores(
        parts, [c.data_url for c in configs], feature_names=diabetes_feature_names()
    )
    proposal = SessionProposal(
        "reg",
        tuple(network.peers),
        rounds=REGRESSION["training_rounds"] + 2,
        threshold=3,
        payload=REGRESSION,
        bits=64,
        seed=3,
        stage_seconds=4.0,
        prepare_seconds=10.0,
    )
    nodes = [PeerNode(c, nonce_rng=FixedNonce(fixed_nonce(c.peer_id))) for c in configs]
    return network, proposal, nodes


def _untargeted(store_url: str) -> list[str]:
    """Records imported later without their target (a data manager's slip): their ids."""
    store = PatientStore(store_url)
    features = np.zeros(10)
    late = [
        PatientRecord(f"late-{i:03d}", "unknown", features, 0, "train", target=None)
        for i in (17, 42)
    ]
    store.add_records(late)
    store.dispose()
    return [r.patient_id for r in late]


def _ref_of(text: str) -> str:
    found = re.search(r"ref ([0-9a-f]{6})\)", text)
    assert found is not None, text
    return found.group(1)


def _logged(caplog: pytest.LogCaptureFixture, ref: str) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if f"ref {ref}" in r.getMessage())


@pytest.mark.timeout(120)
def test_a_refusal_for_missing_targets_names_no_patient_to_the_operator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    network, proposal, nodes = _hospitals(tmp_path)
    victim = nodes[2]
    patients = _untargeted(victim.config.data_url)

    async def body() -> dict[str, str]:
        operator = network.operator()
        try:
            with pytest.raises(ProposalRefused) as refused:
                await operator.propose(proposal)
            return dict(refused.value.answers)
        finally:
            await operator.close()

    with caplog.at_level(logging.WARNING):
        refused = asyncio.run(serving_in_process(nodes, body))
    reason = refused[victim.me]
    assert list(refused) == [victim.me], refused
    assert reason.startswith(f"cannot take part: {DATA_PROBLEM} at {victim.me}"), reason
    assert not any(p in reason for p in patients), reason
    logged = _logged(caplog, _ref_of(reason))
    assert all(p in logged for p in patients), logged


@pytest.mark.timeout(120)
def test_a_session_failing_on_missing_targets_names_no_patient_in_its_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    network, proposal, nodes = _hospitals(tmp_path)
    victim, other = nodes[2], nodes[0]

    async def body() -> tuple[pb.SessionStatus, pb.SessionStatus, list[str]]:
        operator = network.operator()
        try:
            await operator.propose(proposal)  # every store is complete: all accept
            patients = _untargeted(victim.config.data_url)  # then records come in untargeted
            await operator.start(proposal.session_id, proposal.participants)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while True:
                seen = (await operator.status(proposal.session_id, [victim.me]))[victim.me]
                assert isinstance(seen, pb.SessionStatus), seen
                if seen.state == SessionState.FAILED or loop.time() > deadline:
                    break
                await asyncio.sleep(0.2)
            # What another hospital's peer reads: its own Status call to the victim.
            views = dict(await other.catch_up.ask_others(proposal, timeout=10.0))
            return seen, views[victim.me], patients
        finally:
            await operator.close()

    with caplog.at_level(logging.WARNING):
        seen, peer_view, patients = asyncio.run(serving_in_process(nodes, body))
    assert seen.state == SessionState.FAILED, seen
    for status in (seen, peer_view):
        assert status.detail.startswith(f"{DATA_PROBLEM} at {victim.me}"), status.detail
        assert not any(p in status.detail for p in patients), status.detail
    logged = _logged(caplog, _ref_of(seen.detail))
    assert all(p in logged for p in patients), logged


class ReadsTargetsEachRound(VectorPayload):
    """A hospital's payload that reads its store's regression targets when it prepares a
    contribution (as a payload reading fresh data each round does), then sends its vector."""

    def __init__(self, length: int, store_url: str) -> None:
        super().__init__(length)
        self.store = PatientStore(store_url)

    def prepare(self, round_: int) -> LocalContribution:
        self.store.targets("train")  # raises: records without a target, named
        return super().prepare(round_)


@pytest.mark.timeout(120)
def test_a_contribution_that_cannot_be_prepared_names_no_patient_in_its_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    network = Network.create(tmp_path, 3, length=8, start=False)
    proposal = network.proposal("prep", rounds=1, stage_seconds=1.0, prepare_seconds=1.0)
    configs = [load_config(network.kit.kits[p].config) for p in network.peers]
    victim, other = configs[2], configs[0]
    write_hospital_stores([[]], [victim.data_url], feature_names=diabetes_feature_names())
    patients = _untargeted(victim.data_url)

    def factory(p: SessionProposal, config: PeerConfig, ledger: Ledger) -> Payload:
        if config is victim:
            return ReadsTargetsEachRound(p.vector_length, config.data_url)
        return default_payload(p, config, ledger)

    nodes = [
        PeerNode(c, payload_factory=factory, nonce_rng=FixedNonce(fixed_nonce(c.peer_id)))
        for c in configs
    ]

    async def body() -> tuple[pb.SessionStatus, pb.SessionStatus]:
        operator = network.operator()
        try:
            await operator.propose(proposal)
            await operator.start(proposal.session_id, proposal.participants)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while True:
                seen = (await operator.status(proposal.session_id, [victim.peer_id]))[
                    victim.peer_id
                ]
                assert isinstance(seen, pb.SessionStatus), seen
                if seen.detail.startswith("cannot prepare") or loop.time() > deadline:
                    break
                await asyncio.sleep(0.1)
            views = dict(await nodes[0].catch_up.ask_others(proposal, timeout=10.0))
            return seen, views[victim.peer_id]
        finally:
            await operator.close()

    with caplog.at_level(logging.WARNING):
        seen, peer_view = asyncio.run(serving_in_process(nodes, body))
    assert other.peer_id != victim.peer_id
    public = f"cannot prepare: {DATA_PROBLEM} at {victim.peer_id} (see its log, ref "
    assert seen.detail.startswith(public), seen.detail
    ref = _ref_of(seen.detail)
    # The other peer may read it a moment later: the next attempt's, the same error.
    assert peer_view.detail in ("", seen.detail) or peer_view.detail.startswith(public)
    for status in (seen, peer_view):
        assert not any(p in status.detail for p in patients), status.detail
    logged = _logged(caplog, ref)
    assert all(p in logged for p in patients), logged
    # The hospital's own ledger keeps the full reason of its aborted attempt.
    with network.ledger(victim.peer_id) as ledger:
        reasons = [a.abort_reason or "" for a in ledger.round_attempts("prep")]
    assert any(f"ref {ref}" in r and all(p in r for p in patients) for r in reasons), reasons


@pytest.mark.timeout(60)
def test_an_unexpected_error_in_a_call_answers_its_type_not_its_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    network = Network.create(tmp_path, 3, length=8, start=False)
    proposal, known = network.proposal("odd", rounds=1), network.proposal("known", rounds=1)
    configs = [load_config(network.kit.kits[p].config) for p in network.peers]
    victim = configs[2]
    secret = f"patient {PATIENTS[0]} value {VALUE}"

    def factory(p: SessionProposal, config: PeerConfig, ledger: Ledger) -> Payload:
        if config is victim and p.session_id == "odd":
            raise KeyError(secret)  # a bug reading the site's data
        return default_payload(p, config, ledger)

    nodes = [
        PeerNode(c, payload_factory=factory, nonce_rng=FixedNonce(fixed_nonce(c.peer_id)))
        for c in configs
    ]

    def broken_status(session_id: str) -> pb.SessionStatus:
        raise KeyError(secret)  # a bug answering Status

    nodes[2].runner.status_of = broken_status  # type: ignore[method-assign]

    async def body() -> tuple[str, object]:
        operator = network.operator()
        try:
            with pytest.raises(ProposalRefused) as refused:
                await operator.propose(proposal)
            await operator.propose(known)  # accepted: its Status is answered (by a bug)
            statuses = await operator.status(known.session_id, [victim.peer_id])
            return refused.value.answers[victim.peer_id], statuses[victim.peer_id]
        finally:
            await operator.close()

    with caplog.at_level(logging.WARNING):
        reason, answer = asyncio.run(serving_in_process(nodes, body))
    assert reason.startswith(f"cannot take part: KeyError at {victim.peer_id} (see its log"), reason
    assert isinstance(answer, Exception), answer
    assert f"{INTERNAL_ERROR}: KeyError at {victim.peer_id} (see its log" in str(answer), answer
    for text in (reason, str(answer)):
        assert _leaks(text) == [], text
        assert secret in _logged(caplog, _ref_of(text))
