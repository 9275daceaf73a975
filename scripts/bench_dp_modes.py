"""Accuracy of the two DP modes at the same epsilon: local noise vs distributed noise.

    python -m scripts.bench_dp_modes [--quick] [--json]

Both modes train the logistic regression on the bundled data set, split across 3 hospitals
(Dirichlet 0.5, as the demo), standardized with the pooled statistics, and are evaluated on
the pooled test split (exactly: this measures training, not the noisy evaluation release).

- **local**: FedAvg of local DP-SGD (the production payload's mode): each hospital adds all
  the noise of its own steps; sigma calibrated per hospital so that its epsilon (PLD, its
  own sampling rate) is the target.
- **distributed**: DP-FedSGD with Skellam shares (peer/training/distributed.py): one step
  per round on the sum of all hospitals' clipped gradients; every hospital adds a third of
  the noise (``honest_min = 3``), sigma calibrated on the sum so that epsilon is the target.

Each setting is run with several seeds; the median and range are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

SEED = 11
DELTA = 1e-5


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(seeds=2 if args.quick else 5)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    print(f"{result['dataset']}; test examples {result['test_examples']}")
    print(f"local:       {result['local_config']}")
    print(f"distributed: {result['distributed_config']}")
    print(f"{'epsilon':>8} {'mode':>12} {'sigma':>8} {'acc median':>11} {'min':>6} {'max':>6}")
    for row in result["rows"]:
        print(
            f"{row['epsilon']:>8g} {row['mode']:>12} {row['sigma']:>8.3f} "
            f"{row['median']:>11.3f} {row['min']:>6.3f} {row['max']:>6.3f}"
        )
    print(f"non-private centralized: {result['non_private']:.3f}")
    return 0


def run(seeds: int) -> dict[str, Any]:
    import tensorflow as tf

    from peer.data import (
        breast_cancer_records,
        global_standardizer,
        local_feature_stats,
        split_dataset,
        standardize,
    )
    from peer.training import (
        LocalTrainConfig,
        ModelSpec,
        PeerData,
        build_model,
        calibrate_noise,
        evaluate_sums,
        fedavg_round,
        get_flat_weights,
        local_train,
        metrics_from_sums,
        set_flat_weights,
    )
    from peer.training.distributed import DistributedNoise, dp_fedsgd_round

    rng = np.random.default_rng(SEED)
    parts = split_dataset(breast_cancer_records(rng), 3, "dirichlet", alpha=0.5, rng=rng)

    def arrays(part: Sequence[Any], split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [r for r in part if r.split == split]
        return np.stack([r.features for r in rows]), np.array([r.label for r in rows])

    raw_train = [arrays(p, "train") for p in parts]
    raw_test = [arrays(p, "test") for p in parts]
    mean, std = global_standardizer(sum(local_feature_stats(x) for x, _ in raw_train), 30)
    train = [(standardize(x, mean, std), y) for x, y in raw_train]
    x_test = np.concatenate([standardize(x, mean, std) for x, _ in raw_test])
    y_test = np.concatenate([y for _, y in raw_test])
    spec = ModelSpec("logreg", 30)
    start = get_flat_weights(build_model(spec, SEED))

    def accuracy(weights: np.ndarray) -> float:
        model = build_model(spec, SEED)
        set_flat_weights(model, weights)
        return float(metrics_from_sums(evaluate_sums(model, x_test, y_test))["accuracy"])

    # Local mode: as peer/payloads/training.py (FedAvg of local DP-SGD), batch 8 per hospital.
    rounds, local_steps, batch, lr_local, clip = 5, 20, 8, 0.5, 1.0
    # Distributed mode: one step per round on the sum; rate q at every hospital.
    fed_steps, q_fed, lr_fed = 100, 0.1, 1.0
    gamma = 2.0**12
    result: dict[str, Any] = {
        "dataset": "sklearn breast cancer, Dirichlet(0.5) split, 3 hospitals, logreg",
        "test_examples": len(y_test),
        "local_config": f"{rounds} rounds x {local_steps} local steps, batch {batch} "
        f"(q = {batch}/N_h), lr {lr_local}, C {clip}",
        "distributed_config": f"{fed_steps} rounds x 1 step, q {q_fed}, lr {lr_fed}, C {clip}, "
        f"gamma 2^12, Skellam shares, honest_min 3",
        "delta": DELTA,
        "rows": [],
    }
    # One model per hospital, reused (its TensorFlow graphs are traced once).
    models = [build_model(spec, SEED) for _ in train]
    model = build_model(spec, SEED)
    local_train(
        model,
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        steps=rounds * local_steps,
        batch_size=batch * 3,
        lr=lr_local,
        clip_norm=None,
        noise_multiplier=0.0,
        rng=tf.random.Generator.from_seed(1),
    )
    result["non_private"] = accuracy(get_flat_weights(model))
    for target in (1.0, 3.0, 8.0):
        # Local: sigma per hospital, for its own q over all its steps (the largest is shown).
        sigmas = [
            calibrate_noise(min(1.0, batch / len(y)), rounds * local_steps, DELTA, target)
            for _, y in train
        ]
        local_acc = []
        for seed in range(seeds):
            weights = start
            peers = [
                PeerData(f"h{i}", x, y, models[i], tf.random.Generator.from_seed(100 * seed + i))
                for i, (x, y) in enumerate(train)
            ]
            for _ in range(rounds):
                # fedavg_round shares one config; run each hospital at its own sigma.
                vectors = []
                for i, (peer, (_x, y)) in enumerate(zip(peers, train, strict=True)):
                    config = LocalTrainConfig(
                        local_steps, min(1.0, batch / len(y)), lr_local, clip, sigmas[i]
                    )
                    vectors.append(fedavg_round(weights, [peer], config=config).weights)
                # Equal public weights (as the payload's default): the plain mean.
                weights = np.mean(np.stack(vectors), axis=0).astype(np.float32)
            local_acc.append(accuracy(weights))
        result["rows"].append(_row(target, "local", max(sigmas), local_acc))
        sigma = calibrate_noise(q_fed, fed_steps, DELTA, target)
        noise = DistributedNoise(sigma, clip, gamma, honest_min=3)
        dist_acc = []
        for seed in range(seeds):
            sites = [(models[i], x, y) for i, (x, y) in enumerate(train)]
            shared = np.random.default_rng(seed)

            def generator(g: np.random.Generator = shared) -> np.random.Generator:
                return g  # reproducible here; a peer seeds each use from os.urandom

            weights = start
            for _ in range(fed_steps):
                weights = dp_fedsgd_round(
                    weights,
                    sites,
                    sampling_rate=q_fed,
                    lr=lr_fed,
                    noise=noise,
                    generator=generator,
                )
            dist_acc.append(accuracy(weights))
        result["rows"].append(_row(target, "distributed", sigma, dist_acc))
    return result


def _row(epsilon: float, mode: str, sigma: float, accuracies: list[float]) -> dict[str, Any]:
    return {
        "epsilon": epsilon,
        "mode": mode,
        "sigma": sigma,
        "median": statistics.median(accuracies),
        "min": min(accuracies),
        "max": max(accuracies),
        "runs": accuracies,
    }


if __name__ == "__main__":
    raise SystemExit(main())
