"""The noisy standardization round never blows a feature up (regression test, issue 12).

The network training test failed in about half its runs because round 1's noisy variance
estimate of a feature whose spread is small against its public bound came out negative and
was clamped to ``(1e-3 * bound)^2``: the feature was then divided by a standard deviation
~50x too small, and so was the DP-SGD noise on its weight in logit units; training diverged.
These tests replay that release (the breast-cancer bounds of the demo, 3 hospitals, the
test's noise) with many noise draws, in process and in milliseconds.
"""

from __future__ import annotations

import numpy as np

from peer.data import local_feature_stats
from peer.payloads.training import MIN_STD_FRACTION, noisy_standardizer
from peer.payloads.training_spec import TrainingSpec
from scripts.ceremony_demo import bundled_feature_bounds


def released_total(
    x: np.ndarray, bounds: np.ndarray, std: float, hospitals: int, rng: np.random.Generator
) -> np.ndarray:
    """The sum of ``hospitals`` noisy releases of round 1 (``x`` split between them)."""
    parts = np.array_split(x, hospitals)
    total = np.zeros(1 + 2 * x.shape[1])
    for part in parts:
        normalized = np.clip(part / bounds, -1.0, 1.0)
        total += local_feature_stats(normalized) + rng.normal(0.0, std, total.shape)
    return total


def test_a_noise_dominated_variance_does_not_blow_the_features_up() -> None:
    from sklearn.datasets import load_breast_cancer

    x = load_breast_cancer().data[:450]
    bounds = np.asarray(bundled_feature_bounds())
    spec = TrainingSpec.from_payload(
        {
            "kind": "training",
            "model": "logreg",
            "input_dim": 30,
            "training_rounds": 1,
            "standardize_noise": 1.0,
        }
    )
    std = spec.standardize_std()
    true_std = x.std(axis=0)
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(200):
        total = released_total(x, bounds, std, 3, rng)
        _, estimate = noisy_standardizer(total, bounds, std * np.sqrt(3))
        # How much larger than unit scale a standardized feature becomes.
        worst = max(worst, float(np.max(true_std / estimate)))
        # What the floor replaced: the raw estimate collapses for many features.
        _, raw = noisy_standardizer(total, bounds)
        assert np.min(raw / bounds) < 2 * MIN_STD_FRACTION
    # A std estimate may err large (features shrink, which training absorbs), never ~50x small.
    assert worst < 3.0, worst


def test_without_noise_the_floor_is_the_old_one_and_the_estimate_exact() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 2.0, (400, 4))
    bounds = np.full(4, 20.0)
    total = local_feature_stats(x / bounds)
    mean, std = noisy_standardizer(total, bounds, 0.0)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(std, x.std(axis=0), rtol=1e-9)
    constant = local_feature_stats(np.full((10, 1), 0.5))
    _, flat = noisy_standardizer(constant, np.ones(1), 0.0)
    assert flat[0] == MIN_STD_FRACTION
