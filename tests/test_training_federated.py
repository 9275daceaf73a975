"""A short federated run on the bundled data, and the evaluation-sum arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from peer.data import (  # noqa: E402
    breast_cancer_records,
    global_standardizer,
    local_feature_stats,
    split_dataset,
    standardize,
)
from peer.training import (  # noqa: E402
    LocalTrainConfig,
    ModelSpec,
    PeerData,
    build_model,
    evaluate_sums,
    fedavg_round,
    get_flat_weights,
    metrics_from_sums,
    numpy_sum,
    set_flat_weights,
)


def test_metrics_from_sums_of_known_vector() -> None:
    # 2 bins: positives (0, 3), negatives (2, 1): AUC = (3*2 + 0.5*3*1) / (3*3) = 7.5/9.
    vector = np.array([4.0, 4, 3, 1, 2, 0, 6, 0, 3, 2, 1])
    m = metrics_from_sums(vector)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["loss"] == pytest.approx(4 / 6)
    assert m["auc"] == pytest.approx(7.5 / 9)
    assert m["sensitivity"] == 1.0
    assert m["specificity"] == pytest.approx(2 / 3)


def test_fedavg_on_non_iid_hospitals_improves_accuracy() -> None:
    rng = np.random.default_rng(7)
    parts = split_dataset(breast_cancer_records(rng), 3, "dirichlet", alpha=0.5, rng=rng)
    data = []
    for part in parts:
        train = [r for r in part if r.split == "train"]
        test = [r for r in part if r.split == "test"]
        data.append(
            (
                np.stack([r.features for r in train]),
                np.array([r.label for r in train]),
                np.stack([r.features for r in test]),
                np.array([r.label for r in test]),
            )
        )
    mean, std = global_standardizer(sum(local_feature_stats(d[0]) for d in data), 30)
    spec = ModelSpec("mlp", 30, hidden=(8,))
    peers = [
        PeerData(
            f"h{i}",
            standardize(d[0], mean, std),
            d[1],
            build_model(spec, 1),
            tf.random.Generator.from_seed(i),
        )
        for i, d in enumerate(data)
    ]
    x_test = np.concatenate([standardize(d[2], mean, std) for d in data])
    y_test = np.concatenate([d[3] for d in data])
    evaluator = build_model(spec, 1)
    weights = get_flat_weights(evaluator)

    def global_accuracy(w: np.ndarray) -> float:
        set_flat_weights(evaluator, w)
        # Per-hospital sums added up, as secure aggregation would.
        return metrics_from_sums(
            numpy_sum([evaluate_sums(evaluator, x_test[i::3], y_test[i::3]) for i in range(3)])
        )["accuracy"]

    before = global_accuracy(weights)
    config = LocalTrainConfig(
        steps=10, sampling_rate=0.2, lr=0.5, clip_norm=1.0, noise_multiplier=0.5
    )
    history = []
    for _ in range(3):
        result = fedavg_round(weights, peers, numpy_sum, config=config)
        assert result.total_examples == sum(len(p.y) for p in peers)
        weights = result.weights
        history.append(global_accuracy(weights))
    assert history[-1] > before + 0.1
    assert history[-1] >= 0.9
