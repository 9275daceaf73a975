"""DP-SGD against plain SGD and a per-example reference; model init; noise statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

tf = pytest.importorskip("tensorflow")

from peer.training import (  # noqa: E402
    ModelSpec,
    build_model,
    get_flat_weights,
    set_flat_weights,
    trainer_for,
    update_bound,
)

TINY = ModelSpec("mlp", 4, hidden=(3,), activation="tanh")


def _batch(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, (x[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.float32)


def _reference_grads(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example flat gradients, one GradientTape per example (slow, obviously right)."""
    rows = []
    for i in range(x.shape[0]):
        with tf.GradientTape() as tape:
            logit = model(x[i : i + 1], training=False)[:, 0]
            loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=y[i : i + 1], logits=logit)
        grads = tape.gradient(loss, model.trainable_variables)
        rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
    return np.stack(rows).astype(np.float64)


def test_build_is_deterministic_in_the_seed() -> None:
    spec = ModelSpec("mlp", 30, hidden=(16, 8))
    a, b = get_flat_weights(build_model(spec, 11)), get_flat_weights(build_model(spec, 11))
    assert a.dtype == np.float32
    assert a.shape == (spec.n_parameters(),)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, get_flat_weights(build_model(spec, 12)))
    logreg = build_model(ModelSpec("logreg", 30), 0)
    assert get_flat_weights(logreg).shape == (31,)


def test_flat_weights_round_trip() -> None:
    model = build_model(TINY, 0)
    vec = np.arange(TINY.n_parameters(), dtype=np.float32)
    set_flat_weights(model, vec)
    np.testing.assert_array_equal(get_flat_weights(model), vec)
    with pytest.raises(ValueError, match="model has 19 weights"):
        set_flat_weights(model, vec[:-1])


def test_dp_step_without_noise_or_clipping_equals_sgd_step() -> None:
    spec = ModelSpec("mlp", 30, hidden=(32, 16))
    x, y = _batch(64, 30, 0)
    dp_model, sgd_model = build_model(spec, 5), build_model(spec, 5)
    trainer_for(dp_model).dp_step(
        x,
        y,
        lr=0.5,
        clip_norm=1e9,
        noise_multiplier=0.0,
        expected_batch_size=64,
        generator=tf.random.Generator.from_seed(0),
    )
    trainer_for(sgd_model).sgd_step(x, y, lr=0.5, expected_batch_size=64)
    start = get_flat_weights(build_model(spec, 5))
    dp, sgd = get_flat_weights(dp_model), get_flat_weights(sgd_model)
    assert np.abs(dp - start).max() > 1e-3  # the step did something
    np.testing.assert_allclose(dp, sgd, rtol=0, atol=1e-6)


def test_dp_step_equals_per_example_reference() -> None:
    model = build_model(TINY, 3)
    x, y = _batch(8, 4, 1)
    x *= 5.0  # large inputs: most examples get clipped
    start = get_flat_weights(model).astype(np.float64)
    grads = _reference_grads(model, x, y)
    clip, lr, denom = 0.5, 0.1, 6.0
    norms = np.linalg.norm(grads, axis=1)
    assert ((norms > clip).sum() >= 2 and (norms < clip).sum() >= 1) or (norms > clip).all()
    clipped = grads * np.minimum(1.0, clip / norms)[:, None]
    expected = start - lr * clipped.sum(axis=0) / denom
    np.testing.assert_allclose(trainer_for(model).per_example_norms(x, y), norms, rtol=1e-5)
    trainer_for(model).dp_step(
        x,
        y,
        lr=lr,
        clip_norm=clip,
        noise_multiplier=0.0,
        expected_batch_size=denom,
        generator=tf.random.Generator.from_seed(0),
    )
    np.testing.assert_allclose(get_flat_weights(model), expected, rtol=0, atol=1e-6)


_PROPERTY_MODEL: list[Any] = []


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 5),
    scale=st.floats(0.01, 50.0),
    clip=st.floats(1e-3, 10.0),
)
def test_clipped_per_example_norms_never_exceed_clip(
    seed: int, n: int, scale: float, clip: float
) -> None:
    if not _PROPERTY_MODEL:
        _PROPERTY_MODEL.append(build_model(TINY, 9))
    model = _PROPERTY_MODEL[0]
    x, y = _batch(n, 4, seed)
    x *= scale
    norms = trainer_for(model).per_example_norms(x, y).astype(np.float64)
    grads = _reference_grads(model, x, y)
    np.testing.assert_allclose(norms, np.linalg.norm(grads, axis=1), rtol=1e-4, atol=1e-7)
    factors = np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    clipped_norms = np.linalg.norm(grads * factors[:, None], axis=1)
    assert np.all(clipped_norms <= clip * (1 + 1e-4))


def test_noise_has_the_calibrated_standard_deviation() -> None:
    spec = ModelSpec("mlp", 30, hidden=(128, 64))  # 12,289 coordinates
    x, y = _batch(32, 30, 2)
    noisy, clean = build_model(spec, 0), build_model(spec, 0)
    clip, sigma, lr, denom = 0.7, 1.3, 2.0, 4.0
    trainer_for(noisy).dp_step(
        x,
        y,
        lr=lr,
        clip_norm=clip,
        noise_multiplier=sigma,
        expected_batch_size=denom,
        generator=tf.random.Generator.from_seed(1234),
    )
    trainer_for(clean).dp_step(
        x,
        y,
        lr=lr,
        clip_norm=clip,
        noise_multiplier=0.0,
        expected_batch_size=denom,
        generator=tf.random.Generator.from_seed(1),
    )
    noise = (get_flat_weights(noisy) - get_flat_weights(clean)).astype(np.float64)
    expected_sd = lr * sigma * clip / denom
    # With 12,289 draws the sample sd is within 1% of the truth with overwhelming
    # probability (its relative sd is 1/sqrt(2n) = 0.64%); 5% is ~8 standard errors.
    assert abs(noise.std() / expected_sd - 1) < 0.05
    assert abs(noise.mean()) < 5 * expected_sd / np.sqrt(noise.size)
    # A different generator state gives different noise.
    assert not np.allclose(noise[:10], 0)


def test_local_training_stays_within_update_bound() -> None:
    from peer.training import local_train

    spec = ModelSpec("mlp", 30, hidden=(16,))
    model = build_model(spec, 0)
    x, y = _batch(200, 30, 3)
    steps, q, lr, clip, sigma = 30, 0.1, 0.5, 1.0, 1.0
    delta, n, taken = local_train(
        model,
        x,
        y,
        steps=steps,
        sampling_rate=q,
        lr=lr,
        clip_norm=clip,
        noise_multiplier=sigma,
        rng=tf.random.Generator.from_seed(4),
    )
    assert (n, taken) == (200, steps)
    bound = update_bound(
        clip, sigma, lr, steps, n_examples=n, sampling_rate=q, n_coordinates=delta.size
    )
    assert 0 < np.abs(delta).max() <= bound
    # Noise alone has sd lr*sigma*C*sqrt(T)/(qN) per coordinate; the bound must exceed it.
    assert bound > 5 * lr * sigma * clip * np.sqrt(steps) / (q * n)


@pytest.mark.parametrize("task", ["multiclass", "regression"])
def test_task_losses_per_example_norms_and_step_equal_the_reference(task: str) -> None:
    """Softmax (3 logits) and squared-error DP-SGD: the per-example norms and the clipped
    step equal one GradientTape per example."""
    from peer.training import DPSGD, softmax_loss, squared_loss

    rng = np.random.default_rng(4)
    x = (rng.normal(size=(8, 4)) * 3).astype(np.float32)
    if task == "multiclass":
        spec, loss = ModelSpec("mlp", 4, hidden=(3,), activation="tanh", outputs=3), softmax_loss
        y = rng.integers(0, 3, 8).astype(np.float32)
    else:
        spec, loss = TINY, squared_loss
        y = rng.normal(size=8).astype(np.float32)
    model = build_model(spec, 5)
    rows = []
    for i in range(8):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(loss(y[i : i + 1], model(x[i : i + 1], training=False)))
        grads = tape.gradient(value, model.trainable_variables)
        rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
    reference = np.stack(rows).astype(np.float64)
    trainer = DPSGD(model, loss)
    norms = np.linalg.norm(reference, axis=1)
    np.testing.assert_allclose(trainer.per_example_norms(x, y), norms, rtol=1e-5)
    clip, lr, denom = 0.5, 0.1, 6.0
    start = get_flat_weights(model).astype(np.float64)
    clipped = reference * np.minimum(1.0, clip / norms)[:, None]
    trainer.dp_step(
        x,
        y,
        lr=lr,
        clip_norm=clip,
        noise_multiplier=0.0,
        expected_batch_size=denom,
        generator=tf.random.Generator.from_seed(0),
    )
    expected = start - lr * clipped.sum(axis=0) / denom
    np.testing.assert_allclose(get_flat_weights(model), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- padded, XLA-compiled steps

_SMALL = ModelSpec("mlp", 6, hidden=(5, 4), activation="tanh")  # 64 parameters: XLA path


def test_padded_bucket_sizes() -> None:
    from peer.training.padded_xla import _BUCKETS, _bucket

    sizes = [_bucket(c) for c in range(0, 5000)]
    assert sizes[:9] == [1, 1, 2, 3, 4, 5, 6, 7, 8]
    assert all(b >= c and (c <= 8 or b <= 1.25 * c) for c, b in enumerate(sizes))
    assert _bucket(256) == 256
    assert set(sizes) <= set(_BUCKETS)
    assert _bucket(257) == 320
    # Few distinct sizes, so few XLA compilations: 4 per doubling.
    assert len({b for b in sizes if 8 < b <= 4096}) == 4 * 9  # 9 doublings from 8 to 4096


def test_small_models_take_the_xla_loop_and_large_ones_the_graph_loop() -> None:
    from peer.training.dpsgd import XLA_MAX_PARAMETERS

    small, large = ModelSpec("mlp", 30, hidden=(128, 64)), ModelSpec("mlp", 30, hidden=(512, 256))
    assert small.n_parameters() <= XLA_MAX_PARAMETERS < large.n_parameters()
    assert trainer_for(build_model(small, 0)).xla
    assert not trainer_for(build_model(large, 0)).xla


def test_pad_batches_keeps_the_sampled_rows_in_order() -> None:
    from peer.training.padded_xla import _pad_batches

    masks = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]], dtype=bool)
    rows, weights = _pad_batches(tf.constant(masks), 4, 4)
    assert rows.shape == weights.shape == (4, 4)
    for step in range(3):
        k = int(masks[step].sum())
        np.testing.assert_array_equal(rows.numpy()[step, :k], np.flatnonzero(masks[step]))
        np.testing.assert_array_equal(weights.numpy()[step], [1.0] * k + [0.0] * (4 - k))
    assert not weights.numpy()[3].any()  # a whole padding step


@pytest.mark.parametrize("private", [True, False])
def test_padded_step_equals_the_unpadded_step(private: bool) -> None:
    """Same batch, same noise draw: padding rows (real records, weight 0) change nothing."""
    from peer.training import DPSGD

    x, y = _batch(11, 6, 7)
    x *= 4.0  # most examples clipped
    n_params = _SMALL.n_parameters()
    normal = tf.random.Generator.from_seed(3).normal([1, n_params])
    if not private:
        normal = tf.zeros([1, 0])
    scalars = [tf.constant(v, tf.float32) for v in (0.3, 0.5, 1.2, 8.0, 0.0)]

    def step(rows: list[int], weights: list[float]) -> np.ndarray:
        model = build_model(_SMALL, 2)
        trainer = DPSGD(model, xla=True)
        trainer._compiled(
            tf.constant(x),
            tf.constant(y),
            tf.constant([rows], tf.int32),
            tf.constant([weights], tf.float32),
            normal,
            tf.constant(1),
            *scalars,
            [],
            private,
            False,
        )
        return get_flat_weights(model)

    start = get_flat_weights(build_model(_SMALL, 2))
    unpadded = step(list(range(11)), [1.0] * 11)
    padded = step([*range(11), 3, 9, 0, 5, 10], [1.0] * 11 + [0.0] * 5)
    assert np.abs(unpadded - start).max() > 1e-3  # the step did something
    np.testing.assert_allclose(padded, unpadded, rtol=0, atol=1e-6)


def test_xla_dp_step_equals_the_graph_dp_step() -> None:
    """The public dp_step: XLA with a padded batch (11 -> 12) against the unpadded graph step,
    same batch and same generator state (hence the same noise)."""
    from peer.training import DPSGD

    x, y = _batch(11, 6, 8)
    x *= 4.0
    models = [build_model(_SMALL, 4), build_model(_SMALL, 4)]
    for model, xla in zip(models, (True, False), strict=True):
        trainer = DPSGD(model, xla=xla)
        assert trainer.xla is xla
        trainer.dp_step(
            x,
            y,
            lr=0.4,
            clip_norm=0.3,
            noise_multiplier=1.1,
            expected_batch_size=9.0,
            generator=tf.random.Generator.from_seed(5),
        )
    np.testing.assert_allclose(
        get_flat_weights(models[0]), get_flat_weights(models[1]), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("prox_mu", [0.0, 0.2])
def test_xla_run_equals_the_unpadded_graph_run(prox_mu: float) -> None:
    """run() on the padded XLA path against PoissonTrainer's loop of unpadded batches, same
    generator state: the same Poisson samples (of varying sizes), clipping, noise, divisor
    q N and FedProx pull, so the same weights."""
    from peer.training import DPSGD

    n, steps, q = 40, 6, 0.3
    x, y = _batch(n, 6, 9)
    x *= 3.0
    models = [build_model(_SMALL, 6), build_model(_SMALL, 6)]
    taken = [
        DPSGD(model, xla=xla).run(
            x,
            y,
            steps=steps,
            sampling_rate=q,
            lr=0.5,
            clip_norm=0.4,
            noise_multiplier=0.9,
            generator=tf.random.Generator.from_seed(11),
            prox_mu=prox_mu,
        )
        for model, xla in zip(models, (True, False), strict=True)
    ]
    assert taken[0] == taken[1] > 0
    generator = tf.random.Generator.from_seed(11)
    sizes = set()
    for _ in range(steps):  # the draws of both loops: mask, then noise, step by step
        sizes.add(int(np.sum(generator.uniform([n]).numpy() < q)))
        generator.normal([_SMALL.n_parameters()])
    assert len(sizes) > 1  # the batch sizes did vary, so padding was exercised
    np.testing.assert_allclose(
        get_flat_weights(models[0]), get_flat_weights(models[1]), rtol=0, atol=2e-6
    )
