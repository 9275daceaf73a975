"""The training payload in process: three hospitals, rounds summed in the ring, no network.

What the network tests cannot show cheaply: the standardization round gives the pooled mean
and standard deviation, a training round's new model is the example-weighted mean of the
local models, every peer concludes byte for byte the same, and a round that would exceed a
hospital's budget is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peer.config import PeerConfig, Policy
from peer.data import (
    breast_cancer_feature_names,
    breast_cancer_records,
    split_dataset,
    write_hospital_stores,
)
from peer.learning import PrivacyBudgetError, TrainingPayload, training_payload
from peer.ledger import AgreedRecord, Ledger
from peer.session import ProposalError, SessionProposal
from secagg.crypto import sha256

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


def config_for(tmp_path: Path, peer: str, max_epsilon: float = 1000.0) -> PeerConfig:
    return PeerConfig(
        path=tmp_path / f"{peer}.toml",
        peer_id=peer,
        listen="127.0.0.1:0",
        data_url=f"sqlite:///{tmp_path / peer}-data.db",
        ledger_url=f"sqlite:///{tmp_path / peer}-ledger.db",
        policy=Policy(max_epsilon=max_epsilon),
        cert=tmp_path / f"{peer}.cert",
        key=tmp_path / f"{peer}.key",
        ca=tmp_path / f"{peer}.ca",
        roster=tmp_path / f"{peer}.roster",
        crl=tmp_path / f"{peer}.crl",
    )


@pytest.fixture
def hospitals(tmp_path: Path) -> list[TrainingPayload]:
    parts = split_dataset(
        breast_cancer_records(np.random.default_rng(0)),
        3,
        "dirichlet",
        alpha=0.5,
        rng=np.random.default_rng(1),
    )
    configs = [config_for(tmp_path, peer) for peer in PEERS]
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


def run_round(payloads: list[TrainingPayload], round_: int) -> list[bytes]:
    """Every hospital prepares, the ring sum is formed, every hospital concludes and stores."""
    contributions = [p.prepare(round_) for p in payloads]
    total = np.zeros_like(contributions[0].vector)
    for contribution in contributions:
        np.add(total, contribution.vector, out=total)
    results = [p.conclude(round_, total, PEERS) for p in payloads]
    for payload, result in zip(payloads, results, strict=True):
        ledger = payload.ledger
        record = AgreedRecord.build(
            "train",
            round_,
            aggregate_hash=sha256(total.tobytes()),
            model_hash=sha256(result.model),
            metrics=dict(result.metrics),
            epsilon={p.me: c.epsilon for p, c in zip(payloads, contributions, strict=True)},
            prev_hash=ledger.session_head("train"),
        )
        ledger.append_agreed(record, {}, checkpoint=result.model, min_signatures=0)
    return [r.model for r in results]


def test_standardization_round_gives_the_pooled_statistics(
    hospitals: list[TrainingPayload],
) -> None:
    models = run_round(hospitals, 1)
    assert len(set(models)) == 1, "every hospital must conclude the same bytes"
    union = np.concatenate([p.store.load("train")[0] for p in hospitals]).astype(np.float64)
    mean, std = np.split(np.frombuffer(models[0], dtype="<f8"), 2)
    np.testing.assert_allclose(mean, union.mean(axis=0), rtol=1e-6)
    # Sums of squares are quantized against the public bound feature_bound^2 * max_records,
    # so features with a tiny variance (~1e-6) lose a little precision: within 2 %.
    np.testing.assert_allclose(std, union.std(axis=0), rtol=2e-2)


def test_training_round_averages_the_local_models(hospitals: list[TrainingPayload]) -> None:
    run_round(hospitals, 1)
    before = hospitals[0].global_weights(2)
    models = run_round(hospitals, 2)
    assert len(set(models)) == 1
    after = np.frombuffer(models[0], dtype="<f4")
    assert not np.allclose(after, before)
    stored = hospitals[0].ledger.agreed_records("train")[-1].record
    assert stored.metrics["round_kind"] == "train"
    assert stored.metrics["examples"] == sum(len(p.store.load("train")[1]) for p in hospitals)
    assert all(eps > 0 for eps in stored.epsilon.values())
    # The evaluation round changes nothing and reports the trained model's metrics.
    final = run_round(hospitals, 3)
    assert final[0] == models[0]
    metrics = hospitals[0].ledger.agreed_records("train")[-1].record.metrics
    assert metrics["round_kind"] == "evaluate"
    assert 0.0 <= float(str(metrics["accuracy"])) <= 1.0


def test_a_round_over_the_budget_is_refused(hospitals: list[TrainingPayload]) -> None:
    run_round(hospitals, 1)
    poor = hospitals[0]
    poor.max_epsilon = poor.epsilon_needed() / 10
    with pytest.raises(PrivacyBudgetError, match="refuses round"):
        poor.prepare(2)


def test_session_shape_is_checked(tmp_path: Path) -> None:
    config = config_for(tmp_path, "hospital-a")
    ledger = Ledger(config.ledger_url)
    with pytest.raises(ProposalError, match="has 3 rounds"):
        training_payload(make_proposal(rounds=5), config, ledger)
    with pytest.raises(ProposalError, match="64-bit"):
        training_payload(make_proposal(bits=32), config, ledger)
    with pytest.raises(ProposalError, match="unknown training payload keys: colour"):
        training_payload(make_proposal(payload={**PAYLOAD, "colour": "red"}), config, ledger)
