"""Server optimizers (peer.training.server_optim): known answers, bounds, FedAvg unchanged;
FedProx in the DP-SGD loop (peer.training.dpsgd): mu = 0 is DP-SGD, the noise does not change.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.training import ModelSpec, build_model, get_flat_weights, local_train, set_flat_weights
from peer.training.dpsgd import secure_generator
from peer.training.federated import fedavg_step, mean_update
from peer.training.server_optim import OptimizerKind, ServerOptimizer


def test_fedadam_and_fedyogi_known_answers() -> None:
    """Two rounds by hand (Reddi et al. 2021, Algorithm 2), one coordinate each way."""
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    d1, d2 = 0.02, -0.5
    m1 = (1 - b1) * d1
    m2 = b1 * m1 + (1 - b1) * d2
    adam_v1 = b2 * tau**2 + (1 - b2) * d1**2
    adam_v2 = b2 * adam_v1 + (1 - b2) * d2**2
    # Yogi: v grows by (1 - b2) d^2 when d^2 > v, shrinks when d^2 < v.
    yogi_v1 = tau**2 + (1 - b2) * d1**2
    yogi_v2 = yogi_v1 + (1 - b2) * d2**2
    for kind, v1, v2 in (("fedadam", adam_v1, adam_v2), ("fedyogi", yogi_v1, yogi_v2)):
        opt = ServerOptimizer.from_payload({"optimizer": kind, "server_lr": lr})
        state = opt.initial_state(1)
        w1, state = opt.step([1.0], state, [d1])
        assert w1[0] == pytest.approx(1.0 + lr * m1 / (math.sqrt(v1) + tau), rel=1e-12)
        w2, state = opt.step(w1, state, [d2])
        assert state.v[0] == pytest.approx(v2, rel=1e-12)
        assert w2[0] == pytest.approx(w1[0] + lr * m2 / (math.sqrt(v2) + tau), rel=1e-12)
    # Yogi's v shrinks (additively) once the updates are smaller than it.
    yogi = ServerOptimizer(OptimizerKind.FEDYOGI)
    _, state = yogi.step([0.0], yogi.initial_state(1), [1.0])
    before = state.v[0]
    _, state = yogi.step([0.0], state, [0.01])
    assert state.v[0] == pytest.approx(before - (1 - 0.99) * 1e-4, rel=1e-12)


def test_fedavg_is_bit_for_bit_the_previous_rule() -> None:
    rng = np.random.default_rng(0)
    base, total = rng.normal(size=1000), rng.normal(size=1000) * 3
    opt = ServerOptimizer()
    new, _ = opt.step(base, opt.initial_state(1000), mean_update(total, 3.0, 0.5))
    assert np.array_equal(new, fedavg_step(base, total, 3.0, 0.5))
    assert opt.state_length(1000) == 0


@settings(max_examples=50, deadline=None)
@given(
    kind=st.sampled_from(["fedadam", "fedyogi"]),
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(1e-6, 1e3),
)
def test_adaptive_steps_stay_within_their_bound(kind: str, seed: int, scale: float) -> None:
    opt = ServerOptimizer.from_payload({"optimizer": kind, "server_lr": 0.3, "tau": 1e-2})
    rng = np.random.default_rng(seed)
    w, state = np.zeros(16), opt.initial_state(16)
    for _ in range(5):
        delta = np.clip(rng.normal(0, scale, 16), -scale, scale)
        new, state = opt.step(w, state, delta)
        assert np.all(state.v > 0)
        assert np.all(np.abs(new - w) <= opt.step_bound(scale) * (1 + 1e-12))
        w = new


def test_state_round_trips_and_is_checked() -> None:
    opt = ServerOptimizer(OptimizerKind.FEDADAM)
    _, state = opt.step(np.zeros(4), opt.initial_state(4), np.arange(4.0))
    back = opt.decode_state(opt.encode_state(state), 4)
    assert np.array_equal(back.m, state.m.astype(np.float32))
    with pytest.raises(ValueError, match="fedadam state has 7 values, expected 8"):
        opt.decode_state(np.zeros(7), 4)
    assert ServerOptimizer.from_payload(opt.payload()) == opt


# ---------------------------------------------------------------------- FedProx


def _train(
    model_kind: Literal["logreg", "mlp"],
    prox_mu: float | None,
    steps: int,
    clip: float | None = 1.0,
) -> npt.NDArray[np.float32]:
    spec = ModelSpec(model_kind, 6, (8,))
    model = build_model(spec, seed=1)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=200) > 0).astype(np.int64)
    # prox_mu None: the call without the argument at all (DP-SGD as it was).
    run = functools.partial(
        local_train,
        model,
        x,
        y,
        steps=steps,
        sampling_rate=0.2,
        lr=0.5,
        clip_norm=clip,
        noise_multiplier=1.0,
        rng=secure_generator(b"fedprox-test"),
    )
    run() if prox_mu is None else run(prox_mu=prox_mu)
    return get_flat_weights(model)


@pytest.mark.parametrize("model_kind", ["logreg", "mlp"])
def test_fedprox_with_mu_zero_is_dp_sgd_exactly(model_kind: Literal["logreg", "mlp"]) -> None:
    assert np.array_equal(_train(model_kind, 0.0, 5), _train(model_kind, None, 5))


def test_fedprox_adds_the_pull_and_leaves_the_noise_alone() -> None:
    """Same generator, two steps: the sampling and the noise of both steps are identical, so
    the only difference is the second step's pull ``-lr mu (w_1 - w_0)`` (the first step's
    pull is zero: it starts at the anchor). Any change of noise would show as a difference
    of the noise's size (sigma C lr / (q N) = 0.0125 per coordinate), not of float rounding."""
    mu, lr = 0.5, 0.5
    spec = ModelSpec("logreg", 6, ())
    w0 = get_flat_weights(build_model(spec, seed=1)).astype(np.float64)
    w1 = _train("logreg", None, 1).astype(np.float64)
    plain = _train("logreg", None, 2).astype(np.float64)
    prox = _train("logreg", mu, 2).astype(np.float64)
    assert np.any(w1 != w0)
    np.testing.assert_allclose(prox, plain - lr * mu * (w1 - w0), atol=1e-6)
    assert not np.allclose(prox, plain, atol=1e-6)


def test_fedprox_pulls_towards_the_global_model() -> None:
    spec = ModelSpec("logreg", 6, ())
    w0 = get_flat_weights(build_model(spec, seed=1))
    far = np.linalg.norm(_train("logreg", 0.0, 40, clip=None) - w0)
    near = np.linalg.norm(_train("logreg", 1.0, 40, clip=None) - w0)
    assert near < 0.8 * far


def test_fedprox_mu_is_checked() -> None:
    model = build_model(ModelSpec("logreg", 2, ()), seed=0)
    set_flat_weights(model, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="prox_mu must be finite and >= 0"):
        local_train(
            model,
            np.zeros((4, 2)),
            np.zeros(4),
            steps=1,
            sampling_rate=0.5,
            lr=0.1,
            clip_norm=1.0,
            noise_multiplier=1.0,
            prox_mu=-1.0,
        )


def test_fedprox_in_the_layerwise_trainer() -> None:
    """The declared-model trainer shares the loop: mu = 0 is DP-SGD exactly, mu > 0 differs."""
    from peer.training import LayerwiseDPSGD

    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    results = []
    for mu in (None, 0.0, 2.0):
        model = build_model(ModelSpec("mlp", 4, (5,)), seed=4)
        run = functools.partial(
            LayerwiseDPSGD(model).run,
            x,
            y,
            steps=3,
            sampling_rate=0.3,
            lr=0.5,
            clip_norm=1.0,
            noise_multiplier=1.0,
            generator=secure_generator(b"layerwise-prox"),
        )
        run() if mu is None else run(prox_mu=mu)
        results.append(get_flat_weights(model))
    assert np.array_equal(results[0], results[1])
    assert not np.allclose(results[0], results[2])
