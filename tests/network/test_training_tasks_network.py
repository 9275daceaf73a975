"""Multi-class and regression sessions over real gRPC: 3 hospital processes, a non-IID split
of scikit-learn's diabetes data (disease progression as the regression target, its terciles
as three classes). Each session must agree on every record at every peer and end with a
model that is better than the untrained one by the agreed metrics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from network_harness import Network

from peer.data import diabetes_feature_names, diabetes_records, split_dataset, write_hospital_stores
from peer.session import SessionProposal

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

BASE: dict[str, Any] = {
    "kind": "training",
    "model": "logreg",
    "input_dim": 10,
    "training_rounds": 2,
    "local_steps": 30,
    "batch_size": 16,
    "lr": 0.5,
    "clip_norm": 1.0,
    # Moderate DP-SGD noise too (σ = 1 at batch 16 left the +0.1 accuracy check to the luck of
    # the noise draw): the federation is what this test checks, DP utility is measured in
    # BENCHMARKS.md.
    "noise_multiplier": 0.3,
    "max_records": 1000,
    # scikit-learn ships the diabetes measurements centred and scaled to within about +-0.2.
    "feature_bound": 0.2,
    # This test is about the federation, not privacy: little noise (a large epsilon, within
    # the generous budget) keeps the comparison with the untrained model stable.
    "standardize_noise": 1.0,
    "eval_noise": 0.5,
}


def run(tmp_path: Path, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one 3-peer session; check every peer stored the same verified records; return the
    agreed metrics per round."""
    network = Network.create(tmp_path, 3, start=False, policy={"max_epsilon": 1000.0})
    parts = split_dataset(
        diabetes_records(np.random.default_rng(0)),
        3,
        "dirichlet",
        alpha=1.0,
        rng=np.random.default_rng(1),
    )
    write_hospital_stores(
        parts,
        [f"sqlite:///{network.kit.kits[p].directory / 'data.db'}" for p in network.peers],
        feature_names=diabetes_feature_names(),
        dataset_name="diabetes",
    )
    try:
        for process in network.peers.values():
            process.start()
        proposal = SessionProposal(
            "train",
            tuple(network.peers),
            rounds=payload["training_rounds"] + 2,
            threshold=3,
            payload=payload,
            bits=64,
            stage_seconds=10.0,
            prepare_seconds=120.0,
            seed=7,
        )
        statuses = network.run_session(proposal, timeout=700)
        assert {s.state for s in statuses.values() if not isinstance(s, Exception)} == {
            "finished"
        }, network.logs()
        reference = network.records("hospital-a", "train")
        assert [r.record.round for r in reference] == [1, 2, 3, 4], network.logs()
        for peer_id in network.peers:
            mine = network.records(peer_id, "train")
            assert [(r.record, r.record_hash) for r in mine] == [
                (r.record, r.record_hash) for r in reference
            ]
            assert network.verify(peer_id) == []
        return [dict(r.record.metrics) for r in reference]
    finally:
        network.stop()


def test_multiclass_session_improves_on_the_untrained_model(tmp_path: Path) -> None:
    metrics = run(tmp_path, {**BASE, "task": "multiclass", "classes": 3})
    # Round 2 evaluates the model entering it (untrained), round 4 the final one.
    untrained, final = metrics[1], metrics[3]
    matrix = np.asarray(final["confusion_matrix"])
    assert matrix.shape == (3, 3)
    # n is the sum of the noisy cells before clamping (unbiased); the matrix shown is clamped
    # at 0, so its sum exceeds n by the negative noise clamped away: never below n (but for
    # rounding), and on average about 0.4 σ per empty cell (σ = eval_noise times the
    # sensitivity sqrt(K + 2), 1.12 here), so 9 σ is 2.5 times the mean excess even with all
    # 9 cells empty. Seen: 84.2 against n = 79.
    sigma = BASE["eval_noise"] * math.sqrt(matrix.shape[0] + 2)
    assert final["n"] - 0.5 <= matrix.sum() <= final["n"] + 9 * sigma, (matrix, final["n"])
    # The gain is 0.10-0.18 over 3 classes (0.403 -> 0.498 in one full-suite run): the
    # check is that the federation improves on the untrained model, not by how much.
    assert final["accuracy"] > untrained["accuracy"] + 0.05, (untrained, final)
    assert final["auc_ovr"] > untrained["auc_ovr"], (untrained, final)


def test_regression_session_improves_on_the_untrained_model(tmp_path: Path) -> None:
    metrics = run(
        tmp_path,
        {
            **BASE,
            "task": "regression",
            # Disease progression runs from 25 to 346: centred on 180, within +-200 of it.
            "target_bound": 200.0,
            "target_center": 180.0,
            "residual_bound": 300.0,
        },
    )
    untrained, final = metrics[1], metrics[3]
    histogram = final["residual_histogram"]
    assert len(histogram["edges"]) == len(histogram["counts"]) + 1 == BASE_BINS + 1
    assert final["rmse"] < untrained["rmse"], (untrained, final)
    assert final["mae"] < untrained["mae"], (untrained, final)
    assert final["r2"] > untrained["r2"], (untrained, final)


BASE_BINS = 20  # the default histogram_bins
