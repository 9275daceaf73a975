"""The training payload in process: three hospitals, rounds summed in the ring, no network.

What the network tests cannot show cheaply: the standardization round gives the pooled mean
and standard deviation, a training round's new model is the example-weighted mean of the
local models, every peer concludes byte for byte the same, and a round that would exceed a
hospital's budget is refused.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dashboard.data import roc_points, score_histogram
from peer.data import (
    breast_cancer_feature_names,
    breast_cancer_records,
    split_dataset,
    write_hospital_stores,
)
from peer.ledger import Ledger
from peer.payloads.training import PrivacyBudgetError, TrainingPayload, training_payload
from peer.session import ProposalError, SessionProposal
from scripts.inprocess_training import local_config, plain_round

PEERS = ("hospital-a", "hospital-b", "hospital-c")
PAYLOAD = {
    "kind": "training",
    "model": "logreg",
    "input_dim": 30,
    "training_rounds": 1,
    "local_steps": 5,
    "batch_size": 16,
    "lr": 0.5,
    "clip_norm": 1.0,
    "noise_multiplier": 1.0,
    "max_records": 1000,
}


def make_proposal(**changes: object) -> SessionProposal:
    fields: dict[str, object] = {
        "session_id": "train",
        "participants": PEERS,
        "rounds": 3,
        "threshold": 3,
        "payload": PAYLOAD,
        "bits": 64,
        "seed": 3,
    }
    fields.update(changes)
    return SessionProposal(**fields)  # type: ignore[arg-type]


@pytest.fixture
def hospitals(tmp_path: Path) -> list[TrainingPayload]:
    parts = split_dataset(
        breast_cancer_records(np.random.default_rng(0)),
        3,
        "dirichlet",
        alpha=0.5,
        rng=np.random.default_rng(1),
    )
    configs = [local_config(tmp_path, peer) for peer in PEERS]
    write_hospital_stores(
        parts, [c.data_url for c in configs], feature_names=breast_cancer_feature_names()
    )
    proposal = make_proposal()
    payloads = []
    for config in configs:
        ledger = Ledger(config.ledger_url)
        ledger.create()
        ledger.record_proposal(
            "train",
            proposal.document(),
            proposer="op",
            participants=PEERS,
            threshold=2,
            rounds_planned=3,
        )
        ledger.decide_session("train", accept=True)
        payload = training_payload(proposal, config, ledger)
        payload.rng = np.random.default_rng(7)
        payloads.append(payload)
    return payloads


def test_standardization_round_gives_the_pooled_statistics(
    hospitals: list[TrainingPayload],
) -> None:
    models = plain_round(hospitals, 1)
    assert len(set(models)) == 1, "every hospital must conclude the same bytes"
    union = np.concatenate([p.site.arrays("train")[0] for p in hospitals]).astype(np.float64)
    mean, std = np.split(np.frombuffer(models[0], dtype="<f8"), 2)
    # The sums are released with Gaussian noise of standardize_noise * sqrt(1 + 2d) on each
    # normalized sum (per hospital), so the pooled statistics come back within the noise:
    # the mean within a few noise standard deviations / n, in units of the feature bound.
    spec = hospitals[0].spec
    bounds = spec.feature_bounds()
    error = 6 * spec.standardize_std() * np.sqrt(3) / len(union)
    assert np.all(np.abs(mean - union.mean(axis=0)) <= error * bounds)
    assert np.all(std > 0)
    metrics = hospitals[0].ledger.agreed_records("train")[0].record.metrics
    dp = metrics["dp"]
    assert isinstance(dp, dict)
    assert dp["standardization"]["sigma"] == spec.standardize_noise


def test_training_round_averages_the_local_models(hospitals: list[TrainingPayload]) -> None:
    plain_round(hospitals, 1)
    before = hospitals[0].global_weights(2)
    models = plain_round(hospitals, 2)
    assert len(set(models)) == 1
    after = np.frombuffer(models[0], dtype="<f4")
    assert not np.allclose(after, before)
    stored = hospitals[0].ledger.agreed_records("train")[-1].record
    assert stored.metrics["round_kind"] == "train"
    assert "examples" not in stored.metrics, "the exact example count is not released"
    assert all(eps > 0 for eps in stored.epsilon.values())
    # The evaluation round changes nothing and reports the trained model's metrics.
    final = plain_round(hospitals, 3)
    assert final[0] == models[0]
    metrics = hospitals[0].ledger.agreed_records("train")[-1].record.metrics
    assert metrics["round_kind"] == "evaluate"
    assert 0.0 <= float(str(metrics["accuracy"])) <= 1.0
    # The (noisy, already charged) score histograms are published for ROC and calibration,
    # in the layout the dashboard reads, and agree with the published AUC.
    final_record = hospitals[0].ledger.agreed_records("train")[-1]
    histogram = score_histogram(final_record)
    assert histogram is not None
    positive, negative = histogram
    assert len(positive) == len(negative) == hospitals[0].spec.histogram_bins
    assert sum(positive) > 0
    assert sum(negative) > 0
    points = roc_points(positive, negative)
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(points))
    assert area == pytest.approx(float(str(metrics["auc"])), abs=1e-3)


def test_a_round_over_the_budget_is_refused(hospitals: list[TrainingPayload]) -> None:
    plain_round(hospitals, 1)
    poor = hospitals[0]
    poor.max_epsilon = poor.epsilon_needed() / 10
    with pytest.raises(PrivacyBudgetError, match="refuses round"):
        poor.prepare(2)


def test_session_shape_is_checked(tmp_path: Path) -> None:
    config = local_config(tmp_path, "hospital-a")
    ledger = Ledger(config.ledger_url)
    with pytest.raises(ProposalError, match="has 3 rounds"):
        training_payload(make_proposal(rounds=5), config, ledger)
    with pytest.raises(ProposalError, match="64-bit"):
        training_payload(make_proposal(bits=32), config, ledger)
    with pytest.raises(ProposalError, match="unknown training payload keys: colour"):
        training_payload(make_proposal(payload={**PAYLOAD, "colour": "red"}), config, ledger)


def test_a_retry_resends_the_same_contribution_until_the_chain_moves(
    hospitals: list[TrainingPayload],
) -> None:
    """A retried attempt releases nothing new (same value, same release id, no new charge);
    once the ledger moved, the contribution is recomputed and is a new release."""
    first = hospitals[0].prepare(1)
    again = hospitals[0].prepare(1)
    assert again.release_id == first.release_id
    assert np.array_equal(again.vector, first.vector)
    plain_round(hospitals, 1)
    moved = hospitals[0].prepare(1)
    assert moved.release_id != first.release_id


def test_every_release_of_a_session_is_charged_and_composed(
    hospitals: list[TrainingPayload],
) -> None:
    """Standardization, training and evaluation are all charged, with their mechanisms, and
    the ledger's figure is the accountant's composition of them (not their sum)."""
    from peer.training.accounting import composed_epsilon

    for round_ in (1, 2, 3):
        plain_round(hospitals, round_)
    ledger, me = hospitals[0].ledger, hospitals[0].me
    charges = ledger.privacy_charges(me)
    assert [c.round for c in charges] == [1, 2, 3]
    mechanisms = []
    for c in charges:
        event: Any = c.charge.event
        mechanisms.append(sorted(e["mechanism"] for e in event.get("events", [event])))
    assert mechanisms == [
        ["gaussian"],
        ["gaussian", "poisson-gaussian"],
        ["gaussian"],
    ]
    events = [dict(c.charge.event) for c in charges if c.charge.event is not None]
    spent = ledger.privacy_spent(me)
    assert spent.epsilon == pytest.approx(composed_epsilon(events))  # type: ignore[arg-type]
    assert spent.epsilon <= sum(c.charge.epsilon for c in charges) + 1e-9


def test_a_participant_cannot_inflate_its_weight(hospitals: list[TrainingPayload]) -> None:
    """Issue 9 item 6: the old vector carried [delta * n, n] and conclude divided by the
    summed n, so one hospital claiming a huge n moved the global model ~4,900 times further.
    Weights are now public and the average update is clamped to the public bound."""
    plain_round(hospitals, 1)
    honest = [p.prepare(2) for p in hospitals[:2]]
    payload = hospitals[0]
    bound = payload.spec.update_bound()
    p = payload.spec.n_parameters()
    quantizer = payload.quantizer(2)
    # The attacker scales its update by 4,900 (as if it had 4,900x the records) ...
    inflated = np.concatenate((np.full(p, 4900.0 * bound), np.zeros(payload.spec.eval_length())))
    attack_vectors = [
        quantizer.quantize(inflated, np.random.default_rng(0)).values,
        # ... or sends whatever ring words push the sum furthest (no range proofs).
        np.full(payload.vector_length(2), np.iinfo(np.uint64).max // 2, dtype=np.uint64),
    ]
    base = payload.global_weights(2).astype(np.float64)
    for attack in attack_vectors:
        total = honest[0].vector + honest[1].vector + attack
        result = payload.conclude(2, total, PEERS)
        moved = np.frombuffer(result.model, dtype="<f4").astype(np.float64) - base
        assert np.all(np.abs(moved) <= bound * (1 + 1e-6) + 1e-6)


def test_weights_are_public_and_bounded(tmp_path: Path) -> None:
    config = local_config(tmp_path, "hospital-a")
    # The site's data is checked against the proposal when it arrives: it must exist.
    records = breast_cancer_records(np.random.default_rng(0))[:100]
    write_hospital_stores([records], [config.data_url], feature_names=breast_cancer_feature_names())
    ledger = Ledger(config.ledger_url)
    with pytest.raises(ProposalError, match="missing: hospital-c"):
        training_payload(
            make_proposal(payload={**PAYLOAD, "weights": {"hospital-a": 1, "hospital-b": 1}}),
            config,
            ledger,
        )
    with pytest.raises(ProposalError, match=r"weights \(each in \(0, 1\]\)"):
        training_payload(
            make_proposal(payload={**PAYLOAD, "weights": dict.fromkeys(PEERS, 4900)}),
            config,
            ledger,
        )
    payload = training_payload(
        make_proposal(
            payload={**PAYLOAD, "weights": {"hospital-a": 1, "hospital-b": 0.5, "hospital-c": 0.25}}
        ),
        config,
        ledger,
    )
    assert payload.spec.weight("hospital-b") == 0.5
