"""Distributed discrete noise: Skellam shares sum to the target noise; clipped sums are exact."""

from __future__ import annotations

import numpy as np
import pytest

from peer.training import ModelSpec, build_model, get_flat_weights
from peer.training.distributed import (
    DistributedNoise,
    clipped_gradient_sum,
    dp_fedsgd_round,
    skellam_share,
)


def test_shares_of_the_honest_minimum_carry_the_target_variance() -> None:
    noise = DistributedNoise(sigma=1.5, clip_norm=1.0, gamma=2.0**10, honest_min=3)
    d = 31
    rng = np.random.default_rng(0)
    shares = [skellam_share(200_000, noise.share_mu(d), rng) for _ in range(3)]
    total = np.sum(shares, axis=0)
    target = (noise.sigma * noise.sensitivity(d)) ** 2
    assert total.dtype == np.int64  # integer noise: the ring sum is exact
    assert np.var(total) == pytest.approx(target, rel=0.02)
    assert abs(np.mean(total)) < 5 * np.sqrt(target / total.size)
    # One hospital's share alone is a third of it: it protects nothing on its own.
    assert np.var(shares[0]) == pytest.approx(target / 3, rel=0.02)


def test_clipped_gradient_sum_matches_per_example_clipping() -> None:
    model = build_model(ModelSpec("logreg", 4), 1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 4)).astype(np.float32) * 3
    y = rng.integers(0, 2, 16)
    w = get_flat_weights(model).astype(np.float64)
    kernel, bias = w[:4], w[4]
    expected = np.zeros(5)
    for xi, yi in zip(x.astype(np.float64), y, strict=True):
        p = 1 / (1 + np.exp(-(xi @ kernel + bias)))
        grad = np.concatenate(((p - yi) * xi, [p - yi]))
        expected += grad * min(1.0, 0.5 / np.linalg.norm(grad))
    np.testing.assert_allclose(clipped_gradient_sum(model, x, y, 0.5), expected, rtol=1e-4)


def test_a_round_without_data_moves_only_by_the_noise() -> None:
    spec = ModelSpec("logreg", 3)
    sites = [(build_model(spec, 1), np.zeros((5, 3), np.float32), np.zeros(5, np.int64))]
    noise = DistributedNoise(sigma=1.0, clip_norm=1.0, gamma=2.0**10, honest_min=1)
    start = get_flat_weights(build_model(spec, 1))
    new = dp_fedsgd_round(
        start,
        sites,
        sampling_rate=1e-9,  # nobody sampled: the released sum is pure noise
        lr=1.0,
        noise=noise,
        generator=lambda: np.random.default_rng(3),
    )
    moved = (new - start).astype(np.float64)
    assert np.any(moved != 0)
